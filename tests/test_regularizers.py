"""The prior fine-tuning methods the paper compares with, against their equations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from childtuning_jax import child_tuning_driven, keep_fractions
from childtuning_jax.models import EncoderConfig, EncoderForSequenceClassification
from childtuning_jax.regularizers import (decay_to_pretrained, mixout, r3f_noise, recadam,
                                          symmetric_kl, top_layers_mask)


def _trees_of(seed):
  rng = np.random.default_rng(seed)
  return {"a": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=4), jnp.float32)}}


def test_decay_to_pretrained_is_the_gradient_of_the_penalty():
  params, pretrained, grads = _trees_of(0), _trees_of(1), _trees_of(2)
  tx = decay_to_pretrained(0.3, pretrained)
  got, _ = tx.update(grads, tx.init(params), params)
  penalty = lambda w: 0.3 * sum(jnp.sum((a - b) ** 2) for a, b in
                                zip(jax.tree.leaves(w), jax.tree.leaves(pretrained)))
  want = jax.tree.map(jnp.add, grads, jax.grad(penalty)(params))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  with pytest.raises(ValueError, match="needs params"):
    tx.update(grads, tx.init(params))
  with pytest.raises(ValueError, match="pretrained"):
    decay_to_pretrained(0.3, {"a": {"kernel": jnp.zeros((3, 4))}}).init(params)


def test_recadam_scales_the_update_and_pulls_outside_adam():
  params, pretrained, updates = _trees_of(0), _trees_of(1), _trees_of(2)
  k, t0, lr = 0.5, 3, optax.linear_schedule(0.1, 0.0, 10)
  tx = recadam(pretrained, lr, k=k, t0=t0, strength=7.0, where=lambda name: "bias" not in name)
  state = tx.init(params)
  for t in range(6):
    got, state = tx.update(updates, state, params)
    task = 1 / (1 + np.exp(-k * (t - t0)))
    want = task * updates["a"]["kernel"] - float(lr(t)) * (1 - task) * 7.0 * (
        params["a"]["kernel"] - pretrained["a"]["kernel"])
    np.testing.assert_allclose(got["a"]["kernel"], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got["a"]["bias"], updates["a"]["bias"])  # left out by `where`
  assert int(state.count) == 6


def test_recadam_after_adam_still_learns_where_a_coupled_penalty_stalls():
  # Fit w to a target far from w0 = 0 with Adam; the pull is decoupled from Adam's moments.
  target, w0 = jnp.full(4, 3.0), {"w": jnp.zeros(4)}
  loss = lambda p: jnp.sum((p["w"] - target) ** 2)
  tx = optax.chain(optax.adam(0.1), recadam(w0, 0.1, k=0.5, t0=10, strength=1.0))
  params, state = dict(w0), tx.init(w0)
  for _ in range(200):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(params["w"], target, atol=0.05)


def _encoder_params(layers=3):
  config = EncoderConfig(vocab_size=20, hidden_size=8, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=8, max_position_embeddings=8)
  model = EncoderForSequenceClassification(config)
  return model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]


def test_top_layers_mask_trains_the_top_layers_and_the_head():
  params = _encoder_params(3)
  groups = lambda name: name.split("/")[2] if "/encoder/" in name else name.split("/")[0 if name.startswith("classifier") else 1]
  assert keep_fractions(top_layers_mask(params, 0), group_by=groups) == {
      "embeddings": 0.0, "layer_0": 0.0, "layer_1": 0.0, "layer_2": 0.0, "pooler": 1.0, "classifier": 1.0}
  assert keep_fractions(top_layers_mask(params, 2), group_by=groups) == {
      "embeddings": 0.0, "layer_0": 0.0, "layer_1": 1.0, "layer_2": 1.0, "pooler": 1.0, "classifier": 1.0}
  child_tuning_driven(top_layers_mask(params, 3)).init(params)  # a valid CT-D mask
  with pytest.raises(ValueError, match=r"k must be in \[0, 3\]"):
    top_layers_mask(params, 4)
  with pytest.raises(ValueError, match="no leaf"):
    top_layers_mask({"w": jnp.zeros(2)}, 1)


def test_mixout_keeps_the_expectation_and_replaces_at_the_rate():
  params, pretrained = _trees_of(0), _trees_of(1)
  keys = jax.random.split(jax.random.key(0), 4000)
  mixed = jax.vmap(lambda key: mixout(params, pretrained, 0.4, key))(keys)
  np.testing.assert_array_equal(mixed["a"]["bias"], np.broadcast_to(params["a"]["bias"], (4000, 4)))
  w, w0 = params["a"]["kernel"], pretrained["a"]["kernel"]
  replaced = np.isclose(mixed["a"]["kernel"], (w0 - 0.4 * w0) / 0.6, atol=1e-6)
  assert abs(replaced.mean() - 0.4) < 0.01
  kept = np.isclose(mixed["a"]["kernel"], (w - 0.4 * w0) / 0.6, atol=1e-6)
  assert (replaced | kept).all()
  spread = np.asarray(jnp.std(mixed["a"]["kernel"], axis=0)) / np.sqrt(4000)
  assert (np.abs(np.asarray(jnp.mean(mixed["a"]["kernel"], axis=0)) - w) < 5 * spread + 1e-6).all()
  # Gradients reach w through the kept entries only, scaled by 1 / (1 - p).
  key = jax.random.key(3)
  grad = jax.grad(lambda p: jnp.sum(mixout(p, pretrained, 0.4, key)["a"]["kernel"]))(params)
  mask = np.isclose(mixout(params, pretrained, 0.4, key)["a"]["kernel"], (w - 0.4 * w0) / 0.6, atol=1e-6)
  np.testing.assert_allclose(grad["a"]["kernel"], mask / 0.6, rtol=1e-6)
  assert mixout(params, pretrained, 0.0, key) is params
  with pytest.raises(ValueError, match="rate"):
    mixout(params, pretrained, 1.0, key)


def test_r3f_noise_and_symmetric_kl():
  key = jax.random.key(0)
  normal = r3f_noise(key, (200_000,), 0.5)
  assert abs(float(normal.std()) - 0.5) < 0.005
  uniform = r3f_noise(key, (200_000,), 0.5, "uniform")
  assert float(uniform.min()) >= -0.5 and float(uniform.max()) <= 0.5
  assert abs(float(uniform.std()) - 0.5 / np.sqrt(3)) < 0.005
  with pytest.raises(ValueError, match="kind"):
    r3f_noise(key, (2,), 0.5, "laplace")
  a, b = np.random.default_rng(0).normal(size=(2, 5, 3))
  p, q = np.exp(a) / np.exp(a).sum(-1, keepdims=True), np.exp(b) / np.exp(b).sum(-1, keepdims=True)
  want = np.mean(np.sum(p * np.log(p / q), -1) + np.sum(q * np.log(q / p), -1))
  np.testing.assert_allclose(float(symmetric_kl(jnp.asarray(a), jnp.asarray(b))), want, rtol=1e-5)
  assert float(symmetric_kl(jnp.asarray(a), jnp.asarray(b))) == pytest.approx(
      float(symmetric_kl(jnp.asarray(b), jnp.asarray(a))))


def test_pulls_take_w0_from_the_update_when_not_given_one():
  w0, params = _trees_of(0), _trees_of(1)
  grads = jax.tree.map(jnp.ones_like, params)
  for own, shared in [(decay_to_pretrained(0.3, w0), decay_to_pretrained(0.3)),
                      (recadam(w0, 0.1, k=0.5, t0=2), recadam(None, 0.1, k=0.5, t0=2))]:
    chain = optax.chain(shared, optax.sgd(0.1))  # optax.chain passes the extra argument on
    assert shared.init(params).pretrained is None  # no copy of w0 in the state
    want = optax.chain(own, optax.sgd(0.1)).update(grads, optax.chain(own, optax.sgd(0.1)).init(params), params)[0]
    got = chain.update(grads, chain.init(params), params, pretrained=w0)[0]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="pretrained=w0"):
      shared.update(grads, shared.init(params), params)

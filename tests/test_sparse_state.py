"""CT-D's optimizer state in proportion to p: ``child_tuning_adamw(..., mode="driven",
sparse_state=True)`` against the dense driven AdamW, and the state's size at BERT-large
shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from childtuning_jax import ChildTuningSparseState, child_tuning_adamw
from childtuning_jax.models import EncoderConfig, EncoderForSequenceClassification


def _params():
  rng = np.random.default_rng(0)
  return {"encoder": {"kernel": jnp.asarray(rng.normal(size=(32, 48)), jnp.float32),
                      "bias": jnp.asarray(rng.normal(size=48), jnp.float32),
                      "LayerNorm": {"scale": jnp.asarray(rng.normal(size=48), jnp.float32)}},
          "embedding": jnp.asarray(rng.normal(size=(50, 16)), jnp.float32),
          "head": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}


def _mask(params):
  rng = np.random.default_rng(1)
  mask = jax.tree.map(lambda x: rng.random(x.shape) < 0.2, params)
  mask["head"] = True  # a whole leaf, as a Python bool
  mask["encoder"]["LayerNorm"]["scale"] = np.zeros(48, bool)  # a leaf with no child entry
  return mask


def _decays(params):  # as the trainer's: no decay of biases and LayerNorm scales
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key not in ("bias", "scale"),
                                          params)


def _train(tx, params, steps=60):
  rng = np.random.default_rng(2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sparse_state_gives_the_dense_updates_and_keeps_frozen_entries(weight_decay):
  params, mask = _params(), _mask(_params())
  schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-2, 10, 60)
  common = dict(mode="driven", mask=mask, weight_decay=weight_decay, weight_decay_mask=_decays)
  dense, _ = _train(optax.chain(optax.clip_by_global_norm(1.0),
                                child_tuning_adamw(schedule, **common)), params)
  sparse, state = _train(optax.chain(optax.clip_by_global_norm(1.0),
                                     child_tuning_adamw(schedule, **common, sparse_state=True)),
                         params)
  for name, got, want in zip(("bias", "kernel", "scale", "embedding", "head"),
                             jax.tree.leaves(sparse), jax.tree.leaves(dense)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)
  full_mask = jax.tree.map(lambda m, p: np.broadcast_to(np.asarray(m), p.shape), mask, params)
  for before, after, keep in zip(jax.tree.leaves(params), jax.tree.leaves(sparse),
                                 jax.tree.leaves(full_mask)):
    np.testing.assert_array_equal(np.asarray(after)[~keep], np.asarray(before)[~keep])
    assert np.all(np.asarray(after)[keep] != np.asarray(before)[keep])
  sparse_state = state[1]
  assert isinstance(sparse_state, ChildTuningSparseState)
  moments = sparse_state.inner_state[0].mu
  assert [m.shape for m in jax.tree.leaves(moments)] == [  # a leaf without child: 1 entry
      (max(int(np.sum(k)), 1),) for k in jax.tree.leaves(full_mask)]


def _state_bytes(tx, shapes):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(tx.init, shapes)))


def test_state_at_bert_large_shapes_is_proportional_to_p():
  config = EncoderConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                         intermediate_size=4096)
  shapes = jax.eval_shape(EncoderForSequenceClassification(config).init, jax.random.key(0),
                          jnp.zeros((1, 8), jnp.int32))["params"]
  parameters = sum(x.size for x in jax.tree.leaves(shapes))
  assert 330e6 < parameters < 340e6
  param_bytes = 4 * parameters

  def every_tenth(x):
    keep = np.zeros(x.size, bool)
    keep[::10] = True
    return keep.reshape(x.shape)
  mask = jax.tree.map(every_tenth, shapes)
  dense = _state_bytes(child_tuning_adamw(2e-5, mode="driven", mask=mask, weight_decay=0.01),
                       shapes)
  sparse = _state_bytes(child_tuning_adamw(2e-5, mode="driven", mask=mask, weight_decay=0.01,
                                           sparse_state=True), shapes)
  vanilla = _state_bytes(optax.adamw(2e-5, weight_decay=0.01), shapes)
  assert dense - vanilla == parameters  # one byte of mask per parameter: one copy of the mask
  assert sparse <= 0.35 * param_bytes, sparse / param_bytes
  assert sparse >= 0.1 * parameters * 12  # int32 position, float32 mu and nu per child entry


def test_sparse_state_refusals_say_what_to_do():
  params = _params()
  with pytest.raises(ValueError, match="mode='driven'"):
    child_tuning_adamw(1e-3, reserve_p=0.3, key=0, sparse_state=True)
  traced = child_tuning_adamw(1e-3, mode="driven", mask=lambda p: jax.tree.map(
      lambda x: x > 0, p), sparse_state=True)
  with pytest.raises(ValueError, match="traced here .* call init outside jit"):
    jax.jit(traced.init)(params)
  assert jax.tree.leaves(traced.init(params))  # outside jit the callable mask is concrete
  arrays = jax.tree.map(lambda x: np.ones(x.shape, bool), params)
  tx = child_tuning_adamw(1e-3, mode="driven", mask=_mask(params), weight_decay=0.1,
                          weight_decay_mask=arrays, sparse_state=True)
  with pytest.raises(TypeError, match="weight_decay_mask leaf 'embedding' must be a bool"):
    tx.update(params, tx.init(params), params)

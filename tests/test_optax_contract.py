"""The optax integration contract, one harness over every transform of the library (in the
spirit of optax's ``contrib/_common_test.py``): a transform joins by adding a line to
TRANSFORMS.

jit and eager agree; ``optax.inject_hyperparams`` wraps them (and the injected values can
change between steps); ``optax.MultiSteps`` accumulates; bf16 and f32 updates keep their
dtype; the state keeps its structure, dtypes and shardings across steps and inside
``lax.cond``/``lax.scan``; ``optax.tree_utils.tree_get`` finds the CT-F key and the mask.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from childtuning_jax import child_tuning_adamw, child_tuning_driven, child_tuning_free
from childtuning_jax.regularizers import decay_to_pretrained, recadam


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": jnp.asarray(rng.normal(size=(16, 24)), dtype),
                    "bias": jnp.asarray(rng.normal(size=24), dtype)},
          "odd": jnp.asarray(rng.normal(size=(3, 5, 7)), dtype)}


def _mask(params):
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda x: rng.random(x.shape) < 0.3, params)


def _w0(params):
  return jax.tree.map(lambda x: x * 0.5, params)


# name: (factory of the transform for these params, extra arguments of update)
TRANSFORMS = {
    "child_tuning_free": (lambda p: child_tuning_free(0.25, key=0), {}),
    "child_tuning_driven": (lambda p: child_tuning_driven(_mask(p)), {}),
    "child_tuning_driven around adamw": (
        lambda p: child_tuning_driven(_mask(p), optax.adamw(1e-2, weight_decay=0.1)), {}),
    "child_tuning_adamw free": (
        lambda p: child_tuning_adamw(1e-2, reserve_p=0.25, key=0, weight_decay=0.1), {}),
    "child_tuning_adamw driven": (
        lambda p: child_tuning_adamw(1e-2, mode="driven", mask=_mask(p), weight_decay=0.1), {}),
    "child_tuning_adamw driven, sparse state": (
        lambda p: child_tuning_adamw(1e-2, mode="driven", mask=_mask(p), weight_decay=0.1,
                                     sparse_state=True), {}),
    "decay_to_pretrained": (lambda p: decay_to_pretrained(0.1, _w0(p)), {}),
    "decay_to_pretrained, w0 per update": (lambda p: decay_to_pretrained(0.1), {"w0": True}),
    "recadam": (lambda p: recadam(_w0(p), 1e-2, k=0.5, t0=2), {}),
    "recadam, w0 per update": (lambda p: recadam(None, 1e-2, k=0.5, t0=2), {"w0": True}),
}


def _extra(options, params):
  return {"pretrained": _w0(params)} if options.get("w0") else {}


def _grads(params, step):
  return jax.tree.map(lambda x: jnp.cos(x * (step + 1)).astype(x.dtype), params)


def _run(tx, params, options, steps=3, update=None):
  update = update or tx.update
  state = tx.init(params)
  out = []
  for step in range(steps):
    updates, state = update(_grads(params, step), state, params, **_extra(options, params))
    out.append(updates)
  return out, state


def _assert_close(a, b, **tolerance):
  def numbers(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(
        getattr(x, "dtype", np.float32), jax.dtypes.prng_key) else x, tree)
  for x, y in zip(jax.tree.leaves(numbers(a)), jax.tree.leaves(numbers(b)), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tolerance)


names = pytest.mark.parametrize("name", list(TRANSFORMS))


@names
def test_jit_and_eager_agree(name):
  factory, options = TRANSFORMS[name]
  params = _params()
  tx = factory(params)
  eager, _ = _run(tx, params, options)
  jitted, _ = _run(tx, params, options, update=jax.jit(tx.update))
  _assert_close(eager, jitted, rtol=1e-6, atol=1e-7)


@names
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_updates_keep_the_dtype(name, dtype):
  factory, options = TRANSFORMS[name]
  params = _params(dtype)
  updates, _ = _run(factory(params), params, options, steps=1)
  assert {x.dtype for x in jax.tree.leaves(updates[0])} == {jnp.dtype(dtype)}


def _signature(state):
  return jax.tree.structure(state), [(jnp.shape(x), getattr(x, "dtype", None) or np.asarray(x).dtype)
                                     for x in jax.tree.leaves(state)]


@names
def test_state_keeps_structure_and_dtypes_across_steps_and_in_cond_and_scan(name):
  factory, options = TRANSFORMS[name]
  params = _params()
  tx = factory(params)
  state = tx.init(params)
  extra = _extra(options, params)
  _, after = _run(tx, params, options)
  assert _signature(after) == _signature(state)

  @jax.jit
  def maybe_update(state, apply):
    return jax.lax.cond(apply, lambda s: tx.update(_grads(params, 0), s, params, **extra)[1],
                        lambda s: s, state)
  assert _signature(maybe_update(state, True)) == _signature(state)

  def step(state, grads):
    updates, state = tx.update(grads, state, params, **extra)
    return state, updates
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(_grads(params, s) for s in range(3)))
  scanned, _ = jax.lax.scan(step, state, stacked)
  assert _signature(scanned) == _signature(state)
  _assert_close(jax.tree.leaves(scanned), jax.tree.leaves(after), rtol=1e-5, atol=1e-6)


@names
def test_state_keeps_its_shardings_across_steps(name):
  """The state placed as optax's recipe does (``tree_map_params``: each params-like leaf
  as its parameter, the rest replicated) keeps its shardings through a jitted update."""
  factory, options = TRANSFORMS[name]
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
  replicated = NamedSharding(mesh, P())
  shardings = {"dense": {"kernel": NamedSharding(mesh, P("a", "b")),
                         "bias": NamedSharding(mesh, P("b"))},
               "odd": replicated}
  params = jax.device_put(_params(), shardings)
  tx = factory(params)
  extra = _extra(options, params)
  state = tx.init(params)
  state_shardings = optax.tree_map_params(tx, lambda _, sharding: sharding, state, shardings,
                                          transform_non_params=lambda _: replicated)
  state = jax.device_put(state, state_shardings)
  update = jax.jit(lambda g, s: tx.update(g, s, params, **extra))
  _, new_state = update(jax.device_put(_grads(params, 0), shardings), state)
  leaves = jax.tree.leaves(state)
  assert [a.sharding.is_equivalent_to(b.sharding, np.ndim(a)) for a, b in
          zip(leaves, jax.tree.leaves(new_state))] == [True] * len(leaves)
  no_params_like = {"child_tuning_free", "decay_to_pretrained, w0 per update",
                    "recadam, w0 per update", "child_tuning_adamw driven, sparse state"}
  assert any(a.sharding.spec == P("a", "b") for a in leaves) == (name not in no_params_like)


@names
def test_multisteps_accumulates_then_applies_once(name):
  factory, options = TRANSFORMS[name]
  params = _params()
  tx = factory(params)
  extra = _extra(options, params)
  accumulating = optax.MultiSteps(tx, every_k_schedule=3)
  state = accumulating.init(params)
  for step in range(3):
    updates, state = accumulating.update(_grads(params, step), state, params, **extra)
  mean = jax.tree.map(lambda *g: sum(g) / 3, *(_grads(params, s) for s in range(3)))
  want, _ = tx.update(mean, tx.init(params), params, **extra)
  _assert_close(updates, want, rtol=1e-5, atol=1e-6)


def test_tree_get_finds_the_ctf_key_and_the_mask():
  params = _params()
  free = child_tuning_adamw(1e-3, reserve_p=0.3, key=7)
  key = optax.tree_utils.tree_get(free.init(params), "rng_key")
  assert jax.random.key_data(key).tolist() == jax.random.key_data(jax.random.key(7)).tolist()
  mask = _mask(params)
  for tx in (child_tuning_driven(mask), child_tuning_adamw(1e-3, mode="driven", mask=mask)):
    found = optax.tree_utils.tree_get(tx.init(params), "mask")  # one copy, so tree_get finds it
    for got, want in zip(jax.tree.leaves(found), jax.tree.leaves(mask)):
      np.testing.assert_array_equal(got, want)


def test_inject_hyperparams_gives_the_same_updates_and_lets_them_change():
  params = _params()
  mask = _mask(params)
  for kwargs in (dict(reserve_p=0.25, key=3), dict(mode="driven", mask=mask)):
    plain = child_tuning_adamw(1e-2, weight_decay=0.1, **kwargs)
    injected = optax.inject_hyperparams(child_tuning_adamw, static_args=("mode",))(
        learning_rate=1e-2, weight_decay=0.1, **kwargs)
    a, _ = _run(plain, params, {})
    b, state = _run(injected, params, {}, update=jax.jit(injected.update))
    _assert_close(a, b, rtol=1e-6, atol=1e-7)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    zero, _ = injected.update(_grads(params, 3), state, params)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(zero))


def test_injected_reserve_p_keeps_its_fraction_and_can_change_between_steps():
  grads = {"w": jnp.ones((512, 512))}
  tx = optax.inject_hyperparams(child_tuning_free)(reserve_p=0.25, key=0)
  plain = child_tuning_free(0.25, key=0)
  state = tx.init(grads)
  update = jax.jit(tx.update)
  updates, state = update(grads, state)
  np.testing.assert_array_equal(updates["w"], plain.update(grads, plain.init(grads))[0]["w"])
  state.hyperparams["reserve_p"] = jnp.asarray(0.5)
  updates, state = update(grads, state)
  kept = np.asarray(updates["w"]) != 0
  assert abs(kept.mean() - 0.5) < 0.01 and np.all(np.asarray(updates["w"])[kept] == 2.0)


def test_a_missing_key_warns_and_batched_keys_explain_the_pmap_recipe():
  with pytest.warns(UserWarning, match="no key given"):
    child_tuning_free(0.3)
  with pytest.warns(UserWarning, match="no key given"):
    child_tuning_adamw(1e-3, reserve_p=0.3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    child_tuning_free(0.3, key=0)
  per_device = jax.random.split(jax.random.key(0), 8)
  for keys in (per_device, jax.random.key_data(per_device)):
    with pytest.raises(ValueError, match="pass one key and replicate the optimizer state"):
      child_tuning_free(0.3, key=keys)

"""Tests of child_tuning_free, child_tuning_driven and child_tuning_adamw."""

import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.core import FrozenDict
from jax.sharding import NamedSharding, PartitionSpec as P

from childtuning_jax import _trees as ct_trees
from childtuning_jax import (
    child_tuning_adamw,
    child_tuning_driven,
    child_tuning_free,
    select_child_network,
)


def _params(seed=0):
  """A small tree with awkward leaves: last axes not divisible by 4, a scalar, an empty one."""
  rng = np.random.default_rng(seed)
  shapes = {"dense": {"kernel": (16, 24), "bias": (24,)}, "odd": (5, 3), "scalar": (), "head": (7,),
            "empty": (0, 4)}
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def _ones_like(tree, dtype=jnp.float32):
  return jax.tree.map(lambda x: jnp.ones(x.shape, dtype), tree)


def _update(tx, updates, state=None, params=None):
  return tx.update(updates, tx.init(updates) if state is None else state, params)


# --- Child-Tuning-F ---------------------------------------------------------------------------


def test_unrolled_threefry_is_bit_identical_to_jax_primitive():
  from jax.extend.random import threefry2x32_p
  from childtuning_jax._random import threefry2x32 as _threefry2x32

  rng = np.random.default_rng(0)
  k1, k2 = (jnp.uint32(v) for v in rng.integers(0, 2**32, 2))
  x1, x2 = (jnp.asarray(rng.integers(0, 2**32, 1000), jnp.uint32) for _ in range(2))
  for got, want in zip(_threefry2x32(k1, k2, x1, x2), threefry2x32_p.bind(k1, k2, x1, x2)):
    np.testing.assert_array_equal(got, want)



def test_free_reserve_one_is_exact_identity():
  grads = _params()
  updates, _ = _update(child_tuning_free(1.0, key=0), grads)
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("p", [0.2, 0.3, 0.4])
def test_free_kept_entries_scaled_by_exactly_one_over_p(p):
  grads = {"w": jnp.asarray(np.random.default_rng(1).normal(size=(64, 256)), jnp.float32)}
  updates, _ = _update(child_tuning_free(p, key=3), grads)
  kept = np.asarray(updates["w"]) != 0
  np.testing.assert_array_equal(np.asarray(updates["w"])[kept],
                                np.asarray(grads["w"])[kept] * np.float32(1 / p))
  assert 0 < kept.mean() < 1


@pytest.mark.parametrize("p", [0.3, 0.1234])
def test_free_keep_probability_is_within_1e4_of_p(p):
  # 40M decisions: the standard error is ~7e-5, so a bias of 1e-3 (an 8-bit threshold, say)
  # would fail.
  tx = child_tuning_free(p, key=0)
  grads = {"a": jnp.ones((1000, 2000)), "b": jnp.ones((2000, 1000))}
  state = tx.init(grads)
  step = jax.jit(tx.update)
  kept = total = 0
  for _ in range(10):
    updates, state = step(grads, state)
    for leaf in jax.tree.leaves(updates):
      k = np.asarray(leaf) != 0
      kept += k.sum()
      total += k.size
  sigma = math.sqrt(p * (1 - p) / total)
  assert abs(kept / total - p) < 1e-4 + 4 * sigma


def test_free_decisions_are_independent_between_neighbours_leaves_and_steps():
  p = 0.3
  tx = child_tuning_free(p, key=5)
  grads = {"a": jnp.ones((512, 512)), "b": jnp.ones((512, 512))}
  u1, state = tx.update(grads, tx.init(grads))
  u2, _ = tx.update(grads, state)
  a1, b1, a2 = (np.asarray(x).ravel() != 0 for x in (u1["a"], u1["b"], u2["a"]))
  tol = 5 * math.sqrt(p * p * (1 - p * p) / a1.size)
  assert abs((a1 & b1).mean() - p * p) < tol  # leaves
  assert abs((a1 & a2).mean() - p * p) < tol  # steps
  for shift in (1, 2, 3, 4, 512):  # neighbours along rows and columns
    assert abs((a1[:-shift] & a1[shift:]).mean() - p * p) < tol


def test_free_is_unbiased_over_many_steps():
  grads = {"w": jnp.linspace(-2.0, 3.0, 50)}
  tx = child_tuning_free(0.25, key=11)

  def body(state, _):
    updates, state = tx.update(grads, state)
    return state, updates["w"]

  _, history = jax.lax.scan(body, tx.init(grads), None, length=20000)
  mean = np.asarray(history).mean(axis=0)
  # Per-entry std of one draw is |g| sqrt((1-p)/p) = 1.73|g|; over 20000 steps ~0.012 |g|.
  np.testing.assert_allclose(mean, np.asarray(grads["w"]), atol=0.06 * np.abs(grads["w"]).max())


def test_free_same_key_same_masks_different_key_different_masks():
  grads = _params()
  key_types = [7, jax.random.key(7), jax.random.PRNGKey(7)]
  runs = [_update(child_tuning_free(0.3, key), grads)[0] for key in key_types]
  for run in runs[1:]:
    for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(run)):
      np.testing.assert_array_equal(a, b)
  other = _update(child_tuning_free(0.3, 8), grads)[0]
  assert not np.array_equal(runs[0]["dense"]["kernel"], other["dense"]["kernel"])


def test_free_state_key_advances_every_update():
  grads = {"w": jnp.ones((32, 32))}
  tx = child_tuning_free(0.5, key=0)
  u1, state = tx.update(grads, tx.init(grads))
  u2, _ = tx.update(grads, state)
  assert not np.array_equal(u1["w"], u2["w"])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_free_keeps_dtype(dtype):
  grads = jax.tree.map(lambda x: x.astype(dtype), _params())
  updates, _ = _update(child_tuning_free(0.3, key=0), grads)
  for got, want in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    assert got.dtype == dtype
    kept = np.asarray(got.astype(jnp.float32)) != 0
    expected = (want * jnp.asarray(1 / 0.3, dtype)).astype(jnp.float32)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32))[kept],
                                  np.asarray(expected)[kept])


def test_free_chain_under_jit_matches_eager():
  params = _params()
  grads = jax.tree.map(lambda x: 0.1 * x + 1.0, params)
  tx = optax.chain(child_tuning_free(0.3, key=0), optax.adamw(2e-5))
  eager = tx.update(grads, tx.init(params), params)
  jitted = jax.jit(tx.update)(grads, jax.jit(tx.init)(params), params)
  as_numbers = lambda tree: jax.tree.map(
      lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
      tree)
  for a, b in zip(jax.tree.leaves(as_numbers(eager)), jax.tree.leaves(as_numbers(jitted))):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_free_with_typed_key_under_jit():
  grads = _params()
  tx = child_tuning_free(0.3, jax.random.key(0))
  updates, state = jax.jit(tx.update)(grads, tx.init(grads))
  assert jax.dtypes.issubdtype(state.rng_key.dtype, jax.dtypes.prng_key)
  assert jax.tree.structure(updates) == jax.tree.structure(grads)


@pytest.mark.parametrize("key", [2, jax.random.key(2)], ids=["int", "typed"])
def test_free_pmap_replicas_identical_and_equal_to_single_device(key):
  n = jax.local_device_count()
  assert n == 8, "conftest.py forces 8 CPU devices"
  params = {"w": jnp.ones((8, 24)), "b": jnp.arange(6.0)}
  grads = jax.tree.map(lambda x: x + 0.5, params)
  tx = optax.chain(child_tuning_free(0.3, key), optax.adamw(1e-2))
  state = tx.init(params)
  replicate = lambda tree: jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)
  step = jax.pmap(tx.update, axis_name="batch")
  single = jax.jit(tx.update)
  rep_state, one_state = replicate(state), state
  for _ in range(3):
    rep_updates, rep_state = step(replicate(grads), rep_state, replicate(params))
    one_updates, one_state = single(grads, one_state, params)
    for rep, one in zip(jax.tree.leaves(rep_updates), jax.tree.leaves(one_updates)):
      for replica in range(n):
        np.testing.assert_array_equal(rep[replica], one)


@pytest.mark.parametrize("key", [4, jax.random.key(4)], ids=["int", "typed"])
def test_free_sharded_params_no_gather_and_same_masks(key):
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  # Three kernels and two biases of one shape: drawn in one loop each (bernoulli_per_shape),
  # the kernels two in a trip (the second trip padded).
  rng = np.random.default_rng(0)
  grads = {"kernel": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32),
           "kernel2": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32),
           "kernel3": jnp.asarray(rng.normal(size=(64, 128)), jnp.float32),
           "bias": jnp.ones((128,)), "bias2": jnp.ones((128,)), "odd": jnp.ones((8, 6))}
  specs = {"kernel": P("data", "model"), "kernel2": P("data", "model"),
           "kernel3": P("data", "model"), "bias": P("model"), "bias2": P("model"),
           "odd": P("data", None)}
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), grads, specs)
  tx = child_tuning_free(0.3, key)
  state = tx.init(grads)
  step = jax.jit(tx.update)
  hlo = step.lower(sharded, state).compile().as_text()
  for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
    assert collective not in hlo, f"mask drawing introduced a {collective}"
  got, _ = step(sharded, state)
  want, _ = step(grads, state)
  for name in grads:
    assert got[name].sharding.is_equivalent_to(sharded[name].sharding, grads[name].ndim)
    np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("reserve_p", [0.3, np.float32(0.3)], ids=["float", "array"])
def test_free_masks_are_one_bernoulli_per_leaf_under_tree_split_keys(reserve_p):
  """Leaves sharing a shape are drawn in one loop; each mask must still be
  _random.bernoulli under that leaf's key from optax.tree_utils.tree_split_key_like."""
  from childtuning_jax import _random
  rng = np.random.default_rng(3)
  shapes = {"a": (16, 24), "b": (16, 24), "c": (24,), "d": (24,), "e": (24,), "f": (5, 3),
            "g": (), "h": (7,), "i": (6, 2)}
  grads = {name: jnp.asarray(rng.normal(size=shape) + 3.0, jnp.float32)
           for name, shape in shapes.items()}
  p = jnp.asarray(reserve_p) if isinstance(reserve_p, np.ndarray) else reserve_p
  tx = child_tuning_free(p, key=7)
  state = tx.init(grads)
  updates, _ = jax.jit(tx.update)(grads, state)
  _, mask_key = jax.random.split(state.rng_key)
  keys = optax.tree_utils.tree_split_key_like(mask_key, grads)
  for name, grad in grads.items():
    keep = np.asarray(_random.bernoulli(keys[name], 0.3, grad.shape))
    np.testing.assert_array_equal(np.asarray(updates[name]) != 0, keep, err_msg=name)
    np.testing.assert_allclose(np.asarray(updates[name])[keep], np.asarray(grad)[keep] / 0.3,
                               rtol=1e-6)


def _distinct_fusions(hlo: str) -> int:
  """Fused computations of a compiled module that differ other than in their names."""
  blocks = [b for b in hlo.split("\n\n") if b.lstrip().startswith("%fused")]
  return len({re.sub(r"metadata=\{[^}]*\}|%[\w.\-]+", "", b.split("\n", 1)[1]) for b in blocks})


def test_free_leaves_of_one_shape_share_their_kernels():
  """The state's rows reach the update as inputs, so the optimizer's loops over the leaves of
  one shape are one computation (compiled once) whatever the number of leaves; rows known at
  compile time (a hand-made state without them) give each leaf loops of its own, and the
  same masks."""
  def compiled(n, rows):
    params = {f"w{i}": jnp.ones((64, 32)) for i in range(n)}
    tx = optax.chain(child_tuning_free(0.3, key=1), optax.adamw(1e-3))
    state = tx.init(params)
    if not rows:
      state = (state[0]._replace(rows=()),) + tuple(state[1:])
    update = jax.jit(tx.update)
    return _distinct_fusions(update.lower(params, state, params).compile().as_text()), \
        update(params, state, params)[0]
  (three, _), (six, with_rows) = compiled(3, True), compiled(6, True)
  assert six == three
  (three, _), (six, constant_rows) = compiled(3, False), compiled(6, False)
  assert six > three
  for a, b in zip(jax.tree.leaves(with_rows), jax.tree.leaves(constant_rows)):
    np.testing.assert_array_equal(a, b)


def test_free_masks_leave_through_one_barrier_that_the_cpu_compiler_removes(monkeypatch):
  """Every leaf's decisions leave the drawing through one optimization barrier (what keeps
  XLA's TPU compiler from fusing the draws into the step: BENCHMARKS.md); on the CPU the
  compiled program is the same without it."""
  from childtuning_jax import _random
  params = {"a": jnp.ones((64, 32)), "b": jnp.ones((64, 32)), "c": jnp.ones((64, 32)),
            "bias": jnp.ones((32,)), "bias2": jnp.ones((32,)), "odd": jnp.ones((7, 5))}
  tx = optax.chain(child_tuning_free(0.3, key=1), optax.adamw(1e-3))
  state = tx.init(params)
  update = jax.jit(tx.update)
  barriers = [eqn for eqn in jax.make_jaxpr(tx.update)(params, state, params).eqns
              if eqn.primitive.name == "optimization_barrier"]
  assert len(barriers) == 1
  assert sorted(tuple(v.aval.shape) for v in barriers[0].invars) == sorted(
      np.shape(x) for x in jax.tree.leaves(params))
  assert all(v.aval.dtype == jnp.bool_ for v in barriers[0].invars)

  def program():
    text = update.lower(params, state, params).compile().as_text()
    text = text[text.index("\n%"):]  # the computations, without the tables of source names
    return [line.strip() for line in
            re.sub(r"metadata=\{[^}]*\}|stack_frame_id=\d+|%[\w.\-]+", "", text).splitlines()]
  with_barrier, updated = program(), update(params, state, params)[0]
  monkeypatch.setattr(_random.lax, "optimization_barrier", lambda values: values)
  jax.clear_caches()
  assert program() == with_barrier
  for a, b in zip(jax.tree.leaves(updated), jax.tree.leaves(update(params, state, params)[0])):
    np.testing.assert_array_equal(a, b)


def _loop_lengths(jaxpr) -> list[int]:
  """The trip counts of the scans (``lax.map``) in a jaxpr, its sub-jaxprs included."""
  lengths = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      lengths.append(eqn.params["length"])
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr
        if hasattr(sub, "eqns"):
          lengths += _loop_lengths(sub)
  return lengths


@pytest.mark.parametrize("trips", [2, 3, None])
def test_free_draws_each_shape_in_a_few_trips_with_the_same_masks(monkeypatch, trips):
  """The leaves of one shape are drawn in a loop of MASK_LOOP_TRIPS trips whatever their
  number (on a GPU each trip is a kernel of its own), the last trip padded where they do not
  divide; every trip count, and a trip per leaf (None), gives the same masks."""
  from childtuning_jax import _random
  shapes = {**{f"k{i}": (8, 4) for i in range(7)}, **{f"b{i}": (4,) for i in range(5)},
            "x0": (3,), "x1": (3,), "alone": (2, 2)}
  grads = {name: jnp.full(shape, 1.0) for name, shape in shapes.items()}
  tx = child_tuning_free(0.5, key=3)
  state = tx.init(grads)
  reference = jax.jit(tx.update)(grads, state)[0]
  monkeypatch.setattr(_random, "MASK_LOOP_TRIPS", trips)
  update = lambda g, s: tx.update(g, s)  # a new function: traced again under the patch
  lengths = sorted(_loop_lengths(jax.make_jaxpr(update)(grads, state).jaxpr))
  assert lengths == ([2, 5, 7] if trips is None else sorted([min(trips, 2), trips, trips]))
  got = jax.jit(update)(grads, state)[0]
  for name in grads:
    np.testing.assert_array_equal(got[name], reference[name], err_msg=name)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), 1e-11])
def test_free_refuses_reserve_p_out_of_range(bad):
  with pytest.raises(ValueError, match="reserve_p"):
    child_tuning_free(bad)


@pytest.mark.parametrize("bad", ["0.3", None, True])
def test_free_refuses_non_numeric_reserve_p(bad):
  with pytest.raises(TypeError, match="reserve_p"):
    child_tuning_free(bad)


@pytest.mark.parametrize("bad", [1.5, "seed", np.zeros(3, np.float32)])
def test_free_refuses_bad_key(bad):
  with pytest.raises(TypeError, match="key"):
    child_tuning_free(0.3, bad)


# --- Child-Tuning-D ---------------------------------------------------------------------------


def _random_mask(tree, p=0.3, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.random(x.shape) < p, tree)


def test_driven_zeros_outside_and_keeps_inside_exactly():
  grads = _params()
  mask = _random_mask(grads)
  updates, _ = _update(child_tuning_driven(mask), grads)
  for got, want, keep in zip(*(jax.tree.leaves(t) for t in (updates, grads, mask))):
    np.testing.assert_array_equal(got, np.where(keep, want, 0.0))
    assert not np.signbit(np.asarray(got)[~keep]).any(), "outside entries must be +0.0"


def test_driven_sandwich_freezes_non_child_weights_bit_identically_under_weight_decay():
  params = _params()
  mask = _random_mask(params, 0.2)
  tx = optax.chain(child_tuning_driven(mask), optax.adamw(1e-2, weight_decay=0.1),
                   child_tuning_driven(mask))
  state = tx.init(params)
  loss = lambda p: sum(jnp.sum(jnp.sin(x) * x) for x in jax.tree.leaves(p))

  @jax.jit
  def step(p, s):
    updates, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, updates), s

  new = params
  for _ in range(5):
    new, state = step(new, state)
  moved = 0
  for before, after, keep in zip(*(jax.tree.leaves(t) for t in (params, new, mask))):
    before, after = np.asarray(before), np.asarray(after)
    np.testing.assert_array_equal(after[~keep], before[~keep])  # bit-identical
    moved += np.count_nonzero(after[keep] != before[keep])
  assert moved == sum(int(np.count_nonzero(m)) for m in jax.tree.leaves(mask))


def test_driven_before_adamw_only_lets_weight_decay_shrink_frozen_weights():
  # The published code's placement: what the sandwich above protects against.
  params = {"w": jnp.ones(4)}
  mask = {"w": np.array([True, False, False, False])}
  tx = optax.chain(child_tuning_driven(mask), optax.adamw(1e-1, weight_decay=0.1))
  updates, _ = tx.update({"w": jnp.ones(4)}, tx.init(params), params)
  assert np.all(np.asarray(updates["w"])[1:] < 0)


def test_child_tuning_adamw_builds_the_same_chains():
  params = _params()
  grads = jax.tree.map(lambda x: jnp.cos(x), params)
  mask = _random_mask(params)
  pairs = [
      (child_tuning_adamw(1e-3, reserve_p=0.3, key=1, weight_decay=0.01),
       optax.chain(child_tuning_free(0.3, 1), optax.adamw(1e-3, eps=1e-6, weight_decay=0.01))),
      (child_tuning_adamw(1e-3, mode="driven", mask=mask, weight_decay=0.01),
       optax.chain(child_tuning_driven(mask), optax.adamw(1e-3, eps=1e-6, weight_decay=0.01),
                   child_tuning_driven(mask))),
  ]
  for alias, chain in pairs:
    a, _ = alias.update(grads, alias.init(params), params)
    b, _ = chain.update(grads, chain.init(params), params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "needs reserve_p"),
    (dict(mode="driven"), "needs mask"),
    (dict(mode="driven", mask={"w": np.ones(2, bool)}, reserve_p=0.2), "only used by mode='free'"),
    (dict(reserve_p=0.3, mask={"w": np.ones(2, bool)}), r"mask= is CT-D's child network \(mode='driven'\)"),
    (dict(mode="Free", reserve_p=0.3), "mode must be"),
])
def test_child_tuning_adamw_refuses_inconsistent_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    child_tuning_adamw(1e-3, **kwargs)


def test_driven_mask_with_missing_leaf_refused_at_init_naming_it():
  params = _params()
  mask = _random_mask(params)
  del mask["dense"]["bias"]
  tx = child_tuning_driven(mask)
  with pytest.raises(ValueError, match="dense/bias"):
    tx.init(params)


def test_driven_mask_with_wrong_shape_refused_at_init_naming_it():
  params = _params()
  mask = _random_mask(params)
  mask["dense"]["kernel"] = mask["dense"]["kernel"].T
  with pytest.raises(ValueError, match=r"dense/kernel.*\(24, 16\).*\(16, 24\)"):
    child_tuning_driven(mask).init(params)


def test_driven_mask_with_wrong_dtype_refused_naming_it():
  params = _params()
  mask = _random_mask(params)
  mask["odd"] = mask["odd"].astype(np.float32)
  with pytest.raises(TypeError, match="'odd' must be a boolean array or a bool, got float32"):
    child_tuning_driven(mask)


def test_driven_works_with_frozendict_and_lists():
  params = FrozenDict({"layers": [jnp.ones((2, 3)), jnp.ones(3)]})
  mask = FrozenDict({"layers": [np.array([[True, False, True]] * 2), np.array([False] * 3)]})
  updates, _ = _update(child_tuning_driven(mask), params)
  np.testing.assert_array_equal(updates["layers"][0], [[1, 0, 1]] * 2)
  np.testing.assert_array_equal(updates["layers"][1], [0, 0, 0])


# --- flax.nnx ---------------------------------------------------------------------------------


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 8, rngs=rngs)
    self.out = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


def _nnx_loss(model, x):
  return jnp.mean(model(x) ** 2)


@pytest.mark.parametrize("mode", ["free", "driven"])
def test_transforms_work_through_nnx_optimizer(mode):
  model = _MLP(nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  mask = None
  if mode == "driven":
    scores = jax.tree.map(lambda x: jnp.abs(x), nnx.state(model, nnx.Param))
    mask = select_child_network(scores, 0.3)
  tx = (child_tuning_adamw(1e-2, reserve_p=0.3, key=0, weight_decay=0.1) if mode == "free"
        else child_tuning_adamw(1e-2, mode="driven", mask=mask, weight_decay=0.1))
  # flax 0.11 changed the API: Optimizer(model, tx, wrt=...) and update(model, grads).
  new_api = "model" in inspect.signature(nnx.Optimizer.update).parameters
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param) if new_api else nnx.Optimizer(model, tx)
  x = jnp.ones((3, 4))

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(_nnx_loss)(model, x)
    optimizer.update(*((model, grads) if new_api else (grads,)))

  for _ in range(3):
    step(model, optimizer)
  after = nnx.state(model, nnx.Param)
  changed = [np.asarray(a) != b for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
  assert any(c.any() for c in changed)
  if mode == "driven":
    for c, keep in zip(changed, jax.tree.leaves(mask)):
      assert not (c & ~keep).any()


# --- trees as users have them --------------------------------------------------------------


def _nnx_state_and_linen_names():
  model = _MLP(nnx.Rngs(0))
  return model, nnx.state(model, nnx.Param)


@pytest.mark.parametrize("form", ["dict", "FrozenDict", "nnx.State", "nnx.to_pure_dict"])
def test_a_mask_fits_the_same_parameters_in_any_tree_form(form):
  model, state = _nnx_state_and_linen_names()
  pure = nnx.to_pure_dict(state)
  mask_dict = jax.tree.map(lambda x: np.asarray(x) > 0, pure)
  mask = {"dict": mask_dict, "FrozenDict": FrozenDict(mask_dict),
          "nnx.State": jax.tree.map(lambda x: np.asarray(x) > 0, state),
          "nnx.to_pure_dict": nnx.to_pure_dict(jax.tree.map(lambda x: np.asarray(x) > 0, state))}[form]
  for params in (state, pure, FrozenDict(pure)):  # every form of mask against every form of params
    tx = child_tuning_driven(mask)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params))
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    got = {n: np.asarray(u) for n, u in ct_trees.named_leaves(updates)}
    want = {n: np.asarray(m, np.float32) for n, m in ct_trees.named_leaves(mask_dict)}
    assert got.keys() == want.keys() and all(np.array_equal(got[n], want[n]) for n in got)


def test_bool_leaves_and_a_callable_mask_as_optax_takes_them():
  params = _params()
  tx = child_tuning_driven({"dense": {"kernel": True, "bias": False}, "odd": _random_mask(params)["odd"],
                            "scalar": True, "head": False, "empty": True})
  updates, _ = _update(tx, params)
  np.testing.assert_array_equal(updates["dense"]["kernel"], params["dense"]["kernel"])
  assert not np.any(np.asarray(updates["dense"]["bias"]))
  by_function = child_tuning_driven(lambda p: jax.tree.map(lambda x: x > 0, p))
  updates, _ = _update(by_function, params)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
    np.testing.assert_array_equal(u, np.where(np.asarray(p) > 0, p, 0))


def test_a_mask_of_other_leaves_is_refused_naming_them_and_the_fix():
  model, state = _nnx_state_and_linen_names()
  wrong = {"hidden": {"kernel": True}, "output": {"kernel": True}}
  with pytest.raises(ValueError, match=r"missing from mask: 'hidden/bias', 'out/bias', "
                     r"'out/kernel'.*in mask but not in params: 'output/kernel'.*nnx.to_pure_dict"):
    child_tuning_driven(wrong).init(state)


def test_a_mask_saved_from_the_linen_model_loads_into_the_nnx_model(tmp_path):
  from childtuning_jax import load_mask, save_mask

  class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))
  linen = LinenMLP().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  mask = jax.tree.map(lambda x: np.asarray(x) > 0, linen)
  save_mask(tmp_path / "mask.npz", mask)
  _, state = _nnx_state_and_linen_names()
  loaded = load_mask(tmp_path / "mask.npz", like=state)
  assert jax.tree.structure(loaded) == jax.tree.structure(state)
  assert {n: m.tolist() for n, m in ct_trees.named_leaves(loaded)} == {
      n: m.tolist() for n, m in ct_trees.named_leaves(mask)}
  save_mask(tmp_path / "from_nnx.npz", loaded)  # and back
  np.testing.assert_array_equal(load_mask(tmp_path / "from_nnx.npz", like=linen)["hidden"]["kernel"],
                                mask["hidden"]["kernel"])


def test_adamw_mask_keyword_points_to_weight_decay_mask():
  with pytest.raises(ValueError, match="weight_decay_mask="):
    child_tuning_adamw(1e-3, reserve_p=0.3, key=0, mask=lambda p: p)

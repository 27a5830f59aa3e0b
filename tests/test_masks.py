"""Tests of select_child_network and the mask helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from childtuning_jax import keep_fractions, load_mask, mask_jaccard, save_mask, select_child_network


def _fisher(seed=0):
  rng = np.random.default_rng(seed)
  return {"encoder": {"layer_0": {"kernel": rng.random((6, 5)), "bias": rng.random(5)},
                      "layer_1": {"kernel": rng.random((5, 4)), "bias": rng.random(4)}},
          "classifier": {"kernel": rng.random((4, 2)) * 1e-9, "bias": np.zeros(2)}}


def _brute_force_top_k(fisher, p, selectable):
  """Sort every selectable entry by (-score, position) and keep the first round(p*N)."""
  leaves = jax.tree.leaves(fisher)
  entries = [(-float(v), leaf_index, flat_index)
             for leaf_index, (leaf, ok) in enumerate(zip(leaves, selectable)) if ok
             for flat_index, v in enumerate(np.ravel(leaf))]
  entries.sort()
  chosen = {(leaf, flat) for _, leaf, flat in entries[:round(p * len(entries))]}
  masks = []
  for leaf_index, (leaf, ok) in enumerate(zip(leaves, selectable)):
    flat = [not ok or (leaf_index, i) in chosen for i in range(np.size(leaf))]
    masks.append(np.array(flat).reshape(np.shape(leaf)))
  return masks


@pytest.mark.parametrize("p", [0.1, 0.2, 0.3, 0.5, 1.0])
def test_select_keeps_exactly_round_p_n_highest_entries(p):
  fisher = _fisher()
  mask = select_child_network(fisher, p)
  n = sum(np.size(x) for x in jax.tree.leaves(fisher))
  assert sum(int(np.count_nonzero(m)) for m in jax.tree.leaves(mask)) == round(p * n)
  want = _brute_force_top_k(fisher, p, [True] * len(jax.tree.leaves(fisher)))
  for got, expected in zip(jax.tree.leaves(mask), want):
    assert got.dtype == bool
    np.testing.assert_array_equal(got, expected)


def test_select_is_one_global_threshold_not_per_leaf():
  fisher = {"big": np.full(10, 5.0), "small": np.full(10, 1.0)}
  mask = select_child_network(fisher, 0.5)
  assert mask["big"].all() and not mask["small"].any()


def test_select_breaks_ties_deterministically_with_exact_count():
  # Many equal (e.g. zero) scores: np.percentile + ">=" keeps all 100; we keep exactly 30.
  fisher = {"a": np.zeros((10, 5)), "b": np.zeros(50)}
  mask = select_child_network(fisher, 0.3)
  assert mask["a"].ravel()[:30].all() and not mask["a"].ravel()[30:].any()
  assert not mask["b"].any()
  threshold = np.percentile(np.concatenate([np.ravel(x) for x in fisher.values()]), 70)
  assert sum(int((x >= threshold).sum()) for x in fisher.values()) == 100
  again = select_child_network(fisher, 0.3)
  for x, y in zip(jax.tree.leaves(mask), jax.tree.leaves(again)):
    np.testing.assert_array_equal(x, y)


def test_select_always_trainable_prefix_tree_and_callable_agree():
  fisher = _fisher()
  by_prefix = select_child_network(
      fisher, 0.2, always_trainable={"encoder": False, "classifier": True})
  by_callable = select_child_network(
      fisher, 0.2, always_trainable=lambda path: "classifier" in jax.tree_util.keystr(path))
  selectable = [jax.tree_util.keystr(path).find("classifier") < 0
                for path, _ in jax.tree_util.tree_flatten_with_path(fisher)[0]]
  want = _brute_force_top_k(fisher, 0.2, selectable)
  for a, b, c in zip(jax.tree.leaves(by_prefix), jax.tree.leaves(by_callable), want):
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
  assert by_prefix["classifier"]["kernel"].all() and by_prefix["classifier"]["bias"].all()
  encoder_n = sum(np.size(x) for x in jax.tree.leaves(fisher["encoder"]))
  kept = sum(int(m.sum()) for m in jax.tree.leaves(by_prefix["encoder"]))
  assert kept == round(0.2 * encoder_n)


def test_select_accepts_negated_fisher_for_lowest_fisher_ablation():
  fisher = {"w": np.array([3.0, 1.0, 2.0, 0.5])}
  np.testing.assert_array_equal(select_child_network(fisher, 0.5)["w"], [True, False, True, False])
  np.testing.assert_array_equal(
      select_child_network(jax.tree.map(np.negative, fisher), 0.5)["w"], [False, True, False, True])


def test_select_works_on_jax_arrays_and_float16():
  fisher = {"w": jnp.asarray([0.1, 0.4, 0.3], jnp.float16)}
  np.testing.assert_array_equal(select_child_network(fisher, 2 / 3)["w"], [False, True, True])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_select_refuses_non_finite_fisher_naming_leaf(bad):
  fisher = _fisher()
  fisher["encoder"]["layer_1"]["bias"][2] = bad
  with pytest.raises(ValueError, match="encoder/layer_1/bias"):
    select_child_network(fisher, 0.2)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.01, float("nan")])
def test_select_refuses_reserve_p_out_of_range(bad):
  with pytest.raises(ValueError, match="reserve_p"):
    select_child_network(_fisher(), bad)


def test_select_refuses_always_trainable_that_does_not_fit():
  with pytest.raises(ValueError, match="always_trainable"):
    select_child_network(_fisher(), 0.2, always_trainable={"decoder": True})


def test_keep_fractions_per_leaf_per_group_and_overall():
  mask = {"layer_0": {"w": np.array([[True, False], [True, True]]), "b": np.array([False, True])},
          "layer_1": {"w": np.zeros((2, 2), bool)}}
  assert keep_fractions(mask) == {"layer_0/b": 0.5, "layer_0/w": 0.75, "layer_1/w": 0.0}
  assert keep_fractions(mask, group_by=1) == {"layer_0": 4 / 6, "layer_1": 0.0}
  assert keep_fractions(mask, group_by=lambda name: name.split("/")[1]) == {"b": 0.5, "w": 3 / 8}
  with pytest.raises(TypeError, match="group_by"):
    keep_fractions(mask, group_by="layer")


def test_mask_jaccard():
  a = {"x": np.array([True, True, False, False]), "y": np.array([True])}
  b = {"x": np.array([True, False, True, False]), "y": np.array([True])}
  assert mask_jaccard(a, b) == pytest.approx(2 / 4)
  assert mask_jaccard(a, a) == 1.0
  empty = jax.tree.map(np.zeros_like, a)
  assert mask_jaccard(empty, empty) == 1.0
  with pytest.raises(ValueError, match="'x'"):
    mask_jaccard(a, {"x": np.ones(3, bool), "y": np.array([True])})


def test_save_and_load_mask_round_trip(tmp_path):
  fisher = _fisher()
  mask = select_child_network(fisher, 0.3)
  path = tmp_path / "mask.npz"
  save_mask(path, mask)
  with np.load(path) as data:
    assert "encoder/layer_0/kernel" in data.files
  loaded = load_mask(path, like=fisher)
  assert jax.tree.structure(loaded) == jax.tree.structure(mask)
  for x, y in zip(jax.tree.leaves(mask), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(x, y)


def test_load_mask_refuses_a_file_that_does_not_fit(tmp_path):
  fisher = _fisher()
  path = tmp_path / "mask.npz"
  save_mask(path, select_child_network(fisher, 0.3))
  fisher["pooler"] = np.ones(3)
  with pytest.raises(ValueError, match="pooler"):
    load_mask(path, like=fisher)
  del fisher["pooler"]
  fisher["classifier"]["bias"] = np.ones(3)
  with pytest.raises(ValueError, match="classifier/bias"):
    load_mask(path, like=fisher)


def test_save_mask_refuses_non_boolean_mask(tmp_path):
  with pytest.raises(TypeError, match="'w' must be a boolean"):
    save_mask(tmp_path / "m.npz", {"w": np.ones(2)})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_on_device_matches_brute_force_with_ties_signs_and_signed_zeros(seed):
  """The threshold search over order keys: negative scores, -0.0 equal to 0.0, heavy ties
  across leaves, the tied entries taken in leaf then row-major order."""
  rng = np.random.default_rng(seed)
  values = np.array([-2.5, -1.0, -0.0, 0.0, 1e-30, 0.5, 0.5, 3.0, np.float32(1e30)], np.float32)
  fisher = {"a": rng.choice(values, (7, 9)), "b": {"c": rng.choice(values, 13),
                                                  "d": rng.choice(values, (2, 3, 4))}}
  for p in (0.05, 0.3, 0.5, 0.77):
    mask = select_child_network(fisher, p)
    # -0.0 sorts with 0.0: compare with the brute force on canonical zeros.
    canonical = jax.tree.map(lambda x: np.where(x == 0, 0.0, x), fisher)
    want = _brute_force_top_k(canonical, p, [True] * 3)
    for got, expected in zip(jax.tree.leaves(mask), want):
      np.testing.assert_array_equal(np.asarray(got), expected)


def test_select_on_a_sharded_fisher_keeps_its_shardings_and_the_same_child():
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  rng = np.random.default_rng(5)
  fisher = {"kernel": np.round(rng.random((64, 32)), 2).astype(np.float32),  # ties
            "bias": np.round(rng.random(32), 2).astype(np.float32)}
  specs = {"kernel": P("fsdp", None), "bias": P("fsdp")}
  sharded = {name: jax.device_put(x, NamedSharding(mesh, specs[name]))
             for name, x in fisher.items()}
  got = select_child_network(sharded, 0.3)
  want = select_child_network(fisher, 0.3)
  for name in fisher:
    assert got[name].sharding.is_equivalent_to(sharded[name].sharding, fisher[name].ndim)
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(want[name]))
  assert sum(int(m.sum()) for m in jax.tree.leaves(got)) == round(0.3 * (64 * 32 + 32))

"""The fine-tuned child network as a small file: save_child_delta / apply_child_delta."""

import io

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax.core import FrozenDict

from childtuning_jax import apply_child_delta, save_child_delta


def _pretrained(size=1000):
  rng = np.random.default_rng(0)
  return {"dense": {"kernel": rng.normal(size=(size, 64)).astype(np.float32),
                    "bias": np.zeros(64, np.float32)},
          "half": rng.normal(size=(size, 8)).astype(ml_dtypes.bfloat16),
          "head": rng.normal(size=(64, 2)).astype(np.float32)}


def _tuned(pretrained, mask, seed=1):
  rng = np.random.default_rng(seed)
  def move(w0, keep):
    keep = np.broadcast_to(keep, w0.shape)
    step = rng.normal(size=w0.shape).astype(w0.dtype)
    return np.where(keep, (w0 + step).astype(w0.dtype), w0)
  return jax.tree.map(move, pretrained, mask)


def _mask(pretrained, p=0.1, seed=2):
  rng = np.random.default_rng(seed)
  mask = jax.tree.map(lambda x: rng.random(x.shape) < p, pretrained)
  mask["head"] = True  # a whole leaf in the child
  return mask


def test_apply_rebuilds_the_fine_tuned_parameters_bit_exactly(tmp_path):
  pretrained = _pretrained()
  mask = _mask(pretrained)
  tuned = _tuned(pretrained, mask)
  tuned["dense"]["bias"][3] = -0.0  # 0.0 -> -0.0: equal as numbers, a change in bits
  mask["dense"]["bias"][3] = True
  pretrained["dense"]["bias"][5] = -0.0  # frozen: -0.0 + 0.0 (the masked update) = 0.0
  mask["dense"]["bias"][5] = False
  tuned["dense"]["bias"][5] = pretrained["dense"]["bias"][5] + np.float32(0.0)
  assert np.signbit(pretrained["dense"]["bias"][5]) and not np.signbit(tuned["dense"]["bias"][5])
  written = save_child_delta(tmp_path / "child.npz", tuned, pretrained, mask)
  bits = lambda a: a.view(f"u{a.dtype.itemsize}")
  changed = sum(int(np.sum(bits(a) != bits(b)))
                for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(pretrained)))
  assert changed > 0.1 * sum(a.size for a in jax.tree.leaves(tuned)) * 0.9
  assert written["entries"] == changed
  rebuilt = apply_child_delta(tmp_path / "child.npz", pretrained)
  for got, want in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(tuned), strict=True):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(bits(got), bits(want))
  # The same file applies to a FrozenDict of jax arrays with the same leaf names.
  frozen = FrozenDict(jax.tree.map(jnp.asarray, pretrained))
  rebuilt = apply_child_delta(tmp_path / "child.npz", frozen)
  assert isinstance(rebuilt, FrozenDict) and isinstance(rebuilt["head"], jax.Array)
  np.testing.assert_array_equal(rebuilt["dense"]["kernel"], tuned["dense"]["kernel"])


def test_at_p_one_tenth_the_file_is_under_a_quarter_of_the_parameters(tmp_path):
  pretrained = _pretrained(size=20000)
  del pretrained["half"]
  mask = jax.tree.map(lambda x: np.random.default_rng(3).random(x.shape) < 0.1, pretrained)
  tuned = _tuned(pretrained, mask)
  written = save_child_delta(tmp_path / "child.npz", tuned, pretrained, mask)
  full = io.BytesIO()
  np.savez(full, **{f"p{i}": leaf for i, leaf in enumerate(jax.tree.leaves(tuned))})
  assert written["bytes"] == (tmp_path / "child.npz").stat().st_size
  assert written["bytes"] <= 0.25 * full.getbuffer().nbytes, written["bytes"] / full.getbuffer().nbytes


def test_refusals_name_the_leaf_and_the_fix(tmp_path):
  pretrained = _pretrained()
  mask = _mask(pretrained)
  tuned = _tuned(pretrained, mask)
  outside = jax.tree.map(np.copy, tuned)
  frozen_entry = np.flatnonzero(~mask["dense"]["kernel"])[0]
  outside["dense"]["kernel"].reshape(-1)[frozen_entry] += 1.0
  with pytest.raises(ValueError, match="'dense/kernel' changed at 1 entries outside the child"):
    save_child_delta(tmp_path / "bad.npz", outside, pretrained, mask)
  assert not list(tmp_path.iterdir())  # nothing half-written

  save_child_delta(tmp_path / "child.npz", tuned, pretrained, mask)
  other = jax.tree.map(np.copy, pretrained)
  other["head"][0, 0] += 1.0
  with pytest.raises(ValueError, match="pretrained leaf 'head' is not the one the delta was made"):
    apply_child_delta(tmp_path / "child.npz", other)
  with pytest.raises(ValueError, match=r"missing leaves \[\], unexpected leaves \['head'\]"):
    apply_child_delta(tmp_path / "child.npz", {k: v for k, v in pretrained.items() if k != "head"})
  wider = {**pretrained, "head": np.zeros((64, 3), np.float32)}
  with pytest.raises(ValueError, match=r"'head' is float32\[64, 3\]; the delta was made from "
                                       r"float32\[64, 2\]"):
    apply_child_delta(tmp_path / "child.npz", wider)
  np.savez(tmp_path / "mask.npz", w=np.ones(3, bool))
  with pytest.raises(ValueError, match="is not a child delta"):
    apply_child_delta(tmp_path / "mask.npz", pretrained)

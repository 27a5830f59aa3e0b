"""childtuning_jax.models.matmul: the same products and gradients as jnp.matmul, and on CPU,
over long contractions, a backward pass whose dots all contract their left operand on its
last axis."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from childtuning_jax.models import matmul as matmul_module
from childtuning_jax.models.matmul import dense_dot_general, matmul

# (a shape, b shape, transpose_b): a dense layer's 2-D kernel with both transposing routes
# of the kernel gradient (narrow inputs: transpose a; wide inputs: transpose the cotangent),
# and attention's batched products.
CASES = [
    ((3, 7, 5), (5, 11), False),
    ((3, 7, 11), (11, 5), False),
    ((21, 4), (4, 9), False),
    ((3, 7, 5), (11, 5), True),
    ((2, 3, 8, 4), (2, 3, 8, 4), True),
    ((2, 3, 8, 8), (2, 3, 8, 4), False),
    ((2, 3, 4, 16), (2, 3, 16, 2), False),
]


def _reference(a, b, transpose_b):
  return jnp.matmul(a, jnp.swapaxes(b, -1, -2) if transpose_b else b, precision="highest")


@pytest.fixture(params=[1, matmul_module.MIN_ROWS], ids=["transposed copies", "jax's rule"])
def min_rows(request, monkeypatch):
  """Both backward passes at test sizes: every product long enough for the transposed copies,
  and the threshold as shipped (these small products then take JAX's own derivative)."""
  monkeypatch.setattr(matmul_module, "MIN_ROWS", request.param)
  return request.param


@pytest.mark.parametrize("a_shape,b_shape,transpose_b", CASES)
def test_values_and_gradients_match_jnp_matmul(a_shape, b_shape, transpose_b, min_rows):
  ka, kb, kg = jax.random.split(jax.random.key(0), 3)
  a, b = jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape)
  out_shape = _reference(a, b, transpose_b).shape
  weights = jax.random.normal(kg, out_shape)  # a cotangent with no symmetry to hide a wrong transpose
  loss = lambda f: lambda a, b: (f(a, b) * weights).sum()
  got = jax.jit(jax.value_and_grad(loss(lambda a, b: matmul(a, b, transpose_b, "highest")), (0, 1)))(a, b)
  want = jax.value_and_grad(loss(lambda a, b: _reference(a, b, transpose_b)), (0, 1))(a, b)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-4)
  for g, w in zip(got[1], want[1]):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4)


def test_per_example_gradients_under_vmap_match_a_loop(min_rows):
  x = jax.random.normal(jax.random.key(1), (4, 6, 5))
  w = jax.random.normal(jax.random.key(2), (5, 3))
  loss = lambda f: lambda w, xi: jnp.tanh(f(xi, w)).sum()
  got = jax.jit(jax.vmap(jax.grad(loss(matmul)), (None, 0)))(w, x)
  want = np.stack([jax.grad(loss(jnp.matmul))(w, xi) for xi in x])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bfloat16_gradients_keep_the_dtype():
  a, b = jnp.ones((4, 8, 6), jnp.bfloat16), jnp.ones((6, 3), jnp.bfloat16)
  da, db = jax.grad(lambda a, b: matmul(a, b).astype(jnp.float32).sum(), (0, 1))(a, b)
  assert da.dtype == db.dtype == jnp.bfloat16
  assert float(db[0, 0]) == 32.0 and float(da[0, 0, 0]) == 3.0


def _dots(hlo_text, op_filter=lambda op_name: True):
  """(lhs rank, lhs contracting dims) of every dot in an HLO module's text (whose op_name
  passes ``op_filter``)."""
  shapes = dict(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo_text))
  dots = []
  for lhs, contracting, op_name in re.findall(
      r"\bdot\(%([\w.\-]+), %[\w.\-]+\).*?lhs_contracting_dims=\{([\d,]*)\}.*?op_name=\"([^\"]*)\"", hlo_text):
    if op_filter(op_name):
      dots.append((len(shapes[lhs].split(",")), tuple(int(d) for d in contracting.split(","))))
  return dots


# The CPU backward pass's transposed copies are a speed path tuned on jax 0.10.2; the XLA of jax
# 0.5.3 (the oldest supported) folds one of them back into its dot: same values, slower.
_TUNED_XLA = pytest.mark.skipif(
    jax.default_backend() != "cpu" or tuple(map(int, jax.__version__.split(".")[:3])) < (0, 10, 2),
    reason="the CPU backward pass's layout, as compiled by the XLA of jax >= 0.10.2")


@_TUNED_XLA
def test_cpu_backward_contracts_every_left_operand_on_its_last_axis(monkeypatch):
  monkeypatch.setattr(matmul_module, "MIN_ROWS", 1)  # the test's products are short

  def layer(params, x):  # two dense layers and an attention-like pair of batched products
    h = matmul(x, params["wide"])                  # [2, 8, 16]: transposes x for the kernel gradient
    h = matmul(h, params["narrow"])                # [2, 8, 4]: transposes the cotangent instead
    q = h.reshape(2, 8, 2, 2).transpose(0, 2, 1, 3)
    p = jax.nn.softmax(matmul(q, q, transpose_b=True))
    return jnp.tanh(matmul(p, q)).sum()

  params = {"wide": jnp.ones((6, 16)), "narrow": jnp.ones((16, 4))}
  x = jax.random.normal(jax.random.key(3), (2, 8, 6))
  text = jax.jit(jax.grad(layer)).lower(params, x).compile().as_text()
  dots = _dots(text)
  assert len(dots) >= 10  # four products forward, and their cotangents
  assert all(contracting == (rank - 1,) for rank, contracting in dots), dots
  assert "conditional" not in text  # platform_dependent resolved when lowering


def test_dense_dot_general_takes_the_dense_product_and_passes_others_through():
  x, w = jnp.arange(24.0).reshape(2, 3, 4), jnp.arange(20.0).reshape(4, 5)
  dense = (((2,), (0,)), ((), ()))
  np.testing.assert_allclose(dense_dot_general(x, w, dense), lax.dot_general(x, w, dense))
  other = (((1,), (0,)), ((0,), (1,)))
  y = jnp.arange(30.0).reshape(3, 2, 5)
  np.testing.assert_allclose(dense_dot_general(x, y, other), lax.dot_general(x, y, other))


@pytest.mark.parametrize("a_shape,b_shape,transpose_b", [
    ((3, 4), (5, 6), False), ((3, 4), (6, 5), True), ((2, 3, 4), (3, 4, 5), False), ((4,), (4, 2), False)])
def test_mismatched_shapes_raise(a_shape, b_shape, transpose_b):
  with pytest.raises(ValueError, match="matmul"):
    matmul(jnp.ones(a_shape), jnp.ones(b_shape), transpose_b)


@_TUNED_XLA
def test_encoder_dense_layers_have_no_dot_on_xlas_fallback_kernel(monkeypatch):
  monkeypatch.setattr(matmul_module, "MIN_ROWS", 1)  # a tiny batch stands for a training batch
  from childtuning_jax.models import EncoderConfig, EncoderForSequenceClassification
  config = EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=24, max_position_embeddings=16, num_labels=3)
  model = EncoderForSequenceClassification(config)
  ids = jnp.ones((4, 10), jnp.int32)
  params = model.init(jax.random.key(0), ids)["params"]

  def loss(params):
    logits = model.apply({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    return jax.nn.logsumexp(logits, axis=-1).mean()

  text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  dots = _dots(text, lambda op_name: "->" not in op_name)  # all but attention's two einsums
  assert len(dots) >= 2 * 3 * 6  # per layer, 6 dense layers: the product and two cotangents
  assert all(contracting == (rank - 1,) for rank, contracting in dots), dots

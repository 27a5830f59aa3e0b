"""Matrix products whose backward pass runs on XLA CPU's fast matmul kernels.

XLA on CPU hands a dot to YNNPACK only when the left operand is contracted on
its last axis. The weight gradient of a dense layer, xᵀ·dy, contracts ``x`` on
its first (token) axis: XLA then runs it on its slower fallback kernel (Eigen),
after transposing an operand in memory. :func:`matmul` computes the same
products as ``jnp.matmul``; on CPU, when such a gradient contracts at least
``MIN_ROWS`` rows (a training batch's tokens), its backward pass copies the
narrower operand into its transpose, behind optimization barriers so that XLA
can neither fuse the copy into its producer nor fold the transpose back into
the dot, and contracts the copy on its last axis. Over fewer rows (one
example's tokens under ``jax.vmap``, as in the per-example Fisher pass) and on
other platforms it uses JAX's own derivative, which measured faster there.
BENCHMARKS.md measures the training step both ways.

Being a ``jax.custom_vjp``, :func:`matmul` supports reverse-mode
differentiation (and ``vmap`` of it) but not forward mode (``jax.jvp``).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from childtuning_jax.models.matmul import matmul
  >>> x, w = jnp.ones((2, 5, 3)), jnp.arange(12.0).reshape(3, 4)
  >>> matmul(x, w).shape, matmul(x, w.T, transpose_b=True).shape
  ((2, 5, 4), (2, 5, 4))
  >>> jax.grad(lambda w: matmul(x, w).sum())(w)[0].tolist()
  [10.0, 10.0, 10.0, 10.0]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _product(a, b, transpose_b, precision=None):
  """a[..., m, k] @ b[..., k, n] (or b[..., n, k]ᵀ); b has a's leading axes, or none."""
  batch = tuple(range(b.ndim - 2))
  contract_b = b.ndim - 1 if transpose_b else b.ndim - 2
  return lax.dot_general(a, b, (((a.ndim - 1,), (contract_b,)), (batch, batch)), precision=precision)


def _transposed_copy(x):
  """x with its last two axes swapped, in memory: the barriers keep XLA from fusing the
  transpose into x's producer or folding it into the consuming dot."""
  return lax.optimization_barrier(jnp.swapaxes(lax.optimization_barrier(x), -1, -2))


def _transposed_times(a, b, precision):
  """aᵀ·b for a[..., m, k] and b[..., m, n]: [..., k, n], with the left operand of the dot
  contracted on its last axis. Transposes whichever costs less to move: a, or b and the
  (transposed) result."""
  m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
  if m * k <= m * n + k * n:
    return _product(_transposed_copy(a), b, False, precision)
  # (the barrier keeps XLA from turning transpose(bᵀ·a) back into a dot that contracts a on axis 0)
  return jnp.swapaxes(lax.optimization_barrier(_product(_transposed_copy(b), a, False, precision)), -1, -2)


# Rows that b's gradient contracts, from which the transposed copy pays on CPU: it did over
# a MiniLM training batch's 4096 tokens, and did not over one example's 128 (BENCHMARKS.md).
MIN_ROWS = 1024


def _cpu_cotangents(transpose_b, precision, a, b, g):
  rows = a.size // a.shape[-1] if b.ndim == 2 else a.shape[-2]
  if rows < MIN_ROWS:
    return _default_cotangents(transpose_b, precision, a, b, g)
  da = _product(g, b, not transpose_b, precision)
  if b.ndim == 2:  # one b for all of a's leading axes: contract over them all
    a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
  # db = gᵀ·a for b[..., n, k], aᵀ·g for b[..., k, n]
  return da, _transposed_times(g, a, precision) if transpose_b else _transposed_times(a, g, precision)


def _default_cotangents(transpose_b, precision, a, b, g):
  return jax.vjp(functools.partial(_product, transpose_b=transpose_b, precision=precision), a, b)[1](g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(a, b, transpose_b, precision):
  return _product(a, b, transpose_b, precision)


def _matmul_fwd(a, b, transpose_b, precision):
  return _product(a, b, transpose_b, precision), (a, b)


def _matmul_bwd(transpose_b, precision, residuals, g):
  return lax.platform_dependent(
      *residuals, g, cpu=functools.partial(_cpu_cotangents, transpose_b, precision),
      default=functools.partial(_default_cotangents, transpose_b, precision))


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(a: jax.Array, b: jax.Array, transpose_b: bool = False, precision=None) -> jax.Array:
  """``a @ b`` (``a @ b.swapaxes(-1, -2)`` with ``transpose_b``) with a CPU-friendly backward pass.

  Args:
    a: [..., m, k].
    b: [k, n] (``transpose_b``: [n, k]), shared by all of ``a``'s leading axes, or
      [..., k, n] with the same leading axes as ``a``.
    transpose_b: contract ``b`` on its last axis.
    precision: passed to ``lax.dot_general``.
  """
  if a.ndim < 2 or b.ndim not in (2, a.ndim) or a.shape[:b.ndim - 2] != b.shape[:-2]:
    raise ValueError(f"matmul takes a[..., m, k] and b[k, n] or b[..., k, n] with a's leading "
                     f"axes; got shapes {a.shape} and {b.shape}.")
  if a.shape[-1] != b.shape[-1 if transpose_b else -2]:
    raise ValueError(f"matmul: contracted axes differ, shapes {a.shape} and {b.shape}"
                     f"{' (b transposed)' if transpose_b else ''}.")
  return _matmul(a, b, transpose_b, precision)


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """A ``dot_general`` for ``flax.linen.Dense`` that goes through :func:`matmul` for the dense
  layer's product (inputs on their last axis with the kernel on its first) and through
  ``lax.dot_general`` otherwise."""
  if (dimension_numbers == (((lhs.ndim - 1,), (0,)), ((), ())) and rhs.ndim == 2 and lhs.ndim >= 2
      and preferred_element_type is None and lhs.dtype == rhs.dtype):
    return matmul(lhs, rhs, precision=precision)
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)

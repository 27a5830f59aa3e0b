"""Counter-based random bits that XLA fuses into the loop that consumes them.

``jax.random.bernoulli`` writes its random bits to memory and, on CPU, the
``threefry2x32`` primitive's lowering makes several passes over them. Here a
keep decision is Threefry-2x32 (written out round by round) of the entry's
position, compared with a threshold: iotas and elementwise ops only, so the
hash runs inside the consumer's loop (a dropout's multiply), and under ``jit``
with sharded arrays every device draws the bits of its own shard with no
collective, the same bits whatever the sharding. CT-F draws many leaves at
once: :func:`bernoulli_per_shape` draws the leaves of one shape in one loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# A decision keeps an entry when 32 random bits fall below round(p * 2**32):
# the keep probability is within 2**-33 of p.
RANDOM_LEVELS = 1 << 32

# bernoulli_per_shape draws the arrays of one shape in a loop of this many trips, each
# trip drawing its share of the arrays at once (None: a trip per array, as before). At
# least two: XLA inlines a one-trip loop, and its draws are then fused into every consumer
# again. No more than two: on a GPU a trip is a kernel launched on its own, outside the
# step's CUDA graphs, and a trip per array made hundreds of small ones (BENCHMARKS.md).
MASK_LOOP_TRIPS = 2

# Threefry-2x32 rotation constants (Salmon et al., 2011), as in jax.random.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def linear_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major position of every element (uint32), built from iotas so it stays sharded."""
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
    stride *= shape[axis]
  return index


def threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 with 20 rounds, bit-identical to ``jax.extend.random.threefry2x32_p``.

  Written out round by round so that XLA fuses it into one elementwise loop
  with its consumer; on CPU the primitive's lowering runs several passes over
  memory (see BENCHMARKS.md).
  """
  ks = (k1, k2, k1 ^ k2 ^ jnp.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = x1 ^ ((x2 << jnp.uint32(r)) | (x2 >> jnp.uint32(32 - r)))
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
  return x1, x2


def _hash_positions(k1: jax.Array, k2: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Threefry-2x32 under key words ``(k1, k2)`` of each entry's position in ``shape``.

  The first counter word numbers the entries; past 2**32 entries it numbers them
  within the leading axis and the second word holds the leading index.
  """
  if np.prod(shape, dtype=np.int64) <= RANDOM_LEVELS:
    counter, high = linear_index(shape), jnp.zeros(shape, jnp.uint32)
  elif len(shape) > 1 and np.prod(shape[1:], dtype=np.int64) <= RANDOM_LEVELS:
    counter = jnp.broadcast_to(linear_index(shape[1:]), shape)
    high = lax.broadcasted_iota(jnp.uint32, shape, 0)
  else:
    raise ValueError(f"an array of shape {shape} is too large to number with two 32-bit counters.")
  bits, _ = threefry2x32(k1, k2, counter, high)
  return bits


def random_uint32(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniform 32-bit integers of ``shape``: Threefry-2x32 of each entry's position, under
  two words drawn from ``key``."""
  k1, k2 = jax.random.bits(key, (2,), jnp.uint32)
  return _hash_positions(k1, k2, shape)


def keep_threshold(p: float, what: str) -> int:
  """The uint32 threshold below which an entry is kept with probability ``p`` in (0, 1]."""
  threshold = min(round(p * RANDOM_LEVELS), RANDOM_LEVELS - 1)
  if threshold == 0:
    raise ValueError(f"{what}={p} is below the mask's resolution of 2**-32.")
  return threshold


def _threshold(p: float | jax.Array, what: str) -> jax.Array:
  """``keep_threshold`` as a uint32 scalar; for a scalar array ``p``, computed on device."""
  if isinstance(p, (jax.Array, np.ndarray)):
    scaled = jnp.round(jnp.asarray(p, jnp.float32) * float(RANDOM_LEVELS))  # exact: a power of two
    return jnp.where(scaled >= float(RANDOM_LEVELS), jnp.uint32(RANDOM_LEVELS - 1),
                     scaled.astype(jnp.uint32))
  return jnp.uint32(keep_threshold(p, what))


def bernoulli(key: jax.Array, p: float | jax.Array, shape: tuple[int, ...],
              what: str = "p") -> jax.Array:
  """Boolean keep decisions of ``shape``, each True with probability ``p`` (within 2**-33).

  ``p`` may be a scalar array (a hyperparameter ``optax.inject_hyperparams`` changes between
  steps): its threshold is then ``round(p * 2**32)`` of its float32 value, the same
  decisions as the Python float nearest to that value.
  """
  return random_uint32(key, shape) < _threshold(p, what)


def rows_per_shape(shapes: list[tuple[int, ...]]) -> list[int]:
  """Each array's position among the arrays of its shape (0 for an array whose shape no
  other has): its row in :func:`bernoulli_per_shape`'s loop."""
  seen: dict[tuple[int, ...], int] = {}
  rows = []
  for shape in shapes:
    rows.append(seen.get(tuple(shape), 0))
    seen[tuple(shape)] = rows[-1] + 1
  return rows


def bernoulli_per_shape(key: jax.Array, p: float | jax.Array, shapes: list[tuple[int, ...]],
                        what: str = "p", rows: list[jax.Array] | None = None) -> list[jax.Array]:
  """``[bernoulli(k, p, shape) for k, shape in zip(jax.random.split(key, n), shapes)]``,
  the same decisions, with one hash per distinct shape in the program.

  Written out per array, the 20-round hash is fused into every loop that reads the
  decisions (an optimizer's several updates of each leaf), and a BERT's hundreds of
  leaves then multiply the program XLA compiles several times over (BENCHMARKS.md,
  compile times). Here the arrays of one shape are drawn in one loop (``lax.map`` over
  their keys, :data:`MASK_LOOP_TRIPS` trips), whose decisions are written to memory, one
  byte per entry; an array whose shape no other has is drawn alone, fused into its
  consumers as before.

  ``rows``: :func:`rows_per_shape` of ``shapes`` as traced values (inputs of the jitted
  function, e.g. an optimizer state's). Each array then reads its row of its shape's
  decisions at an index XLA does not know, so the consumers of the arrays of one shape
  are one computation, compiled once; a row known at compile time makes each array's
  consumers a kernel of their own. Without ``rows``, the rows are constants.

  The decisions leave through one ``lax.optimization_barrier``: XLA's TPU compiler then
  compiles the draws apart from their consumers instead of fusing them into the step's
  other work, and the CT-F step compiles markedly faster (BENCHMARKS.md, the TPU
  sections). XLA's CPU compiler removes the barrier: its program is the same with it and
  without it (a test).
  """
  words = jax.vmap(lambda k: jax.random.bits(k, (2,), jnp.uint32))(
      jax.random.split(key, len(shapes)))
  threshold = _threshold(p, what)
  groups: dict[tuple[int, ...], list[int]] = {}
  for i, shape in enumerate(shapes):
    groups.setdefault(tuple(shape), []).append(i)
  keeps: list[jax.Array] = [None] * len(shapes)  # type: ignore[list-item]
  for shape, members in groups.items():
    if len(members) == 1:
      i, = members
      keeps[i] = _hash_positions(words[i, 0], words[i, 1], shape) < threshold
      continue
    per_trip = 1 if MASK_LOOP_TRIPS is None else -(-len(members) // MASK_LOOP_TRIPS)
    padded = members + [members[-1]] * (-len(members) % per_trip)  # the extra rows: unread
    drawn = lax.map(lambda w, shape=shape: _hash_positions(w[0], w[1], shape) < threshold,
                    words[np.asarray(padded)], batch_size=per_trip)
    for row, i in enumerate(members):
      keeps[i] = (drawn[row] if rows is None
                  else lax.dynamic_index_in_dim(drawn, rows[i], keepdims=False))
  return list(lax.optimization_barrier(keeps))

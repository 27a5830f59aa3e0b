"""The diagonal Fisher information that chooses the Child-Tuning-D child network.

Paper Eq. 10: F_i = (1/|D|) Σ_j (∂ log p(y_j | x_j; w) / ∂w_i)², a sum of
squared **per-example** gradients. The published PyTorch code squares
mini-batch gradients instead; that estimator is available as
``per_example=False`` for comparison only.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from childtuning_jax import _trees

LossFn = Callable[[Any, Any], jax.Array]


def estimate_fisher(
    loss_fn: LossFn,
    params: Any,
    batches: Iterable[Any],
    *,
    chunk_size: int = 32,
    per_example: bool = True,
    fisher_type: Literal["empirical", "true"] = "empirical",
    logits_fn: Callable[[Any, Any], jax.Array] | None = None,
    label_key: str = "labels",
    key: jax.Array | int = 0,
    data_sharding: jax.sharding.Sharding | None = None,
    embedding_lookups: Mapping[str, str] | None = None,
    progress: bool = False,
) -> Any:
  """Diagonal Fisher information of ``params`` over a data set (paper Eq. 10).

  Each example's gradient of its negative log-likelihood is squared and the
  squares are averaged over all examples: ``jax.vmap`` of ``jax.grad`` over
  chunks of ``chunk_size`` examples. Batches of any size are re-cut into
  chunks of exactly ``chunk_size`` rows (the last one padded and its padding
  weighted out), so one compiled function serves the whole pass, and memory
  is bounded by ``chunk_size`` times the size of the parameters, whatever the
  size of the data.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the mean negative
      log-likelihood over ``batch``, whose leaves have a leading batch axis.
      The estimator calls it on one example at a time (batch axis of size 1).
      Run the model deterministically (no dropout) inside it unless you want
      dropout noise in the estimate (the published code has dropout on).
    params: the parameters (any pytree).
    batches: an iterable of batches (pytrees of arrays with a common leading
      axis), e.g. the training set in batches; read once.
    chunk_size: examples per compiled ``vmap`` call. Memory grows linearly
      with it: a chunk holds its examples' gradients, up to ``chunk_size``
      times the parameters' float32 bytes (BENCHMARKS.md measures it).
    per_example: ``True`` (default, the paper): average of squared
      per-example gradients. ``False``: average over the given batches of the
      squared *batch*-mean gradient, as the published code computes it; it
      then depends on the batch size.
    fisher_type: ``"empirical"`` (default, the paper): gradients at the gold
      labels. ``"true"``: at labels sampled from the model's own predictive
      distribution, one sample per example (as in the FISH mask paper);
      needs ``logits_fn`` and mapping batches with a ``label_key`` entry.
    logits_fn: ``logits_fn(params, batch) -> [batch, classes]`` logits, for
      ``fisher_type="true"``.
    label_key: the batch entry holding the labels, for ``fisher_type="true"``.
    key: seed or PRNG key for the sampled labels of ``fisher_type="true"``.
    data_sharding: if given, each chunk is placed with this sharding (its
      leading axis split over devices), so the pass runs data-parallel;
      ``chunk_size`` must be divisible by the number of shards. Put
      ``params`` replicated on the same devices.
    embedding_lookups: ``{table_path: ids_key}`` for leaves that are
      embedding tables (``[vocab, dim]``) looked up with the integer
      ``batch[ids_key]`` (``[batch, length]``), e.g.
      ``{"bert/embeddings/word_embeddings/embedding": "input_ids"}``. An
      example's gradient of a table is zero outside the rows it looks up;
      instead of materialising it (``vocab × dim`` per example, most of the
      cost for a text encoder) the estimator differentiates with respect to
      the looked-up rows and adds their squares (summed first over repeats
      of a token within the example) into those rows: the same result.
      ``loss_fn`` is then called as ``loss_fn(params, batch, row_offsets)``
      and must add ``row_offsets[table_path]`` (zeros, ``[batch, length,
      dim]``) to the rows it looks up (with Flax Linen: ``Module.perturb``).
      Only for ``per_example=True``. The library's encoders support it (their
      loss adds the offsets); for another model, leave it out (the dense path
      computes the same Fisher).
    progress: show a progress bar (examples, examples/s) if tqdm is installed.

  Returns:
    A float32 pytree with the structure and shapes of ``params``.

  Raises:
    ValueError: if ``loss_fn`` updates state inside the traced pass (e.g. an
      NNX model in train mode; the message says to call ``model.eval()``),
      ``batches`` holds no example, a batch's leaves disagree on
      the batch size, the options do not fit together, an
      ``embedding_lookups`` entry names no 2-D leaf or no batch entry, or
      ``loss_fn`` ignored ``row_offsets`` (the table's Fisher is all zero).

  Examples:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from childtuning_jax import estimate_fisher
    >>> def loss_fn(params, batch):  # logistic regression, mean NLL
    ...   logits = batch["x"] @ params["w"]
    ...   return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(logits)), batch["labels"]])
    >>> params = {"w": jnp.zeros((3, 2))}
    >>> data = [{"x": np.eye(3, dtype=np.float32), "labels": np.array([0, 1, 0])}]
    >>> fisher = estimate_fisher(loss_fn, params, data, chunk_size=2)
    >>> fisher["w"]  # each example touches one row: (±0.5)² / 3 examples
    Array([[0.083..., 0.083...],
           [0.083..., 0.083...],
           [0.083..., 0.083...]], dtype=float32)

  References:
    Xu et al., "Raise a Child in Large Language Model: Towards Effective and
    Generalizable Fine-tuning", EMNLP 2021, §2.3, Eq. 10.
    Sung et al., "Training Neural Networks with Fixed Sparse Masks", NeurIPS
    2021 (the true-Fisher option).
  """
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
  if fisher_type not in ("empirical", "true"):
    raise ValueError(f"fisher_type must be 'empirical' or 'true', got {fisher_type!r}.")
  if fisher_type == "true" and logits_fn is None:
    raise ValueError("fisher_type='true' samples labels from the model: pass logits_fn.")
  if data_sharding is not None and chunk_size % data_sharding.num_devices:
    raise ValueError(
        f"chunk_size={chunk_size} must be divisible by the {data_sharding.num_devices} "
        "devices of data_sharding.")
  lookups = _check_lookups(embedding_lookups, params, per_example)
  base_key = _trees.canonicalize_key(key)
  try:
    functions = _cached_chunk_functions(loss_fn, fisher_type, logits_fn, label_key, lookups)
  except TypeError:  # an unhashable loss_fn: build them afresh
    functions = _chunk_functions(loss_fn, fisher_type, logits_fn, label_key, lookups)
  add_squared_example_grads, weighted_grad_sum = functions

  zeros = _zeros_maker(params)
  total = zeros()
  batch_grad, batch_examples = (None, 0) if per_example else (zeros(), 0)
  num_examples = num_batches = 0
  bar = _progress_bar(progress)
  chunks = _padded_chunks(batches, chunk_size, keep_batches_apart=not per_example)
  # Chunks dispatched but not finished. On the CPU each finishes before the next is
  # dispatched: XLA's CPU devices share one thread pool, and with chunks queued, devices of a
  # later chunk can hold its threads while they wait in their all-reduce, so that an earlier
  # chunk's all-reduce never gathers its devices; after 40 s XLA aborts the process (seen with
  # 8 forced CPU devices on 2 cores: tests/test_fisher.py). The host computes the chunks there
  # anyway. An accelerator gets one chunk queued behind the running one, so it does not wait
  # for the host.
  in_flight, depth = collections.deque(), 1 if jax.default_backend() == "cpu" else 2
  for chunk_index, (chunk, num_valid, ends_batch) in enumerate(chunks):
    weights = (np.arange(chunk_size) < num_valid).astype(np.float32)
    if chunk_index == 0:
      _check_lookup_ids(lookups, chunk)
    if data_sharding is not None:
      chunk, weights = jax.device_put((chunk, weights), data_sharding)
    if per_example:
      total = _stateless(add_squared_example_grads, total, params, chunk, weights, base_key,
                         chunk_index)
      in_flight.append(total)
    else:
      grad_sum = _stateless(weighted_grad_sum, params, chunk, weights, base_key, chunk_index)
      in_flight.append(grad_sum)
      batch_grad = jax.tree.map(jnp.add, batch_grad, grad_sum)
      batch_examples += num_valid
      if ends_batch:
        # The published recipe: square the gradient of the batch-mean loss.
        total = jax.tree.map(lambda t, g: t + jnp.square(g / batch_examples), total, batch_grad)
        batch_grad, batch_examples = zeros(), 0
        num_batches += 1
    if len(in_flight) >= depth:
      jax.block_until_ready(in_flight.popleft())
    num_examples += num_valid
    bar.update(num_valid)
  bar.close()
  if num_examples == 0:
    raise ValueError("estimate_fisher got no examples: batches is empty.")
  denominator = num_examples if per_example else num_batches
  total = jax.tree.map(lambda t: t / denominator, total)
  leaves = dict(_trees.named_leaves(total))
  for path, _ in lookups:
    if not bool(jnp.any(leaves[path] != 0)):
      raise ValueError(f"the Fisher of {path} is all zero: loss_fn must add "
                       f"row_offsets[{path!r}] to the rows it looks up from that table.")
  return total


def _zeros_maker(params: Any) -> Callable[[], Any]:
  """A function giving float32 zeros of the parameters' shapes, placed as the parameters
  are (a sharded parameter gets a Fisher sharded the same way: no device holds more than
  its shard). The placed maker is compiled once per tree, shapes and placement: a later
  pass over the same parameters compiles nothing."""
  leaves, treedef = jax.tree.flatten(params)
  shapes = tuple(tuple(jnp.shape(x)) for x in leaves)
  if leaves and all(isinstance(x, jax.Array) for x in leaves):
    placement = (treedef, shapes, tuple(x.sharding for x in leaves))
    try:
      return _placed_zeros(*placement)
    except TypeError:  # a sharding that cannot be hashed: compiled for this pass only
      return _placed_zeros.__wrapped__(*placement)
  return _zeros(treedef, shapes)


def _zeros(treedef, shapes: tuple) -> Callable[[], Any]:
  return lambda: jax.tree.unflatten(treedef, [jnp.zeros(shape, jnp.float32) for shape in shapes])


@functools.lru_cache(maxsize=8)
def _placed_zeros(treedef, shapes: tuple, shardings: tuple) -> Callable[[], Any]:
  return jax.jit(_zeros(treedef, shapes),
                 out_shardings=jax.tree.unflatten(treedef, list(shardings)))


# Errors of a loss that updates state (a counter, batch statistics) while traced.
_STATE_ERRORS = ("TraceContextError", "UnexpectedTracerError")


def _stateless(function, *args):
  """``function(*args)``; a loss that changes state inside the traced pass is refused with
  what to do (JAX's and Flax's own messages do not say)."""
  try:
    return function(*args)
  except Exception as error:
    if type(error).__name__ not in _STATE_ERRORS:
      raise
    raise ValueError(
        f"loss_fn changed state while the Fisher pass traced it ({type(error).__name__}: "
        f"{str(error).splitlines()[0]}). The pass differentiates loss_fn under jax.vmap and "
        "jax.jit, where a model cannot update state: a Flax NNX model in train mode advances "
        "its dropout RNG (BatchNorm its statistics). Put the model in eval mode before "
        "splitting it (model.eval(), then nnx.split), or call a Linen model with "
        "deterministic=True; the paper's Fisher has no dropout.") from error


def _check_lookups(embedding_lookups, params, per_example) -> tuple[tuple[str, str], ...]:
  """``embedding_lookups`` as a hashable tuple, after checking it names 2-D leaves."""
  if not embedding_lookups:
    return ()
  if not per_example:
    raise ValueError("embedding_lookups speeds up per-example gradients; with "
                     "per_example=False the batch gradient is dense anyway: drop it.")
  leaves = dict(_trees.named_leaves(params))
  for path, ids_key in embedding_lookups.items():
    if path not in leaves:
      raise ValueError(f"embedding_lookups names {path!r}, which is not a leaf of params "
                       f"(leaves look like {next(iter(leaves))!r}).")
    if np.ndim(leaves[path]) != 2:
      raise ValueError(f"embedding table {path!r} must be 2-D [vocab, dim], got shape "
                       f"{np.shape(leaves[path])}.")
  return tuple(sorted(embedding_lookups.items()))


def _check_lookup_ids(lookups, chunk) -> None:
  for path, ids_key in lookups:
    if not isinstance(chunk, Mapping) or ids_key not in chunk:
      raise ValueError(f"embedding_lookups: batches have no entry {ids_key!r} for {path!r}.")
    ids = chunk[ids_key]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"embedding_lookups: batch[{ids_key!r}] must be integer ids of shape "
                       f"[batch, length], got {ids.dtype} {ids.shape}.")


def _chunk_functions(loss_fn, fisher_type, logits_fn, label_key, lookups=()):
  """The two jitted per-chunk computations."""

  def example_loss(params, example, example_key, offsets=None):
    batch = jax.tree.map(lambda x: x[None], example)
    if fisher_type == "true":
      logits = jax.lax.stop_gradient(logits_fn(params, batch))
      sampled = jax.random.categorical(example_key, logits, axis=-1)
      batch = {**batch, label_key: sampled.astype(batch[label_key].dtype)}
    if offsets is None:
      return loss_fn(params, batch)
    return loss_fn(params, batch, {path: offset[None] for path, offset in offsets.items()})

  def example_keys(base_key, chunk_index, n):
    return jax.random.split(jax.random.fold_in(base_key, chunk_index), n)

  def squared_example_grads(params, chunk, keys):
    """``{leaf_index: per-example squares [b, ...]}``; for a table ``(ids, squared rows)``."""
    if not lookups:
      grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, chunk, keys)
      return {i: jnp.square(g.astype(jnp.float32)) for i, g in enumerate(jax.tree.leaves(grads))}
    # Tables are closed over (no dense cotangent); their gradient flows through row offsets.
    names = [name for name, _ in _trees.named_leaves(params)]
    leaves, treedef = jax.tree.flatten(params)
    table_index = {names.index(path): path for path, _ in lookups}
    rest = [leaf for i, leaf in enumerate(leaves) if i not in table_index]

    def loss_of(rest, offsets, example, key):
      it = iter(rest)
      full = [leaves[i] if i in table_index else next(it) for i in range(len(leaves))]
      return example_loss(jax.tree.unflatten(treedef, full), example, key, offsets)

    offsets = {path: jnp.zeros(chunk[ids_key].shape + leaves[names.index(path)].shape[1:],
                               leaves[names.index(path)].dtype) for path, ids_key in lookups}
    rest_grads, row_grads = jax.vmap(jax.grad(loss_of, argnums=(0, 1)), in_axes=(None, 0, 0, 0))(
        rest, offsets, chunk, keys)
    squares = {}
    rest_indices = [i for i in range(len(leaves)) if i not in table_index]
    for i, g in zip(rest_indices, rest_grads):
      squares[i] = jnp.square(g.astype(jnp.float32))
    for path, ids_key in lookups:
      ids = chunk[ids_key]
      # An example's gradient of row v is the sum over its positions holding token v.
      same = (ids[:, :, None] == ids[:, None, :]).astype(jnp.float32)  # [b, t, t]
      rows = jnp.einsum("bts,bsd->btd", same, row_grads[path].astype(jnp.float32))
      # Each distinct token's square once: every one of its `count` positions adds 1/count.
      squares[names.index(path)] = (ids, jnp.square(rows) / same.sum(-1)[..., None])
    return squares

  @functools.partial(jax.jit, donate_argnums=0)
  def add_squared_example_grads(total, params, chunk, weights, base_key, chunk_index):
    keys = example_keys(base_key, chunk_index, weights.shape[0])
    squares = squared_example_grads(params, chunk, keys)
    leaves, treedef = jax.tree.flatten(total)
    for i, square in squares.items():
      if isinstance(square, tuple):  # (ids [b, t], squared rows [b, t, d]) of a table
        ids, rows = square
        rows = rows * weights[:, None, None]
        leaves[i] = leaves[i].at[ids.reshape(-1)].add(rows.reshape(-1, rows.shape[-1]))
      else:
        leaves[i] = leaves[i] + jnp.einsum("b,b...->...", weights, square)
    return jax.tree.unflatten(treedef, leaves)

  @jax.jit
  def weighted_grad_sum(params, chunk, weights, base_key, chunk_index):
    keys = example_keys(base_key, chunk_index, weights.shape[0])

    def weighted_loss(p):
      losses = jax.vmap(example_loss, in_axes=(None, 0, 0))(p, chunk, keys)
      return jnp.sum(weights * losses)

    return jax.tree.map(lambda g: g.astype(jnp.float32), jax.grad(weighted_loss)(params))

  return add_squared_example_grads, weighted_grad_sum


# Cached so that repeated calls with the same loss_fn do not compile again.
_cached_chunk_functions = functools.lru_cache(maxsize=16)(_chunk_functions)


def _padded_chunks(batches: Iterable[Any], chunk_size: int,
                   keep_batches_apart: bool) -> Iterator[tuple[Any, int, bool]]:
  """Re-cuts ``batches`` into chunks of exactly ``chunk_size`` rows.

  Yields ``(chunk, num_valid, ends_batch)``: a pytree of numpy arrays whose
  first ``num_valid`` rows are data and the rest copies of the first row
  (real inputs, so the weighted-out padding cannot produce NaNs). With
  ``keep_batches_apart`` a chunk never mixes two batches and ``ends_batch``
  marks a batch's last chunk; otherwise rows flow across batch boundaries.
  """
  pending: list[Any] = []  # row blocks not yet emitted
  pending_rows = 0
  structure = None

  def emit(num_rows):
    nonlocal pending, pending_rows
    rows = jax.tree.map(lambda *xs: np.concatenate(xs), *pending) if len(pending) > 1 else pending[0]
    chunk, rest = (jax.tree.map(lambda x: x[:num_rows], rows), jax.tree.map(lambda x: x[num_rows:], rows))
    pending, pending_rows = ([rest], pending_rows - num_rows) if pending_rows > num_rows else ([], 0)
    padding = chunk_size - num_rows
    if padding:
      chunk = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[:1], padding, axis=0)]), chunk)
    return chunk

  for index, batch in enumerate(batches):
    batch = jax.tree.map(np.asarray, batch)
    if structure is None:
      structure = jax.tree.structure(batch)
    elif jax.tree.structure(batch) != structure:
      raise ValueError(f"batch {index} has a different structure from batch 0.")
    size = _batch_size(batch, index)
    if size == 0:
      continue
    pending.append(batch)
    pending_rows += size
    while pending_rows >= chunk_size and (pending_rows > chunk_size or not keep_batches_apart):
      yield emit(chunk_size), chunk_size, False
    if keep_batches_apart:
      num_rows = pending_rows
      yield emit(num_rows), num_rows, True
  if pending_rows:
    num_rows = pending_rows
    yield emit(num_rows), num_rows, True


def _batch_size(batch: Any, index: int) -> int:
  sizes = {name: np.shape(leaf)[0] if np.ndim(leaf) else None for name, leaf in _trees.named_leaves(batch)}
  if not sizes:
    raise ValueError(f"batch {index} has no arrays.")
  if None in sizes.values():
    scalar = next(name for name, size in sizes.items() if size is None)
    raise ValueError(f"batch {index}: leaf '{scalar}' has no batch axis (it is a scalar).")
  if len(set(sizes.values())) > 1:
    raise ValueError(f"batch {index}: leaves have different batch sizes {sizes}.")
  return next(iter(sizes.values()))


class _NoBar:
  def update(self, count):
    pass

  def close(self):
    pass


def _progress_bar(progress: bool):
  """tqdm's bar when asked for and installed (it is optional for the library), else nothing."""
  if progress:
    try:
      from tqdm.auto import tqdm
    except ImportError:
      return _NoBar()
    return tqdm(desc="Fisher", unit="ex", dynamic_ncols=True)
  return _NoBar()

"""Tests of estimate_fisher against brute-force loops."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from childtuning_jax import estimate_fisher

NUM_CLASSES = 3


def _init_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"embed": jnp.asarray(rng.normal(size=(11, 4)), jnp.float32),
          "hidden": {"kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=5), jnp.float32)},
          "head": jnp.asarray(rng.normal(size=(5, NUM_CLASSES)), jnp.float32)}


def _logits(params, batch):
  """A tiny text classifier: mean of token embeddings -> tanh layer -> logits."""
  tokens = params["embed"][batch["tokens"]]  # [B, T, 4]
  pooled = jnp.sum(tokens * batch["mask"][..., None], 1) / jnp.sum(batch["mask"], 1, keepdims=True)
  hidden = jnp.tanh(pooled @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return hidden @ params["head"]


def _loss(params, batch):
  log_probs = jax.nn.log_softmax(_logits(params, batch))
  return -jnp.mean(jnp.take_along_axis(log_probs, batch["labels"][:, None], axis=1))


def _data(sizes, seed=1):
  rng = np.random.default_rng(seed)
  batches = []
  for n in sizes:
    mask = (np.arange(6)[None, :] < rng.integers(1, 7, size=(n, 1))).astype(np.float32)
    batches.append({"tokens": rng.integers(0, 11, size=(n, 6)).astype(np.int32), "mask": mask,
                    "labels": rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)})
  return batches


def _examples(batches):
  for batch in batches:
    for i in range(len(batch["labels"])):
      yield jax.tree.map(lambda x: x[i:i + 1], batch)


def _brute_force_fisher(params, batches):
  """Eq. 10 by a Python loop: one jax.grad per example, squares summed in float64."""
  total = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), params)
  n = 0
  for example in _examples(batches):
    grads = jax.grad(_loss)(params, example)
    total = jax.tree.map(lambda t, g: t + np.asarray(g, np.float64) ** 2, total, grads)
    n += 1
  return jax.tree.map(lambda t: t / n, total)


def _assert_trees_close(got, want, rtol=2e-5, atol=1e-9):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("chunk_size", [1, 4, 16])
def test_per_example_fisher_matches_brute_force_loop_on_uneven_batches(chunk_size):
  params = _init_params()
  batches = _data([5, 3, 7, 1])
  fisher = estimate_fisher(_loss, params, batches, chunk_size=chunk_size)
  _assert_trees_close(fisher, _brute_force_fisher(params, batches))


def test_per_example_fisher_is_not_the_squared_batch_gradient():
  params = _init_params()
  batches = _data([8])
  per_example = estimate_fisher(_loss, params, batches, chunk_size=8)
  batch_squared = estimate_fisher(_loss, params, batches, chunk_size=8, per_example=False)
  assert not np.allclose(per_example["head"], batch_squared["head"], rtol=0.1)


@pytest.mark.parametrize("chunk_size", [2, 16])
def test_batch_gradient_option_matches_published_recipe(chunk_size):
  # The published code: F = mean over batches of (gradient of the batch-mean loss)^2.
  params = _init_params()
  batches = _data([6, 4, 5])
  total = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), params)
  for batch in batches:
    grads = jax.grad(_loss)(params, batch)
    total = jax.tree.map(lambda t, g: t + np.asarray(g, np.float64) ** 2, total, grads)
  want = jax.tree.map(lambda t: t / len(batches), total)
  got = estimate_fisher(_loss, params, batches, chunk_size=chunk_size, per_example=False)
  _assert_trees_close(got, want)


def _counting_loss(traces):
  def loss(params, batch):
    traces.append(1)  # runs only while tracing
    return _loss(params, batch)
  return loss


def test_a_second_pass_over_the_same_parameters_compiles_nothing():
  """The Fisher's zeros, the chunk functions and the final scaling: all compiled by the first
  pass, none again by the next."""
  compiles = []
  listener = lambda event, duration, **kwargs: compiles.append(event)
  params, data = _init_params(), _data([5, 3])
  first = estimate_fisher(_loss, params, data, chunk_size=4)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    second = estimate_fisher(_loss, params, data, chunk_size=4)
  finally:  # public in newer JAX; the oldest supported JAX (0.5.3) has it under jax._src
    unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
    if unregister is None:
      from jax._src import monitoring
      unregister = monitoring._unregister_event_duration_listener_by_callback
    unregister(listener)
  assert not [event for event in compiles if "backend_compile" in event], compiles
  _assert_trees_close(second, first)


def test_one_compiled_function_serves_every_batch_size():
  params = _init_params()
  one_batch, uneven = [], []
  estimate_fisher(_counting_loss(one_batch), params, _data([4]), chunk_size=4)
  estimate_fisher(_counting_loss(uneven), params, _data([5, 3, 7, 1, 2, 9]), chunk_size=4)
  assert len(uneven) == len(one_batch) > 0


def test_repeated_calls_with_the_same_loss_do_not_retrace():
  traces = []
  loss = _counting_loss(traces)
  first = estimate_fisher(loss, _init_params(), _data([5]), chunk_size=4)
  count = len(traces)
  second = estimate_fisher(loss, _init_params(), _data([5]), chunk_size=4)
  assert len(traces) == count
  np.testing.assert_array_equal(first["head"], second["head"])


def test_batches_can_be_any_iterable_read_once():
  params = _init_params()
  batches = _data([3, 3])
  from_generator = estimate_fisher(_loss, params, (b for b in batches), chunk_size=4)
  _assert_trees_close(from_generator, _brute_force_fisher(params, batches))


def test_true_fisher_matches_expectation_over_model_predictions():
  # E_y~p(y|x)[g_y^2] = sum_c p(c|x) g_c^2, estimated with one sampled label per example:
  # repeat two examples 3000 times and compare with the exact expectation.
  params = _init_params()
  base = _data([2], seed=3)[0]
  exact = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), params)
  for example in _examples([base]):
    probs = np.asarray(jax.nn.softmax(_logits(params, example)))[0]
    for c in range(NUM_CLASSES):
      relabelled = {**example, "labels": np.array([c], np.int32)}
      g = jax.grad(_loss)(params, relabelled)
      exact = jax.tree.map(lambda t, x: t + probs[c] * np.asarray(x, np.float64) ** 2 / 2, exact, g)
  repeated = [jax.tree.map(lambda x: np.concatenate([x] * 500), base)] * 6
  got = estimate_fisher(_loss, params, repeated, chunk_size=200, fisher_type="true",
                        logits_fn=_logits, key=0)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(exact)):
    np.testing.assert_allclose(g, w, rtol=0.1, atol=1e-3 * np.abs(w).max())
  empirical = estimate_fisher(_loss, params, repeated, chunk_size=200)
  assert not np.allclose(empirical["head"], exact["head"], rtol=0.1)


def test_true_fisher_is_deterministic_given_key():
  params = _init_params()
  batches = _data([7])
  run = lambda key: estimate_fisher(_loss, params, batches, chunk_size=4, fisher_type="true",
                                    logits_fn=_logits, key=key)
  np.testing.assert_array_equal(run(1)["head"], run(1)["head"])
  assert not np.array_equal(run(1)["head"], run(2)["head"])


def test_data_parallel_fisher_equals_single_device():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  params = jax.device_put(_init_params(), NamedSharding(mesh, P()))
  batches = _data([9, 12, 4])
  sharded = estimate_fisher(_loss, params, batches, chunk_size=8,
                            data_sharding=NamedSharding(mesh, P("data")))
  _assert_trees_close(sharded, _brute_force_fisher(_init_params(), batches))


@pytest.mark.parametrize("per_example", [True, False])
def test_sharded_params_give_a_fisher_sharded_the_same_way(per_example):
  """FSDP: parameters split over 4 devices, the batch over all 8; the Fisher comes out split
  as the parameters are, with the single-device values."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
  specs = {"embed": P(None, "fsdp"), "hidden": {"kernel": P("fsdp", None), "bias": P()},
           "head": P(None, None)}
  params = jax.tree.map(lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec)),
                        _init_params(), specs)
  batches = _data([9, 12, 4])
  got = estimate_fisher(_loss, params, batches, chunk_size=8, per_example=per_example,
                        data_sharding=NamedSharding(mesh, P(("data", "fsdp"))))
  want = estimate_fisher(_loss, _init_params(), batches, chunk_size=8, per_example=per_example)
  for g, p, w in zip(jax.tree.leaves(got), jax.tree.leaves(params), jax.tree.leaves(want)):
    assert g.sharding.is_equivalent_to(p.sharding, p.ndim)
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=1e-9)


def test_empty_data_refused():
  with pytest.raises(ValueError, match="no examples"):
    estimate_fisher(_loss, _init_params(), [], chunk_size=4)
  with pytest.raises(ValueError, match="no examples"):
    estimate_fisher(_loss, _init_params(), _data([0]), chunk_size=4)


def test_batch_with_mismatched_leading_sizes_refused():
  bad = _data([4])[0]
  bad["labels"] = bad["labels"][:3]
  with pytest.raises(ValueError, match=r"batch 0: leaves have different batch sizes.*labels"):
    estimate_fisher(_loss, _init_params(), [bad], chunk_size=4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(chunk_size=0), "chunk_size"),
    (dict(fisher_type="expected"), "fisher_type"),
    (dict(fisher_type="true"), "logits_fn"),
])
def test_bad_options_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    estimate_fisher(_loss, _init_params(), _data([2]), **kwargs)


def test_bfloat16_params_give_float32_fisher():
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _init_params())
  fisher = estimate_fisher(_loss, params, _data([3]), chunk_size=2)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fisher))
  want = _brute_force_fisher(jax.tree.map(lambda x: x.astype(jnp.float32), params), _data([3]))
  for g, w in zip(jax.tree.leaves(fisher), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0.1, atol=1e-3)


def _tiny_encoder():
  from childtuning_jax.models import EncoderConfig, EncoderForSequenceClassification

  config = EncoderConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=24, max_position_embeddings=16, num_labels=3)
  model = EncoderForSequenceClassification(config)
  params = model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 12, (7, 12)).astype(np.int32)  # a small vocabulary: many repeats
  ids[:, 0] = 2
  mask = np.ones_like(ids)
  mask[3, 8:] = 0
  ids[3, 8:] = 0
  data = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids),
          "labels": rng.integers(0, 3, 7).astype(np.int32)}
  return model, params, data


def _encoder_loss(model):
  def loss_fn(params, batch, row_offsets=None):
    variables = {"params": params}
    if row_offsets is not None:
      variables["perturbations"] = model.perturbations(row_offsets)
    logits = model.apply(variables, batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(logits)), batch["labels"]])
  return loss_fn


@pytest.mark.parametrize("fisher_type", ["empirical", "true"])
def test_embedding_lookups_give_the_dense_result(fisher_type):
  model, params, data = _tiny_encoder()
  loss_fn = _encoder_loss(model)
  logits_fn = lambda p, b: model.apply({"params": p}, b["input_ids"], b["attention_mask"],
                                       b["token_type_ids"])
  options = dict(chunk_size=4, fisher_type=fisher_type, logits_fn=logits_fn, key=3)
  dense = estimate_fisher(loss_fn, params, [data], **options)
  rows = estimate_fisher(loss_fn, params, [data], **options,
                         embedding_lookups={model.word_embeddings_path: "input_ids"})
  table = dense["bert"]["embeddings"]["word_embeddings"]["embedding"]
  # ids 1..11 are used; the padding id 0 is masked out of attention, so its rows get no gradient.
  assert np.count_nonzero(np.asarray(table).any(axis=1)) == 11
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-12), dense, rows)


def test_embedding_lookups_refuse_what_they_cannot_do():
  model, params, data = _tiny_encoder()
  loss_fn = _encoder_loss(model)
  table = model.word_embeddings_path
  with pytest.raises(ValueError, match="not a leaf of params"):
    estimate_fisher(loss_fn, params, [data], embedding_lookups={"bert/nope": "input_ids"})
  with pytest.raises(ValueError, match="must be 2-D"):
    estimate_fisher(loss_fn, params, [data],
                    embedding_lookups={"bert/embeddings/LayerNorm/scale": "input_ids"})
  with pytest.raises(ValueError, match="no entry 'ids'"):
    estimate_fisher(loss_fn, params, [data], embedding_lookups={table: "ids"})
  with pytest.raises(ValueError, match="per_example=False"):
    estimate_fisher(loss_fn, params, [data], per_example=False,
                    embedding_lookups={table: "input_ids"})
  ignores_offsets = lambda p, b, row_offsets: loss_fn(p, b)
  with pytest.raises(ValueError, match="all zero"):
    estimate_fisher(ignores_offsets, params, [data], embedding_lookups={table: "input_ids"})


def test_a_model_that_updates_state_in_the_pass_is_refused_with_the_fix():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(4, 2, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
      return self.dropout(self.dense(x))

  import flax

  model = Net(nnx.Rngs(0))  # train mode: dropout advances its RNG counter
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(params, batch):
    logits = nnx.merge(graphdef, params, rest)(batch["x"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(logits)), batch["labels"]])
  data = [{"x": np.ones((4, 4), np.float32), "labels": np.array([0, 1, 0, 1])}]
  # Flax 0.10's NNX raises nothing here (the traced pass then draws one dropout mask for the
  # chunk): only the error Flax raises can be explained.
  if tuple(int(v) for v in flax.__version__.split(".")[:2]) >= (0, 11):
    with pytest.raises(ValueError, match=r"changed state .*TraceContextError.*model\.eval\(\)"):
      estimate_fisher(loss_fn, params, data, chunk_size=2)
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fisher = estimate_fisher(loss_fn, params, data, chunk_size=2)
  assert sum(float(jnp.sum(x)) for x in jax.tree.leaves(fisher)) > 0


# Thousands of chunks over 8 forced CPU devices, each chunk an all-reduce over the 8: with
# every chunk dispatched at once, XLA's CPU devices (one shared thread pool) deadlocked in a
# rendezvous and XLA aborted the process after 40 s, in 2 of 3 such runs on 2 cores
# (childtuning_jax/fisher.py: estimate_fisher keeps one chunk in flight on the CPU).
_MANY_CHUNKS = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from childtuning_jax import estimate_fisher
mesh = Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(0)
params = jax.device_put({"w1": rng.normal(size=(64, 256)).astype(np.float32),
                         "w2": rng.normal(size=(256, 2)).astype(np.float32)}, NamedSharding(mesh, P()))
def loss(params, batch):
  logits = jnp.tanh(batch["x"] @ params["w1"]) @ params["w2"]
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(logits)), batch["labels"]])
data = [{"x": rng.normal(size=(16, 64)).astype(np.float32), "labels": rng.integers(0, 2, 16)}
        for _ in range(4000)]
for _ in range(3):
  fisher = estimate_fisher(loss, params, data, chunk_size=16,
                           data_sharding=NamedSharding(mesh, P("data")))
  assert np.isfinite(np.asarray(fisher["w1"])).all()
print("finished")
"""


def test_thousands_of_sharded_chunks_on_cpu_devices_finish(tmp_path):
  script = tmp_path / "many_chunks.py"
  script.write_text(_MANY_CHUNKS)
  repo = str(Path(__file__).resolve().parent.parent)  # importable also where not installed
  path = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
  result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, cwd=repo, env={**os.environ, "PYTHONPATH": path})
  assert result.returncode == 0 and "finished" in result.stdout, result.stderr[-3000:]

"""train/run_glue.py end to end on a tiny random BERT and tiny files: outputs, learning,
8 devices against 1, exact resume after a crash, clear errors, and the prior methods."""

import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

import childtuning_jax as ct  # noqa: E402
import childtuning_jax.models  # noqa: E402,F401
import tiny_run  # noqa: E402
from train import arguments, checkpoints, methods, run_glue, trainer  # noqa: E402


def run(tiny, output_dir, *flags):
  return run_glue.main(tiny_run.trainer_argv(tiny, output_dir, *flags))


def read_json(path):
  return json.loads(Path(path).read_text())


def test_learns_the_task_and_writes_run_glue_outputs(tiny, tmp_path):
  results = run(tiny, tmp_path, "--mode", "vanilla", "--learning_rate", "3e-3",
                "--num_train_epochs", "8", "--per_device_train_batch_size", "4",
                "--num_devices", "4", "--warmup_ratio", "0.1", "--save_steps", "40",
                "--extra_eval_files", tiny["extra"])
  assert results["eval_accuracy"] >= 0.95, results  # the tiny task is learnable
  assert results["eval_shifted_accuracy"] >= 0.9
  assert results == {**read_json(tmp_path / "train_results.json"),
                     **read_json(tmp_path / "eval_results.json")}
  assert results == read_json(tmp_path / "all_results.json")
  assert {"eval_loss", "eval_samples", "eval_shifted_loss", "train_loss", "epoch"} <= set(results)
  assert results["eval_samples"] == 100 and results["eval_shifted_samples"] == 40
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == list(range(1, 8 * 256 // 16 + 1))
  rates = [r["learning_rate"] for r in records if "loss" in r]
  assert rates[0] == 0.0 and max(rates) == pytest.approx(3e-3)  # warmup from 0, every mode
  assert records[-1]["eval_accuracy"] == results["eval_accuracy"]
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["120", "128"]
  assert read_json(tmp_path / "run_args.json")["mode"] == "vanilla"
  assert not (tmp_path / "mask.npz").exists()


def test_eight_devices_give_the_one_device_result(tiny, tmp_path):
  # CT-D covers the data-parallel Fisher pass too; the transforms' own tests cover CT-F's
  # masks under sharding.
  assert jax.device_count() == 8
  flags = ["--mode", "ChildTuning-D", "--learning_rate", "1e-3", "--max_steps", "6",
           "--fisher_batch_size", "16", "--fisher_num_examples", "100"]
  one = run(tiny, tmp_path / "one", *flags, "--num_devices", "1", "--per_device_train_batch_size", "16")
  eight = run(tiny, tmp_path / "eight", *flags, "--per_device_train_batch_size", "2")
  assert eight["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5)
  assert eight["eval_accuracy"] == one["eval_accuracy"]
  mask_one = dict(np.load(tmp_path / "one" / "mask.npz"))
  mask_eight = dict(np.load(tmp_path / "eight" / "mask.npz"))
  # Sums in another order may swap entries whose Fisher values tie to float precision.
  assert ct.mask_jaccard(mask_one, mask_eight) > 0.999


@pytest.mark.parametrize("fsdp, extra", [(1, ()), (2, ()), (4, ("--sparse_optimizer_state",)),
                                         (8, ())])
def test_fsdp_gives_the_one_device_result(tiny, tmp_path, fsdp, extra):
  """--fsdp N on 8 devices: the state and the Fisher pass sharded over N of them, the batch
  over all 8; CT-D (Fisher, mask, its dense or sparse optimizer state) as on one device."""
  flags = ["--mode", "ChildTuning-D", "--learning_rate", "1e-3", "--max_steps", "6",
           "--fisher_batch_size", "16", "--fisher_num_examples", "100", *extra]
  one = run(tiny, tmp_path / "one", *flags, "--num_devices", "1",
            "--per_device_train_batch_size", "16")
  sharded = run(tiny, tmp_path / "fsdp", *flags, "--fsdp", str(fsdp),
                "--per_device_train_batch_size", "2")
  assert sharded["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-5, abs=1e-6)
  assert sharded["eval_accuracy"] == one["eval_accuracy"]
  mask_one = dict(np.load(tmp_path / "one" / "mask.npz"))
  assert ct.mask_jaccard(mask_one, dict(np.load(tmp_path / "fsdp" / "mask.npz"))) > 0.999
  assert read_json(tmp_path / "fsdp" / "run_args.json")["fsdp"] == fsdp


def test_fsdp_splits_each_leaf_along_its_largest_divisible_axis_and_the_step_holds_a_shard():
  assert trainer.fsdp_spec((30522, 768), 4) == jax.sharding.PartitionSpec(None, "fsdp")
  assert trainer.fsdp_spec((768, 3072), 4) == jax.sharding.PartitionSpec(None, "fsdp")
  assert trainer.fsdp_spec((768, 768), 4) == jax.sharding.PartitionSpec("fsdp", None)
  assert trainer.fsdp_spec((2,), 4) == jax.sharding.PartitionSpec()
  assert trainer.fsdp_spec((), 4) == jax.sharding.PartitionSpec()
  assert trainer.fsdp_spec((768, 768), 1) == jax.sharding.PartitionSpec()
  with pytest.raises(ValueError, match="--fsdp 3 must divide the number of devices, 8"):
    trainer.Run(arguments.TrainingArguments(output_dir="-", fsdp=3))
  # The compiled step's per-device arguments (state and batch) at fsdp 1, 2, 4 and 8.
  config = ct.models.EncoderConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=256)
  model = ct.models.EncoderForSequenceClassification(config)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  tx = optax.adamw(1e-3)
  batch = {name: jax.ShapeDtypeStruct((16, 32), jnp.int32) for name in trainer.MODEL_INPUTS}
  batch["labels"] = jax.ShapeDtypeStruct((16,), jnp.int32)
  state = trainer.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                             opt_state=jax.eval_shape(tx.init, params),
                             dropout_key=jax.eval_shape(lambda: jax.random.key(0)))
  sizes = {}
  for fsdp in (1, 2, 4, 8):
    run_ = trainer.Run(arguments.TrainingArguments(output_dir="-", fsdp=fsdp))
    step = trainer.compile_train_step(trainer.make_train_step(
        tx, trainer.task_loss(model, is_regression=False), optax.constant_schedule(1e-3)), run_, state)
    sizes[fsdp] = step.lower(state, batch).compile().memory_analysis().argument_size_in_bytes
  for fsdp in (2, 4, 8):
    assert sizes[fsdp] / sizes[1] == pytest.approx(1 / fsdp, rel=0.1), sizes


@pytest.fixture(scope="module")
def tiny_without_dropout(tiny, tmp_path_factory):
  """The tiny files, and the tiny model with dropout off: then a step's gradient does not
  depend on how its batch is split."""
  model = tmp_path_factory.mktemp("no-dropout") / "model"
  shutil.copytree(tiny["model"], model)
  config = read_json(model / "config.json")
  config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  (model / "config.json").write_text(json.dumps(config))
  return {**tiny, "model": model}


def test_gradient_accumulation_gives_the_large_batch_result(tiny_without_dropout, tmp_path,
                                                             capsys):
  """Two micro-batches of 8 per step give the steps of batch 16: on one device, and on 8
  devices with the state sharded 2 ways (each micro-batch split over the 8) and the layers
  recomputed (--gradient_checkpointing). CT-F draws one mask per optimizer step, not one
  per micro-batch. (CT-D's mask does not depend on the steps at all.)"""
  tiny = tiny_without_dropout
  flags = ["--mode", "ChildTuning-F", "--learning_rate", "1e-3", "--max_steps", "6",
           "--warmup_steps", "2"]
  large = run(tiny, tmp_path / "large", *flags, "--num_devices", "1",
              "--per_device_train_batch_size", "16")
  accumulated = run(tiny, tmp_path / "accumulated", *flags, "--num_devices", "1",
                    "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "2")
  assert "recomputed in the backward pass" not in capsys.readouterr().err  # run_glue's log
  sharded = run(tiny, tmp_path / "sharded", *flags, "--fsdp", "2",
                "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
                "--gradient_checkpointing")
  assert ("layers recomputed in the backward pass (gradient checkpointing)"
          in capsys.readouterr().err)
  steps = {}
  for name in ("large", "accumulated", "sharded"):
    records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    steps[name] = [(r["step"], r["loss"], r["grad_norm"]) for r in records if "loss" in r]
  for name, results in (("accumulated", accumulated), ("sharded", sharded)):
    assert results["eval_loss"] == pytest.approx(large["eval_loss"], rel=1e-5), name
    assert results["train_steps"] == large["train_steps"] == 6
    assert [s for s, _, _ in steps[name]] == list(range(1, 7))
    np.testing.assert_allclose([v for _, *v in steps[name]], [v for _, *v in steps["large"]],
                               rtol=1e-5)
  with pytest.raises(ValueError, match=r"x 2 micro-batches \(--gradient_accumulation_steps\)"):
    run(tiny, tmp_path / "too-few", *flags, "--per_device_train_batch_size", "32",
        "--gradient_accumulation_steps", "2")


def test_each_micro_batch_draws_its_own_dropout(tiny):
  """With dropout on, two copies of one micro-batch give another gradient than that
  micro-batch alone: micro-batch i draws from fold_in(step key, i)."""
  context = _context(tiny)
  tx = optax.sgd(1.0)
  loss = trainer.task_loss(context.model, is_regression=False)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=context.params,
                             opt_state=tx.init(context.params), dropout_key=jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(5, 30, (4, 8)).astype(np.int32),
           "attention_mask": np.ones((4, 8), np.int32), "token_type_ids": np.zeros((4, 8), np.int32),
           "labels": np.array([0, 1, 1, 0], np.int32)}
  steps = {n: jax.jit(trainer.make_train_step(tx, loss, context.schedule, micro_batches=n))
           for n in (1, 2)}
  one, one_metrics = steps[1](state, dict(batch))
  twice, twice_metrics = steps[2](state, {k: np.stack([v, v]) for k, v in batch.items()})
  assert float(twice_metrics["loss"]) != pytest.approx(float(one_metrics["loss"]), rel=1e-4)
  assert float(twice_metrics["grad_norm"]) != pytest.approx(float(one_metrics["grad_norm"]),
                                                            rel=1e-4)
  # Without dropout (evaluation mode: no key), the two copies average to the one.
  eval_loss = lambda params, batch, dropout_key, pretrained=None: loss(params, batch, None)
  steps = {n: jax.jit(trainer.make_train_step(tx, eval_loss, context.schedule, micro_batches=n))
           for n in (1, 2)}
  one, _ = steps[1](state, dict(batch))
  twice, _ = steps[2](state, {k: np.stack([v, v]) for k, v in batch.items()})
  for a, b in zip(jax.tree.leaves(twice.params), jax.tree.leaves(one.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


RESUME_FLAGS = ["--mode", "ChildTuning-F", "--learning_rate", "1e-3", "--max_steps", "8",
                "--save_steps", "3", "--warmup_steps", "2", "--seed", "7"]  # shared: compiled once


class Crash(Exception):
  pass


@pytest.mark.parametrize("mode", ["ChildTuning-F", "ChildTuning-D"])
def test_resume_after_a_crash_gives_the_uninterrupted_result(tiny, tmp_path, monkeypatch, mode):
  flags = RESUME_FLAGS + ["--mode", mode, "--fisher_num_examples", "64"]
  uninterrupted = run(tiny, tmp_path / "uninterrupted", *flags)

  save = checkpoints.save

  def save_then_crash(manager, step, state, metadata):
    save(manager, step, state, metadata)
    if step == 6:
      manager.wait_until_finished()
      raise Crash
  monkeypatch.setattr(checkpoints, "save", save_then_crash)
  with pytest.raises(Crash):
    run(tiny, tmp_path / "crashed", *flags)
  monkeypatch.setattr(checkpoints, "save", save)

  # The checkpoint directory alone, copied into a fresh output directory, is enough.
  fresh = tmp_path / "fresh"
  shutil.copytree(tmp_path / "crashed" / "checkpoints", fresh / "checkpoints")
  resumed = run(tiny, fresh, *flags, "--resume")
  assert resumed["eval_loss"] == uninterrupted["eval_loss"]
  assert resumed["train_loss"] != uninterrupted["train_loss"]  # steps 1-6 were logged elsewhere
  if mode == "ChildTuning-D":  # the mask came back from the checkpoint, not a new Fisher pass
    assert read_json(fresh / "mask_keep_fractions.json") == read_json(
        tmp_path / "uninterrupted" / "mask_keep_fractions.json")

  # Resuming in the crashed directory keeps its metrics log consistent: steps 1..8 once each.
  again = run(tiny, tmp_path / "crashed", *flags, "--resume")
  untimed = lambda results: {k: v for k, v in results.items()
                             if not k.endswith("runtime")
                             and k not in ("train_samples_per_second", "peak_host_memory_mib")}
  assert untimed(again) == untimed(uninterrupted)
  if mode == "ChildTuning-D":
    assert uninterrupted["child_network_runtime"] > 0


def test_a_save_killed_midway_leaves_the_previous_checkpoint_usable(tiny, tmp_path):
  run(tiny, tmp_path, *RESUME_FLAGS)
  directory = tmp_path / "checkpoints"
  shutil.rmtree(directory / "8")
  # What orbax leaves when the process dies while writing step 8: a temporary directory.
  partial = directory / "8.orbax-checkpoint-tmp-1234567890"
  shutil.copytree(directory / "6", partial)
  shutil.rmtree(partial / "state")
  manager = checkpoints.manager(directory, None)
  assert manager.latest_step() == 6
  manager.close()
  results = run(tiny, tmp_path, *RESUME_FLAGS, "--resume")
  assert results["train_steps"] == 8 and (directory / "8").is_dir()


def test_an_earlier_run_is_neither_mixed_in_nor_lost(tiny, tmp_path):
  run(tiny, tmp_path, *RESUME_FLAGS)
  with pytest.raises(FileExistsError, match="--resume.*--overwrite_output_dir"):
    run(tiny, tmp_path, *RESUME_FLAGS)
  run(tiny, tmp_path, *RESUME_FLAGS, "--overwrite_output_dir")
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == list(range(1, 9)) + [8]


def test_bad_input_fails_before_training_with_a_clear_message(tiny, tmp_path):
  bad = tmp_path / "bad.csv"
  bad.write_text("sentence,label\ngood film,positive\ngreat,\n")
  with pytest.raises(ValueError, match=r"bad.csv, row 3: column 'label' is empty"):
    run(tiny, tmp_path / "a", "--validation_file", bad)
  unknown = tmp_path / "unknown.csv"
  unknown.write_text("sentence,label\ngood film,neutral\n")
  with pytest.raises(ValueError, match=r"unknown.csv, row 2: label 'neutral' is not one of"):
    run(tiny, tmp_path / "b", "--extra_eval_files", unknown)
  with pytest.raises(ValueError, match="--num_devices=9, but there are 8 devices"):
    run(tiny, tmp_path / "c", "--num_devices", "9")
  with pytest.raises(ValueError, match="fewer than one batch"):
    run(tiny, tmp_path / "d", "--per_device_train_batch_size", "64")
  with pytest.raises(SystemExit):  # argparse: invalid choice
    run(tiny, tmp_path / "f", "--mode", "ChildTuning")


def test_flags_parse_as_run_glue_and_the_published_code():
  model, data, training = arguments.parse(
      ["--output_dir", "out", "--task_name", "rte", "--mode", "ChildTuning-F", "--reserve_p",
       "0.2", "--resume", "--max_train_samples", "1000", "--extra_eval_files", "a.csv", "b.json",
       "--disable_tqdm", "false"])
  assert model.model_name_or_path is None
  assert (data.task_name, data.max_train_samples, data.extra_eval_files) == ("rte", 1000, ["a.csv", "b.json"])
  assert (training.mode, training.reserve_p, training.resume, training.disable_tqdm) == (
      "ChildTuning-F", 0.2, True, False)
  assert training.adam_epsilon == 1e-6 and training.max_grad_norm == 1.0
  with pytest.raises(SystemExit):
    arguments.parse([])  # --output_dir is required
  assert "--fisher_num_examples" in arguments.parser().format_help()


def test_schedule_matches_transformers_linear_warmup():
  import torch
  import transformers

  args = arguments.TrainingArguments(output_dir="x", learning_rate=2e-5, warmup_ratio=0.1)
  schedule = trainer.learning_rate_schedule(args, 50)
  optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
  reference = transformers.get_linear_schedule_with_warmup(optimizer, 5, 50)
  want = []
  for _ in range(50):
    want.append(optimizer.param_groups[0]["lr"])
    optimizer.step()
    reference.step()
  np.testing.assert_allclose([float(schedule(s)) for s in range(50)], want, rtol=1e-6, atol=1e-12)


def test_weight_decay_skips_biases_and_layer_norms():
  params = {"bert": {"embeddings": {"LayerNorm": {"scale": 0, "bias": 0}, "word_embeddings": {"embedding": 0}},
                     "encoder": {"layer_0": {"output": {"dense": {"kernel": 0, "bias": 0}}}}}}
  flags = {name: flag for name, flag in ct._trees.named_leaves(trainer.decays(params))}
  assert flags == {"bert/embeddings/LayerNorm/bias": False, "bert/embeddings/LayerNorm/scale": False,
                   "bert/embeddings/word_embeddings/embedding": True,
                   "bert/encoder/layer_0/output/dense/bias": False,
                   "bert/encoder/layer_0/output/dense/kernel": True}


def test_real_embedded_model_and_data_end_to_end(tmp_path):
  """No model or data flags: the pretrained MiniLM-L6 on the Rotten Tomatoes reviews, briefly."""
  results = run_glue.main(["--output_dir", str(tmp_path), "--max_steps", "3", "--num_devices", "1",
                           "--per_device_train_batch_size", "4", "--fisher_num_examples", "16",
                           "--max_eval_samples", "64", "--max_seq_length", "32",
                           "--disable_tqdm"])
  assert results["eval_samples"] == 64 and results["train_samples"] == 2000
  assert 0.0 <= results["eval_accuracy"] <= 1.0 and np.isfinite(results["eval_loss"])
  fractions = read_json(tmp_path / "mask_keep_fractions.json")
  assert list(fractions["per_layer"]) == ["embeddings"] + [f"layer_{i}" for i in range(6)] + [
      "pooler", "classifier"]
  assert fractions["per_layer"]["classifier"] == 1.0


def test_layer_groups():
  assert trainer.layer_of("bert/encoder/layer_3/attention/self/query/kernel") == "layer_3"
  assert trainer.layer_of("roberta/embeddings/word_embeddings/embedding") == "embeddings"
  assert trainer.layer_of("bert/pooler/dense/kernel") == "pooler"
  assert trainer.layer_of("classifier/out_proj/kernel") == "classifier"


def test_prior_methods_compose_and_learn(tiny, tmp_path):
  results = run(tiny, tmp_path / "all", "--mode", "vanilla", "--learning_rate", "3e-3",
                "--num_train_epochs", "8", "--per_device_train_batch_size", "4", "--num_devices", "4",
                "--decay_to_pretrained", "1e-3", "--recadam_k", "0.5", "--recadam_t0", "10",
                "--recadam_strength", "30", "--mixout_p", "0.1", "--r3f_sigma", "0.1",
                "--save_steps", "1000")
  assert results["eval_accuracy"] >= 0.95, results
  # The paper's CT-D + R3F.
  results = run(tiny, tmp_path / "ctd_r3f", "--mode", "ChildTuning-D", "--r3f_sigma", "0.5",
                "--max_steps", "3", "--fisher_num_examples", "32")
  assert np.isfinite(results["eval_loss"])


def _context(tiny, **flags):
  args = arguments.TrainingArguments(output_dir="-", **{"mode": "vanilla", **flags})
  model, params = ct.models.load_pretrained(tiny["model"], 2)
  return methods.Context(args=args, model=model, params=params,
                         schedule=optax.constant_schedule(1e-3), from_checkpoint=lambda name: True,
                         logits=functools.partial(trainer.logits_of, model))


def test_top_k_tuning_trains_only_the_top_layers_and_the_head(tiny):
  context = _context(tiny, mode="vanilla", top_k_layers=1, weight_decay=0.1)
  params = context.params
  tx = trainer.optimizer(context.args, context.schedule, methods.chosen(context),
                         key=jax.random.key(0))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = {name: bool(np.any(u != 0)) for name, u in ct._trees.named_leaves(updates)}
  assert not any(moved[n] for n in moved if "/embeddings/" in n or "/layer_0/" in n)
  assert all(moved[n] for n in moved if "/layer_1/" in n or n.startswith(("classifier", "bert/pooler")))
  with pytest.raises(ValueError, match="--mode vanilla"):
    arguments.TrainingArguments(output_dir="-", mode="ChildTuning-F", top_k_layers=1)
  with pytest.raises(ValueError, match="overshoots"):
    arguments.TrainingArguments(output_dir="-", learning_rate=1e-3, recadam_k=0.5)


def _step_loss(context, state, batch):
  pieces = methods.chosen(context)
  loss = methods.wrap_loss(trainer.task_loss(context.model, is_regression=False), pieces)
  tx = trainer.optimizer(context.args, context.schedule, pieces, key=jax.random.key(0))
  state = state.replace(opt_state=tx.init(state.params))
  return float(trainer.make_train_step(tx, loss, context.schedule)(state, batch)[1]["loss"])


def test_r3f_and_mixout_wrap_the_task_loss(tiny):
  plain = _context(tiny)
  state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params=plain.params, opt_state=None,
                             dropout_key=jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"input_ids": jnp.asarray(rng.integers(5, 30, (4, 8)), jnp.int32),
           "attention_mask": jnp.ones((4, 8), jnp.int32), "token_type_ids": jnp.zeros((4, 8), jnp.int32),
           "labels": jnp.array([0, 1, 1, 0])}
  base = _step_loss(plain, state, batch)
  # The clean pass is the same (same dropout key), so the difference is 2 * KL_S > 0.
  assert _step_loss(_context(tiny, r3f_sigma=1.0, r3f_lambda=2.0), state, batch) > base
  w0 = jax.tree.map(jnp.zeros_like, plain.params)
  assert _step_loss(_context(tiny, mixout_p=0.5), state.replace(pretrained=w0), batch) != base


def test_every_method_that_needs_w0_shares_one_copy(tiny):
  context = _context(tiny, decay_to_pretrained=1e-3, recadam_k=0.5, recadam_strength=30,
                     mixout_p=0.1, learning_rate=1e-3)
  pieces = methods.chosen(context)
  assert sum(piece.needs_pretrained for piece in pieces) == 3
  tx = trainer.optimizer(context.args, context.schedule, pieces, key=jax.random.key(0))
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  parameters = size(context.params)
  # AdamW's two moments, and no copy of w0 in the optimizer state.
  assert size(tx.init(context.params)) < 2 * parameters + 100


def test_top_k_tuning_runs_with_a_donated_state(tiny, tmp_path):
  # The CT-D sandwich holds its mask twice; jax-array masks must not share a donated buffer.
  results = run(tiny, tmp_path, "--mode", "vanilla", "--top_k_layers", "1", "--max_steps", "3")
  assert np.isfinite(results["eval_loss"])


def test_ablation_child_networks_and_prune_at_eval(tiny, tmp_path):
  common = ("--mode", "ChildTuning-D", "--reserve_p", "0.25", "--fisher_num_examples", "64",
            "--do_train", "false", "--do_eval", "false")
  masks = {}
  params = _context(tiny).params
  for kind in ("fisher", "lowest_fisher", "random"):
    results = run(tiny, tmp_path / kind, *common, "--child_network", kind)
    assert results == {} and not (tmp_path / kind / "checkpoints").exists()  # mask only
    masks[kind] = ct.load_mask(tmp_path / kind / "mask.npz", params)
  # By default, as the published code, only the encoder blocks compete: p of their entries.
  selectable = lambda mask: {n: m for n, m in ct._trees.named_leaves(mask) if "/layer_" in n}
  for kind, mask in masks.items():
    leaves = selectable(mask)
    total = sum(m.size for m in leaves.values())
    assert sum(int(m.sum()) for m in leaves.values()) == round(0.25 * total), kind
    assert all(m.all() for n, m in ct._trees.named_leaves(mask) if n not in leaves), kind
    fractions = read_json(tmp_path / kind / "mask_keep_fractions.json")
    assert fractions["competing"] == fractions["encoder_blocks"] == pytest.approx(0.25, abs=1e-4)
    assert fractions["per_layer"]["embeddings"] == fractions["per_layer"]["classifier"] == 1.0
  # Highest and lowest Fisher are disjoint (apart from entries whose Fisher ties at the border).
  top, low = selectable(masks["fisher"]), selectable(masks["lowest_fisher"])
  overlap = sum(int((top[n] & low[n]).sum()) for n in top)
  assert overlap <= 0.01 * sum(int(m.sum()) for m in top.values())
  assert ct.mask_jaccard(selectable(masks["fisher"]), selectable(masks["random"])) < 0.3
  # This project's earlier default: everything but the head competes.
  run(tiny, tmp_path / "head_only", *common, "--always_trainable", "^classifier/")
  fractions = read_json(tmp_path / "head_only" / "mask_keep_fractions.json")
  assert fractions["competing"] == pytest.approx(0.25, abs=1e-4)
  assert fractions["per_layer"]["embeddings"] < 1.0 and fractions["per_layer"]["classifier"] == 1.0

  # Prune: evaluation with the weights outside the child network set to zero.
  results = run(tiny, tmp_path / "prune", "--mode", "ChildTuning-D", "--reserve_p", "0.25",
                "--fisher_num_examples", "64", "--max_steps", "4", "--prune_at_eval")
  assert results["eval_pruned_samples"] == results["eval_samples"]
  assert results["eval_pruned_loss"] != results["eval_loss"]

  for bad in (("--mode", "vanilla", "--prune_at_eval"),
              ("--mode", "ChildTuning-F", "--child_network", "random")):
    with pytest.raises(ValueError, match="options of --mode ChildTuning-D"):
      arguments.parse(["--output_dir", "-", *bad], exit_on_error=False)


def test_sparse_optimizer_state_trains_as_dense_and_the_child_delta_rebuilds_the_model(
    tiny, tmp_path):
  common = ("--mode", "ChildTuning-D", "--reserve_p", "0.2", "--fisher_num_examples", "32",
            "--max_steps", "6", "--learning_rate", "1e-3", "--weight_decay", "0.01")
  dense = run(tiny, tmp_path / "dense", *common)
  sparse = run(tiny, tmp_path / "sparse", *common, "--sparse_optimizer_state")
  assert sparse["eval_loss"] == pytest.approx(dense["eval_loss"], rel=1e-5, abs=1e-6)
  params = checkpoints.latest_params(tmp_path / "sparse" / "checkpoints")
  model_mask = ct.load_mask(tmp_path / "sparse" / "mask.npz", params)
  for a, b in zip(jax.tree.leaves(model_mask),
                  jax.tree.leaves(ct.load_mask(tmp_path / "dense" / "mask.npz", params))):
    np.testing.assert_array_equal(a, b)
  # The trainer's child_delta.npz on the pretrained model (its head drawn from --seed, 42 by
  # default) gives the trained parameters bit for bit.
  _, pretrained = ct.models.load_pretrained(tiny["model"], 2, seed=42)
  rebuilt = ct.apply_child_delta(tmp_path / "sparse" / "child_delta.npz", pretrained)
  for got, want in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(np.asarray(got), want)
  assert sparse["child_delta_bytes"] == (tmp_path / "sparse" / "child_delta.npz").stat().st_size
  with pytest.raises(ValueError, match="--sparse_optimizer_state keeps the moments of a fixed"):
    arguments.parse(["--output_dir", "-", "--mode", "ChildTuning-F", "--sparse_optimizer_state"],
                    exit_on_error=False)


def test_bf16_trains_near_float32_and_keeps_ct_d_frozen_weights_bit_identical(tiny, tmp_path):
  common = ("--mode", "ChildTuning-D", "--reserve_p", "0.3", "--fisher_num_examples", "32",
            "--max_steps", "8", "--learning_rate", "1e-3", "--weight_decay", "0.01")
  full = run(tiny, tmp_path / "fp32", *common)
  half = run(tiny, tmp_path / "bf16", *common, "--bf16")
  assert read_json(tmp_path / "bf16" / "run_args.json")["bf16"] is True
  assert half["eval_loss"] == pytest.approx(full["eval_loss"], rel=0.05)
  assert half["eval_loss"] != full["eval_loss"]  # it did compute in bfloat16
  params = checkpoints.latest_params(tmp_path / "bf16" / "checkpoints")
  mask = ct.load_mask(tmp_path / "bf16" / "mask.npz", params)
  _, pretrained = ct.models.load_pretrained(tiny["model"], 2, seed=42)
  changed = 0
  for keep, got, was in zip(jax.tree.leaves(mask), jax.tree.leaves(params),
                            jax.tree.leaves(pretrained), strict=True):
    keep, got, was = np.asarray(keep), np.asarray(got), np.asarray(was)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32)[~keep], was.view(np.uint32)[~keep])
    changed += int(np.sum(got[keep] != was[keep]))
  assert changed > 0

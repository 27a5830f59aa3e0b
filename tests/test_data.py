"""Local data files with run_glue's conventions, and the batch order."""

import json

import numpy as np
import pytest

from train.text_datasets import GLUE_TASKS, batch_indices, load_glue, load_local


def _write_csv(path, header, rows):
  path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
  return path


def test_csv_single_sentence_with_text_labels(tmp_path):
  path = _write_csv(tmp_path / "train.csv", ["sentence", "label"],
                    [["good film", "fresh"], ["dull", "rotten"], ["fine", "fresh"]])
  data = load_local(path)
  assert data.text_a == ["good film", "dull", "fine"] and data.text_b is None
  np.testing.assert_array_equal(data.labels, [0, 1, 0])  # sorted: fresh=0, rotten=1
  assert data.labels.dtype == np.int32 and not data.is_regression


def test_subset_keeps_texts_and_labels_aligned(tmp_path):
  path = _write_csv(tmp_path / "pairs.csv", ["sentence1", "sentence2", "label"],
                    [["a", "b", "x"], ["c", "d", "y"], ["e", "f", "x"]])
  picked = load_local(path).subset([2, 0])
  assert picked.text_a == ["e", "a"] and picked.text_b == ["f", "b"]
  np.testing.assert_array_equal(picked.labels, [0, 0])
  assert len(picked) == 2


def test_sentence_pairs_and_float_labels_mean_regression(tmp_path):
  path = _write_csv(tmp_path / "stsb.csv", ["sentence1", "sentence2", "label"],
                    [["a", "b", "3.8"], ["c", "d", "1.0"]])
  data = load_local(path)
  assert data.text_b == ["b", "d"] and data.is_regression
  np.testing.assert_allclose(data.labels, [3.8, 1.0])


def test_jsonl_and_json_list(tmp_path):
  rows = [{"sentence1": "a", "sentence2": "b", "label": 1}, {"sentence1": "c", "sentence2": "d",
                                                             "label": 0}]
  lines = tmp_path / "x.jsonl"
  lines.write_text("\n".join(json.dumps(r) for r in rows))
  listed = tmp_path / "y.json"
  listed.write_text(json.dumps(rows))
  for path in (lines, listed):
    data = load_local(path)
    np.testing.assert_array_equal(data.labels, [1, 0])
    assert data.text_a == ["a", "c"]


def test_validation_labels_use_the_training_label_order_and_unknown_labels_name_the_row(tmp_path):
  path = _write_csv(tmp_path / "dev.csv", ["sentence", "label"],
                    [["x", "rotten"], ["y", "fresh"], ["z", "meh"]])
  with pytest.raises(ValueError, match=r"dev.csv, row 4: label 'meh' is not one of"):
    load_local(path, label_list=["fresh", "rotten"])
  ok = _write_csv(tmp_path / "ok.csv", ["sentence", "label"], [["x", "rotten"], ["y", "fresh"]])
  np.testing.assert_array_equal(load_local(ok, label_list=["fresh", "rotten"]).labels, [1, 0])


def test_numeric_labels_match_across_spellings(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text('{"sentence": "a", "label": 1}\n{"sentence": "b", "label": "0"}\n')
  np.testing.assert_array_equal(load_local(path, label_list=["0", "1"]).labels, [1, 0])


@pytest.mark.parametrize("header, rows, match", [
    (["text", "label"], [["a", "1"]], None),  # a non-standard text column is used
    (["sentence", "score"], [["a", "1"]], r"no column 'label'"),
    (["sentence", "label"], [["a", ""]], r"row 2: column 'label' is empty"),
])
def test_missing_columns_and_empty_labels(tmp_path, header, rows, match):
  path = _write_csv(tmp_path / "f.csv", header, rows)
  if match is None:
    assert load_local(path).text_a == ["a"]
  else:
    with pytest.raises(ValueError, match=match):
      load_local(path)


def test_empty_missing_and_unsupported_files(tmp_path):
  empty = tmp_path / "e.csv"
  empty.write_text("sentence,label\n")
  with pytest.raises(ValueError, match="holds no examples"):
    load_local(empty)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_local(tmp_path / "nope.csv")
  other = tmp_path / "f.parquet"
  other.write_text("x")
  with pytest.raises(ValueError, match="unsupported file type"):
    load_local(other)
  not_objects = tmp_path / "n.json"
  not_objects.write_text('[["a", 1]]')
  with pytest.raises(ValueError, match="example 1: expected an object"):
    load_local(not_objects)
  bad = tmp_path / "b.jsonl"
  bad.write_text('{"sentence": "a", "label": 1}\n{oops\n')
  with pytest.raises(ValueError, match="line 2: not valid JSON"):
    load_local(bad)


def test_regression_file_with_a_text_label_names_the_row(tmp_path):
  path = _write_csv(tmp_path / "r.csv", ["sentence", "label"], [["a", "0.5"], ["b", "high"]])
  with pytest.raises(ValueError, match=r"row 3: label 'high' is not a number"):
    load_local(path, regression=True)


def test_batch_order_is_a_function_of_seed_and_epoch():
  first = [b.tolist() for b in batch_indices(10, 3, seed=1, epoch=0)]
  assert [len(b) for b in first] == [3, 3, 3]  # the partial batch is dropped in training
  assert first == [b.tolist() for b in batch_indices(10, 3, seed=1, epoch=0)]
  assert first != [b.tolist() for b in batch_indices(10, 3, seed=1, epoch=1)]
  assert len(set(sum(first, []))) == 9
  evaluation = list(batch_indices(10, 3, seed=0, epoch=0, shuffle=False, drop_last=False))
  assert [b.tolist() for b in evaluation] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]


def test_glue_tasks_cover_the_paper_and_fail_clearly_offline():
  assert {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte"} <= set(GLUE_TASKS)
  assert GLUE_TASKS["stsb"].num_labels == 1 and GLUE_TASKS["mnli"].num_labels == 3
  with pytest.raises(ValueError, match="unknown GLUE task"):
    load_glue("squad")
  with pytest.raises(OSError, match="--train_file"):
    load_glue("rte")  # HF_DATASETS_OFFLINE=1 in conftest.py: fails at once


def test_encode_pads_pairs_to_a_fixed_length_with_the_embedded_tokenizer(tmp_path):
  transformers = pytest.importorskip("transformers")
  from train.text_datasets import encode
  from childtuning_jax.models import embedded_model_path

  tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_model_path())
  path = _write_csv(tmp_path / "p.csv", ["sentence1", "sentence2", "label"],
                    [["a fine film", "truly", "1"], ["dull " * 40, "and long", "0"]])
  arrays = encode(load_local(path), tokenizer, max_seq_length=16)
  assert {k: v.shape for k, v in arrays.items()} == {
      "input_ids": (2, 16), "attention_mask": (2, 16), "token_type_ids": (2, 16), "labels": (2,)}
  assert all(arrays[k].dtype == np.int32 for k in ("input_ids", "attention_mask", "token_type_ids"))
  assert arrays["attention_mask"][0].sum() < 16 and arrays["attention_mask"][1].sum() == 16
  assert arrays["token_type_ids"][0].max() == 1  # the second sentence is segment 1
  np.testing.assert_array_equal(arrays["labels"], [1, 0])


@pytest.mark.parametrize("labels, task", [
    (["negative", "positive", "negative"], "classification"),
    (["0", "1", "2"], "classification"),
    (["3.8", "1", "0.25"], "regression"),  # scores; some happen to be whole numbers
    (["1.0", "0.0", "2e0"], "regression"),  # numbers written as floats, as type inference reads them
    (["positive", "1", "0"], "mix two kinds"),
    (["1", "0", "1.0"], "writes a label as a float"),
    (["0.5", "nan", "1"], "not a usable label"),
    (["-inf", "0", "1"], "not a usable label"),
])
def test_the_task_follows_the_labels_and_mixed_kinds_are_refused(tmp_path, labels, task):
  path = _write_csv(tmp_path / "t.csv", ["sentence", "label"], [[f"s{i}", v] for i, v in enumerate(labels)])
  if task in ("classification", "regression"):
    assert load_local(path).is_regression == (task == "regression")
  else:
    with pytest.raises(ValueError, match=task):
      load_local(path)


def test_json_numbers_follow_the_same_rules(tmp_path):
  path = tmp_path / "t.jsonl"
  path.write_text('{"sentence": "a", "label": 1}\n{"sentence": "b", "label": 0.0}\n')
  with pytest.raises(ValueError, match=r"row 2 \(0.0\) writes a label as a float, row 1 \(1\)"):
    load_local(path)
  path.write_text('{"sentence": "a", "label": 0.5}\n{"sentence": "b", "label": NaN}\n')
  with pytest.raises(ValueError, match=r"row 2: label nan is not a usable label"):
    load_local(path)


def test_empty_texts_are_refused_and_a_byte_order_mark_is_not_data(tmp_path):
  pair = _write_csv(tmp_path / "p.csv", ["sentence1", "sentence2", "label"], [["a", " ", "0"]])
  with pytest.raises(ValueError, match=r"p.csv, row 2: column 'sentence2' is empty"):
    load_local(pair)
  excel = tmp_path / "excel.csv"
  excel.write_bytes("\ufeffsentence,label\na fine film,positive\n".encode("utf-8"))
  assert load_local(excel).text_a == ["a fine film"]


def test_glue_splits_skip_and_count_empty_texts_and_missing_scores(caplog):
  datasets = pytest.importorskip("datasets")
  from train.text_datasets import glue_split

  columns = datasets.Dataset.from_dict({"sentence1": ["a", "", "c", "d"], "sentence2": ["w", "x", "y", "z"],
                                        "label": [0.5, 1.0, float("nan"), 4.0]})
  split = glue_split("stsb/train", columns, GLUE_TASKS["stsb"])
  assert split.text_a == ["a", "d"] and split.labels.tolist() == [0.5, 4.0]
  assert "stsb/train: skipped 2 of 4 examples" in caplog.text
  labelled = datasets.Dataset.from_dict(
      {"sentence": ["a", "b"], "label": [1, 0]},
      features=datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["unacceptable", "acceptable"])}))
  split = glue_split("cola/validation", labelled, GLUE_TASKS["cola"])
  assert split.label_names == ["unacceptable", "acceptable"] and split.labels.tolist() == [1, 0]

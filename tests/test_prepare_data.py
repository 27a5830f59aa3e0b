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

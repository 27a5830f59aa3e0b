"""The trainer's data: the embedded default set, local files, batches."""

import numpy as np
import pytest

import tiny_run
from train import input_pipeline


def test_rotten_tomatoes_default_split_is_by_movie():
  train, validation = input_pipeline.rotten_tomatoes()
  assert len(train) + len(validation) == 12808  # fresh and rotten reviews; plots dropped
  assert 1000 <= len(validation) < 1100
  assert train.label_names == validation.label_names == ["rotten", "fresh"]
  assert 0.5 < train.labels.mean() < 0.65  # 7,403 fresh of 12,808
  # Whole movies are held out; only a stock phrase written about two films crosses over.
  assert len(set(train.text_a) & set(validation.text_a)) <= 1
  again, _ = input_pipeline.rotten_tomatoes()
  assert again.text_a == train.text_a  # fixed, whatever the run's seed


def test_local_files_subsampling_and_extra_sets(tmp_path):
  train = tiny_run.write_csv(tmp_path / "train.csv", 50, seed=1)
  dev = tiny_run.write_csv(tmp_path / "dev.csv", 20, seed=2)
  extra = tiny_run.write_csv(tmp_path / "other.csv", 10, seed=3)
  data = input_pipeline.load_datasets(train_file=str(train), validation_file=str(dev),
                                      extra_eval_files=[str(extra)], max_train_samples=30,
                                      max_eval_samples=15, seed=5)
  assert (len(data.train), data.num_labels, data.is_regression) == (30, 2, False)
  assert {name: len(d) for name, d in data.evals.items()} == {"validation": 15, "other": 10}
  full = input_pipeline.load_datasets(train_file=str(train), validation_file=str(dev))
  assert set(data.train.text_a) <= set(full.train.text_a)
  other_seed = input_pipeline.load_datasets(train_file=str(train), validation_file=str(dev),
                                            max_train_samples=30, seed=6)
  assert other_seed.train.text_a != data.train.text_a
  (tmp_path / "b").mkdir()
  same_name = tiny_run.write_csv(tmp_path / "b" / "other.csv", 10, seed=4)
  with pytest.raises(ValueError, match="named 'other'"):
    input_pipeline.load_datasets(train_file=str(train), validation_file=str(dev),
                                 extra_eval_files=[str(extra), str(same_name)])
  with pytest.raises(ValueError, match="needs a --validation_file"):
    input_pipeline.load_datasets(train_file=str(train))
  with pytest.raises(ValueError, match="not both"):
    input_pipeline.load_datasets(task_name="rte", train_file=str(train))


def test_glue_offline_says_to_use_local_files():
  with pytest.raises(OSError, match="--train_file"):
    input_pipeline.load_datasets(task_name="rte")


def test_eval_batches_pad_the_last_batch_and_weight_it_out():
  arrays = {"input_ids": np.arange(10)[:, None], "labels": np.arange(10)}
  batches = list(input_pipeline.eval_batches(arrays, 4))
  assert [b["weights"].tolist() for b in batches] == [[1] * 4, [1] * 4, [1, 1, 0, 0]]
  assert batches[-1]["labels"].tolist() == [8, 9, 0, 0]

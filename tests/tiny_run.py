"""A tiny random BERT checkpoint and tiny sentiment files, for trainer tests that run in seconds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

POSITIVE = ["good", "great", "fine", "superb", "lovely", "fun", "moving", "sharp"]
NEGATIVE = ["bad", "dull", "awful", "weak", "boring", "flat", "messy", "tired"]
NEUTRAL = ["the", "a", "film", "movie", "plot", "cast", "story", "is", "was", "and", "very",
           "quite", "its", "ending", "score", "director"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def write_checkpoint(directory: Path, seed: int = 0) -> Path:
  """A 2-layer BERT (hidden size 32) with random weights, saved by PyTorch transformers,
  and a WordPiece vocabulary of the words the tiny data sets use."""
  import torch
  import transformers

  directory.mkdir(parents=True, exist_ok=True)
  vocab = SPECIAL + POSITIVE + NEGATIVE + NEUTRAL
  (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
  torch.manual_seed(seed)
  config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=64,
                                   max_position_embeddings=64)
  transformers.BertModel(config).save_pretrained(directory)  # no head: the trainer adds one
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
  return directory


def sentences(count: int, seed: int) -> list[tuple[str, int]]:
  """Short reviews; the label is 1 when positive words outnumber negative ones."""
  rng = np.random.default_rng(seed)
  rows = []
  while len(rows) < count:
    positive, negative = rng.integers(0, 3, 2)
    if positive == negative:
      continue
    words = (list(rng.choice(POSITIVE, positive)) + list(rng.choice(NEGATIVE, negative))
             + list(rng.choice(NEUTRAL, rng.integers(2, 7))))
    rng.shuffle(words)
    rows.append((" ".join(words), int(positive > negative)))
  return rows


def write_csv(path: Path, count: int, seed: int, labels=("negative", "positive")) -> Path:
  with open(path, "w", newline="") as file:
    writer = csv.writer(file)
    writer.writerow(["sentence", "label"])
    for text, label in sentences(count, seed):
      writer.writerow([text, labels[label]])
  return path


def trainer_argv(tiny: dict, output_dir: Path, *flags) -> list[str]:
  """run_glue's command line for the tiny model and files of the ``tiny`` fixture."""
  return ["--model_name_or_path", str(tiny["model"]), "--train_file", str(tiny["train"]),
          "--validation_file", str(tiny["validation"]), "--output_dir", str(output_dir),
          "--max_seq_length", "16", "--per_device_train_batch_size", "2", "--disable_tqdm",
          *map(str, flags)]

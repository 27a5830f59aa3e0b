"""Writing :class:`EncoderForSequenceClassification` parameters as a Hugging Face checkpoint.

The inverse of :mod:`childtuning_jax.models.loading`: ``config.json`` and
``model.safetensors`` with PyTorch ``transformers``' names and layouts, so that
``AutoModelForSequenceClassification.from_pretrained(directory)`` (BERT, RoBERTa,
ELECTRA, MPNet) gives the logits the Flax model gives. Train in JAX, serve anywhere.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from childtuning_jax import _files
from childtuning_jax.models.encoder import SPEED_PATH_CHOICES, EncoderConfig
from childtuning_jax.models.loading import _flax_path

_ARCHITECTURE_NAMES = {"bert": "BertForSequenceClassification",
                       "roberta": "RobertaForSequenceClassification",
                       "electra": "ElectraForSequenceClassification",
                       "mpnet": "MPNetForSequenceClassification"}


def save_pretrained(directory: str | os.PathLike, model: Any, params: Any) -> Path:
  """Writes ``config.json`` and ``model.safetensors`` for PyTorch ``transformers``.

  Floating-point parameters are written as float32. Both files are written under
  temporary names and renamed into place. The tokenizer's files are not written:
  copy them from the pretrained checkpoint's directory.

  Args:
    directory: created if missing.
    model: the :class:`EncoderForSequenceClassification` (its ``config`` is written).
    params: its parameters (``{"params": ...}`` is accepted too).

  Returns:
    The directory, as a ``Path``.

  Raises:
    ValueError: ``params`` are not the model's (other leaves or shapes; the message
      names them).

  Examples:
    >>> import tempfile
    >>> from childtuning_jax.models import embedded_model_path, load_pretrained, save_pretrained
    >>> model, params = load_pretrained(embedded_model_path(), num_labels=2)
    >>> path = save_pretrained(tempfile.mkdtemp(), model, params)
    >>> sorted(p.name for p in path.iterdir())
    ['config.json', 'model.safetensors']
  """
  try:
    from safetensors.numpy import save_file
  except ImportError:
    raise ImportError("writing model.safetensors needs the safetensors package: pip install "
                      "safetensors (included in childtuning-jax[train]).") from None
  config: EncoderConfig = model.config
  if set(params) == {"params"}:
    params = params["params"]
  flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
  expected = traverse_util.flatten_dict(jax.eval_shape(
      model.init, jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32))["params"], sep="/")
  unexpected = sorted(set(flat) - set(expected))
  missing = sorted(set(expected) - set(flat))
  reshaped = [f"{path} {np.shape(flat[path])} vs {expected[path].shape}" for path in flat
              if path in expected and np.shape(flat[path]) != expected[path].shape]
  if unexpected or missing or reshaped:
    raise ValueError(f"these are not the parameters of this {config.model_type} model: "
                     f"unexpected {unexpected[:5]}, missing {missing[:5]}, other shapes "
                     f"{reshaped[:5]}.")
  tensors, unnamed = {}, []
  for path, value in flat.items():
    name = _torch_name(path)
    if _flax_path(name, flat) != path:  # the loader must read it back to the same leaf
      unnamed.append(path)
      continue
    value = np.asarray(value)
    if np.issubdtype(value.dtype, np.floating):
      value = value.astype(np.float32)
    tensors[name] = np.ascontiguousarray(value.T if path.endswith("/kernel") else value)
  if unnamed:
    raise ValueError(f"no transformers name for the parameters {unnamed[:5]}.")
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  _files.write_atomically(directory / "config.json",
                    lambda path: path.write_text(json.dumps(hf_config(config), indent=2) + "\n"))
  _files.write_atomically(directory / "model.safetensors",
                    lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
  return directory


def hf_config(config: EncoderConfig) -> dict[str, Any]:
  """The ``config.json`` dict of ``config`` for ``transformers``' ``*ForSequenceClassification``."""
  values = dataclasses.asdict(config)
  num_labels = values.pop("num_labels")
  for name in (*SPEED_PATH_CHOICES, "gradient_checkpointing"):  # how this library computes,
    del values[name]                                              # not part of the model
  if config.model_type == "electra" and values["embedding_size"] is None:
    values["embedding_size"] = config.hidden_size
  elif values["embedding_size"] is None:
    del values["embedding_size"]
  labels = {str(i): f"LABEL_{i}" for i in range(num_labels)}
  return {"architectures": [_ARCHITECTURE_NAMES[config.model_type]], **values,
          "id2label": labels, "label2id": {name: int(i) for i, name in labels.items()},
          **({"problem_type": "regression"} if num_labels == 1 else {})}


def _torch_name(path: str) -> str:
  """``bert/encoder/layer_3/output/LayerNorm/scale`` -> ``bert.encoder.layer.3.output.LayerNorm.weight``."""
  parts = []
  for part in path.split("/")[:-1]:
    if part.startswith("layer_") and part[len("layer_"):].isdigit():
      parts += ["layer", part[len("layer_"):]]
    else:
      parts.append(part)
  leaf = path.split("/")[-1]
  return ".".join(parts + ["bias" if leaf == "bias" else "weight"])

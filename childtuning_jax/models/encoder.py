"""BERT-family encoders with a sequence-classification head, in Flax Linen.

One module, :class:`EncoderForSequenceClassification`, covers BERT, RoBERTa,
ELECTRA's discriminator (same encoder; embeddings of their own width projected
to the hidden size; a two-layer GELU head) and MPNet (no token types; one
relative-position attention bias shared by the layers; its attention block's
own names). Submodules carry Hugging Face's names
(``bert/encoder/layer_3/attention/self/query``) so that checkpoints map onto
the parameters by name (see :mod:`childtuning_jax.models.loading`), and the
parameters stay a plain pytree for the optax transforms and the Fisher
estimator.

Outputs match ``transformers``' ``BertForSequenceClassification``,
``RobertaForSequenceClassification``, ``ElectraForSequenceClassification`` and
``MPNetForSequenceClassification``
(tested to < 1e-4 on random tiny models).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from childtuning_jax import _random
from childtuning_jax.models.matmul import dense_dot_general


def _gelu(x):
  """Exact GELU in PyTorch's form, x/2 · (1 + erf(x/√2)). ``jax.nn.gelu``'s erfc form
  is more accurate far in the negative tail, where GELU is nearly zero, but its
  derivative costs more: a training step on CPU is faster with this one
  (BENCHMARKS.md, step variants)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


_ACTIVATIONS = {
    "gelu": _gelu,
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}

# model_type -> (has a pooler, classification head): "pooler" = BERT's
# dropout + Linear on the tanh pooler; otherwise the activation of a two-layer head
# (dense + activation + out_proj on the first token): tanh for RoBERTa, GELU for ELECTRA.
_ARCHITECTURES = {
    "bert": (True, "pooler"),
    "roberta": (False, "tanh"),
    "electra": (False, "gelu"),
    "mpnet": (False, "tanh"),
}
# MPNet numbers positions from its padding index, 1, whatever the config's pad_token_id, as
# transformers' MPNetEmbeddings does.
MPNET_PADDING_INDEX = 1


SPEED_PATH_CHOICES = {"dropout_impl": ("auto", "hash", "flax"),
                      "dense_backward": ("auto", "transposed_copy", "jax")}
DTYPE_CHOICES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """The fields of a Hugging Face ``config.json`` that the encoder uses."""

  model_type: str = "bert"
  vocab_size: int = 30522
  hidden_size: int = 768
  embedding_size: int | None = None  # ELECTRA: the embeddings' width (None: hidden_size)
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  classifier_dropout: float | None = None
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  relative_attention_num_buckets: int = 32  # MPNet
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  initializer_range: float = 0.02
  num_labels: int = 2
  # The CPU speed paths (BENCHMARKS.md, step variants), each "auto" by default: on for the
  # "cpu" backend, stock Flax/JAX on every other (see resolved_speed_paths).
  dropout_impl: str = "auto"  # "hash": Dropout below; "flax": nn.Dropout
  dense_backward: str = "auto"  # "transposed_copy": models.matmul; "jax": JAX's own VJP
  # The computation's dtype. "bfloat16": matmuls, activations and the residual stream in
  # bfloat16; parameters (so gradients and optimizer state) stay float32, and LayerNorm
  # statistics, the attention softmax and the logits (so the loss) are float32.
  dtype: str = "float32"
  # Recompute each encoder layer's activations in the backward pass instead of keeping them
  # (jax.checkpoint, Hugging Face's gradient checkpointing): a training step then holds one
  # layer's activations and each layer's input, for a second forward pass of the layers.
  # The same function, the same gradients and dropout.
  gradient_checkpointing: bool = False

  def __post_init__(self):
    if self.model_type not in _ARCHITECTURES:
      raise ValueError(f"model_type {self.model_type!r} is not supported; "
                       f"supported: {sorted(_ARCHITECTURES)}.")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; "
                       f"supported: {sorted(_ACTIVATIONS)}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                       f"num_attention_heads {self.num_attention_heads}.")
    if self.num_labels < 1:
      raise ValueError(f"num_labels must be >= 1 (1 = regression), got {self.num_labels}.")
    if self.dtype not in DTYPE_CHOICES:
      raise ValueError(f"dtype must be one of {list(DTYPE_CHOICES)}, got {self.dtype!r}.")
    for name, choices in SPEED_PATH_CHOICES.items():
      if getattr(self, name) not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(self, name)!r}.")

  def resolved_speed_paths(self, backend: str | None = None) -> dict[str, str]:
    """``{"dropout_impl": ..., "dense_backward": ...}`` with ``"auto"`` resolved for
    ``backend`` (default: ``jax.default_backend()``): the CPU's speed paths (hash dropout,
    the transposed-copy backward) on ``"cpu"``, stock Flax/JAX (``nn.Dropout``, JAX's own
    derivative) on GPU, TPU and any other backend, where ours were not measured faster."""
    cpu = (backend or jax.default_backend()) == "cpu"
    defaults = {"dropout_impl": "hash" if cpu else "flax",
                "dense_backward": "transposed_copy" if cpu else "jax"}
    return {name: defaults[name] if getattr(self, name) == "auto" else getattr(self, name)
            for name in SPEED_PATH_CHOICES}

  @classmethod
  def from_hf_dict(cls, config: dict[str, Any], **overrides) -> "EncoderConfig":
    """From the dict of a Hugging Face ``config.json``; unknown keys are ignored."""
    names = {field.name for field in dataclasses.fields(cls)}
    values = {key: value for key, value in config.items() if key in names and value is not None}
    if "classifier_dropout" in config:
      values["classifier_dropout"] = config["classifier_dropout"]
    values.update(overrides)
    return cls(**values)

  @property
  def compute_dtype(self) -> Any:
    """``dtype`` as a JAX dtype."""
    return jnp.dtype(self.dtype)

  @property
  def classifier_dropout_rate(self) -> float:
    return self.hidden_dropout_prob if self.classifier_dropout is None else self.classifier_dropout

  @property
  def is_regression(self) -> bool:
    """One output: a regression head (Hugging Face's convention)."""
    return self.num_labels == 1

  @property
  def max_tokens(self) -> int:
    """The longest input the position embeddings cover (RoBERTa's positions start after
    ``pad_token_id``)."""
    offset = {"roberta": self.pad_token_id + 1, "mpnet": MPNET_PADDING_INDEX + 1}.get(
        self.model_type, 0)
    return self.max_position_embeddings - offset


def _dense(config: EncoderConfig, features: int, name: str) -> nn.Dense:
  # dense_dot_general: the same product, with a backward pass that runs faster on CPU (matmul.py).
  transposed = config.resolved_speed_paths()["dense_backward"] == "transposed_copy"
  return nn.Dense(features, kernel_init=nn.initializers.normal(config.initializer_range), name=name,
                  dot_general=dense_dot_general if transposed else jax.lax.dot_general,
                  dtype=config.compute_dtype)


def _dropout(config: EncoderConfig, rate: float) -> nn.Module:
  """The configured dropout: :class:`Dropout` (hash) or ``nn.Dropout`` (same distribution,
  another random stream)."""
  return Dropout(rate) if config.resolved_speed_paths()["dropout_impl"] == "hash" else nn.Dropout(rate)


def _layer_norm(config: EncoderConfig, name: str = "LayerNorm") -> nn.LayerNorm:
  # Flax computes the statistics in float32 whatever dtype is (force_float32_reductions).
  return nn.LayerNorm(epsilon=config.layer_norm_eps, name=name, dtype=config.compute_dtype)


class Dropout(nn.Module):
  """Inverted dropout (``nn.Dropout``'s semantics) whose keep decisions are a
  Threefry hash of each entry's position under the module's ``"dropout"`` rng.

  Same distribution as ``nn.Dropout``, a different random stream: XLA fuses
  the hash into the multiply instead of writing random bits to memory, which
  makes a training step on CPU faster (measured in BENCHMARKS.md). Under
  ``jit`` with a sharded batch every device draws its own shard's decisions.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from childtuning_jax.models.encoder import Dropout
    >>> y = Dropout(0.25).apply({}, jnp.ones((100, 100)), deterministic=False,
    ...                         rngs={"dropout": jax.random.key(0)})
    >>> len(set(y.ravel().tolist())), round(float(y.max()), 4), round(float((y == 0).mean()), 2)
    (2, 1.3333, 0.25)
  """

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep = _random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, x.shape, "1 - rate")
    return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros((), x.dtype))


WORD_ROWS = "word_embeddings_rows"


class Embeddings(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, position_ids, deterministic):
    c = self.config
    # Looked up and summed in float32 (the Fisher pass's row offsets too); the LayerNorm's
    # output is in the model's dtype.
    embed = lambda size, name: nn.Embed(
        size, c.embedding_size or c.hidden_size, embedding_init=nn.initializers.normal(c.initializer_range), name=name)
    # perturb: a no-op unless a "perturbations" collection is passed; the Fisher estimator
    # differentiates through it to get per-example word-embedding gradients row by row.
    x = (self.perturb(WORD_ROWS, embed(c.vocab_size, "word_embeddings")(input_ids))
         + embed(c.max_position_embeddings, "position_embeddings")(position_ids))
    if c.model_type != "mpnet":  # MPNet has no token types
      x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = _layer_norm(c)(x)
    return _dropout(c, c.hidden_dropout_prob)(x, deterministic)


class SelfAttention(nn.Module):
  """Multi-head attention; ``names``: the query, key and value projections' names (BERT's;
  MPNet's are ``q``, ``k``, ``v``); ``output``: the name of an output projection inside
  the module (MPNet's ``o``; BERT's is in its ``output`` module)."""

  config: EncoderConfig
  names: tuple[str, str, str] = ("query", "key", "value")
  output: str | None = None

  @nn.compact
  def __call__(self, x, attention_bias, deterministic):
    c = self.config
    heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    # [batch, heads, length, head_dim] before the attention matmuls: a little faster on CPU
    # than contracting in [batch, length, heads, head_dim] (BENCHMARKS.md, step variants).
    split = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim)).transpose(0, 2, 1, 3)
    q, k, v = (split(_dense(c, c.hidden_size, name)(x)) for name in self.names)
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
    # The softmax in float32 (attention_bias is float32), its probabilities in the model's dtype.
    probs = jax.nn.softmax(scores.astype(jnp.float32) + attention_bias, axis=-1).astype(q.dtype)
    probs = _dropout(c, c.attention_probs_dropout_prob)(probs, deterministic)
    context = jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)
    context = context.reshape(context.shape[:2] + (c.hidden_size,))
    return _dense(c, c.hidden_size, self.output)(context) if self.output else context


class ResidualOutput(nn.Module):
  """Dense -> dropout -> add the residual -> LayerNorm (HF's BertSelfOutput / BertOutput)."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x, residual, deterministic):
    c = self.config
    x = _dropout(c, c.hidden_dropout_prob)(_dense(c, c.hidden_size, "dense")(x), deterministic)
    return _layer_norm(c)(x + residual)


class Attention(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x, attention_bias, deterministic):
    h = SelfAttention(self.config, name="self")(x, attention_bias, deterministic)
    return ResidualOutput(self.config, name="output")(h, x, deterministic)


class MPNetAttention(nn.Module):
  """MPNet's attention block: ``attn`` (q, k, v and the output projection o), then dropout,
  the residual and a LayerNorm (transformers' MPNetAttention)."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, x, attention_bias, deterministic):
    c = self.config
    h = SelfAttention(c, names=("q", "k", "v"), output="o", name="attn")(x, attention_bias,
                                                                         deterministic)
    return _layer_norm(c)(_dropout(c, c.hidden_dropout_prob)(h, deterministic) + x)


def relative_position_buckets(length: int, num_buckets: int = 32,
                              max_distance: int = 128) -> np.ndarray:
  """MPNet's (T5's bidirectional) bucket of each ``[query, key]`` relative position, in
  float32 as transformers computes it, so that the buckets agree exactly."""
  position = np.arange(length)
  n = -(position[None, :] - position[:, None])
  half = num_buckets // 2
  buckets = (n < 0).astype(np.int64) * half
  n = np.abs(n)
  max_exact = half // 2
  with np.errstate(divide="ignore", invalid="ignore"):
    large = max_exact + (np.log(n.astype(np.float32) / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact))
                         * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (buckets + np.where(n < max_exact, n, large)).astype(np.int32)


class Intermediate(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    return _ACTIVATIONS[c.hidden_act](_dense(c, c.intermediate_size, "dense")(x))


class Layer(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x, attention_bias, deterministic):
    attention = MPNetAttention if self.config.model_type == "mpnet" else Attention
    x = attention(self.config, name="attention")(x, attention_bias, deterministic)
    h = Intermediate(self.config, name="intermediate")(x)
    return ResidualOutput(self.config, name="output")(h, x, deterministic)


class Encoder(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x, attention_bias, deterministic):
    c = self.config
    if c.model_type == "mpnet":  # one relative-position bias, shared by every layer
      table = nn.Embed(c.relative_attention_num_buckets, c.num_attention_heads,
                       embedding_init=nn.initializers.normal(c.initializer_range),
                       name="relative_attention_bias")
      bias = table(jnp.asarray(relative_position_buckets(x.shape[1])))  # [query, key, heads]
      attention_bias = attention_bias + bias.transpose(2, 0, 1)[None].astype(jnp.float32)
    # static_argnums counts the module as argument 0: `deterministic` is static.
    layer = nn.remat(Layer, static_argnums=(3,)) if c.gradient_checkpointing else Layer
    for i in range(c.num_hidden_layers):
      x = layer(c, name=f"layer_{i}")(x, attention_bias, deterministic)
    return x


class Pooler(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(_dense(self.config, self.config.hidden_size, "dense")(x[:, 0]))


class EncoderModel(nn.Module):
  """Embeddings + encoder (+ pooler for BERT); returns (sequence output, pooled or None)."""

  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, deterministic):
    c = self.config
    if c.model_type in ("roberta", "mpnet"):
      # RoBERTa numbers real tokens from pad_token_id + 1 and gives padding pad_token_id.
      pad = MPNET_PADDING_INDEX if c.model_type == "mpnet" else c.pad_token_id
      not_pad = (input_ids != pad).astype(jnp.int32)
      position_ids = jnp.cumsum(not_pad, axis=1) * not_pad + pad
    else:
      position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    x = Embeddings(c, name="embeddings")(input_ids, token_type_ids, position_ids, deterministic)
    if (c.embedding_size or c.hidden_size) != c.hidden_size:  # ELECTRA-small's narrow embeddings
      x = _dense(c, c.hidden_size, "embeddings_project")(x)
    # Additive mask over keys, as transformers does: 0 where attended, float32-min where padded
    # (float32 whatever the model's dtype: it is added to the scores in the softmax's float32).
    attention_bias = jnp.where(attention_mask[:, None, None, :].astype(bool), 0.0,
                               jnp.finfo(jnp.float32).min).astype(jnp.float32)
    x = Encoder(c, name="encoder")(x, attention_bias, deterministic)
    has_pooler, _ = _ARCHITECTURES[c.model_type]
    return x, Pooler(c, name="pooler")(x) if has_pooler else None


class EncoderForSequenceClassification(nn.Module):
  """``model.apply({"params": params}, input_ids, attention_mask, token_type_ids, deterministic=True)``
  returns logits of shape ``[batch, num_labels]`` (``num_labels == 1``: regression scores).

  ``attention_mask`` and ``token_type_ids`` default to all ones / all zeros.
  With ``deterministic=False`` dropout is on and needs a ``"dropout"`` rng.
  Usually built by :func:`childtuning_jax.models.load_pretrained`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from childtuning_jax.models import EncoderConfig, EncoderForSequenceClassification
    >>> config = EncoderConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
    ...                        num_attention_heads=4, intermediate_size=64, num_labels=2)
    >>> model = EncoderForSequenceClassification(config)
    >>> ids = jnp.array([[2, 17, 45, 3, 0]])
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> logits = model.apply({"params": params}, ids, attention_mask=(ids > 0).astype(jnp.int32),
    ...                      deterministic=False, rngs={"dropout": jax.random.key(1)})
    >>> logits.shape, sorted(params)
    ((1, 2), ['bert', 'classifier'])
  """

  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
    c = self.config
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    sequence, pooled = EncoderModel(c, name=c.model_type)(
        input_ids, attention_mask, token_type_ids, deterministic)
    _, head = _ARCHITECTURES[c.model_type]
    if head == "pooler":
      pooled = _dropout(c, c.classifier_dropout_rate)(pooled, deterministic)
      logits = _dense(c, c.num_labels, "classifier")(pooled)
    else:
      logits = ClassificationHead(c, activation=head, name="classifier")(sequence[:, 0],
                                                                        deterministic)
    return logits.astype(jnp.float32)  # the loss in float32, also under dtype="bfloat16"


  @property
  def word_embeddings_path(self) -> str:
    """The word-embedding table's path in the parameters (for ``estimate_fisher``'s
    ``embedding_lookups={model.word_embeddings_path: "input_ids"}``)."""
    return f"{self.config.model_type}/embeddings/word_embeddings/embedding"

  def perturbations(self, row_offsets: dict) -> dict:
    """The ``"perturbations"`` collection that adds ``row_offsets[word_embeddings_path]``
    (``[batch, length, hidden]``) to the looked-up word embeddings."""
    return {self.config.model_type: {"embeddings": {WORD_ROWS: row_offsets[self.word_embeddings_path]}}}


class ClassificationHead(nn.Module):
  """RoBERTa's and ELECTRA's head: dropout -> dense -> activation (tanh; ELECTRA: GELU)
  -> dropout -> out_proj, on the first token."""

  config: EncoderConfig
  activation: str = "tanh"

  @nn.compact
  def __call__(self, x, deterministic):
    c = self.config
    dropout = _dropout(c, c.classifier_dropout_rate)
    activation = jnp.tanh if self.activation == "tanh" else _ACTIVATIONS[self.activation]
    x = activation(_dense(c, c.hidden_size, "dense")(dropout(x, deterministic)))
    return _dense(c, c.num_labels, "out_proj")(dropout(x, deterministic))

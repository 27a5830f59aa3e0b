"""The methods the paper compares Child-Tuning with (§4.1), as plug-ins of the trainer.

Each method is one function of the run's :class:`Context` that returns the
:class:`Pieces` it adds when its flag is set (``None`` otherwise): optax
transforms before gradient clipping (a loss term's gradient) or after the
optimizer, a fixed mask for the optimizer, or a wrapper of the loss. The
optimizer and the loss are then assembled from the pieces of every chosen
method (``train.trainer.optimizer``, :func:`wrap_loss`), and the pretrained
weights, where a method needs them, are one copy in the train state that the
step passes to the loss and to the optimizer (``pretrained=``). The math lives
in ``childtuning_jax.regularizers``; adding a method is one function here,
listed in :data:`METHODS`, and its flags in ``train/arguments.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax

from childtuning_jax import regularizers

# loss(params, batch, dropout_key, pretrained) -> (mean loss, logits)
Loss = Callable[[Any, dict, jax.Array, Any], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method may build on."""

  args: Any  # TrainingArguments
  model: Any  # the encoder (an EncoderForSequenceClassification)
  params: Any  # the initial (pretrained) parameters
  schedule: optax.Schedule
  from_checkpoint: Callable[[str], bool]  # whether a leaf (by path name) was pretrained
  logits: Callable  # logits(params, batch, dropout_key, row_offsets=None)


@dataclasses.dataclass(frozen=True)
class Pieces:
  """What one method adds to a run."""

  before_clipping: tuple[optax.GradientTransformation, ...] = ()
  after_optimizer: tuple[optax.GradientTransformation, ...] = ()
  mask: Any = None  # a fixed child network for the optimizer (trains only where True)
  wrap_loss: Callable[[Loss], Loss] | None = None
  needs_pretrained: bool = False  # the step passes w0 to the transforms and the loss


def decay_to_pretrained(context: Context) -> Pieces | None:
  """Weight decay toward the pretrained weights: the gradient of λ‖w − w0‖², before clipping."""
  strength = context.args.decay_to_pretrained
  if strength <= 0:
    return None
  pull = regularizers.decay_to_pretrained(strength, where=context.from_checkpoint)
  return Pieces(before_clipping=(pull,), needs_pretrained=True)


def recadam(context: Context) -> Pieces | None:
  """RecAdam's annealed pull toward w0, after AdamW (outside Adam's moments, as its code)."""
  args = context.args
  if args.recadam_k is None:
    return None
  pull = regularizers.recadam(None, context.schedule, k=args.recadam_k, t0=args.recadam_t0,
                              strength=args.recadam_strength, where=context.from_checkpoint)
  return Pieces(after_optimizer=(pull,), needs_pretrained=True)


def top_k_tuning(context: Context) -> Pieces | None:
  """Top-K tuning: a fixed mask of the top K encoder layers, the pooler and the head."""
  if context.args.top_k_layers is None:
    return None
  return Pieces(mask=regularizers.top_layers_mask(context.params, context.args.top_k_layers))


def mixout(context: Context) -> Pieces | None:
  """Mixout: the forward pass sees pretrained weight matrices mixed into the current ones."""
  rate = context.args.mixout_p
  if rate <= 0:
    return None
  where = lambda name: name.endswith("/kernel") and context.from_checkpoint(name)

  def wrap(loss: Loss) -> Loss:
    def mixed(params, batch, dropout_key, pretrained):
      params = regularizers.mixout(params, pretrained, rate, jax.random.fold_in(dropout_key, 1),
                                   where=where)
      return loss(params, batch, dropout_key, pretrained)
    return mixed
  return Pieces(wrap_loss=wrap, needs_pretrained=True)


def r3f(context: Context) -> Pieces | None:
  """R3F: λ·KL_S(f(x) ‖ f(x + z)), z noise on the input word embeddings."""
  args, model = context.args, context.model
  if args.r3f_sigma <= 0:
    return None
  width = model.config.embedding_size or model.config.hidden_size

  def wrap(loss: Loss) -> Loss:
    def penalised(params, batch, dropout_key, pretrained):
      value, logits = loss(params, batch, dropout_key, pretrained)
      noise = regularizers.r3f_noise(jax.random.fold_in(dropout_key, 2),
                                     batch["input_ids"].shape + (width,), args.r3f_sigma,
                                     args.r3f_noise)
      noisy = context.logits(params, batch, jax.random.fold_in(dropout_key, 3),
                             row_offsets={model.word_embeddings_path: noise})
      return value + args.r3f_lambda * regularizers.symmetric_kl(logits, noisy), logits
    return penalised
  return Pieces(wrap_loss=wrap)


# Every method, in the order its loss wrapper applies (the innermost first): R3F's noisy pass
# uses the parameters Mixout gives it.
METHODS: tuple[Callable[[Context], Pieces | None], ...] = (
    decay_to_pretrained, recadam, top_k_tuning, r3f, mixout)


def chosen(context: Context) -> list[Pieces]:
  """The pieces of every method the flags turn on."""
  return [pieces for method in METHODS if (pieces := method(context)) is not None]


def wrap_loss(loss: Loss, pieces: list[Pieces]) -> Loss:
  for piece in pieces:
    if piece.wrap_loss is not None:
      loss = piece.wrap_loss(loss)
  return loss

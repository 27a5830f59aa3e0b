"""Flax BERT/RoBERTa sequence classifiers that load Hugging Face checkpoints."""

from childtuning_jax.models.encoder import EncoderConfig, EncoderForSequenceClassification
from childtuning_jax.models.loading import (embedded_model_path, load_config, load_pretrained,
                                            resolve_checkpoint)

__all__ = ["EncoderConfig", "EncoderForSequenceClassification", "embedded_model_path",
           "load_config", "load_pretrained", "resolve_checkpoint"]

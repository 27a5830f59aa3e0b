"""Flax BERT/RoBERTa/ELECTRA sequence classifiers that load and save Hugging Face checkpoints."""

from childtuning_jax.models.encoder import EncoderConfig, EncoderForSequenceClassification
from childtuning_jax.models.loading import (embedded_model_path, load_config, load_pretrained,
                                            resolve_checkpoint)
from childtuning_jax.models.saving import save_pretrained

__all__ = ["EncoderConfig", "EncoderForSequenceClassification", "embedded_model_path",
           "load_config", "load_pretrained", "resolve_checkpoint", "save_pretrained"]

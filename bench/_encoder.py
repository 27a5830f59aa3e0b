"""A BERT-shaped Flax Linen encoder classifier, for speed measurements only.

Same parameter shapes and operations as BERT (token/position/type embeddings,
post-LayerNorm blocks with GELU feed-forward, tanh pooler, classifier), with
random weights. The Hugging Face-compatible models live in the library.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_positions: int = 512
  num_labels: int = 2
  dropout: float = 0.1


MINILM_L6 = EncoderConfig()  # all-MiniLM-L6-v2: 22.7M parameters
BERT_BASE = EncoderConfig(hidden_size=768, num_layers=12, intermediate_size=3072)  # 109M


class _Block(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, x, attention_mask, deterministic):
    c = self.config
    attention = nn.MultiHeadDotProductAttention(
        num_heads=c.num_heads, dropout_rate=c.dropout, deterministic=deterministic, name="attention")
    mask = nn.make_attention_mask(jnp.ones(x.shape[:2], bool), attention_mask.astype(bool))
    h = attention(x, x, mask=mask)
    x = nn.LayerNorm(epsilon=1e-12, name="attention_norm")(
        x + nn.Dropout(c.dropout)(h, deterministic))
    h = nn.gelu(nn.Dense(c.intermediate_size, name="intermediate")(x), approximate=False)
    h = nn.Dense(c.hidden_size, name="output")(h)
    return nn.LayerNorm(epsilon=1e-12, name="output_norm")(
        x + nn.Dropout(c.dropout)(h, deterministic))


class EncoderClassifier(nn.Module):
  config: EncoderConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, deterministic=True):
    c = self.config
    positions = jnp.arange(input_ids.shape[1])[None]
    x = (nn.Embed(c.vocab_size, c.hidden_size, name="word_embeddings")(input_ids)
         + nn.Embed(c.max_positions, c.hidden_size, name="position_embeddings")(positions)
         + nn.Embed(2, c.hidden_size, name="token_type_embeddings")(jnp.zeros_like(input_ids)))
    x = nn.Dropout(c.dropout)(nn.LayerNorm(epsilon=1e-12, name="embeddings_norm")(x), deterministic)
    for i in range(c.num_layers):
      x = _Block(c, name=f"layer_{i}")(x, attention_mask, deterministic)
    pooled = jnp.tanh(nn.Dense(c.hidden_size, name="pooler")(x[:, 0]))
    pooled = nn.Dropout(c.dropout)(pooled, deterministic)
    return nn.Dense(c.num_labels, name="classifier")(pooled)


def init_params(config: EncoderConfig, seed: int = 0):
  model = EncoderClassifier(config)
  ids = jnp.zeros((1, 8), jnp.int32)
  return model, jax.jit(model.init)(jax.random.key(seed), ids, jnp.ones_like(ids))["params"]


def classification_loss(model, params, batch, dropout_key=None):
  """Mean cross-entropy; dropout on when a key is given."""
  logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                       deterministic=dropout_key is None,
                       rngs=None if dropout_key is None else {"dropout": dropout_key})
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(log_probs, batch["labels"][:, None], axis=1))

"""The Flax encoders against PyTorch transformers, and checkpoint loading."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as flax_linen
from flax import traverse_util

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from childtuning_jax.models import EncoderConfig, load_pretrained, save_pretrained  # noqa: E402
from childtuning_jax.models import encoder as encoder_module  # noqa: E402
from childtuning_jax.models import matmul as matmul_module  # noqa: E402
from childtuning_jax.models.loading import _flax_path  # noqa: E402

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)


def _torch_model(kind, num_labels, seed=0, **overrides):
  torch.manual_seed(seed)
  if kind == "bert":
    config = transformers.BertConfig(**TINY, num_labels=num_labels, **overrides)
    return transformers.BertForSequenceClassification(config).eval()
  if kind == "mpnet":  # relative-position attention bias, no token types
    config = transformers.MPNetConfig(**{**TINY, **overrides}, num_labels=num_labels)
    return transformers.MPNetForSequenceClassification(config).eval()
  if kind == "electra":  # embeddings narrower than the hidden size, as ELECTRA-small
    config = transformers.ElectraConfig(**TINY, embedding_size=16, num_labels=num_labels,
                                        **overrides)
    return transformers.ElectraForSequenceClassification(config).eval()
  config = transformers.RobertaConfig(**TINY, num_labels=num_labels, pad_token_id=1,
                                      type_vocab_size=1, layer_norm_eps=1e-5, **overrides)
  return transformers.RobertaForSequenceClassification(config).eval()


def _padded_batch(kind):
  rng = np.random.default_rng(0)
  lengths = [12, 7, 3]
  pad = 1 if kind in ("roberta", "mpnet") else 0
  ids = np.full((3, 12), pad, np.int64)
  mask = np.zeros((3, 12), np.int64)
  types = np.zeros((3, 12), np.int64)
  for row, n in enumerate(lengths):
    ids[row, :n] = rng.integers(5, TINY["vocab_size"], n)
    mask[row, :n] = 1
    if kind not in ("roberta", "mpnet"):
      types[row, n // 2:n] = 1  # a sentence pair
  return ids, mask, types


def _compare(kind, model, params, torch_model):
  ids, mask, types = _padded_batch(kind)
  inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
  if kind != "mpnet":
    inputs["token_type_ids"] = torch.tensor(types)
  with torch.no_grad():
    want = torch_model(**inputs).logits.numpy()
  got = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                    jnp.asarray(types, jnp.int32), deterministic=True)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  return got


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra", "mpnet"])
@pytest.mark.parametrize("num_labels", [3, 1])
def test_logits_match_pytorch_transformers(tmp_path, kind, num_labels):
  torch_model = _torch_model(kind, num_labels)
  torch_model.save_pretrained(tmp_path)
  assert (tmp_path / "model.safetensors").exists()
  model, params, info = load_pretrained(tmp_path, num_labels, output_loading_info=True)
  assert info["missing_keys"] == [] and info["mismatched_keys"] == []
  _compare(kind, model, params, torch_model)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_pytorch_bin_checkpoint(tmp_path, kind):
  torch_model = _torch_model(kind, 2, seed=1)
  torch_model.save_pretrained(tmp_path)  # transformers 5 writes safetensors only
  (tmp_path / "model.safetensors").unlink()
  torch.save(torch_model.state_dict(), tmp_path / "pytorch_model.bin")
  model, params = load_pretrained(tmp_path, 2)
  _compare(kind, model, params, torch_model)


def test_old_gamma_beta_layer_norm_names(tmp_path):
  from safetensors.numpy import save_file

  torch_model = _torch_model("bert", 2, seed=2)
  torch_model.save_pretrained(tmp_path)
  state = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                        "LayerNorm.beta"):
           tensor.numpy() for name, tensor in torch_model.state_dict().items()}
  assert any(name.endswith("gamma") for name in state)
  save_file(state, str(tmp_path / "model.safetensors"))
  model, params, info = load_pretrained(tmp_path, 2, output_loading_info=True)
  assert info["missing_keys"] == []
  _compare("bert", model, params, torch_model)


def test_base_model_checkpoint_gets_a_fresh_head_and_reports_it(tmp_path):
  torch.manual_seed(0)
  base = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
  base.save_pretrained(tmp_path)
  model, params, info = load_pretrained(tmp_path, 4, output_loading_info=True)
  assert info["missing_keys"] == ["classifier/bias", "classifier/kernel"]
  np.testing.assert_array_equal(
      params["bert"]["encoder"]["layer_1"]["attention"]["self"]["query"]["kernel"],
      base.encoder.layer[1].attention.self.query.weight.detach().numpy().T)
  assert params["classifier"]["kernel"].shape == (32, 4)
  # The fresh head is a whole model.init's with the same seed (only the head is computed),
  # a normal(0.02) draw, and seeded.
  whole = jax.jit(model.init)(jax.random.key(5), jnp.zeros((1, 8), jnp.int32))["params"]
  _, reseeded = load_pretrained(tmp_path, 4, seed=5)
  np.testing.assert_array_equal(reseeded["classifier"]["kernel"], whole["classifier"]["kernel"])
  np.testing.assert_array_equal(reseeded["classifier"]["bias"], np.zeros(4))
  assert 0.01 < float(jnp.std(reseeded["classifier"]["kernel"])) < 0.03
  assert not np.array_equal(reseeded["classifier"]["kernel"], params["classifier"]["kernel"])


def test_head_for_another_label_count_is_reinitialised(tmp_path):
  _torch_model("bert", 3).save_pretrained(tmp_path)
  _, params, info = load_pretrained(tmp_path, 2, output_loading_info=True)
  assert len(info["mismatched_keys"]) == 2 and params["classifier"]["kernel"].shape == (32, 2)


def test_unused_tensors_are_reported(tmp_path):
  torch.manual_seed(0)
  transformers.BertForMaskedLM(transformers.BertConfig(**TINY)).save_pretrained(tmp_path)
  _, _, info = load_pretrained(tmp_path, 2, output_loading_info=True)
  assert any(name.startswith("cls.predictions") for name in info["unexpected_keys"])


def test_dropout_needs_rng_and_is_reproducible(tmp_path):
  _torch_model("bert", 2).save_pretrained(tmp_path)
  model, params = load_pretrained(tmp_path, 2)
  ids, mask, types = (jnp.asarray(x, jnp.int32) for x in _padded_batch("bert"))
  run = lambda seed: model.apply({"params": params}, ids, mask, types, deterministic=False,
                                 rngs={"dropout": jax.random.key(seed)})
  clean = model.apply({"params": params}, ids, mask, types)
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), clean) and not np.allclose(run(0), run(1))


def test_hash_dropout_keeps_one_minus_rate_independently_and_rescales():
  from childtuning_jax.models.encoder import Dropout

  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 12, 128)), jnp.float32)
  apply = lambda seed, rate=0.1: Dropout(rate).apply({}, x, deterministic=False,
                                                     rngs={"dropout": jax.random.key(seed)})
  y = np.asarray(apply(0))
  kept = y != 0
  n = kept.size
  assert abs(kept.mean() - 0.9) < 4 * np.sqrt(0.09 / n)
  np.testing.assert_allclose(y[kept], np.asarray(x)[kept] / np.float32(0.9), rtol=1e-6)
  # No structure along any axis: per-slice keep counts spread like independent draws,
  # and neighbouring decisions are uncorrelated.
  for axis in range(3):
    per_slice = kept.mean(axis=tuple(a for a in range(3) if a != axis))
    size = n // kept.shape[axis]
    assert per_slice.std() < 2 * np.sqrt(0.09 / size) + 1e-3
  for axis in range(3):
    a, b = np.moveaxis(kept, axis, 0)[:-1].ravel(), np.moveaxis(kept, axis, 0)[1:].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 4 / np.sqrt(a.size)
  np.testing.assert_array_equal(apply(0), y)
  assert not np.array_equal(apply(1), y)
  np.testing.assert_array_equal(Dropout(0.1).apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(apply(0, rate=1.0), np.zeros_like(x))
  np.testing.assert_array_equal(apply(0, rate=0.0), x)


def test_one_dropout_module_called_twice_draws_two_masks():
  # RoBERTa's head applies its dropout module twice; nn.Dropout draws a new mask per call.
  import flax.linen as nn

  from childtuning_jax.models.encoder import Dropout

  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      dropout = Dropout(0.5)
      return dropout(x, False), dropout(x, False)

  first, second = Twice().apply({}, jnp.ones((4096,)), rngs={"dropout": jax.random.key(0)})
  assert not np.array_equal(first, second)


def test_random_bits_past_two_to_the_32_entries_use_the_second_counter_word(monkeypatch):
  from childtuning_jax import _random

  key = jax.random.key(3)
  small = np.asarray(_random.random_uint32(key, (4, 30)))
  monkeypatch.setattr(_random, "RANDOM_LEVELS", 64)  # pretend 120 entries overflow a counter
  wide = np.asarray(_random.random_uint32(key, (4, 30)))
  np.testing.assert_array_equal(wide[0], small[0, :30])  # row 0: same counters, high word 0
  assert len(set(wide.ravel().tolist())) == 120  # rows differ through the high word
  with pytest.raises(ValueError, match="too large"):
    _random.random_uint32(key, (200,))


def test_missing_files_and_offline_hub_name_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", **TINY}))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_pretrained(tmp_path)
  with pytest.raises(OSError, match="pass the path of a local checkpoint directory"):
    load_pretrained("some-user/not-a-local-directory")


def test_config_refuses_unsupported_settings():
  with pytest.raises(ValueError, match="model_type 'gpt2'"):
    EncoderConfig(model_type="gpt2")
  with pytest.raises(ValueError, match="hidden_act"):
    EncoderConfig(hidden_act="mish")


def test_embedded_minilm_matches_pytorch_and_tokenises_offline():
  from childtuning_jax.models import embedded_model_path

  path = embedded_model_path()
  model, params, info = load_pretrained(path, 2, output_loading_info=True)
  assert info["missing_keys"] == ["classifier/bias", "classifier/kernel"]
  assert info["unexpected_keys"] in ([], ["embeddings.position_ids"])
  n = sum(x.size for x in jax.tree.leaves(params))
  assert 22_500_000 < n < 22_800_000

  tokenizer = transformers.AutoTokenizer.from_pretrained(path)
  encoded = tokenizer(["a gripping, beautifully acted film", "dull"], ["", "and far too long"],
                      padding="max_length", truncation=True, max_length=16, return_tensors="np")
  assert encoded["input_ids"].shape == (2, 16)
  assert tokenizer.unk_token_id not in encoded["input_ids"][0, 1:5]  # the vocabulary is used

  torch_base = transformers.BertModel.from_pretrained(path).eval()
  with torch.no_grad():
    pooled = torch_base(**{k: torch.tensor(v) for k, v in encoded.items()}).pooler_output.numpy()
  kernel, bias = (np.asarray(params["classifier"][k]) for k in ("kernel", "bias"))
  got = model.apply({"params": params}, *(jnp.asarray(encoded[k], jnp.int32)
                                          for k in ("input_ids", "attention_mask", "token_type_ids")))
  np.testing.assert_allclose(np.asarray(got), pooled @ kernel + bias, atol=1e-4)


def test_electra_discriminator_checkpoint_loads_the_encoder_and_reports_its_head(tmp_path):
  torch.manual_seed(3)
  config = transformers.ElectraConfig(**TINY, embedding_size=16)
  transformers.ElectraForPreTraining(config).eval().save_pretrained(tmp_path)
  model, params, info = load_pretrained(tmp_path, 2, output_loading_info=True)
  assert sorted(info["missing_keys"]) == ["classifier/dense/bias", "classifier/dense/kernel",
                                          "classifier/out_proj/bias", "classifier/out_proj/kernel"]
  assert info["unexpected_keys"] and all(k.startswith("discriminator_predictions.")
                                         for k in info["unexpected_keys"])
  assert params["electra"]["embeddings_project"]["kernel"].shape == (16, 32)


@pytest.mark.parametrize("kind", ["bert", "roberta", "mpnet"])
def test_gradients_match_pytorch_transformers(tmp_path, kind, monkeypatch):
  """Every parameter's gradient against PyTorch's backward pass: the encoder's dense layers
  have a hand-written backward pass (childtuning_jax/models/matmul.py), which this tiny batch
  takes when the row threshold is lowered to 1."""
  monkeypatch.setattr(matmul_module, "MIN_ROWS", 1)
  torch_model = _torch_model(kind, 3, seed=2)
  torch_model.save_pretrained(tmp_path)
  model, params = load_pretrained(tmp_path, 3)
  ids, mask, types = _padded_batch(kind)
  labels = np.array([0, 2, 1])
  torch_model.zero_grad()
  types_in = {} if kind == "mpnet" else {"token_type_ids": torch.tensor(types)}
  torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **types_in,
              labels=torch.tensor(labels)).loss.backward()
  want = {name: p.grad.numpy() for name, p in torch_model.named_parameters() if p.grad is not None}

  def loss(params):
    logits = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32),
                         jnp.asarray(types, jnp.int32), deterministic=True)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], 1).mean()

  got = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params), sep="/")
  compared = 0
  for torch_name, w in want.items():
    path = _flax_path(torch_name, got)  # the checkpoint loader's name mapping
    assert path is not None, torch_name
    g = np.asarray(got[path])
    w = w.T if path.endswith("/kernel") else w
    assert g.shape == w.shape, torch_name
    np.testing.assert_allclose(g, w, atol=1e-5 + 1e-3 * np.abs(w).max(), rtol=1e-3, err_msg=torch_name)
    compared += 1
  assert compared >= 2 * 16 + 4, compared


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra", "mpnet"])
@pytest.mark.parametrize("num_labels", [3, 1])
def test_save_pretrained_gives_pytorch_transformers_the_same_logits(tmp_path, kind, num_labels):
  """Trained parameters (every leaf moved from the checkpoint's) written by save_pretrained
  load into transformers' *ForSequenceClassification with our logits, and back into ours."""
  _torch_model(kind, num_labels).save_pretrained(tmp_path / "pretrained")
  model, params = load_pretrained(tmp_path / "pretrained", num_labels)
  rng = np.random.default_rng(1)
  trained = jax.tree.map(lambda x: x + 0.05 * jnp.asarray(rng.normal(size=x.shape), x.dtype),
                         params)
  save_pretrained(tmp_path / "tuned", model, trained)
  torch_model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
      tmp_path / "tuned", output_loading_info=True)
  assert type(torch_model).__name__.lower().startswith(kind)
  assert all(not keys for keys in info.values()), info
  assert torch_model.config.num_labels == num_labels
  torch_model.eval()
  _compare(kind, model, trained, torch_model)
  _, again = load_pretrained(tmp_path / "tuned", num_labels)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(a, b)


def test_save_pretrained_refuses_parameters_of_another_model(tmp_path):
  _torch_model("bert", 2).save_pretrained(tmp_path / "pretrained")
  model, params = load_pretrained(tmp_path / "pretrained", 2)
  with pytest.raises(ValueError, match=r"not the parameters of this bert model: unexpected "
                     r"\['extra/kernel'\], missing \[\], other shapes \[\]"):
    save_pretrained(tmp_path / "out", model, {**params, "extra": {"kernel": jnp.ones((2, 2))}})
  head = {**params, "classifier": {"kernel": jnp.ones((32, 5)), "bias": jnp.ones(5)}}
  with pytest.raises(ValueError, match=r"classifier/kernel \(32, 5\) vs \(32, 2\)"):
    save_pretrained(tmp_path / "out", model, head)
  assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("backend, dropout, backward", [
    ("cpu", "hash", "transposed_copy"), ("gpu", "flax", "jax"), ("cuda", "flax", "jax"),
    ("rocm", "flax", "jax"), ("tpu", "flax", "jax")])
def test_speed_path_defaults_follow_the_backend(backend, dropout, backward):
  assert EncoderConfig().resolved_speed_paths(backend) == {"dropout_impl": dropout,
                                                           "dense_backward": backward}
  explicit = EncoderConfig(dropout_impl="flax", dense_backward="transposed_copy")
  assert explicit.resolved_speed_paths(backend) == {"dropout_impl": "flax",
                                                    "dense_backward": "transposed_copy"}
  with pytest.raises(ValueError, match=r"dropout_impl must be one of \['auto', 'hash', 'flax'\]"):
    EncoderConfig(dropout_impl="fast")


def test_every_speed_path_setting_computes_the_same_function(tmp_path):
  """Deterministic logits and every parameter's gradient agree across the four settings;
  in training, both dropouts keep 1 - rate of the entries, scaled by 1 / (1 - rate)."""
  _torch_model("bert", 3).save_pretrained(tmp_path)
  ids, mask, types = (jnp.asarray(a, jnp.int32) for a in _padded_batch("bert"))
  labels = jnp.array([0, 2, 1])
  results = {}
  for dropout in ("hash", "flax"):
    for backward in ("transposed_copy", "jax"):
      model, params = load_pretrained(tmp_path, 3, dropout_impl=dropout, dense_backward=backward)

      def loss(params):
        logits = model.apply({"params": params}, ids, mask, types, deterministic=True)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels])
      results[dropout, backward] = jax.value_and_grad(loss)(params)
      train_mode = model.apply({"params": params}, ids, mask, types, deterministic=False,
                               rngs={"dropout": jax.random.key(0)})
      assert np.all(np.isfinite(np.asarray(train_mode)))
  (value, grads), *others = results.values()
  for other_value, other_grads in others:
    np.testing.assert_allclose(other_value, value, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(other_grads), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  x = jnp.ones((200, 200))
  for module in (flax_linen.Dropout(0.25), encoder_module.Dropout(0.25)):
    y = np.asarray(module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}))
    np.testing.assert_allclose(np.unique(y), [0.0, 4 / 3], rtol=1e-6)
    assert abs(float((y == 0).mean()) - 0.25) < 0.01


@pytest.mark.parametrize("kind, dropout", [("bert", "hash"), ("mpnet", "flax")])
def test_gradient_checkpointing_computes_the_same_loss_gradients_and_dropout(tmp_path, kind,
                                                                             dropout):
  """With dropout on (the same key), the recomputed layers give the same loss and the same
  gradient of every parameter: the backward pass's second forward draws the same dropout."""
  _torch_model(kind, 3).save_pretrained(tmp_path)
  ids, mask, types = (jnp.asarray(a, jnp.int32) for a in _padded_batch(kind))
  labels = jnp.array([0, 2, 1])
  results = []
  for checkpointing in (False, True):
    model, params = load_pretrained(tmp_path, 3, dropout_impl=dropout,
                                    gradient_checkpointing=checkpointing)

    def loss(params):
      logits = model.apply({"params": params}, ids, mask, types, deterministic=False,
                           rngs={"dropout": jax.random.key(7)})
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels])
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (value, grads), (remat_value, remat_grads) = results
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  assert jax.tree.structure(remat_grads) == jax.tree.structure(grads)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_keeps_only_the_layers_inputs_for_the_backward_pass():
  """What the forward pass keeps for the backward pass (the residuals of ``jax.vjp``, beside
  the parameters): every layer's activations without checkpointing, each layer's input with
  it. (What a compiler makes of it is its own matter: XLA's TPU compiler keeps the
  recomputation apart, XLA's CPU compiler merges most of it back; BENCHMARKS.md.)"""
  ids = jnp.ones((8, 64), jnp.int32)
  kept = {}
  for checkpointing in (False, True):
    config = EncoderConfig(vocab_size=500, hidden_size=64, num_hidden_layers=4,
                           num_attention_heads=4, intermediate_size=256,
                           gradient_checkpointing=checkpointing)
    model = encoder_module.EncoderForSequenceClassification(config)
    params = model.init(jax.random.key(0), ids)["params"]
    loss = lambda p: model.apply({"params": p}, ids, deterministic=False,
                                 rngs={"dropout": jax.random.key(0)}).sum()
    _, backward = jax.vjp(loss, params)
    weights = {id(leaf) for leaf in jax.tree.leaves(params)}
    kept[checkpointing] = sum(leaf.nbytes for leaf in jax.tree.leaves(backward)
                              if id(leaf) not in weights and hasattr(leaf, "nbytes"))
  layer_input = 8 * 64 * 64 * 4  # batch x length x hidden, float32
  assert kept[False] > 4 * 10 * layer_input  # attention probabilities, GELU inputs, ...
  assert kept[True] < 4 * 2 * layer_input + kept[False] / 20, kept


def test_the_jax_backward_allows_forward_mode(tmp_path):
  _torch_model("bert", 2).save_pretrained(tmp_path)
  ids, mask, types = (jnp.asarray(a, jnp.int32) for a in _padded_batch("bert"))
  model, params = load_pretrained(tmp_path, 2, dense_backward="jax")
  tangent = jax.tree.map(jnp.ones_like, params)
  _, out = jax.jvp(lambda p: model.apply({"params": p}, ids, mask, types), (params,), (tangent,))
  assert out.shape == (3, 2) and np.all(np.isfinite(np.asarray(out)))


def test_mpnet_relative_position_buckets_match_transformers():
  from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

  for length in (1, 9, 64, 200, 514):
    position = torch.arange(length)
    want = MPNetEncoder.relative_position_bucket(position[None, :] - position[:, None])
    np.testing.assert_array_equal(encoder_module.relative_position_buckets(length), want.numpy())


def test_mpnet_longer_than_the_bucket_range_matches_transformers(tmp_path):
  """Positions 130 apart (beyond max_distance 128) and the padding-offset positions."""
  torch_model = _torch_model("mpnet", 2, max_position_embeddings=300)
  torch_model.save_pretrained(tmp_path)
  model, params = load_pretrained(tmp_path, 2)
  ids = np.random.default_rng(0).integers(5, TINY["vocab_size"], (2, 260))
  ids[1, 200:] = 1  # padding
  mask = (ids != 1).astype(np.int64)
  with torch.no_grad():
    want = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got = model.apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside its equations (custom_vjp, pjit...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for inner in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
@pytest.mark.parametrize("backward", ["transposed_copy", "jax"])
def test_bfloat16_multiplies_in_bfloat16_and_keeps_float32_where_it_matters(tmp_path, kind,
                                                                           backward):
  """dtype="bfloat16": every matmul of the forward and backward pass takes bfloat16
  operands; the softmaxes' exp and the forward pass's reductions (LayerNorm, softmax, loss) run
  in float32; the
  parameters and their gradients are float32; the logits stay near float32's."""
  _torch_model(kind, 3).save_pretrained(tmp_path)
  ids, mask, types = (jnp.asarray(a, jnp.int32) for a in _padded_batch(kind))
  labels = jnp.array([0, 2, 1])
  _, params = load_pretrained(tmp_path, 3)
  model, params16 = load_pretrained(tmp_path, 3, dtype="bfloat16", dense_backward=backward)
  assert {leaf.dtype for leaf in jax.tree.leaves(params16)} == {jnp.dtype(jnp.float32)}

  def loss(model, params):
    logits = model.apply({"params": params}, ids, mask, types, deterministic=False,
                         rngs={"dropout": jax.random.key(0)})
    assert logits.dtype == jnp.float32
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(3), labels])
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(model, p)))(params).jaxpr
  dtypes = lambda eqn: {str(v.aval.dtype) for v in eqn.invars if hasattr(v.aval, "dtype")}
  equations = list(_equations(jaxpr))
  dots = [dtypes(e) for e in equations if e.primitive.name == "dot_general"]
  assert len(dots) >= 3 * 6 * TINY["num_hidden_layers"]  # forward and two products backward
  assert all(d == {"bfloat16"} for d in dots), dots
  exps = [dtypes(e) for e in equations if e.primitive.name == "exp"]
  # The forward pass's reductions (the backward's sum bias gradients in bfloat16, as Flax does).
  forward = _equations(jax.make_jaxpr(lambda p: loss(model, p))(params).jaxpr)
  sums = [dtypes(e) for e in forward if e.primitive.name in ("reduce_sum", "reduce_max")]
  # One float32 exp per layer's softmax and one for the loss; GELU's backward (erf's
  # derivative) may exponentiate in bfloat16.
  assert sum(d == {"float32"} for d in exps) >= TINY["num_hidden_layers"] + 1
  assert sums and all(d == {"float32"} for d in sums)
  grads = jax.grad(lambda p: loss(model, p))(params)
  assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
  model32, _ = load_pretrained(tmp_path, 3)
  got = model.apply({"params": params}, ids, mask, types)
  want = model32.apply({"params": params}, ids, mask, types)
  scale = float(jnp.abs(want).max())
  assert float(jnp.abs(got - want).max()) < 0.03 * scale  # bfloat16 keeps 8 bits of mantissa
  assert float(jnp.abs(got - want).max()) > 0  # and it is not float32
  with pytest.raises(ValueError, match="dtype must be one of"):
    EncoderConfig(dtype="float16")

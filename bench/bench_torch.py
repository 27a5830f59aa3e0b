"""JAX (this project) against PyTorch, side by side, on the same model, batch and machine.

The PyTorch side is written here from the paper's Algorithm 1: AdamW whose
gradient is masked before the moments, CT-F with a fresh Bernoulli(p) mask
rescaled by 1/p, CT-D with a fixed mask; and the published code's Fisher
recipe (squared mini-batch gradients, batches of 16), plus per-example
gradients through ``torch.func``. Both sides run the embedded pretrained
all-MiniLM-L6-v2 (PyTorch through ``transformers``' BERT, JAX through
``childtuning_jax.models``), a batch of 32 × 128 tokens, dropout on for
training, gradient clipping at 1.0, and all of the machine's cores. The JAX
training step is the trainer's own (``train.trainer.make_train_step``).

Every JAX variant runs alternately with its PyTorch counterpart in one
process (random order per repetition); a ratio is the median over
repetitions of JAX time / PyTorch time in the same repetition, with a 95%
bootstrap interval. Peak memory is the VmHWM of a process that runs only
that workload.

Run: python bench/bench_torch.py            (about 15 minutes on 2 CPU cores)
     python bench/bench_torch.py --quick    (fewer repetitions, printed only)
     python bench/bench_torch.py --only fisher,peak_memory_mib   (rerun sections into the last
                                                                   full run's results)
"""

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_core import (alternating_times, machine, malloc_of_process,  # noqa: E402
                        malloc_sentence, merge_rerun, paired_ratio, peak_memory_of,
                        trainer_step, update_benchmarks_md)
from childtuning_jax import estimate_fisher  # noqa: E402
from childtuning_jax.cpu import peak_rss_mib, restart_keeping_freed_memory  # noqa: E402
from childtuning_jax.models import embedded_model_path, load_pretrained  # noqa: E402
from train import trainer  # noqa: E402
from train.arguments import TrainingArguments  # noqa: E402

BATCH, SEQ_LEN, RESERVE_P, LR = 32, 128, 0.3, 2e-5
PUBLISHED_FISHER_BATCH = 16
MODES = ("vanilla", "ChildTuning-F", "ChildTuning-D")


# ----------------------------------------------------------------------------- PyTorch side


class ChildTuningAdamW(torch.optim.Optimizer):
  """The paper's Algorithm 1 in PyTorch: mask the gradient, then AdamW (decoupled decay)."""

  def __init__(self, params, lr, *, mode, reserve_p=RESERVE_P, masks=None, betas=(0.9, 0.999),
               eps=1e-6, weight_decay=0.0):
    super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
    self.mode, self.reserve_p, self.masks = mode, reserve_p, masks

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      lr, (b1, b2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
      for p in group["params"]:
        if p.grad is None:
          continue
        g = p.grad
        if self.mode == "ChildTuning-F":  # Eq. 3-5: Bernoulli(p) mask, kept entries × 1/p
          g = g * (torch.rand_like(g) < self.reserve_p) / self.reserve_p
        elif self.mode == "ChildTuning-D":
          g = g * self.masks[p]
        state = self.state[p]
        if not state:
          state["step"], state["m"], state["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
        state["step"] += 1
        m, v, t = state["m"], state["v"], state["step"]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        if decay:
          p.mul_(1 - lr * decay)
        denominator = (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(eps)
        p.addcdiv_(m, denominator, value=-lr / (1 - b1 ** t))


def torch_model():
  import transformers

  model = transformers.BertForSequenceClassification.from_pretrained(embedded_model_path(),
                                                                     num_labels=2)
  return model.train()


def torch_optimizers(model):
  generator = torch.Generator().manual_seed(0)
  masks = {p: (torch.rand(p.shape, generator=generator) < RESERVE_P).float()
           for p in model.parameters()}
  return {"vanilla": torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-6, weight_decay=0.0),
          "ChildTuning-F": ChildTuningAdamW(model.parameters(), LR, mode="ChildTuning-F"),
          "ChildTuning-D": ChildTuningAdamW(model.parameters(), LR, mode="ChildTuning-D",
                                            masks=masks)}


def torch_batch(batch):
  return {name: torch.from_numpy(np.asarray(value, np.int64)) for name, value in batch.items()}


def torch_train_step(model, optimizer, batch):
  optimizer.zero_grad(set_to_none=True)
  logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 token_type_ids=batch["token_type_ids"]).logits
  F.cross_entropy(logits, batch["labels"]).backward()
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  optimizer.step()


def torch_update(model, optimizer):
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  optimizer.step()


def torch_published_fisher(model, batch):
  """The published recipe: squared gradient of each mini-batch of 16, averaged over batches."""
  model.eval()
  fisher = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
  for start in range(0, BATCH, PUBLISHED_FISHER_BATCH):
    part = {k: v[start:start + PUBLISHED_FISHER_BATCH] for k, v in batch.items()}
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                   token_type_ids=part["token_type_ids"]).logits
    F.cross_entropy(logits, part["labels"]).backward()
    for name, p in model.named_parameters():
      fisher[name] += p.grad.square()
  model.train()
  return fisher


def torch_per_example_fisher(model, batch):
  """Per-example squared gradients with torch.func.vmap(grad), the whole batch at once."""
  from torch.func import functional_call, grad, vmap

  model.eval()
  params = {name: p.detach() for name, p in model.named_parameters()}

  def example_loss(params, ids, bias, types, label):
    logits = functional_call(model, params, (), {"input_ids": ids[None], "attention_mask": bias[None],
                                                 "token_type_ids": types[None]}).logits
    return F.cross_entropy(logits, label[None])

  # A ready 4-D additive mask: transformers' own mask building has data-dependent branches
  # that torch.func.vmap refuses.
  bias = (1.0 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min
  grads = vmap(grad(example_loss), in_dims=(None, 0, 0, 0, 0))(
      params, batch["input_ids"], bias, batch["token_type_ids"], batch["labels"])
  model.train()
  return {name: g.square().sum(0) for name, g in grads.items()}


# ----------------------------------------------------------------------------- JAX side


def jax_model():
  return load_pretrained(embedded_model_path(), 2)


def jax_transforms(params):
  mask = jax.tree.map(lambda x: np.random.default_rng(0).random(x.shape) < RESERVE_P, params)
  transforms = {}
  for mode in MODES:
    args = TrainingArguments(output_dir="-", mode=mode, reserve_p=RESERVE_P, learning_rate=LR,
                             weight_decay=0.0, max_grad_norm=1.0)
    transforms[mode] = trainer.optimizer(args, optax.constant_schedule(LR), key=jax.random.key(0),
                                         mask=mask if mode == "ChildTuning-D" else None)
  return transforms


def jax_train_steps(model, params, batch):
  """{mode: a function taking one of the trainer's own steps (bench_core.trainer_step)}."""
  return {mode: trainer_step(model, tx, params, batch, jax.random.key(1))
          for mode, tx in jax_transforms(params).items()}


def jax_updates(params):
  grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)
  updates = {}
  for mode, tx in jax_transforms(params).items():
    def update(params, state, tx=tx):
      u, state = tx.update(grads, state, params)
      return optax.apply_updates(params, u), state
    updates[mode] = (jax.jit(update), tx.init(params))
  return updates


def jax_fisher_fn(model):
  """``fisher(params, batch)``; one loss function for all calls, so its compiled chunk
  functions are reused (``estimate_fisher`` caches them per loss function)."""
  def loss_fn(params, batch, row_offsets=None):
    losses, _ = trainer.per_example_losses(model, params, batch, is_regression=False,
                                           row_offsets=row_offsets)
    return losses.mean()
  return lambda params, batch: estimate_fisher(
      loss_fn, params, [batch], chunk_size=BATCH,
      embedding_lookups={model.word_embeddings_path: "input_ids"})


# ----------------------------------------------------------------------------- measurements


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(SEQ_LEN // 2, SEQ_LEN + 1, BATCH)
  return {"input_ids": rng.integers(1000, 30522, (BATCH, SEQ_LEN)).astype(np.int32),
          "attention_mask": (np.arange(SEQ_LEN)[None] < lengths[:, None]).astype(np.int32),
          "token_type_ids": np.zeros((BATCH, SEQ_LEN), np.int32),
          "labels": rng.integers(0, 2, BATCH).astype(np.int32)}


def pairs(times, names):
  """{mode: JAX-vs-PyTorch paired ratio} for (jax_name, torch_name) pairs."""
  return {label: {"jax": paired_ratio(times[jax_name], times[torch_name]),
                  "torch_median_s": float(np.median(times[torch_name]))}
          for label, (jax_name, torch_name) in names.items()}


def bench_train_step(reps):
  batch, tbatch = make_batch(), torch_batch(make_batch())
  model, params = jax_model()
  tmodel = torch_model()
  optimizers = torch_optimizers(tmodel)
  fns = {}
  for mode, step in jax_train_steps(model, params, jax.device_put(batch)).items():
    fns[f"JAX {mode}"] = step
    fns[f"PyTorch {mode}"] = lambda mode=mode: torch_train_step(tmodel, optimizers[mode], tbatch)
  times = alternating_times(fns, reps)
  return pairs(times, {mode: (f"JAX {mode}", f"PyTorch {mode}") for mode in MODES})


def bench_update(reps):
  _, params = jax_model()
  tmodel = torch_model()
  for p in tmodel.parameters():
    p.grad = torch.full_like(p, 1e-3)
  optimizers = torch_optimizers(tmodel)
  fns, states = {}, {}
  for mode, (update, state) in jax_updates(params).items():
    states[mode] = (params, state)

    def run_jax(mode=mode, update=update):
      states[mode] = update(*states[mode])
      return states[mode]
    fns[f"JAX {mode}"] = run_jax
    fns[f"PyTorch {mode}"] = lambda mode=mode: torch_update(tmodel, optimizers[mode])
  times = alternating_times(fns, reps)
  return pairs(times, {mode: (f"JAX {mode}", f"PyTorch {mode}") for mode in MODES})


def bench_fisher(reps):
  batch = make_batch()
  tbatch = torch_batch(batch)
  model, params = jax_model()
  tmodel = torch_model()
  fisher = jax_fisher_fn(model)
  fns = {"JAX per-example": lambda: fisher(params, batch),
         "PyTorch per-example (torch.func)": lambda: torch_per_example_fisher(tmodel, tbatch),
         "PyTorch published recipe (batches of 16)": lambda: torch_published_fisher(tmodel, tbatch)}
  times = alternating_times(fns, reps)
  return pairs(times, {"JAX per-example vs PyTorch per-example":
                       ("JAX per-example", "PyTorch per-example (torch.func)"),
                       "JAX per-example vs PyTorch published recipe":
                       ("JAX per-example", "PyTorch published recipe (batches of 16)")})


WORKLOADS = ("JAX train step (CT-F)", "PyTorch train step (CT-F)", "JAX per-example Fisher",
             "PyTorch per-example Fisher (torch.func)", "PyTorch published Fisher recipe")


def run_workload(name):
  batch = make_batch()
  for _ in range(2):  # the second time in the memory the first freed (its objects are gone)
    run_workload_once(name, batch)
    gc.collect()
  return peak_rss_mib()


def run_workload_once(name, batch):
  if name == "JAX train step (CT-F)":
    model, params = jax_model()  # only CT-F's step and state, as the PyTorch side
    step = trainer_step(model, jax_transforms(params)["ChildTuning-F"], params,
                        jax.device_put(batch), jax.random.key(1))
    for _ in range(2):  # one step at a time, as the trainer runs them on the CPU (train/loop.py)
      jax.block_until_ready(step())
  elif name == "PyTorch train step (CT-F)":
    model = torch_model()
    torch_train_step(model, torch_optimizers(model)["ChildTuning-F"], torch_batch(batch))
  elif name == "JAX per-example Fisher":
    model, params = jax_model()
    jax.block_until_ready(jax_fisher_fn(model)(params, batch))
  elif name == "PyTorch per-example Fisher (torch.func)":
    torch_per_example_fisher(torch_model(), torch_batch(batch))
  elif name == "PyTorch published Fisher recipe":
    torch_published_fisher(torch_model(), torch_batch(batch))
  else:
    raise ValueError(name)


def render(results):
  m = results["machine"]
  lines = [f"Measured on {m['cpu']}, {m['cores']} cores (PyTorch {results['torch']} with "
           f"{results['torch_threads']} threads; JAX {m['jax']} on {m['backend']}). Command: "
           f"`{results['command']}` ({results['wall_minutes']:.1f} min). The all-MiniLM-L6-v2 "
           f"weights, a batch of {BATCH} × {SEQ_LEN} tokens. Ratio: JAX time / PyTorch time in "
           "the same repetition, median over repetitions, with its 95% bootstrap interval; "
           "below 1 means JAX is faster." + malloc_sentence(results), ""]
  for title, key in (("Full training step (dropout on, clip 1.0, then the mode's AdamW)", "train_step"),
                     ("Optimizer update alone (clip 1.0, mask, AdamW, apply)", "update"),
                     (f"Fisher information over {BATCH} examples (model deterministic)", "fisher")):
    lines += [f"### {title}", "", "| variant | PyTorch | JAX | JAX / PyTorch | 95% interval |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in results[key].items():
      j = r["jax"]
      lines.append(f"| {name} | {r['torch_median_s'] * 1e3:.0f} ms | {j['median_s'] * 1e3:.0f} ms | "
                   f"{j['ratio']:.3f}× | {j['ratio_95ci'][0]:.3f}–{j['ratio_95ci'][1]:.3f} |")
    lines.append("")
  mem = results["peak_memory_mib"]
  lines += ["### Peak memory (resident set of a process running only that workload)", "",
            "| workload | peak RSS |", "| --- | ---: |"]
  lines += [f"| {name} | {v:.0f} MiB |" for name, v in mem.items()]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="few repetitions; print only")
  parser.add_argument("--only", help="comma-separated sections to rerun (update, train_step, "
                      "fisher, peak_memory_mib), merged into the last full run's results")
  parser.add_argument("--workload", help=argparse.SUPPRESS)
  args = parser.parse_args()
  restart_keeping_freed_memory()  # before JAX runs anything (childtuning_jax/cpu.py)
  torch.set_num_threads(os.cpu_count())
  if args.workload:
    print(run_workload(args.workload))
    return
  reps = 3 if args.quick else 10
  start = time.time()
  results = {"machine": machine(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
             "command": "python bench/bench_torch.py" + (" --quick" if args.quick else "")}
  for key, fn in (("update", lambda: bench_update(2 * reps)),
                  ("train_step", lambda: bench_train_step(reps)),
                  ("fisher", lambda: bench_fisher(max(3, reps // 2))),
                  ("peak_memory_mib", lambda: peak_memory_of(__file__, WORKLOADS))):
    if args.only and key not in args.only.split(","):
      continue
    results[key] = fn()
    results.setdefault("malloc", {})[key] = malloc_of_process()
    print(key, json.dumps(results[key], indent=1), flush=True)
  results["wall_minutes"] = (time.time() - start) / 60
  if args.quick:
    return
  out = ROOT / "bench" / "results" / f"torch_{jax.default_backend()}.json"
  if args.only and (results := merge_rerun(out, results, args.only)) is None:
    return
  section = render(results)
  print(section)
  out.write_text(json.dumps(results, indent=1) + "\n")
  update_benchmarks_md(section, jax.default_backend(), name="bench_torch",
                       title="Side by side with PyTorch")


if __name__ == "__main__":
  main()

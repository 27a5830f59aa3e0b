"""Child-Tuning (Xu et al., EMNLP 2021) for JAX, as composable optax transforms.

>>> import optax
>>> from childtuning_jax import child_tuning_free
>>> tx = optax.chain(child_tuning_free(0.3, key=0), optax.adamw(2e-5))
"""

from childtuning_jax.child_delta import apply_child_delta, save_child_delta
from childtuning_jax.fisher import estimate_fisher
from childtuning_jax.masks import (
    keep_fractions,
    load_mask,
    mask_jaccard,
    save_mask,
    select_child_network,
)
from childtuning_jax.transforms import (
    ChildTuningDrivenState,
    ChildTuningFreeState,
    ChildTuningSparseState,
    child_tuning_adamw,
    child_tuning_driven,
    child_tuning_free,
)

__version__ = "0.1.0"

__all__ = [
    "ChildTuningDrivenState",
    "ChildTuningFreeState",
    "ChildTuningSparseState",
    "apply_child_delta",
    "child_tuning_adamw",
    "child_tuning_driven",
    "child_tuning_free",
    "estimate_fisher",
    "keep_fractions",
    "load_mask",
    "mask_jaccard",
    "save_child_delta",
    "save_mask",
    "select_child_network",
]

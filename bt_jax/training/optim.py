"""The pretraining optimizer: AdamW with the reference recipe's groups and schedule.

BridgeTower's training code (METER lineage) uses AdamW with betas (0.9, 0.98)
and eps 1e-8, and a linear warmup then a linear decay to `end_learning_rate`.
It has three parameter groups: the cross-modal part (PyTorch names containing
`cross_modal`) trains at `lr_mult_cross_modal` times the base rate, the task
heads at `lr_mult_head` times, everything else at the base rate. Weight decay
skips parameters whose PyTorch name contains `bias` or names a LayerNorm
(`LayerNorm.weight`, `norm.weight`, `norm1.weight`, `norm2.weight`); CLIP's
`ln_1`, `ln_2`, `ln_pre` and `ln_post` scales therefore do get weight decay,
as in the reference.
"""

from __future__ import annotations

import dataclasses

import jax
import optax
from flax import nnx

from bt_jax.weights.mapping import tensor_mappings

# Substrings of PyTorch parameter names that get no weight decay.
NO_DECAY = (
    "bias",
    "LayerNorm.bias",
    "LayerNorm.weight",
    "norm.bias",
    "norm.weight",
    "norm1.bias",
    "norm1.weight",
    "norm2.bias",
    "norm2.weight",
)
HEAD_MODULES = (
    "vqa_classifier",
    "nlvr2_classifier",
    "snli_classifier",
    "mlm_score",
    "itm_score",
    "itc_text_head",
    "itc_image_head",
    "itc_cross_modal_head",
)
GROUPS = ("base", "cross_modal", "head")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW settings; defaults follow the base pretraining recipe.

    Attributes:
      learning_rate: peak learning rate of the base group.
      end_learning_rate: rate reached at `total_steps`.
      warmup_steps: steps of linear warmup from 0; a float below 1 is a
        fraction of `total_steps`.
      total_steps: length of the schedule.
      weight_decay: decoupled weight decay, skipped for biases and LayerNorms.
      lr_mult_cross_modal, lr_mult_head: learning-rate multipliers.
      grad_clip_norm: clip the global gradient norm to this value (None: no
        clipping, as in the reference).
    """

    learning_rate: float = 1e-5
    end_learning_rate: float = 0.0
    warmup_steps: float = 0.1
    total_steps: int = 100_000
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    lr_mult_cross_modal: float = 5.0
    lr_mult_head: float = 5.0
    grad_clip_norm: float | None = None

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}.")
        if self.warmup_steps < 0 or self.warmup_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps must be in [0, total_steps={self.total_steps}], got "
                f"{self.warmup_steps}."
            )
        if self.learning_rate <= 0:
            raise ValueError(
                f"learning_rate must be positive, got {self.learning_rate}."
            )

    @property
    def warmup(self) -> int:
        """Warmup length in steps."""
        if isinstance(self.warmup_steps, float) and self.warmup_steps < 1:
            return int(self.warmup_steps * self.total_steps)
        return int(self.warmup_steps)


def learning_rate_schedule(config: OptimizerConfig, multiplier: float = 1.0):
    """Linear warmup from 0 to the peak, then linear decay to the end rate."""
    peak = config.learning_rate * multiplier
    end = config.end_learning_rate * multiplier
    warmup = config.warmup
    decay = optax.linear_schedule(peak, end, max(config.total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), decay], boundaries=[warmup]
    )


def parameter_group(torch_key: str) -> str:
    """Return "head", "cross_modal" or "base" for a PyTorch parameter name."""
    name = torch_key.removeprefix("bridgetower.")
    if name.split(".")[0] in HEAD_MODULES:
        return "head"
    if "cross_modal" in name:
        return "cross_modal"
    return "base"


def applies_weight_decay(torch_key: str) -> bool:
    return not any(part in torch_key for part in NO_DECAY)


def parameter_labels(model: nnx.Module) -> nnx.State:
    """Label every parameter "GROUP/decay" or "GROUP/no_decay" for `make_optimizer`."""
    labels = {}
    for mapping in tensor_mappings(model):
        decay = "decay" if applies_weight_decay(mapping.key) else "no_decay"
        labels[mapping.path] = f"{parameter_group(mapping.key)}/{decay}"
    params = nnx.state(model, nnx.Param)
    flat = [(path, labels[tuple(path)]) for path, _ in nnx.to_flat_state(params)]
    return nnx.from_flat_state(flat)


def make_optimizer(config: OptimizerConfig, labels) -> optax.GradientTransformation:
    """Build AdamW with one schedule and decay setting per label of `labels`."""
    multipliers = {
        "base": 1.0,
        "cross_modal": config.lr_mult_cross_modal,
        "head": config.lr_mult_head,
    }
    transforms = {}
    for group in GROUPS:
        for decay in ("decay", "no_decay"):
            transforms[f"{group}/{decay}"] = optax.adamw(
                learning_rate_schedule(config, multipliers[group]),
                b1=config.beta1,
                b2=config.beta2,
                eps=config.eps,
                weight_decay=config.weight_decay if decay == "decay" else 0.0,
            )
    chain = [optax.multi_transform(transforms, labels)]
    if config.grad_clip_norm is not None:
        chain.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
    return optax.chain(*chain)


def group_learning_rates(config: OptimizerConfig, step) -> dict[str, jax.Array]:
    """Return each group's learning rate at `step`, for logging."""
    return {
        "lr": learning_rate_schedule(config)(step),
        "lr_cross_modal": learning_rate_schedule(config, config.lr_mult_cross_modal)(
            step
        ),
        "lr_head": learning_rate_schedule(config, config.lr_mult_head)(step),
    }

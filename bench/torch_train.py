"""bt-jax's pretraining step written in PyTorch with transformers' modules.

`PretrainingModel` is one `BridgeTowerModel` backbone with transformers' MLM,
ITM and ITC heads, so the three heads share one backbone as in bt-jax's
`BridgeTowerForPreTraining`. `PretrainingStep` does the work of
`bt_jax.training.step.Trainer.step` with `ObjectiveConfig()` and
`OptimizerConfig()`:

1. MLM pass: the backbone on `mlm_input_ids`, the MLM head on the text
   features, cross-entropy over the positions whose label is not -100;
2. positive pass: the backbone on `input_ids`, the ITM head on the pooled
   output, and the three L2-normalised ITC embeddings. The ITC loss is the mean
   of the row-wise cross-entropies of the text-image, text-cross and
   image-cross similarities, scaled by exp(logit_scale);
3. negative pass: for each text, an image drawn from the softmax of its ITC
   similarity row, and for each image a text drawn from its column, both
   without gradient and never from the same `record_index`. The backbone then
   runs on the 2 * batch negative pairs and the ITM head scores them. The ITM
   loss is the cross-entropy over the batch positive and 2 * batch negative
   logits;

   with `share_image_encoding` (bt-jax's default), the vision encoder and the
   bridges' image transforms run once on the batch's images, and each pass
   replays their outputs, re-paired for the negatives. Otherwise every pass
   encodes and transforms its images;
4. backward of MLM + ITM + ITC, the global norms of the gradients and of the
   parameters, and one `torch.optim.AdamW` step with bt-jax's parameter groups
   and learning-rate schedule.

The matmuls are those of bt-jax's step, so `bench.flops.train_step_flops`
counts both. The numbers differ from bt-jax's step by step because dropout
masks and the negatives are drawn from other random generators. Unlike
transformers' `BridgeTowerForContrastiveLearning`, the image embedding
transforms only the class token, as bt-jax does.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from transformers.models.bridgetower import modeling_bridgetower as hf

IGNORE_INDEX = -100

# The optimizer rules of bt_jax/training/optim.py, applied to PyTorch parameter
# names. They are copied so that this process does not import JAX.
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


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """The defaults of `bt_jax.training.optim.OptimizerConfig`, which a test checks."""

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

    @property
    def warmup(self) -> int:
        if isinstance(self.warmup_steps, float) and self.warmup_steps < 1:
            return int(self.warmup_steps * self.total_steps)
        return int(self.warmup_steps)

    def schedule_factor(self, step: int) -> float:
        """Return the learning rate at `step` as a fraction of the peak.

        Linear warmup from 0, then linear decay to `end_learning_rate`.
        """
        end = self.end_learning_rate / self.learning_rate
        if step < self.warmup:
            return step / self.warmup
        decay_steps = max(self.total_steps - self.warmup, 1)
        progress = min(step - self.warmup, decay_steps) / decay_steps
        return 1.0 + (end - 1.0) * progress


def parameter_group(name: str) -> str:
    """Return "head", "cross_modal" or "base" for a PyTorch parameter name."""
    name = name.removeprefix("bridgetower.")
    if name.split(".")[0] in HEAD_MODULES:
        return "head"
    if "cross_modal" in name:
        return "cross_modal"
    return "base"


class PretrainingModel(torch.nn.Module):
    """One BridgeTower backbone with transformers' MLM, ITM and ITC heads.

    The attribute names are those of a `python -m convert init-random --head
    mlm+itm+itc` checkpoint, so `from_pretrained` loads it strictly.
    """

    def __init__(self, config: transformers.BridgeTowerConfig):
        super().__init__()
        width = config.hidden_size
        self.bridgetower = hf.BridgeTowerModel(config)
        self.mlm_score = hf.BridgeTowerMLMHead(config)
        self.itm_score = hf.BridgeTowerITMHead(2 * width)
        dim = config.contrastive_hidden_size
        self.itc_text_head = hf.BridgeTowerContrastiveHead(width, dim)
        self.itc_image_head = hf.BridgeTowerContrastiveHead(width, dim)
        self.itc_cross_modal_head = hf.BridgeTowerContrastiveHead(2 * width, dim)
        self.logit_scale = torch.nn.Parameter(
            torch.tensor(config.logit_scale_init_value)
        )
        if config.tie_word_embeddings:
            embeddings = self.bridgetower.text_model.embeddings.word_embeddings
            self.mlm_score.decoder.weight = embeddings.weight

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PretrainingModel:
        """Build the model from a directory's `config.json` and `model.safetensors`."""
        directory = Path(directory)
        config = transformers.BridgeTowerConfig.from_pretrained(directory)
        model = cls(config)
        state = load_file(directory / "model.safetensors")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if config.tie_word_embeddings:
            missing = [k for k in missing if k != "mlm_score.decoder.weight"]
        if missing or unexpected:
            raise ValueError(
                f"{directory} does not match the MLM + ITM + ITC model: missing "
                f"{missing}, unexpected {unexpected}. Write it with `python -m convert "
                "init-random --head mlm+itm+itc`."
            )
        return model

    def backbone(
        self,
        input_ids,
        attention_mask,
        pixel_values=None,
        image_states=None,
        image_transforms=None,
    ):
        """Run the backbone on pixels, or on `encode_images` states (rows re-paired).

        `image_transforms` (from `transform_images`, re-paired like the states)
        replaces the bridges' image transforms.
        """
        if image_states is None:
            return self.bridgetower(
                input_ids=input_ids,
                attention_mask=attention_mask,
                pixel_values=pixel_values,
                output_hidden_states=True,
            )
        # transformers' backbone accepts the patch embeddings but always runs the
        # blocks, so each block is replaced by the replay of its output.
        transformer = self.bridgetower.vision_model.visual.transformer
        blocks = transformer.resblocks
        replays = [_Replay(state) for state in image_states[1:]]
        transformer.resblocks = torch.nn.ModuleList([*replays, *blocks[len(replays) :]])
        if image_transforms is not None:
            # An instance attribute shadows the backbone's method of that name.
            self.bridgetower._apply_image_transform = lambda hidden_states, layer_idx: (
                image_transforms[layer_idx]
            )
        try:
            return self.bridgetower(
                input_ids=input_ids,
                attention_mask=attention_mask,
                # The backbone takes batch-first patch embeddings.
                image_embeds=image_states[0].permute(1, 0, 2),
                output_hidden_states=True,
            )
        finally:
            transformer.resblocks = blocks
            self.bridgetower.__dict__.pop("_apply_image_transform", None)

    def encode_images(self, pixel_values) -> list[torch.Tensor]:
        """Return the patch embeddings and each block output the backbone uses.

        Each is sequence-first, `(tokens, batch, width)`, as the backbone's.
        """
        visual = self.bridgetower.vision_model.visual
        hidden = visual.forward_pre(pixel_values)
        states = [hidden]
        for block in visual.transformer.resblocks[: self._bridged_blocks()]:
            hidden = block(hidden)
            states.append(hidden)
        return states

    def transform_images(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        """Return each cross-modal level's image transform of `encode_images` states.

        Level l transforms the post-normalised output of block split + l, as the
        backbone does. The results are batch-first, `(batch, tokens, width)`.
        """
        backbone = self.bridgetower
        levels = len(backbone.cross_modal_image_layers)
        split = self._bridged_blocks() - levels + 1
        post = backbone.vision_model.visual.forward_post
        return [
            backbone._apply_image_transform(post(states[split + level]), level)
            for level in range(levels)
        ]

    def _bridged_blocks(self) -> int:
        # The backbone runs one vision block per text layer.
        return len(self.bridgetower.text_model.encoder.layer)

    def contrastive_embeds(self, output) -> tuple[torch.Tensor, ...]:
        """Return the (text, image, cross) L2-normalised ITC embeddings of a pass."""
        text_states, image_states, _ = output.hidden_states
        text = F.normalize(self.itc_text_head(text_states[-1][:, 0]), dim=-1)
        # Vision states are sequence-first: (tokens, batch, width). Only the class
        # token is transformed, where transformers' ITC class transforms every token.
        visual = self.bridgetower.vision_model.visual
        image_cls = visual.forward_post(image_states[-1][:1])
        transform = self.bridgetower.cross_modal_image_transform
        if isinstance(transform, torch.nn.ModuleList):
            transform = transform[-1]  # the last vision block is bridged last
        image_type = self.bridgetower.token_type_embeddings.weight[1]
        image_cls = transform(image_cls) + image_type
        image = F.normalize(self.itc_image_head(image_cls[:, 0]), dim=-1)
        cross = F.normalize(self.itc_cross_modal_head(output.pooler_output), dim=-1)
        return text, image, cross

    def head_outputs(self, input_ids, attention_mask, pixel_values) -> np.ndarray:
        """Run every head on one pass and return their outputs as one flat vector.

        The order is MLM logits, ITM logits, then the text, image and cross ITC
        embeddings, as `bench.jax_runner` concatenates bt-jax's outputs.
        """
        output = self.backbone(input_ids, attention_mask, pixel_values)
        parts = [
            self.mlm_score(output.text_features),
            self.itm_score(output.pooler_output),
            *self.contrastive_embeds(output),
        ]
        return np.concatenate([part.detach().numpy().ravel() for part in parts])


class _Replay(torch.nn.Module):
    """Stands in for a vision block and returns that block's saved output."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        return self.output


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return the mean cross-entropy of the labelled positions (0 if there are none)."""
    selected = labels != IGNORE_INDEX
    log_probs = F.log_softmax(logits.float(), dim=-1)
    safe = torch.where(selected, labels, 0)
    picked = log_probs.gather(-1, safe[..., None])[..., 0]
    return -(picked * selected).sum() / selected.sum().clamp(min=1)


def contrastive_loss(text, image, cross, logit_scale) -> torch.Tensor:
    """Return the mean row-wise cross-entropy of the three scaled similarities."""
    scale = logit_scale.exp()
    labels = torch.arange(text.shape[0])
    total = 0.0
    for left, right in ((text, image), (text, cross), (image, cross)):
        total = total + F.cross_entropy(left @ right.T * scale, labels)
    return total / 3.0


def sample_negatives(
    similarity: torch.Tensor, groups: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw an image for each text and a text for each image, as bt-jax's "hard" mode.

    Each draw follows the softmax of the similarity over the members whose
    group differs from the row's own. A row whose group every member shares
    excludes only itself.
    """
    size = similarity.shape[0]
    own = torch.eye(size, dtype=torch.bool)
    excluded = groups[:, None] == groups[None, :]
    excluded = torch.where(excluded.all(dim=-1, keepdim=True), own, excluded)
    masked = similarity.float().masked_fill(excluded, -torch.inf)
    image_for_text = torch.multinomial(masked.softmax(dim=-1), 1, generator=generator)[
        :, 0
    ]
    text_for_image = torch.multinomial(
        masked.T.softmax(dim=-1), 1, generator=generator
    )[:, 0]
    return image_for_text, text_for_image


class PretrainingStep:
    """The MLM + ITM + ITC training step with AdamW of the module docstring."""

    def __init__(
        self,
        model: PretrainingModel,
        settings: OptimizerSettings | None = None,
        seed: int = 0,
        share_image_encoding: bool = True,
    ):
        self.model = model.train()
        self.share_image_encoding = share_image_encoding
        self.settings = settings or OptimizerSettings()
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.AdamW(
            self._parameter_groups(),
            lr=self.settings.learning_rate,
            betas=(self.settings.beta1, self.settings.beta2),
            eps=self.settings.eps,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, self.settings.schedule_factor
        )

    def _parameter_groups(self) -> list[dict]:
        settings = self.settings
        multipliers = {
            "base": 1.0,
            "cross_modal": settings.lr_mult_cross_modal,
            "head": settings.lr_mult_head,
        }
        groups: dict[tuple[str, bool], list] = {}
        for name, param in self.model.named_parameters():
            decay = not any(part in name for part in NO_DECAY)
            groups.setdefault((parameter_group(name), decay), []).append(param)
        return [
            {
                "params": params,
                "lr": settings.learning_rate * multipliers[group],
                "weight_decay": settings.weight_decay if decay else 0.0,
            }
            for (group, decay), params in groups.items()
        ]

    def losses(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Run the three passes and return the total loss and each objective's loss."""
        model = self.model
        ids, mask = batch["input_ids"], batch["attention_mask"]
        pixels = batch["pixel_values"]
        size = ids.shape[0]
        states = transforms = None
        if self.share_image_encoding:
            states = model.encode_images(pixels)
            transforms = model.transform_images(states)

        def images(order=None):
            if states is None:
                return {"pixel_values": pixels if order is None else pixels[order]}
            if order is None:
                return {"image_states": states, "image_transforms": transforms}
            return {
                "image_states": [state[:, order] for state in states],
                "image_transforms": [transform[order] for transform in transforms],
            }

        output = model.backbone(batch["mlm_input_ids"], mask, **images())
        mlm_loss = masked_lm_loss(
            model.mlm_score(output.text_features), batch["mlm_labels"]
        )

        positive = model.backbone(ids, mask, **images())
        positive_logits = model.itm_score(positive.pooler_output)
        text, image, cross = model.contrastive_embeds(positive)
        itc_loss = contrastive_loss(text, image, cross, model.logit_scale)

        with torch.no_grad():
            similarity = text @ image.T * model.logit_scale.exp()
            image_for_text, text_for_image = sample_negatives(
                similarity, batch["record_index"], self.generator
            )
        negative = model.backbone(
            torch.cat([ids, ids[text_for_image]]),
            torch.cat([mask, mask[text_for_image]]),
            **images(torch.cat([image_for_text, torch.arange(size)])),
        )
        logits = torch.cat([positive_logits, model.itm_score(negative.pooler_output)])
        labels = torch.cat(
            [
                torch.ones(size, dtype=torch.long),
                torch.zeros(2 * size, dtype=torch.long),
            ]
        )
        itm_loss = F.cross_entropy(logits.float(), labels)
        loss = mlm_loss + itm_loss + itc_loss
        return loss, {"mlm_loss": mlm_loss, "itm_loss": itm_loss, "itc_loss": itc_loss}

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Run one step on a bt-jax training batch and return the metrics."""
        model = self.model
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = self.losses(batch)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
        )
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            param_norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p) for p in model.parameters()])
            )
        return {
            "loss": loss.item(),
            **{name: value.item() for name, value in metrics.items()},
            "grad_norm": float(grad_norm),
            "param_norm": float(param_norm),
        }

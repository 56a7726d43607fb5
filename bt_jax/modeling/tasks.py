"""Fine-tuning heads of the original BridgeTower repository: VQA, NLVR2, SNLI-VE.

transformers has no class for these heads, so the class names here are
bt-jax's own. Each head keeps the attribute name and layer indices of the
original `nn.Sequential` (`vqa_classifier.0`, `.1`, `.3`), so its parameters
map to the original checkpoint keys one to one. Every head reads the pooled cross-modal
output (the text and image poolers concatenated, `2 * hidden_size` wide):

- VQA: a classifier over the answer vocabulary (`config.id2label`), trained
  with binary cross-entropy against soft scores (`bt_jax.losses.vqa_loss`).
- NLVR2: the sentence goes through the model twice, once with each image; the
  second image gets row 2 of a three-row token-type table. Both pooled outputs
  are concatenated (`4 * hidden_size`) and classified as true or false.
- SNLI-VE: a three-way classifier (see `config.id2label` for the order).

With `config.task_head_layers=2` a head is Linear, LayerNorm, GELU, Linear with
a hidden width of `int(2 * hidden_size * head_hidden_scale)`; with 1 it is one
Linear layer. Head weights start from N(0, 0.02) with zero biases, as the
original initialises new modules.

Retrieval fine-tuning needs no new head: it trains the ITM and ITC heads of
`BridgeTowerForPreTraining` (`heads="itm+itc"`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bt_jax import losses
from bt_jax.config import TASK_HEAD_OUTPUTS, BridgeTowerConfig
from bt_jax.modeling import layers
from bt_jax.modeling.heads import _HeadModel
from bt_jax.modeling.outputs import SequenceClassifierOutput

# Standard deviation of the original repository's initialisation of new modules.
TASK_HEAD_INIT_STD = 0.02


class GELU(nnx.Module):
    """The exact GELU as a layer, so a classifier's layers keep their indices."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return layers.gelu_exact(x)


def classifier(
    in_features: int, outputs: int, config: BridgeTowerConfig, *, param_dtype, rngs
) -> nnx.List:
    """Build a task classifier: [Linear, LayerNorm, GELU, Linear], or [Linear].

    It computes in float32, like the ITM head: it costs nothing next to the
    encoders and keeps bfloat16 runs' scores close to float32.
    """
    kwargs = dict(
        std=TASK_HEAD_INIT_STD, dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs
    )
    if config.task_head_layers == 1:
        return nnx.List(
            [layers.linear(in_features, outputs, ("embed", None), **kwargs)]
        )
    hidden = int(2 * config.hidden_size * config.head_hidden_scale)
    if hidden < 1:
        raise ValueError(
            f"head_hidden_scale={config.head_hidden_scale} gives a classifier "
            f"hidden width of {hidden} for hidden_size {config.hidden_size}; raise "
            "it (2 for VQA and SNLI-VE, 1.5 for NLVR2 in the reference recipes)."
        )
    return nnx.List(
        [
            layers.linear(in_features, hidden, ("embed", "mlp"), **kwargs),
            # The original's nn.LayerNorm keeps PyTorch's default epsilon.
            layers.layer_norm(hidden, 1e-5, param_dtype=param_dtype, rngs=rngs),
            GELU(),
            layers.linear(hidden, outputs, ("mlp", None), **kwargs),
        ]
    )


def _apply(classifier_layers: nnx.List, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    for layer in classifier_layers:
        x = layer(x)
    return x


def task_outputs(config: BridgeTowerConfig, head: str) -> int:
    """Return the classes of a task head, checking `config.id2label` against it.

    Raises:
      ValueError: VQA without `id2label`, or an NLVR2 or SNLI-VE `id2label`
        with the wrong number of classes.
    """
    labels = config.num_labels
    if head == "vqa":
        if labels is None:
            raise ValueError(
                "the VQA head needs its answer vocabulary in config.id2label; set it "
                "with config.replace(id2label=answers), answers in label order."
            )
        return labels
    expected = TASK_HEAD_OUTPUTS[head]
    if labels is not None and labels != expected:
        raise ValueError(
            f"config.id2label has {labels} classes but the {head} head has "
            f"{expected}; remove id2label or give {expected} labels."
        )
    return expected


class _TaskModel(_HeadModel):
    """A backbone and one classifier over its pooled output, with optional dropout."""

    def _dropout(self, pooled: jax.Array, dropout_rng: jax.Array | None) -> jax.Array:
        if dropout_rng is None or not self.config.head_dropout:
            return pooled
        rngs = nnx.Rngs(dropout=jax.random.fold_in(dropout_rng, 1))
        dropout = nnx.Dropout(self.config.head_dropout)
        return layers.apply_dropout(dropout, pooled, rngs)

    def _pair(
        self,
        input_ids,
        attention_mask,
        pixel_values,
        interpolate_pos_encoding,
        dropout_rng,
        image_token_type_idx=1,
        *,
        output_hidden_states: bool,
    ):
        # The classifiers read only the pooled output; see `BridgeTowerModel.forward_trace`.
        return self.bridgetower.forward_trace(
            input_ids,
            attention_mask,
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            image_token_type_idx=image_token_type_idx,
            dropout_rng=dropout_rng,
            full_image_features=output_hidden_states,
        )


class _PairClassifier(_TaskModel):
    """A classifier over one image-text pair's pooled output, named `CLASSIFIER`."""

    TASK: str
    CLASSIFIER: str

    def _build_head(self, config, *, dtype, param_dtype, rngs):
        del dtype
        head = classifier(
            2 * config.hidden_size,
            task_outputs(config, self.TASK),
            config,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        setattr(self, self.CLASSIFIER, head)

    def _loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        return losses.cross_entropy(logits, labels)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        pixel_mask: jax.Array | None = None,
        *,
        labels: jax.Array | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        dropout_rng: jax.Array | None = None,
    ) -> SequenceClassifierOutput:
        """Return `(batch, classes)` logits; with `labels` also the loss."""
        del pixel_mask
        trace = self._pair(
            input_ids,
            attention_mask,
            pixel_values,
            interpolate_pos_encoding,
            dropout_rng,
            output_hidden_states=output_hidden_states,
        )
        pooled = self._dropout(trace.pooler_output, dropout_rng)
        logits = _apply(getattr(self, self.CLASSIFIER), pooled)
        loss = None if labels is None else self._loss(logits, labels)
        return SequenceClassifierOutput(
            logits=logits,
            loss=loss,
            hidden_states=trace.hidden_states() if output_hidden_states else None,
        )


class BridgeTowerForVisualQuestionAnswering(_PairClassifier):
    """VQA: scores every answer of `config.id2label` for an image and a question.

    `labels` are `(batch, answers)` soft scores in [0, 1], such as the
    `vqa_targets` of a VQA pipeline batch, and the loss is `losses.vqa_loss`.
    """

    TASK = "vqa"
    CLASSIFIER = "vqa_classifier"

    def _loss(self, logits: jax.Array, labels: jax.Array) -> jax.Array:
        return losses.vqa_loss(logits, labels)


class BridgeTowerForVisualEntailment(_PairClassifier):
    """SNLI-VE: entailment, neutral or contradiction between an image and a sentence.

    `labels` are class indices (`config.id2label` gives their names), and the
    loss is the cross-entropy.
    """

    TASK = "snli-ve"
    CLASSIFIER = "snli_classifier"


class BridgeTowerForNLVR2(_TaskModel):
    """NLVR2: is the sentence true of the pair of images?

    Needs `config.num_token_types=3`: the second image is marked with row 2 of
    the token-type table. Fine-tuning from a pretrained checkpoint starts that
    row as a copy of row 1 (`bt_jax.training.tasks.finetuning_params`).
    """

    def _build_head(self, config, *, dtype, param_dtype, rngs):
        del dtype
        if config.num_token_types != 3:
            raise ValueError(
                f"the NLVR2 head marks its second image with token type 2, but "
                f"config.num_token_types={config.num_token_types}; set it to 3."
            )
        self.nlvr2_classifier = classifier(
            4 * config.hidden_size,
            task_outputs(config, "nlvr2"),
            config,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        pixel_values_2: jax.Array | None = None,
        *,
        labels: jax.Array | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        dropout_rng: jax.Array | None = None,
    ) -> SequenceClassifierOutput:
        """Return `(batch, 2)` logits (class 1: true); with `labels` also the loss.

        Each text goes through the model with `pixel_values` (token type 1) and
        with `pixel_values_2` (token type 2), each pass with its own dropout.
        `hidden_states`, when asked for, are the first pass's.
        """
        if pixel_values_2 is None:
            raise ValueError(
                "NLVR2 needs two images per sentence: pass pixel_values_2 as well."
            )
        keys = (None, None, None)
        if dropout_rng is not None:
            keys = tuple(jax.random.split(dropout_rng, 3))
        first = self._pair(
            input_ids,
            attention_mask,
            pixel_values,
            interpolate_pos_encoding,
            keys[0],
            image_token_type_idx=1,
            output_hidden_states=output_hidden_states,
        )
        second = self._pair(
            input_ids,
            attention_mask,
            pixel_values_2,
            interpolate_pos_encoding,
            keys[1],
            image_token_type_idx=2,
            output_hidden_states=False,
        )
        pooled = jnp.concatenate([first.pooler_output, second.pooler_output], axis=-1)
        pooled = self._dropout(pooled, keys[2])
        logits = _apply(self.nlvr2_classifier, pooled)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return SequenceClassifierOutput(
            logits=logits,
            loss=loss,
            hidden_states=first.hidden_states() if output_hidden_states else None,
        )


TASK_MODEL_CLASSES = {
    "vqa": BridgeTowerForVisualQuestionAnswering,
    "nlvr2": BridgeTowerForNLVR2,
    "snli-ve": BridgeTowerForVisualEntailment,
}

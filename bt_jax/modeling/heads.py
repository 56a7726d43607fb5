"""Task heads (MLM, ITM, ITC) and the model classes that put them on the backbone.

Each `BridgeTowerFor*` class contains the backbone as `bridgetower` and its head
under the reference's attribute name, so parameter paths match the state-dict
keys of the matching transformers class. `BridgeTowerForPreTraining` has no
transformers counterpart: it contains several heads under those same names.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bt_jax import losses
from bt_jax.config import BridgeTowerConfig
from bt_jax.modeling import layers
from bt_jax.modeling.bridgetower import (
    BridgeTowerModel,
    ForwardTrace,
    _eager_sharding_if_mesh,
)
from bt_jax.modeling.layers import HF_INIT_STD
from bt_jax.modeling.outputs import (
    ContrastiveOutput,
    MaskedLMOutput,
    PreTrainingOutput,
    SequenceClassifierOutput,
)


class PredictionHeadTransform(nnx.Module):
    def __init__(
        self, config: BridgeTowerConfig, *, dtype, param_dtype, rngs: nnx.Rngs
    ):
        width = config.hidden_size
        self.dense = layers.linear(
            width,
            width,
            ("embed", "mlp"),
            std=HF_INIT_STD * config.initializer_factor,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.activation = layers.ACTIVATIONS[config.hidden_act]
        self.LayerNorm = layers.layer_norm(
            width, config.layer_norm_eps, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return self.LayerNorm(self.activation(self.dense(hidden_states)))


class MLMHead(nnx.Module):
    """Dense, activation, LayerNorm, then a vocabulary decoder with a separate bias.

    Every released checkpoint has `tie_word_embeddings=False` and stores its own
    `mlm_score.decoder.weight`. With `tie_word_embeddings=True` the head has no
    decoder weight and projects onto the text word embeddings instead, as the
    reference does.
    """

    def __init__(
        self, config: BridgeTowerConfig, *, dtype, param_dtype, rngs: nnx.Rngs
    ):
        vocab = config.text_config.vocab_size
        self.transform = PredictionHeadTransform(
            config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        if config.tie_word_embeddings:
            self.decoder = None
        else:
            self.decoder = layers.linear(
                config.hidden_size,
                vocab,
                ("embed", "vocab"),
                std=HF_INIT_STD * config.initializer_factor,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
                use_bias=False,
            )
        self.bias = nnx.Param(
            layers.zeros_init(("vocab",))(None, (vocab,), param_dtype)
        )
        self.dtype = dtype

    def __call__(
        self, hidden_states: jax.Array, word_embeddings: nnx.Embed
    ) -> jax.Array:
        transformed = self.transform(hidden_states)
        if self.decoder is None:
            table = word_embeddings.embedding[...].astype(self.dtype)
            logits = jnp.dot(transformed.astype(self.dtype), table.T)
        else:
            logits = self.decoder(transformed)
        return logits + self.bias[...].astype(logits.dtype)


class LinearHead(nnx.Module):
    """A single Linear layer named `fc` (the reference's ITM and ITC heads).

    Like the poolers it computes in float32: it costs nothing next to the
    encoders and keeps bfloat16 runs' scores close to float32.
    """

    def __init__(
        self, in_features: int, out_features: int, *, std, dtype, param_dtype, rngs
    ):
        del dtype
        self.fc = layers.linear(
            in_features,
            out_features,
            ("embed", None),
            std=std,
            dtype=jnp.float32,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return self.fc(hidden_states)


class _HeadModel(nnx.Module):
    """Shared constructor: the backbone as `bridgetower`, then the head's own modules.

    The helpers below build and apply each head, so a class with several heads
    computes each exactly as the single-head class does.
    """

    def __init__(
        self,
        config: BridgeTowerConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        with _eager_sharding_if_mesh():
            self.bridgetower = BridgeTowerModel(
                config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
            self._build_head(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _build_head(self, config, *, dtype, param_dtype, rngs):
        raise NotImplementedError

    def _build_mlm_head(self, config, *, dtype, param_dtype, rngs):
        self.mlm_score = MLMHead(
            config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def _build_itm_head(self, config, *, dtype, param_dtype, rngs):
        self.itm_score = LinearHead(
            2 * config.hidden_size,
            2,
            std=HF_INIT_STD * config.initializer_factor,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def _build_itc_heads(self, config, *, dtype, param_dtype, rngs):
        if (
            config.contrastive_hidden_size is None
            or config.logit_scale_init_value is None
        ):
            raise ValueError(
                "the ITC head needs contrastive_hidden_size and logit_scale_init_value "
                "in the config (512 and 2.6592 in bridgetower-large-itm-mlm-itc); set "
                "both."
            )
        width, dim = config.hidden_size, config.contrastive_hidden_size
        kwargs = dict(
            std=HF_INIT_STD * config.initializer_factor,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.itc_text_head = LinearHead(width, dim, **kwargs)
        self.itc_image_head = LinearHead(width, dim, **kwargs)
        self.itc_cross_modal_head = LinearHead(2 * width, dim, **kwargs)
        self.logit_scale = nnx.Param(
            layers.constant_init(config.logit_scale_init_value, ())(
                None, (), param_dtype
            )
        )

    def _mlm_logits(self, text_features: jax.Array) -> jax.Array:
        word_embeddings = self.bridgetower.text_model.embeddings.word_embeddings
        return self.mlm_score(text_features, word_embeddings)

    def _text_embeds(self, last_text: jax.Array) -> jax.Array:
        """Project the CLS token of the last text layer (uni-modal) and normalise."""
        return losses.l2_normalize(self.itc_text_head(last_text[:, 0]))

    def _image_embeds(self, last_image: jax.Array) -> jax.Array:
        """Project the class token of the last vision block (uni-modal) and normalise.

        The token first goes through `ln_post`, the image transform and token-type
        row 1, as the bridges' input does.
        """
        backbone = self.bridgetower
        normed = backbone.vision_model.visual.forward_post(last_image[:, :1])
        # With per-level transforms the reference raises TypeError here; the last
        # vision block is bridged at the last level, so its transform is used.
        last_level = self.config.num_hidden_layers - 1
        image_cls = (
            backbone.image_transform(normed, last_level)
            + backbone.token_type_embeddings.embedding[1]
        )[:, 0]
        return losses.l2_normalize(self.itc_image_head(image_cls))

    def _contrastive_embeds(
        self, trace: ForwardTrace
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Return the (text, image, cross) L2-normalised ITC embeddings of a pass."""
        text_embeds = self._text_embeds(trace.text_hidden_states[-1])
        image_embeds = self._image_embeds(trace.image_hidden_states[-1])
        cross_embeds = losses.l2_normalize(
            self.itc_cross_modal_head(trace.pooler_output)
        )
        return text_embeds, image_embeds, cross_embeds

    def _trace(
        self,
        input_ids,
        attention_mask,
        pixel_values,
        interpolate_pos_encoding,
        dropout_rng,
        image_hidden_states=None,
        *,
        output_hidden_states: bool,
    ) -> ForwardTrace:
        # The heads read only the class token of the last image layer, so it
        # computes that token alone unless every hidden state is returned.
        return self.bridgetower.forward_trace(
            input_ids,
            attention_mask,
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            dropout_rng=dropout_rng,
            image_hidden_states=image_hidden_states,
            full_image_features=output_hidden_states,
        )


class _ContrastiveEncoders:
    """Uni-modal ITC embeddings, for galleries embedded once and searched often."""

    def encode_text(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Return the L2-normalised ITC text embeddings `(batch, dim)`; no image needed.

        Equal to `text_embeds` of a full forward pass on the same texts.
        """
        return self._text_embeds(
            self.bridgetower.unimodal_text(input_ids, attention_mask)
        )

    def encode_image(
        self, pixel_values: jax.Array, *, interpolate_pos_encoding: bool = False
    ) -> jax.Array:
        """Return the L2-normalised ITC image embeddings `(batch, dim)`; no text needed.

        Equal to `image_embeds` of a full forward pass on the same images.
        """
        return self._image_embeds(
            self.bridgetower.unimodal_image(
                pixel_values, interpolate_pos_encoding=interpolate_pos_encoding
            )
        )

    def encode_pairs(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        pixel_values: jax.Array,
        *,
        interpolate_pos_encoding: bool = False,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Return the `(text, image, cross)` L2-normalised ITC embeddings of pairs.

        Each is `(batch, dim)` and equal to the `text_embeds`, `image_embeds` and
        `cross_embeds` of the contrastive head's forward pass. The cross (joint)
        embedding runs the cross-modal tower, so it costs a full forward pass.
        """
        trace = self._trace(
            input_ids,
            attention_mask,
            pixel_values,
            interpolate_pos_encoding,
            None,
            output_hidden_states=False,
        )
        return self._contrastive_embeds(trace)


class BridgeTowerForMaskedLM(_HeadModel):
    """Masked language modelling on the cross-modal text stream."""

    def _build_head(self, config, **kwargs):
        self._build_mlm_head(config, **kwargs)

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
    ) -> MaskedLMOutput:
        """Predict the vocabulary at every text position.

        With `labels` (`(batch, length)`, -100 where no loss is taken) the output
        also contains the mean cross-entropy over the labelled positions.
        """
        del pixel_mask
        trace = self._trace(
            input_ids,
            attention_mask,
            pixel_values,
            interpolate_pos_encoding,
            dropout_rng,
            output_hidden_states=output_hidden_states,
        )
        logits = self._mlm_logits(trace.text_features)
        loss = None if labels is None else losses.masked_lm_loss(logits, labels)
        return MaskedLMOutput(
            logits=logits,
            loss=loss,
            hidden_states=trace.hidden_states() if output_hidden_states else None,
        )


class BridgeTowerForImageAndTextRetrieval(_HeadModel):
    """Image-text matching: two logits per pair, class 1 = the text matches the image."""

    def _build_head(self, config, **kwargs):
        self._build_itm_head(config, **kwargs)

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
        """Score each pair; with integer `labels` (`(batch,)`) also return the mean cross-entropy."""
        del pixel_mask
        trace = self._trace(
            input_ids,
            attention_mask,
            pixel_values,
            interpolate_pos_encoding,
            dropout_rng,
            output_hidden_states=output_hidden_states,
        )
        logits = self.itm_score(trace.pooler_output)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return SequenceClassifierOutput(
            logits=logits,
            loss=loss,
            hidden_states=trace.hidden_states() if output_hidden_states else None,
        )


class BridgeTowerForContrastiveLearning(_ContrastiveEncoders, _HeadModel):
    """Image-text contrastive head with text, image and cross-modal embeddings."""

    def _build_head(self, config, **kwargs):
        self._build_itc_heads(config, **kwargs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        pixel_mask: jax.Array | None = None,
        *,
        return_loss: bool = False,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        dropout_rng: jax.Array | None = None,
    ) -> ContrastiveOutput:
        """Embed each pair three ways; with `return_loss` also return the ITC loss.

        - text: CLS token of the last text layer (uni-modal);
        - image: class token of the last vision block after `ln_post`, the image
          transform and token-type row 1 (uni-modal);
        - cross: the pooled cross-modal output.
        Each is projected and L2-normalised. The loss treats pair i as the positive
        for row i of the text-image, text-cross and image-cross similarity matrices
        (rows only, not columns), averaged over the three.
        """
        del pixel_mask
        trace = self._trace(
            input_ids,
            attention_mask,
            pixel_values,
            interpolate_pos_encoding,
            dropout_rng,
            output_hidden_states=output_hidden_states,
        )
        text_embeds, image_embeds, cross_embeds = self._contrastive_embeds(trace)
        loss = None
        if return_loss:
            loss = losses.contrastive_loss(
                text_embeds, image_embeds, cross_embeds, self.logit_scale[...]
            )
        return ContrastiveOutput(
            logits=jnp.stack([text_embeds, image_embeds, cross_embeds], axis=-2),
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            cross_embeds=cross_embeds,
            loss=loss,
            hidden_states=trace.hidden_states() if output_hidden_states else None,
        )


# Order of the heads in a multi-head model's name, such as "mlm+itm+itc".
PRETRAINING_HEADS = ("mlm", "itm", "itc")


def parse_heads(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Return the heads of a spec such as "itm+mlm" or ("itm", "mlm") in canonical order.

    Raises:
      ValueError: the spec names a head other than mlm, itm and itc, or none.
    """
    names = spec.split("+") if isinstance(spec, str) else list(spec)
    unknown = [name for name in names if name not in PRETRAINING_HEADS]
    if unknown or not names:
        raise ValueError(
            f"heads={spec!r} is invalid; combine one or more of "
            f"{', '.join(PRETRAINING_HEADS)}, for example 'mlm+itm+itc'."
        )
    return tuple(head for head in PRETRAINING_HEADS if head in names)


class BridgeTowerForPreTraining(_ContrastiveEncoders, _HeadModel):
    """The backbone with any of the MLM, ITM and ITC heads, sharing one forward pass.

    Checkpoints such as bridgetower-large-itm-mlm-itc store all three heads, but
    each transformers class loads only its own. This class keeps every head under
    the same attribute names, so one backbone serves matching, retrieval and
    fill-mask, and pretraining can train all three objectives.
    """

    def __init__(
        self,
        config: BridgeTowerConfig,
        heads: str | Sequence[str] = PRETRAINING_HEADS,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.heads = parse_heads(heads)
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _build_head(self, config, **kwargs):
        if "mlm" in self.heads:
            self._build_mlm_head(config, **kwargs)
        if "itm" in self.heads:
            self._build_itm_head(config, **kwargs)
        if "itc" in self.heads:
            self._build_itc_heads(config, **kwargs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        pixel_mask: jax.Array | None = None,
        *,
        heads: str | Sequence[str] | None = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        dropout_rng: jax.Array | None = None,
        image_hidden_states: jax.Array | None = None,
    ) -> PreTrainingOutput:
        """Run the backbone once and apply `heads` (default: all of this model's).

        Outputs of heads not applied are None. Each output equals the one of the
        matching single-head class on the same weights. `image_hidden_states`
        (from `bridgetower.image_hidden_states`) replaces `pixel_values`, so passes
        over the same images encode them once.
        """
        del pixel_mask
        requested = self.heads if heads is None else parse_heads(heads)
        missing = [head for head in requested if head not in self.heads]
        if missing:
            raise ValueError(
                f"this model has no {'+'.join(missing)} head (it has "
                f"{'+'.join(self.heads)}); load a checkpoint that contains it."
            )
        trace = self._trace(
            input_ids,
            attention_mask,
            pixel_values,
            interpolate_pos_encoding,
            dropout_rng,
            image_hidden_states,
            output_hidden_states=output_hidden_states,
        )
        outputs = {}
        if "mlm" in requested:
            outputs["mlm_logits"] = self._mlm_logits(trace.text_features)
        if "itm" in requested:
            outputs["itm_logits"] = self.itm_score(trace.pooler_output)
        if "itc" in requested:
            text, image, cross = self._contrastive_embeds(trace)
            outputs.update(text_embeds=text, image_embeds=image, cross_embeds=cross)
        return PreTrainingOutput(
            **outputs,
            pooler_output=trace.pooler_output,
            hidden_states=trace.hidden_states() if output_hidden_states else None,
        )

"""Task heads (MLM, ITM, ITC) and the model classes that put them on the backbone.

Each `BridgeTowerFor*` class contains the backbone as `bridgetower` and its head
under the reference's attribute name, so parameter paths match the state-dict
keys of the matching transformers class.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bt_jax import losses
from bt_jax.config import BridgeTowerConfig
from bt_jax.modeling import layers
from bt_jax.modeling.bridgetower import BridgeTowerModel, _eager_sharding_if_mesh
from bt_jax.modeling.layers import HF_INIT_STD
from bt_jax.modeling.outputs import (
    ContrastiveOutput,
    MaskedLMOutput,
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
    """Shared constructor: the backbone as `bridgetower`, then the head's own modules."""

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


class BridgeTowerForMaskedLM(_HeadModel):
    """Masked language modelling on the cross-modal text stream."""

    def _build_head(self, config, *, dtype, param_dtype, rngs):
        self.mlm_score = MLMHead(
            config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

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
        trace = self.bridgetower.forward_trace(
            input_ids,
            attention_mask,
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            dropout_rng=dropout_rng,
        )
        word_embeddings = self.bridgetower.text_model.embeddings.word_embeddings
        logits = self.mlm_score(trace.text_features, word_embeddings)
        loss = None if labels is None else losses.masked_lm_loss(logits, labels)
        return MaskedLMOutput(
            logits=logits,
            loss=loss,
            hidden_states=trace.hidden_states() if output_hidden_states else None,
        )


class BridgeTowerForImageAndTextRetrieval(_HeadModel):
    """Image-text matching: two logits per pair, class 1 = the text matches the image."""

    def _build_head(self, config, *, dtype, param_dtype, rngs):
        self.itm_score = LinearHead(
            2 * config.hidden_size,
            2,
            std=HF_INIT_STD * config.initializer_factor,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

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
        trace = self.bridgetower.forward_trace(
            input_ids,
            attention_mask,
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            dropout_rng=dropout_rng,
        )
        logits = self.itm_score(trace.pooler_output)
        loss = None if labels is None else losses.cross_entropy(logits, labels)
        return SequenceClassifierOutput(
            logits=logits,
            loss=loss,
            hidden_states=trace.hidden_states() if output_hidden_states else None,
        )


class BridgeTowerForContrastiveLearning(_HeadModel):
    """Image-text contrastive head with text, image and cross-modal embeddings."""

    def _build_head(self, config, *, dtype, param_dtype, rngs):
        if (
            config.contrastive_hidden_size is None
            or config.logit_scale_init_value is None
        ):
            raise ValueError(
                "BridgeTowerForContrastiveLearning needs contrastive_hidden_size and "
                "logit_scale_init_value in the config (512 and 2.6592 in "
                "bridgetower-large-itm-mlm-itc); set both."
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
        backbone = self.bridgetower
        trace = backbone.forward_trace(
            input_ids,
            attention_mask,
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            dropout_rng=dropout_rng,
        )
        text_cls = trace.text_hidden_states[-1][:, 0]
        last_image = backbone.vision_model.visual.forward_post(
            trace.image_hidden_states[-1]
        )
        # With per-level transforms the reference raises TypeError here; the last
        # vision block is bridged at the last level, so its transform is used.
        last_level = self.config.num_hidden_layers - 1
        image_cls = (
            backbone.image_transform(last_image, last_level)
            + backbone.token_type_embeddings.embedding[1]
        )[:, 0]
        text_embeds = losses.l2_normalize(self.itc_text_head(text_cls))
        image_embeds = losses.l2_normalize(self.itc_image_head(image_cls))
        cross_embeds = losses.l2_normalize(
            self.itc_cross_modal_head(trace.pooler_output)
        )
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

"""RoBERTa text encoder, plus the BERT-style attention blocks the cross-modal layers reuse.

Module and attribute names follow transformers' `BridgeTowerTextModel`
(`embeddings`, `encoder.layer[i].attention.self.query`, ...), so each parameter
path reads like the PyTorch state-dict key it is converted from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bt_jax import sharding
from bt_jax.config import TextConfig
from bt_jax.modeling import layers
from bt_jax.modeling.layers import HF_INIT_STD


class TextEmbeddings(nnx.Module):
    """Word, position and token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        width = config.hidden_size
        self.word_embeddings = nnx.Embed(
            config.vocab_size,
            width,
            param_dtype=param_dtype,
            embedding_init=layers.normal_init(HF_INIT_STD, ("vocab", "embed")),
            rngs=rngs,
        )
        self.token_type_embeddings = nnx.Embed(
            config.type_vocab_size,
            width,
            param_dtype=param_dtype,
            embedding_init=layers.normal_init(HF_INIT_STD, (None, "embed")),
            rngs=rngs,
        )
        self.LayerNorm = layers.layer_norm(
            width, config.layer_norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.position_embeddings = nnx.Embed(
            config.max_position_embeddings,
            width,
            param_dtype=param_dtype,
            embedding_init=layers.normal_init(HF_INIT_STD, (None, "embed")),
            rngs=rngs,
        )
        self.dropout = nnx.Dropout(config.hidden_dropout_prob)
        self.pad_token_id = config.pad_token_id

    def __call__(
        self, input_ids: jax.Array, *, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        # RoBERTa numbers real tokens pad_token_id + 1, pad_token_id + 2, ... and
        # gives every pad token position pad_token_id. The numbering comes from the
        # token ids, not from the attention mask, exactly as in the reference.
        not_pad = (input_ids != self.pad_token_id).astype(jnp.int32)
        position_ids = jnp.cumsum(not_pad, axis=1) * not_pad + self.pad_token_id
        # The reference never passes token type ids here, so every token uses row 0.
        words = self.word_embeddings(input_ids)
        # Out-of-range ids cannot raise inside jax.jit. A too-large id already gives
        # NaN, and a negative id would wrap to the end of the table, so it gets NaN too.
        words = jnp.where((input_ids >= 0)[..., None], words, jnp.nan)
        embeddings = (
            words
            + self.token_type_embeddings.embedding[0]
            + self.position_embeddings(position_ids)
        )
        embeddings = self.LayerNorm(embeddings)
        return layers.apply_dropout(self.dropout, embeddings, rngs)


class SelfAttention(nnx.Module):
    """Query, key and value projections and scaled dot-product attention.

    The same parameters serve self-attention and, given `key_value_states`,
    cross-attention (transformers has two classes with identical weights).
    """

    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        heads = (config.num_attention_heads, config.head_dim)
        axes = ("embed", "heads", "kv")
        kwargs = dict(std=HF_INIT_STD, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = layers.head_projection(config.hidden_size, heads, axes, **kwargs)
        self.key = layers.head_projection(config.hidden_size, heads, axes, **kwargs)
        self.value = layers.head_projection(config.hidden_size, heads, axes, **kwargs)
        self.dropout = nnx.Dropout(config.attention_probs_dropout_prob)

    def __call__(
        self,
        hidden_states: jax.Array,
        mask: jax.Array | None,
        key_value_states: jax.Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        if key_value_states is None:
            key_value_states = hidden_states
        return layers.dot_product_attention(
            self.query(hidden_states),
            self.key(key_value_states),
            self.value(key_value_states),
            mask,
            dropout=self.dropout,
            rngs=rngs,
        )


class SelfOutput(nnx.Module):
    """Output projection of an attention block, dropout, residual and post-LayerNorm."""

    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dense = layers.output_projection(
            config.num_attention_heads,
            config.head_dim,
            config.hidden_size,
            ("heads", "kv", "embed"),
            std=HF_INIT_STD,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.LayerNorm = layers.layer_norm(
            config.hidden_size,
            config.layer_norm_eps,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.dropout = nnx.Dropout(config.hidden_dropout_prob)

    def __call__(
        self, context: jax.Array, residual: jax.Array, *, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        hidden = layers.apply_dropout(self.dropout, self.dense(context), rngs)
        return self.LayerNorm(hidden + residual)


class Attention(nnx.Module):
    """Attention sub-layer: `self` computes the attention, `output` projects and normalises."""

    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.self = SelfAttention(
            config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.output = SelfOutput(
            config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(
        self,
        hidden_states: jax.Array,
        mask: jax.Array | None,
        key_value_states: jax.Array | None = None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        context = self.self(hidden_states, mask, key_value_states, rngs=rngs)
        return self.output(context, hidden_states, rngs=rngs)


class Intermediate(nnx.Module):
    """First feed-forward projection and its activation."""

    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dense = layers.linear(
            config.hidden_size,
            config.intermediate_size,
            ("embed", "mlp"),
            std=HF_INIT_STD,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.activation = layers.ACTIVATIONS[config.hidden_act]

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        hidden = sharding.constrain(
            self.dense(hidden_states), layers.MLP_ACTIVATION_AXES
        )
        return self.activation(hidden)


class Output(nnx.Module):
    """Second feed-forward projection, dropout, residual and post-LayerNorm."""

    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dense = layers.linear(
            config.intermediate_size,
            config.hidden_size,
            ("mlp", "embed"),
            std=HF_INIT_STD,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.LayerNorm = layers.layer_norm(
            config.hidden_size,
            config.layer_norm_eps,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.dropout = nnx.Dropout(config.hidden_dropout_prob)

    def __call__(
        self,
        hidden_states: jax.Array,
        residual: jax.Array,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        hidden = layers.apply_dropout(self.dropout, self.dense(hidden_states), rngs)
        return self.LayerNorm(hidden + residual)


class TextLayer(nnx.Module):
    """Post-LayerNorm transformer layer: self-attention, then the feed-forward block."""

    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = Attention(config, **kwargs)
        self.intermediate = Intermediate(config, **kwargs)
        self.output = Output(config, **kwargs)

    def __call__(
        self,
        hidden_states: jax.Array,
        mask: jax.Array | None,
        *,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        attended = self.attention(hidden_states, mask, rngs=rngs)
        return self.output(self.intermediate(attended), attended, rngs=rngs)


class TextEncoder(nnx.Module):
    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.layer = nnx.List(
            [
                TextLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )


class Pooler(nnx.Module):
    """Dense layer and tanh on the first token.

    It computes in float32 whatever the model's compute dtype: it is one small
    matmul per example, and in bfloat16 its rounding alone moved base-size ITM
    probabilities by up to 0.003.
    """

    def __init__(self, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        del dtype
        self.dense = layers.linear(
            width,
            width,
            ("embed", "mlp"),
            std=HF_INIT_STD,
            dtype=jnp.float32,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        return jnp.tanh(self.dense(hidden_states[:, 0]))


class TextModel(nnx.Module):
    """RoBERTa encoder. BridgeTower runs its layers itself, one at a time.

    The pooler is never used by BridgeTower; it is kept so that conversion in
    both directions is lossless.
    """

    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = TextEmbeddings(config, **kwargs)
        self.encoder = TextEncoder(config, **kwargs)
        self.pooler = Pooler(config.hidden_size, **kwargs)

"""Cross-modal layers and the link towers (bridges) that feed them."""

from __future__ import annotations

import jax
from flax import nnx

from bt_jax.config import BridgeTowerConfig, TextConfig
from bt_jax.modeling import layers
from bt_jax.modeling.text import Attention, Intermediate, Output


class CrossLayer(nnx.Module):
    """One layer of a cross-modal stream: self-attention, cross-attention, feed-forward.

    All three sub-layers are post-LayerNorm. The cross-attention takes its queries
    from the self-attention output and its keys and values from the other stream's
    input at the same depth.
    """

    def __init__(self, config: TextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = Attention(config, **kwargs)
        self.crossattention = Attention(config, **kwargs)
        self.intermediate = Intermediate(config, **kwargs)
        self.output = Output(config, **kwargs)

    def __call__(
        self,
        hidden_states: jax.Array,
        other_states: jax.Array,
        self_mask: jax.Array | None,
        cross_mask: jax.Array | None,
        *,
        rngs: nnx.Rngs | None = None,
        queries: int | None = None,
    ) -> jax.Array:
        """Run the layer.

        Args:
          hidden_states: this stream's input, `(batch, length, width)`.
          other_states: the other stream's input at the same depth.
          self_mask: boolean key mask over this stream (True = attend), or None.
          cross_mask: boolean key mask over the other stream, or None.
          rngs: dropout randomness; None runs without dropout.
          queries: compute the outputs of the first `queries` positions only,
            `(batch, queries, width)`. Without dropout they equal those rows of
            the full output: the self-attention still takes its keys and values
            from every position. With dropout, their masks are drawn for the
            smaller shape, so they are other random draws than the full
            output's rows get. None computes every position.
        """
        if queries is None:
            attended = self.attention(hidden_states, self_mask, rngs=rngs)
        else:
            attended = self.attention(
                hidden_states[:, :queries], self_mask, hidden_states, rngs=rngs
            )
        attended = self.crossattention(attended, cross_mask, other_states, rngs=rngs)
        return self.output(self.intermediate(attended), attended, rngs=rngs)


class LinkTower(nnx.Module):
    """Bridge that merges a uni-modal layer output into the cross-modal stream.

    - "add": LayerNorm(uni + cross)
    - "scaled_add": LayerNorm(uni * scaled_factor + cross), `scaled_factor` starts at 1
    - "interpolate": LayerNorm(uni * (1 - beta) + cross * beta), `beta` starts at 0.5
    """

    def __init__(self, config: BridgeTowerConfig, *, param_dtype, rngs: nnx.Rngs):
        self.link_tower_type = config.link_tower_type
        if config.link_tower_type == "scaled_add":
            self.scaled_factor = nnx.Param(
                layers.constant_init(1.0, ())(None, (), param_dtype)
            )
        elif config.link_tower_type == "interpolate":
            self.beta = nnx.Param(layers.constant_init(0.5, ())(None, (), param_dtype))
        self.LayerNorm = layers.layer_norm(
            config.hidden_size,
            config.layer_norm_eps,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, uni_modal: jax.Array, cross_modal: jax.Array) -> jax.Array:
        if self.link_tower_type == "scaled_add":
            merged = uni_modal * self.scaled_factor[...] + cross_modal
        elif self.link_tower_type == "interpolate":
            beta = self.beta[...]
            merged = uni_modal * (1 - beta) + cross_modal * beta
        else:
            merged = uni_modal + cross_modal
        return self.LayerNorm(merged)

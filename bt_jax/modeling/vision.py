"""CLIP ViT image encoder, named after transformers' `BridgeTowerVisionModel`.

Pixels arrive as `(batch, height, width, channels)`, JAX's layout. The encoder
keeps `(batch, tokens, width)` throughout; PyTorch runs these blocks
sequence-first, which is only a layout difference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bt_jax import sharding
from bt_jax.config import VisionConfig
from bt_jax.modeling import layers
from bt_jax.modeling.layers import HF_INIT_STD


class VisionEmbeddings(nnx.Module):
    """Patch convolution, class token and learned position embeddings."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        width = config.hidden_size
        std = width**-0.5 * config.initializer_factor
        self.class_embedding = nnx.Param(
            layers.normal_init(std, ("embed",))(rngs.params(), (width,), param_dtype)
        )
        # No bias and VALID padding: pixels beyond the last whole patch are dropped.
        self.patch_embedding = nnx.Conv(
            config.num_channels,
            width,
            kernel_size=(config.patch_size, config.patch_size),
            strides=(config.patch_size, config.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=layers.normal_init(HF_INIT_STD, (None, None, None, "embed")),
            rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            config.num_positions,
            width,
            param_dtype=param_dtype,
            embedding_init=layers.normal_init(std, (None, "embed")),
            rngs=rngs,
        )
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels

    def __call__(
        self, pixel_values: jax.Array, *, interpolate_pos_encoding: bool = False
    ) -> jax.Array:
        check_pixel_values(pixel_values, self.patch_size, self.num_channels)
        batch, height, width, _ = pixel_values.shape
        if not interpolate_pos_encoding and (height, width) != (self.image_size,) * 2:
            raise ValueError(
                f"pixel_values are {height}x{width} pixels but the model expects "
                f"{self.image_size}x{self.image_size}. Resize the images to "
                f"{self.image_size}x{self.image_size}, or pass "
                "interpolate_pos_encoding=True to resample the position table."
            )
        patches = self.patch_embedding(pixel_values)
        patches = patches.reshape(batch, -1, patches.shape[-1])  # row-major over (h, w)
        class_token = jnp.broadcast_to(
            self.class_embedding[...].astype(patches.dtype),
            (batch, 1, patches.shape[-1]),
        )
        embeddings = jnp.concatenate([class_token, patches], axis=1)
        if interpolate_pos_encoding:
            positions = self.interpolated_positions(height, width)
        else:
            positions = self.position_embedding.embedding[...]
        return embeddings + positions[None].astype(embeddings.dtype)

    def interpolated_positions(self, height: int, width: int) -> jax.Array:
        """Resample the patch rows of the position table to the grid of a `height`x`width` image.

        Matches the reference: the table is used as is when the patch count is
        unchanged and the image is square. Otherwise the square grid of patch rows
        is resized with PyTorch's bicubic kernel (A = -0.75, align_corners=False,
        no antialiasing) to `(height // patch, width // patch)`, and the class row
        is kept unchanged.
        """
        table = self.position_embedding.embedding[...]
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        if grid_h * grid_w == table.shape[0] - 1 and height == width:
            return table
        return resample_position_table(table, grid_h, grid_w)


def resample_position_table(table: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
    """Resize a CLIP position table (class row, then a square grid) to `grid_h`x`grid_w`.

    The grid is resized with PyTorch's bicubic kernel (A = -0.75,
    align_corners=False, no antialiasing), as `torch.nn.functional.interpolate`
    does for `mode="bicubic"`; the class row is kept unchanged.
    """
    num_positions = table.shape[0] - 1
    side = round(num_positions**0.5)
    if side * side != num_positions:
        raise ValueError(
            f"the position table has {num_positions} patch rows, not a square grid; "
            "only square tables can be resampled."
        )
    patch_rows = table[1:].reshape(side, side, table.shape[-1])
    resized = jax.image.resize(
        patch_rows,
        (grid_h, grid_w, table.shape[-1]),
        method="bicubic-pytorch",
        antialias=False,
    )
    return jnp.concatenate([table[:1], resized.reshape(grid_h * grid_w, -1)], axis=0)


def check_pixel_values(
    pixel_values: jax.Array, patch_size: int, num_channels: int
) -> None:
    """Raise ValueError unless `pixel_values` is a `(batch, height, width, channels)` array."""
    shape = tuple(pixel_values.shape)
    if len(shape) != 4:
        raise ValueError(
            f"pixel_values must have 4 dimensions (batch, height, width, {num_channels}), "
            f"got shape {shape}."
        )
    if shape[-1] != num_channels:
        if shape[1] == num_channels:
            raise ValueError(
                f"pixel_values have shape {shape}, which is channels-first "
                f"(batch, {num_channels}, height, width). bt-jax expects "
                f"(batch, height, width, {num_channels}); convert with "
                "pixel_values.transpose(0, 2, 3, 1)."
            )
        raise ValueError(
            f"pixel_values have shape {shape}; the last axis must be the "
            f"{num_channels} color channels: (batch, height, width, {num_channels})."
        )
    if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
        raise ValueError(
            f"pixel_values have dtype {pixel_values.dtype}; the model expects normalised "
            "floats: pixels rescaled to [0, 1], then normalised with the CLIP mean and "
            "std, as BridgeTowerImageProcessor outputs them."
        )
    if 0 in shape:
        raise ValueError(f"pixel_values have shape {shape}; no dimension may be 0.")
    if min(shape[1], shape[2]) < patch_size:
        raise ValueError(
            f"pixel_values are {shape[1]}x{shape[2]} pixels, smaller than one "
            f"{patch_size}x{patch_size} patch; use images of at least {patch_size} pixels "
            "per side."
        )


class MultiheadAttention(nnx.Module):
    """CLIP attention with one packed query/key/value projection.

    `in_proj` maps to `(3, heads, head_dim)`; PyTorch's `in_proj_weight` stacks the
    same query, key and value rows in that order.
    """

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        width, heads, head_dim = (
            config.hidden_size,
            config.num_attention_heads,
            config.head_dim,
        )
        factor = config.initializer_factor
        attn_std = width**-0.5 * factor
        proj_std = width**-0.5 * (2 * config.num_hidden_layers) ** -0.5 * factor
        self.in_proj = layers.head_projection(
            width,
            (3, heads, head_dim),
            ("embed", None, "heads", "kv"),
            std=attn_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.out_proj = layers.output_projection(
            heads,
            head_dim,
            width,
            ("heads", "kv", "embed"),
            std=proj_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        qkv = self.in_proj(hidden_states)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        context = layers.dot_product_attention(
            query, key, value, None, dropout=None, rngs=None
        )
        return self.out_proj(context)


class VisionMLP(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        width, factor = config.hidden_size, config.initializer_factor
        proj_std = width**-0.5 * (2 * config.num_hidden_layers) ** -0.5 * factor
        fc_std = (2 * width) ** -0.5 * factor
        self.c_fc = layers.linear(
            width,
            config.intermediate_size,
            ("embed", "mlp"),
            std=fc_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.c_proj = layers.linear(
            config.intermediate_size,
            width,
            ("mlp", "embed"),
            std=proj_std,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        hidden = sharding.constrain(
            self.c_fc(hidden_states), layers.MLP_ACTIVATION_AXES
        )
        return self.c_proj(layers.quick_gelu(hidden))


class ResidualAttention(nnx.Module):
    """Pre-LayerNorm CLIP block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        eps = config.layer_norm_eps
        self.attn = MultiheadAttention(config, **kwargs)
        self.ln_1 = layers.layer_norm(
            config.hidden_size, eps, param_dtype=param_dtype, rngs=rngs
        )
        self.mlp = VisionMLP(config, **kwargs)
        self.ln_2 = layers.layer_norm(
            config.hidden_size, eps, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, hidden_states: jax.Array) -> jax.Array:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class Transformer(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.resblocks = nnx.List(
            [
                ResidualAttention(
                    config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
                )
                for _ in range(config.num_blocks)
            ]
        )


class VisionTransformer(nnx.Module):
    """Embeddings, `ln_pre`, the residual blocks and `ln_post`.

    `ln_post` is a side branch: each bridged block output is normalised by it on
    its way into the cross-modal tower, while the residual stream itself flows on
    un-normalised.

    With `share_layernorm=False` the reference also builds `ln_separate`, one
    LayerNorm per block. NOTE: transformers 5.25's `BridgeTowerModel` never applies
    `ln_separate` and normalises every bridged block with `ln_post`, and so does
    this port, to keep parity with it. `ln_separate` is carried so that such
    checkpoints convert both ways without loss.
    """

    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        eps = config.layer_norm_eps
        self.embeddings = VisionEmbeddings(config, **kwargs)
        self.ln_pre = layers.layer_norm(
            config.hidden_size, eps, param_dtype=param_dtype, rngs=rngs
        )
        self.transformer = Transformer(config, **kwargs)
        self.ln_post = layers.layer_norm(
            config.hidden_size, eps, param_dtype=param_dtype, rngs=rngs
        )
        if not config.share_layernorm:
            self.ln_separate = nnx.List(
                [
                    layers.layer_norm(
                        config.hidden_size, eps, param_dtype=param_dtype, rngs=rngs
                    )
                    for _ in range(config.num_hidden_layers)
                ]
            )

    def forward_pre(
        self, pixel_values: jax.Array, *, interpolate_pos_encoding: bool = False
    ) -> jax.Array:
        """Embed the pixels and apply `ln_pre`: the input of the first block."""
        embeddings = self.embeddings(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding
        )
        return self.ln_pre(embeddings)

    def forward_post(self, hidden_states: jax.Array) -> jax.Array:
        """Normalise a block output for the bridge, leaving the residual stream as is."""
        return self.ln_post(hidden_states)


class VisionModel(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.visual = VisionTransformer(
            config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

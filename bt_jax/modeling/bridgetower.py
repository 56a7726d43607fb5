"""`BridgeTowerModel`: both uni-modal encoders, the bridges and the cross-modal tower.

Data flow, with X = `config.num_hidden_layers` cross-modal layers per stream:

1. The text encoder runs its first `text_split_index` layers and the vision
   encoder its first `vision_split_index` blocks.
2. Level 0: each stream's uni-modal output goes through its cross-modal
   transform (a Linear), gets its token-type embedding (row 0 text, row 1 image)
   and a LayerNorm (`cross_modal_{text,image}_layernorm`). The vision output is
   first normalised by `ln_post`.
3. Levels 1..X-1: each encoder runs one more layer. Its transformed output plus
   the token-type embedding is merged into the previous cross-modal output by a
   link tower. The image path gets no `cross_modal_image_layernorm` here.
4. At every level the text cross layer attends to the image input of the same
   level and vice versa, not to the other stream's output of that level.
5. The poolers (Linear + tanh on token 0) of both streams are concatenated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bt_jax import sharding
from bt_jax.config import BridgeTowerConfig
from bt_jax.modeling import layers
from bt_jax.modeling.cross_modal import CrossLayer, LinkTower
from bt_jax.modeling.layers import HF_INIT_STD
from bt_jax.modeling.outputs import BridgeTowerModelOutput
from bt_jax.modeling.text import Pooler, TextModel
from bt_jax.modeling.vision import VisionModel

# Rows of the token-type table that BridgeTowerModel adds to the cross-modal inputs.
ACTIVATION_AXES = ("act_batch", "act_length", "act_embed")
# Checkpoint policies of `BridgeTowerModel.remat`, by name:
# "full" keeps only the layer's inputs and recomputes the rest, "dots" also
# keeps the outputs of matmuls without batch dimensions (the projections, not
# the attention scores).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass
class ForwardTrace:
    """Everything a head may need from one forward pass."""

    text_features: jax.Array
    image_features: jax.Array
    pooler_output: jax.Array
    text_hidden_states: list[jax.Array]
    # Empty when the pass started from `image_bridge_inputs`.
    image_hidden_states: list[jax.Array]
    cross_hidden_states: list[tuple[jax.Array, jax.Array]]

    def hidden_states(self):
        return (
            tuple(self.text_hidden_states),
            tuple(self.image_hidden_states),
            tuple(self.cross_hidden_states),
        )


def check_text_inputs(
    config: BridgeTowerConfig, input_ids: jax.Array, attention_mask: jax.Array | None
) -> None:
    """Raise ValueError for text inputs the model cannot run on.

    Shapes are always checked. Token id ranges are checked only for concrete
    arrays, because traced values are unknown inside `jax.jit`.
    """
    text = config.text_config
    if input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}."
        )
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers, got dtype {input_ids.dtype}.")
    if 0 in input_ids.shape:
        raise ValueError(
            f"input_ids have shape {tuple(input_ids.shape)}; pass at least one text of "
            "at least one token."
        )
    length = input_ids.shape[1]
    if length > text.max_text_length:
        raise ValueError(
            f"input_ids have {length} tokens but the position table allows at most "
            f"{text.max_text_length} (max_position_embeddings="
            f"{text.max_position_embeddings}). Truncate the text, for example with "
            f"tokenizer(..., truncation=True, max_length={text.max_text_length})."
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(
        input_ids.shape
    ):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids have "
            f"{tuple(input_ids.shape)}; they must match."
        )
    if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
        # NumPy, because jnp reductions would be traced when this runs under jit.
        ids = np.asarray(input_ids)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= text.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids contain token id {bad}, outside the vocabulary "
                f"[0, {text.vocab_size}); use the tokenizer that matches this checkpoint."
            )


class BridgeTowerModel(nnx.Module):
    """The BridgeTower backbone, without a task head.

    Construct it directly, or use `bt_jax.from_pretrained` to load weights.
    Outside a mesh, parameters are created unsharded; under `jax.set_mesh` and
    `nnx.logical_axis_rules`, Flax shards them as they are created.
    """

    def __init__(
        self,
        config: BridgeTowerConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        with _eager_sharding_if_mesh():
            self._build(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def _build(self, config: BridgeTowerConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.config = config
        # Rematerialisation of each layer in `forward_trace` (a REMAT_POLICIES
        # key); training code sets it before splitting the model.
        self.remat = "none"
        # Run each stack of identical layers as one `lax.scan` (see `_run_stack`)
        # instead of unrolling it; the numbers are the same. A scan stacks every
        # layer's weights on each call, which made the base forward about 10%
        # slower on a 2-core CPU, while unrolled it still compiles in seconds.
        # The train step compiles twice as fast scanned, so `Trainer` scans.
        self.scan_layers = False
        text, vision = config.text_config, config.vision_config
        width = config.hidden_size
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        std = HF_INIT_STD * config.initializer_factor

        def transform(in_features):
            return layers.linear(
                in_features, width, ("embed", "mlp"), std=std, **kwargs
            )

        # With `share_cross_modal_transformer_layers` (all released checkpoints) one
        # transform per modality serves every level; otherwise each level has its own.
        if config.share_cross_modal_transformer_layers:
            self.cross_modal_text_transform = transform(text.hidden_size)
            self.cross_modal_image_transform = transform(vision.hidden_size)
        else:
            self.cross_modal_text_transform = nnx.List(
                [transform(text.hidden_size) for _ in range(config.num_hidden_layers)]
            )
            self.cross_modal_image_transform = nnx.List(
                [transform(vision.hidden_size) for _ in range(config.num_hidden_layers)]
            )
        self.token_type_embeddings = nnx.Embed(
            config.num_token_types,
            width,
            param_dtype=param_dtype,
            embedding_init=layers.normal_init(std, (None, "embed")),
            rngs=rngs,
        )
        self.vision_model = VisionModel(vision, **kwargs)
        self.text_model = TextModel(text, **kwargs)
        visual = self.vision_model.visual
        if not vision.share_layernorm and config.init_layernorm_from_vision_encoder:
            # Start every per-layer LayerNorm from ln_post, as the option's name describes.
            # The reference raises AttributeError here (it looks up a misnamed attribute).
            for norm in visual.ln_separate:
                norm.scale[...] = visual.ln_post.scale[...]
                norm.bias[...] = visual.ln_post.bias[...]
        self.cross_modal_image_layers = nnx.List(
            [CrossLayer(text, **kwargs) for _ in range(config.num_hidden_layers)]
        )
        self.cross_modal_text_layers = nnx.List(
            [CrossLayer(text, **kwargs) for _ in range(config.num_hidden_layers)]
        )
        self.cross_modal_image_pooler = Pooler(width, **kwargs)
        self.cross_modal_text_pooler = Pooler(width, **kwargs)
        eps = config.layer_norm_eps
        self.cross_modal_text_layernorm = layers.layer_norm(
            width, eps, param_dtype=param_dtype, rngs=rngs
        )
        self.cross_modal_image_layernorm = layers.layer_norm(
            width, eps, param_dtype=param_dtype, rngs=rngs
        )
        # `share_link_tower_layers` means one link tower per modality, reused at every
        # level. The reference builds that single module and then indexes it like a
        # list, which raises TypeError; here the shared tower is applied at each level.
        if config.share_link_tower_layers:
            self.cross_modal_text_link_tower = LinkTower(
                config, param_dtype=param_dtype, rngs=rngs
            )
            self.cross_modal_image_link_tower = LinkTower(
                config, param_dtype=param_dtype, rngs=rngs
            )
        else:
            self.cross_modal_text_link_tower = nnx.List(
                [
                    LinkTower(config, param_dtype=param_dtype, rngs=rngs)
                    for _ in range(config.num_link_towers)
                ]
            )
            self.cross_modal_image_link_tower = nnx.List(
                [
                    LinkTower(config, param_dtype=param_dtype, rngs=rngs)
                    for _ in range(config.num_link_towers)
                ]
            )

    def _text_transform_module(self, level: int) -> nnx.Linear:
        if self.config.share_cross_modal_transformer_layers:
            return self.cross_modal_text_transform
        return self.cross_modal_text_transform[level]

    def _image_transform_module(self, level: int) -> nnx.Linear:
        if self.config.share_cross_modal_transformer_layers:
            return self.cross_modal_image_transform
        return self.cross_modal_image_transform[level]

    def text_transform(self, hidden_states: jax.Array, level: int) -> jax.Array:
        return self._text_transform_module(level)(hidden_states)

    def image_transform(self, hidden_states: jax.Array, level: int) -> jax.Array:
        return self._image_transform_module(level)(hidden_states)

    def link_towers(self, level: int) -> tuple[LinkTower, LinkTower]:
        """Return the (text, image) link towers that feed cross-modal layer `level` >= 1."""
        if self.config.share_link_tower_layers:
            return self.cross_modal_text_link_tower, self.cross_modal_image_link_tower
        return (
            self.cross_modal_text_link_tower[level - 1],
            self.cross_modal_image_link_tower[level - 1],
        )

    def unimodal_text(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> jax.Array:
        """Run only the text encoder.

        Returns the same tensor as the last text entry of `forward_trace`; text
        layers never attend to the image, so no image is needed.
        """
        check_text_inputs(self.config, input_ids, attention_mask)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        text_mask = layers.key_padding_mask(attention_mask)
        text = sharding.constrain(
            self.text_model.embeddings(input_ids), ACTIVATION_AXES
        )
        text, _ = self._run_text_layers(text, text_mask, self._bridged_text_layers())
        return text

    def unimodal_image(
        self, pixel_values: jax.Array, *, interpolate_pos_encoding: bool = False
    ) -> jax.Array:
        """Run only the vision encoder.

        Returns the same tensor as the last image entry of `forward_trace`
        (before `ln_post`).
        """
        vision = self.vision_model.visual
        image = vision.forward_pre(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding
        )
        image = sharding.constrain(image, ACTIVATION_AXES)
        image, _ = self._run_image_blocks(image, self._bridged_image_blocks())
        return image

    def image_hidden_states(
        self, pixel_values: jax.Array, *, interpolate_pos_encoding: bool = False
    ) -> jax.Array:
        """Run only the vision encoder and return every hidden state BridgeTower uses.

        The result is `(blocks + 1, batch, tokens, width)`: the patch embeddings,
        then the output of each block the model runs. `forward_trace` accepts it
        in place of `pixel_values`, so several passes over the same images (with
        other texts, or with rows re-paired by indexing axis 1) encode them once.
        The vision encoder has no dropout, so a reused encoding equals a fresh one.
        """
        vision = self.vision_model.visual
        image = vision.forward_pre(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding
        )
        image = sharding.constrain(image, ACTIVATION_AXES)
        _, stack = self._run_image_blocks(image, self._bridged_image_blocks())
        if stack is None:
            return image[None]
        return jnp.concatenate([image[None], stack])

    def image_bridge_inputs(
        self, image_hidden_states: jax.Array, *, image_token_type_idx: int = 1
    ) -> jax.Array:
        """Return what the image stream of the cross-modal tower takes from the images.

        The result is `(levels, batch, tokens, width)`. Row 0 is the input of
        the first cross-modal image layer: the vision state at the split,
        post-normalised, transformed, plus the image token type, then
        normalised. Row l >= 1 is the vision state of level l, transformed the
        same way before the image link tower merges it with the cross-modal
        output of level l - 1. The rows depend on the image alone, so passes that
        pair each image with several texts compute them once per image and index
        axis 1, as `forward_trace(image_bridge_inputs=...)` accepts.

        Args:
          image_hidden_states: `image_hidden_states(pixel_values)`.
          image_token_type_idx: row of the token-type table added to image tokens.
        """
        levels = self.config.num_hidden_layers
        split = self.config.vision_split_index
        if image_hidden_states.ndim != 4 or len(image_hidden_states) != split + levels:
            raise ValueError(
                f"image_hidden_states have shape {tuple(image_hidden_states.shape)}; "
                f"expected ({split + levels}, batch, tokens, width). Compute them "
                "with image_hidden_states(pixel_values)."
            )
        type_row = self._image_type_row(image_token_type_idx)
        post = self.vision_model.visual.forward_post
        rows = []
        for level in range(levels):
            row = self.image_transform(post(image_hidden_states[split + level]), level)
            row = row + type_row
            if level == 0:
                row = self.cross_modal_image_layernorm(row)
            rows.append(sharding.constrain(row, ACTIVATION_AXES))
        return jnp.stack(rows)

    def _image_type_row(self, image_token_type_idx: int) -> jax.Array:
        """Return the token-type row added to image tokens, checking its index."""
        # The reference turns 0 into 1 (`idx or 1`); any other row must exist.
        image_type = image_token_type_idx or 1
        if not 0 < image_type < self.token_type_embeddings.num_embeddings:
            raise ValueError(
                f"image_token_type_idx={image_token_type_idx} is outside the token-type "
                f"table (rows 0..{self.token_type_embeddings.num_embeddings - 1}, row 0 is "
                "text); use 1."
            )
        return self.token_type_embeddings.embedding[image_type]

    def text_hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        dropout_rng: jax.Array | None = None,
    ) -> jax.Array:
        """Run only the text encoder and return every hidden state BridgeTower uses.

        The result is `(layers + 1, batch, length, width)`: the embeddings, then
        the output of each layer the model runs. `forward_trace` accepts it in
        place of running the text encoder on `input_ids`.
        """
        check_text_inputs(self.config, input_ids, attention_mask)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        rngs = None if dropout_rng is None else nnx.Rngs(dropout=dropout_rng)
        return self._encode_text(
            input_ids, layers.key_padding_mask(attention_mask), rngs
        )

    def _encode_text(
        self, input_ids: jax.Array, text_mask: jax.Array, rngs: nnx.Rngs | None
    ) -> jax.Array:
        text = self.text_model.embeddings(input_ids, rngs=rngs)
        text = sharding.constrain(text, ACTIVATION_AXES)
        _, stack = self._run_text_layers(
            text, text_mask, self._bridged_text_layers(), rngs
        )
        if stack is None:
            return text[None]
        return jnp.concatenate([text[None], stack])

    def _check_hidden_states(
        self, name: str, states: jax.Array, expected: int, batch: int
    ) -> None:
        if states.ndim != 4 or states.shape[0] != expected or states.shape[1] != batch:
            raise ValueError(
                f"{name} have shape {tuple(states.shape)}; expected ({expected}, "
                f"{batch}, tokens, width) for {batch} texts. Compute them with "
                f"{name}(...) on one row per text."
            )

    def _bridged_text_layers(self) -> list[nnx.Module]:
        """Return the text layers BridgeTower runs: up to the split, then one per level."""
        count = self.config.text_split_index + self.config.num_hidden_layers - 1
        return list(self.text_model.encoder.layer[:count])

    def _bridged_image_blocks(self) -> list[nnx.Module]:
        """Return the vision blocks BridgeTower runs: up to the split, then one per level."""
        count = self.config.vision_split_index + self.config.num_hidden_layers - 1
        return list(self.vision_model.visual.transformer.resblocks[:count])

    def scanned_runs(self) -> list[tuple[tuple[str, ...], int, int]]:
        """Return the runs of layers that `scan_layers` scans, as (path, start, stop).

        Layers `start` to `stop - 1` of the list at attribute path `path` run as
        one `lax.scan`, in that order; runs of one layer are left out. Storing
        each run's parameters stacked (`bt_jax.training.layout`) lets the scan
        read them without the copy `_run_stack` otherwise makes.
        """
        config = self.config
        levels = config.num_hidden_layers
        runs = [
            (("text_model", "encoder", "layer"), 0, len(self._bridged_text_layers())),
            (
                ("vision_model", "visual", "transformer", "resblocks"),
                0,
                len(self._bridged_image_blocks()),
            ),
            (("cross_modal_text_layers",), 1, levels),
            (("cross_modal_image_layers",), 1, levels),
        ]
        # `forward_trace` scans levels 1.. with their text transforms and link
        # towers; shared ones are single modules and stay out of the stacks.
        if not config.share_cross_modal_transformer_layers:
            runs.append((("cross_modal_text_transform",), 1, levels))
        if not config.share_link_tower_layers:
            runs.append((("cross_modal_text_link_tower",), 0, levels - 1))
            runs.append((("cross_modal_image_link_tower",), 0, levels - 1))
        return [run for run in runs if run[2] - run[1] > 1]

    def _run_stack(self, modules: Sequence, step: Callable, carry, xs=None):
        """Apply `step(module, carry, x) -> (carry, y)` over `modules` in order.

        `modules` are layers (or tuples of layers) of one structure, and `xs` a
        pytree whose leaves have one row per module (or None). Returns the last
        carry and the `y`s stacked along a new leading axis (None when `modules`
        is empty).

        With `self.scan_layers`, the modules' parameters are stacked and the
        stack runs as one `lax.scan`, so XLA compiles the step once whatever the
        depth. The bridges still get every layer's output, as the stacked `y`s.
        Otherwise the loop is unrolled. Each step is rematerialised by the
        policy `self.remat` names.
        """
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}."
            )
        if not modules:
            return carry, None
        splits = [nnx.split(module) for module in modules]
        graphdef = splits[0][0]
        scan = (
            self.scan_layers
            and len(modules) > 1
            and all(other == graphdef for other, _ in splits[1:])
        )

        def pure(carry, state_and_x):
            state, x = state_and_x
            return step(nnx.merge(graphdef, state), carry, x)

        policy = REMAT_POLICIES[self.remat]
        if policy is not None:
            # Inside a scan the loop boundary already stops XLA from merging the
            # recomputation with the forward pass, so CSE prevention is not needed.
            pure = jax.checkpoint(pure, policy=policy, prevent_cse=not scan)
        if scan:
            # Stacking copies the layers' parameters, unless they are rows of
            # one stored array (`scanned_runs`), which XLA folds back.
            states = jax.tree.map(
                lambda *leaves: jnp.stack(leaves), *[state for _, state in splits]
            )
            return jax.lax.scan(pure, carry, (states, xs))
        ys = []
        for index, (_, state) in enumerate(splits):
            x = jax.tree.map(lambda leaf, i=index: leaf[i], xs)
            carry, y = pure(carry, (state, x))
            ys.append(y)
        return carry, jax.tree.map(lambda *leaves: jnp.stack(leaves), *ys)

    def _run_text_layers(
        self,
        text: jax.Array,
        text_mask: jax.Array,
        text_layers: Sequence[nnx.Module],
        rngs: nnx.Rngs | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """Run `text_layers` and return the last output and all outputs, stacked."""

        def step(layer, hidden, key):
            hidden = layer(hidden, text_mask, rngs=_dropout_rngs(key))
            hidden = sharding.constrain(hidden, ACTIVATION_AXES)
            return hidden, hidden

        keys = _layer_keys(rngs, len(text_layers))
        return self._run_stack(text_layers, step, text, keys)

    def _run_image_blocks(
        self, image: jax.Array, blocks: Sequence[nnx.Module]
    ) -> tuple[jax.Array, jax.Array | None]:
        """Run the vision `blocks` and return the last output and all outputs, stacked."""

        def step(block, hidden, _):
            hidden = sharding.constrain(block(hidden), ACTIVATION_AXES)
            return hidden, hidden

        return self._run_stack(blocks, step, image)

    def _cross_modal_layers(
        self,
        text_layer: CrossLayer,
        image_layer: CrossLayer,
        cross_text: jax.Array,
        cross_image: jax.Array,
        text_mask: jax.Array | None,
        keys: jax.Array | None,
        class_image_only: bool | jax.Array = False,
    ) -> tuple[jax.Array, jax.Array]:
        """Run one level's text and image cross-modal layers on their inputs.

        Where `class_image_only` (a bool, or a traced scalar inside a scan or
        a rematerialised level) is true, the image layer computes the class
        token's output only. The other rows of the image output are then zeros.

        Inputs and outputs are constrained to the activation layout, like the
        uni-modal streams. Without the input constraint, each input keeps the
        sharding of its transform's output, whose width is split over `tensor`
        (kernel axes `("embed", "mlp")`). XLA's SPMD partitioner (jaxlib 0.10.2)
        then miscompiles the attention output projections on mesh (2, 2, 2). It
        permutes the batch shards of the projection's input and never permutes
        them back, so the residual add mixes different examples.
        """
        cross_text = sharding.constrain(cross_text, ACTIVATION_AXES)
        cross_image = sharding.constrain(cross_image, ACTIVATION_AXES)
        text_key, image_key = (None, None) if keys is None else (keys[0], keys[1])
        # The image stream is never padded, so only keys of the text stream are masked.
        text_out = text_layer(
            cross_text, cross_image, text_mask, None, rngs=_dropout_rngs(text_key)
        )

        def image_rows(queries):
            # The Rngs is created here, inside a branch of `lax.cond` below,
            # because NNX raises when a trace advances one created outside it.
            return image_layer(
                cross_image,
                cross_text,
                None,
                text_mask,
                rngs=_dropout_rngs(image_key),
                queries=queries,
            )

        def class_row():
            row = image_rows(1)
            return jnp.pad(row, ((0, 0), (0, cross_image.shape[1] - 1), (0, 0)))

        if isinstance(class_image_only, bool | np.bool_):
            image_out = class_row() if class_image_only else image_rows(None)
        else:
            image_out = jax.lax.cond(
                class_image_only, class_row, functools.partial(image_rows, None)
            )
        return (
            sharding.constrain(text_out, ACTIVATION_AXES),
            sharding.constrain(image_out, ACTIVATION_AXES),
        )

    def forward_trace(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        pixel_values: jax.Array,
        *,
        interpolate_pos_encoding: bool = False,
        image_token_type_idx: int = 1,
        dropout_rng: jax.Array | None = None,
        image_hidden_states: jax.Array | None = None,
        text_hidden_states: jax.Array | None = None,
        image_bridge_inputs: jax.Array | None = None,
        full_image_features: bool = True,
    ) -> ForwardTrace:
        """Run the model and keep every intermediate a head may need.

        With `full_image_features=False`, the last image cross-modal layer
        computes the class token only, which is all the pooler reads. The
        trace's `image_features` and the last image entry of
        `cross_hidden_states` are then `(batch, 1, width)`. In the base model
        this skips about a tenth of the cross-modal tower's matmuls. Without
        dropout the pooled output is the full pass's. With dropout, that
        layer's class-token masks are other random draws than the full pass's,
        so a training loss differs between the two passes by that draw.

        `image_hidden_states` (from `image_hidden_states`) replaces the vision
        encoder's pass, and `pixel_values` must then be None.
        `image_bridge_inputs` (from `image_bridge_inputs`) replaces both the
        vision encoder and the bridges' image transforms. `pixel_values` must be
        None, and the trace's `image_hidden_states` is then empty. The token-type
        row is already in them, so a non-default `image_token_type_idx` must go
        to `image_bridge_inputs` instead. With either kind of precomputed
        states, `interpolate_pos_encoding` has no effect.
        `text_hidden_states` (from `text_hidden_states`) replaces the text
        encoder's pass; `input_ids` must still be given, for their shape.
        """
        config = self.config
        check_text_inputs(config, input_ids, attention_mask)
        batch, levels = input_ids.shape[0], config.num_hidden_layers
        if image_bridge_inputs is not None:
            if image_hidden_states is not None:
                raise ValueError(
                    "pass either image_hidden_states or image_bridge_inputs, not both."
                )
            self._check_hidden_states(
                "image_bridge_inputs", image_bridge_inputs, levels, batch
            )
            if (image_token_type_idx or 1) != 1:
                raise ValueError(
                    f"image_token_type_idx={image_token_type_idx} has no effect on "
                    "image_bridge_inputs, which already contain the token-type "
                    "row; pass it to image_bridge_inputs(...) instead."
                )
        if text_hidden_states is not None:
            self._check_hidden_states(
                "text_hidden_states",
                text_hidden_states,
                config.text_split_index + levels,
                batch,
            )
        if image_hidden_states is not None or image_bridge_inputs is not None:
            name = (
                "image_hidden_states"
                if image_bridge_inputs is None
                else "image_bridge_inputs"
            )
            if pixel_values is not None:
                raise ValueError(f"pass either pixel_values or {name}, not both.")
            if image_hidden_states is not None:
                self._check_hidden_states(
                    "image_hidden_states",
                    image_hidden_states,
                    config.vision_split_index + levels,
                    batch,
                )
        elif pixel_values is None:
            raise ValueError(
                "pixel_values are required: BridgeTower always takes an image."
            )
        elif pixel_values.ndim >= 1 and pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"pixel_values hold {pixel_values.shape[0]} images but input_ids hold "
                f"{input_ids.shape[0]} texts; pass one image per text."
            )
        self._image_type_row(image_token_type_idx)  # Raises for a bad index.
        rngs = None if dropout_rng is None else nnx.Rngs(dropout=dropout_rng)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        text_mask = layers.key_padding_mask(attention_mask)

        # Text layers never see the image and vision blocks never see the text,
        # so each uni-modal stack runs whole before the cross-modal tower. The
        # reference interleaves them level by level; the results are the same.
        if text_hidden_states is None:
            text_hidden_states = self._encode_text(input_ids, text_mask, rngs)
        text_stack = text_hidden_states[1:]
        text_hidden = _unstack(text_hidden_states)

        image_hidden = []
        if image_bridge_inputs is None:
            if image_hidden_states is None:
                image_hidden_states = self.image_hidden_states(
                    pixel_values, interpolate_pos_encoding=interpolate_pos_encoding
                )
            image_hidden = _unstack(image_hidden_states)
            image_bridge_inputs = self.image_bridge_inputs(
                image_hidden_states, image_token_type_idx=image_token_type_idx
            )

        # Token-type rows are broadcast over every position of their stream.
        text_type = self.token_type_embeddings.embedding[0]
        cross_keys = None
        if rngs is not None:
            cross_keys = jax.random.split(rngs.dropout(), (levels, 2))

        # Level 0: the uni-modal outputs at the split, transformed and normalised.
        text_split = config.text_split_index
        cross_text = self.cross_modal_text_layernorm(
            self.text_transform(text_hidden[text_split], 0) + text_type
        )
        cross_image = image_bridge_inputs[0]

        def first_level(modules, carry, keys):
            text_layer, image_layer = modules
            outputs = self._cross_modal_layers(
                text_layer,
                image_layer,
                *carry,
                text_mask,
                keys,
                class_image_only=not full_image_features and levels == 1,
            )
            return outputs, outputs

        first_keys = None if cross_keys is None else cross_keys[:1]
        (text_out, image_out), _ = self._run_stack(
            [(self.cross_modal_text_layers[0], self.cross_modal_image_layers[0])],
            first_level,
            (cross_text, cross_image),
            first_keys,
        )
        cross_hidden = [(text_out, image_out)]

        # Levels 1..X-1: each level's uni-modal outputs are merged into the
        # previous level's cross-modal outputs by the link towers.
        def later_level(modules, carry, inputs):
            text_transform, text_link, image_link, *cross = modules
            text_in, image_in, keys, last = inputs
            previous_text, previous_image = carry
            cross_text = text_link(text_transform(text_in) + text_type, previous_text)
            cross_image = image_link(image_in, previous_image)
            outputs = self._cross_modal_layers(
                *cross,
                cross_text,
                cross_image,
                text_mask,
                keys,
                class_image_only=False if last is None else last,
            )
            return outputs, outputs

        if levels > 1:
            # Layer text_split - 1 + level (0-based) outputs row text_split + level
            # of text_hidden, which is row text_split - 1 + level of text_stack.
            inputs = (
                text_stack[text_split : text_split + levels - 1],
                image_bridge_inputs[1:],
                None if cross_keys is None else cross_keys[1:],
                # Inside a scan the flag is traced, so the last level picks the
                # class-token-only branch with `lax.cond`.
                None if full_image_features else np.arange(1, levels) == levels - 1,
            )
            level_modules = [
                (
                    self._text_transform_module(level),
                    *self.link_towers(level),
                    self.cross_modal_text_layers[level],
                    self.cross_modal_image_layers[level],
                )
                for level in range(1, levels)
            ]
            (text_out, image_out), (text_outs, image_outs) = self._run_stack(
                level_modules, later_level, (text_out, image_out), inputs
            )
            cross_hidden += list(
                zip(_unstack(text_outs), _unstack(image_outs), strict=True)
            )

        if not full_image_features:
            image_out = image_out[:, :1]
            cross_hidden[-1] = (cross_hidden[-1][0], image_out)
        pooler_output = jnp.concatenate(
            [
                self.cross_modal_text_pooler(text_out),
                self.cross_modal_image_pooler(image_out),
            ],
            axis=-1,
        )
        return ForwardTrace(
            text_features=text_out,
            image_features=image_out,
            pooler_output=pooler_output,
            text_hidden_states=text_hidden,
            image_hidden_states=image_hidden,
            cross_hidden_states=cross_hidden,
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        pixel_mask: jax.Array | None = None,
        *,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: bool = False,
        image_token_type_idx: int = 1,
        dropout_rng: jax.Array | None = None,
    ) -> BridgeTowerModelOutput:
        """Encode image-text pairs.

        Args:
          input_ids: `(batch, length)` RoBERTa token ids.
          attention_mask: `(batch, length)`, 1 for tokens to attend to and 0 for
            padding; all ones when None. A row of zeros is allowed and gives
            uniform attention, as in the reference.
          pixel_values: `(batch, height, width, channels)` normalised floats.
          pixel_mask: accepted for signature compatibility and ignored, as in the
            reference: the image stream is never masked.
          interpolate_pos_encoding: resample the position table to the image size.
          output_hidden_states: also return every layer's hidden states.
          image_token_type_idx: token-type row added to the image stream (1).
          dropout_rng: a PRNG key to run with dropout (training); None runs
            deterministically.
        """
        del pixel_mask
        trace = self.forward_trace(
            input_ids,
            attention_mask,
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            image_token_type_idx=image_token_type_idx,
            dropout_rng=dropout_rng,
        )
        return BridgeTowerModelOutput(
            text_features=trace.text_features,
            image_features=trace.image_features,
            pooler_output=trace.pooler_output,
            hidden_states=trace.hidden_states() if output_hidden_states else None,
        )


def _unstack(stacked: jax.Array | None) -> list[jax.Array]:
    """Return the rows of a stacked array, or an empty list for None."""
    if stacked is None:
        return []
    return [stacked[index] for index in range(stacked.shape[0])]


def _layer_keys(rngs: nnx.Rngs | None, count: int) -> jax.Array | None:
    """Draw one dropout key per layer of a stack, or None without dropout."""
    if rngs is None or count == 0:
        return None
    return jax.random.split(rngs.dropout(), count)


def _dropout_rngs(key: jax.Array | None) -> nnx.Rngs | None:
    return None if key is None else nnx.Rngs(dropout=key)


def _eager_sharding_if_mesh():
    """Shard parameters at creation only when a mesh is active.

    Flax 0.12 shards annotated parameters eagerly and raises outside a mesh; a
    single-device model needs no sharding, so it is built with eager sharding off.
    """
    return nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty)

"""Analytic matmul FLOP counts of BridgeTower's forward pass and training step.

Every Linear layer, attention matmul and the patch-embedding convolution
counts 2 * m * n * k FLOPs, the convention of `torch.utils.flop_counter`.
Elementwise work (LayerNorm, softmax, GELU, residual adds, the optimizer
update) is not counted. `config` is a Hugging Face `config.json` dict, as
`python -m convert init-random` writes it.

The count follows the order of transformers' `BridgeTowerModel.forward`:

- text encoder: all text layers on `length` tokens;
- vision encoder: patch embedding, then as many CLIP blocks as there are text
  layers on `patches + 1` tokens;
- bridges: the text transform on every text token and the image transform on
  every image token, once per cross-modal layer;
- cross-modal layers: self-attention, cross-attention to the other
  modality and the feed-forward block, in the text and the image stream;
- poolers: one Linear on the first token of each stream.

Counts cover the matmuls that a pass's outputs depend on, which is what
bt-jax runs under XLA. The MLM head reads only the text stream, so an MLM
pass needs neither the last image cross-modal layer nor the poolers. XLA
removes them as dead code. The ITM and ITC heads read the image stream's
class token only, so the last image cross-modal layer needs that token's
query, attention and feed-forward, and the keys and values of every token.
bt-jax's heads compute just that (`forward_trace(full_image_features=False)`).
PyTorch's eager mode runs all of it (`reference_extra_flops`). One exception
goes the other way: bt-jax's fused train step runs that class-token work and
the poolers on its MLM pairs too, because they share one batch with the ITM
and ITC pairs. That is about 0.35% of the base step, left out of the count.
"""

from __future__ import annotations

HEADS = ("mlm", "itm", "itc")


def linear_flops(tokens: int, in_features: int, out_features: int) -> int:
    return 2 * tokens * in_features * out_features


def attention_flops(query_tokens: int, key_tokens: int, width: int) -> int:
    """Return the FLOPs of Q @ K^T and of the weights @ V over all heads together."""
    return 2 * 2 * query_tokens * key_tokens * width


def _encoder_layer_flops(tokens: int, width: int, intermediate: int) -> int:
    """Return the FLOPs of one self-attention + feed-forward layer (BERT or CLIP)."""
    return (
        linear_flops(tokens, width, 3 * width)
        + attention_flops(tokens, tokens, width)
        + linear_flops(tokens, width, width)
        + linear_flops(tokens, width, intermediate)
        + linear_flops(tokens, intermediate, width)
    )


def _cross_layer_flops(
    tokens: int,
    other_tokens: int,
    width: int,
    intermediate: int,
    queries: int | None = None,
) -> int:
    """Return the FLOPs of one cross-modal layer of the stream with `tokens` tokens.

    With `queries`, the layer computes the outputs of that many tokens only;
    its self-attention still projects keys and values for all `tokens`.
    """
    queries = tokens if queries is None else queries
    self_attention = (
        linear_flops(queries, width, width)  # query
        + linear_flops(tokens, width, 2 * width)  # key and value
        + attention_flops(queries, tokens, width)
        + linear_flops(queries, width, width)  # output
    )
    cross_attention = (
        linear_flops(queries, width, width)  # query
        + linear_flops(other_tokens, width, 2 * width)  # key and value
        + attention_flops(queries, other_tokens, width)
        + linear_flops(queries, width, width)  # output
    )
    feed_forward = linear_flops(queries, width, intermediate) + linear_flops(
        queries, intermediate, width
    )
    return self_attention + cross_attention + feed_forward


def _class_token_savings(
    config: dict, length: int, image_size: int | None = None
) -> int:
    """Return the FLOPs the last image cross-modal layer saves on the class token only."""
    width = config["hidden_size"]
    intermediate = config["text_config"]["intermediate_size"]
    tokens = image_tokens(config, image_size)
    return _cross_layer_flops(tokens, length, width, intermediate) - _cross_layer_flops(
        tokens, length, width, intermediate, queries=1
    )


def image_tokens(config: dict, image_size: int | None = None) -> int:
    """Return the number of vision tokens: the patches plus the class token."""
    vision = config["vision_config"]
    side = (image_size or vision["image_size"]) // vision["patch_size"]
    return side * side + 1


def _unpooled_tail_flops(
    config: dict, length: int, image_size: int | None = None
) -> int:
    """Return the FLOPs of the last image cross-modal layer and of the two poolers.

    Only the poolers read them, so a pass without the ITM or ITC head does
    not need them.
    """
    width = config["hidden_size"]
    intermediate = config["text_config"]["intermediate_size"]
    tokens = image_tokens(config, image_size)
    return _cross_layer_flops(tokens, length, width, intermediate) + 2 * linear_flops(
        1, width, width
    )


def backbone_flops(
    config: dict, length: int, image_size: int | None = None, *, pooled: bool = True
) -> int:
    """Return the matmul FLOPs of `BridgeTowerModel` for one image-text pair.

    With `pooled=True`, the last image cross-modal layer computes the class
    token only, as the ITM and ITC heads need. With `pooled=False`, leave out
    that layer and the poolers.
    """
    text, vision = config["text_config"], config["vision_config"]
    width = config["hidden_size"]
    if text["hidden_size"] != width:
        raise ValueError(
            f"the cross-modal layers are built from text_config, so its hidden_size "
            f"({text['hidden_size']}) must equal hidden_size ({width})."
        )
    text_layers = text["num_hidden_layers"]
    if vision["num_hidden_layers"] < text_layers:
        raise ValueError(
            f"the backbone runs one CLIP block per text layer ({text_layers}), but "
            f"vision_config has only {vision['num_hidden_layers']}."
        )
    total = text_flops(config, length)
    total += vision_flops(config, image_size)
    total += cross_modal_flops(config, length, image_size, class_token_only=pooled)
    if not pooled:
        total -= _unpooled_tail_flops(config, length, image_size)
    return total


def text_flops(config: dict, length: int) -> int:
    """Return the matmul FLOPs of the text encoder for one text of `length` tokens."""
    text = config["text_config"]
    return text["num_hidden_layers"] * _encoder_layer_flops(
        length, text["hidden_size"], text["intermediate_size"]
    )


def cross_modal_flops(
    config: dict,
    length: int,
    image_size: int | None = None,
    *,
    class_token_only: bool = False,
) -> int:
    """Return the matmul FLOPs of the bridges, cross-modal layers and poolers for one pair.

    With `class_token_only`, the last image layer computes the class token
    only, as `forward_trace(full_image_features=False)` does.
    """
    text, vision = config["text_config"], config["vision_config"]
    width, intermediate = config["hidden_size"], text["intermediate_size"]
    tokens = image_tokens(config, image_size)
    layers = config["num_hidden_layers"]
    total = layers * (
        linear_flops(length, text["hidden_size"], width)
        + linear_flops(tokens, vision["hidden_size"], width)
    )
    total += layers * (
        _cross_layer_flops(length, tokens, width, intermediate)
        + _cross_layer_flops(tokens, length, width, intermediate)
    )
    if class_token_only:
        total -= _class_token_savings(config, length, image_size)
    return total + 2 * linear_flops(1, width, width)  # the two poolers


def head_flops(config: dict, head: str, length: int) -> int:
    """Return the matmul FLOPs of one head for one pair, as bt-jax computes it."""
    width = config["hidden_size"]
    if head == "mlm":
        vocab = config["text_config"]["vocab_size"]
        return linear_flops(length, width, width) + linear_flops(length, width, vocab)
    if head == "itm":
        return linear_flops(1, 2 * width, 2)
    if head == "itc":
        dim = config["contrastive_hidden_size"]
        vision_width = config["vision_config"]["hidden_size"]
        return (
            linear_flops(1, width, dim)  # text head on the CLS token
            + linear_flops(1, vision_width, width)  # image transform, class token
            + linear_flops(1, width, dim)  # image head
            + linear_flops(1, 2 * width, dim)  # cross-modal head on the pooler
        )
    raise ValueError(f"head={head!r} is unknown; use one of {', '.join(HEADS)}.")


def forward_flops(
    config: dict,
    batch: int,
    length: int,
    heads: str | tuple[str, ...],
    image_size: int | None = None,
) -> int:
    """Return the matmul FLOPs of one forward pass with `heads` on `batch` pairs."""
    heads = (heads,) if isinstance(heads, str) else heads
    pooled = "itm" in heads or "itc" in heads
    per_pair = backbone_flops(config, length, image_size, pooled=pooled) + sum(
        head_flops(config, head, length) for head in heads
    )
    return batch * per_pair


def similarity_flops(config: dict, batch: int) -> int:
    """Return the FLOPs of one (batch, batch) matrix of ITC embedding dot products."""
    return 2 * batch * batch * config["contrastive_hidden_size"]


def reference_extra_flops(
    config: dict, head: str, batch: int, length: int, image_size: int | None = None
) -> int:
    """Return the FLOPs that transformers 5.25's head class adds to `forward_flops`.

    - MLM: the backbone runs the last image cross-modal layer and the poolers.
    - ITM and ITC: the last image cross-modal layer computes every token, not
      only the class token.
    - ITC: also, the image transform runs on every image token before the
      class token is kept, and the three similarity matrices of the loss are
      always computed. bt-jax transforms the class token only and computes the
      similarities for the loss only.
    """
    if head == "mlm":
        return batch * _unpooled_tail_flops(config, length, image_size)
    last_layer = batch * _class_token_savings(config, length, image_size)
    if head == "itc":
        tokens = image_tokens(config, image_size)
        vision_width = config["vision_config"]["hidden_size"]
        transform = linear_flops(tokens - 1, vision_width, config["hidden_size"])
        return last_layer + batch * transform + 3 * similarity_flops(config, batch)
    if head == "itm":
        return last_layer
    raise ValueError(f"head={head!r} is unknown; use one of {', '.join(HEADS)}.")


def vision_flops(config: dict, image_size: int | None = None) -> int:
    """Return the matmul FLOPs of the vision encoder for one image, as the backbone runs it."""
    vision = config["vision_config"]
    width, patch = vision["hidden_size"], vision["patch_size"]
    tokens = image_tokens(config, image_size)
    patches = linear_flops(tokens - 1, vision.get("num_channels", 3) * patch**2, width)
    blocks = config["text_config"]["num_hidden_layers"]
    return patches + blocks * _encoder_layer_flops(tokens, width, 4 * width)


def train_forward_flops(
    config: dict, batch: int, length: int, *, share_image_encoding: bool = True
) -> int:
    """Return the forward matmul FLOPs of one MLM + ITM + ITC step (`pretraining_loss`).

    The step runs three passes: MLM on the masked texts (`batch` pairs), the
    positive pass with the ITM and ITC heads (`batch` pairs) and the ITM pass on
    the `2 * batch` negative pairs. The ITC loss adds three similarity matrices,
    and the draw of hard negatives a fourth. With `share_image_encoding` the
    vision encoder and the bridges' image transforms run once on the `batch`
    images instead of in each pass.
    """
    total = (
        forward_flops(config, batch, length, "mlm")
        + forward_flops(config, batch, length, ("itm", "itc"))
        + 4 * similarity_flops(config, batch)
        + forward_flops(config, 2 * batch, length, "itm")
    )
    if share_image_encoding:
        vision = config["vision_config"]
        transforms = config["num_hidden_layers"] * linear_flops(
            image_tokens(config), vision["hidden_size"], config["hidden_size"]
        )
        total -= 3 * batch * (vision_flops(config) + transforms)
    return total


def train_step_flops(
    config: dict, batch: int, length: int, *, share_image_encoding: bool = True
) -> int:
    """Return the matmul FLOPs of one training step: forward and backward.

    Each pass counts 3x its forward FLOPs: the forward, then the gradients of
    the activations and of the weights. The similarity that draws the
    negatives is under stop_gradient, so it counts once. No gradient flows to
    the pixels, so the patch embedding's input gradient (1x its forward FLOPs
    per pass) is counted but not computed.
    """
    sampling = similarity_flops(config, batch)
    forward = train_forward_flops(
        config, batch, length, share_image_encoding=share_image_encoding
    )
    return 3 * (forward - sampling) + sampling


def train_reference_extra_flops(
    config: dict, batch: int, length: int, *, backward: bool = True
) -> int:
    """Return the FLOPs `bench/torch_train.py` adds to `train_step_flops`.

    Its MLM pass runs the last image cross-modal layer and the poolers, which
    no loss reads, so autograd skips their backward. Its positive and negative
    passes run the last image cross-modal layer on every token, and the ITM
    and ITC losses do reach it, so that extra work counts 3x, as the rest of
    the step does. `backward=False` returns the forward passes' extra only.
    """
    mlm = batch * _unpooled_tail_flops(config, length)
    pooled = 3 * batch * _class_token_savings(config, length)
    return mlm + (3 if backward else 1) * pooled

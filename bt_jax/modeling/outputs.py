"""Model outputs. Field names are those of the transformers output classes.

They are `flax.struct` dataclasses, so they are pytrees and can be returned from
`jax.jit`. `hidden_states`, when requested, is a tuple of three tuples:

- text: the embedding output, then the output of every text layer;
- image: the `ln_pre` output, then the output of every vision block, each
  `(batch, tokens, width)` (PyTorch returns these sequence-first);
- cross: one `(text, image)` pair per cross-modal layer.
"""

from __future__ import annotations

import jax
from flax import struct

HiddenStates = tuple[
    tuple[jax.Array, ...],
    tuple[jax.Array, ...],
    tuple[tuple[jax.Array, jax.Array], ...],
]


@struct.dataclass
class BridgeTowerModelOutput:
    text_features: jax.Array
    image_features: jax.Array
    pooler_output: jax.Array
    hidden_states: HiddenStates | None = None


@struct.dataclass
class MaskedLMOutput:
    logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: HiddenStates | None = None


@struct.dataclass
class SequenceClassifierOutput:
    logits: jax.Array
    loss: jax.Array | None = None
    hidden_states: HiddenStates | None = None


@struct.dataclass
class ContrastiveOutput:
    """Output of the ITC head.

    `logits` stacks the three L2-normalised embeddings as `(batch, 3, dim)` in the
    order text, image, cross, exactly as the reference; it is not a similarity
    matrix.
    """

    logits: jax.Array
    text_embeds: jax.Array
    image_embeds: jax.Array
    cross_embeds: jax.Array
    loss: jax.Array | None = None
    hidden_states: HiddenStates | None = None


@struct.dataclass
class PreTrainingOutput:
    """Output of `BridgeTowerForPreTraining`: one field per head, None when not run.

    `mlm_logits` is `(batch, length, vocab)`, `itm_logits` `(batch, 2)` (class 1
    is a match) and the three ITC embeddings are L2-normalised `(batch, dim)`.
    """

    mlm_logits: jax.Array | None = None
    itm_logits: jax.Array | None = None
    text_embeds: jax.Array | None = None
    image_embeds: jax.Array | None = None
    cross_embeds: jax.Array | None = None
    pooler_output: jax.Array | None = None
    hidden_states: HiddenStates | None = None

"""Partition specs of every base-model parameter under DEFAULT_RULES, checked against a golden table.

The model is the pretraining model with the MLM, ITM and ITC heads, built the
way `Trainer` builds it, on an abstract (data=2, fsdp=2, tensor=2) mesh: only
shapes are traced, so no parameter is allocated and no device is needed.

Regenerate the golden file after a deliberate layout change, then review its
diff by hand:

    .venv/bin/python tests/test_partition_specs.py --write
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from bt_jax import sharding
from bt_jax.config import load_preset
from bt_jax.modeling.heads import BridgeTowerForPreTraining

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "partition_specs_base.txt"
MESH_SHAPE = {"data": 2, "fsdp": 2, "tensor": 2}
HEADS = ("mlm", "itm", "itc")
# configs/base.py has no ITC head sizes. These are the values of the released
# itm-mlm-itc checkpoints (as in configs/large.py).
ITC_SIZES = {"contrastive_hidden_size": 512, "logit_scale_init_value": 2.6592}
MAX_DIFF_LINES = 80

HEADER = """\
# Golden table: the PartitionSpec of every parameter of the base pretraining
# model (configs/base.py with the MLM, ITM and ITC heads, contrastive_hidden_size
# 512), under bt_jax.sharding.DEFAULT_RULES on a mesh (data=2, fsdp=2,
# tensor=2). Dimensions the mesh does not divide are replicated (fit_spec).
# One line per parameter: name, shape, spec. Sorted by name, with layer
# indices in numeric order.
# Regenerate only after a deliberate layout change, and review the diff by
# hand against the layout rules in tests/test_partition_specs.py:
#   .venv/bin/python tests/test_partition_specs.py --write
"""


def abstract_params() -> nnx.State:
    """Trace the base pretraining model's parameters as Trainer._model builds them."""
    config = load_preset(REPO / "configs" / "base.py").replace(**ITC_SIZES)

    def build():
        rules = list(sharding.DEFAULT_RULES)
        with nnx.logical_axis_rules(rules), nnx.use_eager_sharding(False):
            return BridgeTowerForPreTraining(
                config, heads=HEADS, rngs=nnx.Rngs(params=0)
            )

    model = nnx.eval_shape(build)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    assert not jax.tree.leaves(rest), "the model has state other than parameters"
    return params


def _natural_key(name: str) -> tuple:
    """Sort key that orders `layer.2` before `layer.10`."""
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in name.split(".")
    )


def partition_table() -> dict[str, tuple[tuple[int, ...], tuple]]:
    """Map each parameter's dotted name to its (shape, PartitionSpec as a tuple)."""
    params = abstract_params()
    mesh = AbstractMesh(
        tuple(MESH_SHAPE.values()),
        tuple(MESH_SHAPE),
        axis_types=(AxisType.Auto,) * len(MESH_SHAPE),
    )
    shardings = dict(nnx.to_flat_state(sharding.param_shardings(params, mesh)))
    table = {}
    for path, variable in nnx.to_flat_state(params):
        name = ".".join(map(str, path))
        spec = shardings[path].get_value().spec
        table[name] = (tuple(variable.shape), tuple(spec))
    return dict(sorted(table.items(), key=lambda item: _natural_key(item[0])))


def format_table(table: dict[str, tuple[tuple[int, ...], tuple]]) -> list[str]:
    return [f"{name} {shape} {spec}" for name, (shape, spec) in table.items()]


def read_golden() -> list[str]:
    lines = GOLDEN.read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def table():
    return partition_table()


def test_partition_specs_match_golden(table):
    expected = read_golden()
    actual = format_table(table)
    if actual != expected:
        diff = list(
            difflib.unified_diff(
                expected,
                actual,
                fromfile=str(GOLDEN.relative_to(REPO)),
                tofile="computed",
                lineterm="",
            )
        )
        excerpt = "\n".join(diff[:MAX_DIFF_LINES])
        more = len(diff) - MAX_DIFF_LINES
        if more > 0:
            excerpt += f"\n... {more} more diff lines"
        pytest.fail(
            "partition specs differ from the golden table. If the layout change is "
            "intended, regenerate it with `python tests/test_partition_specs.py "
            f"--write` and review the diff.\n{excerpt}"
        )


# Layer indices are written as \d+. Each rule also states how many parameters
# it matches, so a pattern that stops matching after a rename fails instead of
# checking nothing. The base model has 12 text layers, 12 vision blocks, and 6
# cross-modal layers and 5 link towers per modality.
TEXT = r"bridgetower\.text_model\.encoder\.layer\.\d+"
CROSS = r"bridgetower\.cross_modal_(text|image)_layers\.\d+"
BLOCK = r"bridgetower\.vision_model\.visual\.transformer\.resblocks\.\d+"
ATTENTION = rf"({TEXT}\.attention|{CROSS}\.(attention|crossattention))"
FFN = rf"({TEXT}|{CROSS})"


def rule(rule_id, pattern, shape, spec, count):
    """A layout rule: parameters matching `pattern` have `shape` (None: any) and `spec`."""
    return pytest.param(pattern, shape, spec, count, id=rule_id)


LAYOUT_RULES = [
    # Column-parallel: input features over fsdp, output features (heads) over tensor.
    rule(
        "qkv-kernel",
        rf"{ATTENTION}\.self\.(query|key|value)\.kernel",
        (768, 12, 64),
        ("fsdp", "tensor", None),
        108,
    ),
    rule(
        "qkv-bias",
        rf"{ATTENTION}\.self\.(query|key|value)\.bias",
        (12, 64),
        ("tensor", None),
        108,
    ),
    rule(
        "in_proj-kernel",
        rf"{BLOCK}\.attn\.in_proj\.kernel",
        (768, 3, 12, 64),
        ("fsdp", None, "tensor", None),
        12,
    ),
    rule(
        "in_proj-bias",
        rf"{BLOCK}\.attn\.in_proj\.bias",
        (3, 12, 64),
        (None, "tensor", None),
        12,
    ),
    rule(
        "intermediate-kernel",
        rf"{FFN}\.intermediate\.dense\.kernel",
        (768, 3072),
        ("fsdp", "tensor"),
        24,
    ),
    rule(
        "intermediate-bias",
        rf"{FFN}\.intermediate\.dense\.bias",
        (3072,),
        ("tensor",),
        24,
    ),
    rule(
        "c_fc-kernel",
        rf"{BLOCK}\.mlp\.c_fc\.kernel",
        (768, 3072),
        ("fsdp", "tensor"),
        12,
    ),
    rule("c_fc-bias", rf"{BLOCK}\.mlp\.c_fc\.bias", (3072,), ("tensor",), 12),
    # Row-parallel: input features (heads) over tensor, output features over fsdp.
    rule(
        "attention-output-kernel",
        rf"{ATTENTION}\.output\.dense\.kernel",
        (12, 64, 768),
        ("tensor", None, "fsdp"),
        36,
    ),
    rule(
        "out_proj-kernel",
        rf"{BLOCK}\.attn\.out_proj\.kernel",
        (12, 64, 768),
        ("tensor", None, "fsdp"),
        12,
    ),
    rule(
        "ffn-output-kernel",
        rf"{FFN}\.output\.dense\.kernel",
        (3072, 768),
        ("tensor", "fsdp"),
        24,
    ),
    rule(
        "c_proj-kernel",
        rf"{BLOCK}\.mlp\.c_proj\.kernel",
        (3072, 768),
        ("tensor", "fsdp"),
        12,
    ),
    rule(
        "row-parallel-bias",
        rf"({ATTENTION}\.output\.dense|{FFN}\.output\.dense"
        rf"|{BLOCK}\.(attn\.out_proj|mlp\.c_proj))\.bias",
        (768,),
        ("fsdp",),
        84,
    ),
    # Every LayerNorm scale and bias splits the model width over fsdp.
    rule(
        "layernorm",
        r".*(LayerNorm|layernorm|ln_\w+)\.(scale|bias)",
        (768,),
        ("fsdp",),
        200,
    ),
    # Embeddings: width over fsdp. The vocabulary would go over tensor, but
    # 50265 is odd, so fit_spec replicates it. Position and token-type rows
    # are never split.
    rule(
        "word-embeddings",
        r"bridgetower\.text_model\.embeddings\.word_embeddings\.embedding",
        (50265, 768),
        (None, "fsdp"),
        1,
    ),
    rule(
        "position-and-token-type-embeddings",
        r"bridgetower\..*(position|token_type)_embeddings?\.embedding",
        None,
        (None, "fsdp"),
        4,
    ),
    # The MLM decoder's vocabulary dimension is odd as well.
    rule(
        "mlm-decoder",
        r"mlm_score\.decoder\.kernel",
        (768, 50265),
        ("fsdp", None),
        1,
    ),
    rule("mlm-bias", r"mlm_score\.bias", (50265,), (None,), 1),
    rule(
        "patch-embedding",
        r"bridgetower\.vision_model\.visual\.embeddings\.patch_embedding\.kernel",
        (16, 16, 3, 768),
        (None, None, None, "fsdp"),
        1,
    ),
    rule(
        "class-embedding",
        r"bridgetower\.vision_model\.visual\.embeddings\.class_embedding",
        (768,),
        ("fsdp",),
        1,
    ),
    # Small heads: input over fsdp, the 2 ITM classes and 512 ITC features
    # replicated.
    rule("itm-kernel", r"itm_score\.fc\.kernel", (1536, 2), ("fsdp", None), 1),
    rule(
        "itc-unimodal-kernel",
        r"itc_(text|image)_head\.fc\.kernel",
        (768, 512),
        ("fsdp", None),
        2,
    ),
    rule(
        "itc-cross-modal-kernel",
        r"itc_cross_modal_head\.fc\.kernel",
        (1536, 512),
        ("fsdp", None),
        1,
    ),
    rule("small-head-bias", r"(itm_score|itc_\w+_head)\.fc\.bias", None, (None,), 4),
    rule("logit_scale", r"logit_scale", (), (), 1),
]

# NOTE: the poolers, the cross-modal transforms and the MLM transform dense
# (768 -> 768) are column-parallel, ('fsdp', 'tensor') with the bias over
# tensor, but no row-parallel layer follows them, so their output is gathered
# again. The layout above does not cover them, so only the golden table pins
# their specs.


@pytest.mark.parametrize(("pattern", "shape", "spec", "count"), LAYOUT_RULES)
def test_partition_specs_follow_layout(table, pattern, shape, spec, count):
    matches = {
        name: entry for name, entry in table.items() if re.fullmatch(pattern, name)
    }
    assert len(matches) == count, sorted(matches)
    for name, (actual_shape, actual_spec) in matches.items():
        if shape is not None:
            assert actual_shape == shape, name
        assert actual_spec == spec, name


def test_partition_specs_split_evenly(table):
    for name, (shape, spec) in table.items():
        assert len(spec) == len(shape), name
        used = [axis for axis in spec if axis is not None]
        assert len(used) == len(set(used)), f"{name} uses a mesh axis twice: {spec}"
        # Parameters are replicated over the data axis, which only splits the batch.
        assert "data" not in used, name
        for size, axis in zip(shape, spec, strict=True):
            if axis is not None:
                assert size % MESH_SHAPE[axis] == 0, f"{name}: {size} over {axis}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write",
        action="store_true",
        help=f"overwrite {GOLDEN.relative_to(REPO)} instead of printing the table",
    )
    args = parser.parse_args()
    text = HEADER + "\n".join(format_table(partition_table())) + "\n"
    if args.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
        print(f"wrote {GOLDEN}", file=sys.stderr)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()

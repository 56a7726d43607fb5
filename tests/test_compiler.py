"""Tests for the CPU compiler options of bt-jax's jitted functions."""

import logging

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import tiny_config, ynn_fusion_ops

import bt_jax
from bt_jax import compiler
from bt_jax.config import BridgeTowerConfig
from bt_jax.inference import jit_model_function

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the options are for XLA's CPU backend"
)


@pytest.fixture
def fresh_options():
    # `compiler_options` decides once per process, so each test clears that cache.
    compiler._checked_options.cache_clear()
    yield
    compiler._checked_options.cache_clear()


def _layer(x, w):
    # A matmul followed by a LayerNorm and a softmax: the matmul and the
    # reductions that the options keep out of YNNPACK.
    y = x @ w
    mean = y.mean(-1, keepdims=True)
    y = (y - mean) * jax.lax.rsqrt(((y - mean) ** 2).mean(-1, keepdims=True) + 1e-5)
    return jax.nn.softmax(y, axis=-1).sum()


def _patch_embedding(pixels, kernel):
    # The vision tower's patch embedding: the convolution that stays in YNNPACK.
    return jax.lax.conv_general_dilated(
        pixels, kernel, (16, 16), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _compiled_text(fn, options, *shapes):
    arrays = [jnp.ones(shape) for shape in shapes]
    return jax.jit(fn, compiler_options=options).lower(*arrays).compile().as_text()


LAYER_SHAPES = ((64, 256), (256, 256))
PATCH_SHAPES = ((2, 64, 64, 3), (16, 16, 3, 32))


def _has_reduction(fusions):
    return any(ops & {"reduce", "reduce-window"} for ops in fusions)


def test_compiler_options_exclude_ynn_matmuls(fresh_options):
    options = bt_jax.compiler_options()
    assert options is not None
    assert ynn_fusion_ops(_compiled_text(_layer, options, *LAYER_SHAPES)) == []
    # The control: XLA's defaults do put the matmul and a reduction in
    # YNNPACK, so the check above can fail.
    defaults = ynn_fusion_ops(_compiled_text(_layer, None, *LAYER_SHAPES))
    assert {"dot"} in defaults
    assert _has_reduction(defaults)


def test_compiler_options_keep_ynn_convolutions(fresh_options):
    options = bt_jax.compiler_options()
    assert options is not None
    fusions = ynn_fusion_ops(_compiled_text(_patch_embedding, options, *PATCH_SHAPES))
    assert {"convolution"} in fusions
    # The control: with YNNPACK off, the convolution leaves it.
    off = {compiler.YNN_FUSION_FLAG: ""}
    assert ynn_fusion_ops(_compiled_text(_patch_embedding, off, *PATCH_SHAPES)) == []


def test_compiler_options_defer_to_xla_flags(fresh_options, monkeypatch):
    flag = f"--{compiler.YNN_FUSION_FLAG}=-reduce"
    monkeypatch.setenv("XLA_FLAGS", flag)
    assert bt_jax.compiler_options() is None


@pytest.mark.parametrize(
    "bogus",
    [
        # A value this jaxlib does not know, and a flag it does not know, as
        # after a rename.
        {compiler.YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_NO_SUCH_TYPE"},
        {"xla_cpu_no_such_ynn_flag": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    ],
    ids=["value", "flag"],
)
def test_compiler_options_rejected_warns(fresh_options, monkeypatch, caplog, bogus):
    monkeypatch.setattr(compiler, "CPU_OPTIONS", bogus)
    with caplog.at_level(logging.WARNING, logger="bt_jax.compiler"):
        assert bt_jax.compiler_options() is None
    assert str(bogus) in caplog.text


def test_compiler_options_returns_new_dict(fresh_options):
    first = bt_jax.compiler_options()
    first.clear()
    assert bt_jax.compiler_options() == compiler.CPU_OPTIONS


def test_jit_model_function_uses_options(fresh_options):
    # XLA's defaults give `_layer`'s matmul to YNNPACK (see the control
    # above), and bt-jax's options do not.
    config = BridgeTowerConfig.from_dict(tiny_config())
    model = bt_jax.BridgeTowerForImageAndTextRetrieval(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    run = jit_model_function(graphdef, lambda model, x, w: _layer(x, w))
    arrays = [jnp.ones(shape) for shape in LAYER_SHAPES]
    assert ynn_fusion_ops(run.lower(state, *arrays).compile().as_text()) == []

"""Time the parts of the fused pretraining step, to see which one is slow.

    python -m bench.step_parts [--size base] [--batch 4] [--repeats 3]

The fused MLM + ITM + ITC step (`objectives._fused_loss`) runs three parts.
The vision encoder encodes the B images, and the text encoder 3B texts
(masked, plain and the negatives' texts). The cross-modal tower then runs on
4B pairs, whose image states are gathered from the B encoded images. This program times each part's
forward and backward pass alone, with the train step's settings (scanned
layers, remat "dots", dropout on), and divides the analytic matmul FLOPs
(`bench.flops`, forward and backward counted as 3x the forward) by the time.
It also times the cross-modal part with its image states gathered inside the
jitted function, as the step does, to show what the gather and its
scatter-add backward cost. Weights are random; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench import flops

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEXT_LENGTH = 40


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.step_parts", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--size", choices=("tiny", "base", "large"), default="base")
    parser.add_argument("--batch", type=int, default=4, help="image-text pairs B")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per part")
    parser.add_argument(
        "--peak-size", type=int, default=4096, help="side of the peak-measuring matmul"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        raise SystemExit("error: --batch and --repeats must be positive.")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from bench.jax_runner import JaxRunner
    from bt_jax.compiler import compiler_options
    from bt_jax.config import load_preset
    from bt_jax.modeling.heads import BridgeTowerForPreTraining
    from bt_jax.training.layout import StackedLayout

    config = load_preset(CONFIGS / f"{args.size}.py").replace(
        contrastive_hidden_size=512, logit_scale_init_value=2.6592
    )
    model = BridgeTowerForPreTraining(config, rngs=nnx.Rngs(params=0))
    model.bridgetower.remat = "dots"
    model.bridgetower.scan_layers = True
    graphdef, params = nnx.split(model, nnx.Param)
    # Stacked as `Trainer` stores them, so the parts read the scanned layers in
    # place as the step does.
    layout = StackedLayout.for_model(model)
    params = layout.stack(nnx.to_pure_dict(params))

    def merge(p):
        return nnx.merge(graphdef, layout.unstack(p))

    size = args.batch
    image = config.vision_config.image_size
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.standard_normal((size, image, image, 3), np.float32))
    vocab = config.text_config.vocab_size
    ids = jnp.asarray(rng.integers(3, vocab, (4 * size, TEXT_LENGTH), np.int32))
    mask = jnp.ones((4 * size, TEXT_LENGTH), jnp.int32)
    # Image rows of the 4B pairs: MLM, positive, negatives' images, the B images.
    negatives = rng.integers(0, size, size)
    order = jnp.asarray(
        np.r_[np.arange(size), np.arange(size), negatives, np.arange(size)]
    )

    def vision(p):
        backbone = merge(p).bridgetower
        return jnp.mean(backbone.image_hidden_states(pixels) ** 2)

    def text(p):
        backbone = merge(p).bridgetower
        states = backbone.text_hidden_states(
            ids[: 3 * size], mask[: 3 * size], dropout_rng=jax.random.key(1)
        )
        return jnp.mean(states**2)

    backbone = merge(params).bridgetower
    image_states = backbone.image_hidden_states(pixels)
    text_states = backbone.text_hidden_states(ids, mask)

    def cross(p, text_in, image_in):
        trace = merge(p).bridgetower.forward_trace(
            ids,
            mask,
            None,
            dropout_rng=jax.random.key(2),
            text_hidden_states=text_in,
            image_hidden_states=image_in,
            full_image_features=False,
        )
        return jnp.mean(trace.pooler_output**2) + jnp.mean(trace.text_features**2)

    def cross_gathered(p, text_in, image_in):
        return cross(p, text_in, image_in[:, order])

    preset = config.to_dict()
    parts = [
        (
            "vision encoder, B images",
            vision,
            (params,),
            0,
            size * flops.vision_flops(preset),
        ),
        (
            "text encoder, 3B texts",
            text,
            (params,),
            0,
            3 * size * flops.text_flops(preset, TEXT_LENGTH),
        ),
        (
            "cross-modal tower, 4B pairs",
            cross,
            (params, text_states, image_states[:, order]),
            (0, 1, 2),
            4
            * size
            * flops.cross_modal_flops(preset, TEXT_LENGTH, class_token_only=True),
        ),
        (
            "  same, gathering the images",
            cross_gathered,
            (params, text_states, image_states),
            (0, 1, 2),
            4
            * size
            * flops.cross_modal_flops(preset, TEXT_LENGTH, class_token_only=True),
        ),
    ]
    peak = JaxRunner.matmul_gflops(args.peak_size, 3)
    print(
        f"{args.size}, B={size}, text length {TEXT_LENGTH}, {image} px, "
        f"{jax.devices()[0].platform}; float32 matmul peak {peak:.1f} GFLOP/s"
    )
    print(
        f"{'part (forward and backward)':32s} {'seconds':>8s} {'GFLOP':>8s} {'% of peak':>10s}"
    )
    for name, function, inputs, argnums, forward in parts:
        step = jax.jit(
            jax.value_and_grad(function, argnums=argnums),
            compiler_options=compiler_options(),
        )
        jax.block_until_ready(step(*inputs))
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            jax.block_until_ready(step(*inputs))
            times.append(time.perf_counter() - started)
        seconds = float(np.median(times))
        work = 3 * forward / 1e9
        print(
            f"{name:32s} {seconds:8.3g} {work:8.4g} {100 * work / seconds / peak:9.1f}%"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

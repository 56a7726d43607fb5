"""XLA compiler options that bt-jax's jitted functions are compiled with.

On the CPU backend, XLA's default hands matmuls, convolutions and reductions
to the YNNPACK library. With jaxlib 0.10.2 on 2 cores, two of those ran slower
there than in XLA's own code: the reductions (layer norms, softmax sums, bias
gradients, the training step's gradient norms) and the matmuls at the model's
shapes, for which XLA's own code calls Eigen. So bt-jax keeps YNNPACK for
convolutions only. `python -m bench.compiler_ab` measures the difference, and
the README's speed section gives its figures.

Pass `compiler_options()` to your own `jax.jit` to compile the same way:

    step = jax.jit(fn, compiler_options=bt_jax.compiler_options())

Other backends get no options. A process whose `XLA_FLAGS` already sets
`--xla_cpu_experimental_ynn_fusion_type` keeps its own choice.
"""

from __future__ import annotations

import functools
import logging
import os

import jax
import numpy as np

logger = logging.getLogger(__name__)

YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
# Only single convolutions (the patch embedding) go to YNNPACK. Matmuls,
# reductions and the elementwise work around them stay in XLA's own code.
# NOTE: the matmul choice was measured on one kind of host (2-core AMD EPYC
# with AVX-512). There, against XLA's defaults, the base forward at batch 8
# and the base train step ran about 6% faster, and the forward at batch 1
# about 5% slower. Other CPUs may favour YNNPACK's matmuls, and
# `python -m bench.compiler_ab` measures the difference on each.
CPU_OPTIONS = {YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


def compiler_options() -> dict[str, str] | None:
    """Return the options for `jax.jit(..., compiler_options=...)`, or None.

    Returns None on non-CPU backends and when `XLA_FLAGS` sets the YNNPACK
    fusion flag itself. It also returns None, with a warning, when this
    jaxlib rejects the options, because they are experimental and may be
    renamed. Each call returns a new dict, so callers may change it.
    """
    options = _checked_options()
    return None if options is None else dict(options)


@functools.cache
def _checked_options() -> dict[str, str] | None:
    """Decide the options once per process (see `compiler_options`)."""
    if jax.default_backend() != "cpu":
        return None
    if YNN_FUSION_FLAG in os.environ.get("XLA_FLAGS", ""):
        logger.debug(
            "XLA_FLAGS sets %s, so bt-jax adds no compiler options", YNN_FUSION_FLAG
        )
        return None
    try:
        probe = jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS)
        probe.lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError as error:
        logger.warning(
            "This jaxlib rejected the compiler options %s (%s). bt-jax compiles "
            "with XLA's defaults instead, which may be slower on CPU.",
            CPU_OPTIONS,
            error,
        )
        return None
    return dict(CPU_OPTIONS)

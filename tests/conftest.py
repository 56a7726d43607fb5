"""Test settings: parity runs at full float32 matmul precision.

Tests marked `fast_compile` compile with `jax_disable_most_optimizations`.
XLA still runs its HLO passes, so the optimised HLO is the same (checked on
the tiny train step), but LLVM does not optimise the machine code. The tiny
train step then compiles in 10 s instead of 24 s on 2 CPU cores and runs
slower, which tiny models barely notice. The mark is only for tests that
compare JAX programs with each other or check behaviour. Tests against
PyTorch compile as users do. JAX's in-memory caches ignore the flag (jax
0.10.2), so they are cleared whenever a test's setting differs from the
previous test's. The setting changes before the test's fixtures are set up,
so a module fixture compiles with the setting of the first test that uses it,
and whatever it keeps (results, compiled functions) has that setting in later
tests. A file that mixes marked and unmarked tests should therefore not
compile in module fixtures.

`make test` runs whole files on two workers in collection order
(`--dist loadfile --no-loadscope-reorder`). The slowest files are collected
first, so that the last files to finish are short ones and neither worker
waits long for the other at the end.
"""

import logging
import warnings

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
warnings.filterwarnings("ignore", category=DeprecationWarning)
# Orbax logs every file operation at INFO.
logging.getLogger("absl").setLevel(logging.WARNING)

# Slowest first, by their times on a 2-core CPU (2026-12-06). Other files
# follow in their usual order.
SLOW_FILES = (
    "test_train_program.py",
    "test_training_sharded.py",
    "test_finetune.py",
    "test_bench.py",
    "test_parity.py",
    "test_layout.py",
    "test_train_units.py",
    "test_embed.py",
    "test_base_size.py",
)


# The setting unmarked tests run with (JAX_DISABLE_MOST_OPTIMIZATIONS may set it).
_DEFAULT_OPTIMIZATIONS_OFF = jax.config.values["jax_disable_most_optimizations"]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    off = item.get_closest_marker("fast_compile") is not None or (
        _DEFAULT_OPTIMIZATIONS_OFF
    )
    if off != jax.config.values["jax_disable_most_optimizations"]:
        # Executables compiled with the other setting would otherwise be reused.
        jax.clear_caches()
        jax.config.update("jax_disable_most_optimizations", off)


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(SLOW_FILES)}
    # A stable sort keeps the order of the tests inside each file.
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))

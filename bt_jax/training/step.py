"""The sharded training step: state creation and one jitted update.

The state is a pytree of arrays (`TrainState`), placed on the mesh by the
logical axis rules: parameters as `bt_jax.sharding.param_shardings` gives,
optimizer moments like their parameters, scalars replicated. The state is
created by a jitted function whose outputs already carry those shardings, so
full parameters never sit on one device. With scanned layers, the state stores
each scanned run of layers stacked (`bt_jax.training.layout`), so the step
does not copy them, and `Trainer.model_from_params` accepts that layout. The
step is one `jax.jit` with explicit input and output shardings that donates
the old state; gradient accumulation runs the microbatches in a `lax.scan`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bt_jax import compiler, sharding
from bt_jax.config import TASK_HEADS, BridgeTowerConfig
from bt_jax.modeling.bridgetower import REMAT_POLICIES
from bt_jax.modeling.heads import BridgeTowerForPreTraining
from bt_jax.modeling.tasks import TASK_MODEL_CLASSES
from bt_jax.training import layout
from bt_jax.training.objectives import ObjectiveConfig, pretraining_loss
from bt_jax.training.optim import (
    OptimizerConfig,
    group_learning_rates,
    make_optimizer,
    parameter_labels,
)
from bt_jax.training.tasks import check_task, task_loss

BATCH_AXES = ("data", "fsdp")

logger = logging.getLogger(__name__)


class TrainState(NamedTuple):
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


def _path_names(path) -> tuple:
    """Turn a pytree key path into the names NNX uses, without `.value`."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            continue
        names.append(getattr(key, "key", getattr(key, "idx", key)))
    return tuple(names)


def _label_function(labels: dict) -> Callable[[Any], Any]:
    table = {
        _path_names(path): label
        for path, label in jax.tree_util.tree_leaves_with_path(labels)
    }

    def label_tree(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: table[_path_names(path)], params
        )

    return label_tree


@dataclasses.dataclass
class Trainer:
    """Builds the train state and the jitted step for one model on one mesh.

    Attributes:
      config: the model's configuration.
      objective: loss weights and ITM negatives; decides the heads of the
        pretraining and retrieval tasks.
      optimizer: AdamW settings.
      mesh: device mesh with axes data, fsdp and tensor.
      rules: logical axis rules (`bt_jax.sharding.DEFAULT_RULES`).
      accumulation_steps: microbatches per step, run in a `lax.scan`.
      dtype: compute dtype (parameters stay float32).
      remat: per-layer rematerialisation, "none", "full" or "dots"
        (`bt_jax.modeling.bridgetower.REMAT_POLICIES`).
      scan_layers: run each stack of layers as one `lax.scan`
        (`BridgeTowerModel.scan_layers`); the step compiles faster. The state
        then stores each scanned run stacked (`layout`).
      task: "pretrain" and "retrieval" train `BridgeTowerForPreTraining` with
        `objective`; "vqa", "nlvr2" and "snli-ve" train that task's model and
        loss (`bt_jax.training.tasks`).
    """

    config: BridgeTowerConfig
    objective: ObjectiveConfig
    optimizer: OptimizerConfig
    mesh: Mesh
    rules: tuple = sharding.DEFAULT_RULES
    accumulation_steps: int = 1
    dtype: Any = jnp.float32
    remat: str = "none"
    scan_layers: bool = True
    task: str = "pretrain"

    def __post_init__(self):
        check_task(self.task)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(
                f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}."
            )
        if self.accumulation_steps < 1:
            raise ValueError(
                f"accumulation_steps must be positive, got {self.accumulation_steps}."
            )

        abstract = nnx.eval_shape(lambda: self._model(jax.random.key(0)))
        self.graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise NotImplementedError(
                "the model has state other than parameters, which Trainer does "
                "not carry through steps."
            )
        self.layout = layout.StackedLayout.for_model(abstract)
        labels = nnx.to_pure_dict(parameter_labels(abstract))
        self.tx = make_optimizer(
            self.optimizer,
            _label_function(self.layout.stack(labels, layout.stack_equal)),
        )

        # The state contains plain nested dicts of arrays: NNX variable metadata
        # (such as the mesh it was created under) would make the trees of the
        # state and of its shardings differ. `layer_param_shardings` are those of
        # the per-layer dicts models hold, `param_shardings` those of the state.
        self.layer_param_shardings = nnx.to_pure_dict(
            sharding.param_shardings(abstract_params, self.mesh, self.rules)
        )
        self.param_shardings = self.layout.stack(
            self.layer_param_shardings, layout.stack_shardings
        )
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXES))
        abstract_state = jax.eval_shape(self._init, jax.random.key(0))
        self.state_shardings = self._shardings_like(abstract_state)

        # Traced under the mesh, so the model's activation constraints apply.
        under_mesh = functools.partial(sharding.traced_under, self.mesh)
        options = compiler.compiler_options()
        self.init = jax.jit(
            under_mesh(self._init),
            out_shardings=self.state_shardings,
            compiler_options=options,
        )
        self._init_from_stacked = jax.jit(
            under_mesh(self._init_from_params),
            in_shardings=(self.state_shardings.params, None),
            out_shardings=self.state_shardings,
            donate_argnums=(0,),
            compiler_options=options,
        )
        # The gradients and metrics `step` applies, for checks and tools.
        self.gradients = jax.jit(
            under_mesh(self._gradients),
            in_shardings=(self.state_shardings.params, self.batch_sharding, None),
            compiler_options=options,
        )
        self.step = jax.jit(
            under_mesh(self._step),
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, None),
            donate_argnums=(0,),
            compiler_options=options,
        )

    @property
    def batch_divisor(self) -> int:
        """Global batch sizes must be multiples of this."""
        ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        return ways * self.accumulation_steps

    @property
    def head(self) -> str:
        """The head name of the trained model (`bt_jax.modeling.model_class`)."""
        if self.task in TASK_HEADS:
            return self.task
        return "+".join(self.objective.heads)

    def _model(self, seed) -> nnx.Module:
        kwargs = dict(
            dtype=self.dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(params=seed)
        )
        # The rules resolve the parameters' logical axis names when a mesh is set.
        with nnx.logical_axis_rules(list(self.rules)), nnx.use_eager_sharding(False):
            if self.task in TASK_HEADS:
                model = TASK_MODEL_CLASSES[self.task](self.config, **kwargs)
            else:
                model = BridgeTowerForPreTraining(
                    self.config, heads=self.objective.heads, **kwargs
                )
        model.bridgetower.remat = self.remat
        model.bridgetower.scan_layers = self.scan_layers
        return model

    def _init(self, rng: jax.Array) -> TrainState:
        params_rng, state_rng = jax.random.split(rng)
        model = self._model(params_rng)
        params = jax.tree.map(
            jax.lax.with_sharding_constraint,
            self.layout.stack(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
            self.param_shardings,
        )
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=state_rng,
        )

    def init_from_params(self, params: dict, rng: jax.Array) -> TrainState:
        """Return the initial state for per-layer `params` (`nnx.to_pure_dict`).

        `params` are consumed, so callers must not reuse them. The state uses
        their buffers instead of copies (1.4 GiB at base size). Each run of
        layers that the state stores stacked is stacked, and its per-layer
        arrays deleted, before the next run, so at most one run is held twice.
        NumPy parameters are stacked on the host and cannot be deleted here.
        """
        return self._init_from_stacked(self.layout.stack(params, _stack_consuming), rng)

    def stack_state(self, state: TrainState) -> TrainState:
        """Convert a per-layer train state to this trainer's layout and shardings.

        `state` is one of a trainer with `scan_layers=False`, such as a
        checkpoint written before scanned layers were stored stacked. Its
        parameters and the optimizer's per-parameter trees are stacked run by
        run, and `state` is consumed like the parameters of `init_from_params`.
        """
        top = set(self.param_shardings)

        def is_param_tree(node) -> bool:
            return isinstance(node, dict) and set(node) == top

        stacked = jax.tree.map(
            lambda node: (
                self.layout.stack(node, _stack_consuming)
                if is_param_tree(node)
                else node
            ),
            state,
            is_leaf=is_param_tree,
        )
        return jax.device_put(stacked, self.state_shardings)

    def _init_from_params(self, params: dict, rng: jax.Array) -> TrainState:
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=jax.random.split(rng)[1],
        )

    def abstract_state(self) -> TrainState:
        """Return the state's shapes, dtypes and shardings, allocating nothing."""
        shapes = jax.eval_shape(self._init, jax.random.key(0))
        return jax.tree.map(
            lambda shape, sharding: jax.ShapeDtypeStruct(
                shape.shape, shape.dtype, sharding=sharding
            ),
            shapes,
            self.state_shardings,
        )

    def _shardings_like(self, abstract_state: TrainState):
        """Shard each leaf like the parameter at the end of its path, else replicate."""
        table = {}
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.param_shardings):
            table[_path_names(path)] = leaf
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def choose(path, leaf):
            names = _path_names(path)
            for start in range(len(names)):
                found = table.get(names[start:])
                if found is not None and len(found.spec) <= len(leaf.shape):
                    return found
            return replicated

        return jax.tree_util.tree_map_with_path(choose, abstract_state)

    def _loss(self, params, batch, rng):
        model = self.model_from_params(params)
        if self.task in TASK_HEADS:
            return task_loss(model, batch, rng, self.task)
        return pretraining_loss(model, batch, rng, self.objective)

    def _gradients(self, params, batch: dict[str, jax.Array], rng: jax.Array):
        """Return the mean gradients and metrics over the step's microbatches."""
        grad_fn = jax.value_and_grad(self._loss, has_aux=True)
        count = self.accumulation_steps
        if count == 1:
            (_, metrics), grads = grad_fn(params, batch, rng)
            return grads, metrics
        micro = jax.tree.map(functools.partial(_split_micro, count=count), batch)

        def accumulate(carry, inputs):
            index, microbatch = inputs
            (_, step_metrics), step_grads = grad_fn(
                params, microbatch, jax.random.fold_in(rng, index)
            )
            grads, metrics = carry
            grads = jax.tree.map(jnp.add, grads, step_grads)
            metrics = jax.tree.map(jnp.add, metrics, step_metrics)
            return (grads, metrics), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        shapes = jax.eval_shape(grad_fn, params, _first_micro(micro), rng)
        metric_zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes[0][1])
        (grads, metrics), _ = jax.lax.scan(
            accumulate, (zeros, metric_zeros), (jnp.arange(count), micro)
        )
        grads = jax.tree.map(lambda g: g / count, grads)
        metrics = jax.tree.map(lambda m: m / count, metrics)
        return grads, metrics

    def _step(self, state: TrainState, batch: dict[str, jax.Array]):
        rng = jax.random.fold_in(state.rng, state.step)
        grads, metrics = self._gradients(state.params, batch, rng)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # NOTE: with XLA's CPU defaults (jaxlib 0.10.2) these two norms cost 1
        # to 2.5 s of the base pretraining step's 23 to 26 s on 2 cores. XLA
        # gave each parameter's sum to YNNPACK as a tree of reduce-windows, and
        # the one over the (768, 50265) MLM decoder kernel took 2.4 s in a
        # profile. Writing the sums as einsum, vdot, |x| * |x| or row sums did
        # not avoid it. `compiler.compiler_options()` keeps reductions out of
        # YNNPACK. What the norms cost then, and on accelerators, is unmeasured.
        metrics = {
            **metrics,
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            **group_learning_rates(self.optimizer, state.step),
        }
        new_state = TrainState(state.step + 1, params, opt_state, state.rng)
        return new_state, metrics

    def compile_step(self, batch: dict[str, jax.Array]) -> jax.stages.Compiled:
        """Compile `step` for `batch`'s shapes before any state exists, and return it.

        Call it before creating or restoring the state. XLA's compiler frees
        much of its working memory into the C heap, where it stays resident.
        This method hands those pages back to the operating system
        (`release_free_host_memory`), so they do not add to the peak when the
        state and the step's buffers are allocated. On CPU, compiling the base
        pretraining step left 1.8 GiB resident, of which this released 1.0 GiB.
        The result takes `(state, batch)` like `step`, for batches of the same
        shapes and shardings.
        """
        compiled = self.step.lower(self.abstract_state(), batch).compile()
        release_free_host_memory()
        return compiled

    def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Place this process's share of the global batch on the mesh."""
        arrays = {}
        for key, value in batch.items():
            if key in ("text_index", "question_id"):
                continue
            arrays[key] = jax.make_array_from_process_local_data(
                self.batch_sharding, np.asarray(value)
            )
        return arrays

    def model(self, state: TrainState) -> nnx.Module:
        """Return the model with the state's parameters, for evaluation."""
        return self.model_from_params(state.params)

    def model_from_params(self, params: dict) -> nnx.Module:
        """Return the model with `params`, laid out like the state's."""
        return nnx.merge(self.graphdef, self.layout.unstack(params))

    def stack_params(self, params: dict) -> dict:
        """Lay out per-layer `params` (`nnx.to_pure_dict`) like the state's."""
        return self.layout.stack(params)

    def unstack_params(self, params: dict) -> dict:
        """Split the state's stacked runs into the per-layer dict models hold."""
        return self.layout.unstack(params)


def _stack_consuming(leaves) -> jax.Array | np.ndarray:
    """Stack `leaves` and delete those that are JAX arrays.

    NumPy leaves are stacked on the host, so that the jitted caller places
    each shard on its device instead of the whole run landing on one.
    """
    if all(isinstance(leaf, np.ndarray) for leaf in leaves):
        return np.stack(leaves)
    stacked = jnp.stack(leaves)
    for leaf in leaves:
        if isinstance(leaf, jax.Array):
            leaf.delete()
    return stacked


def _split_micro(x: jax.Array, count: int) -> jax.Array:
    # Rows i, i + count, ... form microbatch i, so each device keeps its rows.
    size = x.shape[0]
    return jnp.swapaxes(x.reshape(size // count, count, *x.shape[1:]), 0, 1)


def _first_micro(micro):
    return jax.tree.map(lambda x: x[0], micro)


def release_free_host_memory() -> None:
    """Return the C heap's free pages to the operating system (glibc only).

    Freed memory often stays in the process's heap, and so in its resident
    size, until glibc's `malloc_trim` releases it. Elsewhere (macOS, musl) this
    does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        logger.debug("malloc_trim is unavailable; host memory not released")

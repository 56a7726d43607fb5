"""Fast checks of the training program's parts: settings, recall, tables, logs, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import REPO
from jax.sharding import NamedSharding, PartitionSpec

from bt_jax.checkpoint import CheckpointMismatchError, RunCheckpoints
from bt_jax.training import summary
from bt_jax.training.evaluation import _scores, recall_at_k
from bt_jax.training.metric_writer import MetricWriter, read_metrics
from bt_jax.training.settings import RunSettings, default_config
from bt_jax.training.step import TrainState
from train import report, setup
from train.loop import NonFiniteLossError, _finish_step

# Checks the training units' behaviour. Nothing is compared with PyTorch.
pytestmark = pytest.mark.fast_compile


def _config(**overrides):
    config = default_config()
    config.model = str(REPO / "configs" / "tiny.py")
    config.data.dataset = "samples"
    for key, value in overrides.items():
        section = config
        *parents, name = key.split(".")
        for parent in parents:
            section = section[parent]
        section[name] = value
    return config


def test_settings_default_config_valid():
    settings = RunSettings.from_config(_config())
    assert settings.optimizer.total_steps == 1000
    assert settings.optimizer.grad_clip_norm is None
    assert settings.objective.heads == ("mlm", "itm", "itc")
    assert settings.dtype == jnp.float32


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"global_batch_size": 0}, "config.global_batch_size must be a positive"),
        ({"dtype": "float16"}, "config.dtype must be one of"),
        ({"remat": "some"}, "config.remat must be one of"),
        ({"mesh_shape": (2, 2)}, "config.mesh_shape must have 3 sizes"),
        ({"optimizer.grad_clip_norm": -1.0}, "grad_clip_norm must be >= 0"),
        ({"objective.itm_negatives": "easy"}, "itm_negatives"),
        ({"eval.every_steps": -1}, "config.eval.every_steps must be >= 0"),
        ({"data.dataset": ""}, "config.data.dataset is empty"),
    ],
)
def test_settings_invalid_value_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        RunSettings.from_config(_config(**overrides))


def test_settings_unknown_field_named():
    config = _config()
    config.unlock()
    config.optimizer.learning_rat = 1.0
    with pytest.raises(ValueError, match=r"config\.optimizer\.learning_rat is not"):
        RunSettings.from_config(config)


def test_settings_model_required():
    with pytest.raises(ValueError, match=r"config\.model and config\.init_from"):
        RunSettings.from_config(_config(model=""))


def test_recall_at_k_matches_brute_force():
    rng = np.random.default_rng(0)
    similarity = rng.normal(size=(40, 12))
    owner = rng.integers(0, 12, 40)
    relevant = owner[:, None] == np.arange(12)[None, :]
    recalls = recall_at_k(similarity, relevant, ks=(1, 3, 5))
    for k, value in recalls.items():
        hits = [
            bool(set(np.argsort(-row)[:k]) & set(np.flatnonzero(rel)))
            for row, rel in zip(similarity, relevant, strict=True)
        ]
        assert value == pytest.approx(np.mean(hits))


def test_recall_at_k_several_relevant_items():
    similarity = np.array([[0.9, 0.8, 0.1], [0.1, 0.2, 0.3]])
    relevant = np.array([[False, True, True], [True, False, False]])
    recalls = recall_at_k(similarity, relevant, ks=(1, 2, 3))
    # Query 0's best relevant item is second; query 1's only one is third.
    assert recalls == {1: 0.0, 2: 0.5, 3: 1.0}


def test_eval_scores_by_hand():
    arrays = {
        "record_index": np.array([0, 0, 1, 2]),
        "next_record": np.array([0, 1, 2, 0]),
        # Texts 0, 1 match image 0, text 2 image 1, text 3 image 2.
        "text_embeds": np.array([[1.0, 0], [0.6, 0.8], [0, 1.0], [-1.0, 0]]),
        "image_embeds": np.array([[1.0, 0], [1.0, 0], [0, 1.0], [0.8, -0.6]]),
        "itm_positive": np.array([[0.0, 1], [0, 1], [1, 0], [0, 1]]),
        "itm_negative": np.array([[0.0, 1], [1, 0], [0, 1], [1, 0]]),
    }
    scores = _scores(arrays)
    assert scores["images"] == 3
    # Positives: 3 of 4 right; negatives (rows 1, 2, 3 differ): rows 1 and 3 right.
    assert scores["itm_accuracy"] == pytest.approx(5 / 7)
    # Images are rows 0, 2 and 3 (the first row of each record). Text 0 ranks
    # image 0 first; text 1 ranks image 1 (0.8) above image 0 (0.6); text 2
    # ranks image 1 first; text 3 ranks image 1 (0) above image 2 (-0.8).
    assert scores["text_to_image_r1"] == pytest.approx(2 / 4)
    assert scores["text_to_image_r5"] == 1.0
    # Image 0 ranks text 0 first, image 1 text 2, image 2 text 0 above text 3.
    assert scores["image_to_text_r1"] == pytest.approx(2 / 3)


def test_summary_tables_count_and_collapse():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = {
        "layer": {
            "0": {"kernel": jax.ShapeDtypeStruct((4, 8), jnp.float32)},
            "1": {"kernel": jax.ShapeDtypeStruct((4, 8), jnp.float32)},
        },
        "head": {"bias": jax.ShapeDtypeStruct((3,), jnp.float32)},
    }
    shardings = jax.tree.map(lambda _: replicated, params)
    overview = summary.parameter_overview(params, shardings)
    assert "layer" in overview
    assert "67" in overview  # 2 * 32 + 3 parameters
    table = summary.sharding_table(params, shardings, collapse_layers=True)
    assert "layer.*.kernel  (4, 8)  ()  ×2" in table
    full = summary.sharding_table(params, shardings, collapse_layers=False)
    assert "layer.1.kernel" in full


def test_metric_writer_jsonl_and_later_record_wins(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.write(1, "train", {"loss": 2.0})
    writer.write(2, "train", {"loss": float("nan")})
    writer.write(2, "train", {"loss": 1.5})
    writer.write(2, "eval", {"itm_accuracy": 0.75})
    writer.close()
    assert list((tmp_path / "tensorboard").iterdir())
    first_line = (tmp_path / "metrics.jsonl").read_text().splitlines()[1]
    assert json.loads(first_line)["loss"] is None
    train = read_metrics(tmp_path, "train")
    assert [(r["step"], r["loss"]) for r in train] == [(1, 2.0), (2, 1.5)]
    assert read_metrics(tmp_path, "eval")[0]["itm_accuracy"] == 0.75


def test_report_summary_and_plot(tmp_path):
    writer = MetricWriter(tmp_path)
    writer.write(10, "train", {"loss": 3.0, "itc_loss": 2.0, "examples_per_second": 5})
    writer.write(20, "train", {"loss": 1.0, "itc_loss": 0.5, "examples_per_second": 7})
    writer.write(
        20,
        "eval",
        {"images": 4, "examples": 8, "itm_accuracy": 0.5, "text_to_image_r1": 0.75},
    )
    writer.close()
    text = report.write_report(tmp_path)
    assert "3.0000 ->   1.0000" in text
    assert "R@1 0.750" in text
    assert "chance about 0.250" in text
    assert (tmp_path / report.PLOT_FILE).stat().st_size > 0


def test_setup_mesh_not_dividing_devices():
    with pytest.raises(ValueError, match=r"config\.mesh_shape: .*needs 2 devices"):
        setup.make_mesh((2, 1, 1))


def test_setup_batch_not_divisible():
    mesh = setup.make_mesh((1, 1, 1))
    config = _config(global_batch_size=10, accumulation_steps=4)
    with pytest.raises(ValueError, match="global_batch_size=10 is not divisible"):
        setup.check_batch(config, mesh)


def test_workdir_other_model_rejected(tmp_path, caplog):
    config = _config()
    tiny = setup.load_model_config(config)
    record = setup.check_workdir(tmp_path, tiny, ("mlm",), config)
    setup.record_run(tmp_path, record)
    (tmp_path / setup.CHECKPOINT_DIR / "5").mkdir(parents=True)
    changed = _config(global_batch_size=64)
    setup.check_workdir(tmp_path, tiny, ("mlm",), changed)
    assert "global_batch_size: 32 stored, 64 now" in caplog.text
    base = setup.load_model_config(_config(model=str(REPO / "configs" / "base.py")))
    with pytest.raises(
        ValueError, match=r"contains a run of another model.*hidden_size"
    ):
        setup.check_workdir(tmp_path, base, ("mlm",), config)


def test_workdir_without_checkpoints_is_new(tmp_path):
    config = _config()
    tiny = setup.load_model_config(config)
    setup.record_run(tmp_path, setup.check_workdir(tmp_path, tiny, ("mlm",), config))
    base = setup.load_model_config(_config(model=str(REPO / "configs" / "base.py")))
    record = setup.check_workdir(tmp_path, base, ("mlm",), config)
    assert record["model"]["hidden_size"] == 768


def _state(shapes: dict) -> TrainState:
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params={name: jnp.zeros(shape) for name, shape in shapes.items()},
        opt_state={},
        rng=jax.random.key(0),
    )


def test_checkpoint_of_other_shapes_rejected(tmp_path):
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", keep=1, async_save=False)
    iterator = _CountingIterator()
    checkpoints.save(5, _state({"kernel": (4, 8)}), iterator)
    checkpoints.wait()
    expected = jax.eval_shape(lambda: _state({"kernel": (4, 16)}))
    with pytest.raises(CheckpointMismatchError, match=r"kernel: \(4, 8\) stored"):
        checkpoints.check_compatible(5, expected)
    checkpoints.close()


def test_checkpoint_round_trip_state_and_iterator(tmp_path):
    checkpoints = RunCheckpoints(tmp_path / "checkpoints", keep=2, async_save=True)
    state = _state({"kernel": (2, 3)})._replace(
        params={"kernel": jnp.arange(6.0).reshape(2, 3)}, rng=jax.random.key(7)
    )
    iterator = _CountingIterator()
    next(iterator)
    next(iterator)
    checkpoints.save(3, state, iterator)
    checkpoints.wait()
    resumed = _CountingIterator()
    abstract = jax.eval_shape(lambda: state)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(_single_mesh(), PartitionSpec())
        ),
        abstract,
    )
    restored = checkpoints.restore(3, abstract, resumed)
    checkpoints.close()
    np.testing.assert_array_equal(restored.params["kernel"], state.params["kernel"])
    np.testing.assert_array_equal(
        jax.random.key_data(restored.rng), jax.random.key_data(state.rng)
    )
    assert next(resumed) == 2


def _single_mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))


class _CountingIterator(grain.DatasetIterator):
    """A grain iterator over 0, 1, 2, ... with get_state and set_state."""

    def __init__(self):
        super().__init__()
        self.position = 0

    def __next__(self):
        self.position += 1
        return self.position - 1

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_cli_unknown_config_field_one_line_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "--config",
            str(REPO / "configs" / "demo.py"),
            "--workdir",
            str(tmp_path / "run"),
            "--config.optimizer.learning_rat=0.1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "the config has no field 'learning_rat'" in result.stderr
    assert 'Did you mean "learning_rate"?' in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# Compiles a small function after `configure_compilation_cache(WORKDIR, ENABLED)`
# and prints the cache directory in use and the number of cache hits.
_CACHE_SCRIPT = """
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from train.setup import configure_compilation_cache

hits = []
jax.monitoring.register_event_listener(lambda event, **_: hits.append(event))
print(configure_compilation_cache(Path(sys.argv[1]), enabled=sys.argv[2] == "on"))
jax.jit(lambda x: jnp.tanh(x) @ x)(jnp.ones((64, 64))).block_until_ready()
print(hits.count("/jax/compilation_cache/cache_hits"))
"""


def _compile_with_cache(workdir, enabled="on", **environment) -> tuple[str, int]:
    variables = {
        name: value
        for name, value in os.environ.items()
        if name != "JAX_COMPILATION_CACHE_DIR"
    }
    variables |= {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **environment}
    result = subprocess.run(
        [sys.executable, "-c", _CACHE_SCRIPT, str(workdir), enabled],
        cwd=REPO,
        env=variables,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    directory, hits = result.stdout.split()[-2:]
    return directory, int(hits)


def test_compilation_cache_hit_by_next_process(tmp_path):
    directory, hits = _compile_with_cache(tmp_path)
    assert directory == str(tmp_path / "compilation_cache")
    assert hits == 0
    assert any(Path(directory).iterdir())
    # Every program of the first process (with jnp.ones) was stored, and the
    # second process loads them.
    again, hits = _compile_with_cache(tmp_path)
    assert again == directory
    assert hits >= 1


def test_compilation_cache_environment_directory_kept(tmp_path):
    other = tmp_path / "shared"
    directory, hits = _compile_with_cache(
        tmp_path / "run", JAX_COMPILATION_CACHE_DIR=str(other)
    )
    assert (directory, hits) == (str(other), 0)
    assert any(other.iterdir())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "enabled, environment",
    [("off", {}), ("on", {"JAX_ENABLE_COMPILATION_CACHE": "false"})],
)
def test_compilation_cache_off_ignores_directory(tmp_path, enabled, environment):
    other = tmp_path / "shared"
    result = _compile_with_cache(
        tmp_path / "run", enabled, JAX_COMPILATION_CACHE_DIR=str(other), **environment
    )
    assert result == ("None", 0)
    assert not other.exists()
    assert not (tmp_path / "run").exists()


def _train_cli(tmp_path, *arguments) -> subprocess.CompletedProcess:
    variables = {
        name: value
        for name, value in os.environ.items()
        if name != "JAX_COMPILATION_CACHE_DIR"
    }
    command = [sys.executable, "-m", "train", "--config"]
    command += [str(REPO / "configs" / "demo.py"), "--workdir", str(tmp_path / "run")]
    return subprocess.run(
        [*command, *arguments],
        cwd=REPO,
        env=variables,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "flags, logged",
    [
        ((), "compilation cache: {workdir}/compilation_cache"),
        (("--nocompilation_cache",), "compilation cache: off"),
    ],
)
def test_cli_compilation_cache_flag(tmp_path, flags, logged):
    # total_steps=0 fails the settings check, after the cache is configured.
    result = _train_cli(tmp_path, *flags, "--config.total_steps=0")
    assert result.returncode == 2
    assert logged.format(workdir=tmp_path / "run") in result.stderr
    assert "total_steps" in result.stderr


def test_cli_boolean_flag_value_one_line_error(tmp_path):
    result = _train_cli(tmp_path, "--nocompilation_cache=1")
    assert result.returncode == 2
    assert "error: --nocompilation_cache=1 does not take an argument" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_finish_step_non_finite_loss_names_step():
    metrics = {"loss": jnp.array(jnp.nan), "itc_loss": jnp.array(1.0)}
    with pytest.raises(NonFiniteLossError, match="the loss is nan at step 17"):
        _finish_step(17, metrics)
    values = _finish_step(3, {"loss": jnp.array(2.5)})
    assert values == {"loss": 2.5}
    exploded = {"loss": jnp.array(2.5), "param_norm": jnp.array(jnp.inf)}
    with pytest.raises(NonFiniteLossError, match=r"parameter norm .* is inf at step 4"):
        _finish_step(4, exploded)


def test_setup_model_config_gets_itc_sizes():
    config = _config(model=str(REPO / "configs" / "base.py"))
    plain = setup.load_model_config(config)
    assert plain.contrastive_hidden_size is None
    with_itc = setup.load_model_config(config, ("mlm", "itc"))
    assert with_itc.contrastive_hidden_size == 512
    assert with_itc.logit_scale_init_value == 2.6592
    assert with_itc.hidden_size == plain.hidden_size


def _trainer_and_batch_shapes(global_batch_size):
    """Return the tiny pretraining Trainer and its batch's ShapeDtypeStructs."""
    from train.memory import abstract_batch

    config = _config(global_batch_size=global_batch_size)
    settings = RunSettings.from_config(config, needs_data=False)
    mesh = setup.make_mesh((1, -1, 1))
    model_config = setup.load_model_config(config, settings.objective.heads)
    trainer = setup.make_trainer(config, settings, model_config, mesh)
    return trainer, abstract_batch(config, model_config, mesh)


def test_trainer_compiles_with_compiler_options(monkeypatch):
    # The tiny model's compiled step need not show which options it got. An
    # option this jaxlib rejects shows instead that the step is compiled with
    # `bt_jax.compiler_options()`.
    from bt_jax import compiler

    bogus = {compiler.YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_NO_SUCH_TYPE"}
    monkeypatch.setattr(compiler, "compiler_options", lambda: bogus)
    trainer, shapes = _trainer_and_batch_shapes(2)
    lowered = trainer.step.lower(trainer.abstract_state(), shapes)
    with pytest.raises(jax.errors.JaxRuntimeError, match="NO_SUCH_TYPE"):
        lowered.compile()


def test_step_constrains_activations_without_mesh():
    # The training program never enters `jax.set_mesh`; the step must still
    # split activations over the batch axes. Without the constraints, XLA's
    # partitioner gathered whole batches of queries and keys onto each device.
    trainer, shapes = _trainer_and_batch_shapes(4)
    assert jax.sharding.get_abstract_mesh().empty
    lowered = trainer.step.lower(trainer.abstract_state(), shapes).as_text()
    hidden = '[{"data", "fsdp"}, {}, {}]'
    heads = '[{"data", "fsdp"}, {}, {"tensor"}, {}]'
    constraints = [
        line for line in lowered.splitlines() if "sharding_constraint" in line
    ]
    assert any(hidden in line for line in constraints)
    assert any(heads in line for line in constraints)


def test_compile_step_matches_jitted_step():
    # The ahead-of-time step, compiled before any state exists, must compute
    # what the jitted step computes from the same state and batch.
    trainer, shapes = _trainer_and_batch_shapes(2)
    rng = np.random.default_rng(0)
    arrays = {}
    for key, shape in shapes.items():
        if jnp.issubdtype(shape.dtype, jnp.integer):
            arrays[key] = rng.integers(3, 90, shape.shape).astype(shape.dtype)
        else:
            arrays[key] = rng.normal(size=shape.shape).astype(shape.dtype)
    arrays["attention_mask"][:] = 1
    arrays["mlm_labels"][:, ::2] = -100
    arrays["record_index"] = np.arange(shapes["record_index"].shape[0])
    batch = trainer.shard_batch(arrays)
    compiled = trainer.compile_step(batch)
    _, expected = trainer.step(trainer.init(jax.random.key(0)), batch)
    _, metrics = compiled(trainer.init(jax.random.key(0)), batch)
    for name, value in expected.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-6, err_msg=name)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="malloc_trim is glibc's"
)
def test_release_free_host_memory_shrinks_rss():
    from bt_jax.training.step import release_free_host_memory

    def resident_mib():
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20

    # 100 KiB blocks stay below glibc's mmap threshold, so they come from the
    # heap. The last block pins the heap's top, so free() cannot shrink it.
    blocks = [np.ones(100 * 1024, np.uint8) for _ in range(3000)]
    pin = np.ones(100 * 1024, np.uint8)
    del blocks
    before = resident_mib()
    release_free_host_memory()
    after = resident_mib()
    del pin
    assert before - after > 150, (before, after)

"""Benchmark worker processes and the client that drives them over pipes.

    python -m bench.workers jax|torch [rows|embed]

A worker imports one framework and the runner class of one suite: `rows`
(the default) for `python -m bench`, `embed` for `python -m bench.embed`.
Then it reads one JSON request per line on stdin and writes one JSON response
per line. Each response has `"ok"`, and `"error"` (a traceback) when the
request failed. Requests, by `"op"`:

- `load`: build the runner for `task` from `checkpoint`. For `rows`, `task` is
  "itm", "itc", "mlm" or "train" and `inputs` names the .npz file of input
  arrays; bt-jax compiles here. For `embed`, `options` contains the runner's
  keyword arguments. Returns `compile_seconds` (None where nothing compiles).
- `outputs`: save the outputs to compare (see the runners' `reference_outputs`)
  as .npy at `path`.
- `run`: make `calls` calls back to back; returns `seconds` of each call.
- `stats`: returns `max_rss_mib` (ru_maxrss), the thread counts, and the last
  training loss.
- `matmul_peak`: returns the best float32 matmul `gflops` at `size` (`rows`
  runners only).
- `exit`: the worker stops.

Libraries sometimes print to stdout, so the worker moves its stdout to a
private file descriptor and points descriptor 1 at stderr.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import logging
import os
import resource
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("jax", "torch")
# Runner classes, "module:class", by suite and framework. Each module imports
# only its own framework.
RUNNERS = {
    "rows": {
        "jax": "bench.jax_runner:JaxRunner",
        "torch": "bench.torch_runner:TorchRunner",
    },
    "embed": {
        "jax": "bench.jax_embed_runner:JaxEmbedRunner",
        "torch": "bench.torch_embed_runner:TorchEmbedRunner",
    },
}

# Environment of the workers and of `convert init-random`: JAX on the CPU even
# where an accelerator exists (PyTorch runs on the CPU), and no network access
# from the Hugging Face libraries.
WORKER_ENVIRONMENT = {
    "JAX_PLATFORMS": "cpu",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
}


class WorkerError(RuntimeError):
    """A worker process failed a request or exited."""


def os_thread_count() -> int:
    """Return the number of OS threads of this process (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/status has no Threads line")


def max_rss_mib() -> float:
    """Return this process's peak resident set size in MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim).

    The bench does this in both workers after `load` and `outputs`, so that
    memory freed by loading, compiling or the output check does not stay in
    the resident size that the timed calls' peak is measured on. bt-jax's
    `Trainer.compile_step` does the same for its users, but this process must
    not import JAX when it runs PyTorch.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            logging.getLogger(__name__).debug("malloc_trim is unavailable")


class _Server:
    """Serves the requests of one worker process."""

    def __init__(self, runner_class):
        self.runner_class = runner_class
        self.runner = None

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        if op == "load":
            arguments = dict(request.get("options", {}))
            if "inputs" in request:
                with np.load(request["inputs"]) as data:
                    arguments["inputs"] = {key: data[key] for key in data.files}
            self.runner = self.runner_class(
                request["task"], request["checkpoint"], **arguments
            )
            _trim_heap()
            return {"compile_seconds": self.runner.compile_seconds}
        if op == "outputs":
            np.save(request["path"], self._loaded().reference_outputs())
            _trim_heap()
            return {}
        if op == "run":
            runner = self._loaded()
            seconds = []
            for _ in range(request["calls"]):
                started = time.perf_counter()
                runner.call()
                seconds.append(time.perf_counter() - started)
            return {"seconds": seconds}
        if op == "stats":
            return {
                "max_rss_mib": max_rss_mib(),
                "os_threads": os_thread_count(),
                "threads": self.runner_class.thread_counts(),
                "last_loss": None if self.runner is None else self.runner.last_loss,
            }
        if op == "matmul_peak":
            gflops = self.runner_class.matmul_gflops(
                request["size"], request["repeats"]
            )
            return {"gflops": gflops}
        raise ValueError(
            f"unknown op {op!r}; expected load, outputs, run, stats, matmul_peak "
            "or exit"
        )

    def _loaded(self):
        if self.runner is None:
            raise RuntimeError("no model is loaded; send a load request first")
        return self.runner


def serve(framework: str, suite: str = "rows") -> None:
    """Serve the requests on stdin until `exit` or the end of input."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    module, name = RUNNERS[suite][framework].split(":")
    runner_class = getattr(importlib.import_module(module), name)
    server = _Server(runner_class)
    protocol.write(json.dumps({"ok": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "exit":
            protocol.write(json.dumps({"ok": True}) + "\n")
            break
        try:
            response = {"ok": True, **server.handle(request)}
        except Exception as error:  # the client raises it with the traceback
            logging.getLogger("bench.workers").error(
                "worker %d: request %r failed: %s",
                os.getpid(),
                request.get("op"),
                error,
            )
            response = {"ok": False, "error": traceback.format_exc()}
        protocol.write(json.dumps(response) + "\n")


class Worker:
    """Client of one worker process; use it as a context manager."""

    def __init__(self, framework: str, suite: str = "rows"):
        if framework not in FRAMEWORKS:
            raise ValueError(
                f"framework must be one of {FRAMEWORKS}, got {framework!r}"
            )
        if suite not in RUNNERS:
            raise ValueError(f"suite must be one of {tuple(RUNNERS)}, got {suite!r}")
        self.framework = framework
        environment = {**os.environ, **WORKER_ENVIRONMENT}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.workers", framework, suite],
            cwd=REPO,
            env=environment,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        self._ready = False

    def __enter__(self) -> Worker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise WorkerError(
                f"the {self.framework} worker exited with code {code}; its stderr "
                "above shows why (a negative code is the signal, -9 often means out "
                "of memory)."
            )
        response = json.loads(line)
        if not response["ok"]:
            raise WorkerError(
                f"the {self.framework} worker failed:\n{response['error']}"
            )
        return response

    def wait_ready(self) -> None:
        """Wait until the worker has imported its framework."""
        if not self._ready:
            self._read()
            self._ready = True

    def request(self, op: str, **fields) -> dict:
        """Send one request and return the response, raising WorkerError on failure."""
        self.wait_ready()
        try:
            self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            code = self.process.wait()
            raise WorkerError(
                f"the {self.framework} worker exited with code {code} before the "
                f"{op!r} request; -9 often means out of memory."
            ) from None
        return self._read()

    def close(self) -> None:
        """Stop the worker: ask it to exit, and kill it if it does not."""
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.process.stdin.close()
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if not (
        len(arguments) in (1, 2)
        and arguments[0] in FRAMEWORKS
        and set(arguments[1:]) <= set(RUNNERS)
    ):
        sys.exit(
            f"usage: python -m bench.workers {{{'|'.join(FRAMEWORKS)}}} "
            f"[{'|'.join(RUNNERS)}]"
        )
    serve(*arguments)

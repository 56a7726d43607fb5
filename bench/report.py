"""The benchmark report: RESULTS.md, results.png and results.json."""

from __future__ import annotations

import datetime
import json
import os
import platform
from importlib import metadata
from pathlib import Path

PACKAGES = ("jax", "jaxlib", "flax", "torch", "transformers", "numpy")
# Environment variables that change the thread counts or XLA's code, if set.
THREAD_VARIABLES = (
    "XLA_FLAGS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "TF_NUM_INTRAOP_THREADS",
)
TASK_NAMES = {
    "itm": "ITM inference",
    "itc": "ITC inference",
    "mlm": "MLM inference",
    "train": "train step (MLM + ITM + ITC, AdamW)",
    "train-separate": "train step, images encoded in every pass",
}


def machine() -> dict:
    """Return the CPU model, CPU counts and memory of this machine (Linux /proc)."""
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "schedulable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory_kib / 2**20, 1),
        "system": f"{platform.system()} {platform.release()}",
    }


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def gflops(result: dict, framework: str) -> float:
    """Return the achieved GFLOP/s: analytic FLOPs / median seconds, per call."""
    calls_per_second = result[framework]["median"] / result["batch"]
    return result["flops_per_call"] * calls_per_second / 1e9


def build(
    results, peak, *, settings, command, seconds, itc_defaults, load_average
) -> dict:
    """Collect the results, machine, versions and matmul peak into one document.

    `itc_defaults` maps each preset that lacked ITC head sizes to those it got.
    `load_average` is the 1-minute load average at the start and at the end.
    """
    values = next(iter(itc_defaults.values()), {})
    return {
        "itc_defaults": sorted(itc_defaults),
        "itc_default_values": values,
        "environment": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
        "load_average": list(load_average),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(command),
        "seconds": round(seconds, 1),
        "machine": machine(),
        "versions": versions(),
        "settings": settings,
        "matmul_peak_gflops": {**peak, "best": max(peak.values())},
        "threads": {
            "jax": results[-1]["jax"]["threads"],
            "torch": results[-1]["torch"]["threads"],
        },
        "rows": results,
    }


def row_summary(result: dict) -> str:
    """Return the one-line log message of a finished row."""
    jax, torch = result["jax"], result["torch"]
    compile_seconds = jax["compile_seconds"]
    return (
        f"{result['row']}: bt-jax {jax['median']:.3g} pairs/s, PyTorch "
        f"{torch['median']:.3g} pairs/s, ratio {result['ratio']:.2f}, bt-jax compile "
        f"{compile_seconds:.1f} s, peak RSS bt-jax {jax['max_rss_mib']:.0f} MiB, "
        f"PyTorch {torch['max_rss_mib']:.0f} MiB, max abs diff "
        f"{result['max_abs_diff']:.1e}"
    )


def table(document: dict) -> str:
    """Return the markdown table with one line per row."""
    peak = document["matmul_peak_gflops"]["best"]
    lines = [
        "| row | bt-jax pairs/s | PyTorch pairs/s | ratio | bt-jax compile s "
        "| peak RSS bt-jax MiB | peak RSS PyTorch MiB | bt-jax GFLOP/s (% peak) "
        "| PyTorch GFLOP/s (% peak) | max abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in document["rows"]:
        jax, torch = result["jax"], result["torch"]
        achieved = {name: gflops(result, name) for name in ("jax", "torch")}
        lines.append(
            f"| {result['row']} | {jax['median']:.3g} | {torch['median']:.3g} "
            f"| {result['ratio']:.2f} | {jax['compile_seconds']:.1f} "
            f"| {jax['max_rss_mib']:.0f} | {torch['max_rss_mib']:.0f} "
            f"| {achieved['jax']:.1f} ({100 * achieved['jax'] / peak:.0f}%) "
            f"| {achieved['torch']:.1f} ({100 * achieved['torch'] / peak:.0f}%) "
            f"| {result['max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def _rows_description(document: dict) -> list[str]:
    lines = []
    for result in document["rows"]:
        lines.append(
            f"- `{result['row']}`: {TASK_NAMES[result['task']]}, {result['size']} "
            f"model, batch {result['batch']}, text length {result['length']}, "
            f"{result['image_size']} px images; "
            f"{result['flops_per_call'] / 1e9:.4g} GFLOP per call; "
            f"{result['jax']['calls_per_round']} bt-jax and "
            f"{result['torch']['calls_per_round']} PyTorch calls per round."
        )
    return lines


def _method(document: dict) -> list[str]:
    """Return the paragraphs that define the table's columns and the rows' work."""
    settings = document["settings"]
    peak = document["matmul_peak_gflops"]
    return [
        "Throughputs are image-text pairs per second, the median of "
        f"{settings['rounds']} timed rounds per framework. The rounds alternate "
        "between the two worker processes, except in training rows, where one "
        "framework runs all its rounds and then the other (both together need more "
        "memory than the machine has). Each call is waited for before the "
        f"next. Each framework first makes {_calls(settings['warmup'])} that are not "
        "timed. Ratio is bt-jax / PyTorch, so above 1 means bt-jax is faster. "
        "bt-jax's compile time is that of `jax.jit(...).lower(...).compile()`, or "
        "of `Trainer.compile_step` for the training rows. Peak RSS is "
        "`ru_maxrss` of each "
        "framework's worker process, which ran this row only. It includes loading "
        "the checkpoint. Both workers hand freed heap pages back to the system "
        "(glibc's `malloc_trim`) after loading and after the output check, so "
        "the peak reflects the timed calls. "
        "bt-jax's training rows compile the step before loading the weights "
        "(`Trainer.compile_step`). `python -m train` compiles it on the first "
        "step instead, after the state exists. GFLOP/s divide the analytic matmul FLOPs of a call "
        "(`bench/flops.py`) by the median time of a call, and % peak compares them "
        f"with the best float32 matmul rate measured here ({peak['best']:.1f} "
        "GFLOP/s). Max abs diff compares bt-jax's and PyTorch's outputs on the "
        "row's inputs before timing: the logits of ITM and MLM, the three "
        "normalised ITC embeddings, and for the training row every head's output "
        "without dropout at the initial weights. A row fails above "
        f"{settings['atol']:.0e}.",
        "",
        "Rows:",
        "",
        *_rows_description(document),
        "",
        "Both frameworks load the same random checkpoint, written by `python -m "
        "convert init-random --head mlm+itm+itc` from the model preset in "
        f"configs/.{_itc_defaults_note(document)} Inputs are random token ids "
        "(first 0, last 2), an "
        "all-ones attention mask and standard normal pixels, the same arrays for "
        "both. PyTorch runs transformers' classes eagerly in float32 under "
        "`torch.inference_mode()`. bt-jax runs on JAX's CPU backend in float32.",
        "",
        "The training rows time bt-jax's `Trainer.step` (`OptimizerConfig()`, "
        '`remat="dots"`, mesh (1, 1, 1)) against `bench/torch_train.py`, which '
        "does the same work in PyTorch: the MLM pass, the positive pass for ITM "
        "and ITC, ITM on 2x batch hard negatives, the losses, backward and the "
        "AdamW update. In `train` rows, bt-jax runs its default `ObjectiveConfig()`: "
        "the vision encoder once, the text encoder on the MLM and plain texts and "
        "on the negatives' texts, and the cross-modal tower once on all 4x batch "
        "pairs, with the bridges' image transforms run once per image. PyTorch "
        "encodes and transforms the images once too and replays the results in "
        "each of its three passes, so both do the same matmuls. `train-separate` "
        "rows encode the images in every pass in both frameworks "
        "(`ObjectiveConfig(fuse_passes=False)`), as the original recipe does. The "
        "FLOPs count 3x the forward of each pass, which includes the patch "
        "embedding's input gradient that neither framework computes.",
        "",
        *_reference_extra_note(document),
    ]


def _calls(count: int) -> str:
    return f"{count} call" if count == 1 else f"{count} calls"


def _itc_defaults_note(document: dict) -> str:
    sizes = document["itc_defaults"]
    if not sizes:
        return ""
    presets = ", ".join(f"configs/{size}.py" for size in sizes)
    values = document["itc_default_values"]
    return (
        f" {presets} {'lacks' if len(sizes) == 1 else 'lack'} the ITC head sizes, "
        "so the checkpoint gets those of the "
        "released bridgetower-large-itm-mlm-itc: contrastive_hidden_size "
        f"{values['contrastive_hidden_size']}, logit_scale_init_value "
        f"{values['logit_scale_init_value']}."
    )


def _reference_extra_note(document: dict) -> list[str]:
    """Return a paragraph on the matmuls transformers runs beyond the count, if any."""
    extras = {}
    for result in document["rows"]:
        fraction = result.get("reference_extra_flops", 0) / result["flops_per_call"]
        task = "train" if result["task"].startswith("train") else result["task"]
        extras[task] = max(extras.get(task, 0.0), fraction)
    notes = {
        "mlm": "in MLM rows the last image cross-modal layer and the poolers, whose "
        "outputs the MLM head does not read and XLA drops as dead code",
        "itm": "in ITM rows the last image cross-modal layer on every image "
        "token, where bt-jax computes only the class token that the pooler reads",
        "itc": "in ITC rows the same, plus the image transform on every image "
        "token, where bt-jax transforms only the class token that the head "
        "reads, and three similarity matrices",
        "train": "in train rows the MLM and ITM extras in their passes, and the "
        "backward of the ITM one",
    }
    extra_notes = [
        f"{notes[task]} (up to {100 * extras[task]:.1f}%)"
        for task in notes
        if extras.get(task)
    ]
    if not extra_notes:
        return []
    return [
        "The FLOP count is the matmul work the outputs need, which is what "
        "bt-jax runs, and both frameworks' GFLOP/s use it. transformers' "
        "classes run more: " + "; ".join(extra_notes) + ".",
        "",
    ]


def _machine_lines(document: dict) -> list[str]:
    info = document["machine"]
    found = document["versions"]
    peak = document["matmul_peak_gflops"]
    settings = document["settings"]
    threads = document["threads"]
    last = document["rows"][-1]
    torch_threads = ", ".join(f"{k} {v}" for k, v in threads["torch"].items())
    jax_threads = ", ".join(f"{k} {v}" for k, v in threads["jax"].items())
    return [
        "Machine:",
        "",
        f"- CPU: {info['cpu']}, {info['logical_cpus']} logical CPUs "
        f"({info['schedulable_cpus']} schedulable), {info['memory_gib']} GiB "
        f"memory, {info['system']}",
        "- versions: " + ", ".join(f"{name} {found[name]}" for name in found),
        f"- threads: PyTorch {torch_threads}; bt-jax {jax_threads}; OS threads "
        f"in the last row's workers: bt-jax {last['jax']['os_threads']}, PyTorch "
        f"{last['torch']['os_threads']}",
        "- environment: "
        + (
            ", ".join(f"{k}={v}" for k, v in document["environment"].items())
            or "none of " + ", ".join(THREAD_VARIABLES) + " set"
        ),
        "- 1-minute load average at the start and the end of the run: "
        f"{document['load_average'][0]:.2f}, {document['load_average'][1]:.2f}. "
        "Other processes on the same cores distort the timings, PyTorch's most, "
        "so compare only runs made on an idle machine.",
        f"- float32 matmul peak ({settings['peak_size']}x{settings['peak_size']}, "
        f"best of {settings['peak_repeats']}): bt-jax {peak['jax']:.1f} GFLOP/s, "
        f"PyTorch {peak['torch']:.1f} GFLOP/s",
        "",
    ]


def markdown(document: dict) -> str:
    lines = [
        "# bt-jax against PyTorch (transformers) on the CPU",
        "",
        f"Command: `{document['command']}` (from the repository root), finished on "
        f"{document['date']}, {document['seconds']:.0f} s in all.",
        "",
        table(document),
        "",
        *_method(document),
        *_machine_lines(document),
        "![bt-jax / PyTorch throughput per row](results.png)",
        "",
    ]
    return "\n".join(lines)


def plot(document: dict, path: Path) -> None:
    """Draw the speed ratio per row as bars, with a line at 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = document["rows"]
    names = [result["row"] for result in rows]
    ratios = [result["ratio"] for result in rows]
    colors = ["tab:blue" if ratio >= 1 else "tab:orange" for ratio in ratios]
    figure, axis = plt.subplots(figsize=(max(5.0, 0.6 * len(rows) + 2), 3.6))
    bars = axis.bar(names, ratios, color=colors)
    axis.bar_label(bars, labels=[f"{r:.2f}" for r in ratios], fontsize=8)
    axis.axhline(1.0, color="black", linewidth=1)
    axis.set_ylabel("bt-jax / PyTorch throughput")
    axis.set_title(f"bt-jax vs PyTorch on {document['machine']['cpu']}", fontsize=9)
    axis.tick_params(axis="x", labelrotation=45, labelsize=8)
    for label in axis.get_xticklabels():
        label.set_horizontalalignment("right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write(document: dict, out: Path) -> list[Path]:
    """Write RESULTS.md, results.png and results.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "RESULTS.md", out / "results.png", out / "results.json"]
    paths[0].write_text(markdown(document), encoding="utf-8")
    plot(document, paths[1])
    paths[2].write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return paths

"""The end-of-run report: a short text summary and a plot of the curves."""

from __future__ import annotations

import logging
from pathlib import Path

from bt_jax.training.metric_writer import read_metrics

logger = logging.getLogger(__name__)

REPORT_FILE = "report.txt"
PLOT_FILE = "curves.png"
_LOSSES = ("loss", "mlm_loss", "itm_loss", "itc_loss")
_RECALLS = ("text_to_image_r1", "image_to_text_r1", "itm_accuracy")
# Fine-tuning tasks log these training metrics, and evaluate in percent.
_TASK_TRAIN = ("accuracy", "vqa_score")
_TASK_SCORES = ("accuracy", "text_to_image_r1", "image_to_text_r1", "r_mean")
_RECORD_KEYS = ("step", "split", "time")


def summarize(train: list[dict], evals: list[dict], task: str = "pretrain") -> str:
    """Return the report text from the train and eval records of `metrics.jsonl`."""
    lines = []
    if train:
        first, last = train[0], train[-1]
        lines.append(f"steps {first['step']} to {last['step']} (logged means):")
        for name in _LOSSES + _TASK_TRAIN:
            if first.get(name) is not None and last.get(name) is not None:
                lines.append(f"  {name:<10} {first[name]:8.4f} -> {last[name]:8.4f}")
        speed = [
            r["examples_per_second"] for r in train if r.get("examples_per_second")
        ]
        if speed:
            lines.append(f"  examples/s {sorted(speed)[len(speed) // 2]:8.1f} (median)")
    if evals and task != "pretrain":
        last = evals[-1]
        lines.append(
            f"{task} evaluation at step {last['step']} (accuracies and recalls in "
            "percent):"
        )
        for name, value in last.items():
            if name in _RECORD_KEYS or not isinstance(value, (int, float)):
                continue
            if _is_count(name):
                lines.append(f"  {name:<20} {int(value):8d}")
            else:
                lines.append(f"  {name:<20} {value:8.2f}")
    elif evals:
        last = evals[-1]
        images = last.get("images")
        examples = last.get("examples")
        images_text = f" of {int(images)} images" if images else ""
        lines.append(
            f"evaluation at step {last['step']} on {int(examples or 0)} pairs"
            f"{images_text}:"
        )
        if last.get("itm_accuracy") is not None:
            lines.append(f"  ITM accuracy     {last['itm_accuracy']:.3f} (chance 0.5)")
        if images:
            for direction, chance in (
                ("text_to_image", 1 / images),
                ("image_to_text", 1 / images),
            ):
                recalls = " ".join(
                    f"R@{k} {last[f'{direction}_r{k}']:.3f}"
                    for k in (1, 5, 10)
                    if last.get(f"{direction}_r{k}") is not None
                )
                label = direction.replace("_", " ")
                lines.append(f"  {label:<16} {recalls} (R@1 chance about {chance:.3f})")
    return "\n".join(lines)


def _is_count(name: str) -> bool:
    """Return whether an evaluation metric counts items (not a percentage)."""
    counts = ("examples", "questions", "images", "texts", "missing_predictions")
    return (
        name in counts
        or name.startswith("questions_")
        or name.endswith(("_examples", "_correct", "_predicted"))
    )


def write_report(workdir: str | Path, config=None) -> str:
    """Write `report.txt` and `curves.png` into the workdir; return the report text."""
    task = "pretrain" if config is None else config.task
    workdir = Path(workdir)
    train = read_metrics(workdir, "train")
    evals = read_metrics(workdir, "eval")
    text = summarize(train, evals, task)
    (workdir / REPORT_FILE).write_text(text + "\n", encoding="utf-8")
    if train:
        plot_curves(train, evals, workdir / PLOT_FILE, task)
        text += f"\nplot: {workdir / PLOT_FILE}"
    return text


def plot_curves(
    train: list[dict], evals: list[dict], path: Path, task: str = "pretrain"
) -> None:
    """Plot the training losses and the evaluation scores against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, scores) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [record["step"] for record in train]
    for name in _LOSSES:
        values = [record.get(name) for record in train]
        if any(value is not None for value in values):
            losses.plot(steps, values, label=name)
    losses.set_xlabel("step")
    losses.set_ylabel("loss (mean over the log window)")
    losses.set_title("training losses")
    losses.legend()
    if evals:
        eval_steps = [record["step"] for record in evals]
        names = _RECALLS if task == "pretrain" else _TASK_SCORES
        for name in names:
            values = [record.get(name) for record in evals]
            if any(value is not None for value in values):
                scores.plot(eval_steps, values, marker="o", label=name)
        scores.set_ylim(0, 1.02 if task == "pretrain" else 102)
        if task != "pretrain":
            scores.set_ylabel("percent")
        scores.legend()
    scores.set_xlabel("step")
    scores.set_title("evaluation")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)

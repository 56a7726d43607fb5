"""Evaluate a fine-tuned model on one split of a dataset, outside a training run.

    python -m train.evaluate --task vqa --model runs/vqa/model \
        --dataset data/bt_vqa_v2 --split val --out results/

The model directory is what training exports (or `python -m convert to-jax`
writes), with its tokenizer and image settings. The task's metrics
(`bt_jax.evaluation`) go to `OUT/TASK_SPLIT.json` and a text table
`OUT/TASK_SPLIT.txt`, and the table is printed.

Tasks: vqa (VQA accuracy), nlvr2 and snli-ve (accuracy), retrieval (R@1/5/10
both ways, ITC top `--k-test` re-ranked by ITM). The dataset must be the kind
the task reads (`python -m bt_jax.data build`). For VQA the predicted answers
also go to `OUT/vqa_SPLIT_predictions.json` as `[{"question_id", "answer"}]`,
the format of the VQA evaluation server; a split without human answers (test,
test-dev) gets only that file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

logger = logging.getLogger("train.evaluate")

TASKS = ("vqa", "nlvr2", "snli-ve", "retrieval")
# Text lengths of the original fine-tuning recipes (configs/finetune_*.py).
TEXT_LENGTHS = {"vqa": 50, "nlvr2": 50, "snli-ve": 50, "retrieval": 40}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m train.evaluate",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument(
        "--model", required=True, help="model directory with tokenizer files"
    )
    parser.add_argument("--dataset", required=True, help="built dataset directory")
    parser.add_argument("--split", required=True, help="split to score, e.g. val")
    parser.add_argument("--data-dir", default="", help="TFDS data dir for a name")
    parser.add_argument("--out", required=True, help="folder for the result files")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--max-images",
        type=int,
        default=0,
        help="score only the first N records (images or image pairs); 0: all",
    )
    parser.add_argument(
        "--max-text-length",
        type=int,
        default=0,
        help="tokens per text, as in training; 0: the task's recipe "
        "(50, or 40 for retrieval)",
    )
    parser.add_argument(
        "--k-test",
        type=int,
        default=128,
        help="retrieval: ITC candidates per query re-ranked by ITM",
    )
    return parser


def evaluate(args: argparse.Namespace) -> dict[str, float]:
    """Run the evaluation the arguments describe; return the metrics."""
    import jax
    from flax import nnx

    from bt_jax import hub, processing, sharding
    from bt_jax.data import PipelineConfig, make_pipeline, open_records
    from bt_jax.evaluation import write_results
    from bt_jax.training.evaluation import TaskEvaluator, vqa_annotations
    from bt_jax.training.objectives import ObjectiveConfig
    from bt_jax.training.optim import OptimizerConfig
    from bt_jax.training.step import Trainer
    from train.loop import _FirstRecords
    from train.setup import DATASET_TASKS

    for name in ("batch_size", "k_test"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive.")
    for name in ("max_images", "max_text_length"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or positive.")
    config = hub.load_config(args.model)
    _check_model_task(args, hub.checkpoint_head(args.model))
    records = open_records(args.dataset, args.split, data_dir=args.data_dir or None)
    if records.task != DATASET_TASKS[args.task]:
        raise ValueError(
            f"--task {args.task} reads a {DATASET_TASKS[args.task]} dataset, but "
            f"{args.dataset} holds {records.task} data."
        )
    if args.max_images:
        records = _FirstRecords(records, args.max_images)
    answers = None
    annotated = True
    if args.task == "vqa":
        answers = list(records.answer_vocab or [])
        head_answers = [config.id2label[i] for i in range(config.num_labels or 0)]
        if answers != head_answers:
            raise ValueError(
                f"the VQA head of {args.model} has {len(head_answers)} answers but "
                f"{args.dataset} has an answer vocabulary of {len(answers)}"
                + (" in another order" if len(answers) == len(head_answers) else "")
                + "; build the dataset with the model's answer list "
                "(`python -m bt_jax.data build vqa SRC --out DIR --answer-vocab FILE`)."
            )
        annotated = bool(len(records)) and any(records[0]["answers_per_question"])

    processor = processing.BridgeTowerProcessor.from_pretrained(args.model)
    max_length = args.max_text_length or TEXT_LENGTHS[args.task]
    if processor.max_text_length is not None:
        max_length = min(max_length, processor.max_text_length)
    mesh = sharding.make_mesh((-1, 1, 1))
    devices = mesh.shape["data"]
    batch_size = math.ceil(args.batch_size / devices) * devices
    objective = ObjectiveConfig(mlm_weight=0.0)
    trainer = Trainer(
        config,
        objective,
        OptimizerConfig(),
        mesh,
        task=args.task,
        scan_layers=False,
    )
    _, params = hub.from_pretrained(args.model, head=trainer.head, mesh=mesh)
    params = jax.device_put(
        trainer.stack_params(nnx.to_pure_dict(params)), trainer.state_shardings.params
    )
    evaluator = TaskEvaluator(
        trainer,
        batch_size // jax.process_count(),
        answers=answers,
        annotations=vqa_annotations(records) if args.task == "vqa" else None,
        score_answers=annotated,
        k_test=args.k_test,
    )
    pipeline = PipelineConfig(
        global_batch_size=batch_size,
        max_text_length=max_length,
        seed=0,
        num_epochs=1,
        shuffle=False,
        texts="all",
        mlm_probability=0.0,
        drop_remainder=False,
        worker_count=0,
    )
    pairs = sum(records.texts_per_record(progress=False))
    steps = math.ceil(pairs / batch_size)
    logger.info("scoring %d texts of %s in %d batches", pairs, args.split, steps)
    iterator = iter(make_pipeline(records, processor, pipeline))
    try:
        result = evaluator.evaluate(params, iterator, steps)
    finally:
        iterator.close()
    if jax.process_index() == 0:
        name = f"{args.task}_{args.split}"
        if args.task == "vqa":
            Path(args.out).mkdir(parents=True, exist_ok=True)
            path = Path(args.out) / f"{name}_predictions.json"
            path.write_text(json.dumps(evaluator.predictions) + "\n", encoding="utf-8")
            logger.info("wrote %d answers to %s", len(evaluator.predictions), path)
        if result:
            _, table = write_results(result, Path(args.out), name)
            print(table)
    return result


def _check_model_task(args: argparse.Namespace, head: str) -> None:
    """Raise ValueError when the model at `--model` has no head for `--task`."""
    if args.task == "retrieval":
        fits = "itm" in head.split("+") and "itc" in head.split("+")
    else:
        fits = head == args.task
    if not fits:
        required = (
            "ITM and ITC heads" if args.task == "retrieval" else f"a {args.task} head"
        )
        raise ValueError(
            f"--task {args.task} needs {required}, but {args.model} holds a {head} "
            "model; pass the task it was fine-tuned for."
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("absl", "jax._src", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        evaluate(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        logger.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

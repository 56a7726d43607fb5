"""Evaluate a fine-tuned model on one split of a dataset, outside a training run.

    python -m train.evaluate --task vqa --model runs/vqa/model \
        --dataset data/bt_vqa_v2 --split val --out results/

The model directory is what training exports (or `python -m convert to-jax`
writes), with its tokenizer and image settings. The task's metrics
(`bt_jax.evaluation`) go to `OUT/TASK_SPLIT.json` and a text table
`OUT/TASK_SPLIT.txt`, and the table is printed.

Tasks: vqa (VQA accuracy), nlvr2 and snli-ve (accuracy), retrieval (R@1/5/10
both ways, ITC top `--k-test` re-ranked by ITM). The dataset must be the kind
the task reads (`python -m bt_jax.data build`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

logger = logging.getLogger("train.evaluate")

TASKS = ("vqa", "nlvr2", "snli-ve", "retrieval")


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
        help="tokens per text; 0: the model's limit",
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
    config = hub.load_config(args.model)
    records = open_records(args.dataset, args.split, data_dir=args.data_dir or None)
    if records.task != DATASET_TASKS[args.task]:
        raise ValueError(
            f"--task {args.task} reads a {DATASET_TASKS[args.task]} dataset, but "
            f"{args.dataset} holds {records.task} data."
        )
    if args.max_images:
        records = _FirstRecords(records, args.max_images)
    answers = None
    if args.task == "vqa":
        answers = list(records.answer_vocab or [])
        heads_answers = [config.id2label[i] for i in range(config.num_labels or 0)]
        if answers != heads_answers:
            raise ValueError(
                f"the VQA head of {args.model} has {len(heads_answers)} answers but "
                f"{args.dataset} has an answer vocabulary of {len(answers)}"
                + (" in another order" if len(answers) == len(heads_answers) else "")
                + "; build the dataset with the model's answer list "
                "(`python -m bt_jax.data build vqa SRC --out DIR --answer-vocab FILE`)."
            )

    processor = processing.BridgeTowerProcessor.from_pretrained(args.model)
    max_length = args.max_text_length or processor.max_text_length or 50
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
    params = jax.device_put(nnx.to_pure_dict(params), trainer.state_shardings.params)
    evaluator = TaskEvaluator(
        trainer,
        batch_size // jax.process_count(),
        answers=answers,
        annotations=vqa_annotations(records) if args.task == "vqa" else None,
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
        _, table = write_results(result, Path(args.out), f"{args.task}_{args.split}")
        print(table)
    return result


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

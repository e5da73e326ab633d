"""Training throughput: our Ray Train job vs a plain Hugging Face Trainer, same model, rows and steps.

    HF_HUB_OFFLINE=1 python -m bench.train_throughput --steps 30 --max-length 512 --json-out train.json

Three systems run one after the other in this process, on the same training rows (the train folds of
the first --rows rows), the same packaged model, max_length, global batch (batch_size x workers) and
number of optimizer steps:

1. ours: `app.training.fit` (Ray Train workers, our truncation policy, length-grouped dynamic padding).
2. HF Trainer, padding="max_length": the common Kaggle-notebook recipe.
3. HF Trainer, dynamic padding (DataCollatorWithPadding) + train_sampling_strategy="group_by_length".

The baselines format a row as one "Prompt: ... Response A: ... Response B: ..." string, turn by turn,
and tokenize it with tokenizer(text, truncation=True, max_length=max_length), as notebooks do.
Real tokens are non-padding tokens (the attention mask's sum) of the batches actually trained on.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.reporting import write_json

# Heavy libraries (torch, transformers, ray) are imported inside functions: huggingface_hub reads
# HF_HUB_OFFLINE when it is imported, and main() sets it first.

N_FOLDS = 10  # 9 of 10 folds train, so few rows cover the steps within one epoch
ROW_MARGIN = 1.05  # prompt-grouped folds are only roughly equal in size
HFVariant = Literal["max_length", "dynamic"]


@dataclass
class Measurement:
    """One system's throughput over the timed training steps."""

    system: str
    layout: str  # processes x torch threads
    samples_per_s: float
    real_tokens_per_s: float
    real_token_share: float
    wall_s: float  # the whole call, setup included
    details: dict[str, Any] = field(default_factory=dict)


def default_rows(steps: int, batch_size: int, workers: int, group_batches: int) -> int:
    """Rows that give each worker whole length-grouping windows covering `steps` full batches."""
    window = batch_size * group_batches
    per_worker = math.ceil(steps * batch_size / window) * window
    return math.ceil(per_worker * workers / (1 - 1 / N_FOLDS) * ROW_MARGIN)


def bench_config(args: argparse.Namespace, data_path: str, storage: str):
    from app.config import load_config

    return load_config(None, {
        "data.train_path": data_path,
        "data.max_rows": args.rows,
        "data.n_folds": N_FOLDS,
        "format.max_length": args.max_length,
        "train.batch_size": args.batch_size,
        "train.epochs": 1,  # fits() checks that the steps lie within one epoch
        "train.max_steps": args.steps,
        "train.log_every_steps": max(1, args.steps // 3),
        "scaling.num_workers": args.workers,
        "run.name": "bench_train",
        "run.storage_path": storage,
        "run.keep_checkpoints": 1,
    })


def load_train_rows(config, run_dir: str):
    """The training split `fit` will use (same rows, same prompt-grouped folds)."""
    from app.training import load_training_rows, split_train_valid

    frame, _ = load_training_rows(config, run_dir)
    train, _ = split_train_valid(frame, config)
    return train


def check_one_epoch(n_train: int, args: argparse.Namespace, group_batches: int) -> None:
    """Workers report only at epoch end or at max_steps: keep every step in epoch 0 so one report covers all."""
    from app.loop import batches_per_epoch

    per_epoch = batches_per_epoch(n_train // args.workers, args.batch_size, group_batches)
    if per_epoch < args.steps:
        needed = default_rows(args.steps, args.batch_size, args.workers, group_batches)
        raise SystemExit(f"--rows {args.rows} gives {n_train} training rows, {per_epoch} steps per epoch per "
                         f"worker, fewer than --steps {args.steps}; use --rows {needed} or more (or fewer steps)")


def measure_ours(config) -> Measurement:
    import ray

    from app.cluster import connect
    from app.training import fit

    started = time.perf_counter()
    connect()
    try:
        result = fit(config)
    finally:
        ray.shutdown()  # its processes would otherwise compete with the baselines for the cores
    wall = time.perf_counter() - started
    last = result.history[-1]
    if int(last["epoch"]) != 0 or int(last["step"]) != config.train.max_steps:
        raise RuntimeError(f"expected one report at step {config.train.max_steps} of epoch 0, got {last}")
    threads = config.scaling.torch_threads or max(1, int(config.scaling.cpus_per_worker))
    return Measurement(
        system="ours: Ray Train, length-grouped dynamic padding",
        layout=f"{config.scaling.max_workers} x {threads}",
        samples_per_s=float(last["train_rows_per_s"]),
        real_tokens_per_s=float(last["train_real_tokens_per_s"]),
        real_token_share=float(last["train_real_token_share"]),
        wall_s=wall,
        details={"train_loss": float(last["train_loss"]), "valid_log_loss": float(last["valid_log_loss"])},
    )


def notebook_text(prompt: list[str], response_a: list[str], response_b: list[str]) -> str:
    """The usual notebook formatting: turn by turn, prompt then both responses, one string."""
    return "\n".join(f"Prompt: {p}\nResponse A: {a}\nResponse B: {b}" for p, a, b in zip(prompt, response_a, response_b))


def measure_hf(variant: HFVariant, train_frame, config, threads: int | None) -> Measurement:
    import torch
    from transformers import (DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments,
                              default_data_collator)

    from app.modeling import build_model, build_tokenizer

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    tokenizer = build_tokenizer(config)
    texts = [notebook_text(*row) for row in zip(train_frame["prompt"], train_frame["response_a"], train_frame["response_b"])]
    padding = "max_length" if variant == "max_length" else False
    encoded = tokenizer(texts, truncation=True, max_length=config.format.max_length, padding=padding)
    labels = train_frame["label"].tolist()
    dataset = [{**{key: values[i] for key, values in encoded.items()}, "labels": int(labels[i])} for i in range(len(texts))]
    model = build_model(config)

    tokens = {"rows": 0, "real": 0, "computed": 0}

    def count_tokens(module, args, kwargs):
        if module.training:
            mask = kwargs["attention_mask"]  # (B, T)
            tokens["rows"] += mask.shape[0]
            tokens["real"] += int(mask.sum())
            tokens["computed"] += mask.numel()

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)

    class StepTimer(TrainerCallback):
        """From the first epoch start (before the first batch is fetched) to the end of the last step."""

        start: float | None = None
        end: float | None = None

        def on_epoch_begin(self, args, state, control, **kwargs):
            if self.start is None:
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.end = time.perf_counter()

    timer = StepTimer()
    global_batch = config.train.batch_size * config.scaling.max_workers
    with tempfile.TemporaryDirectory(prefix="bench_hf_") as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=global_batch,
            max_steps=config.train.max_steps,
            learning_rate=config.train.lr,
            weight_decay=config.train.weight_decay,
            warmup_steps=config.train.warmup_ratio,  # a float < 1 is a ratio of the steps
            lr_scheduler_type="cosine",
            max_grad_norm=config.train.max_grad_norm,
            optim="adamw_torch",  # ours uses the same non-fused torch AdamW
            train_sampling_strategy="group_by_length" if variant == "dynamic" else "random",
            report_to="none",
            save_strategy="no",
            logging_steps=config.train.max_steps,
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            seed=config.seed,
        )
        collator = default_data_collator if variant == "max_length" else DataCollatorWithPadding(tokenizer)
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                          processing_class=tokenizer, callbacks=[timer])
        output = trainer.train()
    wall = time.perf_counter() - started
    seconds = timer.end - timer.start
    name = ("HF Trainer, padding='max_length'" if variant == "max_length" else
            "HF Trainer, dynamic padding (DataCollatorWithPadding), train_sampling_strategy='group_by_length'")
    return Measurement(
        system=name,
        layout=f"1 x {torch.get_num_threads()}",
        samples_per_s=tokens["rows"] / seconds,
        real_tokens_per_s=tokens["real"] / seconds,
        real_token_share=tokens["real"] / max(tokens["computed"], 1),
        wall_s=wall,
        details={"timed_s": seconds, "rows": tokens["rows"], "real_tokens": tokens["real"],
                 "computed_tokens": tokens["computed"], "train_loss": float(output.training_loss)},
    )


def ratio(value: float, reference: Measurement | None) -> str:
    return f"{value / reference.real_tokens_per_s:.2f}x" if reference else "n/a"


def render(results: list[Measurement], settings: dict[str, Any]) -> str:
    """Markdown: settings, machine, the table, and what was timed."""
    by_variant = {m.details.get("variant"): m for m in results}
    padded, dynamic = by_variant.get("max_length"), by_variant.get("dynamic")
    lines = ["## Training throughput", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    lines += ["", "| system | processes x torch threads | samples/s | real tokens/s | real-token share "
              "| real tok/s vs padding='max_length' | real tok/s vs dynamic | whole call s |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in results:
        lines.append(f"| {m.system} | {m.layout} | {m.samples_per_s:.2f} | {m.real_tokens_per_s:.0f} "
                     f"| {m.real_token_share:.3f} | {ratio(m.real_tokens_per_s, padded)} "
                     f"| {ratio(m.real_tokens_per_s, dynamic)} | {m.wall_s:.1f} |")
    lines += [
        "",
        "Timed: ours = each worker's own clock over its epoch loop, from the first shard fetch through the last "
        "optimizer step (the loop then reads past the rest of its shard, a few ms a window), rank 0's rows and "
        "tokens x workers; it excludes Ray start, Ray Data tokenization, model "
        "build, evaluation and checkpointing. HF = from the first on_epoch_begin to the last on_step_end (all "
        "steps, the first included); it excludes tokenization, model build and Trainer setup. Both include "
        "fetching and padding batches. 'whole call s' includes all setup (ours: Ray start + fit with "
        "evaluation and checkpoint; HF: tokenization + model build + Trainer + train()).",
        "Real tokens differ between ours and HF by design: ours truncates each turn head+tail under one "
        "budget, HF cuts the joined text at max_length; both are capped at the same max_length.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="Kaggle train .csv/.csv.gz/.parquet; default: built-in synthetic rows")
    parser.add_argument("--rows", type=int, help="use the first N rows; default: just enough for --steps in one epoch")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="rows per worker per step (HF: x workers)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (1 torch thread each)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps for every system")
    parser.add_argument("--hf-threads", type=int, help="torch threads of the HF Trainer process; default torch's own")
    parser.add_argument("--skip-ours", action="store_true")
    parser.add_argument("--skip-hf", action="store_true", help="skip both HF Trainer baselines")
    parser.add_argument("--json-out", help="also write the numbers and settings to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # Ray processes inherit it; bars would clutter the table
    import ray
    import torch
    import transformers

    from app.config import TrainConfig
    from app.synthetic import write_builtin_dataset
    from app.training import run_directory

    group_batches = TrainConfig().length_group_batches
    if args.rows is None:
        args.rows = default_rows(args.steps, args.batch_size, args.workers, group_batches)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as scratch:
        data_path = args.data or write_builtin_dataset(os.path.join(scratch, "data"), n_train=args.rows, n_test=50)["train"]
        config = bench_config(args, data_path, os.path.join(scratch, "runs"))
        train_frame = load_train_rows(config, run_directory(config))
        check_one_epoch(len(train_frame), args, group_batches)
        torch_threads = args.hf_threads or torch.get_num_threads()
        settings = {
            "model": config.model.name_or_path,
            "data": f"{args.data or 'built-in synthetic'}, first {args.rows} rows -> {len(train_frame)} training rows "
                    f"(fold {config.data.valid_fold} of {N_FOLDS} held out, as fit does)",
            "max_length": args.max_length,
            "global batch": f"{args.batch_size * args.workers} (ours: {args.batch_size} per worker x {args.workers} "
                            f"workers; HF: per_device_train_batch_size={args.batch_size * args.workers})",
            "optimizer steps": args.steps,
            "optimizer": f"AdamW lr {config.train.lr}, weight decay {config.train.weight_decay}, cosine, warmup "
                         f"{config.train.warmup_ratio}, clip {config.train.max_grad_norm}, fp32",
            "ours": f"{args.workers} workers x {config.scaling.cpus_per_worker:g} CPU, torch threads "
                    f"{config.scaling.torch_threads or int(config.scaling.cpus_per_worker)} each, "
                    f"length_group_batches {group_batches}, swap_prob {config.train.swap_prob}",
            "HF": f"one process, torch threads {torch_threads}, dataloader_num_workers=0",
            "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python "
                       f"{platform.python_version()}, torch {torch.__version__}, transformers "
                       f"{transformers.__version__}, ray {ray.__version__}",
            "note": "transformers 5 has no TrainingArguments.group_by_length; "
                    "train_sampling_strategy='group_by_length' is its replacement (LengthGroupedSampler)",
        }
        results = []
        if not args.skip_ours:
            results.append(measure_ours(config))
        if not args.skip_hf:
            for variant in ("max_length", "dynamic"):
                measurement = measure_hf(variant, train_frame, config, args.hf_threads)
                measurement.details["variant"] = variant
                results.append(measurement)
    print(render(results, settings), flush=True)
    if args.json_out:
        write_json(args.json_out, settings, results)


if __name__ == "__main__":
    main()

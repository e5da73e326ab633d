"""Prediction throughput: our batch Predictor vs a plain loop of fixed batches padded to max_length.

    HF_HUB_OFFLINE=1 python -m bench.predict_throughput --checkpoint runs/demo/epoch_000 --rows 2000 --json-out predict.json

Both run in this process, one after the other, on the same checkpoint, rows and torch threads, in eval
mode under torch.no_grad, and get the same inputs: every row encoded by the checkpoint's PairEncoder (our
truncation policy). They differ only in batching:

- ours: `Predictor.predict` sorts rows by length and packs them into batches of at most
  --tokens-per-batch padded tokens, each padded to its own longest row; timed twice, with the default
  `predict.precision=auto` (bf16 autocast on GPUs and on CPUs with native bf16, else fp32) and with fp32;
- baseline: rows in input order, --batch-size rows per batch, every batch padded to max_length, fp32.

When the rows have labels, each system's log loss is printed too, so the cost of bf16 is visible.

With --ray, a third row times `app.prediction.predict_file` (Ray Data actor pool over a CSV file).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.reporting import write_json

# torch, transformers and ray are imported inside functions: huggingface_hub reads HF_HUB_OFFLINE when it
# is imported, and main() sets it first.

WARMUP_ROWS = 8  # one small forward per system before timing (first-call allocations, lazy init)


@dataclass
class Measurement:
    """One system's end-to-end and model-only throughput."""

    system: str
    rows: int
    seconds: float  # encode + forward (+ for Ray: file read, actor start, model load)
    model_seconds: float | None  # forward passes only, on pre-encoded rows
    real_tokens: int
    computed_tokens: int
    max_abs_diff: float  # vs the fp32 baseline, on probabilities
    log_loss: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def time_interleaved(runs: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Time each run `repeats` times, in rounds (a, b, ..., a, b, ...) so drifting machine load hits all alike.

    Returns the shortest time and the last result of each run, by name.
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, Any] = {}
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            results[name] = run()
            times[name].append(time.perf_counter() - started)
    return {name: min(values) for name, values in times.items()}, results


def padded_batches_fixed(sequences: Sequence[Sequence[int]], segments: Sequence[Sequence[int]], batch_size: int,
                         max_length: int, pad_id: int):
    """Yield (input_ids, attention_mask, token_type_ids) of (B, max_length) for rows in input order."""
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        input_ids = np.full((len(chunk), max_length), pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(chunk), max_length), dtype=np.int64)
        token_type_ids = np.zeros((len(chunk), max_length), dtype=np.int64)
        for row, seq in enumerate(chunk):
            input_ids[row, : len(seq)] = seq
            attention_mask[row, : len(seq)] = 1
            token_type_ids[row, : len(seq)] = segments[start + row]
        yield input_ids, attention_mask, token_type_ids


def baseline_logits(model, sequences: Sequence[Sequence[int]], segments: Sequence[Sequence[int]], batch_size: int,
                    max_length: int, pad_id: int) -> np.ndarray:
    """(N, 3) logits from fixed-size batches, each padded to max_length (same inputs as ours, segments included)."""
    import torch

    from app.modeling import uses_segments

    parts = []
    with torch.no_grad():
        for input_ids, attention_mask, token_type_ids in padded_batches_fixed(sequences, segments, batch_size,
                                                                              max_length, pad_id):
            extra = {"token_type_ids": torch.from_numpy(token_type_ids)} if uses_segments(model) else {}
            output = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask), **extra)
            parts.append(output.logits.float().numpy())
    return np.concatenate(parts)


def ours_computed_tokens(lengths: Sequence[int], tokens_per_batch: int) -> int:
    """Padded tokens the Predictor computes: each token-budget batch is rows x its longest row."""
    from app.batching import token_budget_batches

    return sum(len(batch) * max(lengths[i] for i in batch) for batch in token_budget_batches(lengths, tokens_per_batch))


def measure_ray(checkpoint: str, data_path: str, frame, tokens_per_batch: int, threads: int,
                reference: np.ndarray, real_tokens: int, computed_tokens: int, labels) -> Measurement:
    """`predict_file` over the CSV with one actor of `threads` CPUs; its time includes Ray's own setup."""
    import pandas as pd
    import ray

    from app.cluster import connect
    from app.config import PredictConfig
    from app.data import LABEL_COLUMNS
    from app.metrics import log_loss
    from app.prediction import predict_file

    config = PredictConfig(tokens_per_batch=tokens_per_batch, num_actors=1, cpus_per_actor=threads)
    connect()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_predict_") as scratch:
            output = os.path.join(scratch, "submission.csv")
            report = predict_file(checkpoint, data_path, output, config)
            submission = pd.read_csv(output, dtype={"id": str}).set_index("id").loc[list(frame["id"])]
    finally:
        ray.shutdown()
    probs = submission[list(LABEL_COLUMNS)].to_numpy()
    return Measurement(
        system="ours via Ray Data (predict_file, 1 actor, precision=auto)",
        rows=report.rows, seconds=report.seconds, model_seconds=None, real_tokens=real_tokens,
        computed_tokens=computed_tokens, max_abs_diff=float(np.abs(probs - reference).max()),
        log_loss=None if labels is None else log_loss(probs, labels),
        details={"timed": "predict_file: CSV read + validation, Ray Data actor start, model load, encode, forward, "
                          "writing submission.csv (Ray start excluded); submission holds 8 decimals"},
    )


def load_rows(data: str | None, rows: int | None, scratch: str):
    """The first `rows` rows of `data` (or of built-in synthetic test data) and the CSV they came from."""
    from app.data import load_pairs, read_table
    from app.synthetic import write_builtin_dataset

    if data is None:
        data = write_builtin_dataset(os.path.join(scratch, "data"), n_train=50, n_test=rows or 1000)["test"]
    frame = load_pairs(data, require_labels=None).frame  # labels when the file has them: log loss per system
    if rows is not None and rows < len(frame):
        frame = frame.iloc[:rows].reset_index(drop=True)
        # --ray reads a file: give it exactly these rows (every cell is kept as the text it was read as).
        subset = os.path.join(scratch, "rows.csv")
        read_table(data).iloc[:rows].to_csv(subset, index=False)
        data = subset
    return frame, data


def render(results: list[Measurement], baseline: Measurement, settings: dict[str, Any]) -> str:
    lines = ["## Prediction throughput", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    lines += ["", "| system | rows/s (encode + forward) | rows/s (forward only) | real-token share "
              "| speed-up vs baseline (end to end) | speed-up vs baseline (forward only) "
              "| max abs diff of probs vs baseline | log loss |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in results:
        model_rate = f"{m.rows / m.model_seconds:.1f}" if m.model_seconds else "n/a"
        model_ratio = (f"{baseline.model_seconds / m.model_seconds:.2f}x"
                       if m.model_seconds and baseline.model_seconds else "n/a")
        lines.append(f"| {m.system} | {m.rows / m.seconds:.1f} | {model_rate} | {m.real_tokens / m.computed_tokens:.3f} "
                     f"| {baseline.seconds / m.seconds:.2f}x | {model_ratio} | {m.max_abs_diff:.2e} "
                     f"| {'n/a' if m.log_loss is None else f'{m.log_loss:.4f}'} |")
    lines += [
        "",
        "fp32 rows agree with the baseline to < 1e-4: "
        f"{'yes' if all(m.max_abs_diff < 1e-4 for m in results if 'fp32' in m.system) else 'NO'}.",
        "Timed: 'encode + forward' = PairEncoder.encode of all rows, then every forward pass and softmax "
        "(ours: one Predictor.predict call); 'forward only' = the forward passes over pre-encoded rows "
        "(ours: Predictor.logits_of). Model loading is excluded. Each time is the best of --repeats runs, "
        f"taken in alternating rounds, after one {WARMUP_ROWS}-row warm-up forward per system.",
    ]
    lines += [f"{m.system}: timed = {m.details['timed']}." for m in results if "timed" in m.details]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder written by training (has arena.json)")
    parser.add_argument("--data", help="Kaggle test or train .csv/.csv.gz/.parquet; default: built-in synthetic test rows")
    parser.add_argument("--rows", type=int, help="use the first N rows (built-in default: 1000)")
    parser.add_argument("--batch-size", type=int, default=32, help="baseline rows per batch")
    parser.add_argument("--tokens-per-batch", type=int, default=8192, help="ours: padded tokens per batch")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both (and the Ray actor's CPUs)")
    parser.add_argument("--repeats", type=int, default=1, help="time each system this many times, keep the best")
    parser.add_argument("--ray", action="store_true", help="also time predict_file on a local Ray (Ray Data)")
    parser.add_argument("--json-out", help="also write the numbers and settings to this JSON file")
    args = parser.parse_args(argv)
    if args.rows is not None and args.rows < 1:
        parser.error("--rows must be at least 1")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # Ray processes inherit it; bars would clutter the table
    import torch
    import transformers

    from app.inference import Predictor
    from app.metrics import log_loss, softmax

    fast = Predictor(args.checkpoint, tokens_per_batch=args.tokens_per_batch, num_threads=args.threads)
    predictor = Predictor(args.checkpoint, tokens_per_batch=args.tokens_per_batch, num_threads=args.threads,
                          precision="fp32")
    torch.set_num_threads(args.threads)
    max_length, pad_id = predictor.config.format.max_length, predictor.pad_id
    auto_name = "fp32" if fast.amp_dtype is None else str(fast.amp_dtype).removeprefix("torch.")
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as scratch:
        frame, data_path = load_rows(args.data, args.rows, scratch)
        labels = frame["label"].to_numpy() if "label" in frame and (frame["label"] >= 0).all() else None
        texts = (list(frame["prompt"]), list(frame["response_a"]), list(frame["response_b"]))
        sequences, segments = predictor.encoder.encode_with_segments(*texts)
        lengths = [len(seq) for seq in sequences]
        real_tokens = sum(lengths)
        computed_tokens = ours_computed_tokens(lengths, args.tokens_per_batch)

        model = predictor.model.eval()
        fast.logits_of(sequences[:WARMUP_ROWS], segments[:WARMUP_ROWS])
        predictor.logits_of(sequences[:WARMUP_ROWS], segments[:WARMUP_ROWS])
        baseline_logits(model, sequences[:WARMUP_ROWS], segments[:WARMUP_ROWS], args.batch_size, max_length, pad_id)
        seconds, outputs = time_interleaved({
            "ours": lambda: fast.predict(*texts),
            "ours_model": lambda: fast.logits_of(sequences, segments),
            "ours_fp32": lambda: predictor.predict(*texts),
            "ours_fp32_model": lambda: predictor.logits_of(sequences, segments),
            "baseline": lambda: softmax(baseline_logits(model, *predictor.encoder.encode_with_segments(*texts),
                                                        args.batch_size, max_length, pad_id)),
            "baseline_model": lambda: baseline_logits(model, sequences, segments, args.batch_size, max_length, pad_id),
        }, args.repeats)
        reference = outputs["baseline"]

        def measured(system: str, key: str, computed: int) -> Measurement:
            probs = outputs[key]
            return Measurement(system, len(frame), seconds[key], seconds[f"{key}_model"], real_tokens, computed,
                               float(np.abs(probs - reference).max()),
                               None if labels is None else log_loss(probs, labels))

        results = [
            measured(f"ours: Predictor, precision=auto ({auto_name}), length-sorted token-budget batches",
                     "ours", computed_tokens),
            measured("ours: Predictor, precision=fp32, length-sorted token-budget batches", "ours_fp32",
                     computed_tokens),
            measured(f"baseline: fixed batches of {args.batch_size} in input order, padded to max_length, fp32",
                     "baseline", len(frame) * max_length),
        ]
        if args.ray:
            results.append(measure_ray(args.checkpoint, data_path, frame, args.tokens_per_batch, args.threads,
                                       reference, real_tokens, computed_tokens, labels))
    settings = {
        "checkpoint": f"{args.checkpoint} (model {predictor.config.model.name_or_path}, max_length {max_length})",
        "data": f"{args.data or 'built-in synthetic test rows'}, {len(frame)} rows, mean {statistics.mean(lengths):.0f} "
                f"/ max {max(lengths)} tokens per row",
        "ours": f"tokens_per_batch {args.tokens_per_batch}",
        "baseline": f"batch_size {args.batch_size}, padded to max_length {max_length}",
        "threads": f"torch {torch.get_num_threads()} threads for all, eval mode, no grad",
        "precision=auto here": auto_name,
        "repeats": f"{args.repeats} (best time kept)",
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python "
                   f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
    }
    print(render(results, results[2], settings), flush=True)
    if args.json_out:
        write_json(args.json_out, settings, results)


if __name__ == "__main__":
    main()

"""One GPU run of the project's own training and inference code, without Ray: full vs LoRA vs QLoRA.

    python -m bench.gpu_check --out $OUT            # on a CUDA machine: the ~1B random Llama, 8 x 1024 tokens
    python bench/gpu_check.py --tiny                # the same code on this CPU, random:llama-tiny, in seconds

For each adapter.method (full, lora, qlora; qlora only where bitsandbytes imports) on the same model
(model.kind=decoder, default `random:llama-1b` of app/tiny.py, TinyLlama's shape) and the same batch:

- the model is `app.modeling.build_model(config)` and the optimizer step is `app.engine.TorchStepper`
  (AdamW of `build_optimizer`, cosine schedule, the training autocast of `train.precision=auto`: bf16 on a
  GPU with bf16, GradScaler only for fp16, gradient clipping), driven exactly as `app.loop` drives it:
  `forward_batch` under `autocast(device, stepper.amp_dtype)`, fp32 cross-entropy, `backward`, `step`;
- a batch is --batch-size rows of random token ids, --max-length long except the first, which is half as
  long and padded (as bench/memory.py does), so attention runs with a padding mask as in real training;
- peak memory: torch.cuda.max_memory_allocated over the first 2 steps (the first creates AdamW's state),
  reset once the model is on the device, less what was allocated before the model was built (CPU:
  bench.tracking's live tensor count). Planned: `app.memory.plan_memory(config, 1)`'s training peak less
  its fixed 1 GiB CUDA-context term, which no tensor holds;
- step time: the median of --steps steps after --warmup more, each between torch.cuda.synchronize calls
  (the loop's `loss.item()` syncs every step anyway). Tokens/s counts every computed position (B x T,
  padding included). MFU (`app.tracking.mfu`, as training runs log it) = 6 x parameters x tokens/s over the chip's
  dense bf16 peak (`app.tracking.PEAK_BF16_FLOPS`; H100 / H200 SXM:
  989 TFLOP/s, NVIDIA's datasheet), attention's own FLOPs not counted; it is also given against the
  measured ceiling, an 8192^3 bf16 matrix product on random data timed here. LoRA and QLoRA compute no
  weight gradients for the frozen base, so about 4N of the 6N are real work for them;
- inference: the full model is saved with `app.modeling.save_checkpoint` and loaded by
  `app.inference.Predictor` (precision=auto: bf16), which scores --predict-rows random rows of
  --max-length tokens through `logits_of` (length-sorted token-budget batches) at two token budgets.

Ray is never imported: app/engine.py imports `ray.train.torch` at the top for `prepare_model`, so this script
puts a stub `ray.train.torch` in sys.modules whose `prepare_model` does what Ray Train's does for a single
worker (move the model to the device, no DDP) and whose every other attribute raises.
"""

from __future__ import annotations

import argparse
import gc
import importlib.machinery
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
import types
from dataclasses import dataclass, field
from typing import Any

METHODS = ("full", "lora", "qlora")
TRACKED_STEPS = 2  # the first creates AdamW's state; the second holds the steady-state peak
PREDICT_BUDGETS = (8192, 32768)  # Predictor tokens_per_batch: its default, and 4x
MATMUL_SIZE = 8192
GIB, MIB = 2**30, 2**20
RAY_STUBS = ("ray", "ray.train", "ray.train.torch")


def stub_ray(device) -> None:
    """Let app/engine.py's top-level `import ray.train.torch` succeed without Ray.

    `prepare_model` does what Ray Train's does for one worker without a process group: move the model to
    the worker's device. Any other attribute raises, so a code path that needs real Ray fails loudly.
    """
    def prepare_model(model, *args, **kwargs):
        return model.to(device)

    modules = {}
    for name in RAY_STUBS:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)

        def missing(attribute: str, name: str = name):
            raise AttributeError(f"{name}.{attribute}: bench/gpu_check.py runs without Ray ({name} is a stub)")

        module.__getattr__ = missing
        modules[name] = module
    modules["ray"].train = modules["ray.train"]
    modules["ray.train"].torch = modules["ray.train.torch"]
    modules["ray.train.torch"].prepare_model = prepare_model
    for name, module in modules.items():
        if name in sys.modules and sys.modules[name] is not module:
            raise RuntimeError(f"{name} was imported before bench/gpu_check.py could stub it")
        sys.modules[name] = module


def real_ray_modules() -> list[str]:
    """Ray modules in this process other than the stubs (should be none)."""
    return sorted(name for name in sys.modules if name.split(".")[0] == "ray" and name not in RAY_STUBS)


@dataclass
class TrainMeasurement:
    """One adapter method's training step on the device."""

    method: str
    total_params: int
    trainable_params: int
    tokens_per_step: int
    build_s: float  # build_model + move to the device + optimizer
    step_s: float  # median of the timed steps
    tokens_per_s: float
    mfu_datasheet: float | None  # 6 N tokens/s over the datasheet dense bf16 peak
    mfu_measured: float | None  # ... over the measured matrix-product ceiling
    peak_bytes: int  # max_memory_allocated over the tracked steps, less what was allocated before the build
    reserved_bytes: int  # max_memory_reserved (the caching allocator's high-water mark)
    planned_bytes: int  # plan_memory's training peak without its CUDA-context term
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PredictMeasurement:
    """Predictor.logits_of throughput on a saved full checkpoint."""

    tokens_per_batch: int
    rows: int
    seconds: float
    rows_per_s: float
    tokens_per_s: float
    mfu_datasheet: float | None  # 2 N tokens/s (forward only) over the datasheet peak
    peak_bytes: int


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_rows(rows: int, length: int, vocab: int, seed: int, pad_first: bool) -> list[list[int]]:
    """Token ids above the special tokens; with `pad_first` the first row is half as long (a padded batch)."""
    import numpy as np

    generator = np.random.default_rng(seed)
    return [generator.integers(5, vocab, length // 2 if pad_first and row == 0 else length).tolist()
            for row in range(rows)]


def method_overrides(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """One method's config: the shared settings, the command line's overrides, then the method."""
    from app.config import parse_override

    return {
        "model.kind": "decoder",
        "model.name_or_path": args.model,
        "train.batch_size": args.batch_size,
        "format.max_length": args.max_length,
        "scaling.num_workers": 1,
        "scaling.use_gpu": args.device == "cuda",  # the planner plans for the device measured
        **dict(parse_override(text) for text in args.overrides),
        "adapter.method": method,
    }


def chip_peak(device) -> tuple[str, float | None]:
    """The device's name and its datasheet dense bf16 rate (None where not listed: CPU, other GPUs)."""
    import torch

    from app.tracking import device_peak_flops

    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    return torch.cuda.get_device_name(device), device_peak_flops(device)


def measure_matmul(device, repeats: int = 10) -> float | None:
    """bf16 TFLOP/s of an 8192^3 matrix product on random data (3 warm-ups, mean of `repeats`), or None on CPU."""
    import torch

    if device.type != "cuda":
        return None
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=torch.bfloat16)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del a, b
    torch.cuda.empty_cache()
    return 2 * MATMUL_SIZE**3 / seconds


def free_device_memory(device) -> int:
    """Collect garbage, return cached blocks, and say how many bytes tensors still hold."""
    import torch

    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device)


def measure_method(args: argparse.Namespace, method: str, device, peak_rate: float | None,
                   matmul_rate: float | None, checkpoint_dir: str | None) -> TrainMeasurement:
    """Build `method`'s model, take TRACKED_STEPS + warm-up + timed optimizer steps, measure them.

    With `checkpoint_dir`, the trained model is saved there (for the Predictor) before it is freed.
    """
    import torch

    from app.config import load_config
    from app.engine import TorchStepper
    from app.memory import plan_memory
    from app.tracking import mfu
    from app.modeling import autocast, build_model, build_tokenizer, forward_batch, save_checkpoint
    from bench.tracking import measure_training_peak

    config = load_config(None, method_overrides(args, method))
    plan = plan_memory(config, 1)
    tokenizer = build_tokenizer(config)
    rows = random_rows(config.train.batch_size, config.format.max_length, len(tokenizer), args.seed, pad_first=True)
    segments = [[0] * len(row) for row in rows]  # read only by models with token type embeddings
    labels = torch.randint(0, 3, (len(rows),), generator=torch.Generator().manual_seed(args.seed)).to(device)
    tokens_per_step = len(rows) * max(len(row) for row in rows)  # computed positions, padding included
    total_steps = TRACKED_STEPS + args.warmup + args.steps

    before = free_device_memory(device)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    stepper = TorchStepper(build_model(config).train(), config, total_steps, device)
    synchronize(device)
    build_s = time.perf_counter() - started
    trainable = sum(param.numel() for param in stepper.model.parameters() if param.requires_grad)
    losses: list[float] = []

    def optimizer_step() -> None:  # what app.loop.run_epochs does per micro-batch, at a boundary
        with stepper.accumulate(True):
            with autocast(device, stepper.amp_dtype):
                logits, _ = forward_batch(stepper.model, rows, segments, tokenizer.pad_token_id, device)  # (B, 3)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
            stepper.backward(loss, True)
        stepper.step()
        losses.append(loss.item())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(TRACKED_STEPS):
            optimizer_step()
        peak = torch.cuda.max_memory_allocated(device) - before
        reserved = torch.cuda.max_memory_reserved(device)
    else:
        peak = measure_training_peak(stepper.model, optimizer_step, TRACKED_STEPS, inputs=(labels,))
        reserved = 0
    for _ in range(args.warmup):
        optimizer_step()
    times = []
    for _ in range(args.steps):
        synchronize(device)
        step_started = time.perf_counter()
        optimizer_step()
        synchronize(device)
        times.append(time.perf_counter() - step_started)
    step_s = statistics.median(times)
    tokens_per_s = tokens_per_step / step_s
    if any(math.isnan(loss) for loss in losses):
        raise RuntimeError(f"{method}: a training loss is NaN: {losses}")
    if checkpoint_dir is not None:
        save_checkpoint(checkpoint_dir, stepper.model, tokenizer, config, metrics={}, epoch=0)
    measurement = TrainMeasurement(
        method=method,
        total_params=plan.total_params,
        trainable_params=trainable,
        tokens_per_step=tokens_per_step,
        build_s=build_s,
        step_s=step_s,
        tokens_per_s=tokens_per_s,
        mfu_datasheet=mfu(plan.total_params, tokens_per_s, peak_flops_per_device=peak_rate) if peak_rate else None,
        mfu_measured=mfu(plan.total_params, tokens_per_s, peak_flops_per_device=matmul_rate) if matmul_rate else None,
        peak_bytes=peak,
        reserved_bytes=reserved,
        planned_bytes=plan.training_peak_bytes - plan.components["overhead"],
        details={"vocab": len(tokenizer), "step_times_s": times, "losses": losses, "allocated_before_bytes": before,
                 "amp_dtype": str(stepper.amp_dtype), "planned_components_bytes": plan.components,
                 "planned_notes": list(plan.notes), "plan": plan.render()},
    )
    del stepper
    free_device_memory(device)
    return measurement


def measure_predictor(args: argparse.Namespace, checkpoint_dir: str, device, peak_rate: float | None,
                      total_params: int, vocab: int) -> list[PredictMeasurement]:
    """Predictor (precision=auto) on the saved full checkpoint: logits_of over random full-length rows."""
    import torch

    from app.inference import Predictor

    results = []
    for budget in PREDICT_BUDGETS:
        free_device_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        predictor = Predictor(checkpoint_dir, tokens_per_batch=budget, device=str(device))
        rows = random_rows(args.predict_rows, args.max_length, vocab, args.seed + 1, pad_first=False)
        segments = [[0] * len(row) for row in rows]
        warmup = max(1, budget // args.max_length)  # one full batch
        predictor.logits_of(rows[:warmup], segments[:warmup])
        synchronize(device)
        started = time.perf_counter()
        logits = predictor.logits_of(rows, segments)  # copies each batch's logits to the host: synchronous
        seconds = time.perf_counter() - started
        if not (logits == logits).all():
            raise RuntimeError(f"Predictor at tokens_per_batch {budget}: NaN logits")
        tokens = sum(len(row) for row in rows)
        results.append(PredictMeasurement(
            tokens_per_batch=budget, rows=len(rows), seconds=seconds, rows_per_s=len(rows) / seconds,
            tokens_per_s=tokens / seconds,
            mfu_datasheet=2 * total_params * tokens / seconds / peak_rate if peak_rate else None,
            peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0))
        del predictor
    free_device_memory(device)
    return results


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def gib(value: int) -> str:
    return f"{value / GIB:.2f}" if value >= 64 * MIB else f"{value / MIB:.1f} MiB"


def render(training: list[TrainMeasurement], predicting: list[PredictMeasurement], settings: dict[str, Any]) -> str:
    """Markdown: settings, the training table, the inference table."""
    lines = [f"- {key}: {value}" for key, value in settings.items()]
    lines += ["", "| method | trainable params | s / step (median) | tokens/s | MFU (6N) vs datasheet "
              "| MFU (6N) vs measured matmul | peak allocated GiB | planned GiB | planned / measured "
              "| peak reserved GiB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in training:
        lines.append(
            f"| {m.method} | {m.trainable_params / 1e6:.2f}M of {m.total_params / 1e6:.1f}M | {m.step_s:.4f} "
            f"| {m.tokens_per_s:,.0f} | {percent(m.mfu_datasheet)} | {percent(m.mfu_measured)} "
            f"| {gib(m.peak_bytes)} | {gib(m.planned_bytes)} | {m.planned_bytes / max(m.peak_bytes, 1):.2f} "
            f"| {gib(m.reserved_bytes) if m.reserved_bytes else 'n/a'} |")
    if predicting:
        lines += ["", "| inference (Predictor.logits_of, full checkpoint, precision=auto) | rows | s | rows/s "
                  "| tokens/s | MFU (2N) vs datasheet | peak allocated GiB |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for p in predicting:
            lines.append(f"| tokens_per_batch {p.tokens_per_batch} | {p.rows} | {p.seconds:.3f} | {p.rows_per_s:.1f} "
                         f"| {p.tokens_per_s:,.0f} | {percent(p.mfu_datasheet)} "
                         f"| {gib(p.peak_bytes) if p.peak_bytes else 'n/a'} |")
    return "\n".join(lines)


def describe_settings(args: argparse.Namespace, device, chip: str, peak_rate: float | None,
                      matmul_rate: float | None, methods: list[str], skipped: dict[str, str]) -> dict[str, Any]:
    import torch

    from app.modeling import library_versions

    versions = library_versions()
    cuda = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        cuda = f", CUDA {torch.version.cuda}, {total / GIB:.0f} GiB"
    return {
        "device": f"{chip}{cuda}; host {os.cpu_count()} cores, Python {platform.python_version()}",
        "versions": ", ".join(f"{name} {versions[name]}" for name in ("torch", "transformers", "peft", "bitsandbytes"))
                    + f"; ray: {'not imported' if not real_ray_modules() else real_ray_modules()}",
        "model": f"{args.model} (model.kind={method_overrides(args, methods[0])['model.kind'] if methods else '?'}), "
                 "model.dtype=auto, train.precision=auto",
        "batch": f"{args.batch_size} rows x {args.max_length} tokens (the first row {args.max_length // 2} + padding)",
        "steps": f"{TRACKED_STEPS} for the memory peak, {args.warmup} warm-up, {args.steps} timed (median)",
        "methods": ", ".join(methods) + "".join(f"; {name} skipped: {why}" for name, why in skipped.items()),
        "peak used for MFU": (f"{peak_rate / 1e12:.1f} TFLOP/s dense bf16 (datasheet)" if peak_rate else "n/a")
                             + (f"; measured {MATMUL_SIZE}^3 bf16 matmul {matmul_rate / 1e12:.0f} TFLOP/s"
                                if matmul_rate else ""),
        "overrides": " ".join(args.overrides) or "none",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="random:llama-tiny (hidden 64, 2 layers), 2 x 64 tokens, on the CPU: checks the script")
    parser.add_argument("--model", help="a decoder: random:<spec>, folder or hub id (default random:llama-1b)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--steps", type=int, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, help="untimed steps after the memory-tracked ones")
    parser.add_argument("--predict-rows", type=int, help="rows for the Predictor timing; 0 skips it")
    parser.add_argument("--device", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.environ.get("OUT"), help="write gpu_check.txt / .json here (default $OUT)")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every method, e.g. adapter.r=8")
    args = parser.parse_args(argv)
    defaults = dict(model="random:llama-tiny", batch_size=2, max_length=64, steps=2, warmup=1, predict_rows=8,
                    device="cpu") if args.tiny else \
        dict(model="random:llama-1b", batch_size=8, max_length=1024, steps=10, warmup=3, predict_rows=256,
             device="cuda")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # run as a file (`python bench/gpu_check.py`) from a checkout that is not installed
        sys.path.insert(0, root)
    import importlib.util

    import torch

    from bench.reporting import write_json

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here; use --tiny (CPU) or run on a GPU machine")
    stub_ray(device)
    from app.modeling import resolve_model_path

    methods, skipped = list(args.methods), {}
    if "qlora" in methods and importlib.util.find_spec("bitsandbytes") is None:
        methods.remove("qlora")
        skipped["qlora"] = "bitsandbytes is not installed"
    chip, peak_rate = chip_peak(device)
    matmul_rate = measure_matmul(device)
    started = time.perf_counter()
    print(f"model folder {resolve_model_path(args.model)} ({time.perf_counter() - started:.1f} s)", flush=True)

    # One failing part (a method, the Predictor) is reported and the others still run: device time is scarce.
    training, predicting, failures = [], [], {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        checkpoint = os.path.join(scratch, "full") if args.predict_rows and "full" in methods else None
        for method in methods:
            try:
                m = measure_method(args, method, device, peak_rate, matmul_rate,
                                   checkpoint if method == "full" else None)
            except Exception:  # noqa: BLE001  reported below, and the exit status says it failed
                failures[method] = traceback.format_exc()
                print(f"{method} FAILED:\n{failures[method]}", flush=True)
                free_device_memory(device)
                continue
            training.append(m)
            print(f"{method}: {m.step_s:.4f} s/step, {m.tokens_per_s:,.0f} tokens/s, peak {gib(m.peak_bytes)}, "
                  f"planned {gib(m.planned_bytes)}, build {m.build_s:.1f} s, losses "
                  f"{[round(loss, 3) for loss in m.details['losses']]}", flush=True)
        full = next((m for m in training if m.method == "full"), None)
        if checkpoint is not None and full is not None:
            try:
                predicting = measure_predictor(args, checkpoint, device, peak_rate, full.total_params,
                                               full.details["vocab"])
            except Exception:  # noqa: BLE001
                failures["predictor"] = traceback.format_exc()
                print(f"predictor FAILED:\n{failures['predictor']}", flush=True)
    if real_ray_modules():
        failures["ray"] = f"real Ray modules were imported: {real_ray_modules()}"
    settings = describe_settings(args, device, chip, peak_rate, matmul_rate, methods, skipped)
    table = render(training, predicting, settings)
    if failures:
        table += "\n\nFAILED: " + "; ".join(f"{name}: {text.strip().splitlines()[-1]}"
                                          for name, text in failures.items())
    print(table, flush=True)
    for m in training:
        print(f"\n{m.method} plan:\n{m.details['plan']}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.txt"), "w", encoding="utf-8") as handle:
            handle.write(table + "\n")
        write_json(os.path.join(args.out, "gpu_check.json"), settings, [*training, *predicting])
    if failures:
        raise SystemExit(f"failed: {', '.join(failures)}")


if __name__ == "__main__":
    main()

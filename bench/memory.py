"""Peak memory and step time of full finetuning, LoRA and QLoRA on the same decoder, with the planner's estimate.

    HF_HUB_OFFLINE=1 python -m bench.memory --threads 2 --json-out memory.json
    HF_HUB_OFFLINE=1 python -m bench.memory --threads 2 --gradient-checkpointing
    python -m bench.memory --device cuda     # on a GPU; peaks from torch.cuda.max_memory_allocated

Every method (adapter.method = full, lora, qlora) gets the same model (`--model`, model.kind=decoder; default
the ~102M-parameter random-weight Llama of app/tiny.py), batch, max_length and steps, and runs in its own
fresh process, one after the other, so that neither process memory nor the allocator carries over from one
method to the next. In that process:

- the model comes from `app.modeling.build_model(config)`, AdamW from `app.engine.build_optimizer`;
- a batch is --batch-size rows of random token ids, all --max-length tokens long except the first, which is
  half as long and padded (as in the planner's measured tests). Memory depends on the shapes only;
- one optimizer step is what `app.engine.TorchStepper` does on one worker without DDP: `forward_batch` under
  the training autocast, cross-entropy, backward, gradient clipping, AdamW, `zero_grad(set_to_none=True)`
  (no learning-rate schedule);
- tensor peak: over the first 2 steps (the first creates AdamW's state, the second is the steady peak every
  later step repeats). CPU: `bench.tracking.LiveTensorMemory`, counting weights, buffers and 4-bit
  constants, activations, gradients, optimizer state and temporaries. CUDA: torch.cuda.max_memory_allocated,
  reset once the model is on the GPU. Planned: `app.memory.plan_memory(config, 1)`'s training peak, less its
  fixed CUDA-context term, which no tensor counts (0 on the CPU);
- RSS peak increase: the process's peak resident set (getrusage ru_maxrss) less its RSS once the libraries
  are imported, separately while the model is built and during the steps (the high-water mark is reset in
  between through /proc/self/clear_refs; where that fails, as off Linux, the steps' peak includes the
  build's). It also holds what tensors do not show: the loader's copies and mapped files, freed memory
  the C allocator keeps, library buffers. On a GPU it is host memory only;
- step time: the mean of --steps further steps, timed outside the tracker (its Python hook runs on every op);
  thread use (CPU) = the process's CPU time over torch threads x wall time: well below 1, other work
  shared the cores and the times are inflated. On a GPU it only says how busy the host was.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from bench.reporting import write_json

# torch, transformers, peft and bitsandbytes are imported inside functions: huggingface_hub reads
# HF_HUB_OFFLINE when it is imported (main() sets it first), and each method's process imports them itself.

METHODS = ("full", "lora", "qlora")
TRACKED_STEPS = 2  # the first creates AdamW's state; the second holds the steady-state peak
TARGET_QLORA_SHARE = 0.4  # the target: QLoRA's peak <= 0.4 x full finetuning's
MIB = 2**20
Device = Literal["cpu", "cuda"]


@dataclass
class Measurement:
    """One adapter method's memory and speed over the same training steps."""

    method: str
    total_params: int
    trainable_params: int
    planned_peak_bytes: int  # the planner's training peak, without its fixed CUDA-context term
    tensor_peak_bytes: int  # CPU: live tensor storages; CUDA: torch.cuda.max_memory_allocated
    build_rss_increase_bytes: int  # peak process RSS while the model is built, less RSS after imports
    rss_increase_bytes: int  # peak process RSS during the training steps, less RSS after imports
    step_s: float  # mean over the timed steps
    thread_use: float  # process CPU time / (torch threads x wall time) over those steps; < ~0.9: cores were shared
    details: dict[str, Any] = field(default_factory=dict)


def method_overrides(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The config of one method: the shared settings, the command line's overrides, then the method."""
    from app.config import parse_override

    return {
        "model.kind": "decoder",
        "model.name_or_path": args.model,
        "model.gradient_checkpointing": args.gradient_checkpointing,
        "train.batch_size": args.batch_size,
        "format.max_length": args.max_length,
        "scaling.num_workers": 1,
        "scaling.use_gpu": args.device == "cuda",  # the planner plans for the device measured
        **dict(parse_override(text) for text in args.overrides),
        "adapter.method": method,
    }


def random_rows(rows: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Token ids above the special tokens; the first row half as long, so the batch carries padding."""
    import numpy as np

    generator = np.random.default_rng(seed)
    return [generator.integers(5, vocab, length // 2 if row == 0 else length).tolist() for row in range(rows)]


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux: write 5 to /proc/self/clear_refs); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def synchronize(device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_method(overrides: dict[str, Any], device_name: Device, threads: int | None, steps: int,
                   seed: int) -> Measurement:
    """Build, train and measure one method; runs in a fresh process (see the module docstring)."""
    import bitsandbytes  # noqa: F401  imported before the RSS baseline by every method alike
    import peft  # noqa: F401
    import psutil
    import torch

    from app.config import load_config
    from app.engine import build_optimizer, training_autocast_dtype
    from app.memory import plan_memory
    from app.modeling import autocast, build_model, build_tokenizer, forward_batch
    from bench.tracking import measure_training_peak

    if threads:
        torch.set_num_threads(threads)
    config = load_config(None, overrides)
    device = torch.device(device_name)
    plan = plan_memory(config, 1)
    tokenizer = build_tokenizer(config)
    rows = random_rows(config.train.batch_size, config.format.max_length, len(tokenizer), seed)
    segments = [[0] * len(row) for row in rows]  # read only by models with token type embeddings
    labels = torch.randint(0, 3, (len(rows),), generator=torch.Generator().manual_seed(seed)).to(device)
    amp_dtype = training_autocast_dtype(config, device)

    baseline_rss = psutil.Process().memory_info().rss
    peak_was_reset = reset_peak_rss()
    torch.manual_seed(seed)
    model = build_model(config).to(device).train()  # a 4-bit model is already on the GPU its loader chose
    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    trainable = [param for param in model.parameters() if param.requires_grad]
    build_rss = peak_rss_bytes() - baseline_rss
    peak_was_reset = reset_peak_rss() and peak_was_reset  # the steps' own peak from here on
    losses: list[float] = []

    def optimizer_step() -> None:
        with autocast(device, amp_dtype):
            logits, _ = forward_batch(model, rows, segments, tokenizer.pad_token_id, device)  # (B, 3)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, config.train.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(TRACKED_STEPS):
            optimizer_step()
        tensor_peak = torch.cuda.max_memory_allocated(device)
    else:
        tensor_peak = measure_training_peak(model, optimizer_step, TRACKED_STEPS, inputs=(labels,))
    times, cpu_times = [], []
    for _ in range(steps):
        synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        optimizer_step()
        synchronize(device)
        times.append(time.perf_counter() - started)
        cpu_times.append(time.process_time() - cpu_started)  # all threads: well below threads x wall = contended
    return Measurement(
        method=config.adapter.method,
        total_params=plan.total_params,
        trainable_params=sum(param.numel() for param in trainable),
        planned_peak_bytes=plan.training_peak_bytes - plan.components["overhead"],
        tensor_peak_bytes=tensor_peak,
        build_rss_increase_bytes=build_rss,
        rss_increase_bytes=peak_rss_bytes() - baseline_rss,
        step_s=sum(times) / len(times),
        thread_use=sum(cpu_times) / (torch.get_num_threads() * sum(times)),
        details={"step_times_s": times, "step_cpu_times_s": cpu_times, "losses": losses,
                 "planned_components_bytes": plan.components, "planned_notes": list(plan.notes),
                 "rss_after_imports_bytes": baseline_rss,
                 "rss_peak_reset": peak_was_reset, "torch_threads": torch.get_num_threads()},
    )


def share(value: float, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if reference else "n/a"


def render(results: list[Measurement], settings: dict[str, Any]) -> str:
    """Markdown: settings, the table, and the target check."""
    full = next((m for m in results if m.method == "full"), None)
    lines = ["## Memory: full vs LoRA vs QLoRA", ""]
    lines += [f"- {key}: {value}" for key, value in settings.items()]
    lines += ["", "| method | trainable params | planned peak MiB | tensor peak MiB | planned / measured "
              "| tensor peak vs full | RSS peak increase MiB, model build | RSS peak increase MiB, steps "
              "| steps' RSS vs full | s / step | thread use |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in results:
        lines.append(
            f"| {m.method} | {m.trainable_params / 1e6:.2f}M of {m.total_params / 1e6:.1f}M "
            f"| {m.planned_peak_bytes / MIB:.0f} | {m.tensor_peak_bytes / MIB:.0f} "
            f"| {m.planned_peak_bytes / m.tensor_peak_bytes:.2f} "
            f"| {share(m.tensor_peak_bytes, full and full.tensor_peak_bytes)} | {m.build_rss_increase_bytes / MIB:.0f} "
            f"| {m.rss_increase_bytes / MIB:.0f} "
            f"| {share(m.rss_increase_bytes, full and full.rss_increase_bytes)} | {m.step_s:.2f} | {m.thread_use:.2f} |")
    qlora = next((m for m in results if m.method == "qlora"), None)
    if full and qlora:
        ratio = qlora.tensor_peak_bytes / full.tensor_peak_bytes
        verdict = "met" if ratio <= TARGET_QLORA_SHARE else "missed"
        lines += ["", f"QLoRA's tensor peak is {ratio:.2f}x full finetuning's: target <= {TARGET_QLORA_SHARE}x "
                      f"{verdict}."]
    return "\n".join(lines)


def processor_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_settings(args: argparse.Namespace, config, threads: int) -> dict[str, Any]:
    """What was run, on what, with which libraries."""
    import torch

    from app.engine import training_autocast_dtype
    from app.families import model_dtype
    from app.modeling import library_versions

    device = torch.device(args.device)
    adapter = config.adapter
    amp = training_autocast_dtype(config, device)
    machine = f"{os.cpu_count()} cores, {processor_name()}"
    if args.device == "cuda":
        machine += f", {torch.cuda.get_device_name(device)}"
    versions = library_versions()
    return {
        "model": f"{config.model.name_or_path} (model.kind=decoder)",
        "batch": f"{args.batch_size} rows x {args.max_length} tokens (the first row {args.max_length // 2} + padding)",
        "steps": f"{TRACKED_STEPS} measured for the tensor peak (the first is the warm-up), then {args.steps} timed",
        "optimizer": f"torch AdamW (app.engine.build_optimizer), clip {config.train.max_grad_norm}",
        "precision": f"weights {str(model_dtype(config.model.dtype)).removeprefix('torch.')}, autocast "
                     f"{str(amp).removeprefix('torch.') if amp else 'none'}",
        "LoRA / QLoRA": f"r {adapter.r}, alpha {adapter.alpha:g}, dropout {adapter.dropout}, target_modules "
                        f"{adapter.target_modules}, head trained; QLoRA {adapter.quant_type}, double quant "
                        f"{adapter.double_quant}",
        "gradient checkpointing": config.model.gradient_checkpointing,
        "overrides": " ".join(args.overrides) or "none",
        "device": args.device,
        "torch threads": threads,
        "machine": f"{machine}, Python {platform.python_version()}",
        "versions": ", ".join(f"{name} {versions[name]}" for name in ("torch", "transformers", "peft", "bitsandbytes")),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:llama-100m", help="a decoder: random:<spec>, folder or hub id")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps, after the measured ones")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, help="torch threads of each method's process; default torch's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", help="also write the numbers and settings to this JSON file")
    parser.add_argument("overrides", nargs="*", help="section.key=value for every method, e.g. adapter.dropout=0")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the methods' processes inherit it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from app.config import load_config
    from app.modeling import resolve_model_path

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here; run on a GPU machine or use --device cpu")
    configs = {method: load_config(None, method_overrides(args, method)) for method in args.methods}
    resolve_model_path(args.model)  # build a random:<spec> model once, here, not inside a measured process
    spawn = multiprocessing.get_context("spawn")
    results = []
    for method in args.methods:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            results.append(pool.submit(measure_method, method_overrides(args, method), args.device, args.threads,
                                       args.steps, args.seed).result())
        print(f"{method}: tensor peak {results[-1].tensor_peak_bytes / MIB:.0f} MiB, "
              f"{results[-1].step_s:.2f} s/step", flush=True)
    settings = describe_settings(args, configs[args.methods[0]], results[0].details["torch_threads"])
    print(render(results, settings), flush=True)
    if args.json_out:
        write_json(args.json_out, settings, results)


if __name__ == "__main__":
    main()

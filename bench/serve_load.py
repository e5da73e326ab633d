"""Online latency and throughput of the Serve app under concurrent clients, batching on vs off.

    HF_HUB_OFFLINE=1 python -m bench.serve_load --checkpoint runs/demo/epoch_001 --clients 32 --seconds 10

Everything runs on this machine: a local Ray, the Serve app (`serve.app.build_app`, one member for the
checkpoint) on 127.0.0.1, and the clients, closed-loop aiohttp tasks in this process (each sends its next
request when the previous one is answered), one pair per request, cycling over built-in synthetic test rows.

Scenarios (three Serve apps, batching on / off / on with small queues, run side by side; the in-process,
on and off scenarios are measured in --repeats alternating rounds, so that drifting machine load hits
them alike, and each is reported over all its rounds):
- in-process: `Predictor.predict_logits` on the first --in-process-rows of the same rows, one row per call
  and all of them in one call (token-budget batches), no HTTP, no Ray: what the app adds to the model;
- serve, 1 client (batching on): the latency floor of one request through proxy, ingress and member;
- serve, --clients clients, batching on (serving.max_batch_requests=--max-batch) and off (=1);
- overload: --overload-clients clients against an app whose queues are sized for --clients (member and
  ingress max_queued_requests = --clients): the excess must get 503s at once and the app must keep
  answering (checked with /readyz and one request after the run). A client that gets a 503 waits
  --backoff-ms before its next request, as a polite client would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.reporting import write_json

# torch, transformers and ray are imported inside functions: huggingface_hub reads HF_HUB_OFFLINE when it is
# imported, and main() sets it first.

TARGET_BATCHING_SPEEDUP = 3.0


@dataclass
class Measurement:
    """One scenario: completed requests, their latencies, and the errors by HTTP status."""

    scenario: str
    clients: int
    seconds: float
    ok: int
    latencies_ms: list[float] = field(repr=False)
    errors: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def drive(url: str, payloads: list[dict], clients: int, seconds: float, backoff_s: float) -> Measurement:
    """`clients` closed-loop clients for `seconds`; latencies of the 200s, counts of everything else."""
    import aiohttp

    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def client(index: int) -> None:
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    async with session.post(url, json=payloads[index % len(payloads)]) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # counted, not fatal
                    status = type(exc).__name__
                index += clients
                if status == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    errors[str(status)] += 1
                    await asyncio.sleep(backoff_s)

        started = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(clients)))
        elapsed = time.perf_counter() - started
    return Measurement("", clients, elapsed, len(latencies), latencies, dict(errors))


def measure_in_process(predictor: Any, texts: tuple[list, list, list]) -> list[Measurement]:
    """The Predictor on the same rows in this process: one row per call, then all rows in one call
    (token-budget batches)."""
    latencies = []
    for row in range(len(texts[0])):
        started = time.perf_counter()
        predictor.predict_logits(*([column[row]] for column in texts))
        latencies.append((time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    predictor.predict_logits(*texts)
    batched = time.perf_counter() - started
    return [Measurement("in-process Predictor, 1 row per call", 1, sum(latencies) / 1000, len(latencies), latencies),
            Measurement("in-process Predictor, all rows in one call (token-budget batches)", 1, batched,
                        len(latencies), [])]


def serve_settings(args: argparse.Namespace, max_batch: int, queue: int) -> dict[str, Any]:
    return {
        "max_batch_requests": max_batch, "batch_wait_timeout_s": args.batch_wait_ms / 1000,
        "max_batch_wait_s": args.max_batch_wait_ms / 1000,
        "torch_threads": args.threads,
        "member": {"num_replicas": 1, "max_ongoing_requests": max(max_batch, args.clients),
                   "max_queued_requests": queue, "ray_actor_options": {"num_cpus": 0.5}},
        "ingress": {"num_replicas": 1, "max_ongoing_requests": args.clients,
                    "max_queued_requests": queue, "ray_actor_options": {"num_cpus": 0.1}},
    }


def merge(parts: list[Measurement]) -> Measurement:
    """One scenario's rounds as one measurement."""
    errors: Counter[str] = Counter()
    for part in parts:
        errors.update(part.errors)
    return Measurement(parts[0].scenario, parts[0].clients, sum(p.seconds for p in parts), sum(p.ok for p in parts),
                       [x for p in parts for x in p.latencies_ms], dict(errors), parts[0].details)


def run_all(args: argparse.Namespace, payloads: list[dict],
            texts: tuple[list, list, list]) -> tuple[list[Measurement], dict[str, Any]]:
    """Three apps side by side (batching on, off, and on with queues sized for --clients); the in-process
    and on/off scenarios run in alternating rounds so that drifting machine load hits them alike; the
    overload run last."""
    import ray
    import requests
    from ray import serve

    from app.inference import Predictor
    from serve.app import build_app

    predictor = Predictor(args.checkpoint, args.tokens_per_batch, num_threads=args.threads)
    in_process_texts = tuple(column[: args.in_process_rows] for column in texts)
    predictor.predict_logits(*(column[:4] for column in texts))  # warm-up
    lengths = [len(sequence) for sequence in predictor.encoder.encode(*texts)]
    checks: dict[str, Any] = {"tokens per row": f"mean {statistics.mean(lengths):.0f}, max {max(lengths)}"}

    # A local Ray as app.cluster.connect starts it, but with the replicas' logs kept out of this process: it
    # also runs the clients, and printing every replica's request log would slow them down.
    ray.init(address="local", num_cpus=4, log_to_driver=False, runtime_env={"env_vars": {
        "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1"}})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    roomy = 4 * args.overload_clients  # queues that never fill: latency, not refusals, absorbs the load
    apps = {"on": serve_settings(args, args.max_batch, roomy), "off": serve_settings(args, 1, roomy),
            "sized": serve_settings(args, args.max_batch, args.clients)}
    overrides = [f"predict.tokens_per_batch={args.tokens_per_batch}"]
    try:
        serve.run_many([serve.RunTarget(target=build_app({"model": args.checkpoint, "overrides": overrides,
                                                          "serving": settings}), name=name, route_prefix=f"/{name}")
                        for name, settings in apps.items()])
        for name in apps:  # warm-up: first forward passes, connection set-up
            for payload in payloads[:8]:
                requests.post(f"{base}/{name}/v1/predict", json=payload, timeout=120).raise_for_status()

        def load(scenario: str, app: str, clients: int) -> Measurement:
            measured = asyncio.run(drive(f"{base}/{app}/v1/predict", payloads, clients, args.seconds,
                                         args.backoff_ms / 1000))
            measured.scenario = scenario
            measured.details = {"max_batch_requests": apps[app]["max_batch_requests"],
                                "max_queued_requests": apps[app]["member"]["max_queued_requests"]}
            print(f"{scenario}, {clients} clients: {measured.ok} ok in {measured.seconds:.1f} s, errors "
                  f"{measured.errors}", flush=True)
            return measured

        def batch_sizes() -> Counter[int]:
            stats = requests.get(f"{base}/on/v1/models", timeout=30).json()["members"][0]["stats"]
            return Counter({int(size): count for size, count in stats["calls_per_batch"].items()})

        rounds: dict[tuple[str, int], list[Measurement]] = {}
        sizes: Counter[int] = Counter()  # calls per batch of the batching-on app under --clients clients
        for _ in range(args.repeats):
            for measured in measure_in_process(predictor, in_process_texts):
                rounds.setdefault((measured.scenario, 1), []).append(measured)
            for scenario, app, clients in (("serve, batching on", "on", 1), ("serve, batching on", "on", args.clients),
                                           ("serve, batching off", "off", args.clients)):
                before = batch_sizes() if clients > 1 and app == "on" else None
                rounds.setdefault((scenario, clients), []).append(load(scenario, app, clients))
                if before is not None:
                    sizes.update(batch_sizes() - before)
        results = [merge(parts) for parts in rounds.values()]
        total = sum(size * count for size, count in sizes.items())
        checks[f"batching on, {args.clients} clients: calls per batch"] = (
            f"mean {total / max(sum(sizes.values()), 1):.1f}, by size {dict(sorted(sizes.items()))}")
        results.append(load("serve, overload (queues sized for --clients)", "sized", args.overload_clients))
        checks["after overload: /readyz"] = requests.get(f"{base}/sized/readyz", timeout=30).status_code
        checks["after overload: one request"] = requests.post(f"{base}/sized/v1/predict", json=payloads[0],
                                                              timeout=60).status_code
    finally:
        serve.shutdown()
    return results, checks


def load_payloads(data: str | None, rows: int, scratch: str) -> tuple[list[dict], tuple[list, list, list]]:
    """The first `rows` rows of `data` (default: built-in synthetic test rows) as /v1/predict bodies and texts."""
    from app.data import load_pairs
    from app.synthetic import write_builtin_dataset

    path = data or write_builtin_dataset(os.path.join(scratch, "data"), n_train=50, n_test=rows)["test"]
    frame = load_pairs(path, require_labels=False).frame.iloc[:rows]
    texts = (list(frame["prompt"]), list(frame["response_a"]), list(frame["response_b"]))
    payloads = [{"id": row_id, "prompt": p, "response_a": a, "response_b": b}
                for row_id, p, a, b in zip(frame["id"], *texts)]
    return payloads, texts


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def render(results: list[Measurement], checks: dict[str, Any], settings: dict[str, Any], args) -> str:
    lines = ["| scenario | clients | requests ok | requests/s (rows/s) | p50 ms | p95 ms | p99 ms | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for m in results:
        errors = ", ".join(f"{count} x {code}" for code, count in sorted(m.errors.items())) or "0"
        lines.append(f"| {m.scenario} | {m.clients} | {m.ok} | {m.rate:.1f} | {fmt(m.percentile(50))} "
                     f"| {fmt(m.percentile(95))} | {fmt(m.percentile(99))} | {errors} |")
    by_name = {(m.scenario, m.clients): m for m in results}
    on = by_name[("serve, batching on", args.clients)]
    off = by_name[("serve, batching off", args.clients)]
    single = by_name[("in-process Predictor, 1 row per call", 1)]
    batched = by_name[("in-process Predictor, all rows in one call (token-budget batches)", 1)]
    floor = by_name[("serve, batching on", 1)]
    overload = next(m for m in results if m.scenario.startswith("serve, overload"))
    speedup = on.rate / off.rate
    lines += [
        "",
        *(f"- {key}: {value}" for key, value in settings.items()),
        *(f"- {key}: {value}" for key, value in checks.items()),
        "",
        f"Batching at {args.clients} clients: {speedup:.2f}x the unbatched throughput (target >= "
        f"{TARGET_BATCHING_SPEEDUP:.0f}x: {'met' if speedup >= TARGET_BATCHING_SPEEDUP else 'missed'}).",
        f"Errors at the load the app is sized for ({args.clients} clients): batching on "
        f"{sum(on.errors.values())}, off {sum(off.errors.values())} "
        f"({'met' if not on.errors and not off.errors else 'missed'}).",
        f"Overload ({args.overload_clients} clients): {overload.errors.get('503', 0)} x 503, other errors "
        f"{sum(v for k, v in overload.errors.items() if k != '503')}, app still ready afterwards: "
        f"{checks.get('after overload: /readyz') == 200 and checks.get('after overload: one request') == 200}.",
        f"Overhead vs in-process: 1 client p50 {fmt(floor.percentile(50))} ms vs "
        f"{statistics.median(single.latencies_ms):.0f} ms for one Predictor call; batched serve "
        f"{on.rate:.1f} rows/s vs {batched.rate:.1f} rows/s for Predictor on all rows in one call "
        f"({on.rate / batched.rate:.2f}x).",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder written by training (has arena.json)")
    parser.add_argument("--data", help="Kaggle test or train .csv/.csv.gz/.parquet; default: built-in synthetic rows")
    parser.add_argument("--rows", type=int, default=256, help="rows (the first N of --data) the clients cycle over")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--overload-clients", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0, help="load time per scenario and round")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of the scenarios")
    parser.add_argument("--max-batch", type=int, default=32, help="serving.max_batch_requests with batching on")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="serving.batch_wait_timeout_s, in ms")
    parser.add_argument("--max-batch-wait-ms", type=float, default=250.0, help="serving.max_batch_wait_s, in ms")
    parser.add_argument("--tokens-per-batch", type=int, default=8192, help="predict.tokens_per_batch for both")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, in process and per member replica (see the note in docs/BENCHMARKS.md: "
                             "2 threads spin-wait when the 2 cores are shared)")
    parser.add_argument("--backoff-ms", type=float, default=50.0, help="a client's pause after an error")
    parser.add_argument("--in-process-rows", type=int, default=64, help="rows timed in process per round")
    parser.add_argument("--json-out", help="also write the numbers and settings to this JSON file")
    args = parser.parse_args(argv)
    if min(args.rows, args.clients, args.overload_clients, args.max_batch, args.in_process_rows, args.repeats) < 1:
        parser.error("--rows, --clients, --overload-clients, --max-batch, --in-process-rows and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from app.modeling import read_checkpoint_meta
    from bench.memory import processor_name

    _, config = read_checkpoint_meta(args.checkpoint)
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as scratch:
        payloads, texts = load_payloads(args.data, args.rows, scratch)
    results, checks = run_all(args, payloads, texts)
    settings = {
        "checkpoint": f"{args.checkpoint} (model {config.model.name_or_path}, max_length {config.format.max_length})",
        "requests": f"1 pair each, cycling over {len(payloads)} rows of {args.data or 'built-in synthetic test rows'}; "
                    "closed-loop clients in "
                    f"this process (aiohttp); {args.repeats} alternating rounds of {args.seconds:g} s per scenario "
                    "(plus the time to finish the requests in flight), the overload run once",
        "app": f"1 ingress + 1 member replica per app (one app per scenario, side by side), batch_tokens 16384, "
               f"batch wait {args.batch_wait_ms:g} ms idle / up to {args.max_batch_wait_ms:g} ms busy, "
               f"tokens_per_batch {args.tokens_per_batch}, "
               "predict.precision auto, tta_swap off",
        "threads": f"torch {args.threads} threads in process and in the member replica",
        "machine": f"{os.cpu_count()} cores, {processor_name()}, torch {torch.__version__}, shared with the clients, "
                   "the proxy and the ingress",
    }
    print("\n" + render(results, checks, settings, args), flush=True)
    if args.json_out:
        write_json(args.json_out, {**settings, **{k: str(v) for k, v in checks.items()}}, results)


if __name__ == "__main__":
    main()

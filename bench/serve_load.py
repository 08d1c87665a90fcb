"""Load benchmark of the HTTP server (eval/serve.py), on loopback only: throughput and latency by concurrency, and
micro-batching against batch size 1.

    python sft/train.py recipes/demo.yaml            # the demo model: outputs/demo/final
    python bench/serve_load.py --adapter outputs/demo/final --plot docs/bench_serve_load_demo.png
    python bench/serve_load.py --adapter outputs/cpu-smollm2-lora/final --requests 48 --concurrency 1 4 16 \\
        --plot docs/bench_serve_load_smollm2.png

The script starts the server itself (a subprocess on a free 127.0.0.1 port; it never talks to another host), sends
real test-split reviews, `--texts_per_request` per request, from `c` concurrent clients until `--requests` requests
are answered or `--seconds` have passed, for each concurrency level. A second server with `--max_batch_size 1`
(every text its own scorer call) runs next to it, and the two are compared at the `--compare_at` level,
in alternating rounds. Latency is per request, from sending to the whole answer; "mean batch" is texts per scorer
call, from the server's /healthz counters. Each simulated user has its own connection (and httpx client).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import REAL_DATA, bar_chart, load1, machine_line, table

from sft.serving import ServerProcess

HEADER = ["server", "concurrency", "requests", "errors", "requests/s", "texts/s", "p50 ms", "p95 ms", "p99 ms",
          "mean batch"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="training output directory to serve")
    p.add_argument("--base", help="base model (zero-shot without --adapter)")
    p.add_argument("--data_dir", default=str(REAL_DATA), help="reviews come from its test split")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests", type=int, default=512, help="requests per level, at most")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds per level, at most")
    p.add_argument("--texts_per_request", type=int, default=1)
    p.add_argument("--max_batch_size", type=int, default=32, help="the server's micro-batch cap")
    p.add_argument("--max_wait_ms", type=float, default=5.0, help="the server's micro-batch wait")
    p.add_argument("--compare_at", type=int, default=16, help="concurrency of the batch-size-1 comparison (0: none)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds of the comparison (--requests in all)")
    p.add_argument("--warmup", type=int, default=8, help="requests before measuring (not counted)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the server (default: torch's choice)")
    p.add_argument("--plot", help="PNG chart of texts/s per level")
    args = p.parse_args(argv)
    if not (args.adapter or args.base):
        p.error("give --adapter DIR and/or --base MODEL")
    return args


def reviews(data_dir: str) -> list[str]:
    from sft.data import read_texts

    files = sorted(Path(data_dir).glob("test.*"))
    if not files:
        raise SystemExit(f"error: {data_dir}: no test split file")
    return [text for _, text in read_texts(files[0])[0]]


async def run_level(url: str, texts: list[str], per_request: int, concurrency: int, requests: int,
                    seconds: float) -> dict:
    """`concurrency` clients, each sending its next request as soon as the last is answered, until `requests` are
    sent or `seconds` have passed. Latencies of the answered requests, wall time, errors."""
    import httpx

    numbers, deadline = itertools.count(), time.monotonic() + seconds
    latencies: list[float] = []
    errors: list[str] = []

    async def client(http: httpx.AsyncClient) -> None:
        while (k := next(numbers)) < requests and time.monotonic() < deadline:
            body = {"texts": [texts[(k * per_request + j) % len(texts)] for j in range(per_request)]}
            start = time.perf_counter()
            try:
                response = await http.post(f"{url}/v1/classify", json=body)
                if response.status_code == 200 and len(response.json()["predictions"]) == per_request:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors.append(f"HTTP {response.status_code}")
            except httpx.HTTPError as e:
                errors.append(type(e).__name__)

    # one client (one keep-alive connection) per simulated user: one shared pool of 64 connections costs httpx more
    # CPU per request than the server spends on it, and the benchmark would measure the client
    clients = [httpx.AsyncClient(timeout=max(seconds, 30.0)) for _ in range(concurrency)]
    start = time.perf_counter()
    await asyncio.gather(*(client(http) for http in clients))
    wall = time.perf_counter() - start
    await asyncio.gather(*(http.aclose() for http in clients))
    return {"latencies": latencies, "wall": wall, "errors": errors}


def batching(url: str) -> dict:
    import httpx

    return httpx.get(f"{url}/healthz", timeout=30).json()["batching"]


def level(server: ServerProcess, texts: list[str], args, concurrency: int, requests: int) -> dict:
    """One load run against a running server, with the server's batching counters over it."""
    before, load_before = batching(server.url), load1()
    result = asyncio.run(run_level(server.url, texts, args.texts_per_request, concurrency, requests, args.seconds))
    after = batching(server.url)
    print(f"{server.args[server.args.index('--max_batch_size') + 1]}-text batches, concurrency {concurrency}: "
          f"{len(result['latencies'])} requests in {result['wall']:.1f} s, errors {len(result['errors'])} "
          f"{sorted(set(result['errors']))[:3]}, load {load_before:.2f} -> {load1():.2f}", flush=True)
    return result | {"texts": after["texts"] - before["texts"], "calls": after["batches"] - before["batches"]}


def row(label: str, concurrency: int, runs: list[dict], per_request: int) -> list:
    """A table row from one or more runs (interleaved rounds add up)."""
    ms = np.concatenate([np.array(r["latencies"]) * 1000 for r in runs])
    wall, calls = sum(r["wall"] for r in runs), sum(r["calls"] for r in runs)
    p50, p95, p99 = np.percentile(ms, [50, 95, 99]) if len(ms) else (float("nan"),) * 3
    return [label, concurrency, len(ms), sum(len(r["errors"]) for r in runs), round(len(ms) / wall, 2),
            round(len(ms) * per_request / wall, 2), round(p50, 1), round(p95, 1), round(p99, 1),
            round(sum(r["texts"] for r in runs) / calls, 2) if calls else "-"]


def compare(micro: ServerProcess, single: ServerProcess, texts: list[str], args) -> list[list]:
    """Micro-batching against batch size 1 at one concurrency, in alternating rounds: a change in the shared
    machine's load hits both alike."""
    runs: dict[str, list[dict]] = {"micro": [], "single": []}
    per_round = max(1, args.requests // args.rounds)
    for _ in range(args.rounds):
        runs["micro"].append(level(micro, texts, args, args.compare_at, per_round))
        runs["single"].append(level(single, texts, args, args.compare_at, per_round))
    return [row(f"micro-batching ({args.max_batch_size}), interleaved", args.compare_at, runs["micro"],
                args.texts_per_request),
            row("batch size 1, interleaved", args.compare_at, runs["single"], args.texts_per_request)]


def scorer_bound(args, texts: list[str]) -> tuple[float, float]:
    """texts/s of SentimentPredictor.predict_batch in this process, no HTTP: one text per call against `compare_at`
    per call, on the same texts in alternating rounds. Their ratio is the most micro-batching can gain."""
    import torch

    from sft.predictor import SentimentPredictor

    if args.threads:
        torch.set_num_threads(args.threads)
    predictor = SentimentPredictor(args.base, args.adapter, batch_size=args.max_batch_size)
    n, seconds = min(len(texts), args.requests), {1: 0.0, args.compare_at: 0.0}
    for r in range(args.rounds):
        chunk = texts[r * n // args.rounds : (r + 1) * n // args.rounds]
        for size in seconds:
            start = time.perf_counter()
            for i in range(0, len(chunk), size):
                predictor.predict_batch(chunk[i : i + size])
            seconds[size] += time.perf_counter() - start
    print(f"scorer alone (no HTTP, this process): {n / seconds[1]:.2f} texts/s one text per call, "
          f"{n / seconds[args.compare_at]:.2f} texts/s {args.compare_at} per call", flush=True)
    return n / seconds[1], n / seconds[args.compare_at]


def serve_args(args, max_batch_size: int) -> list[str]:
    model = [*(["--adapter", args.adapter] if args.adapter else []), *(["--base", args.base] if args.base else [])]
    return [*model, "--max_batch_size", str(max_batch_size), "--max_wait_ms", str(args.max_wait_ms),
            "--max_texts", str(max(64, args.texts_per_request))]


def main(argv=None) -> int:
    args = parse_args(argv)
    print(machine_line())
    texts = reviews(args.data_dir)
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    print(f"{len(texts)} reviews from {args.data_dir}, {args.texts_per_request} per request; server: "
          f"{args.adapter or args.base}, micro-batches of <= {args.max_batch_size} texts, wait {args.max_wait_ms} ms")
    with contextlib.ExitStack() as stack:
        micro = stack.enter_context(ServerProcess(*serve_args(args, args.max_batch_size), env=env))
        single = stack.enter_context(ServerProcess(*serve_args(args, 1), env=env)) if args.compare_at else None
        for server in filter(None, (micro, single)):  # warm-up, not counted
            asyncio.run(run_level(server.url, texts, args.texts_per_request, 1, args.warmup, args.seconds))
        rows = [row(f"micro-batching ({args.max_batch_size})", c, [level(micro, texts, args, c, args.requests)],
                    args.texts_per_request) for c in args.concurrency]
        pair = compare(micro, single, texts, args) if single else []
        bound = scorer_bound(args, texts) if single else None
    print(table(rows + pair, HEADER))
    ratio = f"; micro-batching vs batch size 1 at concurrency {args.compare_at}: {pair[0][5] / pair[1][5]:.2f}x " \
            f"texts/s (interleaved; the scorer alone, {args.compare_at} texts per call vs 1: " \
            f"{bound[1] / bound[0]:.2f}x)" if pair and pair[1][5] else ""
    bar_chart(args.plot, [f"{r[0]}, concurrency {r[1]}" for r in rows + pair], [r[5] for r in rows + pair],
              "texts/s", f"eval/serve.py on loopback: {args.adapter or args.base}")
    print(f"SUMMARY serve_load: texts/s by concurrency {', '.join(f'{r[1]}: {r[5]}' for r in rows)}; "
          f"errors {sum(r[3] for r in rows + pair)}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

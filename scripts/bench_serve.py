"""Service benchmark: `cbir serve` over real Redis, driven over HTTP, against the model's own speed.

In one run, on one machine:
  1. BUSI is indexed into a scratch embedded Redis (or --redis-url) and an IVF index trained;
  2. `cbir serve` starts in its own process: the time from its start to its first answer;
  3. clients send one BUSI image per request at concurrency 1, 4 and 16 (threads, keep-alive
     connections): p50/p95/p99 latency and requests/s at each;
  4. the same model in this process, with the service idle: its forward time at batch 1 and its
     batched forward rate (batch 32) over the same images, the baselines of the targets
     (p50 at concurrency 1 <= 1.3 x the batch-1 forward time; requests/s at concurrency 16 >= 0.85 x
     the batched forward rate; first answer <= 5 s).
Usage: python scripts/bench_serve.py [--requests 64] [--concurrency 1,4,16] [--redis-url URL] [--images DIR]
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cbir import api  # noqa: E402
from cbir.store.database import VectorStore  # noqa: E402
from cbir.store.redis.connect import describe, scratch, url_for_others  # noqa: E402

DB = "bench-serve"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(url: str, port: int, query: bytes) -> tuple[subprocess.Popen, float]:
    """The service process, and the seconds from its start to its first answered search."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "cbir", "serve", "--port", str(port), "--redis-url", url],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:
        try:
            answer = httpx.post(f"http://127.0.0.1:{port}/api/v1/databases/{DB}/search",
                                files=[("image", ("q.png", query))], data={"k": "10"}, timeout=30)
            if answer.status_code == 200:
                return server, time.perf_counter() - started
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the service stopped: {server.stderr.read()}")
        time.sleep(0.05)


def drive(port: int, queries: list[bytes], concurrency: int, requests: int, server: psutil.Process) -> dict:
    """``requests`` searches from ``concurrency`` clients; latency percentiles, the rate, and the CPU
    time per request of the service and of these clients (they share this machine's cores)."""
    url = f"http://127.0.0.1:{port}/api/v1/databases/{DB}/search"
    clients = [httpx.Client(timeout=60) for _ in range(concurrency)]

    def one(number: int) -> float:
        started = time.perf_counter()
        answer = clients[number % concurrency].post(url, files=[("image", ("q.png", queries[number % len(queries)]))],
                                                    data={"k": "10"})
        answer.raise_for_status()
        return time.perf_counter() - started

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm-up: connections open, batcher running
        served, driven = _cpu_seconds(server), time.process_time()
        started = time.perf_counter()
        latencies = np.array(list(pool.map(one, range(requests))))
        elapsed = time.perf_counter() - started
        served, driven = _cpu_seconds(server) - served, time.process_time() - driven
    for client in clients:
        client.close()
    return {"p50": np.percentile(latencies, 50), "p95": np.percentile(latencies, 95),
            "p99": np.percentile(latencies, 99), "rate": requests / elapsed,
            "server_cpu": served / requests, "client_cpu": driven / requests}


def _cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def model_baselines(store, items) -> tuple[float, float, float]:
    """Median batch-1 forward seconds, the batched (32) forward rate of the database's model, and
    its CPU seconds per image (both cores at work: what each search costs the service at least)."""
    from cbir.pipeline.model import extractor_for_store

    extractor = extractor_for_store(store)
    images = torch.stack([extractor.preprocess(item.read()[0]) for item in items[:64]])
    extractor.embed(images[:32])  # warm-up: kernels picked on first use
    singles = []
    for image in images[:32]:
        started = time.perf_counter()
        extractor.embed(image[None])
        singles.append(time.perf_counter() - started)
    started, cpu = time.perf_counter(), time.process_time()
    for first in range(0, 64, 32):
        extractor.embed(images[first:first + 32])
    return float(np.median(singles)), 64 / (time.perf_counter() - started), (time.process_time() - cpu) / 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "busi"))
    parser.add_argument("--requests", type=int, default=64, help="requests at each concurrency (default: 64)")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--redis-url", default=None, help="default: a fresh embedded Redis")
    args = parser.parse_args()
    with scratch(args.redis_url) as client:
        store = VectorStore(client, DB)
        api.start_over(store)
        items = api.load_items(args.images)
        api.add(store, items, api.model_for_add(store), progress=False)
        api.train_index(store, kind="ivf")
        print(f"{len(items)} images of {args.images} in '{DB}' on {describe(client)}, IVF index; torch threads "
              f"{torch.get_num_threads()}")
        queries = [Path(item.location).read_bytes() for item in items[::len(items) // 64 or 1]]
        port = free_port()
        server, first = start_service(url_for_others(client, args.redis_url), port, queries[0])
        try:
            print(f"  first answer after start  {first:6.2f} s   (target <= 5 s)")
            runs = {c: drive(port, queries, c, args.requests, psutil.Process(server.pid))
                    for c in map(int, args.concurrency.split(","))}
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)
        single, batched, cpu = model_baselines(store, items)
        print(f"  model forward, batch 1    {single * 1000:6.1f} ms (median)   batched (32): {batched:6.1f} images/s, "
              f"{cpu * 1000:.1f} CPU ms/image")
        print(f"  {'concurrency':>11} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'requests/s':>11} "
              f"{'CPU ms/request: service':>24} {'clients':>8}")
        for concurrency, run in runs.items():
            print(f"  {concurrency:>11} {run['p50'] * 1000:8.1f} {run['p95'] * 1000:8.1f} {run['p99'] * 1000:8.1f} "
                  f"{run['rate']:11.1f} {run['server_cpu'] * 1000:24.1f} {run['client_cpu'] * 1000:8.1f}")
        low, high = min(runs), max(runs)
        print(f"  p50 at concurrency {low} / batch-1 forward: {runs[low]['p50'] / single:.2f} x   (target <= 1.3)")
        print(f"  requests/s at concurrency {high} / batched forward: {runs[high]['rate'] / batched:.2f} x   "
              f"(target >= 0.85)")
        store.drop()


if __name__ == "__main__":
    main()

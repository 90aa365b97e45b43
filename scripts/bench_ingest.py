"""Ingest benchmark: model forward vs end-to-end indexing, Redis write/read rates, bytes per image.

Everything is measured in this one run, on the same machine, with baselines beside the numbers:
  1. pure model forward (pre-decoded images) vs end-to-end `add` (decode + model + Redis) on the
     same real images, and the CPU cost of decoding against that of the model;
  2. Redis ingest of N 128-d vectors with their records through the store (the path `add` uses),
     vs a naive redis-py pipeline of one HSET per image, alternating, several times (medians);
  3. reading all N vectors back; memory per stored image (INFO used_memory delta, less the
     server's transient buffers, and the vector keys' MEMORY USAGE against the raw float32 bytes).
Usage: python scripts/bench_ingest.py [--extractor NAME] [--vectors 1000000] [--ingest-repeats 3] [--redis-url URL]
       [--images DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cbir import interrupts  # noqa: E402
from cbir.cli.flags import COUNT, NON_NEGATIVE  # noqa: E402
from cbir.errors import ModelError  # noqa: E402
from cbir.images.sources import load_items  # noqa: E402
from cbir.models.factory import create_extractor
from cbir.models.registry import BACKBONES, resolve_backbone  # noqa: E402
from cbir.pipeline.embed import decode_batches, decodes_beside, default_workers
from cbir.pipeline.ingest import BackgroundWriter, index_images
from cbir.pipeline.model import register_model
from cbir.store.database import VectorStore
from cbir.store.layout import ImageRecord  # noqa: E402
from cbir.store.redis.connect import describe, scratch  # noqa: E402

DIM = 128
BATCH = 10_000


def empty_store(client, name: str) -> VectorStore:
    store = VectorStore(client, name)
    store.drop()
    return store


def forward_vs_end_to_end(client, images: Path, architecture: str, batch_size: int, workers: int | None,
                          repeats: int, device: str, thumbnails: bool = True) -> dict:
    """End-to-end `add` ``repeats`` times, each between two pure forward runs whose mean is that
    add's baseline (this machine's speed drifts within one run); the CPU cost per image of
    decoding and of the model, whose ratio bounds what any schedule can reach when the model
    runs on the CPU; the rate of the decoding threads alone, which bounds it on an accelerator;
    and the rate of decoding and model taking turns with nothing else costing time.

    Weights do not change the cost, so a backbone with no weights on this machine runs with random ones."""
    backbone = BACKBONES[architecture]
    extractor = create_extractor(backbone.name, pretrained=backbone.offline_weights is not None, device=device)
    beside = decodes_beside(extractor)
    items = load_items(images)
    extractor.preprocess(items[0].read(keep_grey=True)[0])  # warm-up: first-use costs of the decoders
    started = time.process_time()
    decoded = torch.stack([extractor.preprocess(item.read(keep_grey=True)[0]) for item in items])
    decode_cpu = (time.process_time() - started) / len(items)
    started = time.perf_counter()
    for _ in decode_batches(items, extractor.preprocess, batch_size, workers, beside):
        pass
    decode_rate = len(items) / (time.perf_counter() - started)
    extractor.embed(decoded[:batch_size])  # warm-up: oneDNN and cuDNN pick their kernels on first use

    def forward() -> tuple[float, float]:
        started, cpu = time.perf_counter(), time.process_time()
        for first in range(0, len(decoded), batch_size):
            extractor.embed(decoded[first:first + batch_size])
        return len(decoded) / (time.perf_counter() - started), (time.process_time() - cpu) / len(decoded)

    forwards, adds = [forward()], []
    for _ in range(repeats):
        store = empty_store(client, "bench-e2e")
        register_model(store, extractor)
        report = index_images(store, items, extractor, batch_size=batch_size, workers=workers, progress=False,
                              thumbnails=thumbnails)
        store.drop()
        adds.append(report.written / report.seconds)
        forwards.append(forward())
    rates = [rate for rate, _ in forwards]
    forward_rate = float(np.median(rates))
    ratios = [add / ((before + after) / 2) for add, before, after in zip(adds, rates, rates[1:])]
    model_cpu = float(np.mean([cpu for _, cpu in forwards]))
    if beside:
        bound = min(1.0, decode_rate / forward_rate)
    else:
        bound = model_cpu / (model_cpu + decode_cpu)
    return {"images": len(items), "forward": forward_rate, "forwards": rates, "adds": adds, "ratios": ratios,
            "decode_cpu": decode_cpu, "decode_rate": decode_rate, "model_cpu": model_cpu, "bound": bound,
            "turns": 1 / (1 / forward_rate + 1 / decode_rate), "device": str(extractor.device), "beside": beside,
            "model": extractor.spec}


def make_records(n: int) -> list[ImageRecord]:
    return [ImageRecord(name=f"class{i % 10}/image_{i:07d}.png", label=f"class{i % 10}", project="bench",
                        sha256=hashlib.sha256(i.to_bytes(8, "little")).hexdigest(),
                        source=f"/data/bench/class{i % 10}/image_{i:07d}.png", added=1.7e9) for i in range(n)]


def store_ingest(client, vectors: np.ndarray, records: list[ImageRecord]) -> dict:
    store = empty_store(client, "bench-ingest")
    store.ensure_model("bench", {"description": "random vectors"}, DIM)
    memory_before = stored_memory(client)
    forks_before, forked = client.info("stats")["total_forks"], _aof_rewriting(client)
    started = time.perf_counter()
    with store.writing(), interrupts.held(), BackgroundWriter(store) as writer:  # as index_images writes
        for first in range(0, len(records), BATCH):
            interrupts.check()  # between batches: no hand-over to the writer thread under way
            plan = store.prepare(records[first:first + BATCH])
            writer.submit(plan, vectors[first:first + BATCH][plan.positions])
    write_rate = len(records) / (time.perf_counter() - started)
    # A rewrite under way at the start, or any fork since: sampling the rewrite flag at both ends
    # misses a rewrite that starts and ends inside the window.
    forked = forked or client.info("stats")["total_forks"] > forks_before
    bytes_per_image = (stored_memory(client) - memory_before) / len(records)
    chunks = -(-len(records) // store.chunk_size)
    vector_bytes = sum(client.memory_usage(store.vector_key(c), samples=0) or 0 for c in range(chunks))
    started = time.perf_counter()
    ids, loaded = store.load_vectors()
    read_seconds = time.perf_counter() - started
    assert len(ids) == len(records) and np.array_equal(loaded, vectors)
    store.drop()
    return {"write": write_rate, "read_seconds": read_seconds, "bytes_per_image": bytes_per_image,
            "vector_bytes_per_image": vector_bytes / len(records), "forked": forked}


def stored_memory(client) -> int:
    """The server's memory less its transient buffers: the append-only file's write buffer, which
    held up to 0.38 x the raw vector bytes right after an ingest, depending on when it was last
    flushed, and the clients' query and output buffers. Taken once the keys of an earlier
    ``drop`` (UNLINK) are freed, which happens in a background thread."""
    memory = client.info("memory")
    while memory["lazyfree_pending_objects"]:
        time.sleep(0.01)
        memory = client.info("memory")
    return memory["used_memory"] - memory["mem_aof_buffer"] - memory["mem_clients_normal"]


def _aof_rewriting(client) -> bool:
    """Whether Redis is rewriting its append-only file: a forked child that competes for the cores."""
    return bool(client.info("persistence").get("aof_rewrite_in_progress"))


def compact_aof(client) -> None:
    """Rewrite the append-only file now, while nothing is timed, and wait for it: each timed
    ingest then starts from a small file instead of crossing the 1 GB at which Redis would
    rewrite it in a forked child beside the ingest."""
    while _aof_rewriting(client):
        time.sleep(0.1)
    client.bgrewriteaof()
    while _aof_rewriting(client) or client.info("persistence").get("aof_rewrite_scheduled"):
        time.sleep(0.1)


def ingests_and_baselines(client, vectors: np.ndarray, records: list[ImageRecord], baseline_vectors: int,
                          repeats: int, compact: bool) -> list[tuple[dict, float]]:
    """``repeats`` store ingests, each followed by the naive baseline on its first vectors;
    ``compact``: rewrite the append-only file before each ingest."""
    runs = []
    for _ in range(repeats):
        if compact:
            compact_aof(client)
        runs.append((store_ingest(client, vectors, records),
                     naive_hset(client, vectors[:baseline_vectors], records[:baseline_vectors])))
    return runs


def naive_hset(client, vectors: np.ndarray, records: list[ImageRecord]) -> float:
    """The baseline: a redis-py pipeline of one HSET (vector + fields) per image."""
    started = time.perf_counter()
    for first in range(0, len(records), BATCH):
        pipe = client.pipeline(transaction=False)
        for record, vector in zip(records[first:first + BATCH], vectors[first:first + BATCH]):
            pipe.hset(f"naive:{record.name}", mapping={"vector": vector.tobytes(), "name": record.name,
                                                      "label": record.label, "project": record.project,
                                                      "sha256": record.sha256})
        pipe.execute()
    rate = len(records) / (time.perf_counter() - started)
    pipe = client.pipeline(transaction=False)
    for record in records:
        pipe.unlink(f"naive:{record.name}")
    pipe.execute()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=COUNT, default=1_000_000, help="vectors for the Redis part")
    parser.add_argument("--baseline-vectors", type=COUNT, default=200_000, help="vectors for the naive baseline")
    parser.add_argument("--redis-url", dest="redis_url", default=None, help="default: a fresh embedded Redis")
    parser.add_argument("--images", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/busi",
                        help="class-per-folder images of the model part (default: ../shared/data/busi)")
    parser.add_argument("--extractor", type=_backbone_name, default="efficientnet_lite0",
                        help="backbone of the model part (default: efficientnet_lite0, the indexing default, "
                             f"among the cheapest per image); one of: {', '.join(sorted(BACKBONES))}")
    parser.add_argument("--batch-size", type=COUNT, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--workers", type=NON_NEGATIVE, default=None,
                        help="decoding threads, processes beside an accelerator (default: one per core)")
    parser.add_argument("--repeats", type=COUNT, default=5,
                        help="end-to-end runs, each between two forward runs (this machine drifts: single adds scatter)")
    parser.add_argument("--ingest-repeats", type=COUNT, default=3,
                        help="store ingests, each followed by the baseline; medians are printed")
    parser.add_argument("--device", default="cpu", help="torch device of the model (default: cpu)")
    parser.add_argument("--skip-model", action="store_true", help="only the Redis part")
    parser.add_argument("--no-thumbnails", action="store_true", help="adds without thumbnails (add --no-thumbnails)")
    args = parser.parse_args()
    with scratch(args.redis_url) as client:
        print(f"Redis: {describe(client)}, server {client.info('server')['redis_version']}; "
              f"torch threads {torch.get_num_threads()}")
        if not args.skip_model:
            e2e = forward_vs_end_to_end(client, args.images, args.extractor, args.batch_size, args.workers,
                                        args.repeats, args.device, thumbnails=not args.no_thumbnails)
            workers = default_workers() if args.workers is None else args.workers
            decoders = "processes" if e2e["beside"] and workers else "threads"
            model = e2e["model"]
            print(f"\n[model] {e2e['images']} images of {args.images}, {model.architecture} ({model.weights} "
                  f"weights) at {model.input_size} px on "
                  f"{e2e['device']}, batches of {args.batch_size}, {workers} decoding {decoders}, "
                  f"{args.repeats} end-to-end runs, each between two forward runs")
            print(f"  pure forward          {e2e['forward']:8.1f} images/s (median; runs "
                  f"{min(e2e['forwards']):.1f}-{max(e2e['forwards']):.1f}), model CPU {e2e['model_cpu'] * 1e3:.2f} ms/image")
            print(f"  end-to-end add        {np.median(e2e['adds']):8.1f} images/s (median; runs "
                  f"{min(e2e['adds']):.1f}-{max(e2e['adds']):.1f}), decode + model + Redis")
            print(f"  ratio                 {np.median(e2e['ratios']):8.3f}   (median; runs "
                  f"{', '.join(f'{r:.3f}' for r in e2e['ratios'])}; target >= 0.9)")
            print(f"  decoding alone        {e2e['decode_rate']:8.1f} images/s, CPU {e2e['decode_cpu'] * 1e3:.2f} ms/image")
            if e2e["beside"]:
                print(f"  bound on the ratio    {e2e['bound']:8.3f}   = decoding alone / pure forward, at most 1: "
                      "decoding overlaps the accelerator")
            else:
                print(f"  bound on the ratio    {e2e['bound']:8.3f}   = model CPU / (model + decoding CPU): "
                      "decoding needs CPU the model would use")
                print(f"  taking turns          {e2e['turns']:8.1f} images/s = 1 / (1/forward + 1/decoding alone), "
                      f"ratio {e2e['turns'] / e2e['forward']:.3f}: add if nothing but decoding and the model took "
                      f"time; 0.9 needs decoding at 9 x forward = {9 * e2e['forward']:,.0f} images/s")
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((args.vectors, DIM), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        records = make_records(args.vectors)
        # Only the scratch server's own append-only file is compacted; a user's server is left alone.
        runs = ingests_and_baselines(client, vectors, records, args.baseline_vectors, args.ingest_repeats,
                                     compact=args.redis_url is None)
        writes = [ingest["write"] for ingest, _ in runs]
        baselines = [baseline for _, baseline in runs]
        forked = [str(run) for run, (ingest, _) in enumerate(runs, 1) if ingest["forked"]]
        first, raw = runs[0][0], DIM * 4
        print(f"\n[redis] {args.vectors:,} vectors of {DIM} dims with their records; {len(runs)} run"
              f"{'s' if len(runs) > 1 else ''}, each store ingest followed by the baseline (the first ingest's "
              "server takes fresh memory from the kernel, later ones reuse what dropping the last one freed)")
        print(f"  cbir store ingest     {np.median(writes):10,.0f} vectors/s   (median; runs {_listed(writes)}; "
              "target >= 250,000)" + (f"; a Redis fork (AOF rewrite or snapshot) ran beside run {', '.join(forked)}"
                                      if forked else ""))
        print(f"  naive HSET pipeline   {np.median(baselines):10,.0f} vectors/s   (median; runs {_listed(baselines)}; "
              f"baseline, {args.baseline_vectors:,} vectors)")
        print(f"  speed-up              {np.median([w / b for w, b in zip(writes, baselines)]):10.2f} x   "
              "(median of each run's ingest / its baseline)")
        reads = [ingest["read_seconds"] for ingest, _ in runs]
        print(f"  read all back         {np.median(reads):10.2f} s   (median; runs "
              f"{', '.join(f'{r:.2f}' for r in reads)}; target <= 3 s for 1,000,000)")
        print(f"  vector bytes/image    {first['vector_bytes_per_image']:10.1f}   = "
              f"{first['vector_bytes_per_image'] / raw:.3f} x raw {raw} B   (target <= 1.25 x)")
        print(f"  all bytes/image       {first['bytes_per_image']:10.1f}   = {first['bytes_per_image'] / raw:.3f} x raw "
              "(vector + record + name index; first run)")


def _backbone_name(name: str) -> str:
    try:
        return resolve_backbone(name).name
    except ModelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _listed(rates: list[float]) -> str:
    return ", ".join(f"{rate:,.0f}" for rate in rates)


if __name__ == "__main__":
    main()

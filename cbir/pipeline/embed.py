"""Images -> extractor -> vectors: decoding in parallel and the model in batches."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cbir import interrupts
from cbir.errors import CbirError, ImageError, in_one_line
from cbir.images.sources import ImageItem
from cbir.images.thumbnails import thumbnail
from cbir.models.extractor import Extractor
from cbir.models.preprocess import Preprocess

DEFAULT_BATCH_SIZE = 32


# Decoding threads taking turns with the model decode this many images a turn (whole batches, at
# least one): turns of 64 to 256 images kept adds closest to the pure forward rate, shorter turns
# fell behind (docs/PERFORMANCE.md).
DECODE_TURN_IMAGES = 128


@dataclass
class DecodedBatch:
    positions: list[int]  # index of each decoded image in the item list
    images: torch.Tensor | None  # preprocessed uint8, (n, 3, H, W); a numpy array on its way between processes
    sha256: list[str]
    failures: list[str]  # "file: reason", one per image that could not be decoded
    thumbnails: list[bytes] | None = None  # of each decoded image, where asked for


def _decode(item: ImageItem, position: int, preprocess: Preprocess, thumbnails: bool = False):
    try:
        image, sha = item.read(keep_grey=True)
        return position, preprocess(image), sha, None, thumbnail(image) if thumbnails else None
    except ImageError as exc:
        return position, None, None, str(exc), None
    except MemoryError:  # in the resize, say: the decoder says how much it needs itself
        return position, None, None, f"{item.location}: not enough memory to prepare it for the model", None
    except Exception as exc:  # a decoder bug must cost one image, not the whole run
        return position, None, None, f"{item.location}: {in_one_line(exc)}", None


def _collate(samples) -> DecodedBatch:
    good = [s for s in samples if s[1] is not None]
    return DecodedBatch(positions=[s[0] for s in good],
                        images=torch.stack([s[1] for s in good]) if good else None,
                        sha256=[s[2] for s in good],
                        failures=[s[3] for s in samples if s[1] is None],
                        thumbnails=[s[4] for s in good] if good and good[0][4] is not None else None)


class _Decoding(Dataset):
    """The items, decoded on demand: what DataLoader processes decode."""

    def __init__(self, items: Sequence[ImageItem], preprocess: Preprocess, thumbnails: bool = False):
        self.items, self.preprocess, self.thumbnails = items, preprocess, thumbnails

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, position: int):
        return _decode(self.items[position], position, self.preprocess, self.thumbnails)


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def decodes_beside(extractor: Extractor) -> bool:
    """Whether decoding may run while the model does: not where the model needs the CPU's cores."""
    return extractor.device.type != "cpu"


def decode_batches(items: Sequence[ImageItem], preprocess: Preprocess, batch_size: int = DEFAULT_BATCH_SIZE,
                   workers: int | None = None, beside_model: bool = False,
                   thumbnails: bool = False) -> Iterator[DecodedBatch]:
    """Decoded, preprocessed batches in item order (with a thumbnail of each image, where asked
    for); undecodable images are reported, not raised.

    By default ``workers`` threads decode a turn of batches (DECODE_TURN_IMAGES images) when the
    first of them is asked for and leave the cores to the caller until the turn's batches are
    taken. ``beside_model``: ``workers`` processes decode the next batches while the caller works
    (for a model on an accelerator). ``workers=0``: the caller's thread decodes.
    """
    workers = default_workers() if workers is None else workers
    batches = [range(first, min(first + batch_size, len(items))) for first in range(0, len(items), batch_size)]
    if workers == 0:
        for positions in batches:
            yield _collate([_decode(items[p], p, preprocess, thumbnails) for p in positions])
    elif beside_model and len(batches) > 1:  # for one batch, starting processes costs more than it saves
        yield from _decode_in_processes(items, preprocess, batches, workers, thumbnails)
    else:
        turn = max(1, DECODE_TURN_IMAGES // batch_size) * batch_size
        with ThreadPoolExecutor(workers, thread_name_prefix="cbir-decode") as pool:
            for start in range(0, len(items), turn):
                positions = range(start, min(start + turn, len(items)))
                samples = list(pool.map(_decode, (items[p] for p in positions), positions, repeat(preprocess),
                                        repeat(thumbnails)))
                for first in range(0, len(samples), batch_size):
                    yield _collate(samples[first:first + batch_size])


def _collate_to_send(samples) -> DecodedBatch:
    """_collate with the pixels as a numpy array, which is pickled through the worker's pipe.

    A tensor would be handed over in fresh shared-memory pages, and the caller's first touch of
    each page faults: joining such chunks ran at 1,158 images/s on 16 cores, arrays at 1,789-1,858.
    """
    batch = _collate(samples)
    batch.images = None if batch.images is None else batch.images.numpy()
    return batch


def _decode_in_processes(items: Sequence[ImageItem], preprocess: Preprocess, batches: list[range],
                         workers: int, thumbnails: bool = False) -> Iterator[DecodedBatch]:
    """DataLoader processes decode each batch in chunks, one or more per worker, joined again here.

    A DataLoader worker decodes a whole batch of its own, so batches of 256 kept 4 of 16 workers
    busy on 780 images; chunks of 8 or more images keep them all busy. Processes rather than
    threads: threads hold the GIL for the Python parts of Pillow's decoding, and on 16 cores 16 of
    them decoded BUSI at 1,079 images/s at best where 16 processes reached 3,278.
    """
    chunks = [np.array_split(positions, max(1, min(workers, len(positions) // 8))) for positions in batches]
    sampler = [chunk.tolist() for parts in chunks for chunk in parts]
    loader = iter(DataLoader(_Decoding(items, preprocess, thumbnails), num_workers=min(workers, len(sampler)),
                             collate_fn=_collate_to_send, batch_sampler=sampler))
    for parts in chunks:
        decoded = [next(loader) for _ in parts]
        images = [part.images for part in decoded if part.images is not None]
        yield DecodedBatch(positions=[p for part in decoded for p in part.positions],
                           images=torch.from_numpy(np.concatenate(images)) if images else None,
                           sha256=[sha for part in decoded for sha in part.sha256],
                           failures=[failure for part in decoded for failure in part.failures],
                           thumbnails=[t for part in decoded for t in part.thumbnails or []] if thumbnails else None)


def embed_items(items: Sequence[ImageItem], extractor: Extractor, batch_size: int = DEFAULT_BATCH_SIZE,
                workers: int | None = None, progress: bool = False) -> tuple[np.ndarray, DecodedBatch]:
    """Vectors of the decodable ``items``, and one DecodedBatch (without pixels) saying which they are."""
    vectors, decoded = [], DecodedBatch(positions=[], images=None, sha256=[], failures=[])
    bar = tqdm(total=len(items), unit="img", desc="embedding", disable=not progress)
    with interrupts.held():
        for batch in decode_batches(items, extractor.preprocess, batch_size, workers, decodes_beside(extractor)):
            interrupts.check()
            decoded.failures += batch.failures
            if batch.positions:
                vectors.append(extractor.embed(batch.images))
                decoded.positions += batch.positions
                decoded.sha256 += batch.sha256
            bar.update(len(batch.positions) + len(batch.failures))
    bar.close()
    if not vectors:
        raise CbirError("no query image could be read:\n  " + "\n  ".join(decoded.failures))
    return np.concatenate(vectors), decoded


"""A search request: its images or vectors and options read from the request, then answered with
the database's warm extractor (batched with concurrent requests) and its index."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import Request

from cbir.images.decode import decode_image
from cbir.images.thumbnails import MEDIA_TYPE, thumbnail
from cbir.options import DEFAULT_NEIGHBOURS
from cbir.service.uploads import ClientError, Upload, check_size, uploads
from cbir.service.warm import WarmDatabase

MAX_NEIGHBOURS = 1000

_OPTIONS = {"k": {"type": "integer", "default": DEFAULT_NEIGHBOURS},
            "exact": {"type": "boolean", "description": "exact search even where an index is trained"},
            "preview": {"type": "boolean", "description": "a thumbnail of each query image in its answer"},
            "rerank": {"type": "boolean", "description": "k-reciprocal re-ranking of the 100 nearest candidates"},
            "label": {"type": "array", "items": {"type": "string"}},
            "project": {"type": "array", "items": {"type": "string"}}}
SEARCH_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}}, **_OPTIONS}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "vectors": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}, **_OPTIONS}}}}}}


@dataclass
class SearchRequest:
    uploads: list[Upload]
    vectors: list | None
    k: int
    exact: bool
    preview: bool
    rerank: bool
    labels: list[str] | None
    projects: list[str] | None


async def read_search(request: Request, max_upload_bytes: int) -> SearchRequest:
    """The images (multipart, field ``image``) or vectors (JSON) of a search, and its options."""
    check_size(request, max_upload_bytes)
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        options = await request.form(max_part_size=max_upload_bytes)
        found, vectors = await uploads(options), None
    elif kind.startswith("application/json"):
        options = await request.json()
        found, vectors = [], options.get("vectors") if isinstance(options, dict) else None
        if not vectors:
            raise ClientError(400, "no vectors: send {\"vectors\": [[...], ...]} or images as multipart")
    else:
        raise ClientError(415, f"send images as multipart/form-data or vectors as JSON, not {kind or 'nothing'}")
    return SearchRequest(found, vectors, k=_whole(options.get("k", DEFAULT_NEIGHBOURS), "k", 1, MAX_NEIGHBOURS),
                         exact=_yes(options.get("exact")), preview=_yes(options.get("preview")),
                         rerank=_yes(options.get("rerank")),
                         labels=_names(options, "label"), projects=_names(options, "project"))


async def answer(warm: WarmDatabase, request: Request, max_upload_bytes: int, started: float) -> dict:
    """The k nearest stored images of each query of ``request``, their vote, and where the time went (ms)."""
    timings, previews, pending = {}, [], None
    # Announced from its start: a batch waits (a few ms at most) for the images of requests still
    # being read and decoded.
    with warm.batcher.announced():
        asked = await read_search(request, max_upload_bytes)
        if asked.uploads:
            # Decoded in a thread: the event loop goes on reading other requests meanwhile.
            tensors, digests, previews = await asyncio.to_thread(_prepared, warm.extractor.preprocess,
                                                                 asked.uploads, asked.preview)
            decoded = time.perf_counter()
            timings["decode"] = decoded - started
            pending = warm.batcher.submit(tensors)
    if pending is not None:
        found = await asyncio.wrap_future(pending)
        timings["model"] = time.perf_counter() - decoded
        names = [upload.name for upload in asked.uploads]
    else:
        found = np.asarray(asked.vectors, dtype=np.float32)
        if found.ndim != 2 or found.shape[1] != warm.store.dim or not np.isfinite(found).all():
            raise ClientError(400, f"vectors: expected rows of {warm.store.dim} finite numbers, got shape "
                                   f"{tuple(found.shape)}")
        found /= np.maximum(np.linalg.norm(found, axis=1, keepdims=True), 1e-12)
        names, digests = [f"vector {i}" for i in range(len(found))], [""] * len(found)
    retrievals, inside = await asyncio.to_thread(warm.answer, found, names, digests, asked.k, asked.exact,
                                                 asked.labels, asked.projects, asked.rerank)
    timings.update(search=inside.get("search", 0.0), records=inside.get("records", 0.0))
    timings["total"] = time.perf_counter() - started
    results = [retrieval.to_json() for retrieval in retrievals]
    for result, preview in zip(results, previews):
        result["query_thumbnail"] = preview
    return {"results": results, "reranked": asked.rerank,
            "timings_ms": {step: round(seconds * 1000, 2) for step, seconds in timings.items()}}


def _prepared(preprocess, found: list[Upload], preview: bool) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """The model input, the sha256 and (with ``preview``) a thumbnail data URL of each upload,
    decoded in memory (a bad one raises its one-line ImageError)."""
    tensors, digests, previews = [], [], []
    for upload in found:
        image = decode_image(upload.data, upload.name)
        tensors.append(preprocess(image))
        digests.append(hashlib.sha256(upload.data).hexdigest())
        if preview:
            previews.append(f"data:{MEDIA_TYPE};base64," + base64.b64encode(thumbnail(image)).decode())
    return tensors, digests, previews


def _yes(value) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def _names(options, name: str) -> list[str] | None:
    """A filter's values: a repeatable form field, or a JSON string or list (empty values left out)."""
    values = options.getlist(name) if hasattr(options, "getlist") else options.get(name)
    values = [values] if isinstance(values, str) else [str(value) for value in values or []]
    return [value for value in values if value] or None


def _whole(value, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ClientError(400, f"{name}: {value!r} is not a whole number") from None
    if not low <= number <= high:
        raise ClientError(400, f"{name}: must be from {low} to {high}, got {number}")
    return number

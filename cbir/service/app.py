"""The HTTP API (``/api/v1``) over every database on one Redis: FastAPI, served by uvicorn.

The service keeps no state a second replica would miss: databases, indexes and their changes live
in Redis, so replicas of ``cbir serve`` over the same Redis answer alike. Errors are JSON
``{"error": "..."}`` with the status that says what went wrong; no stack trace reaches a client.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import time

import numpy as np
import redis
import torch
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from cbir import __version__, api
from cbir.errors import CbirError, DatabaseBusyError, ImageError, ModelMismatchError, StoreError
from cbir.images.decode import decode_image
from cbir.images.sources import ImageItem
from cbir.images.thumbnails import MEDIA_TYPE
from cbir.options import DEFAULT_NEIGHBOURS
from cbir.pipeline.ingest import index_images
from cbir.service import tokens
from cbir.service.metrics import Metrics
from cbir.service.tokens import Holder
from cbir.service.warm import UnknownDatabase, WarmDatabases
from cbir.store.database import VectorStore, database_names
from cbir.store.redis.connect import connect, describe

MAX_UPLOAD_BYTES = 50 * 2**20
MAX_NEIGHBOURS = 1000


class ClientError(CbirError):
    """A request the service cannot answer, with its HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def status_of(exc: Exception) -> int:
    if isinstance(exc, ClientError):
        return exc.status
    if isinstance(exc, UnknownDatabase):
        return 404
    if isinstance(exc, (ModelMismatchError, DatabaseBusyError)):
        return 409
    if isinstance(exc, ImageError):
        text = str(exc)
        return 415 if "not an image file" in text else 413 if "too many pixels" in text else 400
    if isinstance(exc, redis.RedisError) or (isinstance(exc, StoreError) and isinstance(exc.__cause__, redis.RedisError)):
        return 503
    return 400


def create_app(redis_url: str | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               require_tokens: bool = False) -> FastAPI:
    """The service over the Redis at ``redis_url`` (default: ``$CBIR_REDIS_URL``, else the embedded one).
    ``require_tokens``: never open, even once every token is revoked (a service reachable from other
    machines)."""
    client = connect(redis_url)
    databases = WarmDatabases(client)
    metrics = Metrics(databases.batch_sizes)
    app = FastAPI(title="cbir", version=__version__,
                  description="Content-based medical image retrieval: search stored images like a query.")
    app.state.databases = databases

    @app.middleware("http")
    async def measured(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.observe(getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - started)
        return response

    @app.exception_handler(CbirError)
    @app.exception_handler(redis.RedisError)
    async def one_line(request: Request, exc: Exception):
        status = status_of(exc)
        challenge = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        message = str(exc).splitlines()[0]
        if isinstance(exc, redis.RedisError):  # not through the store, which words it itself
            message = f"Redis failed ({message.rstrip('.')})"
        return JSONResponse({"error": message}, status_code=status, headers=challenge)

    def access(role: str):
        """A dependency: the holder of the request's token, who must have ``role``'s rights.
        Without any token made, the service is open (and listens on this machine only)."""
        def holder(authorization: str | None = Header(default=None)) -> Holder:
            if not require_tokens and not tokens.any_tokens(client):
                return Holder(name="local", role="admin")
            if not authorization or not authorization.startswith("Bearer "):
                raise ClientError(401, "this service needs a token: send Authorization: Bearer <token> "
                                       "(made by cbir token create)")
            found = tokens.holder_of(client, authorization.removeprefix("Bearer ").strip())
            if found is None:
                raise ClientError(401, "unknown or revoked token")
            if not found.may(role):
                raise ClientError(403, f"token '{found.name}' is a {found.role}'s: this needs {role} rights")
            return found
        return holder

    reader, editor = Depends(access("reader")), Depends(access("editor"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # logged by uvicorn, never shown to a client
        return JSONResponse({"error": "internal error (the service's log says more)"}, status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:])
        return JSONResponse({"error": f"{where}: {first.get('msg')}"}, status_code=400)

    @app.get("/healthz")
    def healthz() -> dict:
        client.ping()
        return {"status": "ok", "redis": describe(client), "version": __version__}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.text(), media_type=metrics.content_type)

    @app.get("/api/v1/databases")
    def list_databases(holder: Holder = reader) -> dict:
        """Every database on this Redis, with its image count and model."""
        return {"databases": [_summary(databases, name) for name in database_names(client)]}

    @app.get("/api/v1/databases/{db}")
    def database(db: str, holder: Holder = reader) -> dict:
        """Images, classes with counts, model, trained index and data version of one database."""
        described = api.describe(databases.store(db))
        info, trained = described.info, described.index
        return {"name": info.name, "images": info.count, "dim": info.dim, "version": info.version,
                "model": info.model_spec.get("description", ""), "fingerprint": info.model,
                "classes": dict(sorted(described.labels.items())),
                "index": {"kind": trained["kind"], "version": int(trained["version"]),
                          "recall10": float(trained["recall10"] or 1)} if trained else {"kind": "exact"}}

    @app.get("/api/v1/databases/{db}/images/{image_id}/thumbnail", response_class=Response,
             responses={200: {"content": {MEDIA_TYPE: {}}}})
    def image_thumbnail(db: str, image_id: int, holder: Holder = reader) -> Response:
        """A small picture (JPEG, at most 128 px) of a stored image, for pages showing neighbours."""
        picture = databases.store(db).thumbnail(image_id)
        if picture is None:
            raise ClientError(404, f"no thumbnail of image {image_id} in '{db}' (a removed image, or a database "
                                   "built before thumbnails: `cbir thumbnails` makes them)")
        return Response(picture, media_type=MEDIA_TYPE, headers={"Cache-Control": "private, max-age=3600"})

    @app.post("/api/v1/databases/{db}/images", openapi_extra=ADD_BODY)
    async def add_images(db: str, request: Request, holder: Holder = editor) -> dict:
        """Add uploaded images (multipart, field ``image``, repeatable) with a ``label`` (and a
        ``project``) to a database, with its own model; a stored name with other content is a
        conflict, not replaced. Audited."""
        _check_size(request, max_upload_bytes)
        form = await request.form(max_part_size=max_upload_bytes)
        label, project = str(form.get("label") or ""), str(form.get("project") or "")
        if not label:
            raise ClientError(400, "label: every image added needs one (the form field 'label')")
        items = [ImageItem(name=name, label=label, project=project, data=data,
                           location=f"{name} (uploaded by {holder.name})") for name, data in await _uploads(form)]
        warm = databases.get(db)
        store = databases.store(db, lock_wait=ADD_LOCK_WAIT)
        report = await asyncio.to_thread(index_images, store, items, warm.extractor, workers=0, progress=False)
        if report.written:
            _audit(store, holder, f"added {report.new} and replaced {report.updated} image(s) labelled {label}: "
                                  + ", ".join(item.name for item in items[:20]))
        return {"new": report.new, "unchanged": report.unchanged, "conflicts": report.conflicts,
                "failures": report.failures}

    @app.delete("/api/v1/databases/{db}/images/{image_id}")
    def forget(db: str, image_id: int, holder: Holder = editor) -> dict:
        """Forget a stored image (record, vector, thumbnail): no replica returns it again. Audited."""
        store = databases.store(db)
        with store.writing():
            removed = store.remove([image_id])
        if not removed:
            raise ClientError(404, f"no image {image_id} in '{db}'")
        _audit(store, holder, f"forgot image {image_id} ({removed[0].name}, {removed[0].label})")
        return {"forgotten": [{"id": image_id, "name": removed[0].name, "label": removed[0].label}]}

    @app.get("/api/v1/databases/{db}/audit")
    def audit(db: str, holder: Holder = editor) -> dict:
        """The latest changes made through the service: who, when, what (newest first)."""
        store = databases.store(db)
        entries = store.call("reading", store.client.lrange, store.key(AUDIT), 0, AUDIT_SHOWN - 1)
        return {"entries": [json.loads(entry) for entry in entries]}

    @app.post("/api/v1/databases/{db}/search", openapi_extra=SEARCH_BODY)
    async def search(db: str, request: Request, holder: Holder = reader) -> dict:
        """The k nearest stored images of each uploaded image (multipart, field ``image``,
        repeatable: any format ``add`` reads, DICOM too) or of each vector (JSON ``{"vectors": [...]}``),
        with their kNN vote and where the time went. ``label`` and ``project`` (repeatable) search
        among the images of those labels and projects only: k answers wherever k of them are stored."""
        started = time.perf_counter()
        _check_size(request, max_upload_bytes)
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            form = await request.form(max_part_size=max_upload_bytes)
            options, uploads, vectors = form, await _uploads(form), None
        elif kind.startswith("application/json"):
            options = await request.json()
            uploads, vectors = [], options.get("vectors") if isinstance(options, dict) else None
            if not vectors:
                raise ClientError(400, "no vectors: send {\"vectors\": [[...], ...]} or images as multipart")
        else:
            raise ClientError(415, f"send images as multipart/form-data or vectors as JSON, not {kind or 'nothing'}")
        k = _whole(options.get("k", DEFAULT_NEIGHBOURS), "k", 1, MAX_NEIGHBOURS)
        exact = str(options.get("exact", "false")).lower() in ("1", "true", "yes")
        filters = {name: _names(options, name) for name in ("label", "project")}
        warm = databases.get(db)
        return await _search(warm, uploads, vectors, k, exact, started, filters)

    return app


def from_environment() -> FastAPI:
    """The app of ``cbir serve``'s workers: its settings from the environment, as every replica reads them."""
    import os

    return create_app(max_upload_bytes=int(os.environ.get("CBIR_MAX_UPLOAD_MB", MAX_UPLOAD_BYTES // 2**20)) * 2**20,
                      require_tokens=os.environ.get("CBIR_REQUIRE_TOKENS") == "1")


SEARCH_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "k": {"type": "integer", "default": DEFAULT_NEIGHBOURS}, "exact": {"type": "boolean"},
        "label": {"type": "array", "items": {"type": "string"}},
        "project": {"type": "array", "items": {"type": "string"}}}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "vectors": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        "k": {"type": "integer", "default": DEFAULT_NEIGHBOURS}, "exact": {"type": "boolean"},
        "label": {"type": "array", "items": {"type": "string"}},
        "project": {"type": "array", "items": {"type": "string"}}}}}}}}


ADD_LOCK_WAIT = 30.0  # seconds an upload waits for another writer of the database
ADD_BODY = {"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
    "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
    "label": {"type": "string"}, "project": {"type": "string"}}, "required": ["image", "label"]}}}}}
AUDIT = "audit"  # cbir:<db>:audit, a list of JSON entries, newest first
AUDIT_KEPT, AUDIT_SHOWN = 10_000, 100


def _audit(store: VectorStore, holder: Holder, what: str) -> None:
    entry = json.dumps({"who": holder.name, "role": holder.role, "when": time.time(), "what": what})
    key = store.register_key(AUDIT)  # so that dropping the database drops its log
    store.execute("writing the audit log of", [("LPUSH", key, entry), ("LTRIM", key, 0, AUDIT_KEPT - 1)])


async def _uploads(form) -> list[tuple[str, bytes]]:
    """(file name, bytes) of each file in the multipart field ``image``; at least one."""
    uploads = [(part.filename or "upload", await part.read()) for part in form.getlist("image") if hasattr(part, "read")]
    if not uploads:
        raise ClientError(400, "no image: send one or more files in the multipart field 'image'")
    return uploads


def _check_size(request: Request, limit: int) -> None:
    length = int(request.headers.get("content-length") or 0)
    if length > limit:
        raise ClientError(413, f"the request is {length / 2**20:.1f} MB, over the limit of {limit / 2**20:g} MB")


def _names(options, name: str) -> list[str] | None:
    """A filter's values: a repeatable form field, or a JSON string or list."""
    values = options.getlist(name) if hasattr(options, "getlist") else options.get(name)
    if values is None or values == []:
        return None
    return [values] if isinstance(values, str) else [str(value) for value in values]


def _whole(value, name: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ClientError(400, f"{name}: {value!r} is not a whole number") from None
    if not low <= number <= high:
        raise ClientError(400, f"{name}: must be from {low} to {high}, got {number}")
    return number


def _summary(databases: WarmDatabases, name: str) -> dict:
    try:
        store = databases.store(name)
    except StoreError as exc:  # an older schema's layout, say: named, not read
        return {"name": name, "error": str(exc)}
    return {"name": name, "images": store.count(), "model": store.model_spec.get("description", "")}


def _prepared(preprocess, uploads: list[tuple[str, bytes]]) -> tuple[list[torch.Tensor], list[str]]:
    """The model input and the sha256 of each upload, decoded in memory (nothing of an upload is
    written to disk; a bad one raises its one-line ImageError)."""
    return ([preprocess(decode_image(data, name)) for name, data in uploads],
            [hashlib.sha256(data).hexdigest() for _, data in uploads])


async def _search(warm, uploads: list[tuple[str, bytes]], vectors, k: int, exact: bool, started: float,
                  filters: dict[str, list[str] | None]) -> dict:
    timings = {}
    if uploads:
        with warm.batcher.announced():
            # Decoded in a thread: the event loop goes on reading other requests meanwhile.
            tensors, digests = await asyncio.to_thread(_prepared, warm.extractor.preprocess, uploads)
            decoded = time.perf_counter()
            timings["decode"] = decoded - started
            pending = warm.batcher.submit(torch.stack(tensors))
        found = await asyncio.wrap_future(pending)
        timings["model"] = time.perf_counter() - decoded
        names = [name for name, _ in uploads]
    else:
        found = np.asarray(vectors, dtype=np.float32)
        if found.ndim != 2 or found.shape[1] != warm.store.dim or not np.isfinite(found).all():
            raise ClientError(400, f"vectors: expected rows of {warm.store.dim} finite numbers, got shape "
                                   f"{tuple(found.shape)}")
        found /= np.maximum(np.linalg.norm(found, axis=1, keepdims=True), 1e-12)
        names, digests = [f"vector {i}" for i in range(len(found))], [""] * len(found)
    retrievals, inside = await asyncio.to_thread(warm.answer, found, names, digests, k, exact, filters["label"],
                                                 filters["project"])
    timings.update(search=inside.get("search", 0.0), records=inside.get("records", 0.0))
    timings["total"] = time.perf_counter() - started
    return {"results": [retrieval.to_json() for retrieval in retrievals],
            "timings_ms": {step: round(seconds * 1000, 2) for step, seconds in timings.items()}}

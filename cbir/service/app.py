"""The HTTP API (``/api/v1``) over every database on one Redis: FastAPI, served by uvicorn.

The service keeps no state a second replica would miss: databases, indexes and their changes live
in Redis, so replicas of ``cbir serve`` over the same Redis answer alike. Errors are JSON
``{"error": "..."}`` with the status that says what went wrong; no stack trace reaches a client.
"""
from __future__ import annotations

import asyncio
import time

import redis
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from cbir import __version__, api
from cbir.api import SHOWN_PICTURES
from cbir.errors import CbirError, DatabaseBusyError, ImageError, ModelMismatchError, StoreError
from cbir.images.sources import ImageItem
from cbir.images.thumbnails import MEDIA_TYPE
from cbir.pipeline.ingest import index_images
from cbir.service import audit, page, tokens
from cbir.service.metrics import Metrics
from cbir.service.searching import SEARCH_BODY, answer
from cbir.service.tokens import Holder
from cbir.service.uploads import ClientError, check_size, uploads
from cbir.service.warm import UnknownDatabase, WarmDatabases
from cbir.store.database import VectorStore, database_names
from cbir.store.layout import is_sha256_hex
from cbir.store.redis.connect import connect, describe

MAX_UPLOAD_BYTES = 50 * 2**20


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

    @app.get("/api/v1/whoami")
    def whoami(holder: Holder = reader) -> dict:
        """The name and role of the request's token (``local``, an admin, on a service without tokens)."""
        return {"name": holder.name, "role": holder.role}

    @app.get("/api/v1/databases")
    def list_databases(holder: Holder = reader) -> dict:
        """Every database on this Redis, with its image count and model."""
        return {"databases": [_summary(databases, name) for name in database_names(client)]}

    @app.get("/api/v1/databases/{db}")
    def database(db: str, holder: Holder = reader) -> dict:
        """Images, classes with counts, model, trained index and data version of one database."""
        store = databases.store(db)
        described = api.describe(store)
        info, trained = described.info, described.index
        return {"name": info.name, "images": info.count, "dim": info.dim, "version": info.version,
                "model": info.model_spec.get("description", ""), "fingerprint": info.model,
                "classes": dict(sorted(described.labels.items())),
                "tsne": any(name.startswith("tsne.") for name in store.picture_names()),
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

    @app.get("/api/v1/databases/{db}/tsne", response_class=Response,
             responses={200: {"content": {media: {} for media in set(SHOWN_PICTURES.values())}}})
    def tsne_picture(db: str, holder: Holder = reader) -> Response:
        """The latest t-SNE picture made of the database (by `cbir tsne`)."""
        store = databases.store(db)
        for suffix, media in SHOWN_PICTURES.items():
            if (picture := store.picture(f"tsne{suffix}")) is not None:
                return Response(picture, media_type=media, headers={"Cache-Control": "no-cache"})
        raise ClientError(404, f"no t-SNE picture of '{db}' yet: `cbir tsne --db-name {db}` makes one")

    @app.post("/api/v1/databases/{db}/images", openapi_extra=ADD_BODY)
    async def add_images(db: str, request: Request, holder: Holder = editor) -> dict:
        """Add uploaded images (multipart, field ``image``, repeatable; a zip gives its files) with a
        ``label`` (and a ``project``) to a database, with its own model. Without a label, each file
        of a zip takes the name of the folder holding it, as `add` reads class folders. A stored name
        with other content is a conflict, never replaced. Audited."""
        check_size(request, max_upload_bytes)
        form = await request.form(max_part_size=max_upload_bytes)
        label, project = str(form.get("label") or ""), str(form.get("project") or "")
        items = []
        for upload in await uploads(form, unpacked_limit=ZIP_EXPANSION * max_upload_bytes):
            if not (label or upload.folder):
                raise ClientError(400, f"{upload.name}: no label (send the form field 'label', "
                                       "or a zip of class folders)")
            items.append(ImageItem(name=upload.name, label=label or upload.folder, project=project, data=upload.data,
                                   location=f"{upload.name} (uploaded by {holder.name})"))
        warm = databases.get(db)
        store = databases.store(db, lock_wait=ADD_LOCK_WAIT)
        report = await asyncio.wrap_future(databases.torch.submit(index_images, store, items, warm.extractor,
                                                                  workers=0, progress=False))
        if report.written:
            labels = sorted({item.label for item in items})
            audit.record(store, holder, f"added {report.new} of {len(items)} upload(s) labelled "
                                        f"{audit.listed(labels)}: " + audit.listed([item.name for item in items]))
        return {"new": report.new, "unchanged": report.unchanged, "conflicts": report.conflicts,
                "failures": report.failures}

    @app.delete("/api/v1/databases/{db}/images/{image_id}")
    def forget_image(db: str, image_id: int, holder: Holder = editor) -> dict:
        """Forget a stored image (record, vector, thumbnail): no replica returns it again. Audited."""
        forgotten = _forget(databases.store(db), holder, ids=[image_id])
        if not forgotten["forgotten"]:
            raise ClientError(404, f"no image {image_id} in '{db}'")
        return forgotten

    @app.delete("/api/v1/databases/{db}/images")
    def forget_images(db: str, holder: Holder = editor, name: list[str] = Query(default=[]),
                      label: list[str] = Query(default=[]), sha256: list[str] = Query(default=[])) -> dict:
        """Forget every stored image with one of these names, of one of these labels, or whose
        content has one of these sha256 digests (whatever its name). What matched nothing is
        listed, not an error. Audited."""
        if not (name or label or sha256):
            raise ClientError(400, "nothing to forget: give name, label and/or sha256 (repeatable query parameters)")
        if bad := [digest for digest in sha256 if not is_sha256_hex(digest)]:
            raise ClientError(400, f"sha256: {bad[0]!r} is not 64 hexadecimal digits")
        return _forget(databases.store(db), holder, names=name, labels=label, digests=sha256)

    @app.get("/api/v1/databases/{db}/audit")
    def audit_log(db: str, holder: Holder = editor) -> dict:
        """The latest changes made through the service: who, when, what (newest first)."""
        return {"entries": audit.entries(databases.store(db))}

    @app.post("/api/v1/databases/{db}/search", openapi_extra=SEARCH_BODY)
    async def search(db: str, request: Request, holder: Holder = reader) -> dict:
        """The k nearest stored images of each uploaded image (multipart, field ``image``,
        repeatable: any format ``add`` reads, DICOM too) or of each vector (JSON ``{"vectors": [...]}``),
        with their kNN vote and where the time went. ``label`` and ``project`` (repeatable) search
        among the images of those labels and projects only: k answers wherever k of them are stored.
        ``preview``: a thumbnail of each query image (a data URL), for pages that cannot show its format."""
        started = time.perf_counter()
        return await answer(databases.get(db), request, max_upload_bytes, started)

    page.serve(app)
    return app


def from_environment() -> FastAPI:
    """The app of ``cbir serve``'s workers: its settings from the environment, as every replica reads them."""
    import os

    return create_app(max_upload_bytes=int(os.environ.get("CBIR_MAX_UPLOAD_MB", MAX_UPLOAD_BYTES // 2**20)) * 2**20,
                      require_tokens=os.environ.get("CBIR_REQUIRE_TOKENS") == "1")


ADD_LOCK_WAIT = 30.0  # seconds an upload waits for another writer of the database
ZIP_EXPANSION = 4  # a zip uploaded to add may unpack to this many times the upload limit
ADD_BODY = {"requestBody": {"content": {"multipart/form-data": {"schema": {"type": "object", "properties": {
    "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
    "label": {"type": "string"}, "project": {"type": "string"}}, "required": ["image"]}}}}}


def _forget(store: VectorStore, holder: Holder, **which) -> dict:
    removal = api.remove(store, **which)
    if removal.removed:
        audit.record(store, holder, f"forgot {len(removal.removed)} image(s): "
                                    + audit.listed([f"{r.name} ({r.label})" for r in removal.removed]))
    return {"forgotten": [{"name": r.name, "label": r.label, "project": r.project} for r in removal.removed],
            "missing": {"names": removal.missing_names, "labels": removal.missing_labels,
                        "sha256": [name.removeprefix("sha256:") for name in removal.unmatched]}}


def _summary(databases: WarmDatabases, name: str) -> dict:
    try:
        store = databases.store(name)
    except StoreError as exc:  # an older schema's layout, say: named, not read
        return {"name": name, "error": str(exc)}
    return {"name": name, "images": store.count(), "model": store.model_spec.get("description", "")}

"""`cbir serve`: the web page and HTTP API over every database on one Redis (uvicorn)."""
from __future__ import annotations

import ipaddress
import os

from cbir.cli.flags import COUNT, NON_NEGATIVE
from cbir.errors import CbirError
from cbir.store.redis.connect import URL_ENV

UPLOAD_ENV = "CBIR_MAX_UPLOAD_MB"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    from cbir.models.threads import use_one_arena

    use_one_arena()  # before any thread starts: the model runs off the main thread (see cbir.models.threads)
    import uvicorn

    from cbir.service.tokens import any_tokens
    from cbir.store.redis.connect import connect, describe

    client = connect(args.redis_url)
    guarded = any_tokens(client)
    # Without tokens anyone who reaches the service may search and forget: only this machine may.
    if not guarded and not _loopback(args.host):
        raise CbirError(f"--host {args.host}: without access tokens the service listens on this machine only "
                        "(127.0.0.1, ::1 or localhost); make one with `cbir token create --role admin --name NAME`")

    if args.redis_url:
        os.environ[URL_ENV] = args.redis_url  # the workers' create_app reads it, as replicas would
    os.environ[UPLOAD_ENV] = str(args.max_upload_mb)
    # Reachable from other machines: never open, even should every token be revoked later.
    os.environ["CBIR_REQUIRE_TOKENS"] = "0" if _loopback(args.host) else "1"
    access = "every request needs a token" if guarded else "no tokens: open, listening on this machine only"
    print(f"serving the databases on {describe(client)} at http://{args.host}:{args.port} "
          f"(the page at /, the API under /api/v1, interactive docs at /docs); {access}", flush=True)
    uvicorn.run("cbir.service.app:from_environment", factory=True, host=args.host, port=args.port,
                workers=args.workers or None, log_level="warning")
    return 0


def register(commands) -> None:
    serve = commands.add_parser("serve", help="serve the web page and HTTP API over every database on a Redis",
                                description="An always-on service (FastAPI, uvicorn): a web page at / (search, "
                                            "database, manage), and the HTTP API at /api/v1 (docs at /docs): search "
                                            "by image or vector in milliseconds, add and forget images (tokens with "
                                            "roles, an audit log), /healthz and /metrics. It keeps no state of its "
                                            "own: replicas over the same Redis answer alike.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; another "
                                                           "address only once access tokens exist: cbir token)")
    serve.add_argument("--port", type=COUNT, default=8000, help="default: 8000")
    serve.add_argument("--redis-url", default=None,
                       help=f"Redis URL (default: ${URL_ENV}, else the embedded Redis under $CBIR_HOME)")
    serve.add_argument("--workers", type=NON_NEGATIVE, default=1, help="service processes (default: 1)")
    serve.add_argument("--max-upload-mb", type=COUNT, default=50, help="largest request accepted (default: 50 MB)")
    serve.set_defaults(run=run, after_stop="the service stopped; no database was changed")

"""`cbir token`: access tokens of the service (create, list, revoke)."""
from __future__ import annotations

from cbir.errors import CbirError
from cbir.store.redis.connect import URL_ENV


def run(args) -> int:
    from cbir.service import tokens
    from cbir.store.redis.connect import connect, describe

    client = connect(args.redis_url)
    if args.action == "create":
        if not args.name:
            raise CbirError("cbir token create needs --name (who holds it: the audit log says so)")
        token = tokens.create(client, args.role, args.name)
        print(token)  # alone on stdout, for a script to keep
        print(f"token '{args.name}' ({args.role}) for the service over {describe(client)}: shown only now; "
              "send it as `Authorization: Bearer <token>`", flush=True)
    elif args.action == "revoke":
        if not tokens.revoke(client, args.name or ""):
            raise CbirError(f"no token named {args.name!r} (cbir token list names them)")
        print(f"token '{args.name}' revoked: every replica refuses it from its next request")
    else:
        for holder in sorted(tokens.holders(client), key=lambda h: h.name):
            print(f"{holder.name:<24} {holder.role}")
    return 0


def register(commands) -> None:
    from cbir.service.tokens import ROLES

    token = commands.add_parser("token", help="access tokens of the service: create, list, revoke",
                                description="Tokens with roles for `cbir serve`: reader (search, thumbnails), "
                                            "editor (also add and forget images), admin (also tokens). Kept hashed in "
                                            "Redis; once one exists, every request needs one.")
    token.add_argument("action", choices=("create", "list", "revoke"))
    token.add_argument("--name", default=None, help="who holds the token (create, revoke)")
    token.add_argument("--role", default="reader", choices=ROLES, help="default: reader")
    token.add_argument("--redis-url", default=None,
                       help=f"Redis URL of the service (default: ${URL_ENV}, else the embedded Redis)")
    token.set_defaults(run=run)

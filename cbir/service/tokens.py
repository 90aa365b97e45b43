"""Access tokens of the service, with roles, kept hashed in Redis (so every replica knows them).

``reader``: search, thumbnails, descriptions. ``editor``: also add and forget images. ``admin``: also
tokens. A token is shown once, when made; Redis keeps its sha256 only, so a copy of Redis gives
no one a token. Without any token the service is open, and listens on this machine only.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

from cbir.errors import CbirError
from cbir.store.redis.failures import as_text

TOKENS_KEY = "cbir-service:tokens"  # not under cbir:<db>: tokens belong to the service, not to a database
ROLES = ("reader", "editor", "admin")
PREFIX = "cbir_"  # makes a token recognisable in a leaked log or file


@dataclass(frozen=True)
class Holder:
    name: str
    role: str

    def may(self, role: str) -> bool:
        """Whether this holder's role includes ``role``'s rights."""
        return ROLES.index(self.role) >= ROLES.index(role)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create(client, role: str, name: str) -> str:
    """A new token of ``role``, named ``name`` (for the audit log and revocation); shown only now."""
    if role not in ROLES:
        raise CbirError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    if not name or any(holder.name == name for holder in holders(client)):
        raise CbirError(f"a token needs a name of its own ({name!r} is {'taken' if name else 'empty'})")
    token = PREFIX + secrets.token_urlsafe(24)
    client.hset(TOKENS_KEY, _digest(token), json.dumps({"name": name, "role": role, "created": time.time()}))
    return token


def holders(client) -> list[Holder]:
    return [Holder(**{k: v for k, v in json.loads(as_text(value)).items() if k in ("name", "role")})
            for value in client.hgetall(TOKENS_KEY).values()]


def revoke(client, name: str) -> bool:
    """Revoke the token named ``name``; whether there was one."""
    for digest, value in client.hgetall(TOKENS_KEY).items():
        if json.loads(as_text(value))["name"] == name:
            return bool(client.hdel(TOKENS_KEY, digest))
    return False


def holder_of(client, token: str) -> Holder | None:
    """Who holds ``token``, or None for a token that is not (or no longer) valid."""
    value = client.hget(TOKENS_KEY, _digest(token))
    if value is None:
        return None
    data = json.loads(as_text(value))
    return Holder(name=data["name"], role=data["role"])


def any_tokens(client) -> bool:
    return bool(client.hlen(TOKENS_KEY))

"""API keys with scopes: who may ingest, who may read.

``STREAMREC_API_KEYS`` lists the keys and what each may do, e.g.
``key1:ingest+read,key2:read``. When it is empty the API is open (local development).
Otherwise every request needs a key, sent as ``X-API-Key: <key>`` or
``Authorization: Bearer <key>``, except the probes and documentation in :data:`OPEN_PATHS`:

* ``POST /v1/events`` (and anything under it) needs the ``ingest`` scope;
* every other path needs ``read``;
* no key, or one that is not configured → **401** with ``WWW-Authenticate: Bearer``;
* a known key without the scope → **403**.

The check is an ASGI middleware keyed on the path, so a route added later is protected
by default rather than open until someone remembers a dependency. A presented key is
compared with every configured key by :func:`hmac.compare_digest` and the loop never stops
early, so the answer's timing does not tell how much of a key matched or which key it was
close to.

Examples
--------
>>> keys = ApiKeys.parse("k-ingest:ingest,k-all:ingest+read")
>>> sorted(keys.scopes_of("k-all")), keys.scopes_of("k-ingest"), keys.scopes_of("nope")
(['ingest', 'read'], frozenset({'ingest'}), None)
>>> scope_for("/v1/events"), scope_for("/v1/recommendations"), scope_for("/healthz")
('ingest', 'read', None)
>>> ApiKeys.parse("k1:write")
Traceback (most recent call last):
...
ValueError: STREAMREC_API_KEYS: key 1 has unknown scope(s) write; use ingest, read
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["OPEN_PATHS", "SCOPES", "ApiKeyAuth", "ApiKeys", "scope_for", "security_schemes"]

SCOPES: frozenset[str] = frozenset({"ingest", "read"})

OPEN_PATHS: frozenset[str] = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
     "/openapi.json"}
)
"""Probes, metrics and the API's own documentation: reachable without a key."""


def scope_for(path: str) -> str | None:
    """The scope a path needs (``None``: open)."""
    if path in OPEN_PATHS:
        return None
    if path == "/v1/events" or path.startswith("/v1/events/"):
        return "ingest"
    return "read"


@dataclass(frozen=True)
class ApiKeys:
    """Configured keys and their scopes.

    Parameters
    ----------
    entries
        ``(key bytes, scopes)`` pairs.
    """

    entries: tuple[tuple[bytes, frozenset[str]], ...]

    @classmethod
    def parse(cls, spec: str) -> ApiKeys:
        """Keys from ``key:scope+scope,key:scope``; raises ``ValueError`` on a bad entry."""
        entries: list[tuple[bytes, frozenset[str]]] = []
        for number, raw in enumerate((p.strip() for p in spec.split(",")), start=1):
            if not raw:
                continue
            key, sep, scopes_text = raw.rpartition(":")
            scopes = frozenset(s.strip() for s in scopes_text.split("+") if s.strip())
            if not sep or not key or not scopes:
                raise ValueError(
                    f"STREAMREC_API_KEYS: key {number} must look like key:scope[+scope]"
                )
            unknown = sorted(scopes - SCOPES)
            if unknown:
                raise ValueError(
                    f"STREAMREC_API_KEYS: key {number} has unknown scope(s) "
                    f"{', '.join(unknown)}; use {', '.join(sorted(SCOPES))}"
                )
            entries.append((key.encode(), scopes))
        return cls(tuple(entries))

    def __bool__(self) -> bool:
        return bool(self.entries)

    def scopes_of(self, presented: str | bytes) -> frozenset[str] | None:
        """The scopes of ``presented``, or ``None`` if it is not a configured key."""
        candidate = presented.encode() if isinstance(presented, str) else presented
        found: frozenset[str] | None = None
        for key, scopes in self.entries:
            # No early exit: every key is compared whatever matched before.
            if hmac.compare_digest(candidate, key):
                found = scopes
        return found


def _presented_key(scope: Scope) -> bytes | None:
    bearer: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"x-api-key" and value:
            return value
        if name == b"authorization":
            kind, _, token = value.partition(b" ")
            if kind.lower() == b"bearer" and token.strip():
                bearer = token.strip()
    return bearer


class ApiKeyAuth:
    """ASGI middleware enforcing :func:`scope_for` with ``keys`` (open when empty).

    Parameters
    ----------
    app
        The wrapped application.
    keys
        The configured keys.
    """

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys:
            await self.app(scope, receive, send)
            return
        needed = scope_for(scope["path"])
        if needed is None:
            await self.app(scope, receive, send)
            return
        presented = _presented_key(scope)
        if presented is None:
            await _deny(send, 401, "An API key is required (X-API-Key or Bearer).")
            return
        scopes = self.keys.scopes_of(presented)
        if scopes is None:
            await _deny(send, 401, "Unknown API key.")
            return
        if needed not in scopes:
            await _deny(send, 403, f"This API key lacks the {needed!r} scope.")
            return
        await self.app(scope, receive, send)


async def _deny(send: Send, status: int, detail: str) -> None:
    payload = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def security_schemes() -> dict[str, Any]:
    """OpenAPI ``securitySchemes`` for the two ways of sending a key."""
    return {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                   "description": "A key from STREAMREC_API_KEYS (scope `read` or `ingest`)."},
        "Bearer": {"type": "http", "scheme": "bearer",
                   "description": "The same key as `Authorization: Bearer <key>`."},
    }

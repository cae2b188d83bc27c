"""Request body size limit, enforced before anything parses the body.

Examples
--------
>>> from fastapi import FastAPI
>>> from starlette.testclient import TestClient
>>> app = FastAPI()
>>> app.add_middleware(BodySizeLimit, max_bytes=8)
>>> TestClient(app).post("/", content=b"0123456789").status_code
413
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """ASGI middleware answering 413 to any request whose body exceeds ``max_bytes``.

    A declared ``Content-Length`` is refused without reading a byte; otherwise (chunked
    uploads declare none) bytes are counted as they arrive and reading stops at the limit.
    The accepted body is handed on to the app unchanged, so memory per request stays
    bounded by ``max_bytes``.

    Parameters
    ----------
    app
        The wrapped ASGI application.
    max_bytes
        Largest body accepted, in bytes.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; there is nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()  # later reads only wait for the disconnect
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        payload = json.dumps(
            {"detail": f"Request body exceeds the limit of {self.max_bytes} bytes."}
        ).encode()
        await send({
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                # The rest of the body is never read, so this connection cannot be reused.
                (b"connection", b"close"),
            ],
        })
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

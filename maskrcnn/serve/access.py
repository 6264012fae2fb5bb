"""Per-request bookkeeping as ASGI middleware: an id (echoed as X-Request-ID), one JSON access-log line, and
the request counters and latency histogram of `ServeMetrics`."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any, Awaitable, Callable

from maskrcnn.serve.metrics import ServeMetrics

ACCESS_LOG = logging.getLogger("maskrcnn.serve.access")
# A client's own id is kept when it is short and plain (it goes into log lines and a response header).
CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
CLIENT_CLOSED = 499  # nginx's code for a request whose client left before the answer

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class AccessLog:
    """Wrap an ASGI app: give each HTTP request an id, log it in one line, and count it by route and status.

    Handlers add fields to the line through `request.state.access` (a dict); the id is `request.state.request_id`.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = client_request_id(scope) or uuid.uuid4().hex[:16]
        fields: dict[str, Any] = {}
        scope.setdefault("state", {}).update(request_id=request_id, access=fields)
        response = {"status": CLIENT_CLOSED, "bytes": 0}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            elif message["type"] == "http.response.body":
                response["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            response["status"] = 500
            raise
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(route, str(response["status"])).inc()
            self.metrics.latency.labels(route).observe(seconds)
            client = scope.get("client")
            ACCESS_LOG.info(json.dumps({
                "time": round(time.time(), 3), "id": request_id, "client": client[0] if client else None,
                "method": scope["method"], "path": scope["path"], "status": response["status"],
                "ms": round(seconds * 1000, 1), "bytes_out": response["bytes"], **fields}))


def client_request_id(scope: Scope) -> str | None:
    """Return the request's own X-Request-ID header if it is a plain token of up to 64 characters."""
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if CLIENT_ID.fullmatch(text) else None
    return None

"""The server's guard: an ASGI middleware that checks every request before its body is read or parsed.

In order: the ``Host`` header on a loopback bind (a web page reaching the server through DNS rebinding sends
its own host name: 403), the API key (401; only ``/health`` is open, and it shows details only with the key),
a JSON ``Content-Type`` for bodies (a cross-site form post cannot send one: 415), and the body size (413),
counted while the body is read, so that an oversize body is never held whole nor parsed.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable

from edgespec.server_openai import APIError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
OPEN_PATHS = ("/health",)


def is_loopback(host: str) -> bool:
    """Is a bind address (``127.0.0.1``, ``::1``, ``localhost``) reachable from this machine only?"""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def host_name(header: str) -> str:
    """``Host`` header -> its host name, lower case, without the port (``[::1]:80`` -> ``[::1]``)."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[:h.find("]") + 1] if "]" in h else h
    return h.rsplit(":", 1)[0]


def allowed_hosts(bind: str, extra: tuple[str, ...] = ()) -> frozenset[str] | None:
    """Host names a request may name on this bind: None (any) unless the bind is loopback."""
    if not is_loopback(bind):
        return None
    b = bind.lower()
    b = f"[{b}]" if ":" in b and not b.startswith("[") else b
    return frozenset(LOOPBACK_NAMES + (b,) + tuple(host_name(h) for h in extra))


def key_matches(authorization: str | None, key: str) -> bool:
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class Guard:
    """ASGI middleware: Host, API key, Content-Type and body size, before the app sees the request.
    ``hosts``: allowed host names (None: any); ``key``: the API key (None: open); ``max_body()``: the byte
    limit of a body (read when a request comes: it depends on the loaded model's context)."""

    def __init__(self, app, hosts: frozenset[str] | None, key: str | None, max_body: Callable[[], int]):
        self.app, self.hosts, self.key, self.max_body = app, hosts, key, max_body

    def refuse(self, scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get("host")
        if self.hosts is not None and host is not None and host_name(host) not in self.hosts:
            return APIError(403, f"this server does not answer for the host {host_name(host)!r} (it listens on "
                                 "this machine only; edgespec serve --allow-host adds names)",
                            "permission_error", code="host_not_allowed")
        if self.key and scope.get("path") not in OPEN_PATHS and not key_matches(headers.get("authorization"),
                                                                                   self.key):
            return APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                            code="invalid_api_key")
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            if not is_json(headers.get("content-type")):
                return APIError(415, "the request body must be JSON, sent with 'Content-Type: application/json'",
                                code="unsupported_media_type")
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_body():
                return self.too_large()
        return None

    def too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than the server's limit of {self.max_body()} bytes "
                             "(edgespec serve --max-body)", code="request_too_large")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        err = self.refuse(scope)
        if err is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            body, err = await self.read(receive)
            if err is None:
                receive = replay(body, receive)
        if err is not None:
            return await err.response()(scope, receive, send)
        await self.app(scope, receive, send)

    async def read(self, receive) -> tuple[bytes, APIError | None]:
        """The whole body, or an error as soon as it grows past the limit (or the client leaves)."""
        limit, parts, size = self.max_body(), [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", APIError(400, "the client disconnected while sending the body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", self.too_large()
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts), None


def replay(body: bytes, receive):
    """A ``receive`` that gives the body read already, then the client's own messages (a disconnect)."""
    sent = False

    async def again():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again

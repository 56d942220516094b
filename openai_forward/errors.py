"""Errors made by the proxy itself, in OpenAI's shape so SDKs show the message."""

from __future__ import annotations

from collections.abc import Iterable

import orjson

from openai_forward.types import Send

_KIND = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    502: ("upstream_error", "bad_gateway"),
    503: ("service_unavailable_error", "service_unavailable"),
    504: ("upstream_error", "gateway_timeout"),
}


class ProxyError(Exception):
    """An error answered by the proxy with ``status`` and an OpenAI-style body."""

    status = 502

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


def error_body(status: int, message: str) -> bytes:
    err_type, code = _KIND.get(status, ("proxy_error", str(status)))
    return orjson.dumps({"error": {"message": message, "type": err_type, "code": code}})


def error_start(
    status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> dict[str, object]:
    return {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    }


async def send_error(
    send: Send, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    body = error_body(status, message)
    await send(error_start(status, body, headers))
    await send({"type": "http.response.body", "body": body, "more_body": False})

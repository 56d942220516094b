"""The client address cannot be forged through a trusted proxy: several X-Forwarded-For lines
are one list, and the client is the right-most address that is not a trusted proxy."""

from __future__ import annotations

import asyncio

import httpx
import pytest


async def raw_get(port: int, headers: list[bytes]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(headers) + b"\r\n")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return int(status_line.split()[1])


@pytest.mark.parametrize(
    "headers, allowed",
    [
        # the forged entry a client sent comes first; the trusted proxy appended the real one
        ([b"X-Forwarded-For: 10.0.0.7, 203.0.113.5\r\n"], False),
        # the same, in two header lines: still one list
        ([b"X-Forwarded-For: 10.0.0.7\r\n", b"X-Forwarded-For: 203.0.113.5\r\n"], False),
        # a chain of trusted proxies in front: the first untrusted hop from the right is the client
        ([b"X-Forwarded-For: 203.0.113.5, 127.0.0.2\r\n"], False),
        ([b"X-Forwarded-For: 203.0.113.5\r\n", b"X-Forwarded-For: 10.0.0.7\r\n"], True),
        # Forwarded (RFC 7239) is not read: the peer, a trusted proxy, is not a client
        ([b"Forwarded: for=10.0.0.7\r\n"], True),
    ],
)
async def test_the_right_most_untrusted_address_is_the_client(
    proxy_factory, upstream, headers: list[bytes], allowed: bool
):
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        FORWARDED_ALLOW_IPS="127.0.0.0/8",
        IP_BLACKLIST="203.0.113.0/24",
    )
    status = await raw_get(proxy.port, headers)
    assert status == (200 if allowed else 403)


async def test_per_address_limits_follow_the_same_address(proxy_factory, upstream):
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url,
        FORWARDED_ALLOW_IPS="127.0.0.1",
        REQ_RATE_LIMIT='{"/v1/models": "1/minute"}',
    )
    async with httpx.AsyncClient(base_url=proxy.url) as client:
        first = await client.get("/v1/models", headers={"X-Forwarded-For": "198.51.100.1"})
        # a forged left-most entry does not make a new user
        forged = await client.get(
            "/v1/models", headers={"X-Forwarded-For": "192.0.2.99, 198.51.100.1"}
        )
        other = await client.get("/v1/models", headers={"X-Forwarded-For": "198.51.100.2"})
    assert (first.status_code, forged.status_code, other.status_code) == (200, 429, 200)

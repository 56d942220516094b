"""Our Redis client: the wire format (pure, cut anywhere) and the client against real servers."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from openai_forward.ratelimit.storage import ping_redis
from openai_forward.resp import RedisClient, RedisReplyError, RedisUnavailable, Script
from openai_forward.resp_wire import Address, Parser, RedisProtocolError, encode, parse_url
from openai_forward.settings import ConfigError
from tests.support import free_port

# (stream, replies); an error reply is shown as ("ERR", message)
REPLIES = [
    (b"+OK\r\n", [b"OK"]),
    (b"-ERR wrong number of arguments\r\n", [("ERR", "ERR wrong number of arguments")]),
    (b":0\r\n:-12\r\n:9223372036854775807\r\n", [0, -12, 9223372036854775807]),
    (b"$5\r\nhello\r\n", [b"hello"]),
    (b"$0\r\n\r\n", [b""]),
    (b"$-1\r\n", [None]),
    (b"$4\r\na\r\nb\r\n", [b"a\r\nb"]),  # CRLF inside a bulk string is data
    (b"$3\r\n\x00\xff\r\r\n", [b"\x00\xff\r"]),
    (b"*0\r\n", [[]]),
    (b"*-1\r\n", [None]),
    (b"*3\r\n:1\r\n$-1\r\n$2\r\nab\r\n", [[1, None, b"ab"]]),
    (
        b"*2\r\n*2\r\n+a\r\n*1\r\n:7\r\n*-1\r\n",
        [[[b"a", [7]], None]],
    ),
    (b"*2\r\n-NOSCRIPT x\r\n:1\r\n", [[("ERR", "NOSCRIPT x"), 1]]),
    (
        b"+PONG\r\n$3\r\nabc\r\n:5\r\n*1\r\n$-1\r\n-WRONGTYPE no\r\n",
        [b"PONG", b"abc", 5, [None], ("ERR", "WRONGTYPE no")],
    ),
]


def shown(reply):
    if isinstance(reply, RedisReplyError):
        return ("ERR", str(reply))
    if isinstance(reply, list):
        return [shown(item) for item in reply]
    return reply


def feed_all(chunks: list[bytes]) -> list:
    parser = Parser()
    replies = []
    for chunk in chunks:
        replies += parser.feed(chunk)
    return [shown(reply) for reply in replies]


@pytest.mark.parametrize("stream, expected", REPLIES)
def test_replies_cut_anywhere(stream: bytes, expected: list):
    assert feed_all([stream]) == expected
    assert feed_all([stream[i : i + 1] for i in range(len(stream))]) == expected  # byte by byte
    for cut in range(len(stream) + 1):  # one cut anywhere, empty reads included
        assert feed_all([stream[:cut], b"", stream[cut:]]) == expected, cut
    for first in range(1, len(stream)):  # two cuts anywhere
        for second in range(first, len(stream)):
            chunks = [stream[:first], stream[first:second], stream[second:]]
            assert feed_all(chunks) == expected, (first, second)


def test_a_reply_waits_for_its_last_byte():
    parser = Parser()
    assert parser.feed(b"*2\r\n$3\r\nabc\r\n$2\r\nd") == []
    assert parser.feed(b"e\r") == []
    assert parser.feed(b"\n:1") == [[b"abc", b"de"]]
    assert parser.feed(b"\r\n") == [1]


@pytest.mark.parametrize("stream", [b"?what\r\n", b":12x\r\n", b"$3\r\nabcd\r\n", b"*x\r\n"])
def test_garbage_is_a_protocol_error(stream: bytes):
    with pytest.raises(RedisProtocolError):
        Parser().feed(stream)


def test_commands_are_arrays_of_bulk_strings():
    assert encode(("PING",)) == b"*1\r\n$4\r\nPING\r\n"
    assert encode((b"SET", "kéy", b"v\r\n", 42, -1, 1.5)) == (
        b"*6\r\n$3\r\nSET\r\n$4\r\nk\xc3\xa9y\r\n$3\r\nv\r\n\r\n$2\r\n42\r\n$2\r\n-1\r\n"
        b"$3\r\n1.5\r\n"
    )
    assert encode(("X", 1712345678.123456)) == b"*2\r\n$1\r\nX\r\n$17\r\n1712345678.123456\r\n"
    for wrong in (True, None, [1]):
        with pytest.raises(TypeError):
            encode(("SET", "k", wrong))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url, address",
    [
        ("redis://127.0.0.1:6379/0", Address("127.0.0.1", 6379)),
        ("redis://example", Address("example", 6379)),
        ("redis://:p%40ss@h:7000/3", Address("h", 7000, password="p@ss", db=3)),
        ("redis://me:pw@h/2", Address("h", 6379, username="me", password="pw", db=2)),
        ("redis://h?db=5", Address("h", 6379, db=5)),
        ("rediss://h:6380", Address("h", 6380, tls=True)),
        ("unix:///run/redis.sock?db=4", Address(path="/run/redis.sock", db=4)),
        ("unix://:pw@/tmp/r.sock", Address(path="/tmp/r.sock", password="pw")),
    ],
)
def test_urls(url: str, address: Address):
    assert parse_url(url) == address
    assert "pw" not in str(address) and "ss" not in str(address)


@pytest.mark.parametrize(
    "url", ["redis+sentinel://h/m", "http://h", "redis://h:port", "redis://h/x", "unix://"]
)
def test_unsupported_urls_are_clear_errors(url: str):
    with pytest.raises(ValueError):
        parse_url(url)


# The client against real servers


@pytest.mark.redis
async def test_pipelined_commands_each_get_their_own_reply(redis_server):
    client = RedisClient(redis_server.url)
    key = f"{redis_server.prefix}:n"
    try:
        replies = await asyncio.gather(*[client.execute("INCR", key) for _ in range(500)])
        assert sorted(replies) == list(range(1, 501))
        assert replies == list(range(1, 501))  # written and answered in order
        assert await client.execute("GET", key) == b"500"
        big = os.urandom(300_000)  # a reply that arrives in many reads
        assert await client.execute("SET", f"{key}:big", big, "PX", 60_000) == b"OK"
        gets = await asyncio.gather(*[client.execute("GET", f"{key}:big") for _ in range(5)])
        assert gets == [big] * 5
        with pytest.raises(RedisReplyError, match="WRONGTYPE"):
            await client.execute("LPUSH", key, "x")
        assert await client.execute("INCR", key) == 501  # an error reply keeps the order
    finally:
        await client.close()


@pytest.mark.redis
async def test_commands_sent_while_others_are_in_flight_share_one_write(redis_server):
    client = RedisClient(redis_server.url)
    key = f"{redis_server.prefix}:w"
    try:
        await client.execute("PING")  # connected
        connection = client._connection
        assert connection is not None and connection._transport is not None
        writes: list[bytes] = []
        transport = connection._transport
        real_write = transport.write

        def write(data: bytes) -> None:
            writes.append(bytes(data))
            real_write(data)

        transport.write = write  # type: ignore[method-assign]
        replies = await asyncio.gather(*[client.execute("INCR", key) for _ in range(50)])
        assert replies == list(range(1, 51))
        # the first at once (nothing was in flight), the 49 others together in the same turn
        assert [data.count(b"INCR") for data in writes] == [1, 49]
        assert await client.execute("INCR", key) == 51  # idle again: written at once
        assert len(writes) == 3
    finally:
        await client.close()


@pytest.mark.redis
async def test_a_held_command_that_cannot_be_written_fails_at_once(redis_server):
    client = RedisClient(redis_server.url, timeout=30)
    try:
        await client.execute("PING")
        connection = client._connection
        assert connection is not None and connection._transport is not None
        first = asyncio.ensure_future(client.execute("PING"))  # written at once: in flight
        await asyncio.sleep(0)

        def broken(data: bytes) -> None:
            raise OSError("the socket is gone")

        connection._transport.write = broken  # type: ignore[method-assign]
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match=r"cannot write to Redis.*socket is gone"):
            await client.execute("PING")  # held, then its write fails
        assert time.monotonic() - started < 5  # not at its 30 s deadline
        with pytest.raises(RedisUnavailable):
            await first  # the connection is closed with everything pending on it
        assert await client.execute("PING") == b"PONG"  # a new connection
    finally:
        await client.close()


async def test_an_integer_reply_cut_in_two_reads_is_still_read_whole():
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"PING\r\n")
        writer.write(b":12")  # the quick path for a lone integer must leave this to the parser
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"3\r\n")
        await writer.drain()
        await reader.read()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RedisClient(f"redis://127.0.0.1:{port}")
    try:
        assert await client.execute_encoded(b"*1\r\n$4\r\nPING\r\n") == 123
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


@pytest.mark.redis
async def test_scripts_are_sent_once_and_then_run_by_sha(redis_server):
    client = RedisClient(redis_server.url)
    key = f"{redis_server.prefix}:s"
    # a source no server has seen yet: the first call meets NOSCRIPT
    script = Script(
        client, f"-- {redis_server.prefix}\nreturn redis.call('incrby', KEYS[1], ARGV[1])"
    )
    try:
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [0]
        assert await script([key], [5]) == 5
        assert await client.execute("SCRIPT", "EXISTS", script.sha) == [1]
        assert await asyncio.gather(*[script([key], [1]) for _ in range(3)]) == [6, 7, 8]
        failing = Script(client, "return redis.error_reply('nope')")
        with pytest.raises(RedisReplyError, match="nope"):
            await failing([])
    finally:
        await client.close()


@pytest.mark.redis
async def test_the_database_of_the_url_is_selected(redis_server):
    key = f"{redis_server.prefix}:db"
    other = RedisClient("redis://127.0.0.1:6379/9")
    default = RedisClient(redis_server.url)
    try:
        assert await other.execute("SET", key, "in 9", "PX", 60_000) == b"OK"
        assert await default.execute("GET", key) is None
        assert await other.execute("GET", key) == b"in 9"
    finally:
        await other.execute("DEL", key)
        await other.close()
        await default.close()


@pytest.mark.redis
async def test_auth_from_the_url_and_a_unix_socket(redis_process, tmp_path: Path):
    sock = tmp_path / "r.sock"
    server = redis_process("--requirepass", "s3cret", "--unixsocket", str(sock))
    good = RedisClient(f"redis://:s3cret@127.0.0.1:{server.port}/2")
    unix = RedisClient(f"unix://:s3cret@{sock}?db=2")
    anonymous = RedisClient(f"redis://127.0.0.1:{server.port}")
    wrong = RedisClient(f"redis://:nope@127.0.0.1:{server.port}")
    try:
        assert await good.execute("SET", "k", "v") == b"OK"
        assert await unix.execute("GET", "k") == b"v"  # same database 2
        with pytest.raises(RedisReplyError, match="NOAUTH"):
            await anonymous.execute("GET", "k")
        with pytest.raises(RedisReplyError) as info:
            await wrong.execute("GET", "k")
        assert "nope" not in str(info.value)
        ping_redis(f"redis://:s3cret@127.0.0.1:{server.port}/2")
        with pytest.raises(ConfigError) as refused:
            ping_redis(f"redis://:nope@127.0.0.1:{server.port}/2")
        assert "nope" not in str(refused.value) and "reachable Redis" in str(refused.value)
    finally:
        for client in (good, unix, anonymous, wrong):
            await client.close()


@pytest.mark.redis
async def test_a_burst_opens_one_connection(redis_process):
    server = redis_process()
    client = RedisClient(f"redis://127.0.0.1:{server.port}")
    try:
        await asyncio.gather(*[client.execute("PING") for _ in range(100)])
        clients = await client.execute("CLIENT", "LIST")
        assert isinstance(clients, bytes) and clients.count(b"\n") == 1
    finally:
        await client.close()


async def test_a_silent_server_times_out_every_pending_command():
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = RedisClient(f"redis://127.0.0.1:{port}", timeout=0.3)
    try:
        start = time.monotonic()
        results = await asyncio.gather(
            *[client.execute("INCR", "k") for _ in range(20)], return_exceptions=True
        )
        assert all(isinstance(r, RedisUnavailable) for r in results), results
        assert time.monotonic() - start < 2.0
        with pytest.raises(RedisUnavailable, match="did not answer"):
            await client.execute("PING")  # a new connection, silent too
        assert len(accepted) == 2
    finally:
        await client.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_nothing_listening_is_unavailable_at_once():
    client = RedisClient(f"redis://127.0.0.1:{free_port()}")
    try:
        start = time.monotonic()
        with pytest.raises(RedisUnavailable, match="cannot connect"):
            await client.execute("PING")
        assert time.monotonic() - start < 1.0
    finally:
        await client.close()


@pytest.mark.redis
async def test_a_frozen_redis_times_out_and_the_client_recovers_in_order(redis_process):
    server = redis_process()
    client = RedisClient(f"redis://127.0.0.1:{server.port}", timeout=0.3)
    try:
        assert await client.execute("INCR", "n") == 1
        server.freeze()  # SIGSTOP
        late = await asyncio.gather(
            *[client.execute("INCR", "n") for _ in range(3)], return_exceptions=True
        )
        assert all(isinstance(r, RedisUnavailable) for r in late)
        server.thaw()  # the stale replies go to a closed socket
        count = await client.execute("GET", "n")
        assert count in (b"1", b"2", b"3", b"4")  # the frozen INCRs may or may not have run
        assert await client.execute("INCR", "n") == int(count) + 1  # replies match again
    finally:
        await client.close()


@pytest.mark.redis
async def test_a_restarted_redis_is_unavailable_then_back(redis_process):
    server = redis_process()
    client = RedisClient(f"redis://127.0.0.1:{server.port}")
    try:
        assert await client.execute("SET", "k", "v") == b"OK"
        pending = asyncio.ensure_future(client.execute("BLPOP", "never", 0))
        await asyncio.sleep(0.1)
        server.kill()
        with pytest.raises(RedisUnavailable):
            await pending  # the command in flight fails when the connection goes
        for _ in range(2):
            with pytest.raises(RedisUnavailable):
                await client.execute("GET", "k")
        server.start()
        assert await client.execute("GET", "k") is None  # a new, empty server
        assert await client.execute("SET", "k", "w") == b"OK"
    finally:
        await client.close()


@pytest.mark.redis
async def test_close_fails_what_is_pending(redis_process):
    server = redis_process()
    client = RedisClient(f"redis://127.0.0.1:{server.port}")
    pending = asyncio.ensure_future(client.execute("BLPOP", "never", 0))
    await asyncio.sleep(0.1)
    await client.close()
    with pytest.raises(RedisUnavailable):
        await pending
    with pytest.raises(RedisUnavailable, match="closed"):
        await client.execute("PING")

"""Pure cores fed table-driven inputs: prefix matching, the path guard, the SSE splitter."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openai_forward.paths import is_safe_rest, match_prefix
from openai_forward.sse import (
    EventSplitter,
    event_data,
    parse_data,
    parse_until_done,
    split_stream,
    stream_data,
    stream_payloads,
)


@pytest.mark.parametrize(
    "path, prefix, rest",
    [
        (b"/v1/chat", b"/", b"/v1/chat"),
        (b"/gemini/v1/x", b"/gemini", b"/v1/x"),
        (b"/gemini", b"/gemini", b""),
        (b"/geminix/v1", b"/gemini", None),
        (b"/gem", b"/gemini", None),
        (b"/a/b/c", b"/a/b", b"/c"),
    ],
)
def test_match_prefix(path, prefix, rest):
    assert match_prefix(path, prefix) == rest


@pytest.mark.parametrize(
    "rest, safe",
    [
        (b"", True),
        (b"/v1/chat/completions", True),
        (b"/v1/models/", True),
        (b"/v1/files/file-abc.jsonl", True),
        (b"/v1/a..b", True),
        (b"/v1/..", False),
        (b"/v1/../x", False),
        (b"/v1/%2e%2e/x", False),
        (b"/v1/%2E%2e", False),
        (b"/v1/..%2Fx", False),
        (b"/v1/./x", False),
        (b"//evil.com/x", False),
        (b"/v1//x", False),
        (b"/v1/%2F%2Fevil", False),
        (b"/v1\\..\\x", False),
        (b"/v1/%5c", False),
        (b"/v1/%00", False),
        (b"v1/x", False),
    ],
)
def test_is_safe_rest(rest, safe):
    assert is_safe_rest(rest) is safe


STREAM = b'data: {"a": 1}\n\n: comment\n\ndata: line1\ndata: line2\r\n\r\ndata: [DONE]\n\n'
EVENTS = [
    b'data: {"a": 1}\n\n',
    b": comment\n\n",
    b"data: line1\ndata: line2\r\n\r\n",
    b"data: [DONE]\n\n",
]


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 64, len(STREAM)])
def test_splitter_any_chunking(size):
    splitter = EventSplitter()
    events = []
    for i in range(0, len(STREAM), size):
        events += splitter.feed(STREAM[i : i + size])
    assert events == EVENTS
    assert splitter.flush() == b""


def test_splitter_keeps_unterminated_tail():
    splitter = EventSplitter()
    assert splitter.feed(b"data: 1\n\ndata: 2") == [b"data: 1\n\n"]
    assert splitter.flush() == b"data: 2"


@pytest.mark.parametrize(
    "event, data",
    [
        (b'data: {"a": 1}\n\n', b'{"a": 1}'),
        (b"data:x\n\n", b"x"),
        (b"data: line1\ndata: line2\r\n\r\n", b"line1\nline2"),
        (b": comment\n\n", None),
        (b"event: ping\ndata: [DONE]\n\n", b"[DONE]"),
    ],
)
def test_event_data(event, data):
    assert event_data(event) == data


# (stream body, its events, the data of those events)
STREAMS = [
    pytest.param(
        b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n',
        [b'data: {"a":1}\n\n', b'data: {"b":2}\n\n', b"data: [DONE]\n\n"],
        [b'{"a":1}', b'{"b":2}', b"[DONE]"],
        id="lf",
    ),
    pytest.param(
        b"data: 1\r\n\r\ndata: 2\r\n\r\n",
        [b"data: 1\r\n\r\n", b"data: 2\r\n\r\n"],
        [b"1", b"2"],
        id="crlf",
    ),
    pytest.param(
        b"data: 1\r\rdata: 2\r\r", [b"data: 1\r\r", b"data: 2\r\r"], [b"1", b"2"], id="cr"
    ),
    pytest.param(
        b": keep-alive\n\nevent: ping\n\ndata:x\n\n",
        [b": keep-alive\n\n", b"event: ping\n\n", b"data:x\n\n"],
        [b"x"],
        id="comment-ping-no-space",
    ),
    pytest.param(
        b"id: 7\ndata: line1\ndata: line2\n\n",
        [b"id: 7\ndata: line1\ndata: line2\n\n"],
        [b"line1\nline2"],
        id="multi-line-data",
    ),
    pytest.param(
        b"data: 1\n\ndata: 2",
        [b"data: 1\n\n", b"data: 2"],
        [b"1", b"2"],
        id="unterminated-last",
    ),
    pytest.param(b"data:  padded \n\n", [b"data:  padded \n\n"], [b"padded"], id="whitespace"),
    pytest.param(b"", [], [], id="empty"),
]


def _cuts(body: bytes) -> list[list[bytes]]:
    """``body`` cut at every position, and at every pair of positions."""
    out = [[body]]
    for i in range(len(body) + 1):
        out.append([body[:i], body[i:]])
        for j in range(i, len(body) + 1):
            out.append([body[:i], body[i:j], body[j:]])
    return out


@pytest.mark.parametrize("body, events, data", STREAMS)
def test_stream_split_at_any_place_gives_the_same_events(body, events, data):
    """Fed in chunks cut anywhere (inside a terminator too), the splitter gives the events of
    the whole body; read whole, the body gives the same events and their data."""
    assert split_stream(body) == events
    assert stream_data(split_stream(body)) == data
    assert stream_payloads(body) == data
    for chunks in _cuts(body):
        splitter = EventSplitter()
        found = [event for chunk in chunks for event in splitter.feed(chunk)]
        tail = splitter.flush()
        assert found + ([tail] if tail else []) == events, chunks


@pytest.mark.parametrize(
    "payloads, parsed",
    [
        ([], []),
        ([b'{"a":1}', b"[2]", b'"s"'], [{"a": 1}, [2], "s"]),
        ([b'{"a":1}', b"{oops"], None),
        ([b"1, 2", b"3"], None),  # two values in one event
        ([b""], None),
    ],
)
def test_parse_data_parses_each_payload_as_one_value(payloads, parsed):
    assert parse_data(payloads) == parsed


def _scope(peer: str, forwarded: str | None = None) -> dict:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    return {"client": (peer, 5000), "headers": headers}


@pytest.mark.parametrize(
    "trusted, peer, forwarded, expected",
    [
        (("127.0.0.1",), "127.0.0.1", None, "127.0.0.1"),
        (("127.0.0.1",), "127.0.0.1", "203.0.113.7", "203.0.113.7"),
        (("127.0.0.1",), "10.0.0.9", "203.0.113.7", "10.0.0.9"),  # untrusted peer: ignored
        (("127.0.0.1", "10.0.0.0/8"), "127.0.0.1", "203.0.113.7, 10.1.1.1", "203.0.113.7"),
        (("127.0.0.1",), "127.0.0.1", "198.51.100.1, 203.0.113.7", "203.0.113.7"),  # spoof kept out
        (("*",), "192.0.2.1", "203.0.113.7", "203.0.113.7"),
        (("127.0.0.1",), "127.0.0.1", "127.0.0.1", "127.0.0.1"),
    ],
)
def test_client_address(trusted, peer, forwarded, expected):
    from openai_forward.clientaddr import ClientAddress

    assert ClientAddress(trusted)(_scope(peer, forwarded)) == expected


def test_client_address_is_worked_out_once_per_request():
    from openai_forward.clientaddr import ClientAddress

    resolve = ClientAddress(("127.0.0.1",))
    scope = _scope("127.0.0.1", "203.0.113.7")
    assert resolve(scope) == "203.0.113.7"
    scope["headers"] = [(b"x-forwarded-for", b"198.51.100.1")]
    assert resolve(scope) == "203.0.113.7"


def test_client_address_trust_is_remembered_but_stays_right():
    """Trust is memoized per host (bounded); past the bound it is worked out afresh."""
    from openai_forward.clientaddr import TRUST_MEMO_SIZE, ClientAddress

    resolve = ClientAddress(("10.0.0.0/8",))
    hosts = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(TRUST_MEMO_SIZE + 10)]
    assert all(resolve.is_trusted(host) for host in hosts)
    assert not resolve.is_trusted("192.0.2.1")
    assert not resolve.is_trusted("not-an-address")
    for _ in range(2):  # the second round is answered from the memo
        assert resolve(_scope("10.0.0.1", "203.0.113.7")) == "203.0.113.7"
        assert resolve(_scope("192.0.2.1", "203.0.113.7")) == "192.0.2.1"


_LINES = st.sampled_from(
    [b"data: {}", b"data:1", b"data:  2 ", b"data", b"data: [DONE]", b"id: 3", b"event: x", b": c"]
)
_ENDINGS = st.sampled_from([b"\n", b"\r\n", b"\r"])


@given(st.lists(st.tuples(_LINES, _ENDINGS, st.booleans()), max_size=12), st.booleans())
def test_stream_payloads_is_the_general_reading(lines, same_endings):
    """The shortcut for plain ``data:`` streams gives what splitting into events gives, for any
    mix of fields, blank lines and line endings."""
    body = b"".join(
        line + (b"\n" if same_endings else ending) + (b"\n" if blank else b"")
        for line, ending, blank in lines
    )
    assert stream_payloads(body) == stream_data(split_stream(body))


_EVENTS = st.sampled_from(
    [
        *(b'data: {"a": 1}', b"data:[2]", b"data: [DONE]", b"data: {", b"data: 1, 2"),
        *(b": c", b"id: 4"),
        b'data: {"b":\n 2}',  # one value over two lines: only its first is data
    ]
)


@given(st.lists(st.tuples(_EVENTS, st.booleans()), max_size=8), st.booleans())
def test_parse_until_done_is_the_general_reading(events, ends_done):
    """The shortcut for OpenAI-shaped streams parses what the general reading parses: the data
    before the first [DONE], or None, whatever the events hold (half a value, two values)."""
    body = b"".join(event + (b"\n" if two_lines else b"\n\n") for event, two_lines in events)
    body += b"data: [DONE]\n\n" if ends_done else b""
    payloads = stream_data(split_stream(body))
    general = parse_data(payloads[: payloads.index(b"[DONE]")]) if b"[DONE]" in payloads else None
    assert parse_until_done(body) == general


def test_parse_until_done_takes_openai_streams_and_the_rest():
    openai_shaped = b'data: {"a": 1}\n\ndata: [2]\n\ndata: [DONE]\n\n'
    assert parse_until_done(openai_shaped) == [{"a": 1}, [2]]
    assert parse_until_done(openai_shaped.replace(b"\n", b"\r\n")) == [{"a": 1}, [2]]
    assert parse_until_done(b"data: 1\n\ndata: [DONE]\n\ndata: 2\n\ndata: [DONE]\n\n") == [1]
    assert parse_until_done(b'data: {"a": 1}\n\n') is None
    assert parse_until_done(b"data: 1, 2\n\ndata: [DONE]\n\n") is None
    assert parse_until_done(b'data: {"b":\n 2}\n\ndata: [DONE]\n\n') is None

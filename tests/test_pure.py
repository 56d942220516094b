"""Pure cores fed table-driven inputs: prefix matching, the path guard, the SSE splitter."""

from __future__ import annotations

import pytest

from openai_forward.paths import is_safe_rest, match_prefix
from openai_forward.sse import EventSplitter, event_data


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


def test_client_address_trust_is_remembered_but_stays_right():
    """Trust is memoized per host (bounded); past the bound it is worked out afresh."""
    from openai_forward.clientaddr import _MEMO_SIZE, ClientAddress

    resolve = ClientAddress(("10.0.0.0/8",))
    hosts = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(_MEMO_SIZE + 10)]
    assert all(resolve.is_trusted(host) for host in hosts)
    assert not resolve.is_trusted("192.0.2.1")
    assert not resolve.is_trusted("not-an-address")
    for _ in range(2):  # the second round is answered from the memo
        assert resolve(_scope("10.0.0.1", "203.0.113.7")) == "203.0.113.7"
        assert resolve(_scope("192.0.2.1", "203.0.113.7")) == "192.0.2.1"

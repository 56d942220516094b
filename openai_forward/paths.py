"""Prefix matching and the path-escape guard: which target a path goes to, and whether its rest
stays under that target's base path. Pure functions of bytes."""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes


def match_prefix(path: bytes, prefix: bytes) -> bytes | None:
    """The rest of ``path`` after ``prefix``, matched on a segment boundary, else None.

    ``/gemini`` matches ``/gemini`` and ``/gemini/v1``, never ``/geminix``; ``/`` matches all.
    """
    if prefix == b"/":
        return path
    if path.startswith(prefix):
        rest = path[len(prefix) :]
        if not rest or rest.startswith(b"/"):
            return rest
    return None


_FORBIDDEN = (b"\\", b"\x00", b"\r", b"\n", b"\t")
# What makes a path worth a closer look, in one pass: a percent escape, a backslash, a segment
# that starts with a dot, or an empty segment.
_SUSPECT = re.compile(rb"[%\\]|/\.|//")
_DOTS = (b".", b"..")


def is_safe_rest(rest: bytes) -> bool:
    """Whether appending ``rest`` to a base URL keeps the request on that base URL's path.

    Refuses dot segments (also percent-encoded: ``%2e%2e``, ``..%2f``), empty segments such as
    ``//host``, backslashes, control characters and anything that is not an absolute path.
    """
    if not rest:
        return True
    if not rest.startswith(b"/"):
        return False
    if _SUSPECT.search(rest) is None:
        return True  # the common case; the server already refused raw control characters
    decoded = unquote_to_bytes(rest) if b"%" in rest else rest
    if any(bad in decoded for bad in _FORBIDDEN):
        return False
    segments = decoded.split(b"/")
    if segments[-1] in _DOTS:
        return False
    # Inner segments may be neither empty ("//host") nor dots; a trailing slash is fine.
    return not any(seg in _DOTS or not seg for seg in segments[1:-1])

"""Chat logs (SPEC §9). Not built yet: nothing is written."""

from __future__ import annotations

from openai_forward.exchange import Call, CallKind, Observer
from openai_forward.settings import Settings


class ChatLog:
    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def watches(self, kind: CallKind) -> bool:
        return False

    def request(self, call: Call) -> Observer:
        """Record the request (sets ``call.uid``); the observer records the answer."""
        raise NotImplementedError


def build_chatlog(settings: Settings) -> ChatLog | None:
    return None

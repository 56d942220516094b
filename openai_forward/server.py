"""Starting uvicorn with the production settings, and checks made once before it starts."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from openai_forward.settings import Settings


def check_startup(settings: Settings) -> None:
    """Fail fast, before any worker starts, on configuration that cannot work here.

    Raises :class:`~openai_forward.settings.ConfigError`.
    """
    from openai_forward import cache, chatlog, ratelimit

    ratelimit.check_startup(settings)
    cache.check_startup(settings)
    chatlog.check_startup(settings)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn options the product runs with (tests use the same)."""
    return {
        "loop": "uvloop",
        "http": "httptools",
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
        "timeout_graceful_shutdown": 5,
    }


def serve(settings: Settings, *, host: str, port: int, workers: int) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(
        "openai_forward.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        **uvicorn_options(settings),
    )

"""Starting uvicorn with the production settings, and checks made once before it starts."""

from __future__ import annotations

import copy
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

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
        # X-Forwarded-For is read by ClientAddress, only when the client address is needed.
        "proxy_headers": False,
        "timeout_graceful_shutdown": 5,
    }


def log_config() -> dict[str, Any]:
    """uvicorn's logging setup plus our ``openai_forward`` logger, applied in every worker."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["proxy"] = {
        "()": "uvicorn.logging.DefaultFormatter",
        "fmt": "%(levelprefix)s %(name)s: %(message)s",
    }
    config["handlers"]["proxy"] = {
        "formatter": "proxy",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    config["loggers"]["openai_forward"] = {
        "handlers": ["proxy"],
        "level": "INFO",
        "propagate": False,
    }
    return config


def serve(settings: Settings, *, host: str, port: int, workers: int) -> None:
    uvicorn.run(
        "openai_forward.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        log_config=log_config(),
        **uvicorn_options(settings),
    )

"""Starting uvicorn with the production settings, and checks made once before it starts."""

from __future__ import annotations

import copy
import gc
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.supervisors import Multiprocess

from openai_forward.protocol import ClientBounds, bounded_protocol
from openai_forward.settings import ConfigError, Settings

if TYPE_CHECKING:
    from openai_forward.app import ProxyApp

# Container objects allocated, net, before a young-generation collection (CPython's default is
# 700). A request allocates dozens (headers, the parsed body, chat-log records), nearly all freed
# by reference counting; at the default the collector ran every few requests.
GC_YOUNG_THRESHOLD = 10_000


def check_startup(settings: Settings) -> None:
    """Fail fast, before any worker starts, on configuration that cannot work here.

    Raises :class:`~openai_forward.settings.ConfigError`.
    """
    from openai_forward import cache, chatlog, ratelimit

    ratelimit.check_startup(settings)
    cache.check_startup(settings)
    chatlog.check_startup(settings)
    if settings.proxy is not None and settings.proxy.startswith("socks"):
        try:
            import aiohttp_socks  # noqa: F401
        except ImportError:
            raise ConfigError(
                "PROXY", "socks", 'the SOCKS support: pip install "openai-forward[socks]"'
            ) from None


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn options the product runs with, for a server in this process (tests use the
    same); :func:`serve` names the protocol by import path instead, for its workers."""
    return {
        "loop": "uvloop",
        "http": bounded_protocol(ClientBounds.from_settings(settings)),
        "lifespan": "on",
        "access_log": False,
        "server_header": False,
        # X-Forwarded-For is read by ClientAddress, only when the client address is needed.
        "proxy_headers": False,
        # On SIGTERM: stop accepting, let requests and streams in flight finish this long.
        "timeout_graceful_shutdown": settings.shutdown_timeout,
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


def settle_garbage_collector() -> None:
    """For a worker process about to serve: what exists now (modules, settings, the app) lives as
    long as the process, so it is moved out of the collector's sight (``gc.freeze``), and full
    collections walk only what requests leave behind; young collections run less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def worker_app() -> ProxyApp:
    """What each worker of ``aifd run`` serves: the app from the environment and ``./.env``,
    in a process whose garbage collector is settled for serving."""
    from openai_forward.app import app

    settle_garbage_collector()
    return app


def _exit_0(signum: int, frame: object) -> None:
    sys.exit(0)


class _Config(uvicorn.Config):
    """uvicorn's configuration, making every process it starts exit 0 after a SIGTERM.

    Once its graceful shutdown is done, uvicorn restores the SIGTERM handler that was in place
    before it started and raises the signal again: with the default handler the process dies of
    it (status -15, 143 in a shell; ``docker stop`` and systemd report a failure). Configuring
    logging is the first thing uvicorn does in each process it starts (the server's, and every
    worker's), before it saves those handlers: the handler put in place here exits 0 instead.
    """

    def configure_logging(self) -> None:
        super().configure_logging()
        signal.signal(signal.SIGTERM, _exit_0)


def serve(settings: Settings, *, host: str, port: int, workers: int) -> None:
    config = _Config(
        "openai_forward.server:worker_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        log_config=log_config(),
        **{
            **uvicorn_options(settings),
            # each worker reads its bounds from the environment, as it reads its settings
            "http": "openai_forward.protocol:BoundedProtocol",
        },
    )
    try:
        if workers > 1:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
        else:
            server = uvicorn.Server(config)
            server.run()
            if not server.started:
                sys.exit(3)  # as uvicorn.run: the server could not start
    except KeyboardInterrupt:
        pass


def exec_serve(*, host: str, port: int, workers: int) -> NoReturn:
    """Replace this process (same pid, same environment) with a fresh interpreter that serves.

    The command line's own imports, fire and rich for the banner, would otherwise stay in the
    serving process, which is the only worker with ``--workers 1``: 15 MiB of resident memory
    that serves nothing."""
    sys.stdout.flush()
    sys.stderr.flush()
    code = "from openai_forward.server import main; main()"
    os.execv(sys.executable, [sys.executable, "-c", code, host, str(port), str(workers)])


def main() -> None:
    """Serve with the configuration of the environment and ./.env; host, port and workers
    come as arguments from ``aifd run`` (see :func:`exec_serve`)."""
    host, port, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    try:
        settings = Settings.from_env()
    except ConfigError as exc:  # the environment changed since aifd run checked it
        print(f"aifd: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    serve(settings, host=host, port=port, workers=workers)

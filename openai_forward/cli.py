"""``aifd``: the command line. Builds settings and hands over to the server or the converter."""

from __future__ import annotations

import sys

from openai_forward.settings import ConfigError, Settings


def _fail(message: str) -> None:
    print(f"aifd: {message}", file=sys.stderr)
    raise SystemExit(2)


class Cli:
    """openai-forward: an async reverse proxy for OpenAI-style APIs."""

    def run(self, port: int = 8000, workers: int = 1, host: str = "0.0.0.0") -> None:
        """Serve the proxy (configuration from the environment and ./.env).

        Args:
            port: TCP port to listen on.
            workers: number of worker processes.
            host: address to bind.
        """
        if not isinstance(port, int) or not 0 < port < 65536:
            _fail(f"--port={port!r}: expected a TCP port number 1-65535")
        if not isinstance(workers, int) or workers < 1:
            _fail(f"--workers={workers!r}: expected a whole number >= 1")
        try:
            settings = Settings.from_env()
        except ConfigError as exc:
            _fail(str(exc))
            return
        from openai_forward.server import check_startup, exec_serve

        try:
            check_startup(settings)
        except ConfigError as exc:
            _fail(str(exc))
        from openai_forward.banner import print_banner

        print_banner(settings, workers)
        exec_serve(host=host, port=port, workers=workers)

    def convert(self, log_folder: str | None = None, target_path: str | None = None) -> None:
        """Turn chat logs into JSON files (Log/chat_<name>.json).

        Args:
            log_folder: folder of one prefix's chat logs (default: every folder under ./Log).
            target_path: output file (default: Log/chat_<name>.json).
        """
        from openai_forward.convert import convert

        try:
            convert(log_folder, target_path)
        except (FileNotFoundError, NotADirectoryError, ValueError) as exc:
            _fail(str(exc))


def main() -> None:
    import fire

    fire.Fire(Cli(), name="aifd")


if __name__ == "__main__":
    main()

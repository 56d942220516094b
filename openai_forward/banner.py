"""The start-up banner: one rich panel per target, then the rate-limit panel."""

from __future__ import annotations

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table

from openai_forward.settings import Settings, Target, redacted


def _rows(title: str, rows: list[tuple[str, str]]) -> Panel:
    table = Table(box=None, show_header=False, padding=(0, 1))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for name, value in rows:
        table.add_row(name, value)
    return Panel(table, title=title, title_align="left", box=box.ROUNDED, expand=False)


def _target_panel(target: Target, settings: Settings) -> Panel:
    openai = target.kind == "openai"
    rows = [("base url", target.base_url), ("route prefix", target.prefix)]
    if openai:
        rows.append(("api keys", str(bool(settings.api_keys))))
        rows.append(("forward keys", str(bool(settings.forward_keys))))
        if settings.open_mode:
            rows.append(
                (
                    "[bold red]open mode[/]",
                    "[bold red]UNSAFE: anyone reaching this port spends "
                    "your OPENAI_API_KEY (set FORWARD_KEY)[/]",
                )
            )
        if settings.cache_enabled:
            rows.append(("cache_backend", settings.cache_backend))
            from openai_forward.kinds import KINDS, cached_kinds

            cached = cached_kinds(settings)
            routes = [f"/v1{kind.suffix}" for kind in KINDS if kind in cached]
            rows.append(("cache routes", ", ".join(routes)))
        if settings.log_chat:
            rows.append(("LOG_CHAT", "True"))
    if settings.proxy:
        rows.append(("proxy", "configured"))
    kind = "openai-type" if openai else "general"
    return _rows(f"🤖 {kind} forward", rows)


def _limit_panel(settings: Settings, workers: int) -> Panel:
    backend = settings.req_rate_limit_backend
    limited = bool(settings.req_rate_limit or settings.global_rate_limit)
    rows = [
        ("backend", redacted(backend)),
        ("strategy", settings.rate_limit_strategy),
        ("global rate limit", settings.global_rate_limit or "inf"),
    ]
    if limited and not backend.startswith("memory"):
        fail_open = settings.rate_limit_fail_open
        rows.append(("storage down", "admit (fail open)" if fail_open else "refuse (fail closed)"))
    if backend.startswith("memory") and workers > 1 and limited:
        rows.append(
            (
                "[bold yellow]warning[/]",
                f"[yellow]memory:// with {workers} workers: each worker "
                "counts alone (use redis:// to share)[/]",
            )
        )
    rows += [(f"{route} (req)", limit) for route, limit in settings.req_rate_limit.items()]
    rows += [(f"{route} (token)", limit) for route, limit in settings.token_rate_limit.items()]
    return _rows("⏱️ Rate Limit configuration", rows)


def _server_panel(settings: Settings) -> Panel:
    from openai_forward.protocol import ClientBounds, descriptor_limit

    bounds = ClientBounds.from_settings(settings)
    rows = [
        (
            "client connections",
            f"{bounds.max_connections} per worker (ulimit -n: {descriptor_limit()})",
        ),
        ("upstream connections", f"{settings.upstream_max_connections} per target"),
        ("request head timeout", f"{bounds.head_timeout:g} s"),
        ("request body timeout", f"{bounds.body_timeout:g} s"),
        ("shutdown timeout", f"{settings.shutdown_timeout:g} s"),
    ]
    return _rows("🛡️ Server", rows)


def render(settings: Settings, workers: int = 1) -> Group:
    panels = [_target_panel(t, settings) for t in settings.targets]
    panels.append(_limit_panel(settings, workers))
    panels.append(_server_panel(settings))
    return Group(*panels)


def print_banner(settings: Settings, workers: int = 1, console: Console | None = None) -> None:
    (console or Console()).print(render(settings, workers))

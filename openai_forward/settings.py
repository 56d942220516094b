"""Configuration: read once from the environment and ``./.env``, validated, frozen.

This is the only module that reads ``os.environ``. Every problem is reported as a
:class:`ConfigError` naming the variable, the bad value and what was expected; the CLI turns it
into one line on stderr and exit status 2.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import orjson

TargetKind = Literal["openai", "general"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CACHE_BACKENDS = ("MEMORY", "LMDB", "LEVELDB", "ROCKSDB", "REDIS")
RATE_LIMIT_STRATEGIES = (
    "fixed-window",
    "fixed-window-elastic-expiry",
    "moving-window",
    "sliding-window-counter",
)
# Where request counters may live besides memory:// (limits' Redis storages: plain, TLS, a unix
# socket, Sentinel and Cluster).
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")
# HTTP proxies (CONNECT for https targets), and SOCKS through the [socks] extra.
PROXY_SCHEMES = ("http", "https", "socks4", "socks5", "socks5h")
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


class ConfigError(ValueError):
    """A configuration value that cannot be used. ``str()`` is the one line shown to the user."""

    def __init__(self, variable: str, value: str | None, expected: str) -> None:
        self.variable = variable
        shown = "<hidden>" if value is not None and _is_secret(variable) else repr(value)
        super().__init__(f"{variable}={shown}: expected {expected}")


def _is_secret(variable: str) -> bool:
    return variable.endswith("_KEY")


class Secret:
    """A string whose repr and str never show the value (as starlette's ``Secret``)."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Target:
    """One upstream: requests under ``prefix`` go to ``base_url`` + the rest of the path."""

    base_url: str  # scheme://host[:port][/path], never a trailing slash
    prefix: str  # "/" or "/name[/more]", never a trailing slash
    kind: TargetKind

    @property
    def log_name(self) -> str:
        """Folder name of this target's chat logs: ``openai`` for ``/``, else the prefix."""
        return "openai" if self.prefix == "/" else self.prefix.strip("/").replace("/", "_")


@dataclass(frozen=True)
class Settings:
    targets: tuple[Target, ...]
    api_keys: tuple[Secret, ...] = ()
    forward_keys: tuple[Secret, ...] = ()
    req_rate_limit: Mapping[str, str] = field(default_factory=dict)
    global_rate_limit: str | None = None
    rate_limit_strategy: str = "fixed-window"
    req_rate_limit_backend: str = "memory://"
    rate_limit_fail_open: bool = True
    redis_key_prefix: str = "openai-forward"
    token_rate_limit: Mapping[str, str] = field(default_factory=dict)
    proxy: str | None = None
    upstream_max_connections: int = 100  # open connections per target, at most
    timeout: float = 10.0
    read_timeout: float = 600.0
    max_retries: int = 3
    max_body_size: int = 512 * 1024 * 1024
    log_chat: bool = False
    log_folder: str = "Log"
    cache_chat_completion: bool = False
    cache_embedding: bool = False
    cache_backend: str = "MEMORY"
    cache_root_path_or_url: str = "."
    default_request_caching_value: bool = False
    cache_ttl: float | None = None
    ip_whitelist: tuple[IPNetwork, ...] = ()
    ip_blacklist: tuple[IPNetwork, ...] = ()
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1",)
    cors_allow_origins: tuple[str, ...] = ("*",)
    tz: str | None = None
    api_docs: bool = False  # serve /docs and /openapi.json (the proxy's own routes only)
    shutdown_timeout: float = 30.0  # seconds requests in flight may take to finish on SIGTERM
    client_head_timeout: float = 10.0  # seconds a client has to send a whole request head
    client_body_timeout: float = 60.0  # seconds a request body may stall
    max_client_connections: int | None = None  # None: what fits below the descriptor limit

    @property
    def open_mode(self) -> bool:
        """Real keys are configured but no forward keys: anyone may spend them."""
        return bool(self.api_keys) and not self.forward_keys

    @property
    def cache_enabled(self) -> bool:
        return self.cache_chat_completion or self.cache_embedding

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: str | Path | None = ".env"
    ) -> Settings:
        """Settings from ``environ`` (default ``os.environ``) over the values in ``env_file``."""
        values: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            from dotenv import dotenv_values

            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        values.update(os.environ if environ is None else environ)
        return _parse(_Reader(values))


class _Reader:
    """Typed access to raw string values; every failure is a :class:`ConfigError`."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = values

    def raw(self, name: str) -> str | None:
        value = self._values.get(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def text(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def items(self, name: str) -> list[str]:
        raw = self.raw(name)
        return [item.strip() for item in raw.split(",") if item.strip()] if raw else []

    def flag(self, name: str, default: bool) -> bool:
        raw = self.raw(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(name, raw, "true/false/1/0/yes/no")

    def number(self, name: str, default: float | None, *, minimum: float = 0) -> float | None:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(name, raw, "a number of seconds") from None
        if not value > minimum:  # also refuses NaN
            raise ConfigError(name, raw, f"a number greater than {minimum:g}")
        return value

    def integer(self, name: str, default: int, *, minimum: int) -> int:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(name, raw, "a whole number") from None
        if value < minimum:
            raise ConfigError(name, raw, f"a whole number >= {minimum}")
        return value

    def limit_map(self, name: str) -> dict[str, str]:
        raw = self.raw(name)
        if raw is None:
            return {}
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise ConfigError(
                name, raw, 'JSON like {"/v1/chat/completions": "60/minute"}'
            ) from None
        if not isinstance(parsed, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in parsed.items()
        ):
            raise ConfigError(name, raw, "a JSON object of route to limit string")
        result: dict[str, str] = {}
        for route, limit in parsed.items():
            result[_normalize_route(name, route)] = _check_limit(name, limit)
        return result


def _check_limit(name: str, limit: str) -> str:
    from limits import parse_many

    try:
        parse_many(limit)
    except ValueError:
        raise ConfigError(name, limit, 'a limit like "60/minute" or "10/second;100/hour"') from None
    return limit


def _normalize_route(name: str, route: str) -> str:
    route = route.strip()
    if not route.startswith("/"):
        route = "/" + route
    if route != "/":
        route = route.rstrip("/")
    if "?" in route or "#" in route or "//" in route:
        raise ConfigError(name, route, "a path such as /v1/chat/completions")
    return route


def _normalize_prefix(name: str, prefix: str) -> str:
    prefix = _normalize_route(name, prefix)
    if any(seg in (".", "..") for seg in prefix.split("/")):
        raise ConfigError(name, prefix, "a route prefix such as / or /gemini")
    return prefix


def _keys(values: Iterable[str], variable: str) -> tuple[Secret, ...]:
    """Keys travel in an ``Authorization`` header: visible ASCII only (the value stays hidden)."""
    for value in values:
        if not value.isascii() or not value.isprintable() or " " in value:
            raise ConfigError(variable, value, "keys of visible ASCII characters, comma-separated")
    return tuple(Secret(value) for value in values)


def redacted(url: str) -> str:
    """``url`` without its password, for messages and the banner."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _check_proxy(url: str) -> None:
    parts = urlsplit(url)
    shown = redacted(url)  # the proxy's password never appears in a message
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError("PROXY", shown, "a proxy URL with a valid port") from None
    if parts.scheme not in PROXY_SCHEMES or not parts.hostname:
        raise ConfigError(
            "PROXY", shown, "a proxy URL such as http://host:3128 or socks5://host:1080"
        )


def _check_base_url(name: str, url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, url, "an http(s) URL such as https://api.openai.com")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(name, url, "a URL without query, fragment or credentials")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(name, url, "a URL with a valid port") from None
    return url.rstrip("/")


def _targets(
    reader: _Reader, url_var: str, prefix_var: str, kind: TargetKind, default_url: str | None
) -> list[Target]:
    urls = reader.items(url_var) or ([default_url] if default_url else [])
    prefixes = reader.items(prefix_var)
    if kind == "openai" and not prefixes:
        prefixes = ["/"] * len(urls) if len(urls) == 1 else []
    if urls and len(prefixes) != len(urls):
        raise ConfigError(
            prefix_var,
            reader.raw(prefix_var),
            f"{len(urls)} comma-separated prefix(es), one for each {url_var}",
        )
    if prefixes and not urls:
        raise ConfigError(
            url_var, reader.raw(url_var), f"base URLs for the prefixes in {prefix_var}"
        )
    return [
        Target(_check_base_url(url_var, url), _normalize_prefix(prefix_var, prefix), kind)
        for url, prefix in zip(urls, prefixes, strict=True)
    ]


def _networks(reader: _Reader, name: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in reader.items(name):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ConfigError(
                name, item, "IP addresses or CIDR networks, comma-separated"
            ) from None
    return tuple(networks)


def _trusted_proxies(reader: _Reader) -> tuple[str, ...]:
    items = tuple(reader.items("FORWARDED_ALLOW_IPS") or ["127.0.0.1"])
    for item in items:
        if item != "*":
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ConfigError(
                    "FORWARDED_ALLOW_IPS", item, "IP addresses or CIDR networks, or *"
                ) from None
    return items


def _parse(reader: _Reader) -> Settings:
    targets = _targets(
        reader, "OPENAI_BASE_URL", "OPENAI_ROUTE_PREFIX", "openai", "https://api.openai.com"
    )
    targets += _targets(reader, "EXTRA_BASE_URL", "EXTRA_ROUTE_PREFIX", "general", None)
    seen: set[str] = set()
    for target in targets:
        if target.prefix in seen:
            var = "OPENAI_ROUTE_PREFIX" if target.kind == "openai" else "EXTRA_ROUTE_PREFIX"
            raise ConfigError(var, target.prefix, "each route prefix used once")
        seen.add(target.prefix)

    strategy = reader.text("RATE_LIMIT_STRATEGY", "fixed-window").lower()
    if strategy not in RATE_LIMIT_STRATEGIES:
        raise ConfigError("RATE_LIMIT_STRATEGY", strategy, " or ".join(RATE_LIMIT_STRATEGIES))

    global_limit = reader.raw("GLOBAL_RATE_LIMIT")
    if global_limit is not None and global_limit.lower() in ("inf", "none", "unlimited"):
        global_limit = None
    if global_limit is not None:
        _check_limit("GLOBAL_RATE_LIMIT", global_limit)

    backend = reader.text("REQ_RATE_LIMIT_BACKEND", "memory://")
    if not backend.startswith(("memory://", *REDIS_SCHEMES)):
        raise ConfigError(
            "REQ_RATE_LIMIT_BACKEND", redacted(backend), "memory:// or redis://host:port[/db]"
        )

    cache_backend = reader.text("CACHE_BACKEND", "MEMORY").upper()
    if cache_backend not in CACHE_BACKENDS:
        raise ConfigError("CACHE_BACKEND", cache_backend, " or ".join(CACHE_BACKENDS))
    cache_root = reader.text("CACHE_ROOT_PATH_OR_URL", ".")
    if cache_backend == "REDIS" and not cache_root.startswith(("redis://", "rediss://", "unix://")):
        expected = "a redis:// URL when CACHE_BACKEND=REDIS"
        raise ConfigError("CACHE_ROOT_PATH_OR_URL", redacted(cache_root), expected)

    tz = reader.raw("TZ")
    if tz is not None:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(tz.lstrip(":"))
        except (ValueError, KeyError, OSError):
            raise ConfigError("TZ", tz, "an IANA time zone such as Asia/Shanghai or UTC") from None

    proxy = reader.raw("PROXY")
    if proxy is not None:
        _check_proxy(proxy)

    timeout = reader.number("TIMEOUT", 10.0)
    read_timeout = reader.number("READ_TIMEOUT", 600.0)
    cache_ttl = reader.number("CACHE_TTL", None)
    shutdown_timeout = reader.number("SHUTDOWN_TIMEOUT", 30.0)
    client_head_timeout = reader.number("CLIENT_HEAD_TIMEOUT", 10.0)
    client_body_timeout = reader.number("CLIENT_BODY_TIMEOUT", 60.0)
    assert timeout is not None and read_timeout is not None and shutdown_timeout is not None
    assert client_head_timeout is not None and client_body_timeout is not None

    return Settings(
        targets=tuple(targets),
        api_keys=_keys(reader.items("OPENAI_API_KEY"), "OPENAI_API_KEY"),
        forward_keys=_keys(reader.items("FORWARD_KEY"), "FORWARD_KEY"),
        req_rate_limit=reader.limit_map("REQ_RATE_LIMIT"),
        global_rate_limit=global_limit,
        rate_limit_strategy=strategy,
        req_rate_limit_backend=backend,
        rate_limit_fail_open=reader.flag("RATE_LIMIT_FAIL_OPEN", True),
        redis_key_prefix=reader.text("REDIS_KEY_PREFIX", "openai-forward"),
        token_rate_limit=reader.limit_map("TOKEN_RATE_LIMIT"),
        proxy=proxy,
        upstream_max_connections=reader.integer("UPSTREAM_MAX_CONNECTIONS", 100, minimum=1),
        timeout=timeout,
        read_timeout=read_timeout,
        max_retries=reader.integer("MAX_RETRIES", 3, minimum=0),
        max_body_size=reader.integer("MAX_BODY_SIZE", 512 * 1024 * 1024, minimum=1),
        log_chat=reader.flag("LOG_CHAT", False),
        log_folder=reader.text("LOG_FOLDER", "Log"),
        cache_chat_completion=reader.flag("CACHE_CHAT_COMPLETION", False),
        cache_embedding=reader.flag("CACHE_EMBEDDING", False),
        cache_backend=cache_backend,
        cache_root_path_or_url=cache_root,
        default_request_caching_value=reader.flag("DEFAULT_REQUEST_CACHING_VALUE", False),
        cache_ttl=cache_ttl,
        ip_whitelist=_networks(reader, "IP_WHITELIST"),
        ip_blacklist=_networks(reader, "IP_BLACKLIST"),
        forwarded_allow_ips=_trusted_proxies(reader),
        cors_allow_origins=tuple(reader.items("CORS_ALLOW_ORIGINS") or ["*"]),
        tz=tz,
        api_docs=reader.flag("API_DOCS", False),
        shutdown_timeout=shutdown_timeout,
        client_head_timeout=client_head_timeout,
        client_body_timeout=client_body_timeout,
        max_client_connections=reader.integer("MAX_CLIENT_CONNECTIONS", 0, minimum=0) or None,
    )

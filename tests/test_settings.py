"""Settings parsing and validation: pure, no server."""

from __future__ import annotations

import pytest

from openai_forward.settings import ConfigError, Settings, Target


def parse(**env: str) -> Settings:
    return Settings.from_env(environ=env, env_file=None)


def test_defaults():
    s = parse()
    assert s.targets == (Target("https://api.openai.com", "/", "openai"),)
    assert s.timeout == 10 and s.read_timeout == 600 and s.max_retries == 3
    assert s.rate_limit_strategy == "fixed-window" and s.req_rate_limit_backend == "memory://"
    assert s.cache_backend == "MEMORY" and not s.cache_enabled and not s.log_chat
    assert s.cors_allow_origins == ("*",) and s.forwarded_allow_ips == ("127.0.0.1",)


def test_targets_lists_and_prefixes():
    s = parse(
        OPENAI_BASE_URL="https://api.openai.com/, http://localhost:8080/v1base",
        OPENAI_ROUTE_PREFIX="/, local/",
        EXTRA_BASE_URL="https://generativelanguage.googleapis.com",
        EXTRA_ROUTE_PREFIX="/gemini",
    )
    assert s.targets == (
        Target("https://api.openai.com", "/", "openai"),
        Target("http://localhost:8080/v1base", "/local", "openai"),
        Target("https://generativelanguage.googleapis.com", "/gemini", "general"),
    )
    assert [t.log_name for t in s.targets] == ["openai", "local", "gemini"]


def test_keys_are_secret():
    s = parse(OPENAI_API_KEY="sk-a, sk-b", FORWARD_KEY="fk")
    assert [k.reveal() for k in s.api_keys] == ["sk-a", "sk-b"]
    assert "sk-a" not in repr(s)
    assert not s.open_mode
    assert parse(OPENAI_API_KEY="sk-a").open_mode


@pytest.mark.parametrize(
    "value, expected", [("TRUE", True), ("yes", True), ("0", False), ("No", False)]
)
def test_booleans(value: str, expected: bool):
    assert parse(LOG_CHAT=value).log_chat is expected


def test_limits_and_inf():
    s = parse(
        REQ_RATE_LIMIT='{"/v1/chat/completions": "60/minute;600/hour", "v1/embeddings/": "2 per second"}',
        GLOBAL_RATE_LIMIT="inf",
        RATE_LIMIT_STRATEGY="Moving-Window",
        TOKEN_RATE_LIMIT='{"/v1/chat/completions": "20/second"}',
    )
    assert dict(s.req_rate_limit) == {
        "/v1/chat/completions": "60/minute;600/hour",
        "/v1/embeddings": "2 per second",
    }
    assert s.global_rate_limit is None
    assert s.rate_limit_strategy == "moving-window"


@pytest.mark.parametrize(
    "env, variable, fragment",
    [
        ({"OPENAI_BASE_URL": "ftp://x"}, "OPENAI_BASE_URL", "http(s) URL"),
        ({"OPENAI_BASE_URL": "http://a,http://b"}, "OPENAI_ROUTE_PREFIX", "2 comma-separated"),
        ({"EXTRA_BASE_URL": "http://a"}, "EXTRA_ROUTE_PREFIX", "1 comma-separated"),
        ({"EXTRA_BASE_URL": "http://a", "EXTRA_ROUTE_PREFIX": "/"}, "EXTRA_ROUTE_PREFIX", "once"),
        ({"TIMEOUT": "soon"}, "TIMEOUT", "number of seconds"),
        ({"READ_TIMEOUT": "-1"}, "READ_TIMEOUT", "greater than 0"),
        ({"MAX_RETRIES": "two"}, "MAX_RETRIES", "whole number"),
        ({"LOG_CHAT": "maybe"}, "LOG_CHAT", "true/false"),
        ({"REQ_RATE_LIMIT": "{bad json"}, "REQ_RATE_LIMIT", "JSON"),
        ({"REQ_RATE_LIMIT": '{"/v1/x": "lots"}'}, "REQ_RATE_LIMIT", "limit like"),
        ({"GLOBAL_RATE_LIMIT": "100/fortnight"}, "GLOBAL_RATE_LIMIT", "limit like"),
        ({"RATE_LIMIT_STRATEGY": "leaky"}, "RATE_LIMIT_STRATEGY", "fixed-window"),
        ({"REQ_RATE_LIMIT_BACKEND": "mongodb://x"}, "REQ_RATE_LIMIT_BACKEND", "redis://"),
        ({"CACHE_BACKEND": "sqlite"}, "CACHE_BACKEND", "LMDB"),
        (
            {"CACHE_BACKEND": "redis", "CACHE_ROOT_PATH_OR_URL": "/tmp"},
            "CACHE_ROOT_PATH_OR_URL",
            "redis://",
        ),
        ({"IP_BLACKLIST": "10.0.0.300"}, "IP_BLACKLIST", "CIDR"),
        ({"TZ": "Mars/Olympus"}, "TZ", "time zone"),
        ({"PROXY": "socks9://x"}, "PROXY", "proxy URL"),
        ({"PROXY": "http://"}, "PROXY", "proxy URL"),
        ({"PROXY": "http://user:s3cret@proxy:99999"}, "PROXY", "user:***@proxy"),
    ],
)
def test_bad_values_name_variable_value_and_expectation(env, variable, fragment):
    with pytest.raises(ConfigError) as info:
        parse(**env)
    message = str(info.value)
    assert message.startswith(variable + "=")
    assert fragment in message
    assert "\n" not in message


def test_secret_values_are_not_echoed_in_errors():
    err = ConfigError("OPENAI_API_KEY", "sk-secret", "something")
    assert "sk-secret" not in str(err)


def test_env_file_under_real_environment(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text('LOG_CHAT=true\nTIMEOUT=3\nREQ_RATE_LIMIT={"/v1/x": "1/second"}\n')
    s = Settings.from_env(environ={"TIMEOUT": "7"}, env_file=env_file)
    assert s.log_chat is True
    assert s.timeout == 7  # the real environment wins
    assert dict(s.req_rate_limit) == {"/v1/x": "1/second"}


async def test_redis_fixture_gives_a_private_prefix(redis_server):
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_server.url)
    try:
        await client.set(f"{redis_server.prefix}:probe", b"1")
        assert await client.get(f"{redis_server.prefix}:probe") == b"1"
    finally:
        await client.aclose()


def test_bad_proxy_url_never_shows_its_password():
    with pytest.raises(ConfigError) as info:
        parse(PROXY="ftp://user:s3cret@proxy:1080")
    assert "s3cret" not in str(info.value)
    assert "user:***@proxy" in str(info.value)


@pytest.mark.parametrize(
    "url", ["http://u:p@proxy:3128", "https://proxy:443", "socks5://proxy:1080", "socks5h://p:1"]
)
def test_proxy_schemes(url):
    assert parse(PROXY=url).proxy == url


def test_upstream_connection_cap_and_docs_switch():
    assert parse().upstream_max_connections == 100
    assert parse(UPSTREAM_MAX_CONNECTIONS="8").upstream_max_connections == 8
    with pytest.raises(ConfigError, match="UPSTREAM_MAX_CONNECTIONS"):
        parse(UPSTREAM_MAX_CONNECTIONS="0")
    assert parse().api_docs is False
    assert parse(API_DOCS="true").api_docs is True


@pytest.mark.parametrize("variable", ["OPENAI_API_KEY", "FORWARD_KEY"])
def test_a_key_that_cannot_be_a_header_is_refused_without_showing_it(variable):
    with pytest.raises(ConfigError) as info:
        parse(**{variable: "sk-good,sk-b€d"})
    message = str(info.value)
    assert message.startswith(f"{variable}=<hidden>")
    assert "sk-" not in message

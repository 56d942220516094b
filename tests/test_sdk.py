"""The OpenAI Python SDK as the client, end to end through the proxy."""

from __future__ import annotations

import openai
import pytest

from tests import fake_openai


@pytest.fixture
def sdk_proxy(proxy_factory, upstream):
    fake_openai.install(upstream)
    proxy = proxy_factory(
        OPENAI_BASE_URL=upstream.url, OPENAI_API_KEY="sk-real-secret", FORWARD_KEY="fk-team"
    )
    return proxy


def client(proxy) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="fk-team", max_retries=0)


async def test_chat_non_stream_and_stream(sdk_proxy, upstream):
    async with client(sdk_proxy) as ai:
        answer = await ai.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello there"}]
        )
        stream = await ai.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hello there"}], stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert answer.choices[0].message.content == "echo: hello there"
    assert "".join(parts) == "echo: hello there"
    assert all(r.headers["Authorization"] == "Bearer sk-real-secret" for r in upstream.requests)


async def test_responses_non_stream_stream_and_stream_helper(sdk_proxy, upstream):
    tools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    async with client(sdk_proxy) as ai:
        answer = await ai.responses.create(model="gpt-test", input="hello there")
        stream = await ai.responses.create(model="gpt-test", input="hello there", stream=True)
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        async with ai.responses.stream(
            model="gpt-test",
            input=[{"role": "user", "content": "weather?"}],
            tools=tools,  # type: ignore[arg-type]
        ) as helper:
            final = await helper.get_final_response()
    assert answer.output_text == "".join(deltas) == "echo: hello there"
    call = final.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.arguments == fake_openai.RESPONSE_CALL["arguments"]
    assert all(r.headers["Authorization"] == "Bearer sk-real-secret" for r in upstream.requests)


async def test_embeddings_models_speech_upload_files(sdk_proxy, upstream, tmp_path):
    audio = tmp_path / "a.mp3"
    audio.write_bytes(b"\x00\x01" * 5000)
    async with client(sdk_proxy) as ai:
        emb = await ai.embeddings.create(model="e", input=["abc", "de"])
        models = await ai.models.list()
        speech = await ai.audio.speech.create(model="tts-1", voice="alloy", input="hi")
        text = await ai.audio.transcriptions.create(model="whisper-1", file=audio)
        uploaded = await ai.files.create(file=("a.mp3", audio.read_bytes()), purpose="batch")
    assert [d.embedding for d in emb.data] == [[0.3, 0.5, -0.25], [0.2, 0.5, -0.25]]
    assert [m.id for m in models.data] == ["gpt-test"]
    assert speech.content == fake_openai.SPEECH
    assert text.text == "whisper-1 heard 10000 bytes"
    assert uploaded.bytes == 10000 and uploaded.filename == "a.mp3"


async def test_sdk_sees_upstream_errors_and_proxy_errors(proxy_factory, upstream):
    fake_openai.install(upstream)
    proxy = proxy_factory(OPENAI_BASE_URL=upstream.url, OPENAI_ROUTE_PREFIX="/openai")
    async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="sk-x", max_retries=0) as ai:
        with pytest.raises(openai.NotFoundError) as info:
            await ai.models.list()
    assert "Unknown route" in str(info.value)

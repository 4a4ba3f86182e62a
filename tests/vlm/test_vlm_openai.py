"""The OpenAI-compatible backend against a real loopback chat-completions server (no Ray)."""

from __future__ import annotations

import base64
import logging
import socket

import pytest

from curate.errors import CurateError, RecipeError
from curate.recipe import load_recipe
from curate.stages.mlm_filter import MLMFilterConfig
from curate.vlm.base import Ask
from curate.vlm.openai import Balancer, OpenAIBackend
from curate.vlm.registry import check_backend
from tests.conftest import jpeg_bytes
from tests.vlm.chat_server import ChatServer, score

IMAGE = jpeg_bytes()


def _ask(caption: str, fmt: str = "jpg") -> Ask:
    return Ask(key=caption, image=IMAGE, image_format=fmt, prompt=f'Caption: "{caption}"\nRate it.')


def _backend(urls, **kw) -> OpenAIBackend:
    opts = {"model": "judge-1", "base_url": urls, "retries": 2, "retry_backoff": 0.01, "timeout": 1.0, **kw}
    return OpenAIBackend(MLMFilterConfig(**opts))


@pytest.fixture
def server():
    s = ChatServer().start()
    yield s
    s.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_request_carries_image_model_and_key_but_logs_no_key(server, monkeypatch, caplog):
    monkeypatch.setenv("CURATE_TEST_VLM_KEY", "sk-secret-123")
    caplog.set_level(logging.DEBUG)
    server.behaviour = lambda c, attempt: "http_503" if attempt == 1 else "ok"  # a retry logs a line
    b = _backend(server.base_url, api_key_env="CURATE_TEST_VLM_KEY")
    try:
        [a] = b.generate([_ask("a red square")])
        body = b.payload(_ask("a red square", fmt="png"))
    finally:
        b.close()
    assert a.error is None and a.text.splitlines()[0] == str(score("a red square"))
    assert server.auth == {"Bearer sk-secret-123": 2} and server.models == {"judge-1": 2}
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,") and base64.b64decode(url.split(",", 1)[1]) == IMAGE
    assert body["temperature"] == 0 and body["max_tokens"] == 16
    assert "sk-secret-123" not in caplog.text and "retry" in caplog.text


def test_missing_key_variable_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("CURATE_TEST_VLM_KEY", raising=False)
    cfg = MLMFilterConfig(model="m", api_key_env="CURATE_TEST_VLM_KEY")
    with pytest.raises(CurateError, match="CURATE_TEST_VLM_KEY, which is not set"):
        check_backend(cfg)
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        MLMFilterConfig(model="m", api_key_env="sk-abc123-xyz.")


def test_recipe_rejects_a_bad_base_url(make_recipe):
    path = make_recipe({"source": {"path": "x.parquet"},
                        "stages": [{"use": "mlm_filter", "model": "m", "base_url": "localhost:8000"}]})
    with pytest.raises(RecipeError, match=r"stages\[0\]\.base_url.*not an http\(s\) URL"):
        load_recipe(path)


@pytest.mark.parametrize(("behaviour", "attempts", "error"), [
    (lambda c, n: "http_429" if n == 1 else "ok", 2, None),         # Retry-After honoured, then ok
    (lambda c, n: "http_500" if n <= 2 else "ok", 3, None),         # two 5xx, then ok on the last retry
    (lambda c, n: "http_503", 3, "http_503"),                       # 1 + retries attempts, then give up
    (lambda c, n: "http_400", 1, "http_400"),                       # a client error is not retried
    (lambda c, n: "bad_json", 1, "bad_response"),                   # nor is a malformed reply
])
def test_retries_only_transient_failures(server, behaviour, attempts, error):
    server.behaviour = behaviour
    b = _backend(server.base_url)
    try:
        [a] = b.generate([_ask("x")])
    finally:
        b.close()
    assert (a.error, server.requests) == (error, attempts)
    if error is None:
        assert a.text.startswith(str(score("x")))


def test_slow_server_times_out_and_refused_port_is_connect_error(server):
    server.behaviour = lambda c, n: "slow"
    server.slow_seconds = 2.0
    b = _backend(server.base_url, timeout=0.3, retries=1)
    try:
        [a] = b.generate([_ask("slow one")])
    finally:
        b.close()
    assert a.error == "timeout" and server.requests == 2
    dead = _backend(f"http://127.0.0.1:{_free_port()}/v1", retries=1)
    try:
        [a] = dead.generate([_ask("nobody home")])
    finally:
        dead.close()
    assert a.error == "connect_error"


def test_concurrency_is_bounded_per_worker(server):
    server.behaviour = lambda c, n: "slow"
    server.slow_seconds = 0.2
    b = _backend(server.base_url, concurrency_per_worker=4)
    try:
        answers = b.generate([_ask(f"c{i}") for i in range(16)])
    finally:
        b.close()
    assert all(a.error is None for a in answers)
    assert server.max_in_flight == 4


def test_endpoints_are_balanced_and_a_dead_one_is_routed_around(server):
    other = ChatServer().start()
    try:
        b = _backend([server.base_url, other.base_url])
        try:
            answers = b.generate([_ask(f"b{i}") for i in range(40)])
        finally:
            b.close()
        assert all(a.error is None for a in answers)
        assert server.requests + other.requests == 40 and min(server.requests, other.requests) >= 10
    finally:
        other.stop()
    # one endpoint refuses connections: the retries go to the live one, no row fails
    b = _backend([f"http://127.0.0.1:{_free_port()}/v1", server.base_url], load_balance="round_robin")
    try:
        answers = b.generate([_ask(f"d{i}") for i in range(10)])
    finally:
        b.close()
    assert [a.error for a in answers] == [None] * 10


def test_least_in_flight_prefers_the_idle_endpoint():
    bal = Balancer(["http://a/v1", "http://b/v1", "http://c/v1"], "least_in_flight")
    first = [bal.acquire() for _ in range(3)]
    assert sorted(first) == [0, 1, 2]
    bal.release(1)
    assert bal.acquire() == 1  # the only endpoint with nothing open

"""The OpenAI-compatible server through a real HTTP client: completions, streaming, batching, bad input, disconnects.

The models are untrained tiny LMs (greedy text equality needs no training; their head is sharpened so
that greedy choices are not near-ties, as in test_generate).
"""

import asyncio
import json
import random
import time

import httpx
import pytest
from test_generate import TOK, tiny_lm

from mmeff.encoders.text import ByteTokenizer
from mmeff.generate import Sampling, generate


def one_by_one(model, prompt: str, max_tokens: int) -> str:
    return generate(model, [TOK.encode(prompt)], Sampling(max_new_tokens=max_tokens, temperature=0), TOK).texts[0]


def events(response: httpx.Response) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.fixture(scope="module")
def model():
    return tiny_lm(["gla", "attn"])


def test_completion_chat_models_health(serve, model):
    want = one_by_one(model, "def add(a, b):", 12)
    with serve(model) as (url, engine), httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").json() == {"status": "ok", "model": "tiny", "running": 0, "waiting": 0}
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion" and body["choices"][0]["text"] == want
        assert body["usage"]["prompt_tokens"] == len("def add(a, b):")
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_streaming_equals_the_whole_reply(serve, model):
    request = {"prompt": "import os\n", "max_tokens": 20, "temperature": 0}
    with serve(model) as (url, engine), httpx.Client(base_url=url, timeout=60) as client:
        whole = client.post("/v1/completions", json=request).json()["choices"][0]["text"]
        with client.stream("POST", "/v1/completions", json={**request, "stream": True}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            chunks = events(r)
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole == one_by_one(model, "import os\n", 20)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in chunks[-1]
        chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0}
        whole = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
            chunks = events(r)
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole


@pytest.mark.parametrize("mixer", ["attn", "gla", "mamba2"])
def test_16_concurrent_clients_get_the_one_by_one_greedy_text(serve, mixer):
    model = tiny_lm([mixer, mixer])
    rng = random.Random(0)
    words = "def class return import self lambda yield print for while".split()
    prompts = [" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(16)]
    budgets = [rng.randint(3, 12) for _ in prompts]  # rows leave the batch at different steps
    want = [one_by_one(model, p, m) for p, m in zip(prompts, budgets)]

    async def client(url: str, i: int) -> str:
        await asyncio.sleep(0.01 * i)  # rows join a batch that is already decoding
        request = {"prompt": prompts[i], "max_tokens": budgets[i], "temperature": 0, "stream": i % 2 == 1}
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            if not request["stream"]:
                r = await c.post("/v1/completions", json=request)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]
            text = ""
            async with c.stream("POST", "/v1/completions", json=request) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
            return text

    async def all_clients(url: str) -> list[str]:
        return await asyncio.gather(*(client(url, i) for i in range(16)))

    with serve(model) as (url, engine):
        got = asyncio.run(all_clients(url))
    assert got == want
    assert engine.stats["largest_batch"] > 1 and engine.stats["joined_while_running"] > 0, engine.stats


BAD = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 200}, "max_tokens"),  # past the context of 128
    ({"prompt": "x" * 128}, "prompt"),  # too long a prompt
    ({"prompt": "hi", "max_token": 5}, "max_token"),  # unknown parameter
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({}, "prompt"),
]


@pytest.mark.parametrize("body, field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field(serve, model, body, field):
    with serve(model) as (url, engine), httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field, r.json()
        assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_bad_bodies_and_chat_fields(serve, model):
    with serve(model) as (url, engine), httpx.Client(base_url=url, timeout=60) as client:
        cases = [
            ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "body"),  # not UTF-8
            ("/v1/completions", b'{"prompt": ', 400, "body"),  # not JSON
            ("/v1/completions", b"[1, 2]", 400, "body"),
            ("/v1/completions", json.dumps({"prompt": "a", "model": "gpt-4"}).encode(), 404, "model"),
            ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, "messages"),
            ("/v1/chat/completions", json.dumps({"messages": [{"role": "robot", "content": "a"}]}).encode(), 400, "messages.0.role"),
            ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "x" * 200}]}).encode(), 400, "messages"),
        ]
        for path, raw, status, field in cases:
            r = client.post(path, content=raw, headers={"content-type": "application/json"})
            assert (r.status_code, r.json()["error"]["param"]) == (status, field), (raw, r.text)
        assert client.get("/health").json()["status"] == "ok"


def test_a_client_disconnecting_mid_stream_frees_its_slot(serve, model):
    tokenizer = ByteTokenizer()
    tokenizer.eos_id = -1  # never ends by itself: only the disconnect can end it early
    with serve(model, tokenizer, context=100_000) as (url, engine), httpx.Client(base_url=url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "a", "max_tokens": 90_000, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert client.get("/health").json()["running"] == 1
        deadline = time.monotonic() + 20
        while client.get("/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json()["running"] == 0
        assert client.post("/v1/completions", json={"prompt": "b", "max_tokens": 3}).status_code == 200


def test_a_failing_request_gets_a_500_and_the_server_goes_on(serve, model, monkeypatch):
    from mmeff.serve.engine import Engine

    prefill = Engine._prefill

    def failing(self, seq):
        if seq.prompt == TOK.encode("boom"):
            raise RuntimeError("injected failure")
        prefill(self, seq)

    monkeypatch.setattr(Engine, "_prefill", failing)
    with serve(model) as (url, engine), httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/v1/completions", json={"prompt": "boom", "max_tokens": 3})
        assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
        with client.stream("POST", "/v1/completions", json={"prompt": "boom", "max_tokens": 3, "stream": True}) as r:
            assert "injected failure" in r.read().decode()
        assert client.post("/v1/completions", json={"prompt": "fine", "max_tokens": 3}).status_code == 200

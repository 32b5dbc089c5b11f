"""A real server on 127.0.0.1 (a free port, uvicorn in a thread, always stopped) for the serving tests."""

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn
from test_generate import TOK

from mmeff.serve.app import create_app
from mmeff.serve.engine import Engine


@contextmanager
def serving(model, tokenizer=TOK, context: int = 128, max_batch: int = 32) -> Iterator[tuple[str, Engine]]:
    """(base URL, engine) of a server for `model` while the block runs."""
    engine = Engine(model, tokenizer, max_batch=max_batch)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny", context), log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def serve():
    """The `serving` context manager."""
    return serving


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every serving test runs on one torch thread (tests/conftest.py)."""

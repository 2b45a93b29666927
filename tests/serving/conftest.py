"""The real server for the serving tests: uvicorn on 127.0.0.1 (a free port) in a background thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"


@pytest.fixture(scope="module")
def loop():
    """One event loop for a module's vLLM engine (vLLM binds its output handler to the loop of the first request);
    closed after the engine fixture has shut the engine down."""
    from unitok.serving.vllm_engine import close_loop

    loop = asyncio.new_event_loop()
    yield loop
    close_loop(loop)


class RunningServer:
    """``with RunningServer(app) as s:`` serves ``app`` at ``s.url`` until the block ends (lifespan included)."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def state(self):
        return self.app.state.server

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def wait_for(self, predicate, timeout: float = 30.0) -> dict:
        """Poll /health until ``predicate(health)`` holds; the last health."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if predicate(health):
                return health
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting; last health: {health}")
            time.sleep(0.02)


class HeldEngine:
    """``with HeldEngine(engine):`` the native engine's worker stops inside its next batch (in ``resolve``, before
    any forward) until the block ends, so a test can queue requests behind it deterministically."""

    def __init__(self, engine):
        self.engine = engine
        self.original = engine.resolve
        self.holding = threading.Event()  # the worker is held
        self.released = threading.Event()

    def _resolve(self, model_id):
        if not self.released.is_set():
            self.holding.set()
            self.released.wait(120)
        return self.original(model_id)

    def __enter__(self) -> HeldEngine:
        self.engine.resolve = self._resolve
        return self

    def release(self) -> None:
        self.released.set()

    def __exit__(self, *exc) -> None:
        self.released.set()
        self.engine.resolve = self.original


@pytest.fixture(scope="session")
def held_engine():
    return HeldEngine


@pytest.fixture(scope="session")
def pipeline():
    from unitok.pipeline import UnitokPipeline

    if not (CHECKPOINTS / "gen-next-block" / "config.json").is_file():
        pytest.skip("no bundled generators in checkpoints/")
    return UnitokPipeline.from_pretrained(CHECKPOINTS)


@pytest.fixture(scope="session")
def running_server():
    """The :class:`RunningServer` class, for tests that start a server of their own."""
    return RunningServer


@pytest.fixture(scope="module")
def server(pipeline):
    """The native-backend server over every bundled generator (max_n 8, max_queue 32)."""
    from unitok.serving.server import create_app

    app = create_app(pipeline, backend="native", max_n=8, max_queue=32, draft_model=CHECKPOINTS / "gen-draft")
    with RunningServer(app) as running:
        yield running


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)

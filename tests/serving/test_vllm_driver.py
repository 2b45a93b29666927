"""The in-process vLLM driver's concurrency, with a fake engine in vLLM's ``LLMEngine`` shape (no vllm needed):
requests resolve on the caller's loop, cancelled callers abort their request, a broken engine fails every waiting
and later request with a clear error, shutdown never leaves a caller waiting."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import pytest

from unitok.serving.vllm_engine import InprocessDriver


@dataclass
class FakeOutput:
    request_id: str
    finished: bool
    tokens: list[int]


@dataclass
class FakeEngine:
    """Each request needs ``steps`` steps; ``fail_at`` makes that step raise; ``bad_prompt`` is refused at add."""

    steps: int = 3
    fail_at: int | None = None
    added: list[str] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    left: dict[str, int] = field(default_factory=dict)
    step_count: int = 0
    stepped: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event | None = None  # when set, each step waits for it (so a test can act mid-request)
    shut_down: bool = False

    @property
    def engine_core(self):
        return self

    def shutdown(self):
        self.shut_down = True

    def has_unfinished_requests(self) -> bool:
        return bool(self.left)

    def add_request(self, request_id, prompt, params):
        if prompt["prompt_token_ids"] == [-1]:
            raise ValueError("bad prompt")
        self.added.append(request_id)
        self.left[request_id] = self.steps

    def abort_request(self, request_ids):
        for rid in request_ids:
            self.aborted.append(rid)
            self.left.pop(rid, None)

    def step(self):
        self.stepped.set()
        if self.gate is not None:
            self.gate.wait(5)
        self.step_count += 1
        if self.fail_at is not None and self.step_count >= self.fail_at:
            raise RuntimeError("kernel exploded")
        outputs = []
        for rid in list(self.left):
            self.left[rid] -= 1
            done = self.left[rid] == 0
            if done:
                del self.left[rid]
            outputs.append(FakeOutput(rid, done, [self.step_count]))
        return outputs


def _driver(engine: FakeEngine) -> InprocessDriver:
    return InprocessDriver(None, build=lambda args: engine)


def test_concurrent_requests_resolve_with_their_own_output():
    engine = FakeEngine(steps=3)
    driver = _driver(engine)

    async def run():
        return await asyncio.gather(*(driver.run([i], None, f"r{i}") for i in range(5)))

    outputs = asyncio.run(run())
    assert [o.request_id for o in outputs] == [f"r{i}" for i in range(5)]
    assert all(o.finished for o in outputs) and driver.in_flight == 0
    driver.shutdown()
    assert engine.shut_down and not driver.alive


def test_idle_driver_does_not_step():
    engine = FakeEngine()
    driver = _driver(engine)
    assert not engine.stepped.wait(0.2)  # blocked on its queue, not spinning through step()
    driver.shutdown()
    assert engine.step_count == 0


def test_cancelled_caller_aborts_its_request():
    engine = FakeEngine(steps=1000)
    engine.gate = threading.Event()
    driver = _driver(engine)

    async def run():
        task = asyncio.ensure_future(driver.run([1], None, "slow"))
        await asyncio.get_running_loop().run_in_executor(None, engine.stepped.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        engine.gate.set()
        engine.steps = 2
        return await driver.run([2], None, "next")

    assert asyncio.run(run()).request_id == "next"
    assert engine.aborted == ["slow"] and driver.in_flight == 0
    driver.shutdown()


def test_refused_request_gets_its_error_and_the_engine_goes_on():
    driver = _driver(FakeEngine())

    async def run():
        with pytest.raises(ValueError, match="bad prompt"):
            await driver.run([-1], None, "bad")
        return await driver.run([1], None, "good")

    assert asyncio.run(run()).finished
    driver.shutdown()


def test_broken_engine_fails_waiting_and_later_requests():
    engine = FakeEngine(steps=10, fail_at=2)
    driver = _driver(engine)

    async def run():
        results = await asyncio.gather(*(driver.run([i], None, f"r{i}") for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and "kernel exploded" in str(r) for r in results)
        with pytest.raises(RuntimeError, match="engine stopped: kernel exploded"):
            await driver.run([1], None, "later")

    asyncio.run(run())
    assert not driver.alive and engine.shut_down
    driver.shutdown()  # idempotent on a dead driver


def test_shutdown_fails_running_requests_instead_of_leaving_them_waiting():
    engine = FakeEngine(steps=10_000)
    engine.gate = threading.Event()
    driver = _driver(engine)

    async def run():
        task = asyncio.ensure_future(driver.run([1], None, "long"))
        await asyncio.get_running_loop().run_in_executor(None, engine.stepped.wait, 5)
        stopper = asyncio.get_running_loop().run_in_executor(None, driver.shutdown)
        engine.gate.set()
        await stopper
        with pytest.raises(RuntimeError, match="shut down"):
            await asyncio.wait_for(task, 5)
        with pytest.raises(RuntimeError, match="shut down"):
            await driver.run([2], None, "after")

    asyncio.run(run())


def test_build_failure_raises_from_the_constructor():
    def build(args):
        raise ValueError("no model here")

    with pytest.raises(ValueError, match="no model here"):
        InprocessDriver(None, build=build)

"""The server with the vLLM backend (next-token), started as ``unitok serve`` in a subprocess; needs vllm."""

from __future__ import annotations

import base64
import io
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from unitok.bench.serving import ServerProcess
from unitok.serving.server import vllm_importable

CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not vllm_importable(), reason="vllm does not import here"),
]


@pytest.fixture(scope="module")
def vllm_server():
    extra = ["--enforce-eager"]  # starts in ~20 s; the compiled engine is what `unitok bench serving` measures
    with ServerProcess(CHECKPOINTS / "gen-next-token", "vllm", max_n=4, max_queue=8, extra_args=extra) as server:
        yield server


def test_images_through_vllm(vllm_server):
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="x", max_retries=0, timeout=300)
    health = httpx.get(f"{vllm_server.url}/health").json()
    assert health["models"] == {"gen-next-token": "vllm"}
    assert health["vllm"]["gen-next-token"] == {
        "guidance_scale": 3.0,
        "per_request_guidance": False,
        "speculative_tokens": 0,
        "alive": True,
        "restarting": False,
        "restarts": 0,
    }
    out = client.images.generate(model="gen-next-token", prompt="sneaker", n=2, extra_body={"seed": 5})
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in out.data]
    assert [im.size for im in images] == [(28, 28), (28, 28)] and out.seed == 5
    # image 1 of seed 5 is image 0 of seed 6 (vLLM's parallel sampling), and seeds reproduce
    again = client.images.generate(model="gen-next-token", prompt="sneaker", extra_body={"seed": 6})
    assert again.data[0].b64_json == out.data[1].b64_json
    tokens = client.completions.create(model="gen-next-token", prompt=["bag", "coat"], n=2, seed=1)
    assert len(tokens.choices) == 4 and all(len(c.text.split()) == 49 for c in tokens.choices)
    # another guidance scale than the engine's runs on the native engine
    client.images.generate(model="gen-next-token", prompt="bag", extra_body={"guidance_scale": 1.5, "seed": 0})
    counters = httpx.get(f"{vllm_server.url}/health").json()["counters"]
    assert counters["vllm_requests"] == 3 and counters["native_requests"] == 1
    with pytest.raises(openai.BadRequestError, match="never saw"):
        client.images.generate(model="gen-next-token", prompt="spaceship")


def test_completion_logprobs_are_the_guided_distribution(vllm_server):
    """Through the live server: the log-prob of every sampled token is the HF model's guided log-prob of it, for the
    request's own class (and not another class's)."""
    import openai
    import torch

    from unitok.decoding.cfg import next_token_guided_logprobs
    from unitok.model.pretrained import load_generator

    gen = load_generator(CHECKPOINTS / "gen-next-token")
    client = openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="x", max_retries=0, timeout=300)
    out = client.completions.create(model="gen-next-token", prompt=["bag", "sneaker"], seed=4, logprobs=2)
    tokens = torch.tensor([[int(t) for t in c.text.split()] for c in out.choices])
    served = torch.tensor([c.logprobs.token_logprobs for c in out.choices])
    for choice, row in zip(out.choices, tokens, strict=True):
        assert choice.logprobs.tokens == [str(int(t)) for t in row]
        assert all(len(top) == 2 and max(top.values()) <= 0 for top in choice.logprobs.top_logprobs)
    reference = next_token_guided_logprobs(gen, ["bag", "sneaker"], tokens, 3.0).gather(-1, tokens[..., None])[..., 0]
    assert (served - reference).abs().max() < 1e-2
    swapped = next_token_guided_logprobs(gen, ["sneaker", "bag"], tokens, 3.0).gather(-1, tokens[..., None])[..., 0]
    assert (served - swapped).abs().max() > 0.1


def test_streamed_previews_through_vllm(vllm_server):
    """stream=true on the vLLM backend: previews from vLLM's tokens so far, then the image a plain request with the
    same seed gets."""
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="x", max_retries=0, timeout=300)
    before = httpx.get(f"{vllm_server.url}/health").json()["counters"]
    stream = client.images.generate(
        model="gen-next-token", prompt="dress", stream=True, partial_images=3, extra_body={"seed": 11}
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    previews = [Image.open(io.BytesIO(base64.b64decode(e.b64_json))) for e in events]
    assert all(p.size == (28, 28) for p in previews) and len({p.tobytes() for p in previews}) == 4
    rows = [sum(1 for y in range(28) if any(p.convert("L").getpixel((x, y)) for x in range(28))) for p in previews[:3]]
    assert rows == sorted(rows)  # previews cover more rows as tokens arrive
    whole = client.images.generate(model="gen-next-token", prompt="dress", extra_body={"seed": 11})
    assert events[-1].b64_json == whole.data[0].b64_json
    after = httpx.get(f"{vllm_server.url}/health").json()["counters"]
    assert (
        after["vllm_requests"] == before["vllm_requests"] + 2 and after["native_requests"] == before["native_requests"]
    )


def test_server_runs_in_the_callers_session(vllm_server):
    """Regression: ``ServerProcess`` used ``start_new_session``, which made the server (with vLLM's busy-polling engine
    core and worker) its own scheduler autogroup; on 2 cores it starved the benchmark's clients for seconds
    (``unitok bench serving``: errors, 6-8 images/s, p99 7 s). Its own process group (so it can be stopped whole),
    the caller's session."""
    pid = vllm_server.proc.pid
    assert os.getpgid(pid) == pid
    assert os.getsid(pid) == os.getsid(0)


def _engine_core_pid(server_pid: int) -> int:
    """vLLM's engine core: the child process of the server named ``VLLM::EngineCore``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == server_pid and b"EngineCore" in cmdline:
            return int(proc.name)
    raise AssertionError("no vLLM engine core under the server")


def _niceness(pid: int) -> set[int]:
    """The niceness of every thread of ``pid`` (Linux keeps it per thread)."""
    return {os.getpriority(os.PRIO_PROCESS, int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()}


def test_engine_core_yields_to_the_request_path(vllm_server):
    """``unitok serve`` raises the engine core's niceness by VLLM_ENGINE_NICE (every thread: the torch threads that
    run the forwards too), so HTTP handling and pixel decoding in the server process go first."""
    from unitok.serving.server import VLLM_ENGINE_NICE

    server = os.getpriority(os.PRIO_PROCESS, vllm_server.proc.pid)
    assert _niceness(_engine_core_pid(vllm_server.proc.pid)) == {min(19, server + VLLM_ENGINE_NICE)}


def test_a_dead_vllm_engine_fails_over_to_native_and_restarts(vllm_server):
    """vLLM's engine core dies (killed here) while a request runs on it: that request and those that follow are
    served by the native engine while vLLM restarts in the background (what only vLLM can do, logprobs, is a 503
    meanwhile), then vLLM serves again."""
    import signal
    import threading

    import httpx
    import openai

    def health() -> dict:
        return httpx.get(f"{vllm_server.url}/health").json()

    client = openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="x", max_retries=0, timeout=300)
    prompts = ["bag", "coat", "sneaker", "boot"]  # 4 images, the server's max_n
    result = {}
    running = threading.Thread(
        target=lambda: result.update(out=client.completions.create(model="gen-next-token", prompt=prompts))
    )
    running.start()
    deadline = time.monotonic() + 30
    while health()["in_flight"] == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    os.kill(_engine_core_pid(vllm_server.proc.pid), signal.SIGKILL)
    running.join(120)
    assert len(result["out"].choices) == 4 and all(len(c.text.split()) == 49 for c in result["out"].choices)
    state = health()
    assert state["counters"]["vllm_failovers"] == 1
    assert state["vllm"]["gen-next-token"]["restarting"] and state["vllm"]["gen-next-token"]["restarts"] == 1
    native = state["counters"]["native_requests"]
    assert client.images.generate(model="gen-next-token", prompt="sneaker", extra_body={"seed": 1}).data[0].b64_json
    with pytest.raises(openai.InternalServerError, match="logprobs need vLLM"):
        client.completions.create(model="gen-next-token", prompt="bag", logprobs=1)
    assert health()["counters"]["native_requests"] == native + 1
    deadline = time.monotonic() + 300
    while not health()["vllm"]["gen-next-token"]["alive"]:
        assert time.monotonic() < deadline, "vLLM did not come back"
        time.sleep(0.5)
    before = health()["counters"]
    out = client.completions.create(model="gen-next-token", prompt="bag", seed=2, logprobs=1)
    assert len(out.choices[0].logprobs.token_logprobs) == 49
    after = health()
    assert after["counters"]["vllm_requests"] == before["vllm_requests"] + 1
    server = os.getpriority(os.PRIO_PROCESS, vllm_server.proc.pid)
    assert _niceness(_engine_core_pid(vllm_server.proc.pid)) == {min(19, server + 5)}  # the new one yields too
    assert after["vllm"]["gen-next-token"] == {
        "guidance_scale": 3.0,
        "per_request_guidance": False,
        "speculative_tokens": 0,
        "alive": True,
        "restarting": False,
        "restarts": 1,
    }


def test_serve_speculates_inside_vllm_with_a_draft(capsys):
    """``unitok serve --vllm-draft``: vLLM's engine proposes with the draft model; seeded images reproduce (argmax
    drafts), /health says how many tokens it drafts; bad combinations are refused before anything starts."""
    import httpx
    import openai

    from unitok.cli import main

    draft = str(CHECKPOINTS / "gen-draft")
    for args, message in (
        (["--backend", "native", "--vllm-draft", draft], "needs --backend vllm"),
        (["--per-request-guidance", "--vllm-draft", draft], "does not combine"),
        (["--vllm-draft", str(CHECKPOINTS / "nowhere")], "no draft model"),
        (["--vllm-draft", draft, "--vllm-draft-tokens", "0"], "num_speculative_tokens"),
    ):
        assert main(["serve", str(CHECKPOINTS / "gen-next-token"), *args]) == 2
        assert message in capsys.readouterr().err
    extra = ["--enforce-eager", "--vllm-draft", draft, "--vllm-draft-tokens", "2"]
    with ServerProcess(CHECKPOINTS / "gen-next-token", "vllm", max_n=4, max_queue=8, extra_args=extra) as server:
        health = httpx.get(f"{server.url}/health").json()
        assert health["vllm"]["gen-next-token"]["speculative_tokens"] == 2
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=300)
        first = client.images.generate(model="gen-next-token", prompt="bag", n=2, extra_body={"seed": 11})
        again = client.images.generate(model="gen-next-token", prompt="bag", n=2, extra_body={"seed": 11})
        assert [d.b64_json for d in first.data] == [d.b64_json for d in again.data]
        assert httpx.get(f"{server.url}/health").json()["counters"]["vllm_requests"] == 2

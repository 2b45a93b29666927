"""The OpenAI-compatible server, started for real on 127.0.0.1 and called with the official ``openai`` client."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from unitok.serving.server import create_app


def _png(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image


def _tokens(choice_text: str) -> list[int]:
    return [int(t) for t in choice_text.split()]


def test_models_and_health(server, client):
    ids = {m.id for m in client.models.list().data}
    assert {"gen-next-token", "gen-next-scale", "gen-next-block", "gen-video-next-block"} <= ids
    card = client.models.retrieve("gen-next-block")
    assert card.id == "gen-next-block" and card.mode == "next-block" and card.size == "28x28"
    assert "sneaker" in card.classes
    health = server.health()
    assert health["status"] == "ok" and health["models"]["gen-next-token"] == "native"


def test_images_with_the_openai_client(client, pipeline):
    out = client.images.generate(
        model="gen-next-block",
        prompt="sneaker",
        n=2,
        response_format="b64_json",
        extra_body={"guidance_scale": 3, "seed": 1, "mode": "next-block", "decoder": "block"},
    )
    images = [_png(d.b64_json) for d in out.data]
    assert len(images) == 2 and all(im.size == (28, 28) and im.mode == "L" for im in images)
    # the same request through the pipeline alone gives the same pixels (seeds are per request)
    expected = pipeline("sneaker", num_images=2, mode="next-block", guidance_scale=3.0, seed=1).images
    for got, want in zip(images, expected, strict=True):
        assert got.tobytes() == want.tobytes()


def test_image_size_class_index_and_url(client):
    out = client.images.generate(
        model="gen-next-scale", prompt="", size="56x56", response_format="url", extra_body={"class": 7, "seed": 0}
    )
    assert out.data[0].url.startswith("data:image/png;base64,")
    assert _png(out.data[0].url.split(",", 1)[1]).size == (56, 56)
    assert out.size == "56x56"


@pytest.mark.parametrize("mode", ["next-block", "next-scale", "next-token"])
def test_completions_equal_the_pipeline(client, pipeline, mode):
    out = client.completions.create(model=f"gen-{mode}", prompt="bag", n=2, seed=3, extra_body={"guidance_scale": 2.0})
    assert [c.index for c in out.choices] == [0, 1]
    tokens = torch.tensor([_tokens(c.text) for c in out.choices])
    expected = pipeline("bag", num_images=2, mode=mode, guidance_scale=2.0, seed=3).tokens
    assert torch.equal(tokens, expected)
    assert out.usage.completion_tokens == tokens.numel()


def test_completions_with_a_speculative_decoder(client, pipeline):
    out = client.completions.create(
        model="gen-next-token", prompt="trouser", seed=5, extra_body={"decoder": "sjd", "window": 4}
    )
    expected = pipeline("trouser", mode="next-token", seed=5, decoder="sjd", window=4).tokens
    assert torch.equal(torch.tensor([_tokens(out.choices[0].text)]), expected)


def test_video_gif(server, client):
    body = {"model": "gen-video-next-block", "prompt": "coat", "seed": 0, "fps": 4}
    out = client.post("/videos/generations", body=body, cast_to=httpx.Response).json()
    assert len(out["data"]) == 1 and out["size"] == "32x32" and out["seed"] == 0
    gif = Image.open(io.BytesIO(base64.b64decode(out["data"][0]["b64_gif"])))
    assert gif.format == "GIF" and gif.size == (32, 32) and gif.n_frames == out["data"][0]["frames"] == 8


def test_video_mp4_holds_the_same_frames(server, client):
    av = pytest.importorskip("av")
    body = {"model": "gen-video-next-block", "prompt": "coat", "seed": 0, "fps": 4, "size": "64x64"}
    gif_out = client.post("/videos/generations", body=body, cast_to=httpx.Response).json()
    mp4_out = client.post("/videos/generations", body={**body, "response_format": "b64_mp4"}, cast_to=httpx.Response)
    data = mp4_out.json()["data"][0]
    assert data["frames"] == 8 and data["b64_gif"] is None
    with av.open(io.BytesIO(base64.b64decode(data["b64_mp4"]))) as container:
        stream = container.streams.video[0]
        assert container.format.name.startswith("mov,mp4") and stream.codec_context.name == "h264"
        assert (stream.width, stream.height) == (64, 64) and stream.average_rate == 4
        frames = np.stack([f.to_ndarray(format="gray") for f in container.decode(video=0)])
    gif = Image.open(io.BytesIO(base64.b64decode(gif_out["data"][0]["b64_gif"])))
    reference = []
    for i in range(gif.n_frames):
        gif.seek(i)
        reference.append(np.asarray(gif.convert("L")))
    assert frames.shape == (8, 64, 64)
    assert np.abs(frames.astype(int) - np.stack(reference)).mean() < 4  # H.264 at CRF 12: near lossless


def test_mp4_without_pyav_is_a_400(server, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "av", None)  # import av -> ImportError
    body = {"model": "gen-video-next-block", "prompt": "coat", "response_format": "b64_mp4"}
    response = _post(server, "/v1/videos/generations", json.dumps(body))
    assert response.status_code == 400 and "needs PyAV" in response.json()["error"]["message"]
    assert server.health()["status"] == "ok"


def _post(server, path: str, content: bytes | str, headers: dict | None = None) -> httpx.Response:
    headers = {"content-type": "application/json", **(headers or {})}
    return httpx.post(f"{server.url}{path}", content=content, headers=headers, timeout=30)


BAD_IMAGE_REQUESTS = [
    ({"prompt": "sneaker", "n": 9}, "n must be in [1, 8]"),
    ({"prompt": "sneaker", "n": 0}, "n must be in [1, 8]"),
    ({"prompt": "spaceship"}, "never saw"),
    ({"prompt": "", "class": 12}, "class index 12 is outside"),
    ({"prompt": "sneaker", "mode": "next-pixel"}, "mode"),
    ({"prompt": "sneaker", "decoder": "magic"}, "decoder"),
    ({"prompt": "sneaker", "mode": "next-block", "decoder": "sjd"}, "decodes next-token models"),
    ({"prompt": "sneaker", "model": "gen-next-scale", "decoder": "hf"}, "decodes next-token models"),
    ({"prompt": "sneaker", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "sneaker", "top_p": 0}, "top_p"),
    ({"prompt": "sneaker", "seed": -3}, "seed"),
    ({"prompt": "sneaker", "size": "100x100"}, "size '100x100' is not supported"),
    ({"prompt": "sneaker", "response_format": "png"}, "response_format"),
    ({"prompt": "sneaker", "colour": "red"}, "colour"),
    ({"prompt": "sneaker", "window": 4}, "takes no option"),
    ({"prompt": "sneaker", "model": "gen-video-next-block"}, "/v1/videos/generations"),
    ({"prompt": "sneaker", "mode": "next-token", "model": "gen-next-block"}, "not next-token"),
    ({"n": 1}, "prompt"),
    ({"prompt": "x" * 300}, "at most 256"),
    ({"prompt": "bag", "stream": True, "n": 2}, "one image (n=1)"),
    ({"prompt": "bag", "stream": True, "partial_images": 100}, "partial_images"),
]


@pytest.mark.parametrize(("body", "message"), BAD_IMAGE_REQUESTS)
def test_bad_image_requests_are_400_with_a_message(server, body, message):
    response = _post(server, "/v1/images/generations", json.dumps(body))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_model(server, client):
    response = _post(server, "/v1/images/generations", '{"prompt": "sneaker", "n": ')
    assert response.status_code == 400 and "malformed JSON" in response.json()["error"]["message"]
    assert _post(server, "/v1/images/generations", "[1, 2]").status_code == 400
    with pytest.raises(openai.NotFoundError, match="not served"):
        client.images.generate(model="dall-e-3", prompt="sneaker")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="gen-next-token", prompt="bag", max_tokens=10)
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.completions.create(model="gen-next-token", prompt="bag", stream=True)
    with pytest.raises(openai.BadRequestError, match="logprobs come from vLLM"):  # a native-backend server
        client.completions.create(model="gen-next-token", prompt="bag", logprobs=1)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="gen-next-token", prompt="bag", logprobs=9)
    huge = json.dumps({"prompt": "sneaker", "user": "x" * (1 << 21)})
    assert _post(server, "/v1/images/generations", huge).status_code == 413
    assert httpx.get(f"{server.url}/v1/nothing", timeout=10).status_code == 404
    assert server.health()["status"] == "ok"


def test_concurrent_requests_share_a_batch_and_keep_their_seeds(server, client, pipeline, held_engine):
    stats = server.state.native.stats
    before = (stats.batches, stats.requests)
    requests = [("sneaker", 1, 11), ("bag", 2, 12), ("trouser", 1, 13), ("dress", 3, 14), ("coat", 1, 15)]
    results: dict[int, list[list[int]]] = {}

    def call(i, prompt, n, seed):
        out = client.completions.create(
            model="gen-next-block", prompt=prompt, n=n, seed=seed, extra_body={"guidance_scale": 3.0}
        )
        results[i] = [_tokens(c.text) for c in out.choices]

    # the engine is held inside a first request while the others arrive, so they wait together
    with held_engine(server.state.native) as held:
        first = threading.Thread(target=call, args=(len(requests), "shirt", 1, 10))
        first.start()
        assert held.holding.wait(30)
        threads = [threading.Thread(target=call, args=(i, *r)) for i, r in enumerate(requests)]
        for t in threads:
            t.start()
        server.wait_for(lambda h: h["native_waiting"] == len(requests))
        held.release()
        for t in [first, *threads]:
            t.join(120)
    assert len(results) == len(requests) + 1
    assert stats.requests - before[1] == len(requests) + 1
    assert stats.batches - before[0] == 2  # the held request, then all the others in one batch
    assert stats.max_batch_requests == len(requests) and stats.max_batch_images == 8
    for i, (prompt, n, seed) in enumerate([*requests, ("shirt", 1, 10)]):
        alone = pipeline(prompt, num_images=n, mode="next-block", guidance_scale=3.0, seed=seed).tokens
        assert torch.equal(torch.tensor(results[i]), alone), f"request {i} differs from the same request alone"


def test_incompatible_requests_do_not_share_a_batch(server, client, held_engine):
    stats = server.state.native.stats
    before = stats.batches
    bodies = [
        {"model": "gen-next-block", "prompt": "bag", "seed": 1, "guidance_scale": 2.0},
        {"model": "gen-next-block", "prompt": "bag", "seed": 1, "guidance_scale": 3.0},  # other guidance
        {"model": "gen-next-scale", "prompt": "bag", "seed": 1, "guidance_scale": 2.0},  # other generator
        {"model": "gen-next-token", "prompt": "bag", "seed": 1, "decoder": "sjd"},  # seeded sjd runs alone
        {"model": "gen-next-token", "prompt": "bag", "seed": 2, "decoder": "sjd"},
        {"model": "gen-next-block", "prompt": "coat", "seed": 4, "guidance_scale": 2.0},  # the first already runs
        {"model": "gen-next-block", "prompt": "coat", "seed": 5, "guidance_scale": 3.0},  # joins the second
    ]
    statuses = []

    def call(body):
        statuses.append(client.post("/completions", body=body, cast_to=httpx.Response).status_code)

    with held_engine(server.state.native) as held:
        threads = [threading.Thread(target=call, args=(body,)) for body in bodies[:1]]
        threads[0].start()
        assert held.holding.wait(30)
        for body in bodies[1:]:
            threads.append(threading.Thread(target=call, args=(body,)))
            threads[-1].start()
        server.wait_for(lambda h: h["native_waiting"] == len(bodies) - 1)
        held.release()
        for t in threads:
            t.join(120)
    assert statuses == [200] * len(bodies)
    assert stats.batches - before == 6  # {0} {1, 6} {2} {3} {4} {5}


def test_a_failing_batch_is_a_500_and_the_server_lives(server, client, monkeypatch):
    def broken(model_id):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(server.state.native, "resolve", broken)
    with pytest.raises(openai.InternalServerError, match="simulated failure"):
        client.images.generate(model="gen-next-block", prompt="bag")
    monkeypatch.undo()
    assert len(client.images.generate(model="gen-next-block", prompt="bag").data) == 1


def _raw_request(url: str, body: dict) -> socket.socket:
    """Send a POST on a raw socket (so the test can hang up mid-request); the socket."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    head = (
        f"POST /v1/videos/generations HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    ).encode()
    sock.sendall(head + payload)
    return sock


def _read_status(sock: socket.socket) -> int:
    sock.settimeout(120)
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_metrics_are_prometheus_text(server, client):
    client.images.generate(model="gen-next-block", prompt="bag")
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {}
    for line in response.text.splitlines():
        if not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    health = server.health()
    assert samples['unitok_requests_total{kind="requests"}'] == health["counters"]["requests"] >= 1
    assert samples["unitok_native_images_total"] == health["native"]["images"] >= 1
    assert samples["unitok_in_flight"] == 0 and "unitok_native_busy_seconds_total" in samples
    assert all(name.startswith("unitok_") for name in samples)


def test_api_key_guards_v1_and_leaves_health_open(pipeline, running_server):
    with pytest.raises(ValueError, match="api_key"):
        create_app(pipeline, backend="native", api_key=" ")
    app = create_app(pipeline, backend="native", max_n=2, api_key="sekret")
    with running_server(app) as server:
        assert httpx.get(f"{server.url}/health").status_code == 200
        for key in ("wrong", "sekretX"):
            bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)
            with pytest.raises(openai.AuthenticationError, match="API key"):
                bad.models.list()
        missing = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "bag"})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == 401
        good = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekret", max_retries=0, timeout=60)
        assert {m.id for m in good.models.list()} >= {"gen-next-block"}
        assert good.images.generate(model="gen-next-block", prompt="bag").data[0].b64_json
        assert server.health()["counters"]["requests"] == 1  # the refused ones never reached the server


def test_a_batch_whose_clients_all_left_stops(pipeline, running_server, held_engine):
    app = create_app(pipeline, backend="native", max_n=4, max_queue=4)
    with running_server(app) as server:
        body = {"model": "gen-video-next-block", "prompt": "coat", "seed": 0}
        with held_engine(server.state.native) as held:
            running = _raw_request(server.url, body)
            assert held.holding.wait(30)  # its batch has started (held before the first forward)
            running.close()
            server.wait_for(lambda h: h["in_flight"] == 0 and h["counters"]["disconnected"] == 1, timeout=10)
            held.release()
            health = server.wait_for(lambda h: h["native"]["cancelled"] == 1)
        assert health["native"]["batches"] == 0 and health["native"]["failed"] == 0  # stopped, not finished
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
        assert client.images.generate(model="gen-next-block", prompt="bag", n=1).data[0].b64_json
        assert server.health()["native"]["batches"] == 1


def _read_json(sock: socket.socket) -> tuple[int, dict]:
    """Status and JSON body of the response on ``sock`` (Content-Length framed)."""
    sock.settimeout(120)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_a_client_that_leaves_a_running_batch_drops_out_of_it(pipeline, running_server, held_engine):
    """Two requests share a native batch; one client hangs up before its first forward: its rows leave the batch
    (the batch generates one clip, not two) and the other gets the clip it gets alone with its seed."""
    app = create_app(pipeline, backend="native", max_n=4, max_queue=4)
    with running_server(app) as server:
        engine = server.state.native
        original, held, release = engine.resolve, threading.Event(), threading.Event()

        def resolve(model_id):  # hold the batch of the two requests before its first forward
            if len(engine._running) == 2 and not release.is_set():
                held.set()
                release.wait(120)
            return original(model_id)

        body = {"model": "gen-video-next-block", "prompt": "coat"}
        with held_engine(engine) as blocker:
            first = _raw_request(server.url, {**body, "seed": 0})
            assert blocker.holding.wait(30)
            engine.resolve = resolve
            staying = _raw_request(server.url, {**body, "seed": 1})
            leaving = _raw_request(server.url, {**body, "seed": 2})
            server.wait_for(lambda h: h["native_waiting"] == 2)
            blocker.release()
            assert held.wait(60)
            leaving.close()
            server.wait_for(lambda h: h["counters"]["disconnected"] == 1, timeout=10)
            release.set()
            status, stayed = _read_json(staying)
        engine.resolve = original
        assert status == 200 and _read_status(first) == 200
        health = server.health()
        assert health["native"]["batches"] == 2 and health["native"]["cancelled"] == 1
        assert (
            health["native"]["images"] == 2 and health["native"]["max_batch_images"] == 2
        )  # 1 + 1: the leaver's clip was never made
        alone = httpx.post(f"{server.url}/v1/videos/generations", json={**body, "seed": 1}, timeout=120).json()
        assert stayed["data"][0]["b64_gif"] == alone["data"][0]["b64_gif"] and stayed["seed"] == 1
        staying.close()
        first.close()


def test_full_queue_is_429_and_a_client_that_leaves_frees_its_slot(pipeline, running_server, held_engine):
    app = create_app(pipeline, backend="native", max_n=4, max_queue=2)
    with running_server(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
        body = {"model": "gen-video-next-block", "prompt": "coat", "seed": 0}
        with held_engine(server.state.native) as held:
            running = _raw_request(server.url, body)
            assert held.holding.wait(30)
            waiting = _raw_request(server.url, body)
            server.wait_for(lambda h: h["in_flight"] == 2 and h["native_waiting"] == 1)
            with pytest.raises(openai.RateLimitError, match="busy"):
                client.images.generate(model="gen-next-block", prompt="bag")
            waiting.close()  # the client hangs up while its request waits: its slot frees at once
            health = server.wait_for(lambda h: h["in_flight"] == 1, timeout=10)
            assert health["counters"]["disconnected"] == 1 and health["native"]["cancelled"] == 1
            late = threading.Thread(target=lambda: client.images.generate(model="gen-next-block", prompt="bag"))
            late.start()
            server.wait_for(lambda h: h["in_flight"] == 2)  # admitted into the freed slot
            held.release()
            assert _read_status(running) == 200
            running.close()
            late.join(120)
        health = server.health()
        assert health["native"]["requests"] == 2 and health["native"]["cancelled"] == 1  # the leaver never ran
        assert health["counters"]["rejected_busy"] == 1 and health["in_flight"] == 0


def test_cli_serve(capsys, tmp_path):
    from unitok.cli import _cmd_serve, build_parser, main

    args = build_parser().parse_args(["serve", "checkpoints", "--port", "8123", "--max-n", "4", "--backend", "native"])
    assert args.func is _cmd_serve and args.port == 8123 and args.max_n == 4 and args.host == "127.0.0.1"
    bench = build_parser().parse_args(["bench", "serving", "--n", "8", "--clients", "4"])
    assert (bench.suite, bench.n, bench.clients, bench.rounds, bench.speculative) == ("serving", 8, 4, 3, False)
    assert build_parser().parse_args(["bench", "serving", "--speculative"]).speculative
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", "checkpoints", "--max-n", "0", "--backend", "native"]) == 2
    assert main(["serve", "checkpoints", "--api-key", "", "--backend", "native"]) == 2
    err = capsys.readouterr().err
    assert "no generator or checkpoints folder" in err and "max_n must be a positive int" in err
    assert "api_key must be a non-empty string" in err


@pytest.mark.parametrize(("model", "partials"), [("gen-next-scale", 2), ("gen-next-block", 3)])
def test_streamed_previews_then_the_same_image(client, model, partials):
    stream = client.images.generate(
        model=model, prompt="bag", stream=True, partial_images=partials, extra_body={"seed": 3}
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_generation.partial_image"] * partials + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:-1]] == list(range(partials))
    previews = [_png(e.b64_json) for e in events]
    assert all(p.size == (28, 28) for p in previews) and len({p.tobytes() for p in previews}) == len(previews)
    whole = client.images.generate(model=model, prompt="bag", extra_body={"seed": 3})
    assert events[-1].b64_json == whole.data[0].b64_json and events[-1].usage.output_tokens > 0

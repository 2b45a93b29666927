import json
import math

import pytest
import torch

import unitok.tokenizers.quantizers.vq as vq_module
from unitok.tokenizers.quantizers import QUANTIZERS, QuantizerOutput, VectorQuantizer, build_quantizer

SHAPES = [(2, 5), (2, 3, 4), (2, 2, 3, 3)]  # leading shapes: (B, N), (B, H, W), (B, T, H, W)


def mixture(n: int, components: int = 8, std: float = 0.15) -> torch.Tensor:
    """2-D Gaussian mixture on a circle of radius 2."""
    angle = torch.arange(components) * 2 * math.pi / components
    centers = torch.stack([angle.cos(), angle.sin()], -1) * 2
    return centers[torch.randint(components, (n,))] + std * torch.randn(n, 2)


def eval_usage(q: VectorQuantizer, x: torch.Tensor) -> float:
    was_training = q.training
    q.eval()
    with torch.no_grad():
        usage = float(q(x).metrics["usage"])
    q.train(was_training)
    return usage


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_every_id_round_trips(distance):
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, distance=distance)
    ids = torch.arange(16)
    codes = q.indices_to_codes(ids)
    assert codes.shape == (16, 4)
    assert torch.equal(q.codes_to_indices(codes), ids)
    if distance == "cosine":
        assert torch.allclose(codes.norm(dim=-1), torch.ones(16), atol=1e-6)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("lead", SHAPES)
def test_any_leading_shape_and_nearest_code(lead, distance):
    torch.manual_seed(0)
    q = VectorQuantizer(32, 3, distance=distance).eval()
    z = torch.randn(*lead, 3)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.quantized.shape == z.shape and out.indices.shape == lead and out.indices.dtype == torch.int64
    assert torch.allclose(out.quantized, q.indices_to_codes(out.indices), atol=1e-6)
    assert torch.equal(q.codes_to_indices(out.quantized), out.indices)
    # brute-force nearest neighbour
    flat = z.reshape(-1, 3)
    codes = q.indices_to_codes(torch.arange(32))
    if distance == "cosine":
        expected = (torch.nn.functional.normalize(flat, dim=-1) @ codes.t()).argmax(-1)
        assert torch.allclose(out.quantized.norm(dim=-1), torch.ones(lead), atol=1e-6)
    else:
        expected = torch.cdist(flat, codes).argmin(-1)
    assert torch.equal(out.indices.reshape(-1), expected)


def test_chunked_distances_match(monkeypatch):
    torch.manual_seed(0)
    q = VectorQuantizer(64, 4).eval()
    z = torch.randn(300, 4)
    full = q(z).indices
    monkeypatch.setattr(vq_module, "_CHUNK_ELEMENTS", 64 * 7)  # 7 rows per block
    assert torch.equal(q(z).indices, full)


@pytest.mark.parametrize("ema", [True, False])
def test_gradients_and_losses(ema):
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, beta=0.5, ema=ema).train()
    z = torch.randn(2, 64, 4, requires_grad=True)  # more latents than codes: codes cannot sit on every latent
    out = q(z)
    assert set(out.losses) == {"commitment", "codebook"}
    for value in list(out.losses.values()) + list(out.metrics.values()):
        assert value.shape == () and torch.isfinite(value)
    (out.quantized * torch.randn_like(out.quantized)).sum().add(out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    if ema:
        assert float(out.losses["codebook"]) == 0.0 and not q.codebook.requires_grad
    else:
        assert float(out.losses["codebook"].detach()) > 0
        assert q.codebook.grad is not None and q.codebook.grad.abs().sum() > 0


def test_commitment_loss_value():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, beta=0.25).eval()
    z = torch.randn(50, 2)
    out = q(z)
    expected = 0.25 * (z - q.indices_to_codes(out.indices)).pow(2).mean()
    assert torch.allclose(out.losses["commitment"], expected, atol=1e-6)


def test_first_training_forward_initialises_from_data_and_eval_does_not():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 2)
    data = torch.randn(512, 2) * 0.1 + 5
    q.eval()
    q(data)
    assert not bool(q.initted) and q.codebook.mean() < 1  # eval mode leaves the random init alone
    q.train()
    q(data)
    assert bool(q.initted)
    assert torch.allclose(q.codebook.mean(0), torch.tensor([5.0, 5.0]), atol=0.1)


def test_explicit_init_codebook():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 2, kmeans_iters=0)
    data = torch.randn(4, 8, 2) + torch.tensor([-4.0, 2.0])
    q.init_codebook(data)
    assert bool(q.initted)
    # without Lloyd steps every code is one of the latents
    assert torch.cdist(q.codebook, data.reshape(-1, 2)).min(-1).values.max() < 1e-5
    with pytest.raises(ValueError, match="channel-last"):
        q.init_codebook(torch.randn(3, 5))


def test_ema_moves_codebook_towards_data_in_train_mode_only():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, decay=0.9, restart=False).train()
    q(torch.randn(256, 2))  # initialise on N(0, 1)
    target = torch.randn(1024, 2) * 0.5 + 3

    def error() -> float:
        return float(torch.cdist(target, q.codebook).min(-1).values.pow(2).mean())

    start, frozen = error(), q.codebook.clone()
    q.eval()
    for _ in range(5):
        q(torch.randn(256, 2) * 0.5 + 3)
    assert torch.equal(q.codebook, frozen)
    q.train()
    for _ in range(20):
        q(torch.randn(256, 2) * 0.5 + 3)
    assert error() < 0.5 * start
    assert not torch.equal(q.codebook, frozen)


@pytest.mark.parametrize("restart", [True, False])
def test_dead_code_restart_revives_unused_codes(restart):
    torch.manual_seed(0)
    q = VectorQuantizer(32, 2, decay=0.9, restart=restart).train()
    q(torch.randn(1024, 2) * 4)  # codebook spread over a wide area
    concentrated = lambda n: torch.randn(n, 2) * 0.1 + 3  # noqa: E731
    assert eval_usage(q, concentrated(4096)) < 0.3
    for _ in range(60):
        q(concentrated(512))
    usage = eval_usage(q, concentrated(4096))
    if restart:
        assert usage >= 0.8
    else:
        assert usage < 0.3


def test_gaussian_mixture_fit_reaches_high_usage():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 2).train()
    for _ in range(100):
        q(mixture(512))
    x = mixture(8192)
    q.eval()
    out = q(x)
    assert float(out.metrics["usage"]) >= 0.8
    assert float(out.metrics["perplexity"]) > 12
    # 16 codes for 8 tight clusters: the error is of the order of the cluster variance, far below the data's
    assert (out.quantized - x).pow(2).mean() < 0.05 * x.var(0).mean()


@pytest.mark.parametrize("ema", [True, False])
def test_restart_recovers_from_a_collapsed_codebook(ema):
    torch.manual_seed(0)
    q = VectorQuantizer(16, 2, ema=ema, decay=0.95).train()
    with torch.no_grad():  # a codebook far from the data, as after a bad init or a drifting encoder
        q.codebook.copy_(torch.randn(16, 2) * 0.1 + 10)
        q.initted.fill_(True)
    opt = None if ema else torch.optim.Adam(q.parameters(), lr=0.05)
    assert eval_usage(q, mixture(4096)) <= 1 / 16
    for _ in range(60):
        out = q(mixture(256))
        if opt is not None:
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    assert eval_usage(q, mixture(8192)) >= 0.8


def test_state_dict_round_trip_keeps_codebook_and_init_state():
    torch.manual_seed(0)
    spec = {"type": "vq", "codebook_size": 32, "dim": 3, "distance": "cosine"}
    a = build_quantizer(spec).train()
    for _ in range(3):
        a(torch.randn(128, 3))
    state = a.state_dict()
    assert {"codebook", "cluster_size", "initted", "embed_sum"} <= set(state)
    b = build_quantizer(json.loads(json.dumps(spec)))
    b.load_state_dict(state)
    a.eval(), b.eval()
    z = torch.randn(2, 4, 4, 3)
    assert torch.equal(a(z).quantized, b(z).quantized) and torch.equal(a(z).indices, b(z).indices)
    # the loaded quantizer does not re-initialise on its next training forward: data far away moves at most the
    # one code it is assigned to (a re-initialisation would move every code onto it)
    c = build_quantizer({**spec, "restart": False})
    c.load_state_dict(a.state_dict())
    assert bool(c.initted)
    before = c.codebook.clone()
    c.train()(torch.tensor([[100.0, -50.0, 20.0]]).expand(256, 3))
    assert int(((c.codebook - before).abs().max(-1).values > 1e-3).sum()) == 1


def test_bad_inputs_raise_value_error():
    q = VectorQuantizer(16, 4)
    with pytest.raises(ValueError, match="channel-last"):
        q(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="float"):
        q(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        q.indices_to_codes(torch.tensor([16]))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        q.indices_to_codes(torch.tensor([-2, 0]))
    with pytest.raises(ValueError, match="integer"):
        q.indices_to_codes(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="codes must be"):
        q.codes_to_indices(torch.zeros(2, 3))
    for kwargs, message in [
        ({"codebook_size": 1, "dim": 4}, "codebook_size"),
        ({"codebook_size": 8.0, "dim": 4}, "codebook_size"),
        ({"codebook_size": 8, "dim": 0}, "dim"),
        ({"codebook_size": 8, "dim": 4, "distance": "l1"}, "distance"),
        ({"codebook_size": 8, "dim": 4, "decay": 1.0}, "decay"),
        ({"codebook_size": 8, "dim": 4, "beta": -1}, "beta"),
        ({"codebook_size": 8, "dim": 4, "dead_code_threshold": -0.1}, "dead_code_threshold"),
        ({"codebook_size": 8, "dim": 4, "ema": "yes"}, "ema"),
    ]:
        with pytest.raises(ValueError, match=message):
            VectorQuantizer(**kwargs)


def test_registry_and_build():
    assert QUANTIZERS["vq"] is VectorQuantizer
    spec = {"type": "vq", "codebook_size": 1024, "dim": 8}
    q = build_quantizer(json.loads(json.dumps(spec)))
    assert isinstance(q, VectorQuantizer) and q.codebook_size == 1024 and q.dim == 8
    with pytest.raises(ValueError, match="bad options"):
        build_quantizer({"type": "vq", "codebook_size": 16})

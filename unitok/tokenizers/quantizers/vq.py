"""Vector quantization with an EMA codebook (van den Oord et al., 2017, "Neural Discrete Representation Learning";
EMA updates from Appendix A of that paper and Razavi et al., 2019, "VQ-VAE-2").

Each latent vector is replaced by its nearest codebook entry (L2, or cosine: ViT-VQGAN, Yu et al., 2022, where
inputs and codes are l2-normalised and the returned codes are unit vectors). Gradients pass straight through.
The codebook learns either by exponential moving averages of cluster sizes and member sums (Laplace-smoothed, in
training mode only) or, with ``ema=False``, by the codebook loss ``||sg(z) - q||^2``; the commitment loss
``beta * ||z - sg(q)||^2`` is always returned.

What is ours:

* Data-dependent initialisation: the first training forward seeds the codebook with random latents of that batch
  and refines them with a few Lloyd (k-means) steps; the ``initted`` buffer records it, so a saved and reloaded
  quantizer is not re-initialised.
* Dead-code restart measured against *expected* usage: a code whose EMA assignment count falls below
  ``dead_code_threshold`` times the uniform share (tokens per batch / codebook_size, i.e. the mean EMA count) is
  re-seeded from a random latent of the current batch. The rule does not depend on batch size or codebook size;
  it is what keeps codebook usage high while training (the tests fit a Gaussian mixture to >= 0.8 usage).
* Distances are computed in row chunks, so large batches of video latents never build one huge (N, K) matrix.
* Under ``torch.distributed`` the EMA statistics are summed over ranks and initialisation/restarts are broadcast
  from rank 0, so every rank holds the same codebook.

In training mode the codebook is updated *after* the quantized output is computed: ``quantized`` equals
``indices_to_codes(indices)`` evaluated before the forward (or in eval mode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unitok.tokenizers.quantizers.base import Quantizer, QuantizerOutput, straight_through, usage_metrics

DISTANCES = ("l2", "cosine")
_CHUNK_ELEMENTS = 1 << 24  # rows * codes per distance block (64 MiB of fp32)


def _is_distributed() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _is_distributed():
        torch.distributed.all_reduce(t)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if _is_distributed():
        torch.distributed.broadcast(t, src=0)
    return t


def _check_number(name: str, value: object, low: float, high: float | None = None, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


class VectorQuantizer(Quantizer):
    """Nearest-neighbour quantizer over a learned codebook of ``codebook_size`` vectors of size ``dim``.

    Args: ``beta`` (commitment weight), ``ema`` (EMA codebook updates; else the codebook is a parameter trained by
    the codebook loss), ``decay`` (EMA decay of the codebook and of the usage counts), ``distance`` ("l2" or
    "cosine"), ``dead_code_threshold`` (restart a code whose EMA usage is below this fraction of the mean usage),
    ``restart`` (dead-code restarts on/off), ``eps`` (Laplace smoothing), ``kmeans_iters`` (Lloyd steps of the
    data-dependent initialisation; 0 keeps the sampled latents).

    ``losses``: ``commitment`` (always) and ``codebook`` (a zero tensor with ``ema=True``, where the EMA does that
    job), already weighted. ``metrics``: batch ``usage`` and ``perplexity``, and ``dead_codes``: the fraction of
    codes below the restart threshold (before this step's restarts).
    """

    def __init__(
        self,
        codebook_size: int,
        dim: int,
        beta: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        distance: str = "l2",
        dead_code_threshold: float = 0.5,
        restart: bool = True,
        eps: float = 1e-5,
        kmeans_iters: int = 10,
    ):
        super().__init__()
        _check_number("codebook_size", codebook_size, 2, integer=True)
        _check_number("dim", dim, 1, integer=True)
        _check_number("beta", beta, 0.0)
        _check_number("decay", decay, 0.0, 1.0)
        if decay >= 1.0:
            raise ValueError(f"decay must be < 1 (1 would freeze the EMA codebook), got {decay!r}")
        _check_number("dead_code_threshold", dead_code_threshold, 0.0)
        _check_number("eps", eps, 0.0)
        _check_number("kmeans_iters", kmeans_iters, 0, integer=True)
        if not isinstance(ema, bool) or not isinstance(restart, bool):
            raise ValueError(f"ema and restart must be booleans, got ema={ema!r}, restart={restart!r}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self._size = codebook_size
        self.dim = dim
        self.beta = float(beta)
        self.ema = ema
        self.decay = float(decay)
        self.distance = distance
        self.dead_code_threshold = float(dead_code_threshold)
        self.restart = restart
        self.eps = float(eps)
        self.kmeans_iters = kmeans_iters

        init = torch.randn(codebook_size, dim)
        if distance == "cosine":
            init = F.normalize(init, dim=-1)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # EMA of assignments per batch
        self.register_buffer("initted", torch.tensor(False))

    @property
    def codebook_size(self) -> int:
        return self._size

    def extra_repr(self) -> str:
        return (
            f"codebook_size={self._size}, dim={self.dim}, distance={self.distance!r}, ema={self.ema}, "
            f"beta={self.beta}, restart={self.restart}"
        )

    # --- codebook access ------------------------------------------------------------------------------------
    def _codes(self) -> torch.Tensor:
        """(K, dim) fp32 code vectors as ``quantize`` returns them (unit vectors for cosine)."""
        codebook = self.codebook.float()
        return F.normalize(codebook, dim=-1) if self.distance == "cosine" else codebook

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.distance == "cosine" else x

    @torch.no_grad()
    def _nearest(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """(N, dim), (K, dim) -> (N,) id of the nearest code, computed in row chunks."""
        codes = codes.detach()
        code_sq = codes.pow(2).sum(-1)  # (K,)
        rows = max(1, _CHUNK_ELEMENTS // codes.shape[0])
        # argmin of ||c||^2 - 2 x.c (||x||^2 is constant per row); for unit vectors this is the cosine ranking.
        ids = [torch.addmm(code_sq, chunk, codes.t(), alpha=-2.0).argmin(-1) for chunk in x.detach().split(rows)]
        return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=x.device)

    # --- forward --------------------------------------------------------------------------------------------
    def quantize(self, z: torch.Tensor) -> QuantizerOutput:
        flat = self._prepare(z.reshape(-1, self.dim))  # (N, dim)
        if self.training and not bool(self.initted) and flat.shape[0] > 0:
            self._init_codebook(flat.detach())
        codes = self._codes()
        idx = self._nearest(flat, codes)
        q = F.embedding(idx, codes)  # (N, dim); carries the codebook gradient when ema=False
        commitment = self.beta * F.mse_loss(flat, q.detach())
        codebook_loss = F.mse_loss(q, flat.detach()) if not self.ema else flat.new_zeros(())
        quantized = straight_through(flat, q).reshape(z.shape)
        metrics = usage_metrics(idx, self._size)
        metrics["dead_codes"] = self._dead_mask().float().mean()
        if self.training and flat.shape[0] > 0:
            self._update(flat.detach(), idx)
        return QuantizerOutput(
            quantized=quantized,
            indices=idx.reshape(z.shape[:-1]),
            losses={"commitment": commitment, "codebook": codebook_loss},
            metrics=metrics,
        )

    def _dead_mask(self) -> torch.Tensor:
        return self.cluster_size < self.dead_code_threshold * self.cluster_size.mean()

    # --- codebook learning (training mode only) -------------------------------------------------------------
    @torch.no_grad()
    def init_codebook(self, z: torch.Tensor) -> None:
        """Initialise the codebook from representative latents (..., dim) now, instead of from the first training
        batch (useful when that batch is small, e.g. the 1x1 scale of a multi-scale tokenizer). Marks ``initted``."""
        self._check_input(z)
        flat = self._prepare(z.detach().float().reshape(-1, self.dim))
        if flat.shape[0] == 0:
            raise ValueError("init_codebook needs at least one latent vector")
        self._init_codebook(flat)

    @torch.no_grad()
    def _init_codebook(self, x: torch.Tensor) -> None:
        """Seed from random latents of this batch, refine with ``kmeans_iters`` Lloyd steps."""
        n, k = x.shape[0], self._size
        if n >= k:
            centers = x[torch.randperm(n, device=x.device)[:k]].clone()
        else:  # fewer latents than codes: repeat them with a little jitter so codes stay distinct
            centers = x[torch.randint(n, (k,), device=x.device)]
            centers = centers + 1e-3 * (x.std(correction=0) + 1e-6) * torch.randn_like(centers)
        centers = self._prepare(_broadcast(centers))
        counts = torch.zeros(k, device=x.device)
        for _ in range(max(1, self.kmeans_iters)):
            idx = self._nearest(x, centers)
            counts = _all_reduce_sum(torch.bincount(idx, minlength=k).float())
            sums = _all_reduce_sum(torch.zeros_like(centers).index_add_(0, idx, x))
            if self.kmeans_iters == 0:
                break
            # Empty clusters keep their seed; the dead-code restart takes care of them.
            centers = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
            centers = self._prepare(centers)
        self.codebook.data.copy_(centers)
        self.cluster_size.copy_(counts)
        if self.ema:
            self.embed_sum.copy_(centers * counts[:, None])
        self.initted.fill_(True)

    @torch.no_grad()
    def _update(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        counts = _all_reduce_sum(torch.bincount(idx, minlength=self._size).float())
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            sums = _all_reduce_sum(torch.zeros_like(self.embed_sum).index_add_(0, idx, x))
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self._size * self.eps) * total  # Laplace
            self.codebook.data.copy_(self._prepare(self.embed_sum / smoothed[:, None]))
        if self.restart:
            self._restart_dead_codes(x)

    @torch.no_grad()
    def _restart_dead_codes(self, x: torch.Tensor) -> None:
        # Masked rather than indexed writes: no host sync and the same shapes on every rank.
        dead = self._dead_mask()[:, None]  # (K, 1)
        n, k = x.shape[0], self._size
        # Uniformly random latents follow the data density, so a re-seeded code lands where it will be used.
        pick = torch.randperm(n, device=x.device)[:k] if n >= k else torch.randint(n, (k,), device=x.device)
        fresh = _broadcast(x[pick].clone())  # (K, dim), already normalised for cosine
        expected = self.cluster_size.mean()
        self.codebook.data.copy_(torch.where(dead, fresh.to(self.codebook.dtype), self.codebook.data))
        # A re-seeded code starts at the expected count: a grace period before it can be declared dead again.
        self.cluster_size.copy_(torch.where(dead[:, 0], expected, self.cluster_size))
        if self.ema:
            self.embed_sum.copy_(torch.where(dead, fresh * expected, self.embed_sum))

    # --- conversions ----------------------------------------------------------------------------------------
    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        indices = self.check_indices(indices)
        return F.embedding(indices.to(self.codebook.device), self._codes().detach())

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Nearest code id; exact inverse of ``indices_to_codes`` for distinct codes."""
        if not torch.is_tensor(codes) or not codes.is_floating_point() or codes.shape[-1] != self.dim:
            raise ValueError(f"codes must be a float tensor (..., {self.dim}), got {getattr(codes, 'shape', codes)}")
        flat = self._prepare(codes.detach().float().reshape(-1, self.dim))
        idx = self._nearest(flat, self._codes())
        return idx.reshape(codes.shape[:-1])

"""Lossy relatives of SJD that accept a draft when a *neighbourhood* of it is likely, not only the token itself.

Visual tokens are redundant: neighbouring codes in the tokenizer's latent space decode to nearly the same patch, so
a draft the model finds unlikely may have a likely neighbour. Both rules keep SJD's loop (window, Jacobi updates,
residual resampling at the first rejection) and swap only the acceptance probability; neighbourhoods come from the
tokenizer's own code vectors (``codes``, (V, D)).

- ``relaxed`` (LANTERN's idea): the target mass of the draft is raised by the mass of its nearest plausible codes,
  added in order of latent distance while the added mass stays <= ``delta``; accept with ``min(1, p~(x) / q(x))``.
  ``delta`` bounds how far each step's distribution moves (total variation <= delta).
- ``grouped`` (GSD's idea): the draft and its ``group_size - 1`` nearest codes that the model also finds plausible
  form a group G of visually interchangeable tokens; accept with ``min(1, p(G) / q(x))``: the draft stands for its
  group. ``group_size`` bounds the relaxation.

"Plausible" is min-p: probability at least ``min_p`` times the most likely token's. Without it both rules misfire on
SJD's drafts, whose q is often flat (random initialisation, early Jacobi iterations): a draft's many near-zero
neighbours then add up to more than q(x) and an implausible token is accepted (FD 7.7 vs 3.7 at delta 0.2).
"""

from __future__ import annotations

import weakref

import torch

from unitok.decoding.sjd import Acceptance, decode_sjd

# id(codes) -> (weak reference to codes, {(version, k): table}); tensors cannot key a WeakKeyDictionary (their
# == is elementwise), so identity is checked through the reference, which also drops the entry with the tensor.
_NEIGHBORS: dict[int, tuple[weakref.ref, dict]] = {}


def code_neighbors(codes: torch.Tensor, k: int) -> torch.Tensor:
    """(V, D) code vectors -> (V, k) ids of each code's k nearest codes (itself first), by L2 distance.

    A V x V distance matrix (19M entries for 4375 codes) costs more than decoding an image, so tables are cached
    per codes tensor (and its version) for as long as that tensor lives."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be (V, D), got shape {tuple(codes.shape)}")
    k = min(int(k), codes.shape[0])
    entry = _NEIGHBORS.get(id(codes))
    if entry is None or entry[0]() is not codes:
        key_id = id(codes)
        entry = (weakref.ref(codes, lambda _: _NEIGHBORS.pop(key_id, None)), {})
        _NEIGHBORS[key_id] = entry
    tables = entry[1]
    key = (codes._version, k)
    if key not in tables:
        dist = torch.cdist(codes.float(), codes.float())
        dist.fill_diagonal_(-1.0)  # itself first, whatever the ties
        for stale in [old for old in tables if old[0] != codes._version]:
            del tables[stale]
        tables[key] = dist.topk(k, largest=False).indices
    return tables[key]


def _plausible(p: torch.Tensor, p_near: torch.Tensor, min_p: float) -> torch.Tensor:
    """Which neighbours the target finds plausible (min-p rule); the draft itself (column 0) always counts."""
    member = p_near >= min_p * p.amax(-1, keepdim=True)
    member[..., 0] = True
    return member


class RelaxedAcceptance(Acceptance):
    lossless = False

    def __init__(self, neighbors: torch.Tensor, delta: float, min_p: float = 0.05):
        self.neighbors = neighbors
        self.delta = delta
        self.min_p = min_p

    def __call__(self, p, q, draft):
        near = self.neighbors.to(draft.device)[draft]  # (B, W, k), the draft first
        p_near = p.gather(-1, near)
        extra = (p_near * _plausible(p, p_near, self.min_p))[..., 1:]
        added = (extra * (extra.cumsum(-1) <= self.delta)).sum(-1)
        q_draft = q.gather(-1, draft[..., None])[..., 0]
        p_tilde = p_near[..., 0] + added
        return torch.where(q_draft > 0, p_tilde / q_draft.clamp_min(1e-30), torch.ones_like(q_draft)).clamp(max=1)


class GroupedAcceptance(Acceptance):
    lossless = False

    def __init__(self, neighbors: torch.Tensor, min_p: float):
        self.neighbors = neighbors
        self.min_p = min_p

    def __call__(self, p, q, draft):
        near = self.neighbors.to(draft.device)[draft]  # (B, W, g)
        p_near = p.gather(-1, near)
        p_group = (p_near * _plausible(p, p_near, self.min_p)).sum(-1)
        q_draft = q.gather(-1, draft[..., None])[..., 0]
        return torch.where(q_draft > 0, p_group / q_draft.clamp_min(1e-30), torch.ones_like(q_draft)).clamp(max=1)


def _check_codes(codes: torch.Tensor | None, size: int, name: str) -> torch.Tensor:
    if codes is None:
        raise ValueError(
            f"the {name} decoder needs the tokenizer's code vectors (codes=(V, D)); the pipeline passes them"
        )
    if codes.dim() != 2 or codes.shape[0] != size:
        raise ValueError(f"codes must be ({size}, D) for this model's {size} visual tokens, got {tuple(codes.shape)}")
    return codes


def _check_min_p(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"min_p must be in [0, 1] (0 = every neighbour counts), got {value!r}")


def decode_relaxed(
    model,
    layout,
    prefix_ids,
    visual,
    *args,
    codes=None,
    delta: float = 0.4,
    neighbors: int = 32,
    min_p: float = 0.05,
    window: int = 8,
    **kwargs,
):
    """SJD with LANTERN-style relaxed acceptance (lossy; ``delta`` in [0, 1) bounds the relaxation)."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1:
        raise ValueError(f"delta must be in [0, 1) (0 = exact SJD), got {delta!r}")
    _check_min_p(min_p)
    if isinstance(neighbors, bool) or not isinstance(neighbors, int) or neighbors < 1:
        raise ValueError(f"neighbors must be a positive int, got {neighbors!r}")
    table = code_neighbors(_check_codes(codes, visual.size, "relaxed"), neighbors + 1)
    return decode_sjd(
        model,
        layout,
        prefix_ids,
        visual,
        *args,
        window=window,
        acceptance=RelaxedAcceptance(table, float(delta), float(min_p)),
        **kwargs,
    )


def decode_grouped(
    model,
    layout,
    prefix_ids,
    visual,
    *args,
    codes=None,
    group_size: int = 32,
    min_p: float = 0.05,
    window: int = 8,
    **kwargs,
):
    """SJD with GSD-style grouped acceptance (lossy; groups of at most ``group_size`` nearby plausible codes)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int (1 = exact SJD), got {group_size!r}")
    _check_min_p(min_p)
    table = code_neighbors(_check_codes(codes, visual.size, "grouped"), group_size)
    return decode_sjd(
        model,
        layout,
        prefix_ids,
        visual,
        *args,
        window=window,
        acceptance=GroupedAcceptance(table, float(min_p)),
        **kwargs,
    )

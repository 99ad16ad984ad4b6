"""What each inversion method keeps and how its edits run: the one place where the methods differ.

Both backends (engine/reference.py, engine/fast.py) run DDIM inversion and hand the pivots here; only null-text
inversion then optimizes something (paper Algorithm 1). Editing turns an inversion into an EditJob that every
sampler reads. A new method is one more branch in `from_pivots` and `edit_job`, not a change in four files.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .ddim import DDIMSchedule

NULL_TEXT, NEGATIVE_PROMPT, DIRECT, DDIM = "null-text", "negative-prompt", "direct", "ddim"


@dataclass
class InversionResult:
    """One image's inversion as a backend returns it, before api.invert makes it an Inversion artifact."""

    z_T: torch.Tensor  # (1, 4, h, w) fp32: the end of the DDIM pivot trajectory
    null_embeddings: torch.Tensor | None  # (steps, L, D) optimized (null-text), (1, L, D) (negative-prompt), None
    pivots: torch.Tensor | None = None  # (steps + 1, 4, h, w) z*_0 .. z*_T: direct inversion edits against them
    iterations: list[int] = field(default_factory=list)  # inner Adam iterations per step
    losses: list[float] = field(default_factory=list)  # last inner loss per step
    fp32_retries: list[int] = field(default_factory=list)  # -1: DDIM inversion redone in fp32; i >= 0: step i
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase, this image's share of a batch


def optimizes_null_text(method: str) -> bool:
    """Only null-text inversion (Mokady et al. 2023) has work left after DDIM inversion."""
    return method == NULL_TEXT


def from_pivots(method: str, pivots: list[torch.Tensor], conds: torch.Tensor, steps: int,
                retries: list[list[int]] | None = None, timings: dict | None = None) -> list[InversionResult]:
    """The methods that keep only what DDIM inversion gave: `pivots` z*_0 .. z*_T, each (B, 4, h, w).

    ddim keeps z_T; negative-prompt (Miyake et al. 2023) also keeps the source prompt's embedding as its null text
    (no optimization); direct (Ju et al. 2023) keeps the whole trajectory, which its edits are put back on."""
    b = conds.shape[0]
    trajectory = torch.stack(pivots, dim=1) if method == DIRECT else None  # (B, steps + 1, 4, h, w)
    return [InversionResult(
        z_T=pivots[-1][k:k + 1],
        null_embeddings=conds[k:k + 1].clone() if method == NEGATIVE_PROMPT else None,
        pivots=trajectory[k] if trajectory is not None else None,
        iterations=[0] * steps if method == NEGATIVE_PROMPT else [],
        fp32_retries=list(retries[k]) if retries else [], timings=dict(timings or {})) for k in range(b)]


@dataclass
class EditJob:
    """One image's edit on the pipeline's device, as every sampler (reference or fast) reads it."""

    z_T: torch.Tensor  # (1, 4, h, w): where sampling starts
    cond: torch.Tensor  # (1, L, D): the target prompt's context (L = 77; SDXL 78, see conditioning.py)
    null: torch.Tensor  # (steps, 77, D) one null embedding per step, or (1, 77, D) for every step
    schedule: DDIMSchedule
    weights: list[float]  # guidance weight per denoising step
    pivots: torch.Tensor | None = None  # direct inversion: (steps + 1, 4, h, w), the offsets' targets
    two_branch: bool = False  # the source branch samples beside the target (P2P, or direct inversion's offsets)
    cond_source: torch.Tensor | None = None  # two branches: the source prompt's embedding
    plan: object = None  # two branches: p2p.EditPlan of the attention control, None = they only share the batch
    offset_target: bool = False  # direct inversion: the target branch also gets the source branch's offset

    def null_at(self, i: int) -> torch.Tensor:
        """Step i's null embedding, (1, 77, D)."""
        return null_at(self.null, i, self.schedule.steps)


def null_at(null: torch.Tensor, i: int, steps: int) -> torch.Tensor:
    """Step i's null embedding: per-step (steps, 77, D) as null-text inversion, or one (1, 77, D) for every step."""
    return null[i:i + 1] if null.shape[0] == steps else null[:1]

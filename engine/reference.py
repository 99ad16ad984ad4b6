"""The reference: null-text inversion exactly as the authors' notebook (Mokady et al. 2023), eager fp32, batch 1.

Written to be read, not to be fast. Every fast path in this project is tested against these functions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .ddim import DDIMSchedule, ddim_step, guided_eps
from .models import Pipeline, unet_eps


@torch.no_grad()
def ddim_invert(pipe: Pipeline, z0: torch.Tensor, cond: torch.Tensor, schedule: DDIMSchedule,
                progress: bool = False) -> list[torch.Tensor]:
    """DDIM inversion with the source prompt only (no CFG): the pivot trajectory z*_0 .. z*_T (paper Sec. 3.2)."""
    latents = [z0]
    z = z0.clone()
    for i in tqdm(range(schedule.steps), desc="DDIM inversion", disable=not progress, leave=False):
        t, a_from, a_to = schedule.invert_alphas(i)
        z = ddim_step(z, unet_eps(pipe, z, t, cond), a_from, a_to)
        latents.append(z)
    return latents


@torch.no_grad()
def guided_step(pipe: Pipeline, z: torch.Tensor, i: int, schedule: DDIMSchedule, uncond: torch.Tensor,
                cond: torch.Tensor, w: float) -> torch.Tensor:
    """One CFG denoising step z_t -> z_{t-1}, the UNet run on [uncond, cond] as one batch of 2 (notebook)."""
    t = schedule.timesteps[i]
    a_t, a_prev = schedule.denoise_alphas(i)
    eps_u, eps_c = unet_eps(pipe, torch.cat([z, z]), t, torch.cat([uncond, cond])).chunk(2)
    return ddim_step(z, guided_eps(eps_u, eps_c, w), a_t, a_prev)


def null_text_optimize(pipe: Pipeline, pivots: list[torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor,
                       schedule: DDIMSchedule, weights: list[float], inner_steps: int = 10, lr: float = 1e-2,
                       early_stop: bool = True, epsilon: float = 1e-5, progress: bool = False):
    """Null-text optimization, paper Algorithm 1: per step, fit the null embedding so the guided step hits z*_{t-1}.

    Returns (embeddings (steps, 77, D), inner iterations per step, last loss per step).
    """
    embeddings, iterations, losses = [], [], []
    z = pivots[-1]
    bar = tqdm(total=inner_steps * schedule.steps, desc="null-text optimization", disable=not progress, leave=False)
    for i in range(schedule.steps):
        t = schedule.timesteps[i]
        a_t, a_prev = schedule.denoise_alphas(i)
        target = pivots[len(pivots) - i - 2]
        uncond = uncond.clone().detach().requires_grad_(True)
        optimizer = torch.optim.Adam([uncond], lr=lr * (1.0 - i / 100.0))
        with torch.no_grad():
            eps_c = unet_eps(pipe, z, t, cond)  # computed once per step, reused by every inner iteration
        done, loss_value = 0, float("nan")
        for _ in range(inner_steps):
            eps_u = unet_eps(pipe, z, t, uncond)
            z_prev = ddim_step(z, guided_eps(eps_u, eps_c, weights[i]), a_t, a_prev)
            loss = F.mse_loss(z_prev, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # the notebook steps before testing the loss, so the last update is kept
            loss_value = loss.item()
            done += 1
            bar.update()
            if early_stop and loss_value < epsilon + i * 2e-5:
                break
        bar.update(inner_steps - done)
        uncond = uncond.detach()
        embeddings.append(uncond[0])
        iterations.append(done)
        losses.append(loss_value)
        z = guided_step(pipe, z, i, schedule, uncond, cond, weights[i])
    bar.close()
    return torch.stack(embeddings), iterations, losses


@torch.no_grad()
def sample(pipe: Pipeline, z_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, schedule: DDIMSchedule,
           weights: list[float], progress: bool = False) -> torch.Tensor:
    """DDIM sampling with CFG from z_T; `uncond` is one null embedding (1, 77, D) or one per step (steps, 77, D)."""
    z = z_T
    for i in tqdm(range(schedule.steps), desc="DDIM sampling", disable=not progress, leave=False):
        null = uncond[i:i + 1] if uncond.shape[0] == schedule.steps else uncond[:1]
        z = guided_step(pipe, z, i, schedule, null, cond, weights[i])
    return z

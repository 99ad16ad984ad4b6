"""The reference: null-text inversion exactly as the authors' notebook (Mokady et al. 2023), eager fp32, batch 1,
and its relatives on the same DDIM pivots: negative-prompt inversion (Miyake et al. 2023: the null embedding is the
source prompt's, nothing to compute here), direct inversion (Ju et al. 2023), and prompt-to-prompt editing
(Hertz et al. 2022) as the NTI notebook runs it.

Why a second implementation beside engine/fast.py, on purpose: this one is written to be read against the paper and
the notebook (one image, one loop per algorithm, torch.optim.Adam, no workspace, no masks), so it can be trusted
by reading; the fast path reorganizes the same math for throughput (batches, masked Adam, CUDA graphs). Every fast
path is tested against these functions (tests/test_fast.py, tests/test_p2p.py, tests/test_golden.py). What the
methods keep is decided once, in engine/methods.py, for both.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .ddim import DDIMSchedule, ddim_step, guided_eps
from .methods import EditJob
from .models import Pipeline, unet_eps
from .p2p import P2PController, attention_control


@torch.no_grad()
def ddim_invert(pipe: Pipeline, z0: torch.Tensor, cond: torch.Tensor, schedule: DDIMSchedule,
                progress: bool = False) -> list[torch.Tensor]:
    """DDIM inversion with the source prompt only (no CFG): the pivot trajectory z*_0 .. z*_T (paper Sec. 3.2)."""
    latents = [z0]
    z = z0.clone()
    for i in tqdm(range(schedule.steps), desc="DDIM inversion", disable=not progress, leave=False):
        t, a_from, a_to = schedule.invert_alphas(i)
        z = ddim_step(z, schedule.eps(unet_eps(pipe, z, t, cond), z, a_from), a_from, a_to)
        latents.append(z)
    return latents


@torch.no_grad()
def guided_step(pipe: Pipeline, z: torch.Tensor, i: int, schedule: DDIMSchedule, uncond: torch.Tensor,
                cond: torch.Tensor, w: float) -> torch.Tensor:
    """One CFG denoising step z_t -> z_{t-1}, the UNet run on [uncond, cond] as one batch of 2 (notebook)."""
    t = schedule.timesteps[i]
    a_t, a_prev = schedule.denoise_alphas(i)
    eps_u, eps_c = schedule.eps(unet_eps(pipe, torch.cat([z, z]), t, torch.cat([uncond, cond])), torch.cat([z, z]),
                                a_t).chunk(2)
    return ddim_step(z, guided_eps(eps_u, eps_c, w), a_t, a_prev)


def null_text_optimize(pipe: Pipeline, pivots: list[torch.Tensor], cond: torch.Tensor, uncond: torch.Tensor,
                       schedule: DDIMSchedule, weights: list[float], inner_steps: int = 10, lr: float = 1e-2,
                       early_stop: bool = True, epsilon: float = 1e-5, progress: bool = False,
                       grad_mask: torch.Tensor | None = None):
    """Null-text optimization, paper Algorithm 1: per step, fit the null embedding so the guided step hits z*_{t-1}.

    grad_mask (models.null_grad_mask): entries with 0 keep their start value (SDXL's pooled row, when asked).
    Returns (embeddings (steps, *context shape), inner iterations per step, last loss per step).
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
            eps_c = schedule.eps(unet_eps(pipe, z, t, cond), z, a_t)  # once per step, reused by every iteration
        done, loss_value = 0, float("nan")
        for _ in range(inner_steps):
            eps_u = schedule.eps(unet_eps(pipe, z, t, uncond), z, a_t)
            z_prev = ddim_step(z, guided_eps(eps_u, eps_c, weights[i]), a_t, a_prev)
            loss = F.mse_loss(z_prev, target)
            optimizer.zero_grad()
            loss.backward()
            if grad_mask is not None:
                uncond.grad.mul_(grad_mask)
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


def _pivot(pivots: torch.Tensor, i: int) -> torch.Tensor:
    """z*_{t-1} of denoising step i from the stored trajectory z*_0 .. z*_T."""
    return pivots[len(pivots) - i - 2][None]


@torch.no_grad()
def sample(pipe: Pipeline, job: EditJob, progress: bool = False) -> torch.Tensor:
    """DDIM sampling with CFG from job.z_T under job.cond, with the job's null embedding of each step.

    With job.pivots (direct inversion under the source prompt) the offset to the pivot z*_{t-1} is added back after
    each step (Ju et al. 2023), so the latent retraces the inversion: its reconstruction."""
    z = job.z_T
    for i in tqdm(range(job.schedule.steps), desc="DDIM sampling", disable=not progress, leave=False):
        z = guided_step(pipe, z, i, job.schedule, job.null_at(i), job.cond, job.weights[i])
        if job.pivots is not None:
            z = z + (_pivot(job.pivots, i) - z)  # the offset z*_{t-1} - z~_{t-1}: z*_{t-1} up to rounding
    return z


@torch.no_grad()
def p2p_sample(pipe: Pipeline, job: EditJob, controller: P2PController | None = None,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-to-prompt editing from z_T (NTI notebook): the source branch (job.cond_source) and the target branch
    (job.cond) run as one UNet batch [uncond src, uncond tgt, cond src, cond tgt], both with the step's null
    embedding; the controller gives the target the source's attention and blends locally after each step (None:
    the branches only share the batch).

    job.pivots: direct inversion (Ju et al. 2023). After each step the offset d = z*_{t-1} - z~src_{t-1} from the
    source branch's guided step to the DDIM pivot is added to the source branch, which so stays on the inversion
    trajectory; the target branch gets d too only with job.offset_target (the official code's 'add-source' ablation;
    its main method leaves the target alone). The offset is formed here rather than stored at inversion: the same in
    exact arithmetic, and the source branch stays on the trajectory even when this batch rounds differently from
    the inversion's (the random tiny model at w=7.5 turns a 1e-7 change of z_T into a 3% error within 6 steps).
    Returns (source latent, target latent), each (1, 4, h, w)."""
    schedule, z_T = job.schedule, job.z_T
    z = torch.cat([z_T, z_T])  # [source, target]
    control = contextlib.nullcontext()
    if controller is not None:
        control = attention_control(pipe.unet, controller, z_T.shape[-1])
    with control:
        for i in tqdm(range(schedule.steps), desc="prompt-to-prompt", disable=not progress, leave=False):
            if controller is not None:
                controller.step = i
            t = schedule.timesteps[i]
            a_t, a_prev = schedule.denoise_alphas(i)
            null = job.null_at(i)
            context = torch.cat([null, null, job.cond_source, job.cond])
            zz = torch.cat([z, z])
            eps_u, eps_c = schedule.eps(unet_eps(pipe, zz, t, context), zz, a_t).chunk(2)
            z = ddim_step(z, guided_eps(eps_u, eps_c, job.weights[i]), a_t, a_prev)
            if job.pivots is not None:
                offset = _pivot(job.pivots, i) - z[:1]
                z = z + torch.cat([offset, offset if job.offset_target else torch.zeros_like(offset)])
            if controller is not None:
                z = controller.blend_latents(z)
    return z[:1], z[1:]

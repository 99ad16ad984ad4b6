"""DDIM math (Song et al. 2021) and classifier-free guidance schedules, as the null-text notebook uses them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler


@dataclass
class DDIMSchedule:
    """Timesteps and cumulative alphas of one DDIM run; `alpha(t)` is alpha_bar_t with t < 0 -> final alpha."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) fp32, as diffusers computes them
    timesteps: list[int]  # denoising order, e.g. 981, 961, ..., 1 (SD v1.4's steps_offset=1)
    step_ratio: int
    final_alpha: float  # alpha_bar for t < 0; set_alpha_to_one=False -> alphas_cumprod[0] (SD v1.x, notebook)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.final_alpha

    def denoise_alphas(self, i: int) -> tuple[float, float]:
        """(alpha_bar_t, alpha_bar_prev) of denoising step i (t = timesteps[i])."""
        t = self.timesteps[i]
        return self.alpha(t), self.alpha(t - self.step_ratio)

    def invert_alphas(self, i: int) -> tuple[int, float, float]:
        """(t, alpha_bar_from, alpha_bar_to) of inversion step i, walking timesteps in ascending order."""
        t = self.timesteps[self.steps - 1 - i]
        return t, self.alpha(t - self.step_ratio), self.alpha(t)


def make_schedule(scheduler_config: dict, steps: int, steps_offset: int | None = None) -> DDIMSchedule:
    """DDIM timesteps ('leading' spacing) and alphas from a model's scheduler config, betas as diffusers builds them;
    steps_offset None = the config's own (SD v1.4: 1, t = 981..1)."""
    if steps_offset is None:
        steps_offset = int(scheduler_config.get("steps_offset", 0))
    scheduler = DDIMScheduler.from_config(
        scheduler_config, clip_sample=False, set_alpha_to_one=False, steps_offset=steps_offset,
        timestep_spacing="leading", prediction_type="epsilon")
    scheduler.set_timesteps(steps)
    return DDIMSchedule(
        alphas_cumprod=scheduler.alphas_cumprod.to(torch.float32),
        timesteps=[int(t) for t in scheduler.timesteps],
        step_ratio=scheduler.config.num_train_timesteps // steps,
        final_alpha=float(scheduler.final_alpha_cumprod),
    )


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_from, a_to) -> torch.Tensor:
    """DDIM update, Song et al. 2021 Eq. 12 (eta=0): predict x0 at a_from, move it to a_to along eps."""
    a_from = torch.as_tensor(a_from, dtype=torch.float32, device=x.device)
    a_to = torch.as_tensor(a_to, dtype=torch.float32, device=x.device)
    if a_from.ndim == 1:  # per-image coefficients
        a_from, a_to = a_from.view(-1, 1, 1, 1), a_to.view(-1, 1, 1, 1)
    eps = eps.float()
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def guided_eps(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, w) -> torch.Tensor:
    """Classifier-free guidance, Ho & Salimans 2022: eps_u + w (eps_c - eps_u)."""
    w = torch.as_tensor(w, dtype=torch.float32, device=eps_uncond.device)
    if w.ndim == 1:
        w = w.view(-1, 1, 1, 1)
    eps_uncond, eps_cond = eps_uncond.float(), eps_cond.float()
    return eps_uncond + w * (eps_cond - eps_uncond)


def guidance_weights(guidance: float, steps: int, schedule: str = "constant", guidance_min: float = 1.0) -> list[float]:
    """Per-denoising-step guidance weight: constant, or linear / cosine decay from `guidance` to `guidance_min`."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown guidance schedule {schedule!r}")
    if schedule == "constant" or steps == 1:
        return [float(guidance)] * steps
    weights = []
    for i in range(steps):
        frac = i / (steps - 1)  # 0 at t=T (first denoising step), 1 at the last
        keep = 1 - frac if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
        weights.append(guidance_min + (guidance - guidance_min) * keep)
    return weights

"""DDIM math (Song et al. 2021) and classifier-free guidance schedules, as the null-text notebook uses them."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler

from .config import NTIError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what a UNet's output means (scheduler_config)
SPACINGS = ("leading", "trailing", "linspace")  # DDIMScheduler's timestep_spacing (Lin et al. 2023, Table 2)


def _coefficient(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar, or one value per image as (B, 1, 1, 1), fp32 on `like`'s device: what broadcasts against latents."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    return value.view(-1, 1, 1, 1) if value.ndim == 1 else value


def eps_from_prediction(output: torch.Tensor, x: torch.Tensor, a, prediction_type: str) -> torch.Tensor:
    """The noise eps that a UNet output implies at x with alpha_bar a: epsilon as is; v (Salimans & Ho 2022, Eq. 9
    inverted) eps = sqrt(a) v + sqrt(1 - a) x; a predicted sample x0: eps = (x - sqrt(a) x0) / sqrt(1 - a).
    Linear in the output, so guidance on converted outputs equals guidance on the raw ones."""
    if prediction_type == "epsilon":
        return output
    a = _coefficient(a, x)
    output, x = output.float(), x.float()
    if prediction_type == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x
    if prediction_type == "sample":
        return (x - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


@dataclass
class DDIMSchedule:
    """Timesteps and cumulative alphas of one DDIM run; `alpha(t)` is alpha_bar_t with t < 0 -> final alpha."""

    alphas_cumprod: torch.Tensor  # (num_train_timesteps,) fp32, as diffusers computes them
    timesteps: list[int]  # denoising order, e.g. 981, 961, ..., 1 (SD v1.4's steps_offset=1)
    step_ratio: int
    final_alpha: float  # alpha_bar for t < 0: alphas_cumprod[0] (set_alpha_to_one False: SD v1.x, notebook) or 1
    prediction_type: str = "epsilon"  # the UNet's output: eps (SD v1.x, 2.x base), v (SD 2.x 768 px) or x0

    def eps(self, output: torch.Tensor, x: torch.Tensor, a) -> torch.Tensor:
        """The UNet's output at x as noise eps, with a = the alpha_bar the DDIM step takes x at (as diffusers'
        DDIMScheduler and DDIMInverseScheduler do); the identity for epsilon models."""
        return eps_from_prediction(output, x, a, self.prediction_type)

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


def scheduler_problems(scheduler_config: dict) -> list[str]:
    """What in a scheduler config the DDIM step here (Eq. 12 on eps, no x0 clipping) cannot follow; [] if nothing."""
    why = []
    kind = str(scheduler_config.get("_class_name", ""))
    if kind.startswith(("EDM", "FlowMatch")):  # no betas: DDIMScheduler.from_config would use its default ones
        why.append(f"its scheduler is {kind}, whose noise levels are EDM sigmas or flow-matching times, not the DDPM "
                   f"betas this DDIM step is built from")
    prediction = scheduler_config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        why.append(f"its scheduler predicts {prediction!r}, which is none of {', '.join(PREDICTION_TYPES)}")
    spacing = scheduler_config.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:
        why.append(f"its scheduler has timestep_spacing {spacing!r}, which is none of {', '.join(SPACINGS)}")
    if scheduler_config.get("thresholding"):  # diffusers' DDIMScheduler.step would; silently not doing it is wrong
        why.append("its scheduler thresholds the predicted x0 (dynamic thresholding, Saharia et al. 2022), which "
                   "this DDIM step and the null-text loss do not")
    if scheduler_config.get("rescale_betas_zero_snr"):
        why.append("its scheduler rescales betas to zero terminal SNR: alpha_bar = 0 at the last timestep, where the "
                   "DDIM step's x0 = (x - sqrt(1 - a) eps) / sqrt(a) divides by zero")
    if prediction == "sample" and scheduler_config.get("set_alpha_to_one"):
        why.append("its scheduler predicts x0 with set_alpha_to_one: the first inversion step starts at alpha_bar = 1, "
                   "where the noise eps = (x - x0) / sqrt(1 - alpha_bar) is 0/0")
    return why


def make_schedule(scheduler_config: dict, steps: int, steps_offset: int | None = None) -> DDIMSchedule:
    """DDIM timesteps and alphas from a model's scheduler config as diffusers' DDIMScheduler builds them (betas, the
    config's timestep_spacing and set_alpha_to_one; when absent the notebook's 'leading' and False); steps_offset
    None = the config's own (SD v1.4: 1, t = 981..1), which only 'leading' spacing uses."""
    own_offset = int(scheduler_config.get("steps_offset", 0))
    if steps_offset is None:
        steps_offset = own_offset
    why = scheduler_problems(scheduler_config)
    if why:
        raise NTIError(f"this engine's DDIM step cannot run the model's scheduler config: {'; '.join(why)}")
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    spacing = scheduler_config.get("timestep_spacing", "leading")
    if spacing != "leading" and steps_offset != own_offset:  # diffusers drops it there: say so rather than ignore it
        raise NTIError(f"steps_offset {steps_offset}: the model's {spacing!r} timestep spacing takes no offset; "
                       f"leave steps_offset unset")
    # clip_sample off as StableDiffusionPipeline forces it (SD latents are not in [-1, 1])
    scheduler = DDIMScheduler.from_config(
        scheduler_config, clip_sample=False, set_alpha_to_one=bool(scheduler_config.get("set_alpha_to_one", False)),
        steps_offset=steps_offset, timestep_spacing=spacing, prediction_type=prediction_type)
    train_steps = scheduler.config.num_train_timesteps
    if steps > train_steps:  # diffusers: a ValueError from set_timesteps
        raise NTIError(f"steps {steps}: the model has only {train_steps} training timesteps")
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    if max(timesteps) >= train_steps:  # diffusers would index alphas_cumprod out of range in its first step
        raise NTIError(f"steps_offset {steps_offset} with {steps} steps reaches timestep {max(timesteps)}; the model "
                       f"has {train_steps} (0..{train_steps - 1})")
    return DDIMSchedule(
        alphas_cumprod=scheduler.alphas_cumprod.to(torch.float32),
        timesteps=timesteps,
        step_ratio=scheduler.config.num_train_timesteps // steps,
        final_alpha=float(scheduler.final_alpha_cumprod),
        prediction_type=prediction_type,
    )


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a_from, a_to) -> torch.Tensor:
    """DDIM update, Song et al. 2021 Eq. 12 (eta=0): predict x0 at a_from, move it to a_to along eps."""
    a_from, a_to = _coefficient(a_from, x), _coefficient(a_to, x)  # scalars or per-image
    eps = eps.float()
    x0 = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
    return a_to.sqrt() * x0 + (1 - a_to).sqrt() * eps


def guided_eps(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, w) -> torch.Tensor:
    """Classifier-free guidance, Ho & Salimans 2022: eps_u + w (eps_c - eps_u)."""
    w = _coefficient(w, eps_uncond)
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

"""Python API: invert images, then edit or reconstruct them from the saved inversion."""
from __future__ import annotations

import time
from typing import Sequence

import torch
from PIL import Image

from .artifact import Inversion
from .config import NTIConfig, NTIError
from .ddim import guidance_weights, make_schedule
from .images import center_square, load_image, pixel_hash, to_pil, to_tensor
from .models import Pipeline, decode_latents, encode_images, encode_prompts
from . import reference


def _check_prompts(prompts: Sequence[str], n: int, what: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise NTIError(f"{what}: got {len(prompts)} prompts for {n} images")
    for p in prompts:
        if not isinstance(p, str):
            raise NTIError(f"{what} must be strings, got {type(p).__name__}")
    return prompts


def null_embedding(pipe: Pipeline) -> torch.Tensor:
    """Embedding of the empty prompt, (1, 77, D): the null text every optimization starts from."""
    if "" not in pipe.uncond_cache:
        pipe.uncond_cache[""] = encode_prompts(pipe, [""])
    return pipe.uncond_cache[""]


def prepare_images(pipe: Pipeline, images) -> tuple[list[Image.Image], torch.Tensor]:
    """Load, centre-crop and resize to the model's resolution; (B, 3, H, W) in [-1, 1]."""
    if isinstance(images, (str, Image.Image)) or not isinstance(images, Sequence):
        images = [images]
    squares = [center_square(load_image(img), pipe.resolution) for img in images]
    if not squares:
        raise NTIError("no images given")
    return squares, torch.cat([to_tensor(img) for img in squares])


def invert(pipe: Pipeline, images, source_prompts: Sequence[str] | str, config: NTIConfig | None = None,
           progress: bool = True) -> list[Inversion]:
    """Invert images under their source prompts: DDIM inversion, then null-text optimization if asked."""
    config = config or NTIConfig()
    config.validate()
    squares, pixels = prepare_images(pipe, images)
    prompts = _check_prompts(source_prompts, len(squares), "source prompts")
    schedule = make_schedule(pipe.scheduler_config, config.steps, config.steps_offset)
    weights = guidance_weights(config.guidance, config.steps, config.guidance_schedule, config.guidance_min)
    start = time.perf_counter()
    z0 = encode_images(pipe, pixels)
    conds = encode_prompts(pipe, prompts)
    encode_s = (time.perf_counter() - start) / len(squares)

    if config.backend == "fast":
        from . import fast
        results = fast.invert_batch(pipe, z0, conds, null_embedding(pipe), schedule, weights, config, progress)
    else:
        results = [_invert_reference(pipe, z0[k:k + 1], conds[k:k + 1], schedule, weights, config, progress)
                   for k in range(len(squares))]

    inversions = []
    for k, res in enumerate(results):
        res["timings"]["encode_s"] = encode_s
        inversions.append(Inversion(
            z_T=res["z_T"].reshape(z0.shape[1:]).float().cpu(), z_0=z0[k].float().cpu(),
            null_embeddings=None if res["embeddings"] is None else res["embeddings"].float().cpu(),
            source_prompt=prompts[k], image_hash=pixel_hash(squares[k]), model_name=pipe.name,
            model_fingerprint=pipe.fingerprint, settings=config.result_settings(), iterations=res["iterations"],
            losses=res["losses"], fp32_retries=res.get("fp32_retries", []), timings=res["timings"]))
    return inversions


def _invert_reference(pipe, z0, cond, schedule, weights, config, progress) -> dict:
    """The faithful batch-1 path (engine/reference.py) for one image."""
    start = time.perf_counter()
    pivots = reference.ddim_invert(pipe, z0, cond, schedule, progress)
    timings = {"ddim_invert_s": time.perf_counter() - start}
    if config.method == "ddim":
        return {"z_T": pivots[-1], "embeddings": None, "iterations": [], "losses": [], "timings": timings}
    start = time.perf_counter()
    embeddings, iterations, losses = reference.null_text_optimize(
        pipe, pivots, cond, null_embedding(pipe), schedule, weights, config.inner_steps, config.lr,
        config.early_stop, config.early_stop_eps, progress)
    timings["null_text_s"] = time.perf_counter() - start
    return {"z_T": pivots[-1], "embeddings": embeddings, "iterations": iterations, "losses": losses,
            "timings": timings}


def check_compatible(pipe: Pipeline, inv: Inversion) -> None:
    """Refuse to edit an inversion made with another model: it would give a silently wrong image."""
    if inv.model_fingerprint != pipe.fingerprint:
        raise NTIError(f"this inversion was made with model {inv.model_name!r} ({inv.model_fingerprint}), "
                       f"not the loaded {pipe.name!r} ({pipe.fingerprint}); load that model or invert again")


def edit_latents(pipe: Pipeline, inversions: Sequence[Inversion], target_prompts: Sequence[str] | str,
                 config: NTIConfig | None = None, progress: bool = True) -> torch.Tensor:
    """Regenerate each inversion under its target prompt with its own per-step null embeddings; (B, 4, h, w)."""
    inversions = list(inversions)
    prompts = _check_prompts(target_prompts, len(inversions), "target prompts")
    for inv in inversions:
        check_compatible(pipe, inv)
    config = config or NTIConfig()
    outputs = []
    for inv, prompt in zip(inversions, prompts):
        s = inv.settings
        schedule = make_schedule(pipe.scheduler_config, s["steps"], s["steps_offset"])
        weights = guidance_weights(s["guidance"], s["steps"], s["guidance_schedule"], s["guidance_min"])
        null = inv.null_embeddings if inv.null_embeddings is not None else null_embedding(pipe).cpu()
        outputs.append((inv.z_T[None].to(pipe.device), encode_prompts(pipe, [prompt]), null.to(pipe.device),
                        schedule, weights))
    if config.backend == "fast":
        from . import fast
        return fast.sample_batch(pipe, outputs, config, progress)
    return torch.cat([reference.sample(pipe, z, c, n, sch, w, progress) for z, c, n, sch, w in outputs])


def edit(pipe: Pipeline, inversions: Sequence[Inversion], target_prompts: Sequence[str] | str,
         config: NTIConfig | None = None, progress: bool = True) -> list[Image.Image]:
    """Edited images (PIL, the model's resolution) of inversions under target prompts."""
    return to_pil(decode_latents(pipe, edit_latents(pipe, inversions, target_prompts, config, progress)))


def reconstruct(pipe: Pipeline, inversions: Sequence[Inversion], config: NTIConfig | None = None,
                progress: bool = True) -> list[Image.Image]:
    """Reconstruction: editing with the source prompt as the target."""
    inversions = list(inversions)
    return edit(pipe, inversions, [inv.source_prompt for inv in inversions], config, progress)


@torch.no_grad()
def generate(pipe: Pipeline, prompts: Sequence[str] | str, config: NTIConfig | None = None,
             progress: bool = True) -> list[Image.Image]:
    """Text-to-image from seeded noise with CFG (the evaluation's baseline: no inversion at all)."""
    config = config or NTIConfig()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    schedule = make_schedule(pipe.scheduler_config, config.steps, config.steps_offset)
    weights = guidance_weights(config.guidance, config.steps, config.guidance_schedule, config.guidance_min)
    generator = torch.Generator().manual_seed(config.seed)
    out = []
    for prompt in prompts:
        z = torch.randn((1, *pipe.latent_shape), generator=generator).to(pipe.device)
        out.append(reference.sample(pipe, z, encode_prompts(pipe, [prompt]), null_embedding(pipe), schedule,
                                    weights, progress))
    return to_pil(decode_latents(pipe, torch.cat(out)))

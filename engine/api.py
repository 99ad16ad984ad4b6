"""Python API: invert images, then edit or reconstruct them from the saved inversion."""
from __future__ import annotations

import sys
import time
from typing import Sequence

import torch
from PIL import Image

from .artifact import Inversion
from .config import NTIConfig, NTIError
from .ddim import guidance_weights, make_schedule
from .images import center_square, load_image, pixel_hash, to_pil, to_tensor
from .models import Pipeline, decode_latents, encode_images, encode_prompts, strict_fp32
from .validate import check_prompt_length, prompt_words
from . import reference


def _check_prompts(prompts: Sequence[str], n: int | None, what: str, pipe: Pipeline | None = None) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts] * n
    prompts = list(prompts)
    if n is not None and len(prompts) != n:
        raise NTIError(f"{what}: got {len(prompts)} prompts for {n} images")
    for p in prompts:
        if not isinstance(p, str):
            raise NTIError(f"{what} must be strings, got {type(p).__name__}")
    if pipe is not None:
        check_vocabulary(pipe, prompts)
        check_prompt_length(pipe.tokenizer, prompts)
    return prompts


def check_vocabulary(pipe: Pipeline, prompts: Sequence[str]) -> None:
    """A closed-vocabulary model (the shapes model) refuses words it never saw instead of drawing noise for them."""
    if not pipe.vocabulary:
        return
    known = set(pipe.vocabulary)
    unknown = sorted({w for p in prompts for w in prompt_words(p) if w not in known})
    if unknown:
        like = f" captions like {pipe.prompt_example!r}" if pipe.prompt_example else ""
        raise NTIError(f"the {pipe.name} model does not know the word(s) {', '.join(map(repr, unknown))}; it was "
                       f"trained on{like} using only: {' '.join(pipe.vocabulary)}. Pass --model PATH for a Stable "
                       f"Diffusion folder")


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


@strict_fp32
def invert(pipe: Pipeline, images, source_prompts: Sequence[str] | str, config: NTIConfig | None = None,
           progress: bool = True) -> list[Inversion]:
    """Invert images under their source prompts: DDIM inversion, then what config.method adds to it (null-text
    optimization, the negative-prompt null; direct inversion keeps the DDIM pivots)."""
    config = config or NTIConfig()
    config.validate()
    squares, pixels = prepare_images(pipe, images)
    prompts = _check_prompts(source_prompts, len(squares), "source prompts", pipe)
    schedule = make_schedule(pipe.scheduler_config, config.steps, config.timestep_offset(pipe.scheduler_config))
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
            pivots=None if res.get("pivots") is None else res["pivots"].reshape(-1, *z0.shape[1:]).float().cpu(),
            source_prompt=prompts[k], image_hash=pixel_hash(squares[k]), model_name=pipe.name,
            model_fingerprint=pipe.fingerprint, settings=config.result_settings(pipe.scheduler_config),
            iterations=res["iterations"],
            losses=res["losses"], fp32_retries=res.get("fp32_retries", []), timings=res["timings"]))
    return inversions


def invert_cached(pipe: Pipeline, images, source_prompts: Sequence[str], config: NTIConfig,
                  cache=None, progress: bool = True) -> list[Inversion]:
    """invert(), reusing saved inversions in a `cache` folder and saving new ones there batch by batch (resumable;
    runs sharing the folder share the work; damaged entries are moved aside and redone): engine/cache.py."""
    from .cache import invert_cached as run
    return run(pipe, images, source_prompts, config, cache, progress)


def _invert_reference(pipe, z0, cond, schedule, weights, config, progress) -> dict:
    """The faithful batch-1 path (engine/reference.py) for one image."""
    start = time.perf_counter()
    pivots = reference.ddim_invert(pipe, z0, cond, schedule, progress)
    timings = {"ddim_invert_s": time.perf_counter() - start}
    if config.method == "ddim":
        return {"z_T": pivots[-1], "embeddings": None, "iterations": [], "losses": [], "timings": timings}
    if config.method == "negative-prompt":  # Miyake et al. 2023: the null text is the source prompt, no optimization
        return {"z_T": pivots[-1], "embeddings": cond.clone(), "iterations": [0] * schedule.steps, "losses": [],
                "timings": timings}
    if config.method == "direct":  # Ju et al. 2023: editing works against the pivots themselves
        return {"z_T": pivots[-1], "embeddings": None, "pivots": torch.cat(pivots), "iterations": [], "losses": [],
                "timings": timings}
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
    # the same model, yet tensors of other shapes: a damaged or hand-edited file
    width = (pipe.tokenizer.model_max_length, pipe.text_encoder.config.hidden_size)
    if tuple(inv.z_T.shape) != tuple(pipe.latent_shape) or (
            inv.null_embeddings is not None and tuple(inv.null_embeddings.shape[1:]) != width):
        raise NTIError(f"this inversion's tensors (z_T {tuple(inv.z_T.shape)}, null embeddings "
                       f"{None if inv.null_embeddings is None else tuple(inv.null_embeddings.shape)}) do not fit the "
                       f"model (latent {tuple(pipe.latent_shape)}, embeddings (steps, *{width})); invert again")


def _method(inv: Inversion) -> str:
    return inv.settings.get("method", "null-text" if inv.null_embeddings is not None else "ddim")


def _edit_job(pipe: Pipeline, inv: Inversion, prompt: str) -> dict:
    """What editing one inversion needs, on the pipeline's device."""
    s = inv.settings
    direct = _method(inv) == "direct"
    if direct and inv.pivots is None:
        raise NTIError("this direct inversion has no pivots (an artifact written without them); invert again")
    null = inv.null_embeddings if inv.null_embeddings is not None else null_embedding(pipe).cpu()
    return {"z_T": inv.z_T[None].to(pipe.device), "cond": encode_prompts(pipe, [prompt]),
            "null": null.to(pipe.device), "pivots": inv.pivots.to(pipe.device) if direct else None,
            "schedule": make_schedule(pipe.scheduler_config, s["steps"], s["steps_offset"]),
            "weights": guidance_weights(s["guidance"], s["steps"], s["guidance_schedule"], s["guidance_min"])}


@strict_fp32
def edit_latents(pipe: Pipeline, inversions: Sequence[Inversion], target_prompts: Sequence[str] | str,
                 config: NTIConfig | None = None, progress: bool = True) -> torch.Tensor:
    """Edit each inversion under its target prompt, as config.edit says; (B, 4, h, w) latents of the edits.

    'regenerate': the target prompt alone from z_T with the inversion's nulls. P2P modes: the source and the target
    branch together (engine/p2p.py). Direct inversion always runs the source branch beside the target and adds back
    its offset to the pivots (reference.p2p_sample); the target gets that offset too under 'regenerate' (nothing
    else would carry the inversion to it) and in P2P modes only with direct_target_offset='source'. A direct
    inversion edited to its own prompt (same tokens, no reweighting) is its reconstruction and runs as one branch:
    the target branch of a P2P pair would lack the offsets that keep the source exact. (For the other methods both
    branches of such an edit agree to float error, so they are simply run.)
    """
    inversions = list(inversions)
    prompts = _check_prompts(target_prompts, len(inversions), "target prompts", pipe)
    for inv in inversions:
        check_compatible(pipe, inv)
    config = config or NTIConfig()
    from . import p2p
    plans: dict = {}  # image index -> P2P plan (None: two branches without attention control); errors come first
    for k, (inv, prompt) in enumerate(zip(inversions, prompts)):
        direct = _method(inv) == "direct"
        if direct and p2p.is_identity(pipe.tokenizer, inv.source_prompt, prompt, config):
            continue
        if config.edit != "regenerate":
            plans[k] = p2p.make_plan(pipe.tokenizer, inv.source_prompt, prompt, config)
        elif direct:
            plans[k] = None
    jobs = [_edit_job(pipe, inv, prompt) for inv, prompt in zip(inversions, prompts)]
    out: list = [None] * len(jobs)
    single = [k for k in range(len(jobs)) if k not in plans]
    if single:
        for k, z in zip(single, _regenerate(pipe, [jobs[k] for k in single], config, progress)):
            out[k] = z
    if plans:
        ks = sorted(plans)
        for k in ks:
            jobs[k]["cond_source"] = encode_prompts(pipe, [inversions[k].source_prompt])
            jobs[k]["plan"] = plans[k]
            # the target's share of direct inversion's offset: always without attention control, else as configured
            jobs[k]["offset_target"] = plans[k] is None or config.direct_target_offset == "source"
        for k, z in zip(ks, _two_branch(pipe, [jobs[k] for k in ks], config, progress)):
            out[k] = z
    return torch.cat(out)


def _regenerate(pipe: Pipeline, jobs: list[dict], config: NTIConfig, progress: bool) -> list[torch.Tensor]:
    if config.backend == "fast":
        from . import fast
        return list(fast.sample_batch(pipe, jobs, config, progress).split(1))
    return [reference.sample(pipe, j["z_T"], j["cond"], j["null"], j["schedule"], j["weights"], progress,
                             j["pivots"]) for j in jobs]


def _two_branch(pipe: Pipeline, jobs: list[dict], config: NTIConfig, progress: bool) -> list[torch.Tensor]:
    if config.backend == "fast":
        from . import fast
        return list(fast.p2p_sample_batch(pipe, jobs, config, progress).split(1))
    from .p2p import P2PController
    out = []
    for j in jobs:
        controller = None if j["plan"] is None else P2PController([j["plan"]], config, j["schedule"].steps,
                                                                   pipe.device, explicit=True)
        _, target = reference.p2p_sample(pipe, j["z_T"], j["cond_source"], j["cond"], j["null"], j["schedule"],
                                         j["weights"], controller, j["pivots"], j["offset_target"], progress)
        out.append(target)
    return out


def edit(pipe: Pipeline, inversions: Sequence[Inversion], target_prompts: Sequence[str] | str,
         config: NTIConfig | None = None, progress: bool = True) -> list[Image.Image]:
    """Edited images (PIL, the model's resolution) of inversions under target prompts, by config.edit."""
    return to_pil(decode_latents(pipe, edit_latents(pipe, inversions, target_prompts, config, progress)))


def reconstruct(pipe: Pipeline, inversions: Sequence[Inversion], config: NTIConfig | None = None,
                progress: bool = True) -> list[Image.Image]:
    """Reconstruction: regenerating with the source prompt as the target (P2P with identical prompts is the same
    image at twice the cost, so the edit mode is not used here)."""
    inversions = list(inversions)
    config = (config or NTIConfig()).replace(edit="regenerate", reweight=(), blend_words=())
    return edit(pipe, inversions, [inv.source_prompt for inv in inversions], config, progress)


@strict_fp32
@torch.no_grad()
def generate(pipe: Pipeline, prompts: Sequence[str] | str, config: NTIConfig | None = None,
             progress: bool = True) -> list[Image.Image]:
    """Text-to-image from seeded noise with CFG (the evaluation's baseline: no inversion at all)."""
    config = config or NTIConfig()
    prompts = _check_prompts([prompts] if isinstance(prompts, str) else list(prompts), None, "prompts", pipe)
    schedule = make_schedule(pipe.scheduler_config, config.steps, config.timestep_offset(pipe.scheduler_config))
    weights = guidance_weights(config.guidance, config.steps, config.guidance_schedule, config.guidance_min)
    generator = torch.Generator().manual_seed(config.seed)
    out = []
    for prompt in prompts:
        z = torch.randn((1, *pipe.latent_shape), generator=generator).to(pipe.device)
        out.append(reference.sample(pipe, z, encode_prompts(pipe, [prompt]), null_embedding(pipe), schedule,
                                    weights, progress))
    return to_pil(decode_latents(pipe, torch.cat(out)))

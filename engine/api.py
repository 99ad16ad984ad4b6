"""Python API: invert images, then edit or reconstruct them from the saved inversion."""
from __future__ import annotations

import logging
import os
import time
from typing import Sequence

import torch
from PIL import Image

from .artifact import Inversion, check_inversion
from .config import ALGORITHM, SPEED, NTIConfig, NTIError
from .ddim import guidance_weights, make_schedule
from .images import load_square, pixel_hash, to_pil, to_tensor
from .methods import DIRECT, EditJob, InversionResult, from_pivots, optimizes_null_text
from .conditioning import conditioning_record, null_grad_mask
from .models import (Pipeline, check_clip_skip, decode_latents, encode_images, encode_prompts, refresh_identity,
                     strict_fp32)
from .validate import WORD, check_finite_latents, check_prompt_length, prompt_words
from . import p2p, reference

log = logging.getLogger("nti")


def _check_pipe(pipe) -> None:
    if not isinstance(pipe, Pipeline):  # a model name is the likely mistake: 'str' object has no attribute ...
        raise NTIError(f"pipe must be a Pipeline from nti.load_pipeline(...); got {type(pipe).__name__}")
    # the engine runs fp32 weights (the reference is the truth); half weights failed deep inside torch: "mat1 and
    # mat2 must have the same dtype"
    dtypes = {next(m.parameters()).dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)}
    if dtypes != {torch.float32}:
        raise NTIError(f"the pipeline's weights are {', '.join(sorted(map(str, dtypes)))}; load it with "
                       f"dtype=torch.float32 and ask NTIConfig(backend='fast', precision='bf16' or 'fp16') for "
                       f"half-precision UNet compute")
    refresh_identity(pipe)  # weights changed in Python since load are another model


def _check_config(config, warn: bool = True) -> NTIConfig:
    """config (None: the defaults), validated again: a field assigned after construction is checked too."""
    if config is None:
        return NTIConfig()
    if not isinstance(config, NTIConfig):
        raise NTIError(f"config must be an nti.NTIConfig, e.g. NTIConfig(steps=20), or None; got "
                       f"{type(config).__name__}")
    config.validate()
    if warn and config.backend == "reference":  # the eager fp32 truth: a speed setting would be dropped unsaid
        import dataclasses
        import warnings

        ignored = [f.name for f in dataclasses.fields(config) if f.metadata["group"] == SPEED
                   and f.name != "backend" and getattr(config, f.name) != f.default]
        if ignored:
            warnings.warn(f"{', '.join(ignored)} act on the fast backend only; the reference backend runs eager fp32 "
                          f"and ignores them (backend='fast')", stacklevel=3)
    return config


def _check_inversions(inversions) -> list[Inversion]:
    """A list of Inversions (one alone is taken as a list of one, as invert takes one image), each one agreeing
    with itself: an in-memory Inversion may have been changed since invert made it."""
    if isinstance(inversions, Inversion):
        inversions = [inversions]
    try:
        inversions = list(inversions)
    except TypeError:
        raise NTIError(f"inversions must be a list of nti.Inversion, got {type(inversions).__name__}") from None
    if not inversions:
        raise NTIError("no inversions given")
    for k, inv in enumerate(inversions):
        if not isinstance(inv, Inversion):
            hint = "; read a file with nti.load_inversion" if isinstance(inv, (str, os.PathLike)) else ""
            raise NTIError(f"inversions[{k}] is a {type(inv).__name__}, not an nti.Inversion (what nti.invert "
                           f"returns){hint}")
        try:
            check_inversion(inv, finite=False)  # a diverged one is edited as it is, with a warning (nti eval)
        except NTIError as err:
            raise NTIError(f"inversions[{k}]: {err}; invert again") from None
    return inversions


def _check_prompts(prompts: Sequence[str], n: int | None, what: str, pipe: Pipeline | None = None) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts] * (1 if n is None else n)
    if isinstance(prompts, (bytes, bytearray)):  # list() would make one prompt of each byte, a number
        raise NTIError(f"{what} must be a string or a list of strings, got {type(prompts).__name__}")
    try:
        prompts = list(prompts)
    except TypeError:  # None, a number: list() would say "'NoneType' object is not iterable"
        raise NTIError(f"{what} must be a string or a list of strings, got {type(prompts).__name__}") from None
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
    unknown = sorted({w for p in prompts for w in prompt_words(p) if w not in known}
                     # symbols outside words (an emoji, a zero-width space) reach CLIP as byte tokens it never saw
                     | {ch for p in prompts for ch in WORD.sub(" ", p) if not ch.isascii()})
    if unknown:
        like = f" captions like {pipe.prompt_example!r}" if pipe.prompt_example else ""
        raise NTIError(f"the {pipe.name} model does not know the word(s) {', '.join(map(repr, unknown))}; it was "
                       f"trained on{like} using only: {' '.join(pipe.vocabulary)}. Pass --model PATH for a Stable "
                       f"Diffusion folder")


def null_embedding(pipe: Pipeline, clip_skip: int = 0) -> torch.Tensor:
    """The unconditional context, (1, *pipe.context_shape): every optimization starts from it. The empty prompt's
    embedding (notebook), from the layer `clip_skip` says; for SDXL what StableDiffusionXLPipeline feeds its
    unconditional branch: zeros (tokens and pooled) when the model says force_zeros_for_empty_prompt (SDXL base
    does), else the empty prompt's."""
    key = ("", clip_skip)
    if key not in pipe.uncond_cache:
        if pipe.pooled is not None and pipe.pooled.zero_null:
            pipe.uncond_cache[key] = torch.zeros(1, *pipe.context_shape, device=pipe.device)
        else:
            pipe.uncond_cache[key] = encode_prompts(pipe, [""], clip_skip)
    return pipe.uncond_cache[key]


def prepare_images(pipe: Pipeline, images) -> tuple[list[Image.Image], torch.Tensor]:
    """Load, centre-crop and resize to the model's resolution; (B, 3, H, W) in [-1, 1]."""
    if isinstance(images, (str, bytes, Image.Image)) or not isinstance(images, Sequence):
        images = [images]
    squares = [load_square(source, pipe.resolution, f"image {source}" if isinstance(source, (str, os.PathLike))
                           else f"images[{k}]") for k, source in enumerate(images)]
    if not squares:
        raise NTIError("no images given")
    return squares, torch.cat([to_tensor(img) for img in squares])


@strict_fp32
def invert(pipe: Pipeline, images, source_prompts: Sequence[str] | str, config: NTIConfig | None = None,
           progress: bool = True) -> list[Inversion]:
    """Invert images under their source prompts: DDIM inversion, then what config.method adds to it (null-text
    optimization, the negative-prompt null; direct inversion keeps the DDIM pivots)."""
    _check_pipe(pipe)
    config = _check_config(config)
    check_clip_skip(pipe, config.clip_skip)  # before the images' and the VAE's work
    squares, pixels = prepare_images(pipe, images)
    prompts = _check_prompts(source_prompts, len(squares), "source prompts", pipe)
    schedule = make_schedule(pipe.scheduler_config, config.steps, config.timestep_offset(pipe.scheduler_config))
    weights = guidance_weights(config.guidance, config.steps, config.guidance_schedule, config.guidance_min)
    start = time.perf_counter()
    z0 = encode_images(pipe, pixels, config.model_batch)
    conds = encode_prompts(pipe, prompts, config.clip_skip)
    encode_s = (time.perf_counter() - start) / len(squares)

    if config.backend == "fast":
        from . import fast
        results = fast.invert_batch(pipe, z0, conds, null_embedding(pipe, config.clip_skip), schedule, weights, config,
                                    progress)
    else:
        results = [_invert_reference(pipe, z0[k:k + 1], conds[k:k + 1], schedule, weights, config, progress)
                   for k in range(len(squares))]

    inversions = []
    for k, res in enumerate(results):
        res.timings["encode_s"] = encode_s
        inversions.append(Inversion(
            z_T=res.z_T.reshape(z0.shape[1:]).float().cpu(), z_0=z0[k].float().cpu(),
            null_embeddings=None if res.null_embeddings is None else res.null_embeddings.float().cpu(),
            pivots=None if res.pivots is None else res.pivots.reshape(-1, *z0.shape[1:]).float().cpu(),
            source_prompt=prompts[k], image_hash=pixel_hash(squares[k]), model_name=pipe.name,
            model_fingerprint=pipe.fingerprint, settings=config.result_settings(pipe.scheduler_config),
            iterations=res.iterations, losses=res.losses, fp32_retries=res.fp32_retries, timings=res.timings,
            conditioning=conditioning_record(pipe.pooled)))
    # null-text inversion diverges in its embeddings while z_T, DDIM inversion's, stays finite
    _warn_not_finite("inversion", [torch.cat([t.flatten() for t in (inv.z_T, inv.null_embeddings, inv.pivots)
                                              if t is not None]) for inv in inversions], config)
    return inversions


def _warn_not_finite(what: str, tensors, config: NTIConfig) -> None:
    """The Python API returns what it made (nti eval scores a diverged sample as it is), but never without a word:
    the CLI, Ray and nti serve refuse such results instead."""
    bad = [k for k, t in enumerate(tensors) if not torch.isfinite(t).all()]
    if bad:
        which = f"{what}s {bad} are" if len(bad) > 1 else f"{what} {bad[0]} is"
        log.warning("%s not finite (NaN or inf: diverged), so no real image comes of it; %s", which,
                    config.divergence_advice().replace("--", ""))  # the config's field names


def invert_cached(pipe: Pipeline, images, source_prompts: Sequence[str], config: NTIConfig,
                  cache=None, progress: bool = True) -> list[Inversion]:
    """invert(), reusing saved inversions in a `cache` folder and saving new ones there batch by batch (resumable;
    runs sharing the folder share the work; damaged entries are moved aside and redone): engine/cache.py."""
    from .cache import invert_through_cache

    _check_pipe(pipe)  # its fingerprint keys the cache: weights changed since load must have their own
    squares, _ = prepare_images(pipe, images)  # load each image once: its pixels key the cache and feed invert
    prompts = _check_prompts(source_prompts, len(squares), "source prompts", pipe)
    return invert_through_cache(pipe, squares, prompts, config, cache, progress, invert)


def _invert_reference(pipe, z0, cond, schedule, weights, config, progress) -> InversionResult:
    """The faithful batch-1 path (engine/reference.py) for one image."""
    start = time.perf_counter()
    pivots = reference.ddim_invert(pipe, z0, cond, schedule, progress)
    timings = {"ddim_invert_s": time.perf_counter() - start}
    if not optimizes_null_text(config.method):
        return from_pivots(config.method, pivots, cond, schedule.steps, timings=timings)[0]
    start = time.perf_counter()
    embeddings, iterations, losses = reference.null_text_optimize(
        pipe, pivots, cond, null_embedding(pipe, config.clip_skip), schedule, weights, config.inner_steps, config.lr,
        config.early_stop, config.early_stop_eps, progress, null_grad_mask(pipe, config.optimize_pooled))
    timings["null_text_s"] = time.perf_counter() - start
    return InversionResult(z_T=pivots[-1], null_embeddings=embeddings, iterations=iterations, losses=losses,
                           timings=timings)


def check_compatible(pipe: Pipeline, inv: Inversion) -> None:
    """Refuse to edit an inversion made with another model: it would give a silently wrong image."""
    # an inversion saved before whole-file fingerprints names the folder by its legacy fingerprint
    if inv.model_fingerprint not in (pipe.fingerprint, pipe.legacy_fingerprint):
        raise NTIError(f"this inversion was made with model {inv.model_name!r} ({inv.model_fingerprint}), "
                       f"not the loaded {pipe.name!r} ({pipe.fingerprint}); load that model or invert again")
    # the same model, yet tensors of other shapes: a damaged or hand-edited file
    width = pipe.context_shape
    if tuple(inv.z_T.shape) != tuple(pipe.latent_shape) or (
            inv.null_embeddings is not None and tuple(inv.null_embeddings.shape[1:]) != width):
        raise NTIError(f"this inversion's tensors (z_T {tuple(inv.z_T.shape)}, null embeddings "
                       f"{None if inv.null_embeddings is None else tuple(inv.null_embeddings.shape)}) do not fit the "
                       f"model (latent {tuple(pipe.latent_shape)}, embeddings (steps, *{width})); invert again")
    if inv.conditioning and inv.conditioning != conditioning_record(pipe.pooled):
        raise NTIError(f"this inversion was made with SDXL conditioning {inv.conditioning}, the loaded model feeds "
                       f"{conditioning_record(pipe.pooled)}; invert again")


def method_of(inv: Inversion) -> str:
    """The inversion method of an artifact (artifacts older than the setting: null-text if it has embeddings)."""
    return inv.settings.get("method", "null-text" if inv.null_embeddings is not None else "ddim")


def edit_job(pipe: Pipeline, inv: Inversion, prompt: str, config: NTIConfig,
             words: p2p.SampleWords | None = None) -> EditJob:
    """What editing one inversion under `prompt` needs, on the pipeline's device; every per-method and per-mode
    choice of an edit is made here.

    'regenerate': the target prompt alone from z_T with the inversion's nulls. P2P modes: the source and the target
    branch together (engine/p2p.py). Direct inversion always runs the source branch beside the target and adds back
    its offset to the pivots (reference.p2p_sample); the target gets that offset too under 'regenerate' (nothing
    else would carry the inversion to it) and in P2P modes only with direct_target_offset='source'. A direct
    inversion edited to its own prompt (same tokens, no reweighting) is its reconstruction and runs as one branch:
    the target branch of a P2P pair would lack the offsets that keep the source exact. (For the other methods both
    branches of such an edit agree to float error, so they are simply run.)
    """
    s = inv.settings
    direct = method_of(inv) == DIRECT
    if direct and inv.pivots is None:
        raise NTIError("this direct inversion has no pivots (an artifact written without them); invert again")
    reconstruction = direct and p2p.is_identity(pipe.tokenizer, inv.source_prompt, prompt, config, words)
    two_branch = not reconstruction and (config.edit != "regenerate" or direct)
    plan = p2p.make_plan(pipe.tokenizer, inv.source_prompt, prompt, config, words) if (
        two_branch and config.edit != "regenerate") else None
    skip = s.get("clip_skip", 0)  # the target is encoded as the inversion's prompt and null were
    null = inv.null_embeddings if inv.null_embeddings is not None else null_embedding(pipe, skip).cpu()
    # fp32 whatever an in-memory Inversion holds (invert writes fp32; float64 or fp16 would fail in the UNet)
    job = EditJob(z_T=inv.z_T[None].to(pipe.device, torch.float32), cond=encode_prompts(pipe, [prompt], skip),
                  null=null.to(pipe.device, torch.float32),
                  schedule=make_schedule(pipe.scheduler_config, s["steps"], s["steps_offset"]),
                  weights=guidance_weights(s["guidance"], s["steps"], s["guidance_schedule"], s["guidance_min"]),
                  pivots=inv.pivots.to(pipe.device, torch.float32) if direct else None)
    if two_branch:
        job.two_branch, job.plan = True, plan
        job.cond_source = encode_prompts(pipe, [inv.source_prompt], skip)
        # the target's share of direct inversion's offset: always without attention control, else as configured
        job.offset_target = plan is None or config.direct_target_offset == "source"
    return job


@strict_fp32
def edit_latents(pipe: Pipeline, inversions: Sequence[Inversion], target_prompts: Sequence[str] | str,
                 config: NTIConfig | None = None, progress: bool = True,
                 words: Sequence[p2p.SampleWords | None] | None = None) -> torch.Tensor:
    """Edit each inversion under its target prompt, as config.edit says (edit_job decides how); (B, 4, h, w)
    latents of the edits. `words`: each image's own P2P words (p2p.SampleWords) beside the config's, or None."""
    _check_pipe(pipe)
    inversions = _check_inversions(inversions)
    prompts = _check_prompts(target_prompts, len(inversions), "target prompts", pipe)
    for inv in inversions:
        check_compatible(pipe, inv)
    config = _check_config(config)
    _warn_unused_inversion_settings(config, inversions)
    words = _check_words(words, len(inversions), config)
    # every job first: a word or prompt that does not fit is an error before any image is sampled
    jobs = [edit_job(pipe, inv, prompt, config, w) for inv, prompt, w in zip(inversions, prompts, words)]
    out: list = [None] * len(jobs)
    for two_branch, sampler in ((False, _regenerate), (True, _two_branch)):
        ks = [k for k, job in enumerate(jobs) if job.two_branch == two_branch]
        if ks:
            for k, z in zip(ks, sampler(pipe, [jobs[k] for k in ks], config, progress)):
                out[k] = z
    return torch.cat(out)


def _check_words(words, count: int, config: NTIConfig) -> list:
    """One p2p.SampleWords (or None) per image, and only with a prompt-to-prompt edit mode (regenerate has no
    attention to blend or reweight: the words would be dropped without a word)."""
    if words is None:
        return [None] * count
    words = list(words)
    if len(words) != count or not all(w is None or isinstance(w, p2p.SampleWords) for w in words):
        raise NTIError(f"words must be one nti.p2p.SampleWords (or None) per inversion: {count}; got {words!r}")
    if config.edit == "regenerate" and any(w is not None and w.any for w in words):
        raise NTIError("an image's own blend or reweight words act on prompt-to-prompt attention; choose a p2p edit "
                       "mode (edit='p2p-refine', ...)")
    return words


def _warn_unused_inversion_settings(config: NTIConfig, inversions: list[Inversion]) -> None:
    """An edit runs with its inversion's algorithm settings (method, steps, guidance, ...: its null embeddings were
    fitted to them); a config that sets one of them otherwise is not obeyed, which is said, not passed over."""
    import dataclasses
    import warnings

    differ = set()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata["group"] != ALGORITHM or not f.metadata["changes_inversion"] or value == f.default:
            continue
        for inv in inversions:
            theirs = method_of(inv) if f.name == "method" else inv.settings.get(f.name, f.default)
            if theirs != value:
                differ.add(f"{f.name} {value!r} (the inversion's: {theirs!r})")
    if differ:
        warnings.warn(f"edit: not used from the config: {', '.join(sorted(differ))}; an edit runs with the settings "
                      f"its inversion was made with (invert again to edit under others)", stacklevel=3)


def _regenerate(pipe: Pipeline, jobs: list[EditJob], config: NTIConfig, progress: bool) -> list[torch.Tensor]:
    if config.backend == "fast":
        from . import fast
        return list(fast.sample_batch(pipe, jobs, config, progress).split(1))
    return [reference.sample(pipe, job, progress) for job in jobs]


def _two_branch(pipe: Pipeline, jobs: list[EditJob], config: NTIConfig, progress: bool) -> list[torch.Tensor]:
    if config.backend == "fast":
        from . import fast
        return list(fast.p2p_sample_batch(pipe, jobs, config, progress).split(1))
    out = []
    for job in jobs:
        controller = None if job.plan is None else p2p.P2PController([job.plan], config, job.schedule.steps,
                                                                     pipe.device, explicit=True)
        out.append(reference.p2p_sample(pipe, job, controller, progress)[1])
    return out


def edit(pipe: Pipeline, inversions: Sequence[Inversion], target_prompts: Sequence[str] | str,
         config: NTIConfig | None = None, progress: bool = True,
         words: Sequence[p2p.SampleWords | None] | None = None) -> list[Image.Image]:
    """Edited images (PIL, the model's resolution) of inversions under target prompts, by config.edit (`words`:
    each image's own P2P words, as edit_latents)."""
    latents = edit_latents(pipe, inversions, target_prompts, config, progress, words)
    config = _check_config(config, warn=False)  # edit_latents warned
    _warn_not_finite("edit", latents, config)
    return to_pil(decode_latents(pipe, latents, config.model_batch))


def decode_checked(pipe: Pipeline, latents: torch.Tensor, labels: Sequence[str]) -> list[Image.Image | NTIError]:
    """edit's images of edited latents (decoded as one batch, as edit does), with an NTIError in place of each one
    whose latents or pixels are not finite or diverged (validate.check_finite_latents): never a black image."""
    images = decode_latents(pipe, latents)
    out = []
    for label, z, pixels in zip(labels, latents.split(1), images.split(1)):
        try:
            check_finite_latents(z, label)
            check_finite_latents(pixels, label)
        except NTIError as err:
            out.append(err)
            continue
        out.append(to_pil(pixels)[0])
    return out


def reconstruct(pipe: Pipeline, inversions: Sequence[Inversion], config: NTIConfig | None = None,
                progress: bool = True) -> list[Image.Image]:
    """Reconstruction: regenerating with the source prompt as the target (P2P with identical prompts is the same
    image at twice the cost, so the edit mode is not used here)."""
    inversions = _check_inversions(inversions)
    # edit_latents says what the reference ignores, once
    config = _check_config(config, warn=False).replace(edit="regenerate", reweight=(), blend_words=(),
                                                       cross_replace_words=())
    return edit(pipe, inversions, [inv.source_prompt for inv in inversions], config, progress)


@strict_fp32
@torch.no_grad()
def generate(pipe: Pipeline, prompts: Sequence[str] | str, config: NTIConfig | None = None,
             progress: bool = True) -> list[Image.Image]:
    """Text-to-image from seeded noise with CFG (the evaluation's baseline: no inversion at all)."""
    _check_pipe(pipe)
    config = _check_config(config)
    prompts = _check_prompts(prompts, None, "prompts", pipe)
    if not prompts:
        raise NTIError("no prompts given")
    schedule = make_schedule(pipe.scheduler_config, config.steps, config.timestep_offset(pipe.scheduler_config))
    weights = guidance_weights(config.guidance, config.steps, config.guidance_schedule, config.guidance_min)
    generator = torch.Generator().manual_seed(config.seed)
    out = []
    for prompt in prompts:
        z = torch.randn((1, *pipe.latent_shape), generator=generator).to(pipe.device)
        job = EditJob(z_T=z, cond=encode_prompts(pipe, [prompt], config.clip_skip),
                      null=null_embedding(pipe, config.clip_skip), schedule=schedule, weights=weights)
        out.append(reference.sample(pipe, job, progress))
    return to_pil(decode_latents(pipe, torch.cat(out), config.model_batch))


def method_outputs(pipe, config, method: str, guidance: float, schedule: str, squares, source_prompts, target_prompts,
                   cache, words=None) -> tuple[list[dict], list, list]:
    """One evaluation cell, the model's share of `nti eval`'s chunk (in process, or on a Ray actor with --ray): invert
    each sample once (through `cache`), reconstruct and edit it under `method` with this guidance and schedule; the
    'baseline' generates the target from seeded noise. Per sample its timings, reconstruction (None for the
    baseline) and edit, as PIL images."""
    cfg = config if method == "baseline" else config.replace(method=method)
    cfg = cfg.replace(guidance=guidance, guidance_schedule=schedule)
    count = len(squares)
    recons = [None] * count
    if method == "baseline":  # one prompt per call: every sample starts from the same seeded noise
        edits, timings = [], []
        for target in target_prompts:
            start = time.perf_counter()
            edits += generate(pipe, [target], cfg, progress=False)
            timings.append({"invert_s": 0.0, "recon_s": None, "edit_s": time.perf_counter() - start,
                            "inner_iterations": 0})
        return timings, recons, edits
    inversions = invert_cached(pipe, squares, list(source_prompts), cfg, cache, progress=False)
    start = time.perf_counter()
    recons = reconstruct(pipe, inversions, cfg, progress=False)
    recon_s = (time.perf_counter() - start) / count
    start = time.perf_counter()
    edits = edit(pipe, inversions, list(target_prompts), cfg, progress=False, words=words)
    edit_s = (time.perf_counter() - start) / count
    # the inversion's own per-image timings (its share of a batch), so a cached inversion keeps its cost
    timings = [{"invert_s": sum(inv.timings.values()), "recon_s": recon_s, "edit_s": edit_s,
                "inner_iterations": sum(inv.iterations)} for inv in inversions]
    return timings, recons, edits

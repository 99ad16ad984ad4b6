"""The fast path: the reference algorithm over many images at once, with mixed precision and optional accelerators.

Same math as engine/reference.py; what changes is only how it is scheduled:
- B images share every UNet call; each image keeps its own prompt, null embedding, Adam state and early stop
  (per-image losses are summed, so each embedding gets exactly its own gradient);
- converged images leave the batch, which is compacted to fixed bucket sizes (powers of two) so compiled graphs
  and CUDA graphs stay valid;
- the conditional prediction of a step is computed once and also reused for the step that moves the latent on;
- the UNet may run under bf16/fp16 autocast; embeddings, Adam state, latents and the DDIM update stay fp32, and a
  step that produced a non-finite value for an image is redone for that image in fp32 (recorded in the result).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings

import torch
from tqdm.auto import tqdm

from .config import NTIConfig, NTIError
from .ddim import DDIMSchedule, ddim_step, guided_eps
from .models import Pipeline

log = logging.getLogger("nti")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------- accelerator switches

def fused_ops(config: NTIConfig, device: torch.device):
    """kernels/ fused DDIM ops if wanted and importable, else None (plain torch). NTI_FUSED_STEP=0 turns them off."""
    want = config.fused_step
    if os.environ.get("NTI_FUSED_STEP") == "0":
        want = False
    if want is False:
        return None
    try:
        import kernels.ddim as ops
    except Exception as err:  # no triton, an older torch without custom ops, ...
        if want:
            warnings.warn(f"fused DDIM step unavailable ({type(err).__name__}: {err}); using plain torch")
        return None
    if want is None and not (device.type == "cuda" and ops.triton_enabled(torch.empty(0, device=device))):
        return None  # default: only where the Triton kernel really runs
    return ops


def set_attention(unet: torch.nn.Module, backend: str) -> str:
    """Select the attention kernel; falls back to SDPA when xformers is missing or broken. Returns what is used."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if backend == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as err:  # xformers absent, or built for another torch (DESIGN.md: 0.0.35 vs torch 2.11)
            warnings.warn(f"xformers attention unavailable ({type(err).__name__}); using torch SDPA")
            backend = "sdpa"
    unet.set_attn_processor(AttnProcessor() if backend == "plain" else AttnProcessor2_0())
    return backend


@contextlib.contextmanager
def accelerated_unet(pipe: Pipeline, config: NTIConfig):
    """Apply the config's UNet switches for the duration of a fast run, then put the module back as it was."""
    unet = pipe.unet
    processors = unet.attn_processors
    cuda = pipe.device.type == "cuda"
    compiled = []
    try:  # every switch inside: a failure (e.g. a missing export backend) still restores the module
        set_attention(unet, config.attention)
        if config.channels_last:
            if cuda:
                unet.to(memory_format=torch.channels_last)
            else:
                warnings.warn("channels_last only helps CUDA convolutions; ignored on CPU")
        if config.compile or config.cuda_graphs:
            if config.cuda_graphs and not cuda:
                warnings.warn("CUDA graphs need a CUDA device; running without them")
            mode = "reduce-overhead" if (config.cuda_graphs and cuda) else None
            if os.environ.get("NTI_DISABLE_COMPILE") == "1" or not hasattr(torch, "compile"):
                warnings.warn("torch.compile disabled (NTI_DISABLE_COMPILE=1 or torch too old); running eager")
            else:
                for module in unet.modules():  # regional compilation: only the repeated transformer blocks
                    if type(module).__name__ in getattr(unet, "_repeated_blocks", ()):
                        module.compile(mode=mode, dynamic=False)
                        compiled.append(module)
        if config.forward_backend != "torch":
            from export import load_forward_backend  # built once, cached on disk under a model/shape/precision key

            pipe.forward_fn = load_forward_backend(pipe, config.forward_backend, config.precision,
                                                   config.export_cache)
        yield unet
    finally:
        pipe.forward_fn = None
        for module in compiled:
            module._compiled_call_impl = None
        if config.channels_last and cuda:
            unet.to(memory_format=torch.contiguous_format)
        unet.set_attn_processor(processors)


def unet_eps(pipe: Pipeline, z: torch.Tensor, t: int, context: torch.Tensor, precision: str) -> torch.Tensor:
    """UNet noise prediction, under autocast for bf16/fp16 (the inputs stay fp32 tensors)."""
    if pipe.forward_fn is not None and not torch.is_grad_enabled():  # exported UNets serve forward-only passes
        return pipe.forward_fn(z, t, context)
    if precision == "fp32":
        return pipe.unet(z, t, encoder_hidden_states=context).sample
    with torch.autocast(pipe.device.type, dtype=AUTOCAST[precision]):
        return pipe.unet(z, t, encoder_hidden_states=context).sample


def bucket_size(n: int, cap: int) -> int:
    """Smallest power of two >= n, at most cap: few distinct shapes for compiled and captured graphs."""
    size = 1
    while size < n:
        size *= 2
    return min(size, cap)


# ---------------------------------------------------------------------------------------------------------- invert

def invert_batch(pipe: Pipeline, z0: torch.Tensor, conds: torch.Tensor, null: torch.Tensor, schedule: DDIMSchedule,
                 weights: list[float], config: NTIConfig, progress: bool = True) -> list[dict]:
    """Invert B images in chunks of config.batch_size; one result dict per image, as the reference path returns."""
    results = []
    with accelerated_unet(pipe, config):
        ops = fused_ops(config, pipe.device)
        for start in range(0, z0.shape[0], config.batch_size):
            chunk = slice(start, start + config.batch_size)
            results += _invert_chunk(pipe, z0[chunk], conds[chunk], null, schedule, weights, config, ops, progress)
    return results


@torch.no_grad()
def ddim_invert_batch(pipe, z0, conds, schedule, precision, ops=None) -> list[torch.Tensor]:
    """Batched DDIM inversion (no CFG): pivots z*_0..z*_T, each (B, 4, h, w) fp32."""
    pivots, z = [z0], z0
    for i in range(schedule.steps):
        t, a_from, a_to = schedule.invert_alphas(i)
        eps = unet_eps(pipe, z, t, conds, precision)
        z = _ddim(ops, z, eps, a_from, a_to)
        pivots.append(z)
    return pivots


def _coef(value: float, n: int, device) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float32, device=device)


def _ddim(ops, z, eps, a_from, a_to):
    if ops is None:
        return ddim_step(z, eps, a_from, a_to)
    n = z.shape[0]
    return ops.ddim_step(z, eps, _coef(a_from, n, z.device), _coef(a_to, n, z.device))


def _guided(ops, z, eps_u, eps_c, w, a_t, a_prev):
    if ops is None:
        return ddim_step(z, guided_eps(eps_u, eps_c, w), a_t, a_prev)
    n, dev = z.shape[0], z.device
    return ops.guided_ddim_step(z, eps_u, eps_c, _coef(w, n, dev), _coef(a_t, n, dev), _coef(a_prev, n, dev))


def _per_image_loss(ops, z, eps_u, eps_c, w, a_t, a_prev, target):
    if ops is None:
        z_prev = ddim_step(z, guided_eps(eps_u, eps_c, w), a_t, a_prev)
        return ((z_prev - target) ** 2).mean(dim=(1, 2, 3))
    n, dev = z.shape[0], z.device
    return ops.guided_ddim_step_mse(z, eps_u, eps_c, _coef(w, n, dev), _coef(a_t, n, dev), _coef(a_prev, n, dev),
                                    target)


def _invert_chunk(pipe, z0, conds, null, schedule, weights, config, ops, progress) -> list[dict]:
    b = z0.shape[0]
    retries: list[list[int]] = [[] for _ in range(b)]  # -1: the DDIM inversion pass; i >= 0: null-text step i
    start = time.perf_counter()
    pivots = ddim_invert_batch(pipe, z0, conds, schedule, config.precision, ops)
    bad = ~torch.stack([torch.isfinite(p).flatten(1).all(1) for p in pivots]).all(0).cpu()
    if bad.any() and config.precision != "fp32":
        rows = bad.nonzero().flatten()
        log.warning("DDIM inversion: non-finite values for image(s) %s under %s; redoing in fp32", rows.tolist(),
                    config.precision)
        redo = ddim_invert_batch(pipe, z0[rows], conds[rows], schedule, "fp32", ops)
        for pivot, fixed in zip(pivots, redo):
            pivot[rows.to(pivot.device)] = fixed
        for r in rows.tolist():
            retries[r].append(-1)
        bad = ~torch.stack([torch.isfinite(p).flatten(1).all(1) for p in pivots]).all(0).cpu()
    if bad.any():
        raise NTIError(f"DDIM inversion produced non-finite values for image(s) {bad.nonzero().flatten().tolist()} "
                       f"even in fp32; check the input image and prompt")
    ddim_s = (time.perf_counter() - start) / b
    if config.method == "ddim":
        return [{"z_T": pivots[-1][k:k + 1], "embeddings": None, "iterations": [], "losses": [],
                 "fp32_retries": retries[k], "timings": {"ddim_invert_s": ddim_s}} for k in range(b)]
    if config.method == "negative-prompt":  # the null text is the source prompt: nothing to optimize
        return [{"z_T": pivots[-1][k:k + 1], "embeddings": conds[k:k + 1].clone(), "iterations": [0] * schedule.steps,
                 "losses": [], "fp32_retries": retries[k], "timings": {"ddim_invert_s": ddim_s}} for k in range(b)]
    if config.method == "direct":  # editing works against the pivots themselves (Ju et al. 2023)
        trajectory = torch.stack(pivots, dim=1)  # (B, steps + 1, 4, h, w)
        return [{"z_T": pivots[-1][k:k + 1], "embeddings": None, "pivots": trajectory[k], "iterations": [],
                 "losses": [], "fp32_retries": retries[k], "timings": {"ddim_invert_s": ddim_s}} for k in range(b)]

    start = time.perf_counter()
    z = pivots[-1]
    uncond = null.expand(b, -1, -1).clone()
    embeddings = torch.empty((schedule.steps, *uncond.shape), dtype=torch.float32, device=uncond.device)
    iterations = torch.zeros((schedule.steps, b), dtype=torch.int64)
    losses = torch.full((schedule.steps, b), float("nan"))
    bar = tqdm(total=schedule.steps, desc=f"null-text optimization ({b} images)", disable=not progress, leave=False)
    for i in range(schedule.steps):
        target = pivots[len(pivots) - i - 2]
        step = null_text_step(pipe, z, conds, uncond, target, i, schedule, weights[i], config, ops, config.precision)
        bad = ~step["finite"]
        if bad.any() and config.precision != "fp32":  # redo only the broken images' step in full precision
            rows = bad.nonzero().flatten()
            log.warning("step %d: non-finite values for image(s) %s under %s; redoing in fp32", i, rows.tolist(),
                        config.precision)
            redo = null_text_step(pipe, z[rows], conds[rows], uncond[rows], target[rows], i, schedule, weights[i],
                                  config, ops, "fp32")
            for key in ("uncond", "z_next", "iterations", "losses", "finite"):
                step[key][rows.to(step[key].device)] = redo[key]
            for r in rows.tolist():
                retries[r].append(i)
        if not step["finite"].all():
            rows = (~step["finite"]).nonzero().flatten().tolist()
            raise NTIError(f"null-text optimization produced non-finite values for image(s) {rows} at step {i} "
                           f"even in fp32; check the input image and prompt")
        uncond, z = step["uncond"], step["z_next"]
        embeddings[i] = uncond
        iterations[i], losses[i] = step["iterations"], step["losses"]
        bar.update()
    bar.close()
    nti_s = (time.perf_counter() - start) / b
    return [{"z_T": pivots[-1][k:k + 1], "embeddings": embeddings[:, k], "iterations": iterations[:, k].tolist(),
             "losses": losses[:, k].tolist(), "fp32_retries": retries[k],
             "timings": {"ddim_invert_s": ddim_s, "null_text_s": nti_s}} for k in range(b)]


def null_text_step(pipe, z, conds, uncond, target, i, schedule, w, config, ops, precision) -> dict:
    """One outer step of paper Algorithm 1 for a batch: fit each image's null embedding, then move its latent on."""
    b = z.shape[0]
    t = schedule.timesteps[i]
    a_t, a_prev = schedule.denoise_alphas(i)
    with torch.no_grad():
        eps_c = unet_eps(pipe, z, t, conds, precision)  # once per step, shared by inner loop and the move-on step
    # one parameter and one Adam per image: an image whose loop stopped gets grad=None, which Adam skips exactly
    params = [uncond[k:k + 1].clone().requires_grad_(True) for k in range(b)]
    optimizer = torch.optim.Adam(params, lr=config.lr * (1.0 - i / 100.0))
    active = list(range(b))
    iterations = torch.zeros(b, dtype=torch.int64)
    losses = torch.full((b,), float("nan"))
    finite = torch.ones(b, dtype=torch.bool)
    threshold = config.early_stop_eps + i * 2e-5
    for _ in range(config.inner_steps):
        if not active:
            break
        n = bucket_size(len(active), b)
        rows = active + [active[0]] * (n - len(active))  # pad to the bucket; padded rows carry zero loss weight
        weight = torch.tensor([1.0] * len(active) + [0.0] * (n - len(active)), device=z.device)
        idx = torch.tensor(rows, device=z.device)
        context = torch.cat([params[r] for r in rows])
        eps_u = unet_eps(pipe, z[idx], t, context, precision)
        loss = _per_image_loss(ops, z[idx], eps_u, eps_c[idx], w, a_t, a_prev, target[idx])
        optimizer.zero_grad(set_to_none=True)
        (loss * weight).sum().backward()  # sum, not mean: each image gets exactly its own gradient
        optimizer.step()  # params of rows not in the batch have grad None: untouched, as if optimized alone
        values = loss[: len(active)].detach().float().cpu().tolist()  # the one host sync per iteration
        still = []
        for r, value in zip(active, values):
            iterations[r] += 1
            losses[r] = value
            if not math.isfinite(value):
                finite[r] = False
                continue  # a broken image leaves the loop; its step is redone in fp32
            if not (config.early_stop and value < threshold):
                still.append(r)
        active = still
    uncond = torch.cat([p.detach() for p in params])
    with torch.no_grad():
        eps_u = unet_eps(pipe, z, t, uncond, precision)
        z_next = _guided(ops, z, eps_u, eps_c, w, a_t, a_prev)
    finite &= torch.isfinite(z_next).flatten(1).all(1).cpu() & torch.isfinite(uncond).flatten(1).all(1).cpu()
    return {"uncond": uncond, "z_next": z_next, "iterations": iterations, "losses": losses, "finite": finite}


# ---------------------------------------------------------------------------------------------------------- sample

def _groups(jobs: list[dict], size: int, extra: str | None = None) -> list[list[int]]:
    """Chunks of at most `size` job indices; images batch together only when they share timesteps and weights
    (and the job field `extra`, if given)."""
    groups: dict = {}
    for k, job in enumerate(jobs):
        key = (tuple(job["schedule"].timesteps), tuple(job["weights"]), job[extra] if extra else None)
        groups.setdefault(key, []).append(k)
    return [ks[i:i + size] for ks in groups.values() for i in range(0, len(ks), size)]


def _per_step(tensors: list[torch.Tensor], i: int, steps: int) -> torch.Tensor:
    """Step i's null embedding of each job: per-step (steps, 77, D) or one for all steps (1, 77, D)."""
    return torch.cat([n[i:i + 1] if n.shape[0] == steps else n[:1] for n in tensors])


def _pivots(jobs: list[dict], z: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Direct inversion's pivots of the jobs as (steps + 1, B, 4, h, w) and a (B, 1, 1, 1) mask of the jobs that
    have them (zeros elsewhere), or None if no job has."""
    if all(job["pivots"] is None for job in jobs):
        return None
    zero = torch.zeros((steps + 1, *z.shape[1:]), dtype=z.dtype, device=z.device)
    pivots = torch.stack([zero if job["pivots"] is None else job["pivots"] for job in jobs], dim=1)
    mask = torch.tensor([job["pivots"] is not None for job in jobs], dtype=z.dtype, device=z.device)
    return pivots, mask.view(-1, 1, 1, 1)


@torch.no_grad()
def sample_batch(pipe: Pipeline, jobs: list[dict], config: NTIConfig, progress: bool = True) -> torch.Tensor:
    """Batched CFG sampling of jobs {z_T, cond, null (1 or steps, 77, D), schedule, weights, pivots}; uncond and
    cond in one call. Jobs with pivots (direct inversion, source prompt) get the offset to them after each step."""
    with accelerated_unet(pipe, config):
        ops = fused_ops(config, pipe.device)
        results = [None] * len(jobs)
        for part in _groups(jobs, config.batch_size):
            schedule, weights = jobs[part[0]]["schedule"], jobs[part[0]]["weights"]
            z = torch.cat([jobs[k]["z_T"] for k in part])
            cond = torch.cat([jobs[k]["cond"] for k in part])
            nulls = [jobs[k]["null"] for k in part]
            direct = _pivots([jobs[k] for k in part], z, schedule.steps)
            for i in tqdm(range(schedule.steps), desc=f"DDIM sampling ({len(part)} images)",
                          disable=not progress, leave=False):
                null = _per_step(nulls, i, schedule.steps)
                a_t, a_prev = schedule.denoise_alphas(i)
                eps_u, eps_c = unet_eps(pipe, torch.cat([z, z]), schedule.timesteps[i],
                                        torch.cat([null, cond]), config.precision).chunk(2)
                z = _guided(ops, z, eps_u, eps_c, weights[i], a_t, a_prev)
                if direct is not None:
                    pivots, mask = direct
                    z = z + (pivots[len(pivots) - i - 2] - z) * mask
            for k, zk in zip(part, z):
                results[k] = zk[None]
    return torch.cat(results)


@torch.no_grad()
def p2p_sample_batch(pipe: Pipeline, jobs: list[dict], config: NTIConfig, progress: bool = True) -> torch.Tensor:
    """Source and target branches of many images at once (reference.p2p_sample): per chunk of B images one UNet
    call of 4B rows [uncond src, uncond tgt, cond src, cond tgt] per step, attention edits folded into SDPA. Jobs as
    sample_batch's plus cond_source, plan (None: no attention control) and offset_target. Returns the targets."""
    from .p2p import P2PController, attention_control

    if config.compile or config.cuda_graphs or config.forward_backend != "torch":
        warnings.warn("prompt-to-prompt runs its own attention processors in eager PyTorch: compile, CUDA graphs "
                      "and exported UNets are not used for this edit")
        config = config.replace(compile=False, cuda_graphs=False, forward_backend="torch")
    with accelerated_unet(pipe, config):
        ops = fused_ops(config, pipe.device)
        results = [None] * len(jobs)
        keyed = [dict(job, controlled=job["plan"] is not None) for job in jobs]  # a chunk is controlled or not
        for part in _groups(keyed, config.batch_size, extra="controlled"):
            b = len(part)
            chunk = [jobs[k] for k in part]
            schedule, weights = chunk[0]["schedule"], chunk[0]["weights"]
            z_T = torch.cat([job["z_T"] for job in chunk])
            z = torch.cat([z_T, z_T])  # [source (B), target (B)]
            conds = torch.cat([job["cond_source"] for job in chunk] + [job["cond"] for job in chunk])
            nulls = [job["null"] for job in chunk]
            direct = _pivots(chunk, z_T, schedule.steps)
            share = torch.tensor([job["offset_target"] for job in chunk], dtype=z.dtype, device=z.device)
            controller = None
            control = contextlib.nullcontext()
            if chunk[0]["plan"] is not None:
                controller = P2PController([job["plan"] for job in chunk], config, schedule.steps, pipe.device,
                                           explicit=False)
                control = attention_control(pipe.unet, controller, z_T.shape[-1])
            with control:
                for i in tqdm(range(schedule.steps), desc=f"prompt-to-prompt ({b} images)", disable=not progress,
                              leave=False):
                    if controller is not None:
                        controller.step = i
                    null = _per_step(nulls, i, schedule.steps)
                    a_t, a_prev = schedule.denoise_alphas(i)
                    eps_u, eps_c = unet_eps(pipe, torch.cat([z, z]), schedule.timesteps[i],
                                            torch.cat([null, null, conds]), config.precision).chunk(2)
                    z = _guided(ops, z, eps_u, eps_c, weights[i], a_t, a_prev)
                    if direct is not None:  # offset from the source branch's step to the pivot
                        pivots, mask = direct
                        offset = (pivots[len(pivots) - i - 2] - z[:b]) * mask
                        z = z + torch.cat([offset, offset * share.view(-1, 1, 1, 1)])
                    if controller is not None:
                        z = controller.blend_latents(z)
            for k, zk in zip(part, z[b:]):
                results[k] = zk[None]
    return torch.cat(results)

"""The fast path: the reference algorithm over many images at once, with mixed precision and optional accelerators.

Why a second implementation beside engine/reference.py, on purpose: the reference is the readable truth (one image,
torch.optim.Adam, plain loops); this module is the same math reorganized for throughput, and is only trusted
because it is tested against the reference (tests/test_fast.py: fp32 parity of latents, embeddings and iteration
counts). What each inversion method keeps is decided once, in engine/methods.py, for both.
What changes here is only how the work is scheduled:
- B images share every UNet call; each image keeps its own prompt, null embedding, Adam state and early stop
  (per-image losses are summed, so each embedding gets exactly its own gradient; Adam runs batched and masked, so
  an image that stopped keeps its embedding and moments exactly, as if it had been optimized alone);
- the inner loop's state lives in a Workspace of fixed tensors and an iteration makes no host sync: early stop is
  decided on the device, and the host reads one (n,) mask per iteration, only when early stop is on. So a whole
  iteration (UNet forward + backward, loss, Adam) can be captured as one CUDA graph and replayed;
- images that stopped leave the workspace: eager runs shrink it to exactly the images left; with CUDA graphs or
  compile it keeps power-of-two bucket sizes (padding rows are masked) so captured and compiled graphs stay valid;
- the conditional prediction of a step is computed once and also reused for the step that moves the latent on;
- bf16/fp16 run a UNet copy with pre-cast weights under autocast (engine/runner.py); embeddings, Adam state,
  latents and the DDIM update stay fp32, and a step that produced a non-finite value for an image is redone for
  that image in fp32 (recorded in the result); one still non-finite in fp32 diverged: it is said, and that image's
  result comes back as it is, as the reference's would, beside its batch mates'.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .config import NTIConfig
from .ddim import DDIMSchedule, ddim_step, eps_from_prediction, guided_eps
from .methods import EditJob, InversionResult, from_pivots, optimizes_null_text
from .models import Pipeline
from .runner import UNetRunner, capture_graph

log = logging.getLogger("nti")
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, which the notebook uses


def fused_ops(config: NTIConfig, device: torch.device):
    """kernels/ fused DDIM ops if wanted and importable, else None (plain torch). NTI_FUSED_STEP=0 turns them off."""
    want = config.fused_step
    if os.environ.get("NTI_FUSED_STEP") == "0":
        if want:
            warnings.warn("fused DDIM step off (NTI_FUSED_STEP=0); using plain torch")
        want = False
    if want is False:
        return None
    try:
        import nti.kernels.ddim as ops
    except Exception as err:  # an older torch without custom ops, ...
        if want:
            warnings.warn(f"fused DDIM step unavailable ({type(err).__name__}: {err}); using plain torch")
        return None
    why_not = ops.why_not_triton(torch.empty(0, device=device))
    if want is None and not (device.type == "cuda" and why_not is None):
        return None  # default: only where the Triton kernel really runs
    if why_not is not None:  # asked for explicitly: the ops still run (same math), but not the kernels asked for
        warnings.warn(f"fused DDIM step: no Triton kernels here ({why_not}); the nti:: ops run their torch "
                      f"reference")
    return ops


def bucket_size(n: int, cap: int) -> int:
    """Smallest power of two >= n, at most cap: few distinct shapes for compiled and captured graphs."""
    size = 1
    while size < n:
        size *= 2
    return min(size, cap)


# --------------------------------------------------------------------------------------------------- DDIM pieces

def _coef(value, n: int, device) -> torch.Tensor:
    """A per-image coefficient as an (n,) device tensor, made by a fill kernel (a python float sent to the device
    through torch.as_tensor would be a host-to-device copy, a sync on CUDA)."""
    if isinstance(value, torch.Tensor):
        return value
    return torch.full((n,), value, dtype=torch.float32, device=device)


def _ddim(ops, z, eps, a_from, a_to):
    n, dev = z.shape[0], z.device
    a_from, a_to = _coef(a_from, n, dev), _coef(a_to, n, dev)
    if ops is None:
        return ddim_step(z, eps, a_from, a_to)
    return ops.ddim_step(z, eps, a_from, a_to)


def _guided(ops, z, eps_u, eps_c, w, a_t, a_prev):
    n, dev = z.shape[0], z.device
    w, a_t, a_prev = (_coef(c, n, dev) for c in (w, a_t, a_prev))
    if ops is None:
        return ddim_step(z, guided_eps(eps_u, eps_c, w), a_t, a_prev)
    return ops.guided_ddim_step(z, eps_u, eps_c, w, a_t, a_prev)


def _per_image_loss(ops, z, eps_u, eps_c, w, a_t, a_prev, target):
    if ops is None:
        z_prev = ddim_step(z, guided_eps(eps_u, eps_c, w), a_t, a_prev)
        return ((z_prev - target) ** 2).mean(dim=(1, 2, 3))
    return ops.guided_ddim_step_mse(z, eps_u, eps_c, w, a_t, a_prev, target)


# ---------------------------------------------------------------------------------------------------------- invert

def invert_batch(pipe: Pipeline, z0: torch.Tensor, conds: torch.Tensor, null: torch.Tensor, schedule: DDIMSchedule,
                 weights: list[float], config: NTIConfig, progress: bool = True) -> list[InversionResult]:
    """Invert B images in chunks of config.batch_size; one result per image, as the reference path returns."""
    runner = UNetRunner(pipe, config)
    ops = fused_ops(config, pipe.device)
    results = []
    for start in range(0, z0.shape[0], config.batch_size):
        chunk = slice(start, start + config.batch_size)
        results += _invert_chunk(runner, z0[chunk], conds[chunk], null, schedule, weights, config, ops, progress,
                                 start)
    return results


@torch.no_grad()
def ddim_invert_batch(runner: UNetRunner, z0, conds, schedule, ops=None) -> list[torch.Tensor]:
    """Batched DDIM inversion (no CFG): pivots z*_0..z*_T, each (B, 4, h, w) fp32."""
    pivots, z = [z0], z0
    for i in range(schedule.steps):
        t, a_from, a_to = schedule.invert_alphas(i)
        z = _ddim(ops, z, schedule.eps(runner.forward(z, t, conds), z, a_from), a_from, a_to)
        pivots.append(z)
    return pivots


def _finite_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(B,) bool on the host: rows finite in every tensor (one sync)."""
    return torch.stack([torch.isfinite(x).flatten(1).all(1) for x in tensors]).all(0).cpu()


def _images(rows: torch.Tensor, first: int) -> list[int]:
    """Chunk rows as the images' indices in the whole call, which is how a user knows them."""
    return [first + r for r in rows.flatten().tolist()]


def _invert_chunk(runner, z0, conds, null, schedule, weights, config, ops, progress,
                  first: int = 0) -> list[InversionResult]:
    b = z0.shape[0]
    retries: list[list[int]] = [[] for _ in range(b)]  # -1: the DDIM inversion pass; i >= 0: null-text step i
    start = time.perf_counter()
    pivots = ddim_invert_batch(runner, z0, conds, schedule, ops)
    bad = ~_finite_rows(pivots)
    if bad.any() and config.precision != "fp32":
        rows = bad.nonzero().flatten()
        log.warning("DDIM inversion: non-finite values for image(s) %s under %s; redoing in fp32",
                    _images(rows, first), config.precision)
        redo = ddim_invert_batch(runner.fp32(), z0[rows], conds[rows], schedule, ops)
        for pivot, fixed in zip(pivots, redo):
            pivot[rows.to(pivot.device)] = fixed
        for r in rows.tolist():
            retries[r].append(-1)
        bad = ~_finite_rows(pivots)
    if bad.any():  # said, and returned as it is (as the reference would): its batch mates' results stand
        log.warning("DDIM inversion produced non-finite values for image(s) %s even in fp32; check the input image "
                    "and prompt", _images(bad.nonzero(), first))  # no guidance or lr in DDIM inversion
    broken = bad  # images already diverged: carried along as they are (rows do not mix), never retried or said again
    ddim_s = (time.perf_counter() - start) / b
    if not optimizes_null_text(config.method):
        return from_pivots(config.method, pivots, conds, schedule.steps, retries, {"ddim_invert_s": ddim_s})

    start = time.perf_counter()
    z = pivots[-1]
    uncond = null.expand(b, -1, -1).clone()
    embeddings = torch.empty((schedule.steps, *uncond.shape), dtype=torch.float32, device=uncond.device)
    iterations = torch.zeros((schedule.steps, b), dtype=torch.int64)
    losses = torch.full((schedule.steps, b), float("nan"))
    bar = tqdm(total=schedule.steps, desc=f"null-text optimization ({b} images)", disable=not progress, leave=False)
    for i in range(schedule.steps):
        target = pivots[len(pivots) - i - 2]
        step = null_text_step(runner, z, conds, uncond, target, i, schedule, weights[i], config, ops)
        bad = ~step.finite & ~broken
        if bad.any() and config.precision != "fp32":  # redo only the broken images' step in full precision
            rows = bad.nonzero().flatten()
            log.warning("step %d: non-finite values for image(s) %s under %s; redoing in fp32", i,
                        _images(rows, first), config.precision)
            redo = null_text_step(runner.fp32(), z[rows], conds[rows], uncond[rows], target[rows], i, schedule,
                                  weights[i], config, ops)
            step.merge(rows, redo)
            for r in rows.tolist():
                retries[r].append(i)
        bad = ~step.finite & ~broken
        if bad.any():  # said, and returned as it is (as the reference would): its batch mates' results stand
            log.warning("null-text optimization produced non-finite values for image(s) %s at step %d even in fp32: "
                        "it diverged; %s", _images(bad.nonzero(), first), i, config.divergence_advice())
            step.uncond[bad.to(step.uncond.device)] = float("nan")  # a NaN loss alone would pass every later check
            broken = broken | bad
        uncond, z = step.uncond, step.z_next
        embeddings[i] = uncond
        iterations[i], losses[i] = step.iterations, step.losses
        bar.update()
    bar.close()
    nti_s = (time.perf_counter() - start) / b
    return [InversionResult(z_T=pivots[-1][k:k + 1], null_embeddings=embeddings[:, k],
                            iterations=iterations[:, k].tolist(), losses=losses[:, k].tolist(),
                            fp32_retries=retries[k], timings={"ddim_invert_s": ddim_s, "null_text_s": nti_s})
            for k in range(b)]


# ------------------------------------------------------------------------------------------- the inner loop

@dataclass
class Workspace:
    """The inner loop's state for n rows (paper Algorithm 1, the loop over j, for n images at once), in tensors that
    outlive an iteration, so that one iteration can be captured as a CUDA graph and replayed."""

    rows: torch.Tensor  # (n,) int64: the chunk row each workspace row writes back to; padding rows own spare rows
    z: torch.Tensor  # (n, 4, h, w) fp32: z_t
    eps_c: torch.Tensor  # (n, 4, h, w): the step's conditional prediction
    target: torch.Tensor  # (n, 4, h, w) fp32: the pivot z*_{t-1}
    uncond: torch.Tensor  # (n, L, D) fp32: the null context being optimized (L = 77, SDXL 78)
    exp_avg: torch.Tensor  # (n, L, D) fp32: Adam's first moment
    exp_avg_sq: torch.Tensor  # (n, L, D) fp32: Adam's second moment
    active: torch.Tensor  # (n,) fp32 1/0: still optimizing (stopped, broken and padding rows are 0)
    iterations: torch.Tensor  # (n,) fp32: Adam updates done this step
    loss: torch.Tensor  # (n,) fp32: the last loss of each row while it was active
    w: torch.Tensor  # (n,) fp32: guidance weight of this step
    a_t: torch.Tensor  # (n,) fp32: alpha_bar_t
    a_prev: torch.Tensor  # (n,) fp32: alpha_bar_{t-1}
    t: torch.Tensor  # () int64: timestep
    threshold: torch.Tensor  # (1,) fp64: early-stop threshold (-inf: off); fp64 so it equals the host's comparison
    step_size: torch.Tensor  # (1,) fp32: Adam's lr / (1 - beta1^k) at iteration k
    bias2_sqrt: torch.Tensor  # (1,) fp32: Adam's sqrt(1 - beta2^k)
    graph: object = None  # the captured iteration, when CUDA graphs are on

    @classmethod
    def zeros(cls, n: int, latent: tuple, context: tuple, device) -> "Workspace":
        f32 = dict(dtype=torch.float32, device=device)
        return cls(rows=torch.zeros(n, dtype=torch.int64, device=device), z=torch.zeros(n, *latent, **f32),
                   eps_c=torch.zeros(n, *latent, **f32), target=torch.zeros(n, *latent, **f32),
                   uncond=torch.zeros(n, *context, **f32), exp_avg=torch.zeros(n, *context, **f32),
                   exp_avg_sq=torch.zeros(n, *context, **f32), active=torch.zeros(n, **f32),
                   iterations=torch.zeros(n, **f32), loss=torch.zeros(n, **f32), w=torch.zeros(n, **f32),
                   a_t=torch.ones(n, **f32), a_prev=torch.ones(n, **f32),
                   t=torch.zeros((), dtype=torch.int64, device=device),
                   threshold=torch.zeros(1, dtype=torch.float64, device=device), step_size=torch.zeros(1, **f32),
                   bias2_sqrt=torch.ones(1, **f32))

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    def set_step(self, t: int, w: float, a_t: float, a_prev: float, threshold: float) -> None:
        """This outer step's constants, by fill kernels (no host-to-device copies)."""
        self.t.fill_(t)
        self.w.fill_(w)
        self.a_t.fill_(a_t)
        self.a_prev.fill_(a_prev)
        self.threshold.fill_(threshold)


def adam_step_(ws: Workspace, grad: torch.Tensor) -> None:
    """Adam (Kingma & Ba 2015, Algorithm 1) in torch.optim.Adam's order of operations, applied to the active rows
    only: a row that stopped keeps its embedding and moments exactly."""
    keep = (ws.active > 0).view(-1, 1, 1)
    exp_avg = torch.lerp(ws.exp_avg, grad, 1 - BETA1)
    exp_avg_sq = torch.addcmul(ws.exp_avg_sq * BETA2, grad, grad, value=1 - BETA2)
    denom = exp_avg_sq.sqrt() / ws.bias2_sqrt + ADAM_EPS
    uncond = ws.uncond - ws.step_size * (exp_avg / denom)
    ws.exp_avg.copy_(torch.where(keep, exp_avg, ws.exp_avg))
    ws.exp_avg_sq.copy_(torch.where(keep, exp_avg_sq, ws.exp_avg_sq))
    ws.uncond.copy_(torch.where(keep, uncond, ws.uncond))


def inner_iteration(runner: UNetRunner, ws: Workspace, ops) -> None:
    """One inner iteration of paper Algorithm 1 for every active row, in place: the uncond pass with grad, the
    guided DDIM step's MSE to the pivot, Adam; then the notebook's early-stop test, on the device."""
    uncond = ws.uncond.detach().requires_grad_(True)
    with torch.enable_grad():
        eps_u = eps_from_prediction(runner.eps(ws.z, ws.t, uncond), ws.z, ws.a_t, runner.prediction_type)
        loss = _per_image_loss(ops, ws.z, eps_u, ws.eps_c, ws.w, ws.a_t, ws.a_prev, ws.target)
        # sum, not mean: each image gets exactly its own gradient; inactive rows weigh 0
        (grad,) = torch.autograd.grad((loss * ws.active).sum(), uncond)
    with torch.no_grad():
        if runner.grad_mask is not None:  # SDXL's pooled row, when it is not optimized
            grad = grad * runner.grad_mask
        adam_step_(ws, grad)  # the notebook steps before testing the loss: the last update is kept
        loss = loss.detach()
        ws.iterations.add_(ws.active)
        ws.loss.copy_(torch.where(ws.active > 0, loss, ws.loss))
        go_on = torch.isfinite(loss) & (loss.double() >= ws.threshold)  # a broken row leaves (redone in fp32)
        ws.active.mul_(go_on.to(ws.active.dtype))


@dataclass
class StepResult:
    """One outer step for a batch: the optimized null embeddings, the latents moved on, and per-image records."""

    uncond: torch.Tensor  # (B, L, D) fp32
    z_next: torch.Tensor  # (B, 4, h, w) fp32
    iterations: torch.Tensor  # (B,) int64, host
    losses: torch.Tensor  # (B,) fp32, host: last inner loss
    finite: torch.Tensor  # (B,) bool, host

    def merge(self, rows: torch.Tensor, other: "StepResult") -> None:
        """Take `other`'s results (a redo of some images) for `rows`."""
        dev = rows.to(self.uncond.device)
        self.uncond[dev], self.z_next[dev] = other.uncond, other.z_next
        self.iterations[rows], self.losses[rows], self.finite[rows] = other.iterations, other.losses, other.finite


def _inner_workspace(runner: UNetRunner, n: int, latent: tuple, context: tuple, ops) -> Workspace:
    """A workspace of n rows: a new one in eager runs; with CUDA graphs the one captured for n (captured now if new)."""
    if not runner.graphs:
        return Workspace.zeros(n, latent, context, runner.pipe.device)
    # what the recorded iteration runs: the fused ops or torch's, and SDXL's pooled-row gradient mask or none
    key = runner.key("inner", n, latent, context, ops is not None, runner.grad_mask is not None)
    ws = runner.prepared.graphs.get(key)
    if ws is None:
        start = time.perf_counter()
        ws = Workspace.zeros(n, latent, context, runner.pipe.device)  # active = 0: the warm-up runs change nothing
        ws.graph = capture_graph(lambda: inner_iteration(runner, ws, ops))
        runner.prepared.graphs[key] = ws
        runner.stats.captures += 1
        runner.stats.capture_s += time.perf_counter() - start
    return ws


def _move_rows(src: Workspace, dst: Workspace, select: torch.Tensor, left: int, spare: int) -> None:
    """Copy the `left` rows `select` of src into dst; dst's remaining rows become masked padding."""
    pad = dst.n - left
    take = torch.cat([select, select[:1].expand(pad)])
    for name in ("z", "eps_c", "target", "uncond", "exp_avg", "exp_avg_sq", "iterations", "loss", "active"):
        getattr(dst, name).copy_(getattr(src, name).index_select(0, take))
    own = torch.arange(left, dst.n, device=dst.rows.device) + spare  # each padding row writes to its own spare row
    dst.rows.copy_(torch.cat([src.rows.index_select(0, select), own]))
    dst.active[left:] = 0
    for name in ("t", "threshold", "step_size", "bias2_sqrt"):
        getattr(dst, name).copy_(getattr(src, name))
    for name in ("w", "a_t", "a_prev"):
        getattr(dst, name).copy_(getattr(src, name)[:1].expand(dst.n))


def null_text_step(runner: UNetRunner, z, conds, uncond, target, i, schedule, w, config, ops) -> StepResult:
    """One outer step of paper Algorithm 1 for a batch: fit each image's null embedding, then move its latent on."""
    b, dev = z.shape[0], z.device
    t = schedule.timesteps[i]
    a_t, a_prev = schedule.denoise_alphas(i)
    eps_c = schedule.eps(runner.forward(z, t, conds), z, a_t)  # once per step: the inner loop and the move-on
    static = runner.graphs or runner.compiled  # fixed shapes: pad to power-of-two buckets
    n = bucket_size(b, max(b, config.batch_size)) if static else b
    # results per chunk row, plus one spare row per workspace row for padding rows to write to
    out_uncond = torch.cat([uncond, uncond[:1].expand(n, -1, -1)])
    out_iterations = torch.zeros(b + n, device=dev)
    out_loss = torch.full((b + n,), float("nan"), device=dev)
    ws = _inner_workspace(runner, n, tuple(z.shape[1:]), tuple(uncond.shape[1:]), ops)
    rows = torch.arange(n, device=dev)
    data = rows.clamp(max=b - 1)  # padding rows compute on a copy of the last image, masked out
    ws.rows.copy_(torch.where(rows < b, rows, rows + b))
    ws.z.copy_(z.index_select(0, data))
    ws.eps_c.copy_(eps_c.index_select(0, data))
    ws.target.copy_(target.index_select(0, data))
    ws.uncond.copy_(out_uncond.index_select(0, data))
    ws.exp_avg.zero_()  # a new Adam per step, as the notebook
    ws.exp_avg_sq.zero_()
    ws.iterations.zero_()
    ws.loss.fill_(float("nan"))
    ws.active.copy_((rows < b).float())
    threshold = config.early_stop_eps + i * 2e-5 if config.early_stop else -math.inf
    ws.set_step(t, w, a_t, a_prev, threshold)
    lr = config.lr * (1.0 - i / 100.0)
    for k in range(1, config.inner_steps + 1):
        ws.step_size.fill_(lr / (1 - BETA1 ** k))
        ws.bias2_sqrt.fill_(math.sqrt(1 - BETA2 ** k))
        if ws.graph is not None:
            ws.graph.replay()
        else:
            inner_iteration(runner, ws, ops)
        runner.stats.backward_rows += ws.n
        runner.stats.forward_rows += ws.n
        if not config.early_stop:
            continue  # nothing to decide on the host: broken rows mask themselves out
        left = int(ws.active.sum())  # the iteration's one host sync
        if left == 0:
            break
        size = bucket_size(left, ws.n) if static else left
        if size < ws.n:  # images stopped: move the ones left into a smaller workspace
            _write_back(ws, out_uncond, out_iterations, out_loss)
            select = torch.argsort(ws.active, descending=True, stable=True)[:left]  # active rows, in order
            smaller = _inner_workspace(runner, size, tuple(z.shape[1:]), tuple(uncond.shape[1:]), ops)
            _move_rows(ws, smaller, select, left, b)
            ws = smaller
    _write_back(ws, out_uncond, out_iterations, out_loss)
    uncond = out_uncond[:b].clone()
    z_next = _guided(ops, z, schedule.eps(runner.forward(z, t, uncond), z, a_t), eps_c, w, a_t, a_prev)
    finite = torch.isfinite(z_next).flatten(1).all(1) & torch.isfinite(uncond).flatten(1).all(1)
    finite &= torch.isfinite(out_loss[:b]) | (out_iterations[:b] == 0)
    records = torch.stack([out_iterations[:b], out_loss[:b], finite.float()]).cpu()  # one sync per outer step
    return StepResult(uncond, z_next, records[0].long(), records[1].clone(), records[2] > 0)


def _write_back(ws: Workspace, out_uncond, out_iterations, out_loss) -> None:
    out_uncond.index_copy_(0, ws.rows, ws.uncond)
    out_iterations.index_copy_(0, ws.rows, ws.iterations)
    out_loss.index_copy_(0, ws.rows, ws.loss)


# ---------------------------------------------------------------------------------------------------------- sample

def _groups(jobs: list[EditJob], size: int, controlled: bool = False) -> list[list[int]]:
    """Chunks of at most `size` job indices; images batch together only when they share timesteps and weights
    (and, with `controlled`, whether P2P attention control runs: a chunk runs with it or without)."""
    groups: dict = {}
    for k, job in enumerate(jobs):
        key = (tuple(job.schedule.timesteps), tuple(job.weights), job.plan is not None if controlled else None)
        groups.setdefault(key, []).append(k)
    return [ks[i:i + size] for ks in groups.values() for i in range(0, len(ks), size)]


def _per_step(jobs: list[EditJob], i: int) -> torch.Tensor:
    """Step i's null embedding of each job, (B, L, D)."""
    return torch.cat([job.null_at(i) for job in jobs])


def _pivots(jobs: list[EditJob], z: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Direct inversion's pivots of the jobs as (steps + 1, B, 4, h, w) and a (B, 1, 1, 1) mask of the jobs that
    have them (zeros elsewhere), or None if no job has."""
    if all(job.pivots is None for job in jobs):
        return None
    zero = torch.zeros((steps + 1, *z.shape[1:]), dtype=z.dtype, device=z.device)
    pivots = torch.stack([zero if job.pivots is None else job.pivots for job in jobs], dim=1)
    mask = torch.tensor([job.pivots is not None for job in jobs], dtype=z.dtype, device=z.device)
    return pivots, mask.view(-1, 1, 1, 1)


@torch.no_grad()
def sample_batch(pipe: Pipeline, jobs: list[EditJob], config: NTIConfig, progress: bool = True) -> torch.Tensor:
    """Batched CFG sampling of single-branch edit jobs (reference.sample); uncond and cond in one call. Jobs with
    pivots (direct inversion, source prompt) get the offset to them after each step."""
    runner = UNetRunner(pipe, config)
    ops = fused_ops(config, pipe.device)
    results = [None] * len(jobs)
    for part in _groups(jobs, config.batch_size):
        chunk = [jobs[k] for k in part]
        schedule, weights = chunk[0].schedule, chunk[0].weights
        z = torch.cat([job.z_T for job in chunk])
        cond = torch.cat([job.cond for job in chunk])
        direct = _pivots(chunk, z, schedule.steps)
        for i in tqdm(range(schedule.steps), desc=f"DDIM sampling ({len(part)} images)",
                      disable=not progress, leave=False):
            null = _per_step(chunk, i)
            a_t, a_prev = schedule.denoise_alphas(i)
            zz = torch.cat([z, z])
            eps_u, eps_c = schedule.eps(runner.forward(zz, schedule.timesteps[i], torch.cat([null, cond])), zz,
                                        a_t).chunk(2)
            z = _guided(ops, z, eps_u, eps_c, weights[i], a_t, a_prev)
            if direct is not None:
                pivots, mask = direct
                z = z + (pivots[len(pivots) - i - 2] - z) * mask
        for k, zk in zip(part, z):
            results[k] = zk[None]
    return torch.cat(results)


@torch.no_grad()
def p2p_sample_batch(pipe: Pipeline, jobs: list[EditJob], config: NTIConfig, progress: bool = True) -> torch.Tensor:
    """Source and target branches of many images at once (reference.p2p_sample): per chunk of B images one UNet
    call of 4B rows [uncond src, uncond tgt, cond src, cond tgt] per step, attention edits folded into SDPA.
    Returns the targets."""
    from .p2p import P2PController, attention_control

    if config.compile or config.cuda_graphs or config.forward_backend != "torch":
        warnings.warn("prompt-to-prompt runs its own attention processors in eager PyTorch: compile, CUDA graphs "
                      "and exported UNets are not used for this edit")
        config = config.replace(compile=False, cuda_graphs=False, forward_backend="torch")
    runner = UNetRunner(pipe, config)
    ops = fused_ops(config, pipe.device)
    results = [None] * len(jobs)
    for part in _groups(jobs, config.batch_size, controlled=True):
        b = len(part)
        chunk = [jobs[k] for k in part]
        schedule, weights = chunk[0].schedule, chunk[0].weights
        z_T = torch.cat([job.z_T for job in chunk])
        z = torch.cat([z_T, z_T])  # [source (B), target (B)]
        conds = torch.cat([job.cond_source for job in chunk] + [job.cond for job in chunk])
        direct = _pivots(chunk, z_T, schedule.steps)
        share = torch.tensor([job.offset_target for job in chunk], dtype=z.dtype, device=z.device)
        controller = None
        control = contextlib.nullcontext()
        if chunk[0].plan is not None:
            controller = P2PController([job.plan for job in chunk], config, schedule.steps, pipe.device,
                                       explicit=False)
            control = attention_control(runner.module, controller, z_T.shape[-1])
        with control:
            for i in tqdm(range(schedule.steps), desc=f"prompt-to-prompt ({b} images)", disable=not progress,
                          leave=False):
                if controller is not None:
                    controller.step = i
                null = _per_step(chunk, i)
                a_t, a_prev = schedule.denoise_alphas(i)
                zz = torch.cat([z, z])
                eps_u, eps_c = schedule.eps(runner.forward(zz, schedule.timesteps[i], torch.cat([null, null, conds])),
                                            zz, a_t).chunk(2)
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

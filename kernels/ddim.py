"""Fused DDIM step, guidance combine and inner-loop loss: torch.library custom ops (`nti::`) with Triton kernels.

Dispatch happens per call inside each op: Triton when triton imports, the tensors are CUDA (or CPU with
TRITON_INTERPRET=1), dtypes are fp32/bf16/fp16 and NTI_DISABLE_TRITON != "1"; otherwise the torch reference
functions below (`*_ref`), which are the same math in fp32 (fp64 if an input is fp64, for gradcheck).
"""
import os
from typing import Optional

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # kernels are optional: the torch path is complete on its own
    triton = None
    tl = None

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Triton decides at @triton.jit time whether kernels are interpreted, so read the switch once, at import, like it does
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_BLOCK = 1024
# Target program count for the per-image loss reduction: split one image over several programs while the batch is
# small, one program per image once it is large. Untuned: no GPU was available when this was written.
_MSE_PROGRAMS = 256


# ----------------------------------------------------------------------------------------------------------------
# torch reference (also the fallback path)
# ----------------------------------------------------------------------------------------------------------------

def _cdtype(*ts: Optional[Tensor]) -> torch.dtype:
    # fp32 math whatever the input dtype; fp64 only so that gradcheck can run on the torch path
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _col(c: Tensor, like: Tensor, dt: torch.dtype) -> Tensor:
    """Per-image coefficient (B,) viewed to broadcast over (B, ...)."""
    return c.to(dt).view(-1, *([1] * (like.ndim - 1)))


def ddim_step_ref(x: Tensor, eps: Tensor, a_from: Tensor, a_to: Tensor) -> Tensor:
    """DDIM update, Song et al. 2021 Eq. 12 (eta=0): predict x0 at alpha_bar a_from, move it to a_to along eps."""
    dt = _cdtype(x, eps, a_from, a_to)
    af, at = _col(a_from, x, dt), _col(a_to, x, dt)
    x, eps = x.to(dt), eps.to(dt)
    x0 = (x - (1 - af).sqrt() * eps) / af.sqrt()
    return at.sqrt() * x0 + (1 - at).sqrt() * eps


def guided_eps_ref(eps_u: Tensor, eps_c: Tensor, w: Tensor) -> Tensor:
    """Classifier-free guidance, Ho & Salimans 2022: eps_u + w (eps_c - eps_u)."""
    dt = _cdtype(eps_u, eps_c, w)
    eps_u, eps_c = eps_u.to(dt), eps_c.to(dt)
    return eps_u + _col(w, eps_u, dt) * (eps_c - eps_u)


def guided_ddim_step_ref(x: Tensor, eps_u: Tensor, eps_c: Tensor, w: Tensor, a_t: Tensor, a_prev: Tensor) -> Tensor:
    """CFG (Ho & Salimans 2022) then DDIM, Song et al. 2021 Eq. 12 (eta=0), from a_t to a_prev."""
    return ddim_step_ref(x, guided_eps_ref(eps_u, eps_c, w), a_t, a_prev)


def guided_ddim_step_mse_ref(x: Tensor, eps_u: Tensor, eps_c: Tensor, w: Tensor, a_t: Tensor, a_prev: Tensor,
                             target: Tensor) -> Tensor:
    """Null-text optimization loss of Mokady et al. 2023, per image: mean((DDIM Eq. 12 of CFG eps - target)^2)."""
    x_prev = guided_ddim_step_ref(x, eps_u, eps_c, w, a_t, a_prev)
    return (x_prev - target.to(x_prev.dtype)).square().flatten(1).mean(1)


def _c_x(af: Tensor, at: Tensor) -> Tensor:
    # d x_to / d x = sqrt(a_to) / sqrt(a_from)
    return at.sqrt() / af.sqrt()


def _c_eps(af: Tensor, at: Tensor) -> Tensor:
    # d x_to / d eps = sqrt(1 - a_to) - sqrt(a_to) sqrt(1 - a_from) / sqrt(a_from)
    return (1 - at).sqrt() - at.sqrt() * (1 - af).sqrt() / af.sqrt()


def _grads_torch(common: Tensor, w: Optional[Tensor], af: Tensor, at: Tensor, dtypes, wants):
    """(grad_x, grad_eps_u, grad_eps_c) from the upstream grad of x_to (`common`), by the closed forms above."""
    dt = common.dtype
    af, at = _col(af, common, dt), _col(at, common, dt)
    ge = common * _c_eps(af, at)
    outs = [common * _c_x(af, at), ge if w is None else ge * (1 - _col(w, common, dt)),
            None if w is None else ge * _col(w, common, dt)]
    return tuple(o.to(d) if want else common.new_empty((0,), dtype=d) for o, d, want in zip(outs, dtypes, wants))


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if triton is not None:
    @triton.jit
    def _ddim(x, eps, a_from, a_to):
        """DDIM update, Song et al. 2021 Eq. 12 (eta=0), in fp32."""
        # IEEE sqrt/div (not the approx PTX defaults) so the kernel matches torch to fp32 rounding, not to 2 ulp
        x0 = tl.div_rn(x - tl.sqrt_rn(1.0 - a_from) * eps, tl.sqrt_rn(a_from))
        return tl.sqrt_rn(a_to) * x0 + tl.sqrt_rn(1.0 - a_to) * eps

    @triton.jit
    def _eps(eu_ptr, ec_ptr, w, offs, mask, GUIDED: tl.constexpr):
        """Classifier-free guidance, Ho & Salimans 2022, loaded and combined in fp32."""
        eps = tl.load(eu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if GUIDED:
            ec = tl.load(ec_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            eps = eps + w * (ec - eps)
        return eps

    @triton.jit
    def _coefficients(w_ptr, af_ptr, at_ptr, offs, mask, per_image, GUIDED: tl.constexpr):
        """Gather (image index, w, alpha_from, alpha_to) per element: each image may sit at its own step and weight."""
        # coefficients may be half tensors (the op schema allows it); the math below is fp32 (sqrt_rn takes fp32 only)
        img = offs // per_image
        af = tl.load(af_ptr + img, mask=mask, other=1.0).to(tl.float32)
        at = tl.load(at_ptr + img, mask=mask, other=1.0).to(tl.float32)
        w = 0.0
        if GUIDED:
            w = tl.load(w_ptr + img, mask=mask, other=0.0).to(tl.float32)
        return img, w, af, at

    @triton.jit
    def _ddim_fwd_kernel(x_ptr, eu_ptr, ec_ptr, w_ptr, af_ptr, at_ptr, out_ptr, numel, per_image,
                         GUIDED: tl.constexpr, BLOCK: tl.constexpr):
        """DDIM update, Song et al. 2021 Eq. 12 (eta=0), on the CFG-combined eps when GUIDED."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        img, w, af, at = _coefficients(w_ptr, af_ptr, at_ptr, offs, mask, per_image, GUIDED)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        eps = _eps(eu_ptr, ec_ptr, w, offs, mask, GUIDED)
        tl.store(out_ptr + offs, _ddim(x, eps, af, at), mask=mask)

    @triton.jit
    def _ddim_mse_fwd_kernel(x_ptr, eu_ptr, ec_ptr, w_ptr, af_ptr, at_ptr, tgt_ptr, part_ptr, per_image, chunk,
                             n_split, inv_n, BLOCK: tl.constexpr):
        """Per-image mean((DDIM(CFG eps) - target)^2) over `chunk` elements; partial sums, no atomics."""
        # grid (image, split): the image index is the program id, so coefficients are scalar loads here, and each
        # program writes its own partial so the result is deterministic (atomics would reorder the fp32 sum)
        img = tl.program_id(0)
        split = tl.program_id(1)
        w = tl.load(w_ptr + img).to(tl.float32)
        af = tl.load(af_ptr + img).to(tl.float32)
        at = tl.load(at_ptr + img).to(tl.float32)
        base = img * per_image
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, chunk, BLOCK):
            idx = split * chunk + k + tl.arange(0, BLOCK)
            mask = idx < per_image
            offs = base + idx
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            eps = _eps(eu_ptr, ec_ptr, w, offs, mask, True)
            tgt = tl.load(tgt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, _ddim(x, eps, af, at) - tgt, 0.0)
            acc += d * d
        tl.store(part_ptr + img * n_split + split, tl.sum(acc, axis=0) * inv_n)

    @triton.jit
    def _ddim_bwd_kernel(g_ptr, x_ptr, eu_ptr, ec_ptr, w_ptr, af_ptr, at_ptr, tgt_ptr, gx_ptr, geu_ptr, gec_ptr,
                         numel, per_image, two_over_n, GUIDED: tl.constexpr, MSE: tl.constexpr,
                         WANT_X: tl.constexpr, WANT_EU: tl.constexpr, WANT_EC: tl.constexpr, BLOCK: tl.constexpr):
        """Backward of the DDIM step (Song et al. 2021 Eq. 12) [+ CFG] [+ per-image MSE]: all input grads, one pass."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        img, w, af, at = _coefficients(w_ptr, af_ptr, at_ptr, offs, mask, per_image, GUIDED)
        if MSE:
            # recompute x_prev from the inputs autograd holds anyway (see _mse_setup for why not save it)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            eps = _eps(eu_ptr, ec_ptr, w, offs, mask, GUIDED)
            tgt = tl.load(tgt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + img, mask=mask, other=0.0).to(tl.float32)
            common = g * two_over_n * (_ddim(x, eps, af, at) - tgt)
        else:
            common = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        saf = tl.sqrt_rn(af)
        sat = tl.sqrt_rn(at)
        if WANT_X:
            gx = common * tl.div_rn(sat, saf)
            tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        c_eps = tl.sqrt_rn(1.0 - at) - tl.div_rn(sat * tl.sqrt_rn(1.0 - af), saf)
        ge = common * c_eps
        if WANT_EU:
            geu = ge
            if GUIDED:
                geu = ge * (1.0 - w)
            tl.store(geu_ptr + offs, geu.to(geu_ptr.dtype.element_ty), mask=mask)
        if WANT_EC:
            gec = ge * w
            tl.store(gec_ptr + offs, gec.to(gec_ptr.dtype.element_ty), mask=mask)


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


def _triton_step(x, eu, ec, w, af, at) -> Tensor:
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    guided = ec is not None
    # unused pointers get a real tensor so the launcher has something to bind; GUIDED=False never loads them
    _ddim_fwd_kernel[_grid(x.numel())](x, eu, ec if guided else eu, w if guided else af, af, at, out,
                                       x.numel(), x.numel() // x.shape[0], GUIDED=guided, BLOCK=_BLOCK)
    return out


def _triton_mse(x, eu, ec, w, at, ap, target) -> Tensor:
    b = x.shape[0]
    n = x.numel() // b
    blocks = triton.cdiv(n, _BLOCK)
    n_split = max(1, min(blocks, _MSE_PROGRAMS // b))
    chunk = triton.cdiv(blocks, n_split) * _BLOCK
    n_split = triton.cdiv(n, chunk)
    part = torch.empty((b, n_split), dtype=torch.float32, device=x.device)
    _ddim_mse_fwd_kernel[(b, n_split)](x, eu, ec, w, at, ap, target, part, n, chunk, n_split, 1.0 / n,
                                       BLOCK=_BLOCK)
    # a fixed-shape torch sum keeps the reduction deterministic; skipped (no launch) when one program per image
    return part.view(b) if n_split == 1 else part.sum(1)


def _triton_bwd(g, x, eu, ec, w, af, at, target, shape, dtypes, wants):
    mse = target is not None
    guided = w is not None
    numel = 1
    for s in shape:
        numel *= s
    outs = [torch.empty(shape, dtype=d, device=g.device) if want else g.new_empty((0,), dtype=d)
            for d, want in zip(dtypes, wants)]
    dummy = g  # stands in for pointers a constexpr branch never touches
    per_image = numel // shape[0]
    _ddim_bwd_kernel[_grid(numel)](
        g, x if mse else dummy, eu if mse else dummy, ec if (mse and guided) else dummy, w if guided else af,
        af, at, target if mse else dummy, *(o if want else dummy for o, want in zip(outs, wants)),
        numel, per_image, 2.0 / per_image, GUIDED=guided, MSE=mse,
        WANT_X=wants[0], WANT_EU=wants[1], WANT_EC=wants[2] and guided, BLOCK=_BLOCK)
    return tuple(outs)


# ----------------------------------------------------------------------------------------------------------------
# dispatch
# ----------------------------------------------------------------------------------------------------------------

def triton_enabled(t: Tensor) -> bool:
    """Whether the ops would run their Triton kernels on tensors like `t` (device, dtype, env switches)."""
    return why_not_triton(t) is None


def why_not_triton(t: Tensor) -> Optional[str]:
    """Why the ops would run their torch reference on tensors like `t`, or None when the Triton kernels run."""
    if triton is None:
        return "triton is not installed"
    if os.environ.get("NTI_DISABLE_TRITON") == "1":
        return "NTI_DISABLE_TRITON=1"
    if t.dtype not in _KERNEL_DTYPES:
        return f"{t.dtype} tensors; the kernels take fp32, bf16 and fp16"
    # TRITON_INTERPRET=1 (set before import) runs the kernels on CPU tensors in Triton's interpreter: tests only
    if not (t.is_cuda or (t.device.type == "cpu" and _INTERPRET)):
        return f"{t.device.type} tensors; the kernels run on CUDA"
    return None


def _use_triton(*ts: Optional[Tensor]) -> bool:
    ts = [t for t in ts if t is not None]
    # int32 offsets in the kernels; empty tensors have nothing to launch
    return (triton_enabled(ts[0]) and all(t.dtype in _KERNEL_DTYPES for t in ts)
            and 0 < ts[0].numel() < 2 ** 31)


def _contig(*ts: Optional[Tensor]):
    return tuple(None if t is None else t.contiguous() for t in ts)


def _check(x: Tensor, eps: tuple, coefs: tuple, target: Optional[Tensor] = None) -> None:
    for e in eps + ((target,) if target is not None else ()):
        torch._check(e.shape == x.shape, lambda: f"expected shape {tuple(x.shape)}, got {tuple(e.shape)}")
    for c in coefs:
        torch._check(c.shape == (x.shape[0],), lambda: f"coefficients must have shape ({x.shape[0]},), got "
                                                         f"{tuple(c.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("nti::ddim_step", mutates_args=())
def _ddim_step_op(x: Tensor, eps: Tensor, a_from: Tensor, a_to: Tensor) -> Tensor:
    _check(x, (eps,), (a_from, a_to))
    x, eps, a_from, a_to = _contig(x, eps, a_from, a_to)
    if _use_triton(x, eps, a_from, a_to):
        return _triton_step(x, eps, None, None, a_from, a_to)
    return ddim_step_ref(x, eps, a_from, a_to)


@_ddim_step_op.register_fake
def _(x, eps, a_from, a_to):
    _check(x, (eps,), (a_from, a_to))
    return x.new_empty(x.shape, dtype=_cdtype(x, eps, a_from, a_to))


@torch.library.custom_op("nti::guided_ddim_step", mutates_args=())
def _guided_ddim_step_op(x: Tensor, eps_u: Tensor, eps_c: Tensor, w: Tensor, a_t: Tensor, a_prev: Tensor) -> Tensor:
    _check(x, (eps_u, eps_c), (w, a_t, a_prev))
    x, eps_u, eps_c, w, a_t, a_prev = _contig(x, eps_u, eps_c, w, a_t, a_prev)
    if _use_triton(x, eps_u, eps_c, w, a_t, a_prev):
        return _triton_step(x, eps_u, eps_c, w, a_t, a_prev)
    return guided_ddim_step_ref(x, eps_u, eps_c, w, a_t, a_prev)


@_guided_ddim_step_op.register_fake
def _(x, eps_u, eps_c, w, a_t, a_prev):
    _check(x, (eps_u, eps_c), (w, a_t, a_prev))
    return x.new_empty(x.shape, dtype=_cdtype(x, eps_u, eps_c, w, a_t, a_prev))


@torch.library.custom_op("nti::guided_ddim_step_mse", mutates_args=())
def _guided_ddim_step_mse_op(x: Tensor, eps_u: Tensor, eps_c: Tensor, w: Tensor, a_t: Tensor, a_prev: Tensor,
                             target: Tensor) -> Tensor:
    _check(x, (eps_u, eps_c), (w, a_t, a_prev), target)
    x, eps_u, eps_c, w, a_t, a_prev, target = _contig(x, eps_u, eps_c, w, a_t, a_prev, target)
    if _use_triton(x, eps_u, eps_c, w, a_t, a_prev, target):
        return _triton_mse(x, eps_u, eps_c, w, a_t, a_prev, target)
    return guided_ddim_step_mse_ref(x, eps_u, eps_c, w, a_t, a_prev, target)


@_guided_ddim_step_mse_op.register_fake
def _(x, eps_u, eps_c, w, a_t, a_prev, target):
    _check(x, (eps_u, eps_c), (w, a_t, a_prev), target)
    return x.new_empty((x.shape[0],), dtype=_cdtype(x, eps_u, eps_c, w, a_t, a_prev, target))


# Backward ops are custom ops too, so aot_autograd / torch.compile trace the backward graph without entering Triton.
# Gradients not asked for come back as empty (0,) tensors: custom-op schemas cannot return None.

@torch.library.custom_op("nti::ddim_step_backward", mutates_args=())
def _ddim_step_backward_op(grad: Tensor, w: Optional[Tensor], a_from: Tensor, a_to: Tensor, x_dtype: torch.dtype,
                           eu_dtype: torch.dtype, ec_dtype: torch.dtype, want_x: bool, want_eu: bool,
                           want_ec: bool) -> tuple[Tensor, Tensor, Tensor]:
    dtypes, wants = (x_dtype, eu_dtype, ec_dtype), (want_x, want_eu, want_ec and w is not None)
    grad, w, a_from, a_to = _contig(grad, w, a_from, a_to)
    if _use_triton(grad, w, a_from, a_to) and all(d in _KERNEL_DTYPES for d in dtypes):
        return _triton_bwd(grad, None, None, None, w, a_from, a_to, None, grad.shape, dtypes, wants)
    return _grads_torch(grad.to(_cdtype(grad, w, a_from, a_to)), w, a_from, a_to, dtypes, wants)


@_ddim_step_backward_op.register_fake
def _(grad, w, a_from, a_to, x_dtype, eu_dtype, ec_dtype, want_x, want_eu, want_ec):
    wants = (want_x, want_eu, want_ec and w is not None)
    return tuple(grad.new_empty(grad.shape if want else (0,), dtype=d)
                 for d, want in zip((x_dtype, eu_dtype, ec_dtype), wants))


@torch.library.custom_op("nti::guided_ddim_step_mse_backward", mutates_args=())
def _mse_backward_op(grad: Tensor, x: Tensor, eps_u: Tensor, eps_c: Tensor, w: Tensor, a_t: Tensor, a_prev: Tensor,
                     target: Tensor, want_x: bool, want_eu: bool, want_ec: bool) -> tuple[Tensor, Tensor, Tensor]:
    dtypes, wants = (x.dtype, eps_u.dtype, eps_c.dtype), (want_x, want_eu, want_ec)
    grad, x, eps_u, eps_c, w, a_t, a_prev, target = _contig(grad, x, eps_u, eps_c, w, a_t, a_prev, target)
    if _use_triton(x, grad, eps_u, eps_c, w, a_t, a_prev, target):
        return _triton_bwd(grad, x, eps_u, eps_c, w, a_t, a_prev, target, x.shape, dtypes, wants)
    dt = _cdtype(grad, x, eps_u, eps_c, w, a_t, a_prev, target)
    x_prev = guided_ddim_step_ref(x, eps_u, eps_c, w, a_t, a_prev)
    n = x[0].numel()
    common = _col(grad, x, dt) * (2.0 / n) * (x_prev - target.to(dt))
    return _grads_torch(common, w, a_t, a_prev, dtypes, wants)


@_mse_backward_op.register_fake
def _(grad, x, eps_u, eps_c, w, a_t, a_prev, target, want_x, want_eu, want_ec):
    return tuple(x.new_empty(x.shape if want else (0,), dtype=t.dtype)
                 for t, want in zip((x, eps_u, eps_c), (want_x, want_eu, want_ec)))


def _some(g: Tensor, want: bool) -> Optional[Tensor]:
    return g if want else None


def _step_setup(ctx, inputs, output):
    # the step is affine in x and eps: the backward needs only coefficients and the input dtypes, not the latents
    x, eps, a_from, a_to = inputs
    ctx.dtypes = (x.dtype, eps.dtype)
    ctx.save_for_backward(a_from, a_to)


def _step_backward(ctx, grad):
    a_from, a_to = ctx.saved_tensors
    want_x, want_eps = ctx.needs_input_grad[:2]
    gx, geps, _ = torch.ops.nti.ddim_step_backward(grad, None, a_from, a_to, ctx.dtypes[0], ctx.dtypes[1],
                                                   ctx.dtypes[1], want_x, want_eps, False)
    return _some(gx, want_x), _some(geps, want_eps), None, None


def _guided_setup(ctx, inputs, output):
    x, eps_u, eps_c, w, a_t, a_prev = inputs
    ctx.dtypes = (x.dtype, eps_u.dtype, eps_c.dtype)
    ctx.save_for_backward(w, a_t, a_prev)


def _guided_backward(ctx, grad):
    w, a_t, a_prev = ctx.saved_tensors
    wants = ctx.needs_input_grad[:3]
    gx, geu, gec = torch.ops.nti.ddim_step_backward(grad, w, a_t, a_prev, *ctx.dtypes, *wants)
    return _some(gx, wants[0]), _some(geu, wants[1]), _some(gec, wants[2]), None, None, None


def _mse_setup(ctx, inputs, output):
    # Recompute x_prev in the backward rather than save it: the inputs are alive anyway (the UNet graph holds
    # eps_u/eps_c, the engine holds x/target), the forward then writes only B floats, and the backward's extra reads
    # (x, eps_u, eps_c, target instead of one saved tensor) are elementwise traffic on a latent-sized, launch-bound
    # kernel. Saving would cost one latent-sized fp32 write per forward, also under no_grad evaluation.
    ctx.save_for_backward(*inputs)


def _mse_backward(ctx, grad):
    x, eps_u, eps_c, w, a_t, a_prev, target = ctx.saved_tensors
    wants = ctx.needs_input_grad[:3]
    gx, geu, gec = torch.ops.nti.guided_ddim_step_mse_backward(grad, x, eps_u, eps_c, w, a_t, a_prev, target, *wants)
    return _some(gx, wants[0]), _some(geu, wants[1]), _some(gec, wants[2]), None, None, None, None


torch.library.register_autograd("nti::ddim_step", _step_backward, setup_context=_step_setup)
torch.library.register_autograd("nti::guided_ddim_step", _guided_backward, setup_context=_guided_setup)
torch.library.register_autograd("nti::guided_ddim_step_mse", _mse_backward, setup_context=_mse_setup)


# ----------------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------------

def _coef(c, x: Tensor) -> Tensor:
    """Per-image coefficient as a (B,) tensor on x's device; python floats, 0-d and (1,) tensors are broadcast."""
    if not isinstance(c, Tensor):
        return torch.full((x.shape[0],), float(c), dtype=torch.float32, device=x.device)
    c = c.to(device=x.device, dtype=torch.float64 if c.dtype == torch.float64 else torch.float32)
    # (1,) too, as engine/ddim.py's step broadcasts it (schedule.alphas[t:t + 1], say); other lengths are refused
    return c.reshape(()).expand(x.shape[0]) if c.ndim <= 1 and c.numel() == 1 else c


def ddim_step(x: Tensor, eps: Tensor, a_from, a_to) -> Tensor:
    """DDIM update, Song et al. 2021 Eq. 12 (eta=0), from alpha_bar a_from to a_to (per image); fp32 out."""
    return torch.ops.nti.ddim_step(x, eps, _coef(a_from, x), _coef(a_to, x))


def guided_ddim_step(x: Tensor, eps_u: Tensor, eps_c: Tensor, w, a_t, a_prev) -> Tensor:
    """CFG (Ho & Salimans 2022) fused with the DDIM update, Song et al. 2021 Eq. 12 (eta=0); fp32 out."""
    return torch.ops.nti.guided_ddim_step(x, eps_u, eps_c, _coef(w, x), _coef(a_t, x), _coef(a_prev, x))


def guided_ddim_step_mse(x: Tensor, eps_u: Tensor, eps_c: Tensor, w, a_t, a_prev, target: Tensor) -> Tensor:
    """Null-text loss (Mokady et al. 2023): per-image mean((DDIM Eq. 12 of CFG eps - target)^2), (B,) fp32."""
    return torch.ops.nti.guided_ddim_step_mse(x, eps_u, eps_c, _coef(w, x), _coef(a_t, x), _coef(a_prev, x), target)

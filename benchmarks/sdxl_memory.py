"""SDXL memory plan for null-text inversion: bytes autograd saves per image, weights, FLOPs, the batch that fits.

    python -m nti.benchmarks.sdxl_memory --out benchmarks/results/sdxl_memory_cpu.json --overwrite

One inner iteration of null-text inversion is one UNet forward of the unconditional branch with grad to the text
conditioning only (UNet weights frozen), then backward to that conditioning. This counts, device-independently and
without real memory, what that costs for the SDXL base UNet at 1024 px and SD v1.4's at 512 px, the way the engine's
fast path runs them: Linear/Conv weights pre-cast to bf16, everything else under CUDA autocast's bf16 policy (norms
in fp32). Full-size UNets run under FakeTensorMode (shapes, dtypes and storage lifetimes, no data). Per run:
- saved: storages autograd saves for backward (torch.autograd.graph.saved_tensors_hooks, each storage once), split
  by UNet unit (resnet / transformer / resampler per block) and resolution;
- peak: the most bytes alive at once during forward + backward (every op's output storage, freed when it dies), i.e.
  what the caching allocator must hold before fragmentation and library workspaces;
- FLOPs (torch.utils.flop_counter) of the forward and of forward + backward to the conditioning.
tests/test_sdxl_memory.py checks the counts against real tensors on small UNets.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import sys
import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from nti.benchmarks.results_file import add_overwrite, refuse_existing, write_text

GiB = 2**30
BF16 = torch.bfloat16

# ------------------------------------------------------------------------------------------------------- the models

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (diffusers 0.19); what it leaves out are diffusers'
# defaults (in_channels 4, norm_num_groups 32, norm_eps 1e-5, flip_sin_to_cos, mid block UNetMidBlock2DCrossAttn).
SDXL_BASE_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    upcast_attention=False)
# CompVis/stable-diffusion-v1-4 unet/config.json: diffusers' defaults but for these three
SD14_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
MODELS = {"sdxl": SDXL_BASE_UNET, "sd14": SD14_UNET}
# parameter counts that pin the architectures: SD v1.x from diffusers' own ModelMixin.num_parameters docstring,
# SDXL base the figure its published checkpoint loads with
PARAMETERS = {"sdxl": 2_567_463_684, "sd14": 859_520_964}
# SDXL's micro-conditioning: original size, crop top-left, target size
SDXL_TIME_IDS = (1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0)


def build_unet(config: dict, fake_mode=None, seed: int = 0) -> nn.Module:
    """The UNet as the engine's bf16 fast path holds it: Linear/Conv weights and biases bf16, norms fp32, frozen,
    eval mode, torch SDPA attention (engine/runner.py prepared_unet + set_attention)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    torch.manual_seed(seed)
    with fake_mode or contextlib.nullcontext():
        unet = UNet2DConditionModel(**config)
    half_weights_(unet)
    unet.eval().requires_grad_(False)
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def half_weights_(unet: nn.Module, dtype: torch.dtype = BF16) -> None:
    """Cast Linear/Conv parameters to dtype in place, as engine/runner.py's _copy_unet does for its copy (parameters
    are replaced, not converted: fake tensors cannot be swapped in place)."""
    for module in unet.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))


def unet_call(unet: nn.Module, batch: int, fake_mode=None, pooled_grad: bool = True, latent: int | None = None):
    """(kwargs for unet(**kwargs), leaves to differentiate to): the engine's inner-iteration call, fp32 latents and
    conditioning, a 0-d int64 timestep; SDXL adds text_embeds (pooled, optimized too when pooled_grad) and time_ids."""
    cfg = unet.config
    side = latent or cfg.sample_size
    with fake_mode or contextlib.nullcontext():
        kwargs = dict(sample=torch.randn(batch, cfg.in_channels, side, side), timestep=torch.tensor(981),
                      encoder_hidden_states=torch.randn(batch, 77, cfg.cross_attention_dim).requires_grad_(True))
        leaves = [kwargs["encoder_hidden_states"]]
        if cfg.addition_embed_type == "text_time":
            pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            text_embeds = torch.randn(batch, pooled_dim).requires_grad_(pooled_grad)
            kwargs["added_cond_kwargs"] = {"text_embeds": text_embeds,
                                           "time_ids": torch.tensor([SDXL_TIME_IDS] * batch)}
            if pooled_grad:
                leaves.append(text_embeds)
    return kwargs, leaves


# --------------------------------------------------------------------------------------------- CUDA autocast policy

# torch's autocast op lists (aten/src/ATen/autocast_mode.h, AT_FORALL_*; CUDA registers these in autocast_mode.cpp).
# CPU autocast has its own, shorter lists: it runs group_norm and layer_norm in bf16, where CUDA runs them in fp32,
# so CPU autocast would count the wrong bytes for a CUDA engine. A CUDA autocast cannot run on fake CUDA tensors in a
# CPU build (autograd needs the CUDA device guard), hence this emulation at the torch-function level, above autograd,
# where autocast's own casts also land (its dispatch key precedes Autograd): the same ops are recorded and saved.
CUDA_LOWER = frozenset(
    "_convolution conv1d conv2d conv3d conv_tbc conv_transpose1d conv_transpose2d conv_transpose3d convolution prelu "
    "addmm addmv addr matmul einsum mm mv linalg_vecdot linear addbmm baddbmm bmm chain_matmul linalg_multi_dot "
    "_thnn_fused_lstm_cell _thnn_fused_gru_cell lstm_cell gru_cell rnn_tanh_cell rnn_relu_cell "
    "_scaled_dot_product_flash_attention scaled_dot_product_attention".split())
CUDA_FP32 = frozenset(
    "acos asin cosh erfinv exp expm1 log log10 log2 log1p reciprocal rsqrt sinh tan pow softplus layer_norm "
    "native_layer_norm group_norm frobenius_norm nuclear_norm cosine_similarity poisson_nll_loss cosine_embedding_loss "
    "nll_loss nll_loss2d hinge_embedding_loss kl_div l1_loss smooth_l1_loss huber_loss mse_loss margin_ranking_loss "
    "multilabel_margin_loss soft_margin_loss triplet_margin_loss multi_margin_loss binary_cross_entropy_with_logits "
    "dist pdist cdist renorm logsumexp".split())
CUDA_FP32_SET_DTYPE = frozenset("prod softmax log_softmax cumprod cumsum linalg_vector_norm linalg_matrix_norm "
                                "sum".split())
CUDA_PROMOTE = frozenset("addcdiv addcmul atan2 bilinear cross dot grid_sampler index_put tensordot "
                         "scatter_add".split())
# CPU's lists, only to prove the emulation against torch.autocast("cpu") (tests/test_sdxl_memory.py)
CPU_LOWER = frozenset(
    "conv1d conv2d conv3d bmm mm linalg_vecdot baddbmm addmm addbmm linear _convolution matmul conv_tbc "
    "mkldnn_rnn_layer conv_transpose1d conv_transpose2d conv_transpose3d prelu scaled_dot_product_attention "
    "_native_multi_head_attention".split())
CPU_FP32 = frozenset(
    "avg_pool3d binary_cross_entropy grid_sampler polar prod quantile nanquantile stft cdist trace view_as_complex "
    "cholesky cholesky_inverse cholesky_solve inverse lu_solve orgqr ormqr pinverse max_pool3d max_unpool2d "
    "max_unpool3d adaptive_avg_pool3d reflection_pad1d reflection_pad2d replication_pad1d replication_pad2d "
    "replication_pad3d mse_loss cosine_embedding_loss nll_loss nll_loss2d hinge_embedding_loss poisson_nll_loss "
    "smooth_l1_loss cross_entropy_loss l1_loss huber_loss margin_ranking_loss soft_margin_loss triplet_margin_loss "
    "multi_margin_loss ctc_loss kl_div multilabel_margin_loss binary_cross_entropy_with_logits".split())
CPU_PROMOTE = frozenset("stack cat index_copy".split())
POLICIES = {"cuda": (CUDA_LOWER, CUDA_FP32, CUDA_FP32_SET_DTYPE, CUDA_PROMOTE),
            "cpu": (CPU_LOWER, CPU_FP32, frozenset(), CPU_PROMOTE)}
DUNDER = {"__pow__": "pow", "__rpow__": "pow", "__matmul__": "matmul", "__rmatmul__": "matmul"}


class EmulatedAutocast(TorchFunctionMode):
    """torch.autocast(device, bf16)'s cast policy applied to torch functions: lower-precision ops get their fp32
    tensor arguments in bf16, fp32 ops get their bf16 arguments in fp32, promote ops the widest type."""

    def __init__(self, policy: str = "cuda", dtype: torch.dtype = BF16):
        super().__init__()
        self.lower, self.fp32, self.fp32_set_dtype, self.promote = POLICIES[policy]
        self.dtype = dtype
        self.cast_ops: dict[str, int] = {}  # op name -> calls that went through a policy (what the emulation touched)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        name = DUNDER.get(name, name)
        if name in self.lower:
            args, kwargs = _cast((args, kwargs), self.dtype)
        elif name in self.fp32:
            args, kwargs = _cast((args, kwargs), torch.float32)
        elif name in self.fp32_set_dtype:
            first = next((a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)), None)
            if first is not None and _eligible(first) and kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": torch.float32}
        elif name in self.promote:
            widest = [a.dtype for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor) and _eligible(a)]
            if widest:
                args, kwargs = _cast((args, kwargs), max(widest, key=lambda d: torch.finfo(d).bits))
        else:
            return func(*args, **kwargs)
        self.cast_ops[name] = self.cast_ops.get(name, 0) + 1
        return func(*args, **kwargs)


def _eligible(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.dtype != torch.float64


def _cast(tree, dtype):
    leaves, spec = tree_flatten(tree)
    leaves = [t.to(dtype) if isinstance(t, torch.Tensor) and _eligible(t) and t.dtype != dtype else t for t in leaves]
    return tree_unflatten(leaves, spec)


# ------------------------------------------------------------------------------------------------- what is counted

def unit_names(unet: nn.Module) -> dict[nn.Module, str]:
    """The UNet's units: each block, and in it each resnet, transformer (Transformer2DModel) with each of its
    transformer blocks, and down/upsampler, and the top-level layers; saved bytes and FLOPs go to the innermost unit
    running (a block itself holds what runs between its units, e.g. the inputs checkpointing saves for its resnets).
    Resnets and transformer blocks are what diffusers checkpoints, one call each."""
    units = {}
    for name, module in unet.named_modules():
        parts = name.split(".")
        depth = len(parts) + (parts[0] == "mid_block")  # mid_block is one level shallower than down/up_blocks.i
        top = len(parts) == 1 and name and not isinstance(module, nn.ModuleList)
        block = parts[0] in ("down_blocks", "up_blocks") and depth == 2
        inner = depth in (4, 6) and parts[-2] in ("resnets", "attentions", "downsamplers", "upsamplers",
                                                  "transformer_blocks")
        if top or block or inner:
            units[module] = name
    return units


class UnitTracker:
    """Which unit is running, and the spatial size of its input (forward pre/post hooks, also during recompute)."""

    def __init__(self, unet: nn.Module):
        self.stack: list[str] = []
        self.resolution: dict[str, str] = {}
        self.handles = []
        for module, name in unit_names(unet).items():
            self.handles.append(module.register_forward_pre_hook(partial(self._enter, name), with_kwargs=True))
            self.handles.append(module.register_forward_hook(partial(self._exit, name), always_call=True))

    def _enter(self, name, module, args, kwargs):
        self.stack.append(name)
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor) and x.ndim == 4 and name not in self.resolution:
            self.resolution[name] = f"{x.shape[-2]}x{x.shape[-1]}"

    def _exit(self, name, module, args, output):
        if self.stack and self.stack[-1] == name:
            self.stack.pop()

    @property
    def current(self) -> str:
        return self.stack[-1] if self.stack else "unet"

    def remove(self):
        for h in self.handles:
            h.remove()


class LiveBytes(TorchDispatchMode):
    """Bytes of op output storages alive at once (new storages only; those of `known` tensors are not counted):
    the running total and its peak. Frees are seen through weak references to the storages."""

    def __init__(self, known=()):
        super().__init__()
        self.known = {_key(t) for t in known}
        self.refs: dict[int, weakref.ref] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.known or key in self.refs:
            return
        nbytes = st.nbytes()
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        self.refs[key] = weakref.ref(st, partial(self._freed, key, nbytes))

    def _freed(self, key, nbytes, _ref):
        self.now -= nbytes
        self.refs.pop(key, None)


class OpNames(TorchDispatchMode):
    """Names of the aten ops run whose name contains one of `words` (which attention kernel ran)."""

    def __init__(self, words=("attention", "softmax")):
        super().__init__()
        self.words, self.seen = words, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket.__name__)
        if any(w in name for w in self.words):
            self.seen[name] = self.seen.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


class RecomputeFlops(TorchDispatchMode):
    """FLOPs of the ops run inside a unit during backward, per unit: with checkpointing, the recompute (outside a
    recompute no unit is running in backward). torch's non-reentrant checkpoint stops recomputing once the tensors
    backward needs are back, so this is less than the units' forward FLOPs."""

    def __init__(self, tracker: "UnitTracker", registry: dict):
        super().__init__()
        self.tracker, self.registry, self.by_unit = tracker, registry, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        count = self.registry.get(func.overloadpacket)
        if count is not None and self.tracker.stack:
            unit = self.tracker.current
            self.by_unit[unit] = self.by_unit.get(unit, 0) + count(*args, **(kwargs or {}), out_val=out)
        return out


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _cpu_flash_flops(q, k, v, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(q, k, v)


def _cpu_flash_backward_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out, q, k, v)


def flop_counter() -> "torch.utils.flop_counter.FlopCounterMode":
    """FlopCounterMode that also counts CPU's flash attention as it counts CUDA's (torch's registry lacks it)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(display=False, depth=None, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops})


def module_flops(counts: dict) -> dict[str, int]:
    """FlopCounterMode's per-module totals, keyed by the module's name in the UNet ('' for the UNet itself)."""
    return {(key.split(".", 1)[1] if "." in key else ""): int(sum(per_op.values())) for key, per_op in counts.items()}


# ---------------------------------------------------------------------------------------------- one counted pass

@dataclass
class PassCount:
    """One UNet pass of `batch` rows: what autograd saves, the most bytes alive at once, FLOPs."""

    batch: int
    saved_bytes: int  # activation storages autograd saves for backward, each once (weights excluded)
    saved_weight_bytes: int  # weight storages it saves too: resident anyway, no extra memory
    saved_storages: int
    peak_forward_bytes: int  # most bytes alive at once during the forward, above weights and inputs
    peak_bytes: int  # the same over forward + backward: what the pass needs besides the weights
    forward_flops: int
    forward_backward_flops: int
    attention_ops: dict[str, int]  # aten attention ops run (forward and backward) and how often
    autocast_ops: dict[str, int]  # torch functions the emulated autocast cast for, and how often
    checkpointed_modules: int
    saved_bytes_by_unit: dict[str, int] = field(default_factory=dict)
    recompute_flops_by_unit: dict[str, int] = field(default_factory=dict)
    resolution_by_unit: dict[str, str] = field(default_factory=dict)
    forward_flops_by_unit: dict[str, int] = field(default_factory=dict)


def count_pass(unet: nn.Module, batch: int, fake_mode=None, grad: bool = True, pooled_grad: bool = True,
               math_attention: bool = False, policy: str = "cuda", latent: int | None = None,
               flops: bool = True) -> PassCount:
    """Run the engine's inner-iteration UNet pass, forward with grad to the conditioning then backward to it, and
    count it; grad=False counts a forward-only pass (DDIM inversion, sampling). policy: 'cuda' or 'cpu' (the
    emulated autocast policies) or 'torch-cpu' (torch.autocast('cpu') itself, to check the emulation).
    Memory and FLOPs are counted in separate runs: FlopCounterMode's module tracker hooks tensors into reference
    cycles, which keep activations (recomputed ones above all) alive until Python's garbage collector runs."""
    kwargs, leaves = unet_call(unet, batch, fake_mode, pooled_grad, latent)
    weights = {_key(t): t for t in (*unet.parameters(), *unet.buffers())}
    saved: dict[int, tuple[str, int]] = {}
    saved_weights: dict[int, int] = {}
    tracker = UnitTracker(unet)

    def pack(t: torch.Tensor):
        key = _key(t)  # one storage saved by several ops (or through views) is held once
        if key in weights:
            saved_weights.setdefault(key, t.untyped_storage().nbytes())
        elif key not in saved:
            saved[key] = (tracker.current, t.untyped_storage().nbytes())
        return t

    inputs = [t for t in tree_flatten(kwargs)[0] if isinstance(t, torch.Tensor)]
    live = LiveBytes([*weights.values(), *inputs])
    ops = OpNames()
    gc_was_on = gc.isenabled()
    gc.collect()
    gc.disable()  # frees happen by reference count only: deterministic, and anything held by a cycle counts
    fwd_flops, fwd_bwd_flops, flops_by_unit, recompute = 0, 0, {}, None
    try:
        with _pass_context(fake_mode, math_attention), live, ops:
            peak_forward, cast = _run_pass(unet, kwargs, leaves, grad, policy, pack)
        if gc_was_on:
            gc.enable()
        if flops:
            fwd_counter, bwd_counter = flop_counter(), flop_counter()
            recompute = RecomputeFlops(tracker, bwd_counter.flop_registry)
            with _pass_context(fake_mode, math_attention):
                _run_pass(unet, kwargs, leaves, grad, policy, None, fwd_counter, bwd_counter, recompute)
            fwd_flops = fwd_counter.get_total_flops()
            fwd_bwd_flops = fwd_flops + (bwd_counter.get_total_flops() if grad else 0)
            units = set(unit_names(unet).values())
            flops_by_unit = {m: f for m, f in module_flops(fwd_counter.get_flop_counts()).items() if m in units}
    finally:
        tracker.remove()
        if gc_was_on:
            gc.enable()
    by_unit: dict[str, int] = {}
    for unit, nbytes in saved.values():
        by_unit[unit] = by_unit.get(unit, 0) + nbytes
    return PassCount(
        batch=batch, saved_bytes=sum(n for _, n in saved.values()), saved_weight_bytes=sum(saved_weights.values()),
        saved_storages=len(saved), peak_forward_bytes=peak_forward, peak_bytes=live.peak, forward_flops=fwd_flops,
        forward_backward_flops=fwd_bwd_flops, attention_ops=ops.seen, autocast_ops=getattr(cast, "cast_ops", {}),
        checkpointed_modules=sum(getattr(m, "gradient_checkpointing", False) is True for m in unet.modules()),
        saved_bytes_by_unit=by_unit, recompute_flops_by_unit=recompute.by_unit if recompute else {},
        resolution_by_unit=dict(tracker.resolution), forward_flops_by_unit=flops_by_unit)


def _pass_context(fake_mode, math_attention: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    stack = contextlib.ExitStack()
    if fake_mode is not None:
        stack.enter_context(fake_mode)
    if math_attention:
        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


def _run_pass(unet, kwargs, leaves, grad, policy, pack=None, fwd_counter=None, bwd_counter=None, recompute=None):
    """The pass itself: forward under autocast (saved tensors through `pack`), backward outside it to the leaves, as
    engine/fast.py inner_iteration runs it. Returns the LiveBytes peak after the forward (if one is active) and the
    autocast used."""
    autocast = (torch.autocast("cpu", dtype=BF16, cache_enabled=False) if policy == "torch-cpu"
                else EmulatedAutocast(policy))
    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if pack else contextlib.nullcontext()
    with autocast, fwd_counter or contextlib.nullcontext(), torch.set_grad_enabled(grad), hooks:
        out = unet(**kwargs).sample
    live = next((m for m in _dispatch_modes() if isinstance(m, LiveBytes)), None)
    peak_forward = live.peak if live else 0
    if grad:
        with bwd_counter or contextlib.nullcontext(), recompute or contextlib.nullcontext():
            # The engine's loss reads eps in fp32; its value does not change what the UNet holds. The engine calls
            # autograd.grad: backward(inputs=) runs the same graph to the same leaves (their .grad is a few KB),
            # and FlopCounterMode's module tracker refuses autograd.grad through checkpointed modules.
            out.float().square().sum().backward(inputs=leaves)
    del out
    return peak_forward, autocast


def _dispatch_modes() -> list:
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    return list(_get_current_dispatch_mode_stack())


# ------------------------------------------------------------------------------------------- gradient checkpointing

def checkpoint_under_policy(policy: str, module: nn.Module, *args):
    """diffusers' default gradient-checkpointing function (non-reentrant torch.utils.checkpoint of module.__call__),
    with the recompute run under the same emulated autocast: real autocast gets that from checkpoint itself, which
    restores the forward's autocast state when it recomputes in backward."""
    from torch.utils.checkpoint import checkpoint

    def run(*inner):
        with contextlib.nullcontext() if _policy_active() else EmulatedAutocast(policy):
            return module(*inner)
    return checkpoint(run, *args, use_reentrant=False)


def _policy_active() -> bool:
    from torch.overrides import _get_current_function_mode_stack
    return any(isinstance(m, EmulatedAutocast) for m in _get_current_function_mode_stack())


def set_checkpointing(unet: nn.Module, which: str = "all", policy: str | None = "cuda") -> int:
    """Gradient checkpointing as diffusers does it (unet.enable_gradient_checkpointing()): each resnet of a block
    whose flag is on, and each transformer block of a Transformer2DModel whose flag is on, is recomputed in
    backward. `which`: none | all | transformers | resnets (the blocks' flags) | a comma list of module names.
    policy=None keeps diffusers' own function (with real autocast). Returns how many flags are on."""
    if which == "none":
        unet.disable_gradient_checkpointing()
        return 0
    unet.enable_gradient_checkpointing(partial(checkpoint_under_policy, policy) if policy else None)
    names = None if which in ("all", "transformers", "resnets") else set(which.split(","))
    on = 0
    for name, module in unet.named_modules():
        if module is unet or not hasattr(module, "gradient_checkpointing"):
            continue
        transformer = type(module).__name__ == "Transformer2DModel"
        module.gradient_checkpointing = (which == "all" or (which == "transformers" and transformer)
                                         or (which == "resnets" and not transformer)
                                         or (names is not None and name in names))
        on += module.gradient_checkpointing
    return on


def checkpoint_toggles(unet: nn.Module) -> list[str]:
    """The modules whose gradient_checkpointing flag diffusers reads: blocks (their resnets) and transformers."""
    return [name for name, m in unet.named_modules() if m is not unet and hasattr(m, "gradient_checkpointing")]


def toggle_ranking(unet: nn.Module, none: dict, all_: dict) -> list[dict]:
    """Per checkpointing flag: the saved bytes per image it frees (per-unit counts without and with every flag on)
    and the FLOPs it recomputes in backward (counted with every flag on), best bytes per recomputed FLOP first.
    Frees are estimates (a storage two units share is attributed to one); selections built from them are counted."""
    saved_none, saved_all = none["saved_bytes_per_image_by_unit"], all_["saved_bytes_per_image_by_unit"]
    recompute = all_["recompute_flops_per_image_by_unit"]
    rows = []
    for name in checkpoint_toggles(unet):
        module = unet.get_submodule(name)
        if type(module).__name__ == "Transformer2DModel":
            kind, units = "transformer blocks", [u for u in set(saved_none) | set(saved_all) | set(recompute)
                                                 if u == name or u.startswith(name + ".")]
        else:  # a block's flag checkpoints its resnets; the inputs it then saves land on the block itself
            kind, units = "resnets", [name] + [u for u in set(saved_none) | set(saved_all) | set(recompute)
                                               if u.startswith(name + ".resnets.")]
        freed = sum(saved_none.get(u, 0) - saved_all.get(u, 0) for u in units)
        cost = sum(recompute.get(u, 0) for u in units)
        rows.append({"module": name, "kind": kind, "resolution": none["resolution_by_unit"].get(name, ""),
                     "layers": len(module.transformer_blocks) if kind == "transformer blocks" else len(module.resnets),
                     "freed_saved_bytes_per_image": freed, "recompute_flops_per_image": cost,
                     "freed_bytes_per_recompute_gflop": freed / cost * 1e9 if cost else None})
    rows.sort(key=lambda r: -(r["freed_bytes_per_recompute_gflop"] or 0))
    return rows


# ------------------------------------------------------------------------------------------------- configurations

@dataclass
class Setting:
    """One configuration to count: model, pass, checkpointing, attention path."""

    model: str  # sdxl | sd14
    name: str  # what the row is called
    grad: bool = True  # the NTI inner iteration (forward with grad + backward); False: forward only
    checkpointing: str = "none"
    math_attention: bool = False
    pooled_grad: bool = True  # SDXL: the pooled null embedding (text_embeds) is optimized too
    batches: tuple[int, ...] = (1, 2)  # rows counted; per-image figures are the slope between the first two
    rows_per_image: int = 1  # forward-only sampling with CFG runs 2 rows per image


def measure(unet: nn.Module, fake_mode, setting: Setting) -> dict:
    """Count a setting at two batch sizes; per-image figures are the slope (all activations scale with the batch),
    fixed figures the rest."""
    on = set_checkpointing(unet, setting.checkpointing)
    start = time.perf_counter()
    # FLOPs are exactly per row (no batch-independent work in the UNet): counted once, at the first batch size
    counts = [count_pass(unet, b, fake_mode, grad=setting.grad, pooled_grad=setting.pooled_grad,
                         math_attention=setting.math_attention, flops=i == 0) for i, b in enumerate(setting.batches)]
    seconds = time.perf_counter() - start
    set_checkpointing(unet, "none")
    a, b = counts[0], counts[1]
    rows = b.batch - a.batch
    k = setting.rows_per_image

    def slope(x, y):
        return (y - x) * k / rows

    def per_image(field_):
        return slope(getattr(a, field_), getattr(b, field_))

    def flops_per_image(value):
        return value * k / a.batch

    units = set(a.saved_bytes_by_unit) | set(b.saved_bytes_by_unit)
    by_unit = {u: slope(a.saved_bytes_by_unit.get(u, 0), b.saved_bytes_by_unit.get(u, 0)) for u in units}
    cfg = unet.config
    row = {
        "model": setting.model, "configuration": setting.name,
        "pass": "NTI inner iteration: UNet forward with grad to the conditioning + backward to it" if setting.grad
        else "forward only (no grad)",
        "grad_to": (["encoder_hidden_states"] + (["text_embeds"] if setting.pooled_grad
                                                  and cfg.addition_embed_type == "text_time" else []))
        if setting.grad else [],
        "resolution_px": cfg.sample_size * 8, "latent_side": cfg.sample_size, "rows_per_image": k,
        "checkpointing": setting.checkpointing, "checkpoint_flags_on": on,
        "attention": "math (attention matrix materialized)" if setting.math_attention
        else "memory-efficient SDPA (flash)",
        "attention_ops": a.attention_ops, "autocast_ops": a.autocast_ops, "unet_training_mode": unet.training,
        "batches_counted": list(setting.batches),
        "saved_bytes_per_image": per_image("saved_bytes"),
        "saved_bytes_fixed": a.saved_bytes - per_image("saved_bytes") * a.batch / k,
        "saved_storages": a.saved_storages,  # how many storages: the same at every batch size
        "peak_bytes_per_image": per_image("peak_bytes"),
        "peak_bytes_fixed": a.peak_bytes - per_image("peak_bytes") * a.batch / k,
        "peak_forward_bytes_per_image": per_image("peak_forward_bytes"),
        "forward_flops_per_image": flops_per_image(a.forward_flops),
        "forward_backward_flops_per_image": flops_per_image(a.forward_backward_flops) if setting.grad else None,
        "counts": [{"batch_rows": c.batch, "saved_bytes": c.saved_bytes, "saved_weight_bytes": c.saved_weight_bytes,
                    "peak_bytes": c.peak_bytes, "peak_forward_bytes": c.peak_forward_bytes,
                    "forward_flops": c.forward_flops if i == 0 else None,
                    "forward_backward_flops": c.forward_backward_flops if i == 0 and setting.grad else None}
                   for i, c in enumerate(counts)],
        "saved_bytes_per_image_by_level": by_level(by_unit, b.resolution_by_unit),
        "saved_bytes_per_image_by_unit": by_unit,
        "resolution_by_unit": b.resolution_by_unit,
        "forward_flops_per_image_by_unit": {u: flops_per_image(v) for u, v in a.forward_flops_by_unit.items()},
        "recompute_flops_per_image_by_unit": {u: flops_per_image(v) for u, v in a.recompute_flops_by_unit.items()},
        "count_seconds": round(seconds, 1),
    }
    print(f"{setting.model:5s} {setting.name:38s} saved {row['saved_bytes_per_image'] / GiB:6.3f} GiB/image, peak "
          f"{row['peak_bytes_per_image'] / GiB:6.3f} GiB/image, fwd {row['forward_flops_per_image'] / 1e12:6.3f} "
          f"TFLOP/image ({seconds:.0f} s)", file=sys.stderr)
    return row


def by_level(by_unit: dict[str, float], resolution: dict[str, str]) -> dict[str, float]:
    """Saved bytes per part of the UNet (down / mid / up), resolution and kind of unit."""
    out: dict[str, float] = {}
    for unit, nbytes in by_unit.items():
        parts = unit.split(".")
        part = {"down_blocks": "down", "up_blocks": "up", "mid_block": "mid"}.get(parts[0])
        if part is None:
            key = "out" if unit.startswith("conv_norm_out") or unit in ("conv_act", "conv_out") else "in / embeddings"
        else:
            kind = "attentions" if "attentions" in parts else parts[-2] if len(parts) >= 3 else "block (between units)"
            where = next((resolution[".".join(parts[:i])] for i in range(len(parts), 0, -1)
                          if ".".join(parts[:i]) in resolution), "")
            key = f"{part} {where} {kind}".replace("  ", " ")
        out[key] = out.get(key, 0) + nbytes
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# --------------------------------------------------------------------------------------------------- the weights

def weight_bytes(unet: nn.Module) -> dict:
    """Bytes of the fast path's UNet copy: bf16 Linear/Conv parameters, fp32 everything else (norms, buffers)."""
    half = sum(p.numel() * p.element_size() for p in unet.parameters() if p.dtype == BF16)
    rest = sum(p.numel() * p.element_size() for p in unet.parameters() if p.dtype != BF16)
    buffers = sum(b.numel() * b.element_size() for b in unet.buffers())
    return {"parameters": sum(p.numel() for p in unet.parameters()), "bf16_linear_conv_bytes": half,
            "fp32_norm_and_other_bytes": rest + buffers, "unet_copy_bytes": half + rest + buffers,
            "fp32_unet_bytes": 4 * sum(p.numel() for p in unet.parameters()) + buffers}


def other_components(model: str, fake_mode) -> dict:
    """Parameters of the pipeline's text encoder(s) and VAE (architecture only, fake tensors)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_l = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
    with fake_mode:
        encoders = [CLIPTextModel(CLIPTextConfig(**clip_l))]
        if model == "sdxl":  # OpenCLIP ViT-bigG/14's text tower with its projection (the pooled embedding)
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(
                vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2)
    n = sum(p.numel() for m in encoders for p in m.parameters())
    v = sum(p.numel() for p in vae.parameters())
    return {"text_encoder_parameters": n, "vae_parameters": v, "fp32_bytes": 4 * (n + v)}


# ---------------------------------------------------------------------------------------------------- validation

# tiny UNet of SDXL's shape (text_time conditioning, same block types, linear projections) for real-tensor checks
TINY_SDXL_UNET = dict(
    sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2, transformer_layers_per_block=(1, 2, 2),
    attention_head_dim=(2, 4, 4), cross_attention_dim=64,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    upcast_attention=False)


def allocator_timeline(fn) -> tuple[int, int]:
    """(peak, end) bytes the CPU allocator held above the start while fn() ran, from torch.profiler's allocation
    records: an independent real-memory measurement to hold the counts against."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    now = peak = 0
    for _, size in sorted(events):
        now += size
        peak = max(peak, now)
    return peak, now


def validate_small(config: dict = TINY_SDXL_UNET, batch: int = 2) -> dict:
    """On a small real UNet on CPU: the fake count against the same count on real tensors, the emulated CPU
    autocast against torch.autocast('cpu'), and the saved bytes and peak against the CPU allocator's own records."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake = FakeTensorMode()
    real_unet, fake_unet = build_unet(config), build_unet(config, fake)
    out: dict = {"config": {k: v for k, v in config.items()}, "batch": batch}
    for which in ("none", "all"):
        set_checkpointing(real_unet, which)
        set_checkpointing(fake_unet, which)
        real, faked = count_pass(real_unet, batch), count_pass(fake_unet, batch, fake)
        out[f"checkpointing_{which}"] = {
            "fake_saved_bytes": faked.saved_bytes, "real_saved_bytes": real.saved_bytes,
            "fake_peak_bytes": faked.peak_bytes, "real_peak_bytes": real.peak_bytes,
            "fake_forward_backward_flops": faked.forward_backward_flops,
            "real_forward_backward_flops": real.forward_backward_flops}
    set_checkpointing(real_unet, "none")
    emulated, torch_cpu = count_pass(real_unet, batch, policy="cpu"), count_pass(real_unet, batch, policy="torch-cpu")
    out["cpu_policy"] = {"emulated_saved_bytes": emulated.saved_bytes,
                         "torch_autocast_saved_bytes": torch_cpu.saved_bytes}

    # the CPU allocator's view: what the grad-enabled forward leaves allocated beyond a no-grad forward is what
    # autograd holds for backward; its peak over forward + backward is what the pass needs (kernels' scratch too)
    kwargs, leaves = unet_call(real_unet, batch)
    results = {}

    def forward(grad: bool):
        with EmulatedAutocast("cuda"), torch.set_grad_enabled(grad):
            results[grad] = real_unet(**kwargs).sample

    def forward_backward():
        with EmulatedAutocast("cuda"):
            o = real_unet(**kwargs).sample
        o.float().square().sum().backward(inputs=leaves)

    _, kept_no_grad = allocator_timeline(lambda: forward(False))
    _, kept_grad = allocator_timeline(lambda: forward(True))
    del results[True]
    out["allocator"] = {"kept_after_forward_with_grad_minus_without_bytes": kept_grad - kept_no_grad,
                        "counted_saved_bytes": out["checkpointing_none"]["real_saved_bytes"]}
    for which in ("none", "all"):
        set_checkpointing(real_unet, which)
        gc.collect()
        gc.disable()
        try:
            peak, _ = allocator_timeline(forward_backward)
        finally:
            gc.enable()
        out["allocator"][f"allocator_peak_forward_backward_bytes_checkpointing_{which}"] = peak
        out["allocator"][f"counted_peak_bytes_checkpointing_{which}"] = out[f"checkpointing_{which}"]["real_peak_bytes"]
    set_checkpointing(real_unet, "none")
    return out


def h200_anchor(sd14_inner: dict, sd14_weights: dict, sd14_other: dict, path: Path) -> dict:
    """The SD v1.4 counts against what benchmarks/results/gpu_run_h200.jsonl measured on an H200 with real CUDA
    autocast and SDPA: bytes saved for backward (stage ops, half weights), and max_memory_allocated of whole
    null-text runs in eager (stages nti_b1 / nti_b16, 'bf16 half weights')."""
    if not path.exists():
        return {"missing": str(path)}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    ops = next(r for r in rows if r.get("stage") == "ops" and r.get("half_weights"))
    peaks = {r["batch"]: r["peak_gib"] * GiB for r in rows
             if r.get("stage") in ("nti_b1", "nti_b16") and r.get("variant") == "bf16 half weights"}
    # what that run kept resident: pipe.unet fp32 (the reference's), the bf16 copy's Linear/Conv weights (norms
    # are shared with pipe.unet), text encoder and VAE in fp32
    resident = sd14_weights["fp32_unet_bytes"] + sd14_weights["bf16_linear_conv_bytes"] + sd14_other["fp32_bytes"]
    return {
        "source": f"benchmarks/results/{path.name} (commit 3683908)",
        "measured_saved_bytes_b1": ops["saved_for_backward_gib"] * GiB,
        "counted_saved_bytes_b1": sd14_inner["counts"][0]["saved_bytes"],
        "resident_weight_bytes": resident,
        "peaks": [{"batch": b, "measured_max_memory_allocated_bytes": p,
                   "counted_resident_plus_pass_peak_bytes": resident + sd14_inner["peak_bytes_fixed"]
                   + b * sd14_inner["peak_bytes_per_image"]} for b, p in sorted(peaks.items())]}


# ----------------------------------------------------------------------------------------------------- the plan

# total memory as nvidia-smi reports it for the 80 GB H100 (SXM/HBM3) and the 141 GB H200: vendor figures, not
# measured here
GPUS = {"H100 80GB": 81559 * 2**20, "H200 141GB": 143771 * 2**20}
# what max_memory_allocated does not see: CUDA context and library handles (about 1 GiB) and the caching allocator's
# fragmentation (5% of the card). An allowance, not a measurement.
CONTEXT_BYTES = 1 * GiB
FRAGMENTATION = 0.05
STEPS, INNER = 50, 10  # the protocol (DESIGN.md section 6): 50 DDIM steps, 10 inner iterations, early stop off
FORWARDS_PER_STEP = 5  # fast path per image and step besides the inner loop: inversion, cond, move-on, edit x2
DESIGN_TFLOPS = 240e12  # bf16 fwd+bwd eager at b16/b32, SD v1.4 on an H100 (DESIGN.md section 2)


def largest_batch(budget: float, resident: float, fixed: float, per_image: float) -> int:
    """The most images whose counted memory (resident weights + the pass's fixed + per-image peak) fits budget."""
    return max(0, math.floor((budget - resident - fixed) / per_image))


def usable_bytes(total: int) -> float:
    return total - CONTEXT_BYTES - FRAGMENTATION * total


def plan(rows: list[dict], weights: dict, others: dict) -> list[dict]:
    """Largest batch per GPU, model, weight layout and checkpointing, and the NTI time it implies at DESIGN.md's
    measured utilisation (an estimate)."""
    out = []
    for gpu, total in GPUS.items():
        for row in rows:
            model = row["model"]
            w = weights[model]
            layouts = {"UNet bf16 copy only": w["unet_copy_bytes"],
                       "engine today: + fp32 pipe.unet, text encoders, VAE (fp32)":
                           w["fp32_unet_bytes"] + w["bf16_linear_conv_bytes"] + others[model]["fp32_bytes"]}
            for layout, resident in layouts.items():
                budget = usable_bytes(total)
                b = largest_batch(budget, resident, row["peak_bytes_fixed"], row["peak_bytes_per_image"])
                entry = {"gpu": gpu, "gpu_total_bytes": total, "budget_bytes": budget, "model": model,
                         "resolution_px": row["resolution_px"], "pass": row["pass"],
                         "configuration": row["configuration"], "weights_layout": layout,
                         "resident_weight_bytes": resident, "peak_bytes_fixed": row["peak_bytes_fixed"],
                         "peak_bytes_per_image": row["peak_bytes_per_image"], "largest_batch": b,
                         "counted_bytes_at_largest_batch": resident + row["peak_bytes_fixed"]
                         + b * row["peak_bytes_per_image"]}
                if row["forward_backward_flops_per_image"] is not None:
                    flops = (STEPS * INNER * row["forward_backward_flops_per_image"]
                             + STEPS * FORWARDS_PER_STEP * row["forward_flops_per_image"])
                    entry["nti_flops_per_image"] = flops
                    entry["nti_s_per_image_estimate_at_240_tflops"] = flops / DESIGN_TFLOPS
                else:  # DDIM inversion (1 row per step) + CFG editing (2 rows): 1.5 of this 2-row pass per step
                    flops = STEPS * 1.5 * row["forward_flops_per_image"]
                    entry["ddim_invert_edit_flops_per_image"] = flops
                    entry["ddim_invert_edit_s_per_image_estimate_at_240_tflops"] = flops / DESIGN_TFLOPS
                out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------------- the driver

def settings(model: str, selective: str | None = None) -> list[Setting]:
    rows = [Setting(model, "no checkpointing"),
            Setting(model, "diffusers checkpointing (all flags)", checkpointing="all"),
            Setting(model, "checkpointing: transformers only", checkpointing="transformers"),
            Setting(model, "checkpointing: resnets only", checkpointing="resnets"),
            Setting(model, "no checkpointing, math attention", math_attention=True),
            Setting(model, "forward only, CFG (2 rows per image)", grad=False, batches=(2, 4), rows_per_image=2)]
    if model == "sdxl":
        rows.insert(1, Setting(model, "no checkpointing, grad to tokens only", pooled_grad=False))
    return rows


def main(argv=None) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    import diffusers

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sdxl_memory_cpu.json"))
    p.add_argument("--models", default="sdxl,sd14")
    add_overwrite(p)
    args = p.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:  # refused before the minutes of counting start
        p.error(f"unknown model(s) {', '.join(map(repr, unknown))} in --models; choose from {','.join(MODELS)}")
    refuse_existing(p, [args.out], args.overwrite)
    torch.set_num_threads(1)  # fake tensors compute nothing; one thread keeps the shared machine free
    from nti.provenance import git_commit

    result: dict = {
        "benchmark": "SDXL memory plan for null-text inversion (bytes saved for backward, peaks, FLOPs, largest batch)",
        "provenance": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                       "python": platform.python_version(), "commit": git_commit(),
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "command": "python -m nti.benchmarks.sdxl_memory " + " ".join(argv or sys.argv[1:]),
                       "machine": "CPU only; full-size UNets under FakeTensorMode (no real memory)"},
        "method": {
            "weights": "Linear/Conv weights and biases bf16 (the engine's half-weight copy), norms fp32, frozen, eval",
            "autocast": "CUDA autocast bf16 policy (torch autocast_mode.h op lists) emulated at the torch-function "
                        "level; group_norm/layer_norm run in fp32 as on CUDA",
            "saved": "torch.autograd.graph.saved_tensors_hooks during the forward, each storage once, weights apart",
            "peak": "most bytes of op-output storages alive at once over forward + backward (weak references to "
                    "storages), above weights and inputs; excludes library workspaces and allocator fragmentation",
            "flops": "torch.utils.flop_counter.FlopCounterMode; CPU flash attention counted with torch's SDPA formulas",
            "checkpointing": "diffusers 0.42.1 checkpoints when `torch.is_grad_enabled() and "
                             "self.gradient_checkpointing` (no self.training test): it runs in the engine's eval-mode "
                             "inner loop, which enables grad; non-reentrant torch.utils.checkpoint",
            "attention": "fake CPU tensors dispatch SDPA to _scaled_dot_product_flash_attention_for_cpu, which saves "
                         "q, k, v, out and logsumexp like CUDA's flash/cuDNN/mem-efficient kernels (O(tokens)); the "
                         "math rows force SDPBackend.MATH (attention matrix saved)",
            "budget": f"GPU total - {CONTEXT_BYTES / GiB:.0f} GiB context - {FRAGMENTATION:.0%} fragmentation "
                      "allowance (estimates)",
            "nti_time": f"{STEPS} steps x ({INNER} inner fwd+bwd + {FORWARDS_PER_STEP} forwards) per image at "
                        f"{DESIGN_TFLOPS / 1e12:.0f} TFLOP/s (DESIGN.md section 2, SD v1.4 on an H100): an estimate"},
    }
    start = time.perf_counter()
    result["validation_small_real_unet"] = validate_small()
    print(f"small-model validation done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)

    fake = FakeTensorMode()
    rows, weights, others, rankings = [], {}, {}, {}
    for model in args.models.split(","):
        unet = build_unet(MODELS[model], fake)
        weights[model] = weight_bytes(unet)
        assert weights[model]["parameters"] == PARAMETERS[model], (model, weights[model]["parameters"])
        others[model] = other_components(model, fake)
        model_rows = [measure(unet, fake, s) for s in settings(model)]
        none = next(r for r in model_rows if r["configuration"] == "no checkpointing")
        all_ = next(r for r in model_rows if r["checkpointing"] == "all")
        ranking = toggle_ranking(unet, none, all_)
        # the best bytes-per-recompute flags that together free half of what checkpointing everything frees
        target, freed, chosen = (none["saved_bytes_per_image"] - all_["saved_bytes_per_image"]) / 2, 0, []
        for r in ranking:
            if freed >= target:
                break
            chosen.append(r["module"])
            freed += r["freed_saved_bytes_per_image"]
        best = measure(unet, fake, Setting(model, "checkpointing: best bytes/recompute half",
                                           checkpointing=",".join(chosen)))
        best["checkpointed_modules"] = chosen
        model_rows.append(best)
        for r in model_rows:  # what checkpointing costs: the extra FLOPs of the same pass without it
            if r["forward_backward_flops_per_image"] is not None and r["checkpointing"] != "none":
                r["recompute_flops_per_image"] = (r["forward_backward_flops_per_image"]
                                                  - none["forward_backward_flops_per_image"])
                r["recompute_share_of_forward"] = r["recompute_flops_per_image"] / r["forward_flops_per_image"]
        rankings[model] = ranking
        rows += model_rows
        del unet
    result["weights"] = {m: {**weights[m], "other_components": others[m]} for m in weights}
    result["configurations"] = rows
    result["checkpoint_flag_ranking"] = rankings
    result["plan"] = plan(rows, weights, others)
    if "sd14" in weights:
        sd14_none = next(r for r in rows if r["model"] == "sd14" and r["configuration"] == "no checkpointing")
        result["validation_h200_sd14"] = h200_anchor(sd14_none, weights["sd14"], others["sd14"],
                                                     Path(__file__).parent / "results" / "gpu_run_h200.jsonl")
    result["verification_at_largest_batch"] = verify_plan(result, fake)
    out = write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(summary(result))
    print(f"wrote {out} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


def verify_plan(result: dict, fake_mode) -> list[dict]:
    """Count SDXL's pass again at the largest batch the plan gives on the H100 (lean layout, without and with full
    checkpointing): the per-image slope must hold there."""
    out = []
    for cfg in ("no checkpointing", "diffusers checkpointing (all flags)"):
        entry = next((e for e in result["plan"] if e["model"] == "sdxl" and e["gpu"] == "H100 80GB"
                      and e["configuration"] == cfg and e["weights_layout"] == "UNet bf16 copy only"), None)
        if entry is None or entry["largest_batch"] < 1:
            continue
        unet = build_unet(SDXL_BASE_UNET, fake_mode)
        set_checkpointing(unet, "all" if "all flags" in cfg else "none")
        c = count_pass(unet, entry["largest_batch"], fake_mode)
        out.append({"configuration": cfg, "batch": entry["largest_batch"], "counted_peak_bytes": c.peak_bytes,
                    "predicted_peak_bytes": entry["peak_bytes_fixed"]
                    + entry["largest_batch"] * entry["peak_bytes_per_image"],
                    "counted_saved_bytes": c.saved_bytes})
    return out


def summary(result: dict) -> str:
    lines = ["| model | configuration | saved GiB/image | peak GiB/image | fwd TFLOP/image | fwd+bwd TFLOP/image |",
             "|---|---|---|---|---|---|"]
    for r in result["configurations"]:
        fb = r["forward_backward_flops_per_image"]
        lines.append(f"| {r['model']} | {r['configuration']} | {r['saved_bytes_per_image'] / GiB:.3f} | "
                     f"{r['peak_bytes_per_image'] / GiB:.3f} | {r['forward_flops_per_image'] / 1e12:.3f} | "
                     f"{fb / 1e12:.3f} |" if fb else
                     f"| {r['model']} | {r['configuration']} | {r['saved_bytes_per_image'] / GiB:.3f} | "
                     f"{r['peak_bytes_per_image'] / GiB:.3f} | {r['forward_flops_per_image'] / 1e12:.3f} | - |")
    lines += ["", "| GPU | model | configuration | weights | largest batch | NTI s/image (estimate) |",
              "|---|---|---|---|---|---|"]
    for e in result["plan"]:
        est = e.get("nti_s_per_image_estimate_at_240_tflops")
        lines.append(f"| {e['gpu']} | {e['model']} | {e['configuration']} | {e['weights_layout']} | "
                     f"{e['largest_batch']} | {f'{est:.1f}' if est else '-'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""How the fast path runs the UNet: a prepared copy of the module, exported forward backends, CUDA graphs.

pipe.unet itself is never changed: the reference runs it. Fast runs use a copy made once per pipeline, precision and
memory format (`prepared_unet`) and kept on the pipeline:
- bf16/fp16: the copy's Linear and Conv weights are pre-cast to the autocast dtype. Autocast casts an fp32 weight to
  exactly that tensor on every call (and, for frozen weights, saves the cast copy for backward each time); with
  the weight already in that dtype it casts nothing, so results are autocast's, bit for bit, at a fraction of the
  ops. Norm parameters stay fp32 (autocast runs GroupNorm/LayerNorm in fp32) and are shared with pipe.unet.
- bf16/fp16 with half_norms: every parameter of the copy in that dtype and no autocast (the norms too; inputs are
  cast once at the UNet's entry, its output stays in that dtype as autocast's does).
- fp32: the copy shares every parameter with pipe.unet (no memory), so switches applied to it never touch the
  reference's module.
CUDA graphs: `forward` captures one graph per batch size for forward-only calls; engine/fast.py captures a whole
inner iteration (UNet forward + backward, loss, Adam) per bucket size with `capture_graph`. Graphs replay the
kernels they recorded, so they are kept with the prepared module whose weights they read, never rebuilt per run.
"""
from __future__ import annotations

import contextlib
import copy
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from .conditioning import null_grad_mask, unet_inputs
from .config import NTIConfig

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# dynamo compiles the transformer block's code once per (channels, tokens, batch bucket, grad mode); SD v1.4 has
# 4 block shapes, so 5 buckets x 2 grad modes + the CFG batch already need ~50 graphs, far past the default 8 after
# which dynamo silently runs the block eager.
RECOMPILE_LIMIT = 256
# dynamo backend of --compile; "eager" or "aot_eager" trace with dynamo but skip inductor's codegen (the CPU tests)
COMPILE_BACKEND = os.environ.get("NTI_COMPILE_BACKEND", "inductor")
# inductor's layout optimization (convolutions in channels_last, chosen inside the graph) gave an all-zero gradient
# for the context through an SD up block on torch 2.13 (CPU): ResnetBlock2D's `/ output_scale_factor` (1.0), then
# Upsample2D's interpolate and conv (benchmarks/inductor_layout.py). Off for whole-UNet graphs unless
# NTI_INDUCTOR_LAYOUT_OPT=1, to measure it where it is right (gpu_run's compile rows check the gradient).
INDUCTOR_OPTIONS = {} if os.environ.get("NTI_INDUCTOR_LAYOUT_OPT") == "1" else {"layout_optimization": False}
# check_compiled: relative difference of a compiled UNet call from eager past which compile is turned off; about
# ten times what rounding gives (fp32 ~1e-6; bf16 ~1e-2), far under a dropped path's (0.25 to 1)
COMPILED_TOLERANCE = {"fp32": 1e-3, "half": 0.1}
GRAPH_WARMUP = 2  # eager runs on a side stream before capture: compile, autotune, cuBLAS/cuDNN plans, allocator


@dataclass
class RunStats:
    """What a fast run cost: UNet rows run forward, forward + backward, graph captures and their seconds."""

    forward_rows: int = 0
    backward_rows: int = 0
    captures: int = 0
    capture_s: float = 0.0


@dataclass
class PreparedUNet:
    """A UNet module set up for fast runs, and what was compiled and captured for it (kept across runs)."""

    module: nn.Module
    autocast: torch.dtype | None  # run it under autocast to this dtype (None: no autocast)
    input_dtype: torch.dtype | None = None  # half_norms: cast z and the context to the module's dtype at its entry
    compiled_calls: dict = field(default_factory=dict)  # block or UNet -> its torch.compile wrapper (made once)
    graphs: dict = field(default_factory=dict)  # (kind, batch, switches...) -> captured call
    compile_failed: str | None = None  # why compile was turned off for this module, if it was
    checked: set = field(default_factory=set)  # (compile scope, grad mode) whose first call matched eager

    def set_compiled(self, on: bool, scope: str = "blocks") -> None:
        """torch.compile (fullgraph, static shapes) of each repeated transformer block (scope 'blocks': regional
        compilation) or of the whole UNet as one graph (scope 'unet'); on=False runs it all eager again."""
        blocks = [m for m in self.module.modules()
                  if type(m).__name__ in getattr(self.module, "_repeated_blocks", ())]
        targets = ([self.module] if scope == "unet" else blocks) if on else []
        if targets:
            config = torch._dynamo.config  # the limits' names before torch 2.7: cache_size_limit, accumulated_...
            for name, limit in (("recompile_limit", RECOMPILE_LIMIT), ("accumulated_recompile_limit",
                                                                       4 * RECOMPILE_LIMIT)):
                name = name if hasattr(config, name) else name.replace("recompile_limit", "cache_size_limit")
                setattr(config, name, max(getattr(config, name), limit))
        if scope == "unet" and targets:  # dynamo's multi-line note on Upsample2D's cached is_torch_version check (a
            # pure version test: tracing through its cache changes nothing), once per bf16 run
            warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped "
                                    "function at 'upsampling.py", category=UserWarning)
        for module in targets:  # fullgraph: a graph break or the recompile limit raises instead of going eager
            if module not in self.compiled_calls:
                options = INDUCTOR_OPTIONS if COMPILE_BACKEND == "inductor" and module is self.module else None
                self.compiled_calls[module] = torch.compile(module._call_impl, backend=COMPILE_BACKEND,
                                                            dynamic=False, fullgraph=True, options=options or None)
        for module in [self.module, *blocks]:  # one scope at a time: never a compiled block inside a compiled UNet
            module._compiled_call_impl = self.compiled_calls[module] if module in targets else None


def _copy_unet(unet: nn.Module, dtype: torch.dtype | None, channels_last: bool, everything: bool = False) -> nn.Module:
    """Structural copy of the UNet: Linear/Conv weights and biases (with `everything`, every float parameter and
    buffer) cast to `dtype` (None: kept), Conv weights in channels_last if asked; every other parameter and buffer
    is shared with the original, not copied."""
    memo: dict = {}
    for module in unet.modules():
        cast = dtype is not None and (everything or isinstance(module, (nn.Linear, nn.Conv2d)))
        nhwc = channels_last and isinstance(module, nn.Conv2d)
        for p in module.parameters(recurse=False):
            if id(p) in memo:
                continue
            q = p.detach()
            if cast and q.is_floating_point():
                q = q.to(dtype)
            if nhwc and q.ndim == 4:
                q = q.contiguous(memory_format=torch.channels_last)
            memo[id(p)] = p if q.data_ptr() == p.data_ptr() else nn.Parameter(q, requires_grad=False)
    for b in unet.buffers():  # with `everything`, a float buffer left fp32 would promote what it touches to fp32
        memo.setdefault(id(b), b.to(dtype) if everything and dtype is not None and b.is_floating_point() else b)
    clone = copy.deepcopy(unet, memo)
    for module in clone.modules():  # hooks a caller put on pipe.unet (e.g. to count its calls) stay with it
        for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_backward_hooks",
                     "_backward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
            if isinstance(getattr(module, name, None), dict):
                getattr(module, name).clear()
    return clone


def checkpoint_without_rng(module: nn.Module, *args):
    """diffusers' gradient-checkpointing call without saving and restoring RNG states: the UNet in eval mode draws no
    random numbers (no dropout), and torch before 2.10 cannot read a CUDA RNG state inside a CUDA graph capture."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False, preserve_rng_state=False)


def prepared_unet(pipe, config: NTIConfig) -> PreparedUNet:
    """The pipeline's UNet copy for this config's precision, weight casting, memory format and gradient
    checkpointing (made once)."""
    cuda = pipe.device.type == "cuda"
    if config.channels_last and not cuda:
        warnings.warn("channels_last only helps CUDA convolutions; ignored on this device")
    channels_last = config.channels_last and cuda
    half = AUTOCAST.get(config.precision)
    if config.half_norms and half is None:
        warnings.warn("half_norms only applies to bf16/fp16; the fp32 UNet runs as it is")
    half_norms = config.half_norms and half is not None
    dtype = half if config.half_weights or half_norms else None
    key = (config.precision, dtype, half_norms, channels_last, config.gradient_checkpointing)
    if key not in pipe.fast_unets:
        module = _copy_unet(pipe.unet, dtype, channels_last, everything=half_norms)
        if channels_last:
            module.to(memory_format=torch.channels_last)
        if config.gradient_checkpointing:  # diffusers 0.42 checks grad mode only, not .training: eval mode keeps it
            module.enable_gradient_checkpointing(checkpoint_without_rng)
        pipe.fast_unets[key] = (PreparedUNet(module.eval(), None, input_dtype=half) if half_norms
                                else PreparedUNet(module.eval(), half))
    return pipe.fast_unets[key]


def set_attention(unet: nn.Module, backend: str) -> str:
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


class CompiledMismatch(Exception):
    """A compiled UNet call whose numbers are not eager's (check_compiled)."""


def _compile_errors() -> tuple:
    from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException
    errors = [TorchDynamoException, FailOnRecompileLimitHit]
    with contextlib.suppress(ImportError, AttributeError):
        from torch._inductor.exc import InductorError
        errors.append(InductorError)
    return tuple(errors)


def capture_graph(fn) -> "torch.cuda.CUDAGraph":
    """Record fn() as one CUDA graph after GRAPH_WARMUP eager runs on a side stream (compilation, autotuning and
    library plans happen there, not in the capture). fn must read and write only tensors that outlive the graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(GRAPH_WARMUP):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@dataclass
class _GraphedForward:
    """Static inputs, output and graph of one captured forward-only UNet call."""

    z: torch.Tensor
    t: torch.Tensor
    context: torch.Tensor
    out: torch.Tensor | None = None
    graph: object = None


class UNetRunner:
    """Calls the prepared UNet, eps_theta(z_t, t, context): under autocast for bf16/fp16, through an exported UNet or
    a CUDA graph per batch size for forward-only calls, eager otherwise; counts the rows it runs."""

    def __init__(self, pipe, config: NTIConfig):
        self.pipe, self.config = pipe, config
        self.prepared = prepared_unet(pipe, config)
        self.module = self.prepared.module
        self.attention = set_attention(self.module, config.attention)
        self.stats = pipe.fast_stats  # accumulates over runs; benchmarks reset it
        self.prediction_type = pipe.scheduler_config.get("prediction_type", "epsilon")  # see ddim.eps_from_prediction
        self.grad_mask = null_grad_mask(pipe, config.optimize_pooled)  # what null-text optimization may not change
        cuda = pipe.device.type == "cuda"
        if config.cuda_graphs and not cuda:
            warnings.warn("CUDA graphs need a CUDA device; running without them")
        self.graphs = config.cuda_graphs and cuda
        if self.graphs and os.environ.get("NTI_DISABLE_CUDA_GRAPHS") == "1":
            warnings.warn("CUDA graphs disabled (NTI_DISABLE_CUDA_GRAPHS=1); running eager")
            self.graphs = False
        compile_ = config.compile
        if compile_ and (os.environ.get("NTI_DISABLE_COMPILE") == "1" or not hasattr(torch, "compile")):
            warnings.warn("torch.compile disabled (NTI_DISABLE_COMPILE=1 or torch too old); running eager")
            compile_ = False
        if compile_ and self.prepared.compile_failed:
            warnings.warn(f"torch.compile failed earlier on this model ({self.prepared.compile_failed}); running eager")
            compile_ = False
        self.compiled = compile_
        self.prepared.set_compiled(compile_, config.compile_scope)
        self.forward_fn = None
        if config.forward_backend != "torch":
            from nti.export import load_forward_backend  # built once, cached on disk under a model/shape/precision key

            self.forward_fn = load_forward_backend(pipe, config.forward_backend, config.precision,
                                                   config.export_cache)
        self._timesteps: dict = {}

    def key(self, kind: str, n: int, *extra) -> tuple:
        """Graph cache key: a graph is valid only for the kernels it recorded."""
        return (kind, n, self.attention, self.compiled and self.config.compile_scope, *extra)

    def fp32(self) -> "UNetRunner":
        """The full-precision eager runner, for steps redone after a non-finite half-precision result."""
        return UNetRunner(self.pipe, self.config.replace(precision="fp32", half_norms=False, cuda_graphs=False,
                                                         compile=False, channels_last=False, forward_backend="torch"))

    def timestep(self, t) -> torch.Tensor:
        """t as a 0-d device tensor: a python int makes diffusers build one from host memory (a sync) every call."""
        if isinstance(t, torch.Tensor):
            return t
        if t not in self._timesteps:
            self._timesteps[t] = torch.full((), t, dtype=torch.int64, device=self.pipe.device)
        return self._timesteps[t]

    def eps(self, z: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        """Eager UNet call; records a graph for backward when grad is enabled."""
        t, z, context = self._entry(t, z, context)
        with self._precision():
            try:
                if self.compiled:
                    self.check_compiled(z, t, context)
                return self.module(z, t, **unet_inputs(self.pipe.pooled, context)).sample
            except (_compile_errors() + (CompiledMismatch,)) as err:
                if not self.compiled:
                    raise
                # a graph break, the recompile limit, or numbers unlike eager's: say so, and run eager from here on
                why = str(err) if isinstance(err, CompiledMismatch) else f"{type(err).__name__}: {err}"
                self.prepared.compile_failed = why.splitlines()[0][:300]
                warnings.warn(f"torch.compile failed ({self.prepared.compile_failed}); running the UNet eager")
                self.prepared.set_compiled(False)
                self.compiled = False
                return self.module(z, t, **unet_inputs(self.pipe.pooled, context)).sample

    def _entry(self, t, z: torch.Tensor, context: torch.Tensor) -> tuple:
        """The UNet's inputs as the prepared module takes them: t on the device, half_norms' dtype."""
        if self.prepared.input_dtype is not None:  # half_norms: the module's own dtype, no autocast
            z, context = z.to(self.prepared.input_dtype), context.to(self.prepared.input_dtype)
        return self.timestep(t), z, context

    def _precision(self):
        return (torch.autocast(self.pipe.device.type, dtype=self.prepared.autocast, cache_enabled=False)
                if self.prepared.autocast is not None else contextlib.nullcontext())

    def check_compiled(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
        """The first compiled call of each kind (forward only; forward + backward) against eager on its own inputs:
        the output and, with grad, the gradient w.r.t. the context. Raises CompiledMismatch past COMPILED_TOLERANCE:
        a compiler that drops a gradient path (inductor's layout optimization did on torch 2.13,
        benchmarks/inductor_layout.py) would otherwise fit wrong null embeddings without a word."""
        grad = torch.is_grad_enabled()
        kind = (self.config.compile_scope, grad)
        if kind in self.prepared.checked or (z.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        diff = self._compare(z, t, context)
        if diff is None:  # every row diverged: nothing to compare (the fp32 retry takes it)
            return
        tolerance = COMPILED_TOLERANCE["fp32" if self.config.precision == "fp32" else "half"]
        for what, err in diff.items():
            if not err <= tolerance:  # NaN too
                call = "forward + backward" if grad else "forward"
                raise CompiledMismatch(f"the compiled UNet's {what} differs from eager's by {err:.2g} (relative; "
                                       f"rounding stays under {tolerance:g}) at its first {call} call")
        self.prepared.checked.add(kind)

    def compiled_vs_eager(self, z: torch.Tensor, t, context: torch.Tensor) -> dict | None:
        """Relative difference of the compiled UNet from eager on these inputs: {"output": .., "gradient": ..} (the
        gradient w.r.t. the context, with grad enabled), over the rows where eager's output is finite (None: none
        is). Leaves it compiled."""
        t, z, context = self._entry(t, z, context)
        with self._precision():
            return self._compare(z, t, context)

    def _compare(self, z: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> dict | None:
        grad = torch.is_grad_enabled()
        results = []
        for compiled in (True, False):
            self.prepared.set_compiled(compiled, self.config.compile_scope)
            ctx = context.detach().requires_grad_(grad)
            out = self.module(z, t, **unet_inputs(self.pipe.pooled, ctx)).sample
            results.append((out.detach(), torch.autograd.grad(out.float().square().sum(), ctx)[0] if grad else None))
        self.prepared.set_compiled(True, self.config.compile_scope)
        (out_c, grad_c), (out_e, grad_e) = results
        # rows are independent: a diverged image, which the fast path carries along in its batch, says nothing about
        # the compiler, and skipping the check for it would repeat it (three passes for one) on every later call
        finite = torch.isfinite(out_e).flatten(1).all(1)
        if not finite.any():
            return None

        def rel(mine, eager):
            mine, eager = mine[finite].float(), eager[finite].float()
            return float((mine - eager).norm() / eager.norm().clamp_min(1e-30))
        return {"output": rel(out_c, out_e), **({"gradient": rel(grad_c, grad_e)} if grad else {})}

    @torch.no_grad()
    def forward(self, z: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        """Forward-only UNet call (DDIM inversion, the cond pass, the move-on step, sampling)."""
        self.stats.forward_rows += z.shape[0]
        if self.forward_fn is not None:
            return self.forward_fn(z, t, context)
        if not self.graphs:
            return self.eps(z, t, context)
        key = self.key("forward", z.shape[0], tuple(z.shape[1:]), tuple(context.shape[1:]))
        call = self.prepared.graphs.get(key)
        if call is None:
            start = time.perf_counter()
            call = _GraphedForward(torch.zeros_like(z), torch.zeros((), dtype=torch.int64, device=z.device),
                                   torch.zeros_like(context))

            def run():
                call.out = self.eps(call.z, call.t, call.context)
            call.graph = capture_graph(run)
            self.prepared.graphs[key] = call
            self.stats.captures += 1
            self.stats.capture_s += time.perf_counter() - start
        call.z.copy_(z)
        call.context.copy_(context)
        if isinstance(t, torch.Tensor):
            call.t.copy_(t)
        else:
            call.t.fill_(t)
        call.graph.replay()
        return call.out.clone()  # the next replay overwrites the static output


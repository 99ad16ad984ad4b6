"""One config for the whole engine: the algorithm's settings and the fast path's switches."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

METHODS = ("ddim", "null-text")
GUIDANCE_SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("reference", "fast")
ATTENTION = ("sdpa", "xformers", "plain")
FORWARD_BACKENDS = ("torch", "onnx", "aoti", "tensorrt")


class NTIError(Exception):
    """A user-facing error: bad input or a missing resource; the message says what to do."""


@dataclass
class NTIConfig:
    """Settings of one inversion/edit. Defaults are the official null-text notebook (Mokady et al. 2023)."""

    method: str = "null-text"
    """Inversion method: 'ddim' (DDIM inversion only) or 'null-text' (per-step null embeddings optimized)."""
    steps: int = 50
    """DDIM steps for inversion, optimization and editing."""
    guidance: float = 7.5
    """Classifier-free guidance weight w (at the first denoising step when a schedule decays it)."""
    guidance_schedule: str = "constant"
    """'constant', 'linear' or 'cosine' decay of w from `guidance` at t=T to `guidance_min` at the last step."""
    guidance_min: float = 1.0
    """End point of a decaying guidance schedule (1.0 = conditional prediction only, no extrapolation)."""
    inner_steps: int = 10
    """Adam iterations per DDIM step in null-text optimization (upper bound when early stop is on)."""
    lr: float = 1e-2
    """Adam learning rate at step 0; step i uses lr * (1 - i/100), as the notebook."""
    early_stop: bool = True
    """Stop an image's inner loop once its loss < early_stop_eps + i * 2e-5 (notebook). Off for fixed-cost timing."""
    early_stop_eps: float = 1e-5
    """Base threshold of the early stop."""
    steps_offset: int = 0
    """DDIM timestep offset. The notebook builds DDIMScheduler with the default 0 (t = 980..0), not SD's 1."""
    seed: int = 0
    """Seed for anything random (baseline generation from noise). Inversion itself is deterministic."""

    # --- fast path (issue: batched engine). None of these change the math in fp32; precision does, slightly.
    backend: str = "reference"
    """'reference' = eager fp32 batch-1 loop (the truth); 'fast' = batched engine with the switches below."""
    batch_size: int = 8
    """Images optimized together in the fast path. Memory grows linearly; numerics are batch-independent in fp32."""
    precision: str = "fp32"
    """UNet compute precision in the fast path. bf16/fp16 autocast the UNet only; embeddings, Adam state, latents
    and the DDIM update stay fp32. Risk: fp16 overflow gives non-finite steps (retried in fp32 and recorded)."""
    attention: str = "sdpa"
    """Attention kernel: torch SDPA (default), xformers where it imports, or plain matmul-softmax."""
    compile: bool = False
    """torch.compile the UNet's repeated blocks (regional). First call pays the compile time."""
    cuda_graphs: bool = False
    """Capture fixed-shape UNet calls in CUDA graphs (CUDA only; ignored with a warning elsewhere)."""
    channels_last: bool = False
    """Run the UNet in channels_last memory format (CUDA convolution layout)."""
    fused_step: bool | None = None
    """Use the fused DDIM-step/loss custom ops from kernels/. None = on where Triton runs (CUDA)."""
    forward_backend: str = "torch"
    """UNet for the forward-only passes (DDIM inversion, cached cond pass, move-on step, editing): 'torch', or an
    exported 'onnx' / 'aoti' / 'tensorrt' UNet built once and cached (export/). The optimized uncond pass needs
    gradients and always runs in torch. Risk: fp16 engines differ from torch by more than fp32 rounding."""
    export_cache: str | None = None
    """Folder for exported UNets (default: ~/.cache/nti/export)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Reject settings that would crash deep inside torch or give silently wrong results."""
        def choice(name: str, options: tuple) -> None:
            if getattr(self, name) not in options:
                raise NTIError(f"{name} must be one of {', '.join(options)}; got {getattr(self, name)!r}")

        choice("method", METHODS)
        choice("guidance_schedule", GUIDANCE_SCHEDULES)
        choice("precision", PRECISIONS)
        choice("backend", BACKENDS)
        choice("attention", ATTENTION)
        choice("forward_backend", FORWARD_BACKENDS)
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise NTIError(f"{name} must be a positive integer; got {value!r}")
        if self.steps > 1000:
            raise NTIError(f"steps must be at most 1000 (the model's training timesteps); got {self.steps}")
        if not isinstance(self.inner_steps, int) or self.inner_steps < 0:
            raise NTIError(f"inner_steps must be a non-negative integer; got {self.inner_steps!r}")
        if not self.guidance >= 0:
            raise NTIError(f"guidance must be >= 0; got {self.guidance!r}")
        if not self.lr > 0:
            raise NTIError(f"lr must be > 0; got {self.lr!r}")

    def result_settings(self) -> dict:
        """The settings that change an inversion's result (the cache key and the artifact's record)."""
        keys = ("method", "steps", "guidance", "guidance_schedule", "guidance_min", "inner_steps", "lr",
                "early_stop", "early_stop_eps", "steps_offset", "precision")
        return {k: getattr(self, k) for k in keys}

    def replace(self, **changes) -> "NTIConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

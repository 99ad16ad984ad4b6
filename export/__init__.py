"""Exported UNets for the forward-only passes: ONNX (onnxruntime), AOTInductor and TensorRT, cached on disk.

`load_forward_backend(pipe, kind, precision)` is what `nti.runner.UNetRunner` calls when
`NTIConfig.forward_backend != 'torch'`: it builds the export once (or finds it in the cache) and returns a callable
`(z, t, context) -> eps` that `UNetRunner.forward` uses for every no-grad UNet call. Guards: a call whose shapes
or device the export was not built for runs the eager UNet instead; NTI_DISABLE_EXPORT=1 turns exports off.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nti.config import NTIError
from nti.conditioning import unet_inputs

from . import cache
from .components import COMPONENTS, Component

if TYPE_CHECKING:  # the type only: a runtime import would make nti.models -> runner -> export -> models a circle
    from nti.models import Pipeline

KINDS = ("onnx", "aoti", "tensorrt")
ARTIFACTS = {"onnx": "model.onnx", "aoti": "model.pt2", "tensorrt": "model.plan"}
FORMAT = 1  # bump when a wrapper in components.py changes what an artifact computes: old cache entries go stale
_LOADED: dict = {}  # (kind, artifact path, device) -> runner: an engine session is loaded once per process


@dataclass
class Built:
    """A cache entry: the artifact's path, whether this call built it, and its key fields."""

    path: Path
    built: bool
    kind: str
    precision: str
    component: str
    max_batch: int | None
    seconds: float
    fields: dict


def effective_precision(kind: str, precision: str) -> str:
    """onnxruntime has no dependable bf16 kernels: a bf16 request gets the fp32 export (more precise, not less)."""
    if kind == "onnx" and precision == "bf16":
        warnings.warn("onnxruntime does not run bf16 UNets; the ONNX backend uses its fp32 export (pass "
                      "--precision fp16 for a half-precision ONNX UNet)")
        return "fp32"
    return precision


def check_available(kind: str, device: torch.device) -> None:
    """Raise a clear NTIError when this backend's library or device support is missing; nothing is built."""
    if kind not in KINDS:
        raise NTIError(f"unknown export kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind == "onnx":
        from .onnx_unet import require_onnx_export, require_onnxruntime
        require_onnxruntime()
        require_onnx_export()
    elif kind == "aoti":
        from .aoti_unet import require_aoti
        require_aoti(device)
    else:
        from .onnx_unet import require_onnx_export
        from .trt_unet import require_tensorrt
        require_tensorrt(device)
        require_onnx_export()


def _max_batch(kind: str, max_batch: int | None) -> int | None:
    from .aoti_unet import AOTI_MAX_BATCH
    from .trt_unet import TRT_MAX_BATCH

    if kind == "onnx":
        return None  # fully dynamic axis
    limit = AOTI_MAX_BATCH if kind == "aoti" else TRT_MAX_BATCH
    if max_batch is None:
        return limit
    if max_batch < 1 or (kind == "aoti" and max_batch > AOTI_MAX_BATCH):
        raise NTIError(f"--max-batch for {kind} must be in 1..{AOTI_MAX_BATCH if kind == 'aoti' else 'N'}; "
                       f"got {max_batch}")
    return max_batch


def build_forward_backend(pipe: Pipeline, kind: str, precision: str = "fp32", cache_dir=None,
                          component: str = "unet", max_batch: int | None = None) -> Built:
    """Export `component` of the pipeline as `kind` unless the cache already has it; the artifact's path."""
    check_available(kind, pipe.device)
    precision = effective_precision(kind, precision)
    if precision not in ("fp32", "fp16", "bf16"):
        raise NTIError(f"precision must be fp32, fp16 or bf16; got {precision!r}")
    comp: Component = COMPONENTS[component](pipe)
    max_batch = _max_batch(kind, max_batch)
    module = pipe.unet if component == "unet" else pipe.vae
    fields = {"format": FORMAT, "kind": kind, "precision": precision, "model": pipe.fingerprint,
              "weights_dtype": str(next(module.parameters()).dtype), **comp.signature(),
              "max_batch": max_batch, "versions": cache.library_versions(kind)}
    if kind != "onnx":  # compiled code is specific to the device (GPU architecture); ONNX files are portable
        fields["target"] = cache.device_signature(pipe.device)
    folder = cache.entry_dir(cache_dir, kind, component, fields)

    def build(tmp: Path) -> None:
        try:
            if kind == "onnx":
                from .onnx_unet import export_onnx
                export_onnx(comp, tmp / ARTIFACTS[kind], precision)
            elif kind == "aoti":
                from .aoti_unet import compile_aoti
                compile_aoti(comp, tmp / ARTIFACTS[kind], precision, pipe.device, max_batch)
            else:
                from .onnx_unet import export_onnx
                from .trt_unet import build_engine
                (tmp / "onnx").mkdir()
                onnx_path = export_onnx(comp, tmp / "onnx" / "model.onnx", precision)
                build_engine(onnx_path, tmp / ARTIFACTS[kind], comp, precision, pipe.device, max_batch)
                for f in (tmp / "onnx").iterdir():  # the plan is self-contained; the ONNX is GBs for SD
                    f.unlink()
                (tmp / "onnx").rmdir()
        except NTIError:
            raise
        except Exception as err:  # an op the exporter cannot translate, a compiler failure, ...: say which step
            if isinstance(err, OSError) and err.errno in cache.WRITE_ERRORS:  # a full or read-only disk, not the
                raise  # build: cached_build says so, and what to do
            raise NTIError(f"building the {kind} {component} ({precision}) failed: {type(err).__name__}: "
                           f"{str(err)[:2000]}") from err

    start = time.perf_counter()
    path, built = cache.cached_build(folder, fields, ARTIFACTS[kind], build)
    return Built(path, built, kind, precision, component, max_batch, time.perf_counter() - start, fields)


def load_runner(kind: str, path: Path, component: Component, device: torch.device):
    """A callable over the component's inputs, loaded once per process and artifact."""
    key = (kind, str(path), str(device))
    if key not in _LOADED:
        if kind == "onnx":
            from .onnx_unet import OrtRunner as Runner
        elif kind == "aoti":
            from .aoti_unet import AotiRunner as Runner
        else:
            from .trt_unet import TrtRunner as Runner
        _LOADED[key] = Runner(path, component.detached(), device)
    return _LOADED[key]


def clear_loaded() -> None:
    """Forget the loaded sessions/packages/engines (the next load reads the cache from disk again)."""
    _LOADED.clear()


def device_key(device) -> tuple[str, int]:
    """(type, index) of a device, 'cuda' read as the current CUDA device: an engine session loaded on cuda:0 is not
    fed cuda:1 tensors (the type alone, which was compared, is the same)."""
    device = torch.device(device)
    if device.index is not None:
        return device.type, device.index
    current = device.type == "cuda" and torch.cuda.is_available()
    return device.type, torch.cuda.current_device() if current else 0


class ForwardFn:
    """(z, t, context) -> eps through an exported UNet; eager UNet for anything the export was not built for."""

    def __init__(self, pipe: Pipeline, runner, built: Built):
        self.pipe, self.runner, self.built = pipe, runner, built
        comp = COMPONENTS["unet"](pipe)
        shapes = comp.shapes(1)
        self.latent_shape = shapes["sample"][1:]
        self.text_shape = shapes["encoder_hidden_states"][1:]
        self.max_batch = built.max_batch
        self.fallbacks = 0

    def __repr__(self) -> str:
        return f"ForwardFn({self.built.kind}, {self.built.precision}, {self.built.path})"

    def __call__(self, z: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        per_image_t = isinstance(t, torch.Tensor) and t.numel() != 1  # the graph takes one timestep for the batch
        if (tuple(z.shape[1:]) != self.latent_shape or tuple(context.shape[1:]) != self.text_shape
                or device_key(z.device) != device_key(self.pipe.device) or context.shape[0] != z.shape[0]
                or per_image_t):
            if not self.fallbacks:
                warnings.warn(f"{self.built.kind} UNet was built for latents {self.latent_shape} and text "
                              f"{self.text_shape} on {self.pipe.device}, one timestep per call; running the eager "
                              f"UNet for {tuple(z.shape)} / {tuple(context.shape)} on {z.device}"
                              + (f" with timesteps {tuple(t.shape)}" if per_image_t else ""))
            self.fallbacks += 1
            return self.pipe.unet(z, t, **unet_inputs(self.pipe.pooled, context)).sample
        timestep = torch.full((1,), float(t), dtype=torch.float32, device=z.device)
        n = z.shape[0] if self.max_batch is None else self.max_batch
        if z.shape[0] <= n:
            return self.runner(z, timestep, context)
        return torch.cat([self.runner(z[i:i + n], timestep, context[i:i + n]) for i in range(0, z.shape[0], n)])


def load_forward_backend(pipe: Pipeline, kind: str, precision: str, cache_dir=None) -> ForwardFn | None:
    """The engine's hook: an exported UNet for the forward-only passes, built once and cached on disk.

    Returns None (eager torch) for kind 'torch' or when NTI_DISABLE_EXPORT=1; raises NTIError when the backend's
    library or device support is missing or the export fails.
    """
    if kind == "torch":
        return None
    if os.environ.get("NTI_DISABLE_EXPORT") == "1":
        warnings.warn(f"NTI_DISABLE_EXPORT=1: forward backend {kind!r} off, running the eager UNet")
        return None
    built = build_forward_backend(pipe, kind, precision, cache_dir)
    runner = load_runner(kind, built.path, COMPONENTS["unet"](pipe), pipe.device)
    return ForwardFn(pipe, runner, built)


def load_decoder_backend(pipe: Pipeline, kind: str, precision: str = "fp32", cache_dir=None):
    """Exported VAE decoder: scaled latents (B, 4, h, w) -> images in [0, 1], as nti.models.decode_latents."""
    built = build_forward_backend(pipe, kind, precision, cache_dir, component="vae_decoder")
    runner = load_runner(kind, built.path, COMPONENTS["vae_decoder"](pipe), pipe.device)
    n = built.max_batch

    def decode(latents: torch.Tensor) -> torch.Tensor:
        step = latents.shape[0] if n is None else n
        return torch.cat([runner(latents[i:i + step]) for i in range(0, latents.shape[0], step)])

    decode.built = built
    return decode


__all__ = ["KINDS", "Built", "ForwardFn", "build_forward_backend", "load_forward_backend", "load_decoder_backend",
           "check_available", "clear_loaded", "load_runner"]

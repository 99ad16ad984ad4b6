"""The exported components: plain-tensor wrappers of the UNet and the VAE decoder, with their I/O description.

One class per component (as NVIDIA's TensorRT diffusion demo does): input/output names, which axis is the batch,
example inputs and the TensorRT optimization profile. Graph I/O is always fp32 (timestep included) whatever the
compute precision; the casts live inside the graph, so every runtime feeds the engine's fp32 tensors as they are.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import TYPE_CHECKING

import torch

from nti.conditioning import unet_inputs

if TYPE_CHECKING:  # the type only: a runtime import would make nti.models -> runner -> export -> models a circle
    from nti.models import Pipeline


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class UNetIO(torch.nn.Module):
    """(sample, timestep (1,) fp32, encoder_hidden_states) -> noise prediction, fp32 in and out. For SDXL the third
    input is the engine's packed context (tokens + pooled row) and the time ids are a constant of the graph."""

    def __init__(self, unet: torch.nn.Module, dtype: torch.dtype, pooled=None):
        super().__init__()
        self.unet, self.dtype, self.pooled = unet, dtype, pooled

    def forward(self, sample, timestep, encoder_hidden_states):
        # diffusers turns the timestep into a float sinusoidal embedding, so a float timestep gives the same numbers
        # as the python int the engine passes, and keeps the graph free of int64 inputs (TensorRT-friendly)
        context = encoder_hidden_states.to(self.dtype)
        eps = self.unet(sample.to(self.dtype), timestep, **unet_inputs(self.pooled, context), return_dict=False)[0]
        return eps.float()


class VAEDecoderIO(torch.nn.Module):
    """Scaled latents (B, 4, h, w) -> images in [0, 1], (B, 3, H, W) fp32: `nti.models.decode_latents`."""

    def __init__(self, vae: torch.nn.Module, scaling_factor: float, dtype: torch.dtype):
        super().__init__()
        self.vae, self.scaling_factor, self.dtype = vae, scaling_factor, dtype

    def forward(self, latent):
        image = self.vae.decode((latent / self.scaling_factor).to(self.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)


class Component:
    """What an exporter needs to know about one network: names, shapes, a module to trace."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def __init__(self, pipe: Pipeline):
        self.pipe = pipe
        self.latent_shape = tuple(pipe.latent_shape)
        self.text_shape = tuple(pipe.context_shape)
        self.out_channels = int(pipe.unet.config.out_channels)
        self.resolution = int(pipe.resolution)

    def detached(self) -> "Component":
        """A copy without the pipeline (for long-lived runners: they need the shapes, not the weights)."""
        clone = copy.copy(self)
        clone.pipe = None
        return clone

    def module(self, precision: str, device: torch.device | str = "cpu") -> torch.nn.Module:
        raise NotImplementedError

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        """Input name -> shape at this batch size."""
        raise NotImplementedError

    def output_shape(self, batch: int) -> tuple[int, ...]:
        raise NotImplementedError

    def batched(self) -> tuple[str, ...]:
        """Inputs whose axis 0 is the (dynamic) batch."""
        return tuple(n for n in self.input_names if n != "timestep")

    def sample_inputs(self, batch: int = 2, device="cpu") -> tuple[torch.Tensor, ...]:
        # batch 2, not 1: torch.export specializes sizes 0 and 1, an example of 1 would fix the batch axis
        gen = torch.Generator().manual_seed(0)
        return tuple((torch.full(s, 500.0) if n == "timestep" else torch.randn(s, generator=gen)).to(device)
                     for n, s in self.shapes(batch).items())

    def profile(self, min_batch: int, opt_batch: int, max_batch: int) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT optimization profile: input name -> (min, opt, max) shapes."""
        return {n: (self.shapes(min_batch)[n], self.shapes(opt_batch)[n], self.shapes(max_batch)[n])
                for n in self.input_names}

    def signature(self) -> dict:
        """Everything about the shapes that goes into the cache key."""
        return {"component": self.name, **{n: list(s[1:]) if n in self.batched() else list(s)
                                           for n, s in self.shapes(1).items()}}

    def _copy(self, module: torch.nn.Module, precision: str, device) -> torch.nn.Module:
        """The module in the export dtype and device, without touching the pipeline's own copy when they differ."""
        dtype = DTYPES[precision]
        param = next(module.parameters())
        if param.dtype == dtype and param.device == torch.device(device):
            return module
        # nn.Module.to, not diffusers' override, which warns about fp32-pinned modules that SD v1 does not have
        return torch.nn.Module.to(copy.deepcopy(module), device=device, dtype=dtype)


class UNetComponent(Component):
    name = "unet"
    input_names = ("sample", "timestep", "encoder_hidden_states")
    output_names = ("out_sample",)

    def module(self, precision: str, device="cpu") -> torch.nn.Module:
        pooled = self.pipe.pooled
        if pooled is not None:  # SDXL: the time ids become a constant of the graph, on the export's device
            pooled = dataclasses.replace(pooled, time_ids=pooled.time_ids.to(device))
        return UNetIO(self._copy(self.pipe.unet, precision, device), DTYPES[precision], pooled).eval()

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {"sample": (batch, *self.latent_shape), "timestep": (1,),
                "encoder_hidden_states": (batch, *self.text_shape)}

    def output_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.out_channels, *self.latent_shape[1:])


class VAEDecoderComponent(Component):
    name = "vae_decoder"
    input_names = ("latent",)
    output_names = ("image",)

    def module(self, precision: str, device="cpu") -> torch.nn.Module:
        return VAEDecoderIO(self._copy(self.pipe.vae, precision, device), self.pipe.scaling_factor,
                            DTYPES[precision]).eval()

    def shapes(self, batch: int) -> dict[str, tuple[int, ...]]:
        return {"latent": (batch, *self.latent_shape)}

    def output_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, 3, self.resolution, self.resolution)


COMPONENTS = {"unet": UNetComponent, "vae_decoder": VAEDecoderComponent}


def dynamic_batch(component: Component, max_batch: int | None = None) -> dict:
    """torch.export dynamic_shapes: axis 0 of every batched input is one shared symbol."""
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)
    return {n: ({0: batch} if n in component.batched() else None) for n in component.input_names}


@contextlib.contextmanager
def export_ready(module: torch.nn.Module):
    """Trace the plain eager graph: hide torch.compile'd blocks and non-traceable attention processors (xformers)
    for the duration, then put them back (the pipeline's UNet may be the very module being exported)."""
    compiled = [(m, m._compiled_call_impl) for m in module.modules() if getattr(m, "_compiled_call_impl", None)]
    for m, _ in compiled:
        m._compiled_call_impl = None
    processors = None
    for m in module.modules():
        if hasattr(m, "attn_processors") and hasattr(m, "set_attn_processor"):
            names = {type(p).__name__ for p in m.attn_processors.values()}
            if names - {"AttnProcessor2_0", "AttnProcessor"}:
                from diffusers.models.attention_processor import AttnProcessor2_0
                processors = (m, m.attn_processors)
                m.set_attn_processor(AttnProcessor2_0())
            break
    try:
        yield module
    finally:
        for m, impl in compiled:
            m._compiled_call_impl = impl
        if processors:
            processors[0].set_attn_processor(processors[1])

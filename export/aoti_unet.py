"""AOTInductor: torch.export with a dynamic batch axis, compiled ahead of time into a .pt2 package.

The package holds the compiled kernels (a C++ .so on CPU, a .so + cubins on CUDA) and the weights; loading it in a
fresh process compiles nothing.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch

from nti.config import NTIError

from .components import Component, dynamic_batch, export_ready

# diffusers' Upsample2D branches on `batch >= 64` (a .contiguous() workaround), so torch.export can only prove one
# side of 64; larger calls are split into chunks of this size by the caller
AOTI_MAX_BATCH = 32


def require_aoti(device: torch.device) -> None:
    import torch._inductor

    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        raise NTIError(f"forward backend 'aoti' needs torch >= 2.6 (AOTInductor packages); this is {torch.__version__}")
    if device.type == "cpu":
        compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            raise NTIError("forward backend 'aoti' on CPU compiles C++: install g++ (apt-get install g++) or set CXX")
    elif device.type == "cuda":
        try:
            import triton  # noqa: F401  (inductor's CUDA kernels are Triton kernels)
        except ImportError:
            raise NTIError("forward backend 'aoti' on CUDA needs triton (it ships with the CUDA torch wheels)") \
                from None
    else:
        raise NTIError(f"forward backend 'aoti' supports cpu and cuda devices, not {device.type}")


def compile_aoti(component: Component, path: Path, precision: str, device: torch.device,
                 max_batch: int = AOTI_MAX_BATCH) -> Path:
    """torch.export the component (batch axis 1..max_batch) and AOT-compile it into the package `path`."""
    require_aoti(device)
    module = component.module(precision, device)
    args = component.sample_inputs(2, device)
    # size-oblivious: let the batch range start at 1 (torch.export otherwise specializes 0/1 and demands >= 2);
    # sound here because nothing in the UNet broadcasts along the batch axis
    oblivious = torch.fx.experimental._config.patch(backed_size_oblivious=True)
    with export_ready(module), torch.no_grad(), oblivious, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecation chatter from inside torch.export
        program = torch.export.export(module, args, dynamic_shapes=dynamic_batch(component, max_batch))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


class AotiRunner:
    """A loaded .pt2 package: call it with the component's inputs (fp32 tensors on the package's device)."""

    def __init__(self, path: Path, component: Component, device: torch.device):
        require_aoti(device)
        self.component, self.device = component, device
        try:
            self.model = torch._inductor.aoti_load_package(str(path))
        except Exception as err:  # a package from another torch/GPU (the key should prevent it) or a corrupt file
            raise NTIError(f"cannot load the AOTInductor package {path}: {type(err).__name__}: {err}; delete that "
                           f"cache folder to rebuild it") from err

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        dev = inputs[0].device
        return self.model(*(x.detach().to(dev, torch.float32).contiguous() for x in inputs))

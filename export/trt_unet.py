"""TensorRT: an engine built from the ONNX export with one optimization profile over the batch, and its runner.

Precision lives in the ONNX graph (an fp16/bf16 export casts its fp32 inputs inside) and the network is built
strongly typed where TensorRT has that mode (10.x; the only mode in 11.x, where the FP16/BF16 builder flags are gone).
Older TensorRT gets the weakly typed build with the FP16/BF16 flag instead.
"""
from __future__ import annotations

from pathlib import Path

import torch

from nti.config import NTIError

from .components import Component

TRT_MAX_BATCH = 16  # 8 images x CFG pair while editing; bigger calls are chunked by the caller
TRT_OPT_BATCH = 8


def require_tensorrt(device: torch.device):
    """The tensorrt module, or one NTIError naming everything missing (library, CUDA device)."""
    problems, trt = [], None
    try:
        import tensorrt as trt
    except Exception as err:  # ImportError, or the wheel's libnvinfer failing to load without a driver
        problems.append(f"the tensorrt package is not importable ({type(err).__name__}: {err}); pip install "
                        f"tensorrt on a machine with an NVIDIA GPU")
    if device.type != "cuda":
        problems.append(f"TensorRT runs on NVIDIA GPUs only and the pipeline is on {device}; use --device cuda, "
                        f"or --forward-backend onnx / aoti")
    if trt is not None and not hasattr(trt.IExecutionContext, "execute_async_v3"):
        problems.append(f"TensorRT {trt.__version__} is too old; 8.6 or newer is needed (execute_async_v3)")
    if problems:
        raise NTIError("forward backend 'tensorrt': " + "; ".join(problems))
    return trt


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32}
    if hasattr(trt, "bfloat16"):
        table[trt.bfloat16] = torch.bfloat16
    return table[dtype]


def build_engine(onnx_path: Path, plan_path: Path, component: Component, precision: str, device: torch.device,
                 max_batch: int = TRT_MAX_BATCH, opt_batch: int = TRT_OPT_BATCH) -> Path:
    """Serialize a TensorRT engine for batch 1..max_batch (tuned for opt_batch) from an ONNX file."""
    trt = require_tensorrt(device)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    creation = trt.NetworkDefinitionCreationFlag
    strongly_typed = hasattr(creation, "STRONGLY_TYPED")
    flags = 1 << int(creation.STRONGLY_TYPED) if strongly_typed else 1 << int(creation.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # by path: external weight files are found next to it
        errors = "; ".join(str(parser.get_error(i)) for i in range(min(parser.num_errors, 3)))
        raise NTIError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    if not strongly_typed and precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    opt_batch = min(opt_batch, max_batch)
    for name, (lo, opt, hi) in component.profile(1, opt_batch, max_batch).items():
        if name in component.batched():  # static inputs (the timestep) need no profile
            profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    with torch.cuda.device(device):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise NTIError("TensorRT could not build the engine (see its log above); try --precision fp32 or a smaller "
                       "--max-batch")
    plan_path.write_bytes(bytes(plan))
    return plan_path


class TrtRunner:
    """A deserialized engine and one execution context, run on torch's current CUDA stream over torch memory."""

    def __init__(self, path: Path, component: Component, device: torch.device):
        trt = require_tensorrt(device)
        self.component, self.device = component, device
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # must outlive the engine
        with torch.cuda.device(device):
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise NTIError(f"TensorRT cannot load {path} (built by another TensorRT or for another GPU?); "
                               f"delete that cache folder to rebuild it")
            self.context = self.engine.create_execution_context()
        self.output = component.output_names[0]
        self.out_dtype = _torch_dtype(trt, self.engine.get_tensor_dtype(self.output))

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        dev = inputs[0].device
        inputs = [x.detach().to(dev, torch.float32).contiguous() for x in inputs]
        for name, x in zip(self.component.input_names, inputs):
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), dtype=self.out_dtype, device=dev)
        self.context.set_tensor_address(self.output, out.data_ptr())
        # same stream as torch: no sync needed, and the caching allocator will not hand the inputs' memory to
        # anything that could run before this engine has read them
        if not self.context.execute_async_v3(torch.cuda.current_stream(dev).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
        return out

"""ONNX export (torch.export-based exporter, the default since torch 2.9) and an onnxruntime runner."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from nti.config import NTIError

from .components import Component, dynamic_batch, export_ready

OPSET = 18  # not the exporter's newer default: opset 18 is what TensorRT 8.6+/10 parsers and every ORT accept
log = logging.getLogger("nti")


def require_onnx_export() -> None:
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise NTIError(f"ONNX export needs {' and '.join(missing)}: pip install onnx onnxscript "
                       f"(or pip install nti-engine[export])")


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise NTIError("forward backend 'onnx' needs onnxruntime: pip install onnxruntime (CPU) or "
                       "onnxruntime-gpu (CUDA)") from None
    return onnxruntime


def export_onnx(component: Component, path: Path, precision: str) -> Path:
    """Export one component to `path` (weights in `path`.data) with a dynamic batch axis; checked with onnx.checker."""
    require_onnx_export()
    import onnx

    module = component.module(precision, "cpu")  # tracing only: the CPU is enough, even for fp16
    args = component.sample_inputs(2)
    with export_ready(module), _quiet():
        torch.onnx.export(module, args, str(path), dynamo=True, input_names=list(component.input_names),
                          output_names=list(component.output_names), dynamic_shapes=dynamic_batch(component),
                          opset_version=OPSET, external_data=True, optimize=True, verbose=False)
    onnx.checker.check_model(str(path), full_check=True)  # by path: works past the 2 GiB protobuf limit
    return path


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines, registry notices (no torchvision) and deprecation chatter would bury the one
    line `nti export` prints; its errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class OrtRunner:
    """An onnxruntime session over torch tensors: CUDA EP with I/O bound to torch memory, else the CPU EP."""

    def __init__(self, path: Path, component: Component, device: torch.device):
        ort = require_onnxruntime()
        self.component, self.device = component, device
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.log_severity_level = 3
        available = ort.get_available_providers()
        if device.type == "cuda" and "CUDAExecutionProvider" in available:
            index = device.index if device.index is not None else torch.cuda.current_device()
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        else:
            if device.type == "cuda":
                warnings.warn("onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu); the ONNX "
                              "UNet runs on the CPU, with host copies every call")
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as err:  # corrupt cache entry, an op this ORT build lacks (fp16 on some CPUs), ...
            raise NTIError(f"onnxruntime cannot load {path}: {type(err).__name__}: {err}; delete that cache folder "
                           f"or use another forward backend") from err
        self.cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.provider = self.session.get_providers()[0]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        names = self.component.input_names
        if self.cuda:
            return self._run_cuda(names, inputs)
        feeds = {n: x.detach().to("cpu", torch.float32).contiguous().numpy() for n, x in zip(names, inputs)}
        out = self.session.run(None, feeds)[0]
        return torch.from_numpy(out).to(inputs[0].device)

    def _run_cuda(self, names, inputs) -> torch.Tensor:
        import numpy as np

        dev = inputs[0].device
        inputs = [x.detach().to(dev, torch.float32).contiguous() for x in inputs]
        out = torch.empty(self.component.output_shape(inputs[0].shape[0]), dtype=torch.float32, device=dev)
        binding = self.session.io_binding()
        for name, x in zip(names, inputs):
            binding.bind_input(name=name, device_type="cuda", device_id=dev.index or 0, element_type=np.float32,
                               shape=tuple(x.shape), buffer_ptr=x.data_ptr())
        binding.bind_output(name=self.component.output_names[0], device_type="cuda", device_id=dev.index or 0,
                            element_type=np.float32, shape=tuple(out.shape), buffer_ptr=out.data_ptr())
        # ORT runs on its own stream: the inputs must be written before it reads them; run() returns after its
        # stream finished, so the output is ready for torch's stream
        torch.cuda.current_stream(dev).synchronize()
        self.session.run_with_iobinding(binding)
        return out

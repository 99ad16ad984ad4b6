"""`nti export`: build (or find in the cache) an exported UNet / VAE decoder; engine/cli.py prints its path."""
from __future__ import annotations

from .config import PRECISIONS
from .options import positive_int


def add_export_arguments(p) -> None:
    """`nti export --kind onnx|aoti|tensorrt`. Only model, device and precision matter here, so the algorithm flags
    are not added; --out is the folder that --export-cache names for invert/edit."""
    p.add_argument("--kind", choices=("onnx", "aoti", "tensorrt"), required=True)
    p.add_argument("--model", default=None, help="local diffusers SD v1.x folder or cached repo id (default: the "
                   "built-in shapes model; 'tiny' for the random one)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="compute precision of the export (ONNX "
                   "has fp32/fp16; bf16 falls back to fp32 there)")
    p.add_argument("--out", "--export-cache", dest="out", default=None,
                   help="cache folder (default ~/.cache/nti/export or $NTI_EXPORT_CACHE)")
    p.add_argument("--component", choices=("unet", "vae_decoder"), default="unet")
    p.add_argument("--max-batch", type=positive_int, default=None, help="largest batch of one engine call (aoti: "
                   "<= 32, default 32; tensorrt: default 16; onnx has dynamic batches: not used); bigger calls are "
                   "split")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default); aoti and tensorrt build "
                   "for this device")
    p.add_argument("--quiet", action="store_true", help="print only the path")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def run_export(args):
    """Build or find the export that args name; returns export's BuiltBackend record (path, built, seconds)."""
    from nti.export import build_forward_backend

    from .config import NTIError
    from .models import load_pipeline, parse_device

    if args.out is not None and not args.out.strip():  # Path("") is the current folder, not the default cache
        raise NTIError("--out is empty: give the export cache folder, or leave it out for the default")
    if args.max_batch is not None and args.kind == "onnx":
        raise NTIError("--max-batch applies to aoti and tensorrt; an ONNX export takes any batch size")
    pipe = load_pipeline(args.model, parse_device(args.device))
    return build_forward_backend(pipe, args.kind, args.precision, args.out, component=args.component,
                                 max_batch=args.max_batch)

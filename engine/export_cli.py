"""`nti export`: build (or find in the cache) an exported UNet / VAE decoder and print its path."""
from __future__ import annotations

import sys

from .config import PRECISIONS


def add_export_parser(sub, add_common) -> None:
    """`nti export --kind onnx|aoti|tensorrt`. Only model/device/precision matter here, so `add_common`'s algorithm
    flags are not added; --out is the folder that --export-cache names for invert/edit."""
    p = sub.add_parser("export", help="export the UNet for --forward-backend (built once, cached) and print its path",
                       description="Build an ONNX / AOTInductor / TensorRT UNet into the export cache that "
                                   "`--forward-backend KIND --export-cache DIR` reads. An up-to-date entry is reused.")
    p.add_argument("--kind", choices=("onnx", "aoti", "tensorrt"), required=True)
    p.add_argument("--model", default=None, help="local diffusers SD v1.x folder or cached repo id (default: the "
                   "built-in shapes model; 'tiny' for the random one)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="compute precision of the export (ONNX "
                   "has fp32/fp16; bf16 falls back to fp32 there)")
    p.add_argument("--out", "--export-cache", dest="out", default=None,
                   help="cache folder (default ~/.cache/nti/export or $NTI_EXPORT_CACHE)")
    p.add_argument("--component", choices=("unet", "vae_decoder"), default="unet")
    p.add_argument("--max-batch", type=int, default=None, help="largest batch of one engine call (aoti: <= 32, "
                   "default 32; tensorrt: default 16); bigger calls are split")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default); aoti and tensorrt build "
                   "for this device")
    p.add_argument("--quiet", action="store_true", help="print only the path")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.set_defaults(cache=None)  # main()'s interrupt message reads args.cache


def run_export(args) -> int:
    from export import build_forward_backend

    from .models import load_pipeline, parse_device

    pipe = load_pipeline(args.model, parse_device(args.device))
    built = build_forward_backend(pipe, args.kind, args.precision, args.out, component=args.component,
                                  max_batch=args.max_batch)
    if not args.quiet:
        what = "built" if built.built else "found in cache"
        print(f"{what}: {built.kind} {built.component} ({built.precision}) for {pipe.name} on {pipe.device} "
              f"in {built.seconds:.1f} s", file=sys.stderr)
    print(built.path)
    return 0


def main(argv=None) -> int:  # `python -m engine.export_cli ...` until `nti export` is wired into engine/cli.py
    from .cli import ArgumentParser, add_common
    from .config import NTIError

    parser = ArgumentParser(prog="nti")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    add_export_parser(sub, add_common)
    args = parser.parse_args(argv)
    try:
        return run_export(args)
    except NTIError as err:
        print(f"nti: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

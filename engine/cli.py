"""`nti` command line: invert, edit, reconstruct. Exit codes: 0 ok, 2 bad input, 1 internal error, 130 interrupted."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import (ATTENTION, DIRECT_TARGET_OFFSETS, EDIT_MODES, FORWARD_BACKENDS, GUIDANCE_SCHEDULES, METHODS,
                     PRECISIONS, NTIConfig, NTIError)
from .validate import explicit_options

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one readable line and exit 2, like every other bad input
        self.print_usage(sys.stderr)
        print(f"nti: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


positive_int, non_negative_int = _int_at_least(1), _int_at_least(0)


def word_factor(text: str) -> tuple[str, float]:
    """--reweight WORD=FACTOR"""
    word, sep, factor = text.partition("=")
    try:
        if not sep or not word.strip():
            raise ValueError
        return word.strip(), float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WORD=FACTOR (e.g. tiger=2), got {text!r}") from None


def add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and algorithm")
    g.add_argument("--model", default=None, help="local diffusers SD v1.x folder or cached repo id; default: the "
                   "built-in 'shapes' model (32 px scenes of coloured shapes, trained); 'tiny': random weights")
    g.add_argument("--method", choices=METHODS, default="null-text")
    g.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default 50)")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance weight (default 7.5)")
    g.add_argument("--guidance-schedule", choices=GUIDANCE_SCHEDULES, default="constant")
    g.add_argument("--steps-offset", type=non_negative_int, default=None,
                   help="DDIM timestep offset (default: the model's scheduler config; SD v1.4: 1, t = 981..1)")
    g.add_argument("--inner-steps", type=non_negative_int, default=10, help="Adam iterations per step (default 10)")
    g.add_argument("--no-early-stop", action="store_true", help="always run every inner iteration")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    e = p.add_argument_group("editing (prompt-to-prompt)")
    e.add_argument("--edit", choices=EDIT_MODES, default="regenerate",
                   help="regenerate = target prompt alone (default); p2p-* = prompt-to-prompt attention control")
    e.add_argument("--cross-replace", type=float, default=0.8, help="fraction of steps whose cross-attention the "
                   "target takes from the source (default 0.8)")
    e.add_argument("--self-replace", type=float, default=0.5, help="fraction of steps whose self-attention the "
                   "target takes from the source (default 0.5, NTI notebook; P2P used 0.4)")
    e.add_argument("--reweight", type=word_factor, action="append", default=[], metavar="WORD=FACTOR",
                   help="scale the target's cross-attention to WORD (repeatable), e.g. --reweight tiger=2")
    e.add_argument("--blend-word", action="append", default=[], metavar="WORD",
                   help="confine the edit to WORD's attention mask in source and target (repeatable)")
    e.add_argument("--direct-target-offset", choices=DIRECT_TARGET_OFFSETS, default="none",
                   help="direct inversion: 'source' also adds the source branch's offset to the target")
    f = p.add_argument_group("speed (fast backend)")
    f.add_argument("--backend", choices=("reference", "fast"), default=None,
                   help="reference = eager fp32 batch 1 (default on CPU); fast = batched engine (default on CUDA)")
    f.add_argument("--batch-size", type=positive_int, default=8)
    f.add_argument("--precision", choices=PRECISIONS, default=None, help="UNet precision (fast backend; default "
                   "bf16 on CUDA, fp32 elsewhere)")
    f.add_argument("--attention", choices=ATTENTION, default="sdpa")
    f.add_argument("--no-half-weights", action="store_true", help="bf16/fp16: autocast over the fp32 weights "
                   "instead of a UNet copy with pre-cast weights (same numbers, more ops and memory)")
    f.add_argument("--compile", action="store_true", help="torch.compile the UNet's repeated blocks")
    f.add_argument("--cuda-graphs", action="store_true", help="capture each UNet call and each inner iteration as "
                   "a CUDA graph (CUDA only)")
    f.add_argument("--channels-last", action="store_true")
    f.add_argument("--forward-backend", choices=FORWARD_BACKENDS, default="torch",
                   help="exported UNet for forward-only passes (fast backend; built once, cached)")
    f.add_argument("--export-cache", default=None, help="folder for exported UNets (default ~/.cache/nti/export)")
    p.add_argument("--cache", default=None, help="folder of saved inversions: reuse a matching one, save new ones "
                   "(an interrupted batch resumes from here)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def add_inputs(p: argparse.ArgumentParser, target: bool) -> None:
    p.add_argument("images", nargs="*", help="image files, folders of images, a JSONL of {image, source_prompt"
                   + (", target_prompt" if target else "") + "} records, or skimage:NAME (e.g. skimage:chelsea)")
    p.add_argument("--prompt", help="source prompt describing the image(s)")
    if target:
        p.add_argument("--target", help="target prompt of the edit")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first bad input (default: finish the "
                   "good ones, list every bad one at the end, exit 2)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="nti", description="Null-text inversion and text-guided editing of real images.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    p = sub.add_parser("invert", help="invert image(s) and save the inversion(s) for later edits")
    add_inputs(p, target=False)
    p.add_argument("--out", required=True, help="output .safetensors file (one image) or folder")
    add_common(p)
    p = sub.add_parser("edit", help="invert image(s) (or load --inversion) and regenerate under --target")
    add_inputs(p, target=True)
    p.add_argument("--inversion", nargs="*", default=[], help="saved inversion file(s) to edit instead of images")
    p.add_argument("--out", required=True, help="output .png (one image) or folder")
    add_common(p)
    p = sub.add_parser("reconstruct", help="invert image(s) and regenerate them under their own prompt")
    add_inputs(p, target=False)
    p.add_argument("--out", required=True, help="output .png (one image) or folder")
    add_common(p)
    from .evaluate import add_eval_parser  # `nti eval`: the evaluation harness (engine/evaluate.py)
    add_eval_parser(sub, add_common)
    from .export_cli import add_export_parser  # `nti export`: ONNX / AOTInductor / TensorRT UNets (export/)
    add_export_parser(sub, add_common)
    return parser


def config_from_args(args, device) -> NTIConfig:
    cuda = device.type == "cuda"
    backend = args.backend or ("fast" if cuda else "reference")
    precision = args.precision or ("bf16" if cuda and backend == "fast" else "fp32")
    return NTIConfig(method=args.method, steps=args.steps, guidance=args.guidance,
                     guidance_schedule=args.guidance_schedule, inner_steps=args.inner_steps,
                     steps_offset=args.steps_offset,
                     early_stop=not args.no_early_stop, seed=args.seed, backend=backend, batch_size=args.batch_size,
                     precision=precision, half_weights=not args.no_half_weights, attention=args.attention,
                     compile=args.compile,
                     cuda_graphs=args.cuda_graphs, channels_last=args.channels_last,
                     forward_backend=args.forward_backend, export_cache=args.export_cache,
                     edit=getattr(args, "edit", "regenerate"), cross_replace=getattr(args, "cross_replace", 0.8),
                     self_replace=getattr(args, "self_replace", 0.5), reweight=tuple(getattr(args, "reweight", ())),
                     blend_words=tuple(getattr(args, "blend_word", ())),
                     direct_target_offset=getattr(args, "direct_target_offset", "none"))


def run(args) -> int:
    if args.command == "eval":
        from .evaluate import run_eval
        return run_eval(args)
    if args.command == "export":
        from .export_cli import run_export
        return run_export(args)
    from .batch import run_jobs
    from .models import parse_device

    device = parse_device(args.device)
    return run_jobs(args, config_from_args(args, device), device)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # a Ctrl-C while the libraries import is an interruption too, not a traceback
        args = build_parser().parse_args(argv)
        args.explicit = explicit_options(build_parser, argv)  # flags typed, not defaulted (--inversion conflicts)
    except KeyboardInterrupt:
        print("nti: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    logging.basicConfig(level=logging.WARNING, format="nti: %(message)s")
    if not args.debug:  # library chatter (diffusers/transformers loading notices) would bury our one line
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        if args.quiet:
            from .models import quiet_loading
            quiet_loading()
        return run(args)
    except NTIError as err:
        print(f"nti: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("nti: interrupted" + (" (finished inversions are in --cache)" if args.cache else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug, not bad input: one line, the traceback only with --debug
        if args.debug:
            raise
        print(f"nti: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

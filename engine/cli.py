"""`nti` command line: invert, edit, reconstruct, eval, export. Exit codes: 0 ok, 2 bad input, 1 internal error,
130 interrupted. The only module that prints; flags come from NTIConfig (engine/options.py)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .version import __version__
from .config import NTIError
from .data import PromptRecord, read_prompts_jsonl
from .options import (EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, ArgumentParser,  # noqa: F401
                      add_common, config_from_args)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
log = logging.getLogger("nti")


def add_inputs(p: argparse.ArgumentParser, target: bool) -> None:
    p.add_argument("images", nargs="*", help="image files, folders of images, a JSONL of {image, source_prompt"
                   + (", target_prompt" if target else "") + "} records, or skimage:NAME (e.g. skimage:chelsea)")
    p.add_argument("--prompt", help="source prompt describing the image(s)")
    if target:
        p.add_argument("--target", help="target prompt of the edit")


def build_parser() -> argparse.ArgumentParser:
    from .evaluate import add_eval_arguments
    from .export_cli import add_export_arguments

    parser = ArgumentParser(prog="nti", description="Null-text inversion and text-guided editing of real images.")
    parser.add_argument("--version", action="version", version=f"nti-engine {__version__}")
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
    from .distributed import add_ray_options  # --ray [ADDRESS], --num-workers: engine/distributed.py (no Ray import)
    for name in ("invert", "edit", "reconstruct"):
        add_ray_options(sub.choices[name])
    p = sub.add_parser("eval", help="evaluate methods x guidance settings on a data set: CSVs, plots, report.md")
    add_eval_arguments(p)  # engine/evaluate.py
    add_common(p)
    p = sub.add_parser("export", help="export the UNet for --forward-backend (built once, cached) and print its path",
                       description="Build an ONNX / AOTInductor / TensorRT UNet into the export cache that "
                                   "`--forward-backend KIND --export-cache DIR` reads. An up-to-date entry is reused.")
    add_export_arguments(p)  # engine/export_cli.py
    from .serve_cli import add_serve_parser  # `nti serve`: the HTTP backend (engine/serve.py, the serve extra)
    add_serve_parser(sub)
    return parser


def collect_jobs(args, need_target: bool) -> list[PromptRecord]:
    """Expand positional inputs (files, folders, JSONL, skimage:NAME) into records with both prompts filled in."""
    jobs: list[PromptRecord] = []
    for item in args.images:
        path = Path(item)
        if item.endswith(".jsonl"):
            jobs += read_prompts_jsonl(path)  # the same reader as `nti eval --data FILE.jsonl`
        elif path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise NTIError(f"folder {path} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            jobs += [PromptRecord(f.stem, str(f), None, None) for f in files]
        else:
            jobs.append(PromptRecord(path.stem if ":" not in item else item.split(":", 1)[1], item, None, None))
    for job in jobs:
        job.source_prompt = job.source_prompt or args.prompt
        if need_target:
            job.target_prompt = job.target_prompt or args.target
        if job.source_prompt is None:
            raise NTIError(f"no source prompt for {job.image}: pass --prompt or give one in the JSONL")
        if need_target and job.target_prompt is None:
            raise NTIError(f"no target prompt for {job.image}: pass --target or give one in the JSONL")
        # a missing file is reported before the model loads, not after
        if not job.image.startswith("skimage:") and not Path(job.image).expanduser().exists():
            raise NTIError(f"image {job.image} does not exist")
    names = [job.id for job in jobs]
    for k, job in enumerate(jobs):  # distinct output names when two inputs share a stem
        if names.count(job.id) > 1:
            job.id = f"{job.id}-{k}"
    return jobs


def output_paths(out: str, names: list[str], suffix: str) -> list[Path]:
    out_path = Path(out)
    if len(names) == 1 and out_path.suffix:
        if out_path.suffix != suffix:
            raise NTIError(f"--out {out}: expected a {suffix} file or a folder")
        return [out_path]
    if out_path.suffix and not out_path.is_dir():
        raise NTIError(f"--out {out}: several inputs need a folder, not a {out_path.suffix} file")
    return [out_path / f"{name}{suffix}" for name in names]


def run(args) -> int:
    if args.command == "eval":
        from .evaluate import run_eval
        print(run_eval(args))  # the summary table; the files are named on stderr
        return EXIT_OK
    if args.command == "export":
        from .export_cli import run_export
        built = run_export(args)
        if not args.quiet:
            what = "built" if built.built else "found in cache"
            log.info("%s: %s %s (%s) in %.1f s", what, built.kind, built.component, built.precision, built.seconds)
        print(built.path)
        return EXIT_OK
    if args.command == "serve":
        from .serve_cli import run_serve
        return run_serve(args)
    if getattr(args, "ray", None) is not None:  # the same jobs on a Ray cluster (engine/distributed.py)
        from .distributed import run_ray
        return run_ray(args)
    from . import api
    from .artifact import load_inversion, save_inversion
    from .images import save_png
    from .models import load_pipeline, parse_device

    progress = not args.quiet
    device = parse_device(args.device)
    config = config_from_args(args, device)
    inversion_paths = getattr(args, "inversion", [])
    loaded = [load_inversion(p) for p in inversion_paths]
    need_target = args.command == "edit"
    jobs = collect_jobs(args, need_target)
    if not jobs and not loaded:
        raise NTIError("no inputs: give image paths (or skimage:chelsea), a folder, a JSONL, or --inversion FILE")
    if loaded and need_target and not args.target:
        raise NTIError("--inversion needs --target PROMPT")
    pipe = load_pipeline(args.model, device, seed=0)
    # every prompt checked before any inversion runs: a word the shapes model never saw fails in a second, not after
    api.check_vocabulary(pipe, [p for job in jobs for p in (job.source_prompt, job.target_prompt) if p]
                         + ([args.target] if loaded and need_target else []))
    start = time.perf_counter()

    inversions = []
    if jobs:  # saved inversions in --cache are reused, new ones saved batch by batch: an interrupted run resumes
        inversions = api.invert_cached(pipe, [job.image for job in jobs], [job.source_prompt for job in jobs],
                                       config, args.cache, progress)

    if args.command == "invert":
        for inv, path in zip(inversions, output_paths(args.out, [job.id for job in jobs], ".safetensors")):
            save_inversion(inv, path)
            print(path)
    else:
        names = [job.id for job in jobs] + [Path(p).stem for p in inversion_paths]
        inversions = inversions + loaded
        targets = ([job.target_prompt for job in jobs] + [args.target] * len(loaded) if need_target
                   else [inv.source_prompt for inv in inversions])
        paths = output_paths(args.out, names, ".png")
        chunk = config.batch_size if config.backend == "fast" else 1
        for k in range(0, len(inversions), chunk):
            images = api.edit(pipe, inversions[k:k + chunk], targets[k:k + chunk], config, progress)
            for img, path in zip(images, paths[k:k + chunk]):
                save_png(img, path)
                print(path)
    log.info("done in %.1f s on %s (%s backend, %s)", time.perf_counter() - start, device, config.backend,
             config.method)
    return EXIT_OK


def setup_logging(quiet: bool) -> None:
    """The engine's messages ('nti' logger) on stderr as 'nti: ...': progress notes unless --quiet, warnings always."""
    logger = logging.getLogger("nti")
    if not any(getattr(h, "nti_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("nti: %(message)s"))
        handler.nti_cli = True
        logger.addHandler(handler)
        logger.propagate = False
    for h in logger.handlers:
        if getattr(h, "nti_cli", False):
            h.stream = sys.stderr  # the current stderr (pytest swaps it per test)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.quiet)
    if not args.debug:  # library chatter (diffusers/transformers loading notices) would bury our one line
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        return run(args)
    except NTIError as err:
        print(f"nti: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("nti: interrupted" + (" (finished inversions are in --cache)" if getattr(args, "cache", None) else ""),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug, not bad input: one line, the traceback only with --debug
        if args.debug:
            raise
        print(f"nti: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())

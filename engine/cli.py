"""`nti` command line: invert, edit, reconstruct, eval, export. Exit codes: 0 ok, 2 bad input, 1 internal error,
130 interrupted. The only module that prints; flags come from NTIConfig (engine/options.py)."""
from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__" or os.path.basename(sys.argv[0]) == "nti":  # the program itself, not a library import:
    # a Ctrl-C while the modules below import is an interruption too (exit 130, one line), not a traceback;
    # main() hands SIGINT back to Python's KeyboardInterrupt once it runs
    signal.signal(signal.SIGINT, lambda *_: (print("nti: interrupted", file=sys.stderr), os._exit(130)))

import argparse  # noqa: E402
import codecs  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402

from .version import __version__
from .config import NTIError
from .options import (EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, ArgumentParser,  # noqa: F401
                      add_common, config_from_args)
from .validate import explicit_options

log = logging.getLogger("nti")


def add_inputs(p: argparse.ArgumentParser, target: bool) -> None:
    p.add_argument("images", nargs="*", help="image files, folders of images, a JSONL of {image, source_prompt"
                   + (", target_prompt" if target else "") + "} records, or skimage:NAME (e.g. skimage:chelsea)")
    p.add_argument("--prompt", help="source prompt describing the image(s)")
    if target:
        p.add_argument("--target", help="target prompt of the edit")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first bad input (default: finish the "
                   "good ones, list every bad one at the end, exit 2)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="keep each output in --out that an earlier run of the same request finished (same input "
                   "file, prompts, model, settings, device type and nti version) and make only the rest: an "
                   "interrupted batch goes on where it stopped (default); --no-resume makes every output again")


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
    add_ray_options(p)  # the model's work on Ray engine actors, the scores here
    p = sub.add_parser("export", help="export the UNet for --forward-backend (built once, cached) and print its path",
                       description="Build an ONNX / AOTInductor / TensorRT UNet into the export cache that "
                                   "`--forward-backend KIND --export-cache DIR` reads. An up-to-date entry is reused.")
    add_export_arguments(p)  # engine/export_cli.py
    from .serve_cli import add_serve_parser  # `nti serve`: the HTTP backend (engine/serve.py, the serve extra)
    add_serve_parser(sub)
    return parser


def run(args) -> int:
    if args.command == "eval":
        from .distributed import GaveUp
        from .evaluate import run_eval
        try:
            print(run_eval(args))  # the summary table; the files are named on stderr
        except GaveUp as err:  # --ray: batches that killed their workers; the other rows are written
            print(f"nti: error: {err}", file=sys.stderr)
            return EXIT_INTERNAL
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
    from .batch import run_jobs
    from .models import parse_device

    device = parse_device(args.device)
    return run_jobs(args, config_from_args(args, device), device)


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


STDOUT_ERRORS = "nti-stdout"
PLAIN = {"±": "+/-", "×": "x"}  # the summary table's signs, as a terminal that cannot print them reads them best


def stdout_errors(err: UnicodeEncodeError):
    """What stdout writes for characters its encoding lacks (a locale such as C.ISO-8859-1 or PYTHONIOENCODING=
    ascii): a path's undecodable byte as that byte (os.fsencode's surrogateescape, so the name stays usable), the
    table's signs in ASCII, anything else as a \\x escape. Without it the print raised after all files were written
    (exit 1, 'internal error')."""
    text = err.object[err.start:err.end]
    if all("\udc80" <= c <= "\udcff" for c in text):
        return bytes(ord(c) - 0xDC00 for c in text), err.end
    return "".join(PLAIN.get(c, c.encode("ascii", "backslashreplace").decode()) for c in text), err.end


codecs.register_error(STDOUT_ERRORS, stdout_errors)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    errors = getattr(sys.stdout, "errors", None)
    if errors is not None and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors=STDOUT_ERRORS)
    try:
        return _main(argv)
    finally:
        if errors is not None and hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors=errors)  # main() called by a process that goes on


def _main(argv: list[str]) -> int:
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler and \
            threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here KeyboardInterrupt, caught below
    try:  # a Ctrl-C while the libraries import is an interruption too, not a traceback
        args = build_parser().parse_args(argv)
        args.explicit = explicit_options(build_parser, argv)  # flags typed, not defaulted (--inversion conflicts)
    except KeyboardInterrupt:
        print("nti: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    setup_logging(args.quiet)
    previous = {}
    if args.command != "serve" and threading.current_thread() is threading.main_thread():
        # SIGTERM (`kill`, a scheduler's or a container's stop) and SIGHUP (the terminal or ssh session closed) are
        # interruptions as Ctrl-C is: the file being written is cleaned up, the finished ones stay and the same
        # command resumes (exit 130); their default action killed nti on the spot and left that file's temp file
        # behind. A SIGHUP already ignored (`nohup nti ...`) stays ignored. `nti serve` drains on SIGTERM itself
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)  # Windows has no SIGHUP
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, interrupt)
    if not args.debug:  # library chatter (diffusers/transformers loading notices) would bury our one line
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        if args.quiet:
            from .models import quiet_loading
            quiet_loading()
        with warnings.catch_warnings():  # said once, as an 'nti:' line, by options.config_from_args
            warnings.filterwarnings("ignore", message=".* act on the fast backend only; the reference backend runs")
            return run(args)
    except NTIError as err:
        print(f"nti: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as err:
        # a progress bar interrupted inside its constructor fails in its __del__ once the interrupted frames go:
        # Python prints that as "Exception ignored ... Traceback" under our last line. Free them now, unheard
        hook, sys.unraisablehook = sys.unraisablehook, lambda unraisable: None
        try:
            err.__traceback__ = None
            del err
            gc.collect()
        finally:
            sys.unraisablehook = hook
        print("nti: interrupted" + (" (finished inversions are in --cache)" if getattr(args, "cache", None) else ""),
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug, not bad input: one line, the traceback only with --debug
        if isinstance(err, BrokenPipeError) and stdout_closed():  # its reader went away (`nti edit ... | head -1`):
            # the run stops as on Ctrl-C (the files written are whole, the same command resumes), not as a bug
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flushes stdout again
            print("nti: interrupted: standard output was closed; the same command again keeps the finished outputs "
                  "and does the rest", file=sys.stderr)
            return EXIT_INTERRUPTED
        if out_of_memory(err):  # the machine, not a bug: what to lower, as a full disk says what to free
            print(f"nti: error: {out_of_memory_advice(args, err)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(err, OSError) and err.filename is not None:  # the filesystem refused a path the user gave
            # (a name too long to look up, say): bad input, as README's exit-code table has it
            print(f"nti: error: {err.filename}: {err.strerror or err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if args.debug:
            raise
        print(f"nti: internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        for sig, handler in previous.items():  # main() called by a process that goes on (a script, the tests)
            signal.signal(sig, handler)


def out_of_memory(err: BaseException) -> bool:
    """torch's CUDA (or MPS, XPU) out-of-memory error, or Python's MemoryError."""
    return isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def out_of_memory_advice(args, err: BaseException) -> str:
    """One line for a run that ran out of memory: where, at what batch, and what to lower."""
    batch = getattr(args, "batch_size", None)
    where = "GPU" if type(err).__name__ == "OutOfMemoryError" else "memory"
    device = getattr(args, "device", None)
    device = device if device not in (None, "auto") else "the GPU" if where == "GPU" else "this machine"
    advice = [f"a smaller --batch-size (this run's: {batch})"] if batch and batch > 1 else []
    advice += ["--gradient-checkpointing (fast backend)", "--precision bf16"]
    line = f"out of {where} on {device}: try {', '.join(advice[:-1])} or {advice[-1]}"
    if getattr(args, "command", None) in ("invert", "edit", "reconstruct", "eval"):
        line += "; finished outputs are kept, and the same command resumes"
    return line


def stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone away (a BrokenPipeError can come from another pipe)."""
    import select
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), or stdout is no file
        return False


def interrupt(signum, frame):
    """SIGTERM's and SIGHUP's handler in main(): a KeyboardInterrupt, as Ctrl-C's."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())

"""Command-line options shared by every `nti` subcommand, derived from NTIConfig's fields and docstrings."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .config import GROUPS, SPEED, NTIConfig, NTIError, field_docs

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
log = logging.getLogger("nti")
BY_DEVICE = ("backend", "precision")  # their command-line default depends on the device (NTIConfig's docstrings)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one readable line and exit 2, like every other bad input
        self.print_usage(sys.stderr)
        print(f"nti: error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)


def word_number(metavar: str, example: str):
    """Parser of WORD=NUMBER flags (--reweight tiger=2, --cross-replace-word tiger=0.4)."""
    def parse(text: str) -> tuple[str, float]:
        word, sep, number = text.partition("=")
        try:
            if not sep or not word.strip():
                raise ValueError
            return word.strip(), float(number)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {metavar} (e.g. {example}), got {text!r}") from None
    return parse


WORD_NUMBER_FLAGS = {"reweight": word_number("WORD=FACTOR", "tiger=2"),
                     "cross_replace_words": word_number("WORD=FRACTION", "tiger=0.4")}


def flag_of(f: dataclasses.Field) -> str:
    """The command-line flag of a config field: --field-name unless the field names another."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def _add_field(group, f: dataclasses.Field) -> None:
    meta, kind = f.metadata, str(f.type)
    help_text = field_docs().get(f.name, "").replace("%", "%%")
    kwargs = {"dest": f.name, "default": f.default, "help": help_text}
    if f.name in BY_DEVICE:
        kwargs["default"] = None  # config_from_args picks by device
    elif kind.startswith("tuple"):
        kwargs.update(action="append", default=[], type=WORD_NUMBER_FLAGS.get(f.name, str),
                      help=help_text + " Repeatable.")
    else:
        kwargs["help"] = f"{help_text} (default: {f.default})"
    if meta["metavar"]:
        kwargs["metavar"] = meta["metavar"]
    if meta["choices"]:
        kwargs["choices"] = meta["choices"]
    elif kind.startswith("bool"):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif kind.startswith("int"):
        kwargs["type"] = int if meta["minimum"] is None else int_at_least(meta["minimum"])
    elif kind.startswith("float"):
        kwargs["type"] = float
    group.add_argument(flag_of(f), **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per NTIConfig field, in argument groups by the field's group; help = the field's docstring."""
    fields = dataclasses.fields(NTIConfig)
    for group, title in GROUPS.items():
        g = parser.add_argument_group(title)
        for f in fields:
            if f.metadata["group"] == group:
                _add_field(g, f)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Where to run and what to keep: the model, the device, the inversion cache, output verbosity."""
    g = parser.add_argument_group("model and run")
    g.add_argument("--model", default=None, help="local diffusers folder (SD v1.x, 2.x or SDXL base) or cached repo "
                   "id; default: the built-in 'shapes' model (32 px scenes of coloured shapes, trained); 'tiny' and "
                   "'tiny-xl': random SD- and SDXL-shaped weights")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    g.add_argument("--cache", default=None, help="folder of saved inversions: reuse a matching one, save new ones "
                   "(later runs edit them with other targets without inverting again)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or progress messages")
    g.add_argument("--debug", action="store_true", help="show full tracebacks")


def add_common(parser: argparse.ArgumentParser) -> None:
    """Every NTIConfig flag and the run options: what invert, edit, reconstruct and eval share."""
    add_run_arguments(parser)
    add_config_arguments(parser)


def config_from_args(args, device) -> NTIConfig:
    """The NTIConfig of parsed flags; backend and precision, when not given, by device (fast and bf16 on CUDA)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(NTIConfig) if hasattr(args, f.name)}
    values["reweight"] = tuple(values.get("reweight", ()))
    values["cross_replace_words"] = tuple(values.get("cross_replace_words", ()))
    values["blend_words"] = tuple(values.get("blend_words", ()))
    cuda = device.type == "cuda"
    if values.get("backend") is None:
        values["backend"] = "fast" if cuda else "reference"
    if values.get("precision") is None:
        values["precision"] = "bf16" if cuda and values["backend"] == "fast" else "fp32"
    config = NTIConfig(**values)
    if config.backend == "reference":
        if config.precision != "fp32":  # the reference is fp32 by definition; running it would mislabel the result
            raise NTIError(f"--precision {config.precision} needs --backend fast: the reference backend is the eager "
                           f"fp32 truth")
        ignored = [f for f in dataclasses.fields(NTIConfig) if f.metadata["group"] == SPEED
                   and f.name not in ("backend", "precision") and getattr(config, f.name) != f.default]
        if ignored:
            log.warning(f"{', '.join(flag_of(f) for f in ignored)} act on the fast backend only; the reference "
                        f"backend ignores them (add --backend fast)")
    elif config.compile_scope != "blocks" and not config.compile:
        log.warning(f"--compile-scope {config.compile_scope} acts with --compile only; running the UNet eager")
    return config

"""Where a benchmark's results go: a run never destroys an earlier result.

The one rule of every benchmark script: an output file that already exists is refused before any work (exit 2, one
line naming it) unless --overwrite; a file is written whole (temp file, then rename), so a stopped run leaves the
old file or the complete new one. gpu_run appends JSON lines to its folder instead, by design.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from nti.outputs import atomic_write


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """The --overwrite flag every benchmark script takes."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing results file (without it an existing file is refused)")


def refuse_existing(parser: argparse.ArgumentParser, paths, overwrite: bool) -> None:
    """Exit 2 with one line when a path is a folder, or exists and --overwrite was not given; call before any work."""
    for path in map(Path, paths):
        if path.is_dir():
            parser.error(f"{path} is a folder; --out takes a file name")
        if (path.exists() or path.is_symlink()) and not overwrite:
            parser.error(f"{path} already exists (an earlier result); pass --overwrite to replace it, or choose "
                         f"another --out")


def write_text(path, text: str) -> Path:
    """Write text to path whole: readers and a stopped run see the old file or the new one, never a part."""
    return atomic_write(path, lambda temp: temp.write_text(text))

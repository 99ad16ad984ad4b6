"""Rewrite imports from the old top-level names to the installed package `nti` (issue 17).

The folders stay where they are (engine/, kernels/, export/, benchmarks/); pyproject.toml installs them as
`nti`, `nti.kernels`, `nti.export` and `nti.benchmarks`. This script changes only how code names them:

    engine.X / import engine / from engine ...      -> nti.X / import nti / from nti ...
    kernels, export, benchmarks (imports, -m paths)  -> nti.kernels, nti.export, nti.benchmarks
    engine.scenes, engine.testbed (the old modules)  -> nti.testbed.scenes, nti.testbed.train

Relative imports inside the folders (`from .config import ...`) need no change. Folder paths in text
("engine/api.py", "engine/assets") are left alone: the folders did not move. Run from the repository root:

    python tools/rename_imports.py            # rewrite tracked *.py and *.md files in place, list what changed
    python tools/rename_imports.py --check    # exit 1 if anything would change (nothing printed is rewritten)
    python tools/rename_imports.py FILE ...   # only these files

It is idempotent: a second run changes nothing.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

MOVED = ("kernels", "export", "benchmarks")  # top-level folders that become nti.<name>
NOT_A_MODULE = r"(?<![\w./\-])"  # `self.engine.x` (a TensorRT engine) or a path like `engine/x` is not the module


def _split_scenes(match: re.Match) -> str:
    """`from engine import api, scenes` -> `from nti import api` + `from nti.testbed import scenes`."""
    indent, names = match.group(1), [n.strip() for n in match.group(2).split(",")]
    lines = []
    rest = [n for n in names if n != "scenes"]
    if rest:
        lines.append(f"{indent}from nti import {', '.join(rest)}")
    lines.append(f"{indent}from nti.testbed import scenes")
    return "\n".join(lines)


def _import_line(match: re.Match) -> str:
    """`import a, engine.x, kernels.ddim as ops, export` -> `import a, nti.x, nti.kernels.ddim as ops,
    nti.export as export` (a bare moved package keeps its local name through an alias)."""
    indent, names, tail = match.groups()
    if not any(part.strip().split(".")[0].split(" ")[0] in ("engine", *MOVED) for part in names.split(",")):
        return match.group(0)  # not ours: left exactly as written
    out = []
    for part in names.split(","):
        name, _, alias = part.strip().partition(" as ")
        name, alias = name.strip(), alias.strip()
        top = name.split(".")[0]
        if top == "engine":
            name = "nti" + name[len("engine"):]
        elif top in MOVED:
            alias = alias or (top if name == top else "")
            name = "nti." + name
        out.append(name + (f" as {alias}" if alias else ""))
    return f"{indent}import {', '.join(out)}{tail}"


RULES: list[tuple[re.Pattern, object]] = [
    # the test bed moved into engine/testbed/ (scenes.py and the training script, now train.py)
    (re.compile(r"^([ \t]*)from engine import ((?:[\w ]+,\s*)*scenes\b(?:\s*,[\w ]+)*)[ \t]*$", re.M), _split_scenes),
    (re.compile(r"\bfrom engine\.testbed import scenes\b"), "from nti.testbed import scenes"),
    (re.compile(r"\bfrom engine\.testbed import (?!scenes\b)"), "from nti.testbed.train import "),
    (re.compile(NOT_A_MODULE + r"engine\.scenes\b"), "nti.testbed.scenes"),
    # import lines, one name or several (also inside code kept in strings, e.g. a script run in a subprocess)
    (re.compile(r"^([ \t]*)import ((?:[\w.]+(?: as \w+)?)(?:, *[\w.]+(?: as \w+)?)*)([ \t]*(?:#.*)?)$", re.M),
     _import_line),
    # engine -> nti
    (re.compile(r"^([ \t]*)from engine\b", re.M), r"\1from nti"),
    (re.compile(NOT_A_MODULE + r"engine\.(?=[A-Za-z_])"), "nti."),
    # kernels / export / benchmarks -> nti.<name>
    *[rule for name in MOVED for rule in (
        (re.compile(rf"^([ \t]*)from {name}(?=[ .])", re.M), rf"\1from nti.{name}"),
        (re.compile(rf"(-m[\s\"',]+){name}\.(?=[A-Za-z_])"), rf"\1nti.{name}."),  # python -m benchmarks.gpu_run
    )],
]


def rewrite(text: str) -> str:
    for pattern, replacement in RULES:
        text = pattern.sub(replacement, text)
    return text


def project_files(root: Path) -> list[Path]:
    """Tracked and untracked-but-not-ignored *.py and *.md files, this script excluded."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py", "*.md"],
                            cwd=root, capture_output=True, text=True, check=True).stdout.split()
    return [root / name for name in listed if name != "tools/rename_imports.py"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="files to rewrite (default: the repository's)")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if something would change")
    args = parser.parse_args(argv)
    files = args.files or project_files(Path.cwd())
    changed = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        new = rewrite(text)
        if new != text:
            changed.append(path)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    for path in changed:
        print(path)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Where a result came from: the code's commit, library versions and the machine (reports, benchmarks' JSON)."""
from __future__ import annotations

import platform
from pathlib import Path


def git_commit() -> str | None:
    """The checkout's commit (with '+dirty' for local changes), or None outside a git checkout. Tried from this
    file's folder (an editable install), then from the working directory (the tree beside an installed wheel)."""
    import subprocess

    for where in (Path(__file__).parent, Path.cwd()):
        try:
            commit = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=10).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if commit:
            return commit + ("+dirty" if dirty else "")
    return None


def environment(device) -> dict:
    """Library versions and the machine, for the report."""
    import numpy
    import skimage
    import torch

    from .artifact import library_versions

    versions = {**library_versions(), "numpy": numpy.__version__, "scikit-image": skimage.__version__,
                **optional_versions("matplotlib", "pandas"),
                "python": platform.python_version()}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{cpu_name()}, {torch.get_num_threads()} torch threads")
    return {"versions": versions, "machine": machine, "platform": platform.platform(), "commit": git_commit()}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def optional_versions(*names: str) -> dict:
    """Versions of the libraries that import here (an absent one is left out)."""
    import importlib

    versions = {}
    for name in names:
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            pass
    return versions

"""On-disk cache of exported models: one folder per key (model, shapes, precision, kind, library versions)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import warnings
from pathlib import Path

import torch

from nti.config import NTIError

BUILDS: dict[str, int] = {}  # kind -> artifacts built by this process (tests: "the second call did not rebuild")
META = "meta.json"
# the disk, not the build, failed: say so, and what to do, whichever step wrote the file
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_CHECKED: set = set()  # (entry folder, meta.json mtime) whose files this process hashed and found as built


def default_cache_dir() -> Path:
    """~/.cache/nti/export, or $NTI_EXPORT_CACHE."""
    return Path(os.environ.get("NTI_EXPORT_CACHE") or Path.home() / ".cache" / "nti" / "export").expanduser()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # absent or broken: the key then says so, and the loader raises its own clear error
        return None


def library_versions(kind: str) -> dict:
    """The libraries an artifact of this kind depends on: a new version of any of them means a rebuild."""
    import diffusers

    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__}
    if kind in ("onnx", "tensorrt"):
        versions.update(onnx=_version("onnx"), onnxscript=_version("onnxscript"))
    if kind == "onnx":
        versions["onnxruntime"] = _version("onnxruntime")
    if kind == "tensorrt":
        versions["tensorrt"] = _version("tensorrt")
    return versions


def device_signature(device: torch.device) -> dict:
    """AOTInductor .so files and TensorRT plans are compiled for one GPU architecture (or one CPU ISA)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"device": "cuda", "gpu": torch.cuda.get_device_name(index), "sm": f"{major}.{minor}",
                "cuda": torch.version.cuda}
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)()
    return {"device": device.type, "isa": capability}  # an AVX-512 build would crash on an AVX2-only CPU


def cache_key(fields: dict) -> str:
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def entry_dir(cache_dir, kind: str, component: str, fields: dict) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / kind / f"{component}-{fields.get('precision', '')}-{cache_key(fields)}"


DEAD_BUILD_AGE_S = 3600  # a container sharing this disk and host name has its own pids: leave recent folders alone


def _file_record(folder: Path) -> dict:
    """name -> [size, sha256] of every file of a build but meta.json: what later loads check the entry against."""
    record = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != META):
        digest = hashlib.sha256()
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
        record[file.relative_to(folder).as_posix()] = [file.stat().st_size, digest.hexdigest()]
    return record


def damage(folder: Path, fields: dict, artifact: str) -> str | None:
    """Why the entry in `folder` must not be used (None if it is sound): no meta or artifact, meta.json for other key
    fields, or a file whose size or content changed since the build (a truncated copy, a disk error)."""
    try:
        meta = json.loads((folder / META).read_text())
        stamp = (str(folder), (folder / META).stat().st_mtime_ns)
    except (OSError, ValueError) as err:
        return f"unreadable {META}: {err}"
    if not (folder / artifact).is_file():
        return f"no {artifact}"
    want = json.loads(json.dumps(fields, sort_keys=True, default=str))
    other = sorted(k for k in want if meta.get(k) != want[k])
    if other:
        return f"{META} records other {', '.join(other)}"
    files = meta.get("files")
    if files is None:  # an entry written before files were recorded: nothing to check it against
        return None
    for name, (size, _) in files.items():  # every lookup: a truncated or missing file costs no hashing
        if not (folder / name).is_file() or (folder / name).stat().st_size != size:
            return f"{name} is missing or not {size} bytes"
    if stamp not in _CHECKED:  # contents once per process and entry: GBs for SD
        found = _file_record(folder)
        changed = sorted(n for n in files if found.get(n) != files[n])
        if changed:
            return f"{', '.join(changed)} changed since the build"
        _CHECKED.add(stamp)
    return None


def _remove_dead_builds(parent: Path) -> None:
    """Delete the temp build folders in parent (.KEY.THREAD.HOST.PID.tmp) of this host's processes that are gone, once
    untouched for DEAD_BUILD_AGE_S: a build killed mid-way (SIGKILL, out of memory, a power cut) left one that
    nothing reads or removes, GBs for SD."""
    if os.name == "nt":  # os.kill(pid, 0) terminates the process there
        return
    host = socket.gethostname()
    for tmp in parent.glob(".*.tmp"):
        head, _, pid = tmp.name[:-len(".tmp")].rpartition(".")
        if not (head.endswith(f".{host}") and pid.isdigit() and tmp.is_dir()):
            continue
        try:
            if time.time() - tmp.stat().st_mtime < DEAD_BUILD_AGE_S:
                continue
        except OSError:  # removed meanwhile
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:  # dead; PermissionError means alive (another user's)
            shutil.rmtree(tmp, ignore_errors=True)
        except (OSError, OverflowError):
            pass


@contextlib.contextmanager
def publish_lock(folder: Path):
    """An flock on the entry's parent folder (no lock file to leave behind), held while a finished build is checked
    against the entry and renamed into place: without it, another process's build renamed in between our check and
    our clearing of the folder was deleted (a process that had just loaded it then read a folder being replaced).
    No lock on Windows."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # drops the lock


def cached_build(folder: Path, fields: dict, artifact: str, build) -> tuple[Path, bool]:
    """Path of `artifact` in `folder`, built by `build(tmp_folder) -> None` if missing. Returns (path, built).

    The build goes to a private temporary folder that is renamed into place at the end, so an interrupted build
    leaves no half-written entry and two processes building the same key cannot corrupt each other.
    """
    path = folder / artifact
    if (folder / META).is_file() and path.exists():
        why = damage(folder, fields, artifact)
        if why is None:
            return path, False
        warnings.warn(f"export cache entry {folder} is damaged ({why}); building it again")
    # the host too: on a shared disk another host's pid says nothing here; the thread: two threads of one process
    # building the same key would otherwise share (and delete) one temp folder
    tmp = folder.parent / f".{folder.name}.{threading.get_ident()}.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_dead_builds(folder.parent)
        tmp.mkdir()
    except OSError as err:
        raise NTIError(f"cannot write the export cache {folder.parent} ({err}); pass another --export-cache "
                       f"folder") from err
    start = time.perf_counter()
    try:
        build(tmp)
        meta = {**fields, "artifact": artifact, "build_s": round(time.perf_counter() - start, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": _file_record(tmp)}
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
        with publish_lock(folder):  # check, clear and rename as one step among the processes building this key
            if damage(folder, fields, artifact) is None:  # a concurrent build of the same key finished first
                return path, False
            shutil.rmtree(folder, ignore_errors=True)  # a stale partial (no meta) or damaged entry
            try:
                os.replace(tmp, folder)
            except OSError:  # another host's build (no shared flock) renamed into place between our check and here
                if damage(folder, fields, artifact) is None:
                    return path, False
                raise
        _CHECKED.add((str(folder), (folder / META).stat().st_mtime_ns))  # just hashed: no need to read it again
    except OSError as err:
        if err.errno not in WRITE_ERRORS:
            raise
        raise NTIError(f"cannot write the export cache {folder.parent} ({err}); free space there or pass another "
                       f"--export-cache folder") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    kind = fields.get("kind", "?")
    BUILDS[kind] = BUILDS.get(kind, 0) + 1
    return path, True


def read_meta(folder: Path) -> dict:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((folder / META).read_text())
    return {}

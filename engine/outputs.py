"""Where results go: output paths planned and checked before any work, names made safe, files written atomically.

Three rules (issue 18): every output path is known and checked before the first UNet call, so a bad --out costs
seconds, not minutes of GPU work; nothing is written outside --out and nothing over an input; a file is either the
old one or the complete new one (temp file in the same folder, then os.replace), never half-written.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .config import NTIError

SAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME_LENGTH = 120  # well under every filesystem's 255-byte limit, room for a suffix and a '-NN' counter
FS_NAME_BYTES = 255  # the longest file name ext4, btrfs, XFS, APFS and NTFS (in UTF-16 units) take
TEMP_NAME_EXTRA = len("..xxxxxxxx.part")  # atomic_write's temp file: ".NAME.xxxxxxxx.part" beside NAME


def safe_name(text: str) -> str:
    """A file name from an id, a stem or a prompt: letters, digits, '.', '_' and '-' only, never '.', '..' or
    hidden, so no record field can name a path (or a parent folder) outside --out."""
    name = SAFE_NAME_CHARS.sub("_", str(text)).strip("._") or "item"
    return name[:MAX_NAME_LENGTH]


def unique_names(names: list[str]) -> list[str]:
    """Safe names, made distinct (case-insensitively, for macOS and Windows folders) with a '-k' counter."""
    safe = [safe_name(n) for n in names]
    taken: set[str] = set()
    out = []
    for k, name in enumerate(safe):
        candidate = name
        if candidate.lower() in taken or sum(s.lower() == name.lower() for s in safe) > 1:
            candidate = f"{name}-{k}"
        while candidate.lower() in taken:
            candidate += "_"
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def same_file(a: Path, b: Path) -> bool:
    """True when two paths name one file (hard links and symlinks too); False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def is_inside(path: Path, folder: Path) -> bool:
    """True when path is folder or lies under it (after resolving symlinks)."""
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


@dataclass
class OutputPlan:
    """Every file a run will write, decided before it runs: paths[k] for input k, plus sidecars."""

    out: Path  # what --out names (a file for one input, else a folder)
    paths: list[Path]  # the main output of each input, in input order
    sidecar_suffixes: tuple[str, ...] = ()  # extra files written beside each path (".json" for inversions)

    def all_files(self) -> list[Path]:
        return self.paths + [p.with_suffix(s) for p in self.paths for s in self.sidecar_suffixes]


def plan_outputs(out: str, names: list[str], suffix: str, inputs: Iterable[Path] = (),
                 photos: Iterable[Path] = (), sidecar_suffixes: tuple[str, ...] = ()) -> OutputPlan:
    """Output paths for `names` under --out, checked now: the suffix, one file for several inputs, a parent that is a
    file, a folder that cannot be written, an output that would replace any of `inputs`, and an --out folder that
    holds any of `photos` (the user's source images, input folders and JSONL files: --out is the engine's to write
    in, the originals stay apart). Raises NTIError naming the problem."""
    if not str(out).strip():
        raise NTIError("--out is empty: give an output file or folder")
    out_path = Path(out).expanduser()
    for part in out_path.parts:  # longer, and every lookup below fails with ENAMETOOLONG
        if len(os.fsencode(part)) > FS_NAME_BYTES:
            raise NTIError(f"--out {out}: the name {part[:40]}... is too long ({len(os.fsencode(part))} bytes; a "
                           f"file system takes {FS_NAME_BYTES})")
    if out_path.exists() and not (out_path.is_dir() or out_path.is_file()):
        raise NTIError(f"--out {out} is a device or pipe, not a file or folder; give where to write the results")
    photos = [Path(p) for p in photos]
    inputs = [Path(p) for p in inputs] + photos
    one_file = len(names) == 1 and bool(out_path.suffix) and not out_path.is_dir()
    if one_file:
        if out_path.suffix.lower() != suffix:
            raise NTIError(f"--out {out}: expected a {suffix} file or a folder")
        folder, paths = out_path.parent, [out_path]
    else:
        if out_path.exists() and not out_path.is_dir():
            raise NTIError(f"--out {out} is a file; {len(names)} inputs need a folder")
        if out_path.suffix and not out_path.is_dir():
            raise NTIError(f"--out {out}: {len(names)} inputs need a folder, not a {out_path.suffix} file")
        folder, paths = out_path, [out_path / f"{name}{suffix}" for name in unique_names(names)]
        for photo in photos:
            if os.path.exists(photo) and is_inside(photo, folder):  # False, not ENAMETOOLONG, for an over-long name
                raise NTIError(f"--out {out} holds the input {photo}; write the results to a folder of their own "
                               f"so no original can be replaced")
    plan = OutputPlan(out_path, paths, sidecar_suffixes)
    for path in plan.all_files():
        if len(os.fsencode(path.name)) + TEMP_NAME_EXTRA > FS_NAME_BYTES:
            raise NTIError(f"--out {out}: the file name is too long ({len(os.fsencode(path.name))} bytes; at most "
                           f"{FS_NAME_BYTES - TEMP_NAME_EXTRA}, room for the temporary file it is written through)")
        for source in inputs:
            if same_file(path, source):
                raise NTIError(f"--out {out} would overwrite the input {source}; choose another output")
        if path.is_dir():
            raise NTIError(f"output {path} is a folder; choose another --out")
        if path.exists() and not written_by_nti(path):  # a rerun replaces its own outputs, never a user's file
            raise NTIError(f"output {path} exists and was not written by nti; move it, or choose another --out")
    check_writable_folder(folder, "--out")
    return plan


PNG_SOFTWARE = "nti"  # the PNG 'Software' text chunk of every image nti writes: how a rerun knows its own files
REQUEST_TAG = "nti-request"  # PNG text chunk / safetensors header key: the request an output answers (--resume)
CHECKSUM_TAG = "nti-tensors-sha256"  # safetensors header key: safetensors keeps no checksum, and a flipped bit in a
# tensor loaded as a finite, plausible, wrong inversion (files written without it still load)


def request_key(*parts) -> str:
    """sha256 over what an output is made from (the command, the input file's bytes, prompts, model, every setting,
    nti's version): `--resume` keeps an existing output only when it recorded this same key."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tensors_checksum(tensors: dict) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in name order (CHECKSUM_TAG)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def whole(path: Path) -> bool:
    """Whether an output nti wrote is still whole: every PNG chunk's CRC holds (a file cut short or with a flipped
    bit fails), an inversion's tensors match their checksum. Read in full: --resume keeps only whole outputs."""
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image
            with Image.open(path) as img:
                img.verify()
            return True
        from safetensors import safe_open
        from safetensors.torch import load
        with safe_open(path, "pt") as fh:
            recorded = (fh.metadata() or {}).get(CHECKSUM_TAG)
        # read, not mapped (load_file): a file cut short meanwhile would kill the process (SIGBUS)
        return recorded is None or recorded == tensors_checksum(load(path.read_bytes()))
    except Exception:  # unreadable or damaged: made again
        return False


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in blocks (an input's identity for request_key, whatever its name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def nti_tags(path: Path) -> dict | None:
    """The tags nti writes into its outputs, read without decoding: a PNG's text chunks (with Software=nti) or an
    inversion's safetensors header (with its "nti" record); None for any other or unreadable file."""
    try:
        if path.suffix.lower() == ".png":
            from PIL import Image
            with Image.open(path) as img:  # text chunks before the image data: read at open, no decoding
                return dict(img.info) if img.format == "PNG" and img.info.get("Software") == PNG_SOFTWARE else None
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(path, "pt") as fh:
                header = fh.metadata() or {}
            return header if "nti" in header else None
    except Exception:  # unreadable, damaged, or another format: not ours
        return None
    return None


def recorded_request(path: Path) -> str | None:
    """The request key an existing whole output of nti recorded (PNG text chunk or safetensors header), else None; an
    inversion counts only with its own .json twin beside it: save_inversion writes the twin first, so a write that
    failed after it leaves the new twin beside the previous run's inversion, a pair no rerun may keep."""
    tags = nti_tags(path) or {}
    if path.suffix == ".safetensors":
        try:
            if json.loads(path.with_suffix(".json").read_text()) != json.loads(tags["nti"]):
                return None
        except (OSError, ValueError, KeyError, TypeError):  # no twin, an unreadable one, or no inversion
            return None
    request = tags.get(REQUEST_TAG)
    return request if request is not None and whole(path) else None  # a damaged output answers no request


def written_by_nti(path: Path) -> bool:
    """Whether an existing file is one nti wrote (a PNG with its Software chunk, an inversion with its metadata, or
    that inversion's readable .json twin), so that writing the same output again loses nothing of the user's."""
    if path.suffix == ".json":
        try:
            record = json.loads(path.read_text())
        except Exception:  # unreadable, or another format: not ours
            return False
        return isinstance(record, dict) and {"format_version", "key", "source_prompt"} <= record.keys()
    return nti_tags(path) is not None


def check_writable_folder(folder: Path, what: str) -> None:
    """The folder exists and can be written, or can be created: its nearest existing ancestor is a writable folder on
    a filesystem mounted read-write. Checked without writing anything."""
    folder = Path(os.path.abspath(Path(folder).expanduser()))
    existing = folder
    while not existing.exists():
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            raise NTIError(f"{what} {folder}: {existing} is a broken symbolic link")
        existing = existing.parent
    if not existing.is_dir():
        raise NTIError(f"{what} {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NTIError(f"{what} {folder}: no permission to write in {existing}")
    try:
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            raise NTIError(f"{what} {folder}: {existing} is on a read-only filesystem")
    except (AttributeError, OSError):  # no statvfs (Windows) or an odd mount: the write itself will tell
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Write `path` through write(temp_path) and rename it into place: readers (and a Ctrl-C) see the old file or
    the whole new one, never a part. The temp file sits in the same folder, so the rename stays on one filesystem.
    A symbolic link is written through, as a shell's `>` does: its target gets the new file, the link stays."""
    path = Path(path)
    if path.is_symlink():  # the rename would otherwise put a plain file where the user's link was
        path = Path(os.path.realpath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(8):  # O_EXCL: never someone else's file; a name taken (1 in 4e9) draws another
            temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")  # TEMP_NAME_EXTRA
            try:  # mode 0o666 less the umask, as any new file (mkstemp's 0600 made outputs no one else could read)
                os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                break
            except FileExistsError:
                if attempt == 7:
                    raise
    except OSError as err:
        raise NTIError(f"could not write {path}: {err.strerror or err}") from None
    try:
        write(temp)
        with open(temp, "rb+") as fh:  # on disk before the rename: a crash cannot leave an empty file in place
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except OSError as err:
        raise NTIError(f"could not write {path}: {err.strerror or err}") from None
    finally:  # an error or a Ctrl-C while writing leaves no .part file behind
        if temp.exists():
            temp.unlink(missing_ok=True)
    return path

"""Inversion artifacts: inverted latent + per-step null embeddings + everything that changes the result."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .config import NTIConfig, NTIError
from .outputs import (CHECKSUM_TAG, REQUEST_TAG, atomic_write, check_writable_folder, tensors_checksum,
                      written_by_nti)

FORMAT_VERSION = 1  # written when the inversion stores no pivots: older readers still load it
FORMAT_VERSION_PIVOTS = 2  # with pivots (direct inversion): older readers refuse it rather than edit without them
READABLE_FORMATS = (FORMAT_VERSION, FORMAT_VERSION_PIVOTS)
TENSORS = ("z_T", "z_0", "null_embeddings", "pivots")  # an Inversion's tensor fields; the rest is its metadata


def library_versions() -> dict:
    import diffusers
    import transformers

    from .version import __version__
    return {"nti-engine": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


@dataclass
class Inversion:
    """One inverted image: edit it under any prompt with `nti.edit` without inverting again."""

    z_T: torch.Tensor  # (4, h, w) fp32: the end of the DDIM pivot trajectory, where editing starts
    z_0: torch.Tensor  # (4, h, w) fp32: the VAE latent of the source image (for reconstruction error)
    null_embeddings: torch.Tensor | None  # (steps, L, D) fp32 per-step null contexts (null-text), or (1, L, D)
    # for every step (negative-prompt: the source prompt's embedding); None = the empty prompt's (ddim, direct)
    source_prompt: str
    image_hash: str  # sha256 of the preprocessed pixels
    model_name: str
    model_fingerprint: str
    settings: dict  # NTIConfig.result_settings()
    versions: dict = field(default_factory=library_versions)
    iterations: list[int] = field(default_factory=list)  # inner Adam iterations used per step
    losses: list[float] = field(default_factory=list)  # last inner loss per step
    fp32_retries: list[int] = field(default_factory=list)  # redone in fp32 after a non-finite value: -1 = DDIM
    # inversion pass, i >= 0 = null-text step i
    timings: dict = field(default_factory=dict)  # seconds per phase (this image's share of a batch)
    pivots: torch.Tensor | None = None  # (steps + 1, 4, h, w) fp32 DDIM trajectory z*_0 .. z*_T, kept for direct
    # inversion: editing adds back the offset from the source branch's step to z*_{t-1} (Ju et al. 2023)
    conditioning: dict = field(default_factory=dict)  # SDXL: {"pooled_dim", "time_ids"} the null embeddings were
    # made with (conditioning.PooledConditioning; null_embeddings' last row is the pooled null); {} for SD v1.x/2.x

    @property
    def key(self) -> str:
        return inversion_key(self.image_hash, self.source_prompt, self.model_fingerprint, self.settings)

    def metadata(self) -> dict:
        meta = {k: v for k, v in asdict(self).items() if k not in TENSORS and (k != "conditioning" or v)}
        version = FORMAT_VERSION if self.pivots is None else FORMAT_VERSION_PIVOTS
        return {"format_version": version, "key": self.key, **meta}


def inversion_key(image_hash: str, source_prompt: str, model_fingerprint: str, settings: dict) -> str:
    """Cache key over image pixels, prompt, model and every result-changing setting (not the image path)."""
    blob = json.dumps([image_hash, source_prompt, model_fingerprint, settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def save_inversion(inv: Inversion, path: str | os.PathLike, request: str | None = None) -> Path:
    """Write PATH (.safetensors: tensors + metadata JSON in the header) and a readable PATH.json beside it;
    `request`: the outputs.request_key it answers, recorded in the header for --resume. Refused (NTIError), with
    nothing written: an inversion load_inversion would refuse, and either file name taken by a file nti did not
    write (a rerun replaces nti's own files, never a user's), as the command line's outputs."""
    if not isinstance(inv, Inversion):
        raise NTIError(f"save_inversion takes an nti.Inversion (what nti.invert returns), then a path; got "
                       f"{type(inv).__name__}")
    if request is not None and not isinstance(request, str):
        raise NTIError(f"request must be a string (outputs.request_key) or None; got {type(request).__name__}")
    path = path_argument(path)
    if path.name in ("", ".", ".."):  # with_suffix would raise ValueError: PosixPath('.') has an empty name
        raise NTIError(f"inversion path {path} names a folder; give a file name such as "
                       f"{path / 'inversion.safetensors'}")
    if path.suffix != ".safetensors":
        path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
    try:
        check_inversion(inv)
    except NTIError as err:
        raise NTIError(f"inversion not saved to {path}: {err}; load_inversion would refuse the file") from None
    for target in (path, path.with_suffix(".json")):
        if target.is_dir():
            raise NTIError(f"inversion path {target} is a folder; give another path")
        if target.exists() and not written_by_nti(target):
            raise NTIError(f"{target} exists and was not written by nti; move it, or give another path")
    check_writable_folder(path.parent, "inversion path")  # a parent that is a file: FileExistsError from mkdir
    try:
        data, readable = inversion_bytes(inv, request)
    except (TypeError, ValueError) as err:  # a metadata field set to something JSON cannot hold (a tensor)
        raise NTIError(f"inversion not saved to {path}: its metadata cannot be written as JSON ({err})") from None
    write_atomic(path.with_suffix(".json"), readable.encode())
    write_atomic(path, data)  # last: a cache reader only looks for the .safetensors, so it never sees half an entry
    return path


def inversion_bytes(inv: Inversion, request: str | None = None) -> tuple[bytes, str]:
    """The .safetensors file's bytes and its readable .json twin, as save_inversion writes them (a worker that
    makes an inversion can hand these to whoever writes the file)."""
    tensors = {"z_T": inv.z_T.detach().cpu().float().contiguous(), "z_0": inv.z_0.detach().cpu().float().contiguous()}
    if inv.null_embeddings is not None:
        tensors["null_embeddings"] = inv.null_embeddings.detach().cpu().float().contiguous()
    if inv.pivots is not None:
        tensors["pivots"] = inv.pivots.detach().cpu().float().contiguous()
    header = {"nti": json.dumps(inv.metadata(), sort_keys=True), CHECKSUM_TAG: tensors_checksum(tensors)}
    if request is not None:
        header[REQUEST_TAG] = request
    return save(tensors, metadata=header), json.dumps(inv.metadata(), indent=2, sort_keys=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write bytes through outputs.atomic_write (temp file beside it, fsync, rename): a reader (another worker
    sharing --cache, a rerun after a crash) sees the whole file or none, and two writers leave one whole file."""
    atomic_write(path, lambda temp: temp.write_bytes(data))


def path_argument(path) -> Path:
    """An inversion file path given to the API, `~` expanded as the command line expands it; NTIError for what is
    no path (None, a number, an Inversion) or an empty one."""
    if not isinstance(path, (str, os.PathLike)):
        raise NTIError(f"the inversion path must be a str or a pathlib.Path; got {type(path).__name__}")
    if not str(path).strip():  # Path("") is ".", which would be reported as a folder
        raise NTIError("the inversion path is empty; give a .safetensors file written by nti invert")
    return Path(path).expanduser()


def read_safetensors(path: Path) -> tuple[dict, dict]:
    """A safetensors file's tensors and header metadata, from one read into memory: load_file maps the file, so a
    write over it in place changed an inversion already loaded, and cutting it short killed the process (SIGBUS)."""
    data = path.read_bytes()
    tensors = load(data)  # copies; SafetensorError for a damaged file
    size = int.from_bytes(data[:8], "little")
    return tensors, json.loads(data[8:8 + size]).get("__metadata__") or {}


class NewerFormat(NTIError):
    """An inversion file of a format a newer nti writes: not damaged, only not readable by this one."""


REQUIRED_FIELDS = {"source_prompt": str, "image_hash": str, "model_name": str, "model_fingerprint": str,
                   "settings": dict}
OPTIONAL_FIELDS = {"versions": dict, "iterations": list, "losses": list, "fp32_retries": list, "timings": dict,
                   "conditioning": dict}


def load_inversion(path: str | os.PathLike) -> Inversion:
    """Read an artifact written by `save_inversion`; clear errors (NTIError) for missing, foreign, damaged or
    self-contradicting files, so a bad file is refused before any model runs instead of editing garbage."""
    path = path_argument(path)
    if path.is_dir():
        raise NTIError(f"inversion {path} is a folder; give the .safetensors file(s) in it")
    if not path.is_file():
        raise NTIError(f"inversion {path} is not a regular file (a device or pipe); give a .safetensors file"
                       if path.exists() else f"inversion file {path} does not exist")
    try:
        tensors, header = read_safetensors(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise NTIError(f"inversion file {path} is not a readable safetensors file: {err}") from None
    if "nti" not in header:
        raise NTIError(f"{path} is a safetensors file but not an nti inversion (no 'nti' metadata)")
    if "z_T" not in tensors or "z_0" not in tensors:
        raise NTIError(f"{path} lacks its latents (z_T and z_0); the file is damaged, invert again")
    try:
        meta = json.loads(header["nti"])
    except ValueError as err:
        raise NTIError(f"{path}: its nti metadata is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise NTIError(f"{path}: its nti metadata is not a JSON object")
    version = meta.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > max(READABLE_FORMATS):
        raise NewerFormat(f"{path} has inversion format {version}, written by a newer nti; this one reads "
                       f"{', '.join(map(str, READABLE_FORMATS))}: upgrade nti, or invert again with this one")
    if version not in READABLE_FORMATS:
        raise NTIError(f"{path} has inversion format {version!r}, this engine reads "
                       f"{', '.join(map(str, READABLE_FORMATS))}")
    for name, kind in {**REQUIRED_FIELDS, **OPTIONAL_FIELDS}.items():
        if (name in REQUIRED_FIELDS or name in meta) and not isinstance(meta.get(name), kind):
            raise NTIError(f"{path}: metadata field {name!r} is missing or not a {kind.__name__}")
    if meta["settings"].get("method") == "direct" and "pivots" not in tensors:
        raise NTIError(f"{path} is a direct inversion without its pivots; it cannot be edited, invert again")
    fields = {k: meta[k] for k in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS) if k in meta}
    inv = Inversion(z_T=tensors["z_T"], z_0=tensors["z_0"],
                    null_embeddings=tensors.get("null_embeddings"), pivots=tensors.get("pivots"), **fields)
    try:
        check_inversion(inv)
    except NTIError as err:
        raise NTIError(f"{path}: {err}; the file is damaged or not an inversion this engine wrote: invert again") \
            from None
    # after the checks above, which name what is wrong; these only say that something is
    if CHECKSUM_TAG in header and header[CHECKSUM_TAG] != tensors_checksum(tensors):
        raise NTIError(f"{path}: its tensors do not match the checksum recorded when it was written (a damaged copy "
                       f"or disk); invert again")
    if "key" in meta and meta["key"] != inv.key:  # a setting or the prompt changed after writing
        raise NTIError(f"{path}: its metadata does not match the key recorded when it was written ({meta['key']}, "
                       f"now {inv.key}): the file was damaged or edited; invert again")
    return inv


SETTING_KEYS = ("method", "steps", "guidance", "guidance_schedule", "guidance_min", "inner_steps", "lr", "early_stop",
                "early_stop_eps", "precision", "steps_offset")


def check_inversion(inv: Inversion, finite: bool = True) -> None:
    """An inversion is usable only when it agrees with itself: valid settings, a finite latent of the right rank,
    one null embedding per step (or one for all), one pivot per step plus z_T, the tensors its method keeps, finite
    tensors. Raises NTIError.
    `finite=False` checks all but finiteness (the Python API edits a diverged inversion, with a warning)."""
    if not isinstance(inv.settings, dict) or not isinstance(inv.source_prompt, str):
        raise NTIError(f"its settings must be a dict and its source_prompt a string; got "
                       f"{type(inv.settings).__name__} and {type(inv.source_prompt).__name__}")
    for name in TENSORS:  # an in-memory Inversion may hold anything: a numpy array, an integer tensor
        tensor = getattr(inv, name)
        if (tensor is not None or name in ("z_T", "z_0")) and not (
                isinstance(tensor, torch.Tensor) and tensor.is_floating_point()):
            kind = f"a {tensor.dtype} tensor" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise NTIError(f"{name} must be a floating-point torch tensor; got {kind}")
    missing = [k for k in SETTING_KEYS if k not in inv.settings]
    if missing:
        raise NTIError(f"settings lack {', '.join(missing)}")
    settings = {k: inv.settings[k] for k in SETTING_KEYS}
    if not all(isinstance(settings[k], int) and not isinstance(settings[k], bool)
               for k in ("steps", "inner_steps")) or not isinstance(settings["steps_offset"], int):
        raise NTIError(f"settings hold a non-integer step count: {settings}")
    try:
        NTIConfig(**settings)  # the same ranges a fresh run is held to (finite guidance, known method, ...)
    except (NTIError, TypeError, ValueError) as err:
        raise NTIError(f"invalid settings: {err}") from None
    steps = settings["steps"]
    if inv.z_T.ndim != 3 or inv.z_0.shape != inv.z_T.shape:
        raise NTIError(f"z_T has shape {tuple(inv.z_T.shape)} and z_0 {tuple(inv.z_0.shape)}; expected two equal "
                       f"(channels, height, width) latents")
    nulls = inv.null_embeddings
    if nulls is not None and (nulls.ndim != 3 or nulls.shape[0] not in (1, steps)):
        raise NTIError(f"null embeddings have shape {tuple(nulls.shape)}, but the inversion records {steps} steps "
                       f"(expected ({steps} or 1, tokens, width))")
    if settings["method"] == "null-text" and (nulls is None or nulls.shape[0] != steps):
        raise NTIError(f"a null-text inversion of {steps} steps needs {steps} null embeddings, found "
                       f"{0 if nulls is None else nulls.shape[0]}")
    if inv.pivots is not None and tuple(inv.pivots.shape) != (steps + 1, *inv.z_T.shape):
        raise NTIError(f"pivots have shape {tuple(inv.pivots.shape)}, expected {(steps + 1, *inv.z_T.shape)}")
    check_method_tensors(settings["method"], inv)
    for name in TENSORS if finite else ():
        tensor = getattr(inv, name)
        if tensor is not None and not torch.isfinite(tensor).all():
            raise NTIError(f"{name} holds non-finite values (NaN or inf)")


def check_method_tensors(method: str, inv: Inversion) -> None:
    """The tensors an inversion holds are what its method keeps (methods.from_pivots): editing reads the tensors, so
    another method's would be edited as that method under this one's name. Raises NTIError."""
    nulls = inv.null_embeddings
    found = "none" if nulls is None else f"{nulls.shape[0]}"
    if method == "negative-prompt" and (nulls is None or nulls.shape[0] != 1):
        raise NTIError(f"a negative-prompt inversion keeps one null embedding (its source prompt's, Miyake et al. "
                       f"2023), found {found}")
    if method in ("ddim", "direct") and nulls is not None:
        raise NTIError(f"a {method} inversion keeps no null embeddings (it edits with the empty prompt's), found "
                       f"{found}")
    if method == "direct" and inv.pivots is None:
        raise NTIError("a direct inversion without its pivots: there are no pivots to put its edits back on")
    # direct inversion's edit starts at z_T and is put back on the pivots, z*_T first (Ju et al. 2023)
    if method == "direct" and not torch.allclose(
            inv.pivots[-1].float(), inv.z_T.float(), rtol=0, atol=0, equal_nan=True):  # a diverged one is still one
        raise NTIError("a direct inversion's z_T must be its last pivot z*_T; they differ")

"""Inversion artifacts: inverted latent + per-step null embeddings + everything that changes the result."""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .config import NTIError

FORMAT_VERSION = 1  # written when the inversion stores no pivots: older readers still load it
FORMAT_VERSION_PIVOTS = 2  # with pivots (direct inversion): older readers refuse it rather than edit without them
READABLE_FORMATS = (FORMAT_VERSION, FORMAT_VERSION_PIVOTS)


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
    null_embeddings: torch.Tensor | None  # (steps, 77, D) fp32 per-step null embeddings (null-text), or (1, 77, D)
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

    @property
    def key(self) -> str:
        return inversion_key(self.image_hash, self.source_prompt, self.model_fingerprint, self.settings)

    def metadata(self) -> dict:
        tensors = ("z_T", "z_0", "null_embeddings", "pivots")
        meta = {k: v for k, v in asdict(self).items() if k not in tensors}
        version = FORMAT_VERSION if self.pivots is None else FORMAT_VERSION_PIVOTS
        return {"format_version": version, "key": self.key, **meta}


def inversion_key(image_hash: str, source_prompt: str, model_fingerprint: str, settings: dict) -> str:
    """Cache key over image pixels, prompt, model and every result-changing setting (not the image path)."""
    blob = json.dumps([image_hash, source_prompt, model_fingerprint, settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def save_inversion(inv: Inversion, path: str | os.PathLike) -> Path:
    """Write PATH (.safetensors: tensors + metadata JSON in the header) and a readable PATH.json beside it."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    data, readable = inversion_bytes(inv)
    write_atomic(path.with_suffix(".json"), readable.encode())
    write_atomic(path, data)  # last: a cache reader only looks for the .safetensors, so it never sees half an entry
    return path


def inversion_bytes(inv: Inversion) -> tuple[bytes, str]:
    """The .safetensors file's bytes and its readable .json twin, as save_inversion writes them (a worker that
    makes an inversion can hand these to whoever writes the file)."""
    tensors = {"z_T": inv.z_T.detach().cpu().float().contiguous(), "z_0": inv.z_0.detach().cpu().float().contiguous()}
    if inv.null_embeddings is not None:
        tensors["null_embeddings"] = inv.null_embeddings.detach().cpu().float().contiguous()
    if inv.pivots is not None:
        tensors["pivots"] = inv.pivots.detach().cpu().float().contiguous()
    meta = json.dumps(inv.metadata(), sort_keys=True)
    return save(tensors, metadata={"nti": meta}), json.dumps(inv.metadata(), indent=2, sort_keys=True)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name beside `path`, then rename: a reader (another worker sharing --cache, a rerun after
    a crash) sees the whole file or none, and two writers of the same entry leave one whole file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_inversion(path: str | os.PathLike) -> Inversion:
    """Read an artifact written by `save_inversion`; clear errors for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise NTIError(f"inversion file {path} does not exist")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise NTIError(f"inversion file {path} is not a readable safetensors file: {err}") from None
    if "nti" not in header or "z_T" not in tensors:
        raise NTIError(f"{path} is a safetensors file but not an nti inversion (no 'nti' metadata)")
    meta = json.loads(header["nti"])
    if meta.get("format_version") not in READABLE_FORMATS:
        raise NTIError(f"{path} has inversion format {meta.get('format_version')}, this engine reads "
                       f"{', '.join(map(str, READABLE_FORMATS))}")
    if meta["settings"].get("method") == "direct" and "pivots" not in tensors:
        raise NTIError(f"{path} is a direct inversion without its pivots; it cannot be edited, invert again")
    fields = {k: meta[k] for k in ("source_prompt", "image_hash", "model_name", "model_fingerprint", "settings",
                                   "versions", "iterations", "losses", "fp32_retries", "timings")}
    return Inversion(z_T=tensors["z_T"], z_0=tensors["z_0"], null_embeddings=tensors.get("null_embeddings"),
                     pivots=tensors.get("pivots"), **fields)

"""Image IO: any PIL-readable file (or a bundled scikit-image photo) to a centred square tensor, and PNG out."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import NTIError

SKIMAGE_PREFIX = "skimage:"  # e.g. "skimage:chelsea": a photo that ships inside scikit-image, needs no download


def load_image(source: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image from a path, 'skimage:NAME', a PIL image or an HxWx3 uint8 array; clear errors otherwise."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, np.ndarray):
        if source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (3, 4)):
            return Image.fromarray(np.ascontiguousarray(source).astype(np.uint8)).convert("RGB")
        raise NTIError(f"image array must be HxW or HxWx3/4, got shape {source.shape}")
    text = str(source)
    if text.startswith(SKIMAGE_PREFIX):
        import skimage.data

        name = text[len(SKIMAGE_PREFIX):]
        loader = getattr(skimage.data, name, None)
        if loader is None or not callable(loader):
            raise NTIError(f"{text}: scikit-image has no bundled image {name!r} (try skimage:chelsea)")
        return load_image(loader())
    path = Path(text).expanduser()
    if not path.exists():
        raise NTIError(f"image {path} does not exist")
    if path.is_dir():
        raise NTIError(f"image {path} is a folder, not an image file")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise NTIError(f"image {path} is not a readable image (corrupt or unsupported format)") from None
    except OSError as err:
        raise NTIError(f"image {path} could not be read: {err}") from None


def center_square(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square and resize to size x size (the notebook's load_512, bicubic)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img if side == size else img.resize((size, size), Image.Resampling.BICUBIC)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) fp32 in [-1, 1] from an RGB image (notebook: x / 127.5 - 1)."""
    array = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """PIL images from (B, 3, H, W) in [0, 1]."""
    array = (images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def pixel_hash(img: Image.Image) -> str:
    """sha256 of the preprocessed RGB pixels and size: the identity of an inversion's input."""
    digest = hashlib.sha256(f"{img.size}".encode())
    digest.update(np.asarray(img.convert("RGB")).tobytes())
    return digest.hexdigest()


def save_png(img: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG, creating parent folders; refuse a non-.png name rather than guess a format."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise NTIError(f"output {path} must end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path

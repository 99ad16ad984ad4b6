"""Edit-quality metrics: SSIM / PSNR / MSE (optionally on the unedited background), CLIP similarity, LPIPS.

Conventions: images are PIL images or HxW(x3/4) arrays (uint8 in [0, 255] or float in [0, 1]); the second image
is resized to the first's size when they differ; a mask is HxW bool with True = edited region, so the
"background" variants average over pixels where the mask is False. No function here touches the network.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2gray
from skimage.metrics import mean_squared_error, structural_similarity
from skimage.transform import resize

from .config import NTIError

log = logging.getLogger("nti")

CLIP_SKIPPED = "CLIP metrics skipped: no local CLIP model; pass --clip PATH to a transformers CLIP folder"
LPIPS_SKIPPED = "LPIPS skipped: needs the lpips package and its backbone weights in the local torch hub cache"
_SSIM_WINDOW = 7  # skimage's default window; its mean SSIM drops a (7 - 1) // 2 pixel border, bg SSIM does too


def to_array(image) -> np.ndarray:
    """HxWx3 float64 RGB in [0, 1] from a PIL image or an HxW / HxWx3 / HxWx4 uint8 or [0, 1] float array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise NTIError(f"image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise NTIError(f"image array must be uint8 or numeric in [0, 1], got dtype {array.dtype}")
    array = array.astype(np.float64)
    if array.size and (array.min() < -1e-6 or array.max() > 1 + 1e-6):
        # a float image in [0, 255] or [-1, 1] would silently give wrong PSNR; make the caller say what it means
        raise NTIError(f"non-uint8 image values must lie in [0, 1], got [{array.min():.3g}, {array.max():.3g}]")
    return np.clip(array, 0.0, 1.0)


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Both images as [0, 1] RGB arrays, the second resized (anti-aliased) to the first's size if they differ."""
    a, b = to_array(a), to_array(b)
    if a.shape != b.shape:
        b = resize(b, a.shape, order=1, anti_aliasing=True, preserve_range=True)
    return a, b


def _background(mask, shape: tuple[int, int]) -> np.ndarray:
    """HxW bool of the background (mask False), the mask resized nearest-neighbour to the image if needed."""
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise NTIError(f"mask must be HxW, got shape {mask.shape}")
    mask = mask.astype(bool)
    if mask.shape != tuple(shape):
        mask = np.asarray(Image.fromarray(mask).resize((shape[1], shape[0]), Image.Resampling.NEAREST))
    return ~mask


def ssim(a, b, mask=None) -> float:
    """Grayscale SSIM, data_range 1 (the seed report's Algorithm 1); with a mask, the SSIM map's background mean."""
    a, b = _pair(a, b)
    gray_a, gray_b = rgb2gray(a), rgb2gray(b)
    if mask is None:
        return float(structural_similarity(gray_a, gray_b, data_range=1.0, win_size=_SSIM_WINDOW))
    _, ssim_map = structural_similarity(gray_a, gray_b, data_range=1.0, win_size=_SSIM_WINDOW, full=True)
    keep = _background(mask, gray_a.shape)
    # skimage averages the map without its border (the window is reflect-padded there); drop it here too so an
    # all-False mask gives exactly the unmasked SSIM
    pad = (_SSIM_WINDOW - 1) // 2
    interior = np.zeros_like(keep)
    interior[pad:keep.shape[0] - pad, pad:keep.shape[1] - pad] = True
    keep &= interior
    return float(ssim_map[keep].mean()) if keep.any() else math.nan


def clear_of(mask) -> np.ndarray:
    """The mask grown by a whole SSIM window: no window centred outside it sees a masked pixel."""
    return ndimage.binary_dilation(np.asarray(mask, bool), structure=np.ones((_SSIM_WINDOW, _SSIM_WINDOW), bool))


def mse(a, b, mask=None) -> float:
    """Mean squared error of [0, 1] RGB; with a mask, over background pixels (all three channels)."""
    a, b = _pair(a, b)
    if mask is None:
        return float(mean_squared_error(a, b))
    keep = _background(mask, a.shape[:2])
    return float(((a - b)[keep] ** 2).mean()) if keep.any() else math.nan


def psnr(a, b, mask=None) -> float:
    """PSNR in dB of [0, 1] RGB, 10 log10(1 / MSE); identical images (MSE 0) give math.inf."""
    error = mse(a, b, mask)
    if math.isnan(error):
        return math.nan
    return math.inf if error == 0.0 else 10.0 * math.log10(1.0 / error)


class ClipScorer:
    """CLIP similarities (the seed report's Algorithm 2) from a local transformers CLIP folder, raw cosine in [-1, 1].

    Scores are the plain cosine of L2-normalized projected embeddings, NOT the x100 "CLIPScore" scale.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.path = Path(path)
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(str(self.path), local_files_only=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(str(self.path), local_files_only=True)
        self.max_length = min(int(self.tokenizer.model_max_length),
                              int(self.model.config.text_config.max_position_embeddings))

    @staticmethod
    def _projected(output):
        """The projected embedding: a tensor in transformers 4.x, a ModelOutput's pooler_output in 5.x."""
        import torch

        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def text_embeddings(self, texts: list[str]):
        """(N, D) L2-normalized text embeddings."""
        import torch

        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        with torch.inference_mode():
            features = self._projected(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                                    attention_mask=tokens["attention_mask"]))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def image_embeddings(self, images: list):
        """(N, D) L2-normalized image embeddings of PIL images or arrays (see to_array)."""
        import torch

        pil = [image.convert("RGB") if isinstance(image, Image.Image)
               else Image.fromarray((to_array(image) * 255).round().astype(np.uint8)) for image in images]
        pixels = self.image_processor(images=pil, return_tensors="pt")["pixel_values"].to(self.device)
        with torch.inference_mode():
            features = self._projected(self.model.get_image_features(pixel_values=pixels))
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def text_image_batch(self, images: list, texts: list[str]) -> list[float]:
        """Pairwise cosine(image_i, text_i) for equal-length lists."""
        if len(images) != len(texts):
            raise NTIError(f"text_image_batch needs as many texts as images, got {len(texts)} and {len(images)}")
        if not images:
            return []
        return (self.image_embeddings(images) * self.text_embeddings(texts)).sum(-1).tolist()

    def image_image_batch(self, images_a: list, images_b: list) -> list[float]:
        """Pairwise cosine(a_i, b_i) for equal-length lists, both embedded in one batch."""
        if len(images_a) != len(images_b):
            raise NTIError(f"image_image_batch needs equal-length lists, got {len(images_a)} and {len(images_b)}")
        if not images_a:
            return []
        embeddings = self.image_embeddings(list(images_a) + list(images_b))
        count = len(images_a)
        return (embeddings[:count] * embeddings[count:]).sum(-1).tolist()

    def text_image(self, image, text: str) -> float:
        """Cosine of the image and text embeddings (CLIP-T; raw, not x100)."""
        return self.text_image_batch([image], [text])[0]

    def image_image(self, a, b) -> float:
        """Cosine of two image embeddings (CLIP-I; raw, not x100)."""
        return self.image_image_batch([a], [b])[0]


def _clip_folder_problem(path: Path) -> str | None:
    """Why a folder cannot be a transformers CLIPModel folder, or None if it looks complete."""
    if not path.is_dir():
        return f"{path} is not a folder"
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        return f"{path} has no config.json"
    except (OSError, ValueError) as err:
        return f"{path}/config.json is unreadable ({err})"
    if config.get("model_type") != "clip":
        return f"{path} holds a {config.get('model_type')!r} model, not a full CLIPModel (model_type 'clip')"
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((path / name).is_file() for name in weights):
        return f"{path} has no weights ({' / '.join(weights)})"
    has_bpe_files = (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    if not ((path / "tokenizer.json").is_file() or has_bpe_files):
        return f"{path} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)"
    if not (path / "preprocessor_config.json").is_file():
        return f"{path} has no preprocessor_config.json (the image processor)"
    return None


def load_clip_scorer(path: str | os.PathLike | None, device: str = "cpu") -> ClipScorer | None:
    """A ClipScorer from a local folder, or None with one warning when there is none (never the network)."""
    if path is None or str(path) == "":
        log.warning(CLIP_SKIPPED)
        return None
    folder = Path(path).expanduser()
    problem = _clip_folder_problem(folder)
    if problem is None:
        try:
            return ClipScorer(folder, device=device)
        except (OSError, ValueError, KeyError) as err:
            problem = f"loading {folder} failed: {type(err).__name__}: {err}"
    log.warning("%s (%s)", CLIP_SKIPPED, problem)
    return None


_lpips_models: dict = {}
_lpips_warned = False


def _lpips_model(net: str):
    """A cached lpips.LPIPS model when the package and its torchvision backbone weights are local, else None."""
    global _lpips_warned
    if net in _lpips_models:
        return _lpips_models[net]
    model = None
    reason = None
    try:
        import lpips  # optional: not a dependency
        import torch
    except ImportError:
        reason = "the lpips package is not installed"
    else:
        # LPIPS builds on a pretrained torchvision backbone that torchvision would download; only proceed if it is
        # already in the torch hub cache
        prefix = {"alex": "alexnet-", "vgg": "vgg16-", "squeeze": "squeezenet1_1-"}.get(net)
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        cached = prefix is not None and checkpoints.is_dir() and any(p.name.startswith(prefix)
                                                                      for p in checkpoints.iterdir())
        if not cached:
            reason = f"no {net} backbone weights in {checkpoints}"
        else:
            try:
                model = lpips.LPIPS(net=net, verbose=False).eval()
            except Exception as err:  # lpips raises whatever its loaders raise; any failure means "unavailable"
                reason = f"{type(err).__name__}: {err}"
    if model is None and not _lpips_warned:
        log.warning("%s (%s)", LPIPS_SKIPPED, reason)
        _lpips_warned = True
    _lpips_models[net] = model
    return model


def lpips_distance(a, b, net: str = "alex") -> float | None:
    """LPIPS distance (lower = closer) when lpips and its weights are local; None and one warning otherwise."""
    model = _lpips_model(net)
    if model is None:
        return None
    import torch

    a, b = _pair(a, b)
    batch = torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2).float() * 2 - 1  # lpips expects [-1, 1]
    with torch.inference_mode():
        return float(model(batch[:1], batch[1:]).item())


def compute_metrics(source, output, target_prompt: str | None = None, mask=None, clip: ClipScorer | None = None,
                    lpips: bool = True) -> dict:
    """Flat dict of every available metric: ssim/psnr/mse; bg_* given a mask; clip_* given a scorer; lpips if local."""
    source_array, output_array = _pair(source, output)
    metrics = {
        "ssim": ssim(source_array, output_array),
        "psnr": psnr(source_array, output_array),
        "mse": mse(source_array, output_array),
    }
    if mask is not None:
        metrics["bg_ssim"] = ssim(source_array, output_array, mask)
        metrics["bg_psnr"] = psnr(source_array, output_array, mask)
        metrics["bg_mse"] = mse(source_array, output_array, mask)
    if lpips:
        distance = lpips_distance(source_array, output_array)
        if distance is not None:
            metrics["lpips"] = distance
    if clip is not None:
        metrics["clip_image"] = clip.image_image(source, output)
        if target_prompt:
            metrics["clip_text"] = clip.text_image(output, target_prompt)
    return metrics

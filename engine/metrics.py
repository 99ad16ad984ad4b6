"""Edit-quality metrics of two protocols: the seed report's and PIE-Bench's (PnPInversion's evaluation code).

Seed report (`seed_scores`): SSIM as its Algorithm 1 defines it (`ssim_global`: one SSIM from the whole grayscale
image's means, variances and covariance) next to skimage's 7x7 windowed SSIM (`ssim_windowed`), PSNR / MSE, CLIP
cosines (Algorithm 2), and background variants averaged over background pixels only.
PIE-Bench (`pie_scores`): its own definitions, from cure-lab/PnPInversion evaluation/matrics_calculator.py and
evaluate.py: the edit mask with the 1-pixel image border marked edited; background PSNR / MSE / SSIM / LPIPS on
both images with the edited region zeroed, averaged over the whole image; RGB SSIM with an 11x11 Gaussian window;
LPIPS on SqueezeNet; CLIP score 100 * max(cos, 0) of the whole image and of the edited region alone; DINO ViT-B/8
structure distance.

Conventions: images are PIL images or HxW(x3/4) arrays (uint8 in [0, 255] or float in [0, 1]); the second image
is resized to the first's size when they differ; a mask is HxW bool with True = edited region. Model weights
(CLIP, LPIPS's SqueezeNet, DINO) come only from local folders; nothing here touches the network.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
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
PIE_LPIPS_SKIPPED = ("PIE-Bench LPIPS skipped: no SqueezeNet weights; pass --lpips DIR to a folder holding "
                     "torchvision's squeezenet1_1-b8a52dc0.pth (and LPIPS's squeeze.pth unless torchmetrics is "
                     "installed)")
DINO_SKIPPED = ("PIE-Bench structure distance skipped: no DINO model; pass --dino PATH to a local transformers "
                "DINO ViT-B/8 folder (facebook/dino-vitb8)")
_SSIM_WINDOW = 7  # skimage's default window; its mean SSIM drops a (7 - 1) // 2 pixel border, bg SSIM does too
_SSIM_C1, _SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # Wang et al. 2004: (K1 L)^2, (K2 L)^2 with K1 0.01, K2 0.03, L = 1


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


def ssim_global(a, b, mask=None) -> float:
    """The seed report's SSIM (its Algorithm 1): one SSIM of whole grayscale images, not a mean of windows.

    Wang et al. 2004, Eq. 13 with the window grown to the whole image: means, (population) variances and covariance
    of all pixels (of the background, mask False, given a mask); grayscale = skimage's rgb2gray (ITU-R 709 luma),
    data range 1; the second image is resized to the first's size.
    """
    a, b = _pair(a, b)
    x, y = rgb2gray(a), rgb2gray(b)
    if mask is not None:
        keep = _background(mask, x.shape)
        if not keep.any():
            return math.nan
        x, y = x[keep], y[keep]
    mean_x, mean_y = x.mean(), y.mean()
    var_x, var_y = x.var(), y.var()
    cov = ((x - mean_x) * (y - mean_y)).mean()
    return float((2 * mean_x * mean_y + _SSIM_C1) * (2 * cov + _SSIM_C2)
                 / ((mean_x ** 2 + mean_y ** 2 + _SSIM_C1) * (var_x + var_y + _SSIM_C2)))


def ssim_windowed(a, b, mask=None) -> float:
    """Mean of skimage's 7x7 uniform-window grayscale SSIM map, data range 1; with a mask, the map's background mean.

    Not the seed report's Algorithm 1 (that is `ssim_global`) nor PIE-Bench's (`pie_ssim`: RGB, 11x11 Gaussian).
    """
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


ssim = ssim_windowed  # the name older callers (benchmarks/bench_testbed.py) use; it always meant the windowed SSIM


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


def _pil_image_processor() -> dict:
    """AutoImageProcessor's arguments for the PIL one (PIL bicubic resize), which PnPInversion's CLIP scores used:
    transformers 5 otherwise takes the torchvision backend whenever torchvision imports (torch's bicubic, other
    pixels), and late 4.x its "fast" processor when asked."""
    import transformers

    return {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}


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
        self.image_processor = AutoImageProcessor.from_pretrained(str(self.path), local_files_only=True,
                                                                  **_pil_image_processor())
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


def _unusable(flag: str, path, problem: str, skipped: str) -> None:
    """A model folder that cannot serve: NTIError when the user named it (a typo must not cost a long run its
    metric), one warning that the metric is skipped when it was only the default place to look."""
    if path is not None and str(path) != "":
        raise NTIError(f"{flag} {path}: {problem}")
    log.warning("%s (%s)", skipped, problem)


def load_clip_scorer(path: str | os.PathLike | None, device: str = "cpu") -> ClipScorer | None:
    """A ClipScorer from a local folder (never the network); None with one warning when no folder is given,
    NTIError when the given one does not hold a usable CLIP model."""
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
    _unusable("--clip", path, problem, CLIP_SKIPPED)
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


@dataclass
class SeedScores:
    """One output scored against its source as the seed report does (plus what the project adds); None = skipped."""

    ssim_global: float  # the seed report's Algorithm 1 (ssim_global)
    ssim_windowed: float  # skimage's 7x7 windowed grayscale SSIM (ssim_windowed)
    psnr: float
    mse: float
    lpips: float | None = None  # lpips package, AlexNet, whole image (when installed with its weights cached)
    clip_image: float | None = None  # CLIP-I: raw cosine of the two images (Algorithm 2)
    clip_text: float | None = None  # CLIP-T: raw cosine of the output and the prompt
    bg_ssim_windowed: float | None = None  # given a mask: over background pixels only
    bg_psnr: float | None = None
    bg_mse: float | None = None


def seed_scores(source, output, prompt: str | None = None, mask=None, clip: ClipScorer | None = None,
                lpips: bool = True) -> SeedScores:
    """Every seed-report score of output vs source: SSIM (global and windowed), PSNR, MSE; bg_* given a mask;
    CLIP-I / CLIP-T given a scorer; LPIPS when the lpips package and its weights are local."""
    source_array, output_array = _pair(source, output)
    scores = SeedScores(ssim_global=ssim_global(source_array, output_array),
                        ssim_windowed=ssim_windowed(source_array, output_array),
                        psnr=psnr(source_array, output_array), mse=mse(source_array, output_array))
    if mask is not None:
        scores.bg_ssim_windowed = ssim_windowed(source_array, output_array, mask)
        scores.bg_psnr = psnr(source_array, output_array, mask)
        scores.bg_mse = mse(source_array, output_array, mask)
    if lpips:
        scores.lpips = lpips_distance(source_array, output_array)
    if clip is not None:
        scores.clip_image = clip.image_image(source, output)
        if prompt:
            scores.clip_text = clip.text_image(output, prompt)
    return scores


# --- PIE-Bench (Ju et al. 2024, PnP Inversion; cure-lab/PnPInversion evaluation/) --------------------------------


def pie_edit_mask(mask, shape: tuple[int, int]) -> np.ndarray:
    """PIE-Bench's edit mask at the image's size: resized nearest-neighbour, then the 1-pixel image border marked
    edited (evaluate.py's mask_decode does this "to avoid annotation errors in boundary")."""
    edited = ~_background(mask, shape)
    edited[0, :] = edited[-1, :] = edited[:, 0] = edited[:, -1] = True
    return edited


def _pie_tensors(a, b, keep: np.ndarray | None = None):
    """Both images as (1, 3, H, W) float32 in [0, 1] (PnPInversion's arrays / 255), zeroed where keep is False."""
    import torch

    a, b = _pair(a, b)
    if keep is not None:
        a, b = a * keep[..., None], b * keep[..., None]
    return (torch.from_numpy(np.asarray(x, dtype=np.float32)).permute(2, 0, 1)[None].contiguous() for x in (a, b))


def _pie_background(a, mask) -> np.ndarray | None:
    """Where PIE-Bench's background metrics keep pixels (not edited, border included in the edit); None = no mask."""
    return None if mask is None else ~pie_edit_mask(mask, to_array(a).shape[:2])


def pie_psnr(a, b, mask=None) -> float:
    """PIE-Bench PSNR (torchmetrics PeakSignalNoiseRatio, data range 1) of RGB in [0, 1]; given a mask, both images
    with the edited region zeroed and the error averaged over the whole image ("psnr_unedit_part")."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    keep = _pie_background(a, mask)
    if keep is not None and not keep.any():
        return math.nan
    x, y = _pie_tensors(a, b, keep)
    return float(peak_signal_noise_ratio(x, y, data_range=1.0))


def pie_mse(a, b, mask=None) -> float:
    """PIE-Bench MSE (torchmetrics MeanSquaredError) of RGB in [0, 1]; given a mask, as pie_psnr ("mse_unedit_part")."""
    from torchmetrics.functional import mean_squared_error

    keep = _pie_background(a, mask)
    if keep is not None and not keep.any():
        return math.nan
    x, y = _pie_tensors(a, b, keep)
    return float(mean_squared_error(x, y))


PIE_SSIM_PAD = 5  # (11 - 1) // 2: the 11x11 Gaussian window (sigma 1.5) of torchmetrics' SSIM


def pie_ssim(a, b, mask=None) -> float:
    """PIE-Bench SSIM: torchmetrics StructuralSimilarityIndexMeasure (RGB, 11x11 Gaussian window, sigma 1.5, data
    range 1) as of 2023, the mean of the map over pixels whose window lies inside the image; given a mask, as
    pie_psnr ("ssim_unedit_part")."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    keep = _pie_background(a, mask)
    if keep is not None and not keep.any():
        return math.nan
    x, y = _pie_tensors(a, b, keep)
    _, ssim_map = structural_similarity_index_measure(x, y, data_range=1.0, return_full_image=True)
    # torchmetrics < 1.5 (what PnPInversion ran) averaged only this interior; 1.5+ (PR 2721) averages the whole
    # reflect-padded map, which moves the numbers; crop to reproduce the published ones
    pad = PIE_SSIM_PAD
    return float(ssim_map[..., pad:-pad, pad:-pad].mean())


def pie_clip_score(clip: ClipScorer, image, text: str, mask=None) -> float:
    """PIE-Bench CLIP score (torchmetrics CLIPScore): 100 * max(cos(image, text), 0); given a mask, the image with
    everything outside the edited region (border included, as pie_edit_mask) blacked out."""
    if mask is not None:
        edited = pie_edit_mask(mask, to_array(image).shape[:2])
        if not edited.any():
            return math.nan
        # PnPInversion multiplies the uint8 image by the 0/1 mask: exact in uint8, so do it there too
        image = np.asarray(Image.fromarray((to_array(image) * 255).round().astype(np.uint8))) * edited[..., None]
    return 100.0 * max(clip.text_image(image, text), 0.0)


LPIPS_NORM_EPS = 1e-10  # LPIPS's normalize_tensor, added after the square root


class SqueezeLpips:
    """LPIPS v0.1 on SqueezeNet 1.1 (Zhang et al. 2018; torchmetrics LearnedPerceptualImagePatchSimilarity with
    net_type='squeeze', which PIE-Bench uses), written out so that no torchvision is needed: the backbone's
    torchvision state dict and LPIPS's linear heads load from local files."""

    # LPIPS taps SqueezeNet 1.1's features after these modules (torchvision indices): relu1 ... relu7
    TAPS = (1, 4, 7, 9, 10, 11, 12)
    CHANNELS = (64, 128, 256, 384, 384, 512, 512)
    SHIFT = (-0.030, -0.088, -0.188)  # LPIPS's ScalingLayer: inputs in [-1, 1] to the backbone's ImageNet range
    SCALE = (0.458, 0.448, 0.450)

    def __init__(self, backbone: dict, heads: dict, device: str = "cpu", path: str | os.PathLike | None = None):
        import torch

        self.path = path  # the backbone's file, for the run's record
        self.device = torch.device(device)
        self.features = _squeezenet_features().to(self.device).eval()
        state = {k.removeprefix("features."): v for k, v in backbone.items() if k.startswith("features.")}
        self.features.load_state_dict(state)
        # heads: 1x1 convolutions without bias, "lin{k}.model.1.weight" in LPIPS's squeeze.pth (model.0 is dropout)
        self.heads = [heads[f"lin{k}.model.1.weight"].float().to(self.device) for k in range(len(self.TAPS))]
        for k, (head, channels) in enumerate(zip(self.heads, self.CHANNELS)):
            if tuple(head.shape) != (1, channels, 1, 1):
                raise ValueError(f"LPIPS head lin{k} has shape {tuple(head.shape)}, expected (1, {channels}, 1, 1)")
        self.shift = torch.tensor(self.SHIFT, device=self.device).view(1, 3, 1, 1)
        self.scale = torch.tensor(self.SCALE, device=self.device).view(1, 3, 1, 1)

    def _taps(self, x):
        taps = []
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self.TAPS:
                taps.append(x)
        return taps

    def __call__(self, x0, x1) -> float:
        """LPIPS distance of two (1, 3, H, W) images in [-1, 1]."""
        import torch

        with torch.inference_mode():
            taps0 = self._taps((x0.to(self.device) - self.shift) / self.scale)
            taps1 = self._taps((x1.to(self.device) - self.shift) / self.scale)
            total = 0.0
            for f0, f1, head in zip(taps0, taps1, self.heads):
                # unit-normalize each position's channel vector as LPIPS and torchmetrics < 1.2.1 (PnPInversion's)
                # did: x / (|x| + 1e-10); torchmetrics 1.2.1+ (PR 2144) takes x / sqrt(1e-8 + |x|^2), which shrinks
                # vectors of norm below ~1e-4 instead of making them unit vectors
                f0 = f0 / (torch.sqrt((f0 ** 2).sum(1, keepdim=True)) + LPIPS_NORM_EPS)
                f1 = f1 / (torch.sqrt((f1 ** 2).sum(1, keepdim=True)) + LPIPS_NORM_EPS)
                total = total + torch.nn.functional.conv2d((f0 - f1) ** 2, head).mean()
        return float(total)


def _squeezenet_features():
    """torchvision's squeezenet1_1().features, module for module, so its state dict loads unchanged."""
    import torch
    from torch import nn

    class Fire(nn.Module):
        def __init__(self, inplanes: int, squeeze: int, expand: int):
            super().__init__()
            self.squeeze = nn.Conv2d(inplanes, squeeze, 1)
            self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
            self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

        def forward(self, x):
            x = torch.relu(self.squeeze(x))
            return torch.cat([torch.relu(self.expand1x1(x)), torch.relu(self.expand3x3(x))], 1)

    def pool():
        return nn.MaxPool2d(3, stride=2, ceil_mode=True)

    return nn.Sequential(nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), pool(), Fire(64, 16, 64), Fire(128, 16, 64),
                         pool(), Fire(128, 32, 128), Fire(256, 32, 128), pool(), Fire(256, 48, 192),
                         Fire(384, 48, 192), Fire(384, 64, 256), Fire(512, 64, 256))


def _lpips_heads_file(folder: Path) -> Path | None:
    """LPIPS's SqueezeNet heads: squeeze.pth in the folder, else the copy torchmetrics ships (local, no download)."""
    if (folder / "squeeze.pth").is_file():
        return folder / "squeeze.pth"
    try:
        import torchmetrics
    except ImportError:
        return None
    shipped = Path(torchmetrics.__file__).parent / "functional" / "image" / "lpips_models" / "squeeze.pth"
    return shipped if shipped.is_file() else None


def load_pie_lpips(path: str | os.PathLike | None, device: str = "cpu") -> SqueezeLpips | None:
    """SqueezeLpips from a local folder (default: the torch hub cache, where torchvision keeps its weights); None
    with one warning saying what to pass when the default holds none, NTIError when a given folder does not."""
    import torch

    folder = Path(path).expanduser() if path else Path(torch.hub.get_dir()) / "checkpoints"
    backbones = sorted(folder.glob("squeezenet1_1*.pth")) if folder.is_dir() else []
    heads = _lpips_heads_file(folder)
    if not backbones:
        problem = f"no squeezenet1_1*.pth in {folder}"
    elif heads is None:
        problem = f"no squeeze.pth (LPIPS's heads) in {folder}, and torchmetrics is not installed"
    else:
        try:
            return SqueezeLpips(torch.load(backbones[0], map_location="cpu", weights_only=True),
                                torch.load(heads, map_location="cpu", weights_only=True), device, backbones[0])
        except (OSError, RuntimeError, KeyError, ValueError) as err:
            problem = f"loading {backbones[0]} / {heads} failed: {type(err).__name__}: {err}"
    _unusable("--lpips", path, problem, PIE_LPIPS_SKIPPED)
    return None


def pie_lpips(lpips: SqueezeLpips, a, b, mask=None) -> float:
    """PIE-Bench LPIPS (SqueezeNet) of RGB in [0, 1] mapped to [-1, 1]; given a mask, both images with the edited
    region zeroed ("lpips_unedit_part")."""
    keep = _pie_background(a, mask)
    if keep is not None and not keep.any():
        return math.nan
    x, y = _pie_tensors(a, b, keep)
    return lpips(x * 2 - 1, y * 2 - 1)


DINO_SIZE, DINO_MAX_SIZE = 224, 480  # PnPInversion's Resize(224, max_size=480) before DINO
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DINO_LAYER_NORM_EPS = 1e-6  # DINO's own LayerNorms; transformers' converted DINO configs say 1e-12


class DinoStructure:
    """PIE-Bench structure distance (after Tumanyan et al. 2022, Splice): the MSE between the cosine
    self-similarity matrices of the last ViT block's attention keys (all tokens, heads concatenated) of two images,
    on DINO ViT-B/8 (PnPInversion matrics_calculator.py, LossG.calculate_global_ssim_loss)."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        import torch
        from transformers import ViTModel

        self.path = Path(path)
        self.device = torch.device(device)
        self.model = ViTModel.from_pretrained(str(self.path), local_files_only=True, add_pooling_layer=False,
                                              layer_norm_eps=DINO_LAYER_NORM_EPS).to(self.device).eval()
        self.keys = _last_key_projection(self.model)

    def self_similarity(self, image):
        """(T, T) cosine similarities of the last block's keys, T = 1 + patches (the CLS token included)."""
        import torch

        pixels = dino_input(image).to(self.device)
        captured = []
        handle = self.keys.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            with torch.inference_mode():
                size = self.model.config.image_size
                self.model(pixel_values=pixels, interpolate_pos_encoding=tuple(pixels.shape[-2:]) != (size, size))
        finally:
            handle.remove()
        keys = captured[-1][0].float()  # (T, heads * head_dim): DINO's qkv keys with the heads side by side
        norms = keys.norm(dim=-1, keepdim=True)
        return (keys @ keys.T) / (norms @ norms.T).clamp_min(1e-8)

    def __call__(self, a, b) -> float:
        a, b = _pair(a, b)
        return float(((self.self_similarity(a) - self.self_similarity(b)) ** 2).mean())


def _last_key_projection(model):
    """The key projection of a transformers ViTModel's last block (transformers 4.x and 5.x name it differently)."""
    layers = model.layers if hasattr(model, "layers") else model.encoder.layer
    attention = layers[-1].attention
    return attention.k_proj if hasattr(attention, "k_proj") else attention.attention.key


def dino_input(image):
    """(1, 3, h, w) DINO input as PnPInversion makes it: pixel values in [0, 255] (not [0, 1]: its
    calculate_structure_distance skips the / 255, and the published numbers carry that), shorter side resized to
    224 (longer at most 480) bilinearly without antialiasing (torchvision 0.13 Resize on tensors), then ImageNet
    mean / std normalization."""
    import torch

    pixels = torch.from_numpy(np.ascontiguousarray(to_array(image) * 255.0, dtype=np.float32)).permute(2, 0, 1)[None]
    height, width = pixels.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_short, new_long = DINO_SIZE, int(DINO_SIZE * long / short)
    if new_long > DINO_MAX_SIZE:
        new_short, new_long = int(DINO_MAX_SIZE * new_short / new_long), DINO_MAX_SIZE
    size = (new_short, new_long) if height <= width else (new_long, new_short)
    if size != (height, width):
        pixels = torch.nn.functional.interpolate(pixels, size=size, mode="bilinear", align_corners=False,
                                                 antialias=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def load_dino(path: str | os.PathLike | None, device: str = "cpu") -> DinoStructure | None:
    """DinoStructure from a local transformers ViT folder; None with one warning saying what to pass when no folder
    is given, NTIError when the given one does not hold a ViT."""
    if path is None or str(path) == "":
        log.warning(DINO_SKIPPED)
        return None
    folder = Path(path).expanduser()
    problem = None
    try:
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "vit":
            problem = f"{folder} holds a {config.get('model_type')!r} model, not a ViT (model_type 'vit')"
    except (OSError, ValueError) as err:
        problem = f"{folder}/config.json is missing or unreadable ({type(err).__name__})"
    if problem is None:
        try:
            return DinoStructure(folder, device=device)
        except (OSError, ValueError, KeyError) as err:
            problem = f"loading {folder} failed: {type(err).__name__}: {err}"
    _unusable("--dino", path, problem, DINO_SKIPPED)
    return None


@dataclass
class PieModels:
    """The learned parts of PIE-Bench's metrics, each None (and its metric skipped) when not given locally."""

    clip: ClipScorer | None = None
    lpips: SqueezeLpips | None = None
    dino: DinoStructure | None = None


@dataclass
class PieScores:
    """One output scored against its source as PIE-Bench does (Table 1 of the PnP Inversion paper); None = skipped
    (no model, or no mask for the mask-based ones), NaN = the mask leaves nothing to score."""

    structure_distance: float | None = None  # whole image (DINO)
    bg_psnr: float | None = None  # background: edited region (+ border) zeroed in both images, whole-image mean
    bg_lpips: float | None = None
    bg_mse: float | None = None
    bg_ssim: float | None = None
    clip_whole: float | None = None  # 100 * max(cos, 0) of the output and the prompt
    clip_edited: float | None = None  # the same, outside the edited region blacked out


def pie_scores(source, output, prompt: str | None, mask, models: PieModels) -> PieScores:
    """Every PIE-Bench score of output vs source (PnPInversion evaluation/evaluate.py's default metrics, with the
    target prompt for the CLIP ones) that the data (a mask) and the local models allow."""
    source_array, output_array = _pair(source, output)
    scores = PieScores()
    if models.dino is not None:
        scores.structure_distance = models.dino(source_array, output_array)
    if mask is not None:
        scores.bg_psnr = pie_psnr(source_array, output_array, mask)
        scores.bg_mse = pie_mse(source_array, output_array, mask)
        scores.bg_ssim = pie_ssim(source_array, output_array, mask)
        if models.lpips is not None:
            scores.bg_lpips = pie_lpips(models.lpips, source_array, output_array, mask)
    if models.clip is not None and prompt:
        scores.clip_whole = pie_clip_score(models.clip, output_array, prompt)
        if mask is not None:
            scores.clip_edited = pie_clip_score(models.clip, output_array, prompt, mask)
    return scores

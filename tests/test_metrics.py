"""Metrics against hand-computed values and independent computations: the seed report's global SSIM against its
formula, PIE-Bench's metrics (PnPInversion's definitions) against numpy / functional torch written here on image
pairs and masks in PIE-Bench format, CLIP / LPIPS / DINO on tiny random models saved to folders."""
import json
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from nti.config import NTIError
from nti.metrics import (CLIP_SKIPPED, DINO_SKIPPED, PIE_LPIPS_SKIPPED, ClipScorer, PieModels, SeedScores,
                            load_clip_scorer, load_dino, load_pie_lpips, lpips_distance, mse, pie_clip_score,
                            pie_edit_mask, pie_lpips, pie_mse, pie_psnr, pie_scores, pie_ssim, psnr, seed_scores,
                            ssim_global, ssim_windowed, to_array)


@pytest.fixture(scope="module")
def photo():
    """A 64x64 RGB crop of scikit-image's cat, as uint8."""
    import skimage.data
    return skimage.data.chelsea()[100:164, 200:264].copy()


def test_to_array_scales_and_validates(photo):
    assert to_array(photo).dtype == np.float64 and to_array(photo).max() <= 1.0
    np.testing.assert_allclose(to_array(Image.fromarray(photo)), photo / 255.0)
    assert to_array(photo[..., 0]).shape == (64, 64, 3)  # grayscale is repeated to three channels
    with pytest.raises(NTIError, match=r"\[0, 1\]"):
        to_array(photo.astype(np.float32))  # float in [0, 255] would give wrong PSNR silently
    with pytest.raises(NTIError, match="shape"):
        to_array(np.zeros((4, 4, 2)))


def test_identical_images_are_perfect(photo):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero warning on the way to inf
        assert ssim_windowed(photo, photo) == pytest.approx(1.0)
        assert psnr(photo, photo) == math.inf
        assert mse(photo, photo) == 0.0


def test_constant_shift_gives_hand_computed_mse_and_psnr():
    base = np.full((32, 32, 3), 0.25)
    shifted = base + 0.1
    assert mse(base, shifted) == pytest.approx(0.01, abs=1e-12)
    assert psnr(base, shifted) == pytest.approx(20.0, abs=1e-9)  # 10 log10(1 / 0.01)
    # uint8: a shift of 51 levels = 0.2 -> MSE 0.04, PSNR 10 log10(25)
    a = np.full((16, 16, 3), 100, np.uint8)
    assert psnr(a, a + 51) == pytest.approx(10 * math.log10(25), abs=1e-9)


def test_ssim_windowed_is_grayscale_skimage_with_explicit_range(photo):
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    noisy = np.clip(photo / 255.0 + np.random.default_rng(0).normal(0, 0.05, photo.shape), 0, 1)
    expected = structural_similarity(rgb2gray(photo / 255.0), rgb2gray(noisy), data_range=1.0)
    assert ssim_windowed(photo, noisy) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < ssim_windowed(photo, noisy) < 1.0


def test_second_image_is_resized_to_the_first(photo):
    big = Image.fromarray(photo).resize((128, 128), Image.Resampling.BICUBIC)
    assert ssim_windowed(photo, big) > 0.9
    assert psnr(photo, big) > 25
    with pytest.raises(NTIError):
        ssim_windowed(photo, np.zeros((64, 64, 2)))


def test_masked_metrics_ignore_the_edited_region(photo):
    mask = np.zeros(photo.shape[:2], bool)
    mask[16:48, 16:48] = True  # the "edited" region
    edited = photo.copy()
    edited[mask] = 255 - edited[mask]
    # background untouched -> bg MSE 0, bg PSNR inf; unmasked metrics see the edit
    assert mse(photo, edited, mask) == 0.0 and psnr(photo, edited, mask) == math.inf
    assert mse(photo, edited) > 0 and psnr(photo, edited) < 30
    # SSIM windows straddling the mask edge still see the edit, so bg SSIM is high but not 1; far above full SSIM
    assert ssim_windowed(photo, edited, mask) > ssim_windowed(photo, edited) + 0.1
    # an empty mask is the unmasked metric exactly (same border handling as skimage's mean)
    empty = np.zeros_like(mask)
    assert ssim_windowed(photo, edited, empty) == pytest.approx(ssim_windowed(photo, edited), abs=1e-12)
    assert mse(photo, edited, empty) == pytest.approx(mse(photo, edited), abs=1e-15)
    # the converse: change only the background -> bg metrics get worse than the whole-image ones
    outside = photo.copy()
    outside[~mask] = 255 - outside[~mask]
    assert mse(photo, outside, mask) > mse(photo, outside)
    # a mask covering everything leaves no background: NaN, not an exception
    assert math.isnan(mse(photo, edited, np.ones_like(mask)))
    assert math.isnan(ssim_windowed(photo, edited, np.ones_like(mask)))


def test_mask_is_resized_to_the_image(photo):
    mask = np.zeros((128, 128), bool)
    mask[32:96, 32:96] = True
    edited = photo.copy()
    edited[16:48, 16:48] = 0
    assert psnr(photo, edited, mask) == math.inf


def test_seed_scores_fields(photo):
    edited = photo.copy()
    edited[:8] = 0
    mask = np.zeros(photo.shape[:2], bool)
    mask[:8] = True
    plain = seed_scores(photo, edited, lpips=False)
    assert plain == SeedScores(ssim_global(photo, edited), ssim_windowed(photo, edited), psnr(photo, edited),
                               mse(photo, edited))
    masked = seed_scores(photo, edited, mask=mask, lpips=False)
    assert masked.bg_psnr == math.inf and masked.bg_mse == 0.0 and masked.psnr == pytest.approx(psnr(photo, edited))
    assert masked.bg_ssim_windowed == pytest.approx(ssim_windowed(photo, edited, mask))
    assert masked.clip_text is None and masked.lpips is None


# --- the seed report's SSIM (Algorithm 1): one global SSIM ------------------------------------------------------


def _global_ssim_formula(mx, my, vx, vy, cov):
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # (K1 L)^2, (K2 L)^2, L = 1
    return (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))


def test_ssim_global_is_the_formula_on_a_hand_made_pair():
    x = np.array([[0.0, 0.5], [0.5, 1.0]])
    y = np.array([[0.25, 0.25], [0.75, 0.75]])
    # means 0.5 / 0.5, population variances 0.125 / 0.0625, covariance (0.125 + 0 + 0 + 0.125) / 4 = 0.0625
    expected = _global_ssim_formula(0.5, 0.5, 0.125, 0.0625, 0.0625)
    assert expected == pytest.approx(0.5001 * 0.1259 / (0.5001 * 0.1884), abs=1e-12)
    assert ssim_global(x, y) == pytest.approx(expected, abs=1e-12)
    assert ssim_global(x, x) == pytest.approx(1.0, abs=1e-12)
    # Y is resized to X: a uniform 4x4 Y stays uniform (variance and covariance 0)
    assert ssim_global(x, np.full((4, 4), 0.25)) == pytest.approx(_global_ssim_formula(0.5, 0.25, 0.125, 0, 0),
                                                                  abs=1e-9)
    # colour goes to grayscale with ITU-R 709 luma weights (skimage's rgb2gray) before the statistics
    rgb = np.zeros((2, 2, 3))
    rgb[0, 0] = (1.0, 0.0, 0.0)
    rgb[1, 1] = (0.0, 0.0, 1.0)
    gray = rgb @ np.array([0.2125, 0.7154, 0.0721])
    assert ssim_global(rgb, y) == pytest.approx(_global_ssim_formula(gray.mean(), 0.5, gray.var(), 0.0625,
                                                                     ((gray - gray.mean()) * (y - 0.5)).mean()),
                                                abs=1e-12)
    # with a mask: the statistics of background pixels only
    mask = np.array([[False, False], [False, True]])
    keep_x, keep_y = x[~mask], y[~mask]
    assert ssim_global(x, y, mask) == pytest.approx(_global_ssim_formula(
        keep_x.mean(), keep_y.mean(), keep_x.var(), keep_y.var(),
        ((keep_x - keep_x.mean()) * (keep_y - keep_y.mean())).mean()), abs=1e-12)
    assert math.isnan(ssim_global(x, y, np.ones((2, 2), bool)))


def test_global_and_windowed_ssim_differ(photo):
    noisy = np.clip(photo / 255.0 + np.random.default_rng(0).normal(0, 0.05, photo.shape), 0, 1)
    # white noise barely moves whole-image statistics but wrecks 7x7 windows on flat patches
    assert ssim_global(photo, noisy) > 0.9 > ssim_windowed(photo, noisy)


def test_lpips_is_skipped_cleanly_when_unavailable(photo, caplog, monkeypatch):
    try:
        import lpips  # noqa: F401
        pytest.skip("lpips is installed here; this test checks the fallback")
    except ImportError:
        pass
    from nti import metrics
    monkeypatch.setattr(metrics, "_lpips_models", {})  # as in a fresh process: the message must come, once
    monkeypatch.setattr(metrics, "_lpips_warned", False)
    with caplog.at_level(logging.WARNING, logger="nti"):
        assert lpips_distance(photo, photo) is None
        assert lpips_distance(photo, photo) is None
        assert seed_scores(photo, photo).lpips is None
    # one message per process, however often it is asked
    assert sum(metrics.LPIPS_SKIPPED in r.message for r in caplog.records) == 1


# --- CLIP ------------------------------------------------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """CLIP's byte-level alphabet: printable Latin-1 bytes map to themselves, the rest to chr(256 + k)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


@pytest.fixture(scope="module")
def tiny_clip_folder(tmp_path_factory):
    """A random tiny CLIPModel + character-level CLIP tokenizer + 32 px image processor saved to a folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # 5.x without torchvision
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor

    folder = tmp_path_factory.mktemp("tiny_clip")
    alphabet = _byte_alphabet()
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: words split into characters
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, eos_token_id=eos, bos_token_id=bos,
                         pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder


def _unit(features) -> torch.Tensor:
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(features, dim=-1)


def test_clip_scorer_matches_manual_cosine(tiny_clip_folder, photo):
    scorer = ClipScorer(tiny_clip_folder)
    other = np.ascontiguousarray(photo[::-1])
    texts = ["a photo of a cat", "a tiger!"]
    with torch.no_grad():
        tokens = scorer.tokenizer(texts, padding=True, return_tensors="pt")
        text = _unit(scorer.model.get_text_features(**tokens))
        pixels = scorer.image_processor(images=[Image.fromarray(photo), Image.fromarray(other)],
                                        return_tensors="pt")["pixel_values"]
        image = _unit(scorer.model.get_image_features(pixel_values=pixels))
    assert scorer.text_image(photo, texts[0]) == pytest.approx(float(image[0] @ text[0]), abs=1e-5)
    assert scorer.text_image(Image.fromarray(other), texts[1]) == pytest.approx(float(image[1] @ text[1]), abs=1e-5)
    assert scorer.image_image(photo, other) == pytest.approx(float(image[0] @ image[1]), abs=1e-5)
    assert scorer.image_image(photo, photo) == pytest.approx(1.0, abs=1e-5)
    batch = scorer.text_image_batch([photo, other], texts)
    np.testing.assert_allclose(batch, (image * text).sum(-1).numpy(), atol=1e-5)
    scores = seed_scores(photo, other, prompt=texts[1], clip=scorer, lpips=False)
    assert scores.clip_text == pytest.approx(float(image[1] @ text[1]), abs=1e-5)
    assert scores.clip_image == pytest.approx(float(image[0] @ image[1]), abs=1e-5)
    assert load_clip_scorer(tiny_clip_folder) is not None


def test_load_clip_scorer_skips_without_a_model_and_refuses_a_wrong_folder(tmp_path, caplog, monkeypatch,
                                                                           tiny_clip_folder):
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="nti"):
        assert load_clip_scorer(None) is None
    assert [r.message for r in caplog.records] == [CLIP_SKIPPED]
    # a folder the user named that holds no CLIP model is an error, not a run without the metric they asked for
    with pytest.raises(NTIError, match=r"^--clip .*no_such_folder: .*is not a folder"):
        load_clip_scorer(tmp_path / "no_such_folder")
    incomplete = tmp_path / "incomplete"  # the model but no image processor: the missing piece named
    shutil.copytree(tiny_clip_folder, incomplete)
    (incomplete / "preprocessor_config.json").unlink()
    with pytest.raises(NTIError, match="preprocessor_config.json"):
        load_clip_scorer(incomplete)


# --- PIE-Bench (cure-lab/PnPInversion evaluation/): fixture pairs and masks in PIE-Bench format -----------------

PIE_SIDE = 512


def _pie_rle(mask: np.ndarray) -> list[int]:
    """PIE-Bench's mask code for a 512x512 bool mask: flat [start, length, ...] runs over row-major pixels."""
    flat = np.concatenate([[0], mask.ravel().astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


def _np_pie_mask(code, border: bool = True) -> np.ndarray:
    """PIE-Bench's mask_decode as its evaluate.py defines it, in numpy: runs set to 1, then the image border."""
    flat = np.zeros(PIE_SIDE * PIE_SIDE)
    for start, length in zip(code[0::2], code[1::2]):
        flat[start:start + length] = 1
    mask = flat.reshape(PIE_SIDE, PIE_SIDE)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def write_pie_folder(root) -> dict:
    """Two PIE-Bench entries in its layout (mapping_file.json + annotation_images/<category>/<id>.jpg, 512x512
    photos, RLE masks: a rectangle and a disc; editing types 1 and 6); returns the mapping."""
    import skimage.data

    sources = [skimage.data.astronaut(), np.asarray(Image.fromarray(skimage.data.coffee()[:, 50:450]).resize(
        (PIE_SIDE, PIE_SIDE), Image.Resampling.BICUBIC))]
    masks = [np.zeros((PIE_SIDE, PIE_SIDE), bool) for _ in sources]
    masks[0][120:300, 160:330] = True
    yy, xx = np.mgrid[:PIE_SIDE, :PIE_SIDE]
    masks[1][(yy - 250) ** 2 + (xx - 260) ** 2 < 110 ** 2] = True
    entries = [("1_change_object_80", "1", "a photo of an [astronaut]", "a photo of a [cat]"),
               ("6_change_attribute_color_40", "6", "a [cup of coffee]", "a [cup of tea]")]
    mapping = {}
    for k, (source, mask, (category, type_id, original, editing)) in enumerate(zip(sources, masks, entries)):
        name = f"{type_id}1100000000{k}"
        (root / "annotation_images" / category).mkdir(parents=True, exist_ok=True)
        Image.fromarray(source).save(root / "annotation_images" / category / f"{name}.jpg", quality=95)
        mapping[name] = {"image_path": f"{category}/{name}.jpg", "original_prompt": original,
                         "editing_prompt": editing, "editing_instruction": "", "editing_type_id": type_id,
                         "blended_word": "", "mask": _pie_rle(mask)}
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return mapping


@pytest.fixture(scope="module")
def pie_pairs(tmp_path_factory):
    """The PIE-Bench fixture entries as loaded, each with an "edited" output: the edited region recoloured, the
    background with faint noise and a shifted strip; (source, output, mask, mask code) per entry."""
    from nti.data import load_pie_bench

    root = tmp_path_factory.mktemp("pie")
    mapping = write_pie_folder(root)
    rng = np.random.default_rng(0)
    pairs = []
    for sample in load_pie_bench(root):
        source = np.asarray(sample.get_image())
        output = np.clip(source + rng.normal(0, 6, source.shape), 0, 255)
        output[sample.mask] = output[sample.mask][:, ::-1]  # "edit": channels swapped inside the mask
        output[400:430, :] = np.roll(output[400:430, :], 7, axis=1)  # and a background defect
        pairs.append((source, output.round().astype(np.uint8), sample.mask, mapping[sample.id]["mask"]))
    return pairs


def test_pie_mask_marks_the_one_pixel_border(pie_pairs):
    for _, _, mask, code in pie_pairs:
        edited = pie_edit_mask(mask, mask.shape)
        np.testing.assert_array_equal(edited, _np_pie_mask(code).astype(bool))
        assert not np.array_equal(edited, _np_pie_mask(code, border=False).astype(bool))
    # an empty mask is the border alone; at another resolution the border is the image's own
    small = pie_edit_mask(np.zeros((PIE_SIDE, PIE_SIDE), bool), (8, 8))
    assert small.sum() == 28 and not small[1:7, 1:7].any()
    # so a difference confined to the border is no background difference for PIE-Bench (it is for the seed's)
    pytest.importorskip("torchmetrics")
    source = pie_pairs[0][0]
    framed = source.copy()
    framed[0, :] = framed[:, -1] = 0
    empty = np.zeros(source.shape[:2], bool)
    assert pie_mse(source, framed, empty) == 0.0 and pie_psnr(source, framed, empty) == math.inf
    assert mse(source, framed, empty) > 0


def _gaussian_window() -> np.ndarray:
    taps = np.arange(11) - 5.0
    window = np.exp(-(taps / 1.5) ** 2 / 2)
    return window / window.sum()


def _np_ssim_valid(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. SSIM, 11x11 Gaussian window (sigma 1.5), per RGB channel, mean over the 'valid' positions."""
    from numpy.lib.stride_tricks import sliding_window_view

    g = _gaussian_window()

    def blur(image):  # separable 'valid' correlation of each channel
        rows = sliding_window_view(image, 11, axis=0) @ g
        return sliding_window_view(rows, 11, axis=1) @ g

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    return float((((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


def test_pie_background_psnr_mse_ssim_match_their_definition(pie_pairs):
    pytest.importorskip("torchmetrics")
    for source, output, mask, code in pie_pairs:
        keep = 1 - _np_pie_mask(code)  # PnPInversion: images * (1 - mask), the mask with its border
        x = source.astype(np.float64) / 255 * keep[..., None]
        y = output.astype(np.float64) / 255 * keep[..., None]
        error = ((x - y) ** 2).mean()  # over the whole image, zeroed pixels included
        assert pie_mse(source, output, mask) == pytest.approx(error, abs=1e-4)
        assert pie_mse(source, output, mask) == pytest.approx(error, rel=1e-4)
        assert pie_psnr(source, output, mask) == pytest.approx(10 * math.log10(1 / error), abs=1e-4)
        assert pie_ssim(source, output, mask) == pytest.approx(_np_ssim_valid(x, y), abs=1e-4)
        # and not the project's own background-pixels-only variant, which reads 0.5-3 dB apart
        assert abs(pie_psnr(source, output, mask) - psnr(source, output, mask)) > 0.3
        whole_x, whole_y = source / 255.0, output / 255.0
        assert pie_ssim(source, output) == pytest.approx(_np_ssim_valid(whole_x, whole_y), abs=1e-4)
    full = np.ones_like(pie_pairs[0][2])
    assert math.isnan(pie_psnr(source, output, full)) and math.isnan(pie_ssim(source, output, full))


# torchvision's squeezenet1_1().features parameter shapes: (index, conv, (out, in, k)); Fire modules have squeeze,
# expand1x1 and expand3x3 convolutions
SQUEEZENET_FIRES = {3: (64, 16, 64), 4: (128, 16, 64), 6: (128, 32, 128), 7: (256, 32, 128), 9: (256, 48, 192),
                    10: (384, 48, 192), 11: (384, 64, 256), 12: (512, 64, 256)}


def _random_squeezenet_state(seed: int = 0) -> dict:
    """A state dict with torchvision's squeezenet1_1 names and shapes (features + classifier), random values."""
    generator = torch.Generator().manual_seed(seed)

    def conv(out_ch, in_ch, k):
        scale = (2.0 / (in_ch * k * k)) ** 0.5
        return (torch.randn(out_ch, in_ch, k, k, generator=generator) * scale,
                torch.randn(out_ch, generator=generator) * 0.05)

    state = {}
    state["features.0.weight"], state["features.0.bias"] = conv(64, 3, 3)
    for index, (inplanes, squeeze, expand) in SQUEEZENET_FIRES.items():
        for name, shape in (("squeeze", (squeeze, inplanes, 1)), ("expand1x1", (expand, squeeze, 1)),
                            ("expand3x3", (expand, squeeze, 3))):
            state[f"features.{index}.{name}.weight"], state[f"features.{index}.{name}.bias"] = conv(*shape)
    state["classifier.1.weight"], state["classifier.1.bias"] = conv(1000, 512, 1)
    return state


LPIPS_CHANNELS = (64, 128, 256, 384, 384, 512, 512)


@pytest.fixture(scope="module")
def tiny_lpips_folder(tmp_path_factory):
    """Random SqueezeNet weights as torchvision names its file, and random LPIPS heads as squeeze.pth."""
    folder = tmp_path_factory.mktemp("lpips")
    torch.save(_random_squeezenet_state(), folder / "squeezenet1_1-b8a52dc0.pth")
    generator = torch.Generator().manual_seed(1)
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) / c
             for k, c in enumerate(LPIPS_CHANNELS)}
    torch.save(heads, folder / "squeeze.pth")
    return folder


def _functional_lpips(state: dict, heads: dict, x0: torch.Tensor, x1: torch.Tensor) -> float:
    """LPIPS v0.1 with SqueezeNet 1.1 in plain functional torch, as the lpips package and torchmetrics before 1.2.1
    (PnPInversion's evaluation) compute it: each position's channel vector divided by (its norm + 1e-10)."""
    from torch.nn import functional as F

    def fire(x, index):
        def w(name):
            return state[f"features.{index}.{name}.weight"], state[f"features.{index}.{name}.bias"]

        x = F.relu(F.conv2d(x, *w("squeeze")))
        return torch.cat([F.relu(F.conv2d(x, *w("expand1x1"))), F.relu(F.conv2d(x, *w("expand3x3"), padding=1))], 1)

    def pool(x):
        return F.max_pool2d(x, 3, 2, ceil_mode=True)

    def taps(x):
        x = F.relu(F.conv2d(x, state["features.0.weight"], state["features.0.bias"], stride=2))
        out = [x]
        x = fire(fire(pool(x), 3), 4)
        out.append(x)
        x = fire(fire(pool(x), 6), 7)
        out.append(x)
        x = fire(pool(x), 9)
        out.append(x)
        for index in (10, 11, 12):
            x = fire(x, index)
            out.append(x)
        return out

    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    total = 0.0
    with torch.no_grad():
        for k, (f0, f1) in enumerate(zip(taps((x0 - shift) / scale), taps((x1 - shift) / scale))):
            f0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            f1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += float((((f0 - f1) ** 2) * heads[f"lin{k}.model.1.weight"]).sum(1).mean())
    return total


def test_pie_lpips_matches_a_functional_squeezenet(pie_pairs, tiny_lpips_folder):
    lpips = load_pie_lpips(tiny_lpips_folder)
    assert lpips is not None and str(lpips.path).endswith("squeezenet1_1-b8a52dc0.pth")
    state = torch.load(tiny_lpips_folder / "squeezenet1_1-b8a52dc0.pth")
    heads = torch.load(tiny_lpips_folder / "squeeze.pth")
    source, output, mask, code = pie_pairs[0]
    keep = 1 - _np_pie_mask(code)
    zeroed = [torch.from_numpy(image / 255.0 * keep[..., None]).float().permute(2, 0, 1)[None] * 2 - 1
              for image in (source, output)]
    expected = _functional_lpips(state, heads, *zeroed)
    assert expected > 0
    assert pie_lpips(lpips, source, output, mask) == pytest.approx(expected, abs=1e-4, rel=1e-4)
    assert pie_lpips(lpips, source, source, mask) == pytest.approx(0.0, abs=1e-7)


@pytest.fixture(scope="module")
def tiny_dino_folder(tmp_path_factory):
    """A random 2-layer ViT saved as a transformers folder (224 px input, 32 px patches: 49 patches + CLS)."""
    from transformers import ViTConfig, ViTModel

    folder = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       image_size=224, patch_size=32)
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(str(folder))
    return folder


def _np_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize, half-pixel centres, no antialiasing (torch interpolate align_corners=False)."""
    def taps(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        low = np.minimum(np.floor(src).astype(int), n_in - 1)
        return low, np.minimum(low + 1, n_in - 1), src - low

    y0, y1, wy = taps(image.shape[0], height)
    x0, x1, wx = taps(image.shape[1], width)
    rows = image[y0] * (1 - wy)[:, None, None] + image[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def _np_structure_distance(folder, a: np.ndarray, b: np.ndarray) -> float:
    """PnPInversion's structure distance, written out: [0, 255] pixels resized to 224, ImageNet-normalized; the last
    block's keys (its LayerNorm with DINO's eps 1e-6, then the key projection); cosine self-similarity; MSE."""
    import re

    from transformers import ViTModel

    model = ViTModel.from_pretrained(str(folder), add_pooling_layer=False, layer_norm_eps=1e-6).eval()
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    last = model.config.num_hidden_layers - 1

    def weight(pattern):
        (name,) = [k for k in state if re.fullmatch(pattern, k)]
        return state[name]

    layer = rf"(encoder\.layer|layers)\.{last}\."
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def self_similarity(image):
        pixels = (_np_bilinear(image.astype(np.float64), 224, 224) - mean) / std
        with torch.no_grad():
            hidden = model(pixel_values=torch.from_numpy(pixels).float().permute(2, 0, 1)[None],
                           output_hidden_states=True).hidden_states
        assert len(hidden) == model.config.num_hidden_layers + 1
        h = hidden[-2][0].double().numpy()  # the last block's input
        h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
        h = h * weight(layer + r"layernorm_before\.weight") + weight(layer + r"layernorm_before\.bias")
        keys = h @ weight(layer + r"attention\.(k_proj|attention\.key)\.weight").T + weight(
            layer + r"attention\.(k_proj|attention\.key)\.bias")
        norms = np.linalg.norm(keys, axis=-1, keepdims=True)
        return keys @ keys.T / np.maximum(norms @ norms.T, 1e-8)

    return float(((self_similarity(a) - self_similarity(b)) ** 2).mean())


def test_structure_distance_matches_their_definition(pie_pairs, tiny_dino_folder):
    dino = load_dino(tiny_dino_folder)
    assert dino is not None
    for source, output, _, _ in pie_pairs:
        expected = _np_structure_distance(tiny_dino_folder, source, output)
        assert expected > 1e-4
        assert dino(source, output) == pytest.approx(expected, abs=1e-4, rel=1e-3)
    assert dino(pie_pairs[0][0], pie_pairs[0][0]) == 0.0


def test_pie_clip_scores_are_clamped_x100_and_mask_the_background(pie_pairs, tiny_clip_folder):
    scorer = ClipScorer(tiny_clip_folder)
    source, output, mask, code = pie_pairs[1]
    edited_only = (output * _np_pie_mask(code)[..., None]).astype(np.uint8)  # PnPInversion: uint8(image * mask)
    texts = ["a dog on a mat", "a cup of tea", "zzz", "a photo there"]  # the random CLIP likes only the first
    with torch.no_grad():
        pixels = scorer.image_processor(images=[Image.fromarray(output), Image.fromarray(edited_only)],
                                        return_tensors="pt")["pixel_values"]
        images = _unit(scorer.model.get_image_features(pixel_values=pixels))
        tokens = scorer.tokenizer(texts, padding=True, return_tensors="pt")
        cosines = images @ _unit(scorer.model.get_text_features(**tokens)).T  # (2 images, texts)
    assert (cosines < 0).any() and (cosines > 0).any()  # both sides of the clamp are exercised
    for k, text in enumerate(texts):
        assert pie_clip_score(scorer, output, text) == pytest.approx(100 * max(float(cosines[0, k]), 0), abs=1e-3)
        assert pie_clip_score(scorer, output, text, mask) == pytest.approx(100 * max(float(cosines[1, k]), 0),
                                                                           abs=1e-3)


def test_pie_scores_fill_what_the_mask_and_models_allow(pie_pairs, tiny_clip_folder, tiny_lpips_folder,
                                                        tiny_dino_folder):
    pytest.importorskip("torchmetrics")
    source, output, mask, _ = pie_pairs[0]
    models = PieModels(ClipScorer(tiny_clip_folder), load_pie_lpips(tiny_lpips_folder), load_dino(tiny_dino_folder))
    scores = pie_scores(source, output, "a photo there", mask, models)
    assert scores.bg_psnr == pytest.approx(pie_psnr(source, output, mask))
    assert scores.bg_lpips == pytest.approx(pie_lpips(models.lpips, source, output, mask))
    assert scores.structure_distance == pytest.approx(models.dino(source, output))
    assert scores.clip_edited == pytest.approx(pie_clip_score(models.clip, output, "a photo there", mask))
    unmasked = pie_scores(source, output, "a photo there", None, PieModels(clip=models.clip))
    assert unmasked.bg_psnr is None and unmasked.clip_edited is None and unmasked.structure_distance is None
    assert unmasked.clip_whole == pytest.approx(scores.clip_whole)


def test_pie_models_skip_with_one_message_naming_the_flag(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # the default place holds nothing
    with caplog.at_level(logging.WARNING, logger="nti"):
        assert load_pie_lpips(None) is None
        assert load_dino(None) is None
    messages = [r.message for r in caplog.records]
    assert len(messages) == 2
    assert PIE_LPIPS_SKIPPED in messages[0] and "--lpips" in messages[0] and str(tmp_path / "hub") in messages[0]
    assert messages[1] == DINO_SKIPPED and "--dino" in messages[1]
    # folders the user named that hold no such model: errors naming the flag and what is missing
    with pytest.raises(NTIError, match=r"^--lpips .*: no squeezenet1_1\*.pth in"):
        load_pie_lpips(tmp_path)
    with pytest.raises(NTIError, match=r"^--dino .*config.json is missing"):
        load_dino(tmp_path)

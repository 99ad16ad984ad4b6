"""Audit of the pie-bench metrics against what cure-lab/PnPInversion's evaluation code computed for the published
tables (torchmetrics and transformers as of 2023): each expected value is computed here independently, on small
fixture images, as that code did."""
import numpy as np
import pytest
import test_metrics
import torch
from PIL import Image

from nti.metrics import SqueezeLpips, pie_lpips

SIDE = 64


@pytest.fixture(scope="module")
def pair():
    """A 64x64 photo crop, an "edited" copy (noise and a recoloured square) and the edited square's mask."""
    import skimage.data

    source = skimage.data.astronaut()[100:100 + SIDE, 180:180 + SIDE].copy()
    rng = np.random.default_rng(0)
    output = np.clip(source + rng.normal(0, 8, source.shape), 0, 255).round().astype(np.uint8)
    mask = np.zeros((SIDE, SIDE), bool)
    mask[20:40, 24:44] = True
    output[mask] = output[mask][:, ::-1]
    return source, output, mask


# --- LPIPS: the channel normalization of torchmetrics < 1.2.1 (LPIPS's own), eps outside the square root ---------

LPIPS_CHANNELS = (64, 128, 256, 384, 384, 512, 512)
FIRES = {3: (64, 16, 64), 4: (128, 16, 64), 6: (128, 32, 128), 7: (256, 32, 128), 9: (256, 48, 192),
         10: (384, 48, 192), 11: (384, 64, 256), 12: (512, 64, 256)}


def _squeezenet_state(first_scale: float) -> dict:
    """torchvision squeezenet1_1 names and shapes, random values; the first convolution scaled by first_scale."""
    generator = torch.Generator().manual_seed(0)

    def conv(out_ch, in_ch, k):
        scale = (2.0 / (in_ch * k * k)) ** 0.5
        return (torch.randn(out_ch, in_ch, k, k, generator=generator) * scale,
                torch.randn(out_ch, generator=generator) * 0.05)

    weight, bias = conv(64, 3, 3)
    state = {"features.0.weight": weight * first_scale, "features.0.bias": bias * first_scale}
    for index, (inplanes, squeeze, expand) in FIRES.items():
        for name, shape in (("squeeze", (squeeze, inplanes, 1)), ("expand1x1", (expand, squeeze, 1)),
                            ("expand3x3", (expand, squeeze, 3))):
            state[f"features.{index}.{name}.weight"], state[f"features.{index}.{name}.bias"] = conv(*shape)
    return state


def _heads() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) / c
            for k, c in enumerate(LPIPS_CHANNELS)}


def _zeroed(image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """PnPInversion's LPIPS input: float32 image / 255 times (1 - mask with its border), mapped to [-1, 1]."""
    keep = ~mask.copy()
    keep[0, :] = keep[-1, :] = keep[:, 0] = keep[:, -1] = False
    x = image.astype(np.float32) / 255 * keep[..., None].astype(np.float32)
    return torch.from_numpy(x).permute(2, 0, 1)[None] * 2 - 1


@pytest.mark.parametrize("first_scale", [1.0, 1e-6])
def test_lpips_normalizes_features_as_torchmetrics_did_in_2023(pair, first_scale):
    # at first_scale 1e-6 the first tap's channel vectors have norms ~1e-6: LPIPS's own normalization (eps 1e-10
    # after the root) still makes them unit vectors, torchmetrics 1.2.1+'s sqrt(1e-8 + |f|^2) shrinks them ~100x
    source, output, mask = pair
    state, heads = _squeezenet_state(first_scale), _heads()
    lpips = SqueezeLpips(state, heads)
    expected = test_metrics._functional_lpips(state, heads, _zeroed(source, mask), _zeroed(output, mask))
    assert expected > 0
    assert pie_lpips(lpips, source, output, mask) == pytest.approx(expected, rel=1e-4, abs=1e-6)


# --- CLIP: the image processor of 2023 (PIL bicubic), whatever backend transformers would pick now --------------

tiny_clip_folder = test_metrics.tiny_clip_folder  # test_metrics' fixture: a tiny CLIP folder


@pytest.fixture
def openai_style_clip(tiny_clip_folder, tmp_path):
    """The tiny CLIP folder with its preprocessor config naming "CLIPImageProcessor", as openai's folders do."""
    import json
    import shutil

    folder = tmp_path / "clip"
    shutil.copytree(tiny_clip_folder, folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["image_processor_type"] = "CLIPImageProcessor"
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    return folder


def _pil_clip_pixels(image: np.ndarray, side: int, mean, std) -> np.ndarray:
    """CLIPImageProcessor as torchmetrics' CLIPScore ran it in 2023: PIL bicubic to the shortest edge, centre crop,
    / 255, normalize."""
    pil = Image.fromarray(image)
    w, h = pil.size
    scale = side / min(w, h)
    pil = pil.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC)
    w, h = pil.size
    left, top = (w - side) // 2, (h - side) // 2
    crop = np.asarray(pil.crop((left, top, left + side, top + side)), dtype=np.float64) / 255
    return ((crop - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


def test_clip_images_are_preprocessed_with_pil_whatever_transformers_prefers(openai_style_clip, pair, monkeypatch):
    import transformers

    from nti.metrics import ClipScorer

    asked = []
    original = transformers.AutoImageProcessor.from_pretrained

    def spy(*args, **kwargs):
        asked.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", spy)
    scorer = ClipScorer(openai_style_clip)
    # transformers 5 picks the torchvision backend (torch's bicubic) whenever torchvision imports; PnPInversion's
    # numbers come from PIL's: the scorer must ask for that backend, not take the default
    assert asked and (asked[0].get("backend") == "pil" or asked[0].get("use_fast") is False)
    processor = scorer.image_processor
    source = pair[0]
    pixels = processor(images=[Image.fromarray(source)], return_tensors="pt")["pixel_values"][0].double().numpy()
    expected = _pil_clip_pixels(source, 32, processor.image_mean, processor.image_std)
    np.testing.assert_allclose(pixels, expected, atol=1e-5)


# --- checks that found the project equal to PnPInversion (kept as regression tests) -----------------------------


def _mask_decode_loop(code, side: int = 512) -> np.ndarray:
    """evaluate.py's mask_decode, element by element: each run clipped at the image's end, then the border."""
    length = side * side
    flat = np.zeros(length)
    for i in range(0, len(code), 2):
        for j in range(min(code[i + 1], length - code[i])):
            flat[code[i] + j] = 1
    mask = flat.reshape(side, side)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def test_mask_decoding_matches_their_loop_with_overlaps_and_a_run_past_the_end(tmp_path):
    import json

    from nti.data import load_pie_bench
    from nti.evaluate import square_mask
    from nti.metrics import pie_edit_mask

    side = 512
    # unsorted runs, an overlap, a run that crosses rows, one that runs past the last pixel, one starting there
    code = [5000, 300, 700, 40, 720, 100, 130_000, 1_500, side * side - 10, 50, side * side, 7]
    (tmp_path / "annotation_images").mkdir()
    Image.new("RGB", (side, side), (90, 120, 150)).save(tmp_path / "annotation_images" / "a.jpg")
    (tmp_path / "mapping_file.json").write_text(json.dumps({"000": {
        "image_path": "a.jpg", "original_prompt": "a [blue] wall", "editing_prompt": "a [red] wall",
        "editing_type_id": "6", "mask": code}}))
    (sample,) = load_pie_bench(tmp_path)
    expected = _mask_decode_loop(code).astype(bool)
    # what nti eval scores with: the loaded mask, cropped like the 512x512 image (a no-op) and given its border
    np.testing.assert_array_equal(pie_edit_mask(square_mask(sample.mask), (side, side)), expected)
    assert sample.mask[-1, -10:].all() and not sample.mask[0, :5].any()  # row-major: the tail is the last row


def test_background_psnr_mse_follow_their_float32_path(pair):
    from nti.metrics import pie_mse, pie_psnr

    source, output, mask = pair
    keep = ~mask.copy()
    keep[0, :] = keep[-1, :] = keep[:, 0] = keep[:, -1] = False
    # matrics_calculator.py: np.array(img).astype(float32) / 255, times (1 - mask).astype(float32)
    x = source.astype(np.float32) / 255 * keep[..., None].astype(np.float32)
    y = output.astype(np.float32) / 255 * keep[..., None].astype(np.float32)
    error = float(((x.astype(np.float64) - y) ** 2).mean())
    assert pie_mse(source, output, mask) == pytest.approx(error, rel=1e-5)
    assert pie_psnr(source, output, mask) == pytest.approx(10 * np.log10(1 / error), abs=1e-4)
    assert pie_psnr(Image.fromarray(source), Image.fromarray(output), mask) == pie_psnr(source, output, mask)


@pytest.mark.parametrize("height, width", [(512, 512), (300, 700), (700, 300), (240, 400)])
def test_dino_input_size_is_torchvision_013_resize_224_max_480(height, width):
    from nti.metrics import dino_input

    # torchvision 0.13 _compute_resized_output_size(size=[224], max_size=480)
    short, long = min(height, width), max(height, width)
    new_short, new_long = 224, int(224 * long / short)
    if new_long > 480:
        new_short, new_long = int(480 * new_short / new_long), 480
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    image = np.zeros((height, width, 3), np.uint8)
    assert tuple(dino_input(image).shape) == (1, 3, new_h, new_w)


# --- PIE-Bench images as PnPInversion reads them: Image.open, no EXIF orientation applied -------------------------


def test_pie_bench_images_are_read_as_stored_like_their_masks(tmp_path):
    import json

    from nti.data import load_pie_bench

    side = 512
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    pixels[:100] = 255  # a bright top band: the mask's row-major runs describe it as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: a viewer turns it 90 degrees
    (tmp_path / "annotation_images").mkdir()
    Image.fromarray(pixels).save(tmp_path / "annotation_images" / "a.png", exif=exif)
    (tmp_path / "mapping_file.json").write_text(json.dumps({"000": {
        "image_path": "a.png", "original_prompt": "a [white] band", "editing_prompt": "a [red] band",
        "editing_type_id": "6", "mask": [0, 100 * side]}}))
    (sample,) = load_pie_bench(tmp_path)
    # evaluate.py (and run_editing_p2p.py): Image.open(path), pixels as stored, which is where the mask lies
    with Image.open(tmp_path / "annotation_images" / "a.png") as img:
        theirs = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(sample.get_image()), theirs)
    assert (theirs[sample.mask] == 255).all()


def test_pie_table_means_over_samples_with_a_value_at_the_papers_scales():
    import pandas as pd

    from nti.report import pie_table, summarize

    rows = [{"id": str(k), "method": "null-text", "guidance": 7.5, "schedule": "constant", "edit_type": t,
             "edit_structure_distance": sd, "edit_bg_psnr": psnr, "edit_bg_lpips": lp, "edit_bg_mse": mse,
             "edit_bg_ssim": ssim, "edit_clip_whole": cw, "edit_clip_edited": ce}
            for k, (t, sd, psnr, lp, mse, ssim, cw, ce) in enumerate([
                ("1 change object", 0.010, 20.0, 0.050, 0.0010, 0.80, 25.0, 21.0),
                ("1 change object", 0.020, float("nan"), float("nan"), float("nan"), float("nan"), 24.0, 22.0),
                ("6 change color", 0.030, 30.0, 0.070, 0.0030, 0.90, 23.0, 20.0)])]
    df = pd.DataFrame(rows)
    df["method"] = pd.Categorical(df["method"])
    df["schedule"] = pd.Categorical(df["schedule"])
    table = pie_table(summarize(df), "edit").splitlines()
    # Table 1: structure x10^3, PSNR, LPIPS x10^3, MSE x10^4, SSIM x10^2, CLIP whole, CLIP edited; a NaN (the whole
    # image edited, PnPInversion's "nan") is left out of the mean, not counted as 0, and the table says over how many
    assert table[2].split(" | ")[4:] == ["20.00", "25.00 (n=2)", "60.00 (n=2)", "20.00 (n=2)", "85.00 (n=2)", "24.00",
                                         "21.00 |"]
    by_type = pie_table(summarize(df, by=("edit_type",)), "edit", by=("edit_type",)).splitlines()
    assert by_type[2].split(" | ")[3:6] == ["1 change object", "2", "15.00"]

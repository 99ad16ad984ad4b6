"""Metrics against hand-computed values, and CLIP scoring against a manual computation on a tiny saved CLIP."""
import json
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import NTIError
from engine.metrics import (CLIP_SKIPPED, ClipScorer, compute_metrics, load_clip_scorer, lpips_distance, mse, psnr,
                            ssim, to_array)


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
        assert ssim(photo, photo) == pytest.approx(1.0)
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


def test_ssim_is_grayscale_skimage_with_explicit_range(photo):
    from skimage.color import rgb2gray
    from skimage.metrics import structural_similarity

    noisy = np.clip(photo / 255.0 + np.random.default_rng(0).normal(0, 0.05, photo.shape), 0, 1)
    expected = structural_similarity(rgb2gray(photo / 255.0), rgb2gray(noisy), data_range=1.0)
    assert ssim(photo, noisy) == pytest.approx(expected, abs=1e-12)
    assert 0.0 < ssim(photo, noisy) < 1.0


def test_second_image_is_resized_to_the_first(photo):
    big = Image.fromarray(photo).resize((128, 128), Image.Resampling.BICUBIC)
    assert ssim(photo, big) > 0.9
    assert psnr(photo, big) > 25
    with pytest.raises(NTIError):
        ssim(photo, np.zeros((64, 64, 2)))


def test_masked_metrics_ignore_the_edited_region(photo):
    mask = np.zeros(photo.shape[:2], bool)
    mask[16:48, 16:48] = True  # the "edited" region
    edited = photo.copy()
    edited[mask] = 255 - edited[mask]
    # background untouched -> bg MSE 0, bg PSNR inf; unmasked metrics see the edit
    assert mse(photo, edited, mask) == 0.0 and psnr(photo, edited, mask) == math.inf
    assert mse(photo, edited) > 0 and psnr(photo, edited) < 30
    # SSIM windows straddling the mask edge still see the edit, so bg SSIM is high but not 1; far above full SSIM
    assert ssim(photo, edited, mask) > ssim(photo, edited) + 0.1
    # an empty mask is the unmasked metric exactly (same border handling as skimage's mean)
    empty = np.zeros_like(mask)
    assert ssim(photo, edited, empty) == pytest.approx(ssim(photo, edited), abs=1e-12)
    assert mse(photo, edited, empty) == pytest.approx(mse(photo, edited), abs=1e-15)
    # the converse: change only the background -> bg metrics get worse than the whole-image ones
    outside = photo.copy()
    outside[~mask] = 255 - outside[~mask]
    assert mse(photo, outside, mask) > mse(photo, outside)
    # a mask covering everything leaves no background: NaN, not an exception
    assert math.isnan(mse(photo, edited, np.ones_like(mask)))
    assert math.isnan(ssim(photo, edited, np.ones_like(mask)))


def test_mask_is_resized_to_the_image(photo):
    mask = np.zeros((128, 128), bool)
    mask[32:96, 32:96] = True
    edited = photo.copy()
    edited[16:48, 16:48] = 0
    assert psnr(photo, edited, mask) == math.inf


def test_compute_metrics_keys(photo):
    edited = photo.copy()
    edited[:8] = 0
    mask = np.zeros(photo.shape[:2], bool)
    mask[:8] = True
    plain = compute_metrics(photo, edited, lpips=False)
    assert set(plain) == {"ssim", "psnr", "mse"}
    masked = compute_metrics(photo, edited, mask=mask, lpips=False)
    assert set(masked) == {"ssim", "psnr", "mse", "bg_ssim", "bg_psnr", "bg_mse"}
    assert masked["bg_psnr"] == math.inf and masked["psnr"] == pytest.approx(psnr(photo, edited))


def test_lpips_is_skipped_cleanly_when_unavailable(photo, caplog):
    try:
        import lpips  # noqa: F401
        pytest.skip("lpips is installed here; this test checks the fallback")
    except ImportError:
        pass
    with caplog.at_level(logging.WARNING, logger="nti"):
        assert lpips_distance(photo, photo) is None
        assert lpips_distance(photo, photo) is None
        assert "lpips" not in compute_metrics(photo, photo)
    # one message per process, however often it is asked (the module may have warned in an earlier test already)
    assert sum("LPIPS skipped" in r.message for r in caplog.records) <= 1


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
    metrics = compute_metrics(photo, other, target_prompt=texts[1], clip=scorer, lpips=False)
    assert metrics["clip_text"] == pytest.approx(float(image[1] @ text[1]), abs=1e-5)
    assert metrics["clip_image"] == pytest.approx(float(image[0] @ image[1]), abs=1e-5)
    assert load_clip_scorer(tiny_clip_folder) is not None


def test_load_clip_scorer_skips_without_a_model(tmp_path, caplog, monkeypatch, tiny_clip_folder):
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="nti"):
        assert load_clip_scorer(None) is None
    assert [r.message for r in caplog.records] == [CLIP_SKIPPED]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nti"):
        assert load_clip_scorer(tmp_path / "no_such_folder") is None
    assert len(caplog.records) == 1 and CLIP_SKIPPED in caplog.records[0].message
    assert "no_such_folder" in caplog.records[0].message
    # a folder with the model but no image processor is incomplete: skipped, with the missing piece named
    incomplete = tmp_path / "incomplete"
    shutil.copytree(tiny_clip_folder, incomplete)
    (incomplete / "preprocessor_config.json").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nti"):
        assert load_clip_scorer(incomplete) is None
    assert len(caplog.records) == 1 and "preprocessor_config.json" in caplog.records[0].message

"""Saved inversions: round trip, keys, and refusing what would give a silently wrong image."""
import json

import pytest
import torch
from safetensors.torch import save_file

import engine
from engine import NTIConfig, NTIError, load_inversion, save_inversion

PROMPT = "a cat sitting on a mat"


@pytest.fixture(scope="module")
def inversion(tiny_pipe, cat_image):
    return engine.invert(tiny_pipe, cat_image, PROMPT, NTIConfig(steps=6, inner_steps=3), progress=False)[0]


def test_round_trip_gives_identical_edits(tiny_pipe, inversion, tmp_path):
    path = save_inversion(inversion, tmp_path / "cat.safetensors")
    loaded = load_inversion(path)
    assert torch.equal(loaded.z_T, inversion.z_T) and torch.equal(loaded.null_embeddings, inversion.null_embeddings)
    assert loaded.key == inversion.key and loaded.settings == inversion.settings
    a = engine.edit_latents(tiny_pipe, [inversion], "a tiger sitting on a mat", progress=False)
    b = engine.edit_latents(tiny_pipe, [loaded], "a tiger sitting on a mat", progress=False)
    assert torch.equal(a, b)
    meta = json.loads(path.with_suffix(".json").read_text())
    for field in ("source_prompt", "image_hash", "model_fingerprint", "settings", "versions", "iterations"):
        assert field in meta
    assert meta["settings"]["guidance"] == 7.5 and meta["versions"]["torch"] == torch.__version__


def test_key_covers_prompt_settings_and_pixels(tiny_pipe, inversion):
    from engine.artifact import inversion_key
    base = (inversion.image_hash, PROMPT, inversion.model_fingerprint, inversion.settings)
    assert inversion_key(*base) == inversion.key
    assert inversion_key(base[0], "a dog", *base[2:]) != inversion.key
    assert inversion_key(*base[:3], {**base[3], "guidance": 5.0}) != inversion.key
    assert inversion_key("0" * 64, *base[1:]) != inversion.key


def test_foreign_or_missing_files_are_refused(tmp_path):
    with pytest.raises(NTIError, match="does not exist"):
        load_inversion(tmp_path / "none.safetensors")
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(NTIError, match="not an nti inversion"):
        load_inversion(other)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(NTIError, match="not a readable"):
        load_inversion(garbage)


def test_editing_with_another_model_is_refused(inversion):
    other = engine.build_tiny_pipeline(seed=1)
    with pytest.raises(NTIError, match="made with model"):
        engine.edit(other, [inversion], "a tiger", progress=False)

"""Saved inversions: round trip, keys, and refusing what would give a silently wrong image."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

import nti
from nti import NTIConfig, NTIError, load_inversion, save_inversion
from nti.artifact import Inversion

PROMPT = "a cat sitting on a mat"


@pytest.fixture(scope="module")
def inversion(tiny_pipe, cat_image):
    return nti.invert(tiny_pipe, cat_image, PROMPT, NTIConfig(steps=6, inner_steps=3), progress=False)[0]


def assert_same_inversion(loaded: Inversion, original: Inversion) -> None:
    """Every field of the dataclass, whatever fields it grows: tensors bit-equal (dtype and shape too), the rest ==."""
    for field in dataclasses.fields(Inversion):
        got, want = getattr(loaded, field.name), getattr(original, field.name)
        if isinstance(want, torch.Tensor):
            assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), field.name
        else:
            assert got == want and type(got) is type(want), (field.name, got, want)


def distinctive(inv: Inversion) -> Inversion:
    """The inversion with every field set apart from its default and from the other fields, so a loader that drops
    a field (falls back to its default) or reads one field into another cannot pass the round trip."""
    g = torch.Generator().manual_seed(7)
    steps = inv.settings["steps"]
    return dataclasses.replace(inv, fp32_retries=[-1, 2], model_name="tiny-renamed",
                               versions={**inv.versions, "torch": "0.0-where-it-was-made"},
                               pivots=torch.randn((steps + 1, *inv.z_T.shape), generator=g),
                               timings={**inv.timings, "extra_s": 0.125},
                               conditioning={"pooled_dim": 3, "time_ids": [8.0, 8.0, 0.0, 1.0, 8.0, 8.0]})


@pytest.mark.parametrize("case", ["as inverted", "every field distinctive"])
def test_round_trip_keeps_every_field(inversion, tmp_path, case):
    inv = inversion if case == "as inverted" else distinctive(inversion)
    defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(Inversion)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    if case == "every field distinctive":  # the premise: nothing equals what a dropped field would come back as
        for name, default in defaults.items():
            value = getattr(inv, name)
            assert value is not None and (isinstance(value, torch.Tensor) or value != default), name
    # the real inversion: z_T, z_0 and the embeddings differ from each other, the per-step records are filled in
    assert not torch.equal(inv.z_T, inv.z_0) and inv.null_embeddings.shape == (6, 77, 32)
    assert len(inv.iterations) == len(inv.losses) == 6 and inv.timings and inv.model_name
    path = save_inversion(inv, tmp_path / "cat.safetensors")
    loaded = load_inversion(path)
    assert_same_inversion(loaded, inv)
    assert loaded.key == inv.key
    # the JSON written beside it is the same metadata record
    assert json.loads(path.with_suffix(".json").read_text()) == json.loads(json.dumps(inv.metadata()))
    if case == "as inverted":
        assert inv.versions["torch"] == torch.__version__ and inv.settings["guidance"] == 7.5


def test_round_trip_gives_identical_edits(tiny_pipe, inversion, tmp_path):
    loaded = load_inversion(save_inversion(inversion, tmp_path / "cat.safetensors"))
    a = nti.edit_latents(tiny_pipe, [inversion], "a tiger sitting on a mat", progress=False)
    b = nti.edit_latents(tiny_pipe, [loaded], "a tiger sitting on a mat", progress=False)
    assert torch.equal(a, b)


def test_key_covers_prompt_settings_and_pixels(tiny_pipe, inversion):
    from nti.artifact import inversion_key
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
    other = nti.build_tiny_pipeline(seed=1)
    with pytest.raises(NTIError, match="made with model"):
        nti.edit(other, [inversion], "a tiger", progress=False)


def test_a_cache_entry_of_a_newer_nti_is_left_for_it(tiny_pipe, cat_image, tmp_path, monkeypatch, caplog):
    """A cache shared by two nti versions: the older one moved the newer one's entries aside as '.corrupt' (they are
    not damaged, only of a format it cannot read) and saved its own over them. Now it inverts again in memory and
    leaves the entry as it is. (The newer format is made here by this nti reading one format fewer.)"""
    import logging

    import nti.artifact
    from nti.api import invert_cached

    config = NTIConfig(steps=3, inner_steps=2)
    saved = invert_cached(tiny_pipe, [cat_image], [PROMPT], config, cache=tmp_path, progress=False)[0]
    (entry,) = tmp_path.glob("*.safetensors")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(nti.artifact, "READABLE_FORMATS", (0,))  # this nti now reads only format 0: entry is newer
    with caplog.at_level(logging.WARNING, logger="nti"):
        again = invert_cached(tiny_pipe, [cat_image], [PROMPT], config, cache=tmp_path, progress=False)[0]
    assert torch.equal(again.null_embeddings, saved.null_embeddings)  # inverted again, the same
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing moved aside or saved over it
    assert "written by a newer nti" in caplog.text and "without saving over it" in caplog.text
    with pytest.raises(NTIError, match="upgrade nti"):  # loaded directly, it is still refused, saying why
        load_inversion(entry)

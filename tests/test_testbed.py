"""The built-in shapes model: scene oracle, loading, training, and fidelity claims re-measured on the trained weights.

Numbers the thresholds come from (benchmarks/results/testbed_shapes_cpu.json, 40 scenes) are quoted next to them;
the tests use fewer scenes, so their thresholds leave room for sampling, not for a broken model.
"""
import json
import random

import numpy as np
import pytest
import torch
from scipy import ndimage

from nti import api
from nti.testbed import scenes
from nti.config import NTIConfig, NTIError
from nti.metrics import clear_of, psnr, ssim
from nti.models import SHAPES_FOLDER, load_pipeline


# ------------------------------------------------------------------------------------------------------------ oracle

def test_oracle_reads_rendered_scenes():
    rng = random.Random(0)
    scene_list = [scenes.random_scene(rng) for _ in range(300)]
    hits = [scenes.read_scene(scenes.render(s)).matches(s.caption) for s in scene_list]
    assert np.mean(hits) >= 0.99, np.mean(hits)


def test_oracle_rejects_wrong_captions():
    scene = scenes.Scene("white", (scenes.Shape("red", "circle", 10, 12, 12),
                                   scenes.Shape("blue", "square", 24, 16, 10)))
    reading = scenes.read_scene(scenes.render(scene))
    assert reading.objects == (("red", "circle"), ("blue", "square")) and reading.background == "white"
    assert reading.matches(scene.caption)
    for wrong in ("a blue circle and a blue square on a white background",
                  "a red triangle and a blue square on a white background",
                  "a red circle and a blue square on a gray background",
                  "a red circle on a white background",
                  "a blue square and a red circle on a white background"):  # order is left to right
        assert not reading.matches(wrong), wrong


def test_oracle_reads_every_colour_shape_and_background():
    for bg in scenes.BACKGROUNDS:
        for colour in scenes.COLOURS:
            for kind in scenes.SHAPES:
                scene = scenes.Scene(bg, (scenes.Shape(colour, kind, 15.3, 16.6, 11.0),))
                assert scenes.read_scene(scenes.render(scene)).matches(scene.caption), scene.caption


def test_parse_caption_refuses_other_text():
    assert scenes.parse_caption("a red circle and a blue square on a gray background") == (
        "gray", (("red", "circle"), ("blue", "square")))
    for bad in ("a tiger on a mat", "a red circle", "a pink circle on a gray background",
                "a red circle on a pink background"):
        with pytest.raises(ValueError):
            scenes.parse_caption(bad)


def test_scene_edits_name_their_target_and_what_may_change():
    rng, adds = random.Random(4), 0
    for _ in range(200):
        scene = scenes.random_scene(rng)
        core = ndimage.binary_erosion(scenes.object_mask(scene, grow=0))
        added_or_removed = scenes.add_or_remove(rng, scene)
        adds += added_or_removed is not None and added_or_removed[0] == "add"
        for kind, target, index in scenes.edit_pairs(rng, scene) + [added_or_removed] * bool(added_or_removed):
            # the target renders to a scene the oracle reads as its caption: the edit is well posed
            assert scenes.read_scene(scenes.render(target)).matches(target.caption), (kind, target.caption)
            mask = scenes.edit_mask(scene, target, index)
            if kind == "add":
                assert len(target.objects) == 2 and scene.objects[0] in target.objects
                assert not (mask & core).any() and mask.mean() > 0.5  # only the kept object must survive
            elif kind == "remove":
                assert target.objects == tuple(o for i, o in enumerate(scene.objects) if i != index)
                assert (mask == scenes.object_mask(scene, index)).all()
                assert not (mask & scenes.object_mask(target, 0, grow=0)).any()  # the kept object must survive
            else:
                assert mask[scenes.object_mask(scene, index, grow=0)].all() and mask.mean() < 0.5
    assert adds > 50  # most one-object scenes leave room for a second object
    with pytest.raises(ValueError, match="one-object"):
        scenes.add_object(rng, scenes.random_scene(rng, n_objects=2))


def test_held_out_captions_never_in_training_batches():
    from nti.testbed.train import scene_batch
    _, captions = scene_batch(random.Random(3), 2000)
    assert not any(scenes.is_held_out(c) for c in captions)
    drawn = [scenes.random_scene(random.Random(i)).caption for i in range(3000)]
    assert sum(map(scenes.is_held_out, drawn)) > 100


# ------------------------------------------------------------------------------------------------------------ model

# shapes_pipe (conftest.py, session-wide): load_pipeline(None), the default model through the diffusers folder loader

def test_default_model_is_the_trained_shapes_folder(shapes_pipe):
    assert shapes_pipe.name == "shapes" and shapes_pipe.resolution == 32 and shapes_pipe.latent_shape == (4, 8, 8)
    assert type(shapes_pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(shapes_pipe.vae).__name__ == "AutoencoderKL"
    assert type(shapes_pipe.text_encoder).__name__ == "CLIPTextModel"
    weights = sum(f.stat().st_size for f in SHAPES_FOLDER.rglob("*.safetensors"))
    assert weights <= 30 * 2 ** 20, weights
    recorded = json.loads((SHAPES_FOLDER / "train_config.json").read_text())
    assert recorded["seed"] == 0 and recorded["unet_steps"] > 0


def test_closed_vocabulary_refuses_unknown_words(shapes_pipe):
    with pytest.raises(NTIError, match="does not know the word.*'tiger'"):
        api.generate(shapes_pipe, "a tiger on a white background", progress=False)
    # symbols outside words reach CLIP as byte tokens the model never saw; ASCII punctuation is a separator
    for symbol in ("\U0001F431", "\u200b", "\u2026"):
        with pytest.raises(NTIError, match="does not know the word"):
            api.check_vocabulary(shapes_pipe, [f"a red circle{symbol} on a white background"])
    api.check_vocabulary(shapes_pipe, ["A red circle, on a white background!"])


def held_out_captions(n_pairs: int = 10) -> list[str]:
    """Six held-out one-object captions and `n_pairs` held-out two-object captions (none seen in training)."""
    rng, pairs = random.Random(5), []
    while len(pairs) < n_pairs:
        caption = scenes.random_scene(rng, n_objects=2).caption
        pairs += [caption] if scenes.is_held_out(caption) else []
    return sorted(scenes._HELD_OUT_SINGLES)[:6] + pairs


def test_text_to_image_on_held_out_captions(shapes_pipe):
    """Benchmark: 92% of 100 held-out captions (strict oracle). Here 16 (measured 16/16, CPU, 14 s)."""
    captions = held_out_captions()
    assert all(scenes.is_held_out(c) for c in captions)
    images = api.generate(shapes_pipe, captions, NTIConfig(seed=1), progress=False)
    hits = [scenes.read_scene(image).matches(c) for image, c in zip(images, captions)]
    assert np.mean(hits) >= 0.8, list(zip(captions, hits))


@pytest.fixture(scope="module")
def recon(shapes_pipe):
    """Three scenes inverted in fp32, 50 steps: PSNR of each reconstruction. Rows: DDIM and NTI at w=7.5, DDIM at w=1.

    On the fast path, batch 3: 30 s instead of the reference's 49 s for the NTI row (1 thread), and the same PSNRs
    to 0.01 dB; the reference itself is pinned to the official notebook by tests/test_golden.py.
    """
    rng = random.Random(11)
    scene_list = [scenes.random_scene(rng, n_objects=k) for k in (1, 2, 1)]
    images = [scenes.render(s) for s in scene_list]
    out = {"scenes": scene_list, "images": images, "captions": [s.caption for s in scene_list]}
    fast = NTIConfig(backend="fast", batch_size=3)
    for name, config in {"ddim": fast.replace(method="ddim"), "null-text": fast.replace(method="null-text"),
                         "ddim_w1": fast.replace(method="ddim", guidance=1.0)}.items():
        inversions = api.invert(shapes_pipe, images, out["captions"], config, progress=False)
        out[name + "_psnr"] = reconstruction_psnr(shapes_pipe, images, inversions, config)
    return out


def reconstruction_psnr(pipe, images, inversions, config) -> np.ndarray:
    return np.array([psnr(a, b) for a, b in zip(images, api.reconstruct(pipe, inversions, config, progress=False))])


def test_nti_beats_ddim_under_cfg(recon):
    """Benchmark (40 scenes): DDIM 24.3 dB, NTI 37.9 dB at w=7.5. Measured here: DDIM 26.5 30.5 16.4, NTI 37.4 34.5
    39.8; DDIM at w=1 38.5 dB on the benchmark (there the null text has no effect, NTI = DDIM)."""
    ddim, nti, ddim_w1 = recon["ddim_psnr"], recon["null-text_psnr"], recon["ddim_w1_psnr"]
    assert (nti > ddim + 2.0).all(), (ddim, nti)
    assert nti.mean() > 33.0, nti
    assert ddim_w1.mean() > 33.0 and ddim_w1.mean() > ddim.mean() + 3.0, (ddim_w1, ddim)


@pytest.mark.parametrize("half_norms", [False, True])
def test_bf16_half_weights_stay_within_0p3_db_of_fp32(shapes_pipe, recon, half_norms):
    """The GPU default (bf16 UNet copy with pre-cast weights under autocast; embeddings, Adam and latents fp32) on
    the same scenes. Measured against the fp32 reference: +0.09, +0.12, -0.06 dB (fp16: -0.03, +0.21, +0.22); the
    fp32 fast path is 0.000, 0.000, 0.007 dB from it. With half_norms (the whole UNet in bf16, no autocast):
    -0.37, -0.36, +0.06 dB. Single scenes scatter by tenths of a dB either way (rounding, amplified by the
    optimization); over 24 scenes (benchmarks/results/precision_shapes_cpu.json) half norms are -0.02 dB from fp32
    on average, 0.16 dB per scene, 0.39 at most (autocast: +0.00, 0.25, 0.72), hence its looser bound here."""
    config = NTIConfig(backend="fast", batch_size=3, precision="bf16", half_norms=half_norms)
    inversions = api.invert(shapes_pipe, recon["images"], recon["captions"], config, progress=False)
    bf16 = reconstruction_psnr(shapes_pipe, recon["images"], inversions, config)
    assert np.abs(bf16 - recon["null-text_psnr"]).max() < (0.5 if half_norms else 0.3), (bf16, recon["null-text_psnr"])


# The fast path on this model: tests/test_golden.py (fp32, against the official notebook's numbers: identical inner
# iterations, embeddings to 5e-4); batching and bf16 against the reference: tests/test_fast.py.


@pytest.fixture(scope="module")
def edit_jobs(recon):
    """A colour swap and a shape swap of one object of each recon scene: (kind, scene index, target, mask)."""
    rng, jobs = random.Random(13), []
    for k, scene in enumerate(recon["scenes"]):
        for kind, target, index in scenes.edit_pairs(rng, scene):
            jobs.append((kind, k, target, scenes.edit_mask(scene, target, index)))
    return jobs


@pytest.mark.parametrize("method, schedule, min_psnr", [("null-text", "cosine", 30.0), ("direct", "constant", 35.0)])
def test_colour_and_shape_edits_change_the_object_and_keep_the_rest(shapes_pipe, recon, edit_jobs, method,
                                                                      schedule, min_psnr):
    """P2P word swaps graded by the oracle; outside the edited object the source must survive.

    Benchmark (80 edits, strict oracle): NTI with cosine-decayed w 75% colour / 100% shape, outside 37.1 / 36.2 dB;
    direct 95% / 100%, 41.1 / 37.3 dB. Measured here: all 6 edits of each method pass; outside PSNR mean 36.3 dB (NTI)
    and 42.4 dB (direct); SSIM clear of the object's window, mean 0.968 (NTI) and 0.989 (direct).
    """
    config = NTIConfig(method=method, guidance_schedule=schedule, backend="fast", batch_size=3)
    inversions = api.invert(shapes_pipe, recon["images"], recon["captions"], config, progress=False)
    edited = api.edit(shapes_pipe, [inversions[k] for _, k, _, _ in edit_jobs],
                      [target.caption for _, _, target, _ in edit_jobs], config.replace(edit="p2p-replace"),
                      progress=False)
    success = [scenes.read_scene(image).matches(target.caption) for image, (_, _, target, _) in zip(edited, edit_jobs)]
    source = [recon["images"][k] for _, k, _, _ in edit_jobs]
    outside = [psnr(a, b, mask=m) for a, b, (*_, m) in zip(source, edited, edit_jobs)]
    outside_ssim = [ssim(a, b, mask=clear_of(m)) for a, b, (*_, m) in zip(source, edited, edit_jobs)]
    print(method, success, np.round(outside, 2), np.round(outside_ssim, 3))
    assert np.mean(success) >= 5 / 6, [(j[0], j[2].caption, ok) for j, ok in zip(edit_jobs, success)]
    assert np.mean(outside) > min_psnr and min(outside) > 20.0, outside
    assert np.nanmean(outside_ssim) > 0.9, outside_ssim


def test_add_and_remove_edits_reach_the_target_caption(shapes_pipe):
    """P2P refinement (word counts differ) on direct inversions: the oracle must read the object added or removed.

    Benchmark (direct + p2p-refine, strict oracle): 89% of 18 additions, 100% of 9 removals. The kept object is not held in place
    (the model lays out anew a scene whose object count changes), so only the oracle is asserted here. Measured
    here: 8 of 8 edits (4 additions, 4 removals) read as the target.
    """
    rng, jobs = random.Random(21), []
    scene_list = [scenes.random_scene(rng) for _ in range(10)]
    for k, scene in enumerate(scene_list):
        if (edit := scenes.add_or_remove(rng, scene)) is not None:
            jobs.append((k, *edit))
    assert {kind for _, kind, _, _ in jobs} == {"add", "remove"}, jobs
    images = [scenes.render(s) for s in scene_list]
    config = NTIConfig(method="direct", backend="fast", batch_size=8)
    inversions = api.invert(shapes_pipe, images, [s.caption for s in scene_list], config, progress=False)
    edited = api.edit(shapes_pipe, [inversions[k] for k, *_ in jobs], [target.caption for _, _, target, _ in jobs],
                      config.replace(edit="p2p-refine"), progress=False)
    success = [scenes.read_scene(image).matches(target.caption) for image, (_, _, target, _) in zip(edited, jobs)]
    print(list(zip([kind for _, kind, _, _ in jobs], success)))
    assert np.mean(success) >= 0.6, [(kind, target.caption, ok) for (_, kind, target, _), ok in zip(jobs, success)]


# ---------------------------------------------------------------------------------------------------------- training

def test_training_runs_resumes_and_loads(tmp_path):
    from nti.testbed.train import TrainConfig, train
    config = TrainConfig(vae_steps=2, unet_steps=2, batch_size=4, vae_batch=4, checkpoint_every=1, warmup=1)
    out = train(config, tmp_path / "model", tmp_path / "work")
    first = load_pipeline(out, device="cpu")
    assert first.latent_shape == (4, 8, 8)
    assert (tmp_path / "work" / "unet.pt").exists()
    # a longer run resumes from the checkpoints instead of starting over, and gives new weights
    config.unet_steps = 3
    train(config, tmp_path / "model", tmp_path / "work")
    log = json.loads((tmp_path / "work" / "log.json").read_text())
    assert torch.load(tmp_path / "work" / "unet.pt", weights_only=False)["step"] == 3
    assert load_pipeline(out, device="cpu").fingerprint != first.fingerprint
    assert isinstance(log, list)
    recorded = json.loads((out / "train_config.json").read_text())
    assert recorded["unet_steps"] == 3 and recorded["scaling_factor"] > 0


# --------------------------------------------------------------------------------------------------------------- CLI

def test_cli_edits_the_bundled_scenes_with_the_default_model(tmp_path, capsys, monkeypatch):
    """The README's main command (fewer steps): one PNG per edit, each scene inverted once for its two edits."""
    from nti.cli import main
    from nti.data import SCENE_PROMPTS

    inverted = []
    real = api.invert
    monkeypatch.setattr(api, "invert", lambda pipe, images, prompts, *a, **k: inverted.extend(prompts) or
                        real(pipe, images, prompts, *a, **k))
    out = tmp_path / "scenes"
    code = main(["edit", str(SCENE_PROMPTS), "--guidance-schedule", "cosine", "--edit", "p2p-replace", "--out",
                 str(out), "--steps", "4", "--inner-steps", "2", "--quiet", "--device", "cpu"])
    assert code == 0
    ids = [json.loads(line)["id"] for line in SCENE_PROMPTS.read_text().splitlines()]
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(ids)
    from PIL import Image
    assert Image.open(out / f"{ids[0]}.png").size == (32, 32)
    assert len(inverted) == len(ids) // 2  # two edits per scene, one inversion each


def test_cli_refuses_words_the_shapes_model_never_saw(tmp_path, capsys):
    from nti.cli import EXIT_BAD_INPUT, main
    from nti.data import SCENE_PROMPTS

    code = main(["edit", str(SCENE_PROMPTS.parent / "scene0.png"), "--prompt", "a cat on a mat", "--target",
                 "a tiger on a mat", "--out", str(tmp_path / "x.png"), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT and "'cat'" in err and "--model" in err and "Traceback" not in err


def test_eval_defaults_to_the_bundled_scenes_with_background_metrics(tmp_path, capsys):
    import csv

    from nti.cli import main
    from nti.data import SCENE_PROMPTS
    out = tmp_path / "eval"
    assert main(["eval", "--out", str(out), "--n", "2", "--methods", "ddim", "--steps", "3", "--quiet",
                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(out / "samples.csv")))
    # two of the bundled scene edits, the first one first (which second one --n picks is nti eval's own rule,
    # tested in test_evaluate / test_data)
    bundled = {json.loads(line)["id"] for line in SCENE_PROMPTS.read_text().splitlines()}
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == len(ids) == 2 and set(ids) <= bundled and ids[0] == "scene0-colour", ids
    bg_ssim = [c for c in rows[0] if c.startswith("edit_bg_ssim")]  # edit_bg_ssim, or _windowed since issue 14
    assert bg_ssim and all(0.0 < float(r[c]) <= 1.0 for r in rows for c in bg_ssim), bg_ssim
    report = (out / "report.md").read_text()
    assert "`scenes`" in report and "shapes" in report

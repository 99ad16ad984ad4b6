"""Models whose UNet predicts v (SD 2.x 768 px) or x0: the DDIM math against diffusers' own schedulers, the fast
path against the reference, a saved inversion, and the CLI through the real loader."""
import json
import shutil

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

import nti
from nti import NTIConfig, load_inversion, load_pipeline, save_inversion, save_pipeline_folder
from nti.ddim import ddim_step, make_schedule
from tests.conftest import rel_err

SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False}
PROMPT, TARGET = "a cat sitting next to a mirror", "a tiger sitting next to a mirror"
CONFIG = NTIConfig(steps=4, inner_steps=3, early_stop=False)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "epsilon"])
def test_ddim_steps_equal_diffusers_schedulers(prediction_type):
    """Denoising equals DDIMScheduler.step, inversion DDIMInverseScheduler.step, for every step of a 10-step run."""
    config = {**SD_SCHEDULER, "prediction_type": prediction_type}
    schedule = make_schedule(config, 10)
    forward = DDIMScheduler.from_config(config)
    forward.set_timesteps(10)
    inverse = DDIMInverseScheduler.from_config(config)
    inverse.set_timesteps(10)
    assert [int(t) for t in forward.timesteps] == schedule.timesteps == [int(t) for t in inverse.timesteps][::-1]
    gen = torch.Generator().manual_seed(0)
    for i in range(10):
        x, out = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        a_t, a_prev = schedule.denoise_alphas(i)
        ours = ddim_step(x, schedule.eps(out, x, a_t), a_t, a_prev)
        theirs = forward.step(out, schedule.timesteps[i], x, eta=0.0).prev_sample
        assert rel_err(ours, theirs) < 1e-5, (i, rel_err(ours, theirs))
        t, a_from, a_to = schedule.invert_alphas(i)
        ours = ddim_step(x, schedule.eps(out, x, a_from), a_from, a_to)
        theirs = inverse.step(out, t, x).prev_sample
        assert rel_err(ours, theirs) < 1e-5, (i, rel_err(ours, theirs))


@pytest.fixture(scope="module")
def v_model(tiny_pipe, tmp_path_factory):
    """The tiny random model saved as a v-prediction folder (only its scheduler config says so)."""
    folder = save_pipeline_folder(tiny_pipe, tmp_path_factory.mktemp("tiny-v"))
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    return folder


def test_v_model_fast_path_equals_reference(v_model, tiny_pipe, cat_image):
    pipe = load_pipeline(v_model, device="cpu")
    ref = nti.invert(pipe, cat_image, PROMPT, CONFIG, progress=False)[0]
    fast = nti.invert(pipe, [cat_image] * 2, PROMPT, CONFIG.replace(backend="fast", batch_size=2),
                         progress=False)
    for inv in fast:
        assert inv.iterations == ref.iterations and rel_err(inv.z_T, ref.z_T) < 1e-4
        assert rel_err(inv.null_embeddings, ref.null_embeddings) < 3e-4
    edit_ref = nti.edit_latents(pipe, [ref], TARGET, CONFIG, progress=False)
    edit_fast = nti.edit_latents(pipe, fast[:1], TARGET, CONFIG.replace(backend="fast"), progress=False)
    assert rel_err(edit_fast, edit_ref) < 1e-4
    # the conversion is not a no-op: the same weights read as an epsilon model invert to another z_T
    as_eps = nti.invert(tiny_pipe, cat_image, PROMPT, CONFIG, progress=False)[0]
    assert rel_err(as_eps.z_T, ref.z_T) > 1e-2
    # and a saved inversion edits as the in-memory one
    loaded = load_inversion(save_inversion(ref, v_model.parent / "v.safetensors"))
    assert torch.equal(nti.edit_latents(pipe, [loaded], TARGET, CONFIG, progress=False), edit_ref)


def test_cli_edits_with_a_v_model(v_model, tmp_path):
    from nti.cli import main

    out = tmp_path / "edit.png"
    assert main(["edit", "skimage:chelsea", "--model", str(v_model), "--prompt", PROMPT, "--target", TARGET,
                 "--steps", "2", "--inner-steps", "1", "--device", "cpu", "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0


def test_unknown_prediction_type_is_refused(v_model, tmp_path):
    folder = tmp_path / "flow"
    shutil.copytree(v_model, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "flow"}))
    with pytest.raises(nti.NTIError, match="predicts 'flow'"):
        load_pipeline(folder, device="cpu")

"""A model's scheduler config at unusual but legal settings, end to end on the tiny model: the engine's sampling and
inversion against diffusers' StableDiffusionPipeline and DDIMInverseScheduler, or a clear NTIError."""
import dataclasses
import json
import shutil

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionPipeline

import nti
from nti import NTIConfig, NTIError, fast, load_pipeline, reference, save_pipeline_folder
from nti.api import null_embedding
from nti.ddim import make_schedule
from nti.methods import EditJob
from nti.models import encode_prompts, unet_eps
from nti.runner import UNetRunner
from tests.conftest import rel_err

PROMPT = "a cat sitting next to a mirror"


def test_timesteps_past_the_models_last_are_an_ntierror(tiny_pipe, cat_image):
    """1000 steps with SD's steps_offset 1 asks for t = 1000 of a 0..999 model: refused before any UNet call."""
    for config in (NTIConfig(method="ddim", steps=1000), NTIConfig(steps=50, steps_offset=25)):  # null-text: <= 100
        with pytest.raises(NTIError, match="reaches timestep"):
            nti.invert(tiny_pipe, cat_image, "a cat", config, progress=False)


def _with_scheduler(folder, tmp_path, **changes):
    """A copy of a saved model folder whose scheduler_config.json has `changes`, loaded through the real loader."""
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    config_file = copy / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **changes}))
    return load_pipeline(copy, device="cpu")


@pytest.fixture(scope="module")
def tiny_folder(tiny_pipe, tmp_path_factory):
    return save_pipeline_folder(tiny_pipe, tmp_path_factory.mktemp("tiny"))


def _diffusers_sample(pipe, z_T, steps, w):
    """StableDiffusionPipeline with DDIMScheduler.from_config of the model's own scheduler config."""
    theirs = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                     unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler_config),
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return theirs(PROMPT, latents=z_T.clone(), num_inference_steps=steps, guidance_scale=w, height=32, width=32,
                  output_type="latent").images


@torch.no_grad()
def _diffusers_invert(pipe, z0, steps):
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler_config)
    inverse.set_timesteps(steps)
    cond, z = encode_prompts(pipe, [PROMPT]), z0
    for t in inverse.timesteps:
        z = inverse.step(unet_eps(pipe, z, int(t), cond), int(t), z).prev_sample
    return z


def _job(pipe, z_T, steps, w):
    return EditJob(z_T=z_T, cond=encode_prompts(pipe, [PROMPT]), null=null_embedding(pipe),
                   schedule=make_schedule(pipe.scheduler_config, steps), weights=[w] * steps)


@pytest.mark.parametrize("steps", [1, 7])
def test_trailing_model_samples_and_inverts_as_diffusers(tiny_folder, tmp_path, steps):
    """A folder whose scheduler says 'trailing' (t = 999 first): CFG sampling equals StableDiffusionPipeline with its
    DDIMScheduler, DDIM inversion equals DDIMInverseScheduler; the fast path equals the reference."""
    pipe = _with_scheduler(tiny_folder, tmp_path, timestep_spacing="trailing")
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    job = _job(pipe, z, steps, 7.5)
    ours = reference.sample(pipe, job)
    assert rel_err(ours, _diffusers_sample(pipe, z, steps, 7.5)) < 1e-5
    assert rel_err(fast.sample_batch(pipe, [job], NTIConfig(backend="fast"), progress=False), ours) < 1e-5
    cond = encode_prompts(pipe, [PROMPT])
    pivots = reference.ddim_invert(pipe, z, cond, job.schedule)
    assert rel_err(pivots[-1], _diffusers_invert(pipe, z, steps)) < 1e-5
    assert rel_err(fast.ddim_invert_batch(UNetRunner(pipe, NTIConfig(backend="fast")), z, cond, job.schedule)[-1],
                   pivots[-1]) < 1e-5


def test_linspace_model_samples_as_diffusers_and_fast_equals_reference(tiny_folder, tmp_path, cat_image):
    """'linspace' (what an EulerDiscreteScheduler config saved by recent diffusers says): sampling equals diffusers;
    null-text inversion (fast vs reference) runs on the same timesteps."""
    pipe = _with_scheduler(tiny_folder, tmp_path, timestep_spacing="linspace")
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    assert rel_err(reference.sample(pipe, _job(pipe, z, 7, 7.5)), _diffusers_sample(pipe, z, 7, 7.5)) < 1e-5
    config = NTIConfig(steps=3, inner_steps=2, early_stop=False)
    ref = nti.invert(pipe, cat_image, PROMPT, config, progress=False)[0]
    fast_inv = nti.invert(pipe, [cat_image] * 2, PROMPT, config.replace(backend="fast", batch_size=2),
                          progress=False)[0]
    assert rel_err(fast_inv.z_T, ref.z_T) < 1e-4 and rel_err(fast_inv.null_embeddings, ref.null_embeddings) < 3e-4
    # the edit reads the same schedule back from the saved settings
    assert rel_err(nti.edit_latents(pipe, [fast_inv], PROMPT, config.replace(backend="fast"), progress=False),
                   nti.edit_latents(pipe, [ref], PROMPT, config, progress=False)) < 1e-4


@pytest.mark.parametrize("steps", [1, 7])
def test_set_alpha_to_one_model_samples_and_inverts_as_diffusers(tiny_folder, tmp_path, steps):
    """set_alpha_to_one=True in the folder: the last denoising step lands on alpha_bar = 1 and the first inversion
    step leaves it, as StableDiffusionPipeline and DDIMInverseScheduler do."""
    pipe = _with_scheduler(tiny_folder, tmp_path, set_alpha_to_one=True)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    job = _job(pipe, z, steps, 7.5)
    assert job.schedule.final_alpha == 1.0
    assert rel_err(reference.sample(pipe, job), _diffusers_sample(pipe, z, steps, 7.5)) < 1e-5
    pivots = reference.ddim_invert(pipe, z, encode_prompts(pipe, [PROMPT]), job.schedule)
    assert rel_err(pivots[-1], _diffusers_invert(pipe, z, steps)) < 1e-5


def test_saved_folder_keeps_the_engines_reading_of_absent_flags(tiny_pipe, tmp_path):
    """A config without set_alpha_to_one / clip_sample (SDXL's Euler config in code) means the notebook's False here;
    the folder written for it must say False, not DDIMScheduler's defaults (True), or reloading it changes results."""
    config = {k: v for k, v in tiny_pipe.scheduler_config.items() if k not in ("set_alpha_to_one", "clip_sample")}
    folder = save_pipeline_folder(dataclasses.replace(tiny_pipe, scheduler_config=config), tmp_path / "model")
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert saved["set_alpha_to_one"] is False and saved["clip_sample"] is False
    assert make_schedule(saved, 5).final_alpha == make_schedule(config, 5).final_alpha


@pytest.mark.parametrize("offset", [0, None])
def test_an_outdated_steps_offset_runs_as_stable_diffusion_pipeline_runs_it(tiny_folder, tmp_path, offset, caplog):
    """steps_offset 0 (or absent: DDIMScheduler's 0) in an SD folder: StableDiffusionPipeline rewrites it to 1, so
    the notebook ran t = 981..1 there; the engine does the same, says so, and --steps-offset still overrides it."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_folder, copy)
    config_file = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.pop("steps_offset")
    config_file.write_text(json.dumps(config if offset is None else {**config, "steps_offset": offset}))
    with caplog.at_level("WARNING", logger="nti"):
        pipe = load_pipeline(copy, device="cpu")
    assert "steps_offset" in caplog.text and "outdated" in caplog.text
    assert make_schedule(pipe.scheduler_config, 50).timesteps[:2] == [981, 961]
    assert NTIConfig(steps_offset=0).timestep_offset(pipe.scheduler_config) == 0
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    assert rel_err(reference.sample(pipe, _job(pipe, z, 7, 7.5)), _diffusers_sample(pipe, z, 7, 7.5)) < 1e-5
    # under 'trailing' spacing the offset adds nothing (diffusers ignores it there): no warning to alarm anyone
    caplog.clear()
    config_file.write_text(json.dumps({**config, "timestep_spacing": "trailing"}))
    with caplog.at_level("WARNING", logger="nti"):
        trailing = load_pipeline(copy, device="cpu")
    assert "outdated" not in caplog.text
    assert make_schedule(trailing.scheduler_config, 50).timesteps[:2] == [999, 979]

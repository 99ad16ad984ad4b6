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
from tests.conftest import assert_fast_equals_reference, rel_err

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
    ref, edit_ref = assert_fast_equals_reference(pipe, cat_image, PROMPT, TARGET, CONFIG)
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


def _sd2_shaped_pipeline():
    """A tiny random SD 2.x-768-shaped model: linear-projection transformers, per-level head dims, upcast attention,
    a GELU text encoder, v-prediction (the parts that differ from SD v1.x)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from nti.models import _assemble, build_tiny_components, build_word_tokenizer

    _, vae, _, _, scheduler_config = build_tiny_components(seed=2)
    tokenizer = build_word_tokenizer(pad_token="!")  # SD 2.x's tokenizer pads with '!' as SDXL's second one does
    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=16, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True,
        norm_num_groups=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        hidden_act="gelu", max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    return _assemble(unet, vae, text_encoder, tokenizer, {**scheduler_config, "prediction_type": "v_prediction"},
                     torch.device("cpu"), "sd2-shaped", "sd2-shaped-random-2")


@pytest.fixture(scope="module")
def sd2_pipe(tmp_path_factory):
    folder = save_pipeline_folder(_sd2_shaped_pipeline(), tmp_path_factory.mktemp("tiny-sd2"))
    return load_pipeline(folder, device="cpu")


def test_sd2_v_sampling_equals_diffusers_pipeline(sd2_pipe):
    """CFG sampling from z_T under a prompt, the empty prompt as null: diffusers' StableDiffusionPipeline with its
    DDIMScheduler reading v_prediction gives the same latent."""
    from diffusers import StableDiffusionPipeline

    from nti import reference
    from nti.api import null_embedding
    from nti.methods import EditJob
    from nti.models import encode_prompts

    scheduler = DDIMScheduler.from_config(sd2_pipe.scheduler_config, clip_sample=False, set_alpha_to_one=False,
                                          timestep_spacing="leading")
    theirs_pipe = StableDiffusionPipeline(vae=sd2_pipe.vae, text_encoder=sd2_pipe.text_encoder,
                                          tokenizer=sd2_pipe.tokenizer, unet=sd2_pipe.unet, scheduler=scheduler,
                                          safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    z_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    schedule = make_schedule(sd2_pipe.scheduler_config, 5)
    job = EditJob(z_T=z_T, cond=encode_prompts(sd2_pipe, [PROMPT]), null=null_embedding(sd2_pipe), schedule=schedule,
                  weights=[6.0] * 5)
    ours = reference.sample(sd2_pipe, job)
    theirs = theirs_pipe(PROMPT, latents=z_T.clone(), num_inference_steps=5, guidance_scale=6.0, height=32,
                         width=32, output_type="latent").images
    assert rel_err(ours, theirs) < 1e-5, rel_err(ours, theirs)


def test_sd2_v_fast_path_equals_reference(sd2_pipe, cat_image):
    assert_fast_equals_reference(sd2_pipe, cat_image, PROMPT, TARGET, CONFIG, CONFIG.replace(edit="p2p-refine"))

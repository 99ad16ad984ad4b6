"""SDXL (Podell et al. 2023) on the engine's seams: the text conditioning (two encoders, pooled embedding, time ids)
against diffusers' own StableDiffusionXLPipeline, null-text inversion's reference vs fast path, saved inversions,
prompt-to-prompt, the CLI through the real loader, and SDXL-type folders the engine refuses."""
import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline

import nti
from nti import NTIConfig, NTIError, load_inversion, load_pipeline, save_inversion, save_pipeline_folder
from nti.api import null_embedding
from nti.artifact import inversion_key
from nti.conditioning import unet_inputs
from nti.ddim import make_schedule
from nti.methods import EditJob
from nti.models import build_tiny_xl_pipeline, encode_prompts
from nti import reference
from tests.conftest import assert_fast_equals_reference, rel_err

PROMPT, TARGET = "a cat sitting next to a mirror", "a tiger sitting next to a mirror"
CONFIG = NTIConfig(steps=4, inner_steps=3, early_stop=False)


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    """The built-in tiny SDXL-shaped model written as a diffusers SDXL folder (save_pretrained of every part)."""
    return save_pipeline_folder(build_tiny_xl_pipeline(seed=0), tmp_path_factory.mktemp("tiny-xl"))


@pytest.fixture(scope="module")
def xl_pipe(xl_folder):
    return load_pipeline(xl_folder, device="cpu")


@pytest.fixture(scope="module")
def xl_inversion(xl_pipe, cat_image):
    """The reference null-text inversion of the cat under CONFIG; the tests that only read it share this one run."""
    return nti.invert(xl_pipe, cat_image, PROMPT, CONFIG, progress=False)[0]


@pytest.fixture(scope="module")
def diffusers_pipe(xl_pipe):
    """diffusers' StableDiffusionXLPipeline over the same modules, with the DDIM scheduler the engine runs."""
    scheduler = DDIMScheduler.from_config(xl_pipe.scheduler_config, clip_sample=False, set_alpha_to_one=False,
                                          timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=xl_pipe.vae, text_encoder=xl_pipe.text_encoder,
                                     text_encoder_2=xl_pipe.text_encoder_2, tokenizer=xl_pipe.tokenizer,
                                     tokenizer_2=xl_pipe.tokenizer_2, unet=xl_pipe.unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True).to("cpu")


def test_loader_reads_an_sdxl_folder(xl_pipe):
    assert xl_pipe.pooled is not None and xl_pipe.pooled.zero_null
    assert xl_pipe.context_shape == (78, 48) and xl_pipe.resolution == 32
    assert xl_pipe.pooled.time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    assert xl_pipe.tokenizer_2.pad_token == "!" and xl_pipe.tokenizer.pad_token == "<|endoftext|>"


def test_context_equals_diffusers_encode_prompt(xl_pipe, diffusers_pipe):
    """Tokens: both encoders' penultimate layers side by side; pooled: text_encoder_2's projection; the unconditional
    input: zeros (force_zeros_for_empty_prompt), as StableDiffusionXLPipeline.encode_prompt builds them."""
    prompts = [PROMPT, "a red bus"]
    tokens, negative, pooled, negative_pooled = diffusers_pipe.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    context = encode_prompts(xl_pipe, prompts)
    assert torch.equal(context[:, :77], tokens) and torch.equal(context[:, 77, :24], pooled)
    assert not context[:, 77, 24:].any()
    null = null_embedding(xl_pipe)
    assert null.shape == (1, 78, 48) and not null.any() and not negative.any() and not negative_pooled.any()


def test_unet_call_equals_the_pipelines(xl_pipe, diffusers_pipe):
    """The packed context unpacks to the pipeline's own UNet inputs: encoder states, text_embeds, add_time_ids."""
    tokens, _, pooled, _ = diffusers_pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    time_ids = diffusers_pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), dtype=tokens.dtype,
                                                text_encoder_projection_dim=24)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    theirs = xl_pipe.unet(z, 501, encoder_hidden_states=tokens,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    ours = xl_pipe.unet(z, 501, **unet_inputs(xl_pipe.pooled, encode_prompts(xl_pipe, [PROMPT]))).sample
    assert torch.equal(ours, theirs)


def test_sampling_equals_diffusers_sdxl_pipeline(xl_pipe, diffusers_pipe):
    """The reference's CFG sampling from z_T with the pipeline's null (zeros) is StableDiffusionXLPipeline with DDIM."""
    z_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    schedule = make_schedule(xl_pipe.scheduler_config, 5)
    job = EditJob(z_T=z_T, cond=encode_prompts(xl_pipe, [PROMPT]), null=null_embedding(xl_pipe),
                  schedule=schedule, weights=[5.0] * 5)
    ours = reference.sample(xl_pipe, job)
    theirs = diffusers_pipe(PROMPT, latents=z_T.clone(), num_inference_steps=5, guidance_scale=5.0,
                            output_type="latent", height=32, width=32).images
    assert diffusers_pipe.scheduler.timesteps.tolist() == schedule.timesteps
    assert rel_err(ours, theirs) < 1e-5, rel_err(ours, theirs)


def test_fast_path_equals_reference(xl_pipe, cat_image):
    """Null-text inversion (tokens and pooled null optimized), batched fast path vs the batch-1 reference; the edit."""
    ref, _ = assert_fast_equals_reference(xl_pipe, cat_image, PROMPT, TARGET, CONFIG, z_tol=1e-5, emb_tol=1e-4)
    assert ref.null_embeddings.shape == (4, 78, 48)
    assert ref.null_embeddings[:, 77, :24].abs().amax() > 1e-3  # the pooled null moved from zeros
    assert not ref.null_embeddings[:, 77, 24:].any()  # the padding after it has no gradient
    # reconstruction under the source prompt: null-text inversion lands nearer z_0 than plain DDIM inversion
    ddim = nti.invert(xl_pipe, cat_image, PROMPT, CONFIG.replace(method="ddim"), progress=False)[0]
    recon = nti.edit_latents(xl_pipe, [ref], PROMPT, CONFIG, progress=False)
    recon_ddim = nti.edit_latents(xl_pipe, [ddim], PROMPT, CONFIG, progress=False)
    assert rel_err(recon, ref.z_0[None]) < rel_err(recon_ddim, ref.z_0[None])


def test_pooled_null_can_be_left_alone(xl_pipe, cat_image):
    """optimize_pooled=False: only the 77 token rows move (both paths); the cache key changes only when set."""
    config = CONFIG.replace(optimize_pooled=False)
    ref = nti.invert(xl_pipe, cat_image, PROMPT, config, progress=False)[0]
    fast = nti.invert(xl_pipe, cat_image, PROMPT, config.replace(backend="fast"), progress=False)[0]
    for inv in (ref, fast):
        assert not inv.null_embeddings[:, 77].any() and inv.null_embeddings[:, :77].abs().amax() > 1e-3
    assert rel_err(fast.null_embeddings, ref.null_embeddings) < 1e-4
    assert ref.settings["optimize_pooled"] is False and "optimize_pooled" not in CONFIG.result_settings({})
    assert inversion_key("h", "p", "f", config.result_settings({})) != inversion_key("h", "p", "f",
                                                                                       CONFIG.result_settings({}))


@pytest.mark.parametrize("method", ["direct", "negative-prompt"])
def test_other_methods_fast_equals_reference(xl_pipe, cat_image, method):
    config = CONFIG.replace(method=method, edit="p2p-replace")
    ref = nti.invert(xl_pipe, cat_image, PROMPT, config, progress=False)[0]
    fast = nti.invert(xl_pipe, cat_image, PROMPT, config.replace(backend="fast"), progress=False)[0]
    edit_ref = nti.edit_latents(xl_pipe, [ref], TARGET, config, progress=False)
    edit_fast = nti.edit_latents(xl_pipe, [fast], TARGET, config.replace(backend="fast"), progress=False)
    assert rel_err(edit_fast, edit_ref) < 1e-4


def test_p2p_on_sdxl_attention_layers(xl_pipe, xl_inversion):
    """Prompt-to-prompt with local blending on SDXL's transformer layers (depth 2 here): fast equals reference, and
    the edit differs from regenerating the target prompt alone."""
    inv = xl_inversion
    config = CONFIG.replace(edit="p2p-replace", blend_words=("cat",))
    ref = nti.edit_latents(xl_pipe, [inv], TARGET, config, progress=False)
    fast = nti.edit_latents(xl_pipe, [inv, inv], TARGET, config.replace(backend="fast"), progress=False)
    assert rel_err(fast[:1], ref) < 1e-4 and rel_err(fast[1:], ref) < 1e-4
    plain = nti.edit_latents(xl_pipe, [inv], TARGET, CONFIG, progress=False)
    assert rel_err(plain, ref) > 1e-3


def test_saved_inversion_round_trip(xl_pipe, xl_inversion, tmp_path):
    inv = xl_inversion
    assert inv.conditioning == {"pooled_dim": 24, "time_ids": [32.0, 32.0, 0.0, 0.0, 32.0, 32.0]}
    loaded = load_inversion(save_inversion(inv, tmp_path / "xl.safetensors"))
    assert loaded.conditioning == inv.conditioning and torch.equal(loaded.null_embeddings, inv.null_embeddings)
    assert torch.equal(nti.edit_latents(xl_pipe, [loaded], TARGET, CONFIG, progress=False),
                       nti.edit_latents(xl_pipe, [inv], TARGET, CONFIG, progress=False))
    loaded.conditioning = {**loaded.conditioning, "time_ids": [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]}
    with pytest.raises(NTIError, match="SDXL conditioning"):
        nti.edit_latents(xl_pipe, [loaded], TARGET, CONFIG, progress=False)


def test_cli_edits_through_the_real_loader(xl_folder, tmp_path):
    from nti.cli import main

    for edit in ("regenerate", "p2p-refine"):
        out = tmp_path / f"{edit}.png"
        assert main(["edit", "skimage:chelsea", "--model", str(xl_folder), "--prompt", PROMPT, "--target",
                     "a tiger sitting next to a big mirror", "--edit", edit, "--steps", "2", "--inner-steps", "1",
                     "--device", "cpu", "--out", str(out)]) == 0
        assert out.is_file() and out.stat().st_size > 0


def _edit_json(file, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.mark.parametrize("kind", ["refiner", "no_pooled_encoder", "dims", "text_embed", "class_embed"])
def test_unsupported_sdxl_kinds_exit_2(xl_folder, tmp_path, capsys, kind):
    """SDXL-type folders the engine cannot feed are refused in one line, before weights load, with exit 2."""
    from nti.cli import main

    folder = tmp_path / kind
    shutil.copytree(xl_folder, folder)
    if kind == "refiner":  # refiner: aesthetic score, only the second encoder
        _edit_json(folder / "model_index.json", requires_aesthetics_score=True)
        shutil.rmtree(folder / "text_encoder")
        match = "refiner"
    elif kind == "no_pooled_encoder":
        shutil.rmtree(folder / "text_encoder_2")
        match = "without a second text encoder"
    elif kind == "dims":
        _edit_json(folder / "unet" / "config.json", projection_class_embeddings_input_dim=999)
        match = "does not add up"
    elif kind == "text_embed":
        _edit_json(folder / "unet" / "config.json", addition_embed_type="text")
        match = "'text' added embeddings"
    else:
        _edit_json(folder / "unet" / "config.json", class_embed_type="timestep")
        match = "class_embed_type"
    with pytest.raises(NTIError, match=match):
        load_pipeline(folder, device="cpu")
    out = tmp_path / "out.png"
    assert main(["edit", "skimage:chelsea", "--model", str(folder), "--prompt", "a cat", "--target", "a dog",
                 "--out", str(out), "--steps", "2", "--inner-steps", "1"]) == 2
    err = capsys.readouterr().err
    assert match.strip("'") in err and "Traceback" not in err and not out.exists()


def test_exported_onnx_unet_takes_the_packed_context(xl_pipe, tmp_path):
    """The ONNX forward backend on SDXL: the packed context is its text input, the time ids a graph constant."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from nti import export
    from nti.export.components import COMPONENTS
    from nti.models import unet_eps

    built = export.build_forward_backend(xl_pipe, "onnx", "fp32", tmp_path)
    runner = export.load_runner("onnx", built.path, COMPONENTS["unet"](xl_pipe), xl_pipe.device)
    gen = torch.Generator().manual_seed(3)
    z, context = torch.randn(3, 4, 16, 16, generator=gen), torch.randn(3, 78, 48, generator=gen)
    out = runner(z, torch.tensor([981.0]), context)
    with torch.no_grad():
        assert rel_err(out, unet_eps(xl_pipe, z, 981, context)) < 1e-4


def test_fp16_only_weight_files_load_as_fp32(xl_folder, xl_pipe, tmp_path):
    """A folder shipped with only `*.fp16.safetensors` weights (variant files) loads, in fp32, to the same model."""
    folder = tmp_path / "fp16-only"
    shutil.copytree(xl_folder, folder)
    for file in list(folder.glob("*/*.safetensors")):
        file.rename(file.with_name(file.name.replace(".safetensors", ".fp16.safetensors")))
    pipe = load_pipeline(folder, device="cpu")
    assert next(pipe.unet.parameters()).dtype == torch.float32
    assert torch.equal(pipe.unet.conv_in.weight, xl_pipe.unet.conv_in.weight)
    assert torch.equal(pipe.text_encoder_2.text_projection.weight, xl_pipe.text_encoder_2.text_projection.weight)


def test_a_model_without_zero_null_starts_from_the_empty_prompt(xl_folder, tmp_path):
    """force_zeros_for_empty_prompt false: the unconditional input is the empty prompt through both encoders, as the
    pipeline's negative embeddings are then."""
    folder = tmp_path / "no-zeros"
    shutil.copytree(xl_folder, folder)
    _edit_json(folder / "model_index.json", force_zeros_for_empty_prompt=False)
    pipe = load_pipeline(folder, device="cpu")
    theirs = StableDiffusionXLPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder,
                                       text_encoder_2=pipe.text_encoder_2, tokenizer=pipe.tokenizer,
                                       tokenizer_2=pipe.tokenizer_2, unet=pipe.unet, scheduler=DDIMScheduler(),
                                       force_zeros_for_empty_prompt=False)
    _, negative, _, negative_pooled = theirs.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=True)
    null = null_embedding(pipe)
    assert negative.abs().amax() > 0
    assert torch.equal(null[:, :77], negative) and torch.equal(null[:, 77, :24], negative_pooled)
    # other null input, other inversions: the flag is part of the model's identity, so a cached inversion made with
    # zeros is not reused (it was, with the same weights and configs, before the flag counted)
    assert pipe.fingerprint != load_pipeline(xl_folder, device="cpu").fingerprint
    _edit_json(folder / "model_index.json", force_zeros_for_empty_prompt=True, requires_safety_checker=False)
    assert load_pipeline(folder, device="cpu").fingerprint == load_pipeline(xl_folder, device="cpu").fingerprint
    # "false" in quotes is true to Python (and to diffusers' pipeline): refused, not read as the opposite
    _edit_json(folder / "model_index.json", force_zeros_for_empty_prompt="false")
    with pytest.raises(NTIError, match="force_zeros_for_empty_prompt must be true or false"):
        load_pipeline(folder, device="cpu")


def test_an_sdxl_scheduler_that_clips_x0_is_named_not_silently_ignored(xl_folder, tmp_path, caplog):
    """clip_sample: StableDiffusionXLPipeline would clip the predicted x0 latents, the engine (as SD's pipeline) does
    not: a warning says so at load; the results are the unclipped ones."""
    copy = tmp_path / "model"
    shutil.copytree(xl_folder, copy)
    config_file = copy / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "clip_sample": True}))
    with caplog.at_level("WARNING", logger="nti"):
        load_pipeline(copy, device="cpu")
    assert "clip_sample" in caplog.text and "does not clip" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="nti"):
        load_pipeline(xl_folder, device="cpu")
    assert "clip_sample" not in caplog.text

"""The engine against diffusers' own pipelines (0.42.1), the independent truth, for SD 1.x (epsilon), SD 2.x
(v-prediction, '!' padding) and SDXL (two encoders, pooled embedding, time ids, zeroed or empty-prompt null).

Tiny random models are written with save_pretrained and read twice: by the engine's loader and, separately, by
StableDiffusion(XL)Pipeline.from_pretrained, so the folder as written is also checked to mean one model to both;
two of them run at 48 px rather than 32 (the native size sets SDXL's time ids and both pipelines' defaults).
Checked: the prompt and null embeddings (encode_prompt), CFG sampling from one z_T with an all-equal null embedding
(the empty prompt's) and its decoded image on both backends in fp32, seeded generation, image preprocessing, VAE
encoding (posterior mean, as the notebook) and decoding against VaeImageProcessor, and DDIM inversion against
DDIMInverseScheduler, with where the two legitimately differ."""
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.image_processor import VaeImageProcessor

import nti
from nti import NTIConfig, load_pipeline, reference, save_pipeline_folder
from nti.api import null_embedding
from nti.ddim import make_schedule
from nti.images import center_square, to_pil, to_tensor
from nti.methods import EditJob
from nti.models import build_tiny_pipeline, build_tiny_xl_pipeline, decode_latents, encode_images, encode_prompts
from tests.conftest import rel_err
from tests.test_prediction_types import _sd2_shaped_pipeline

PROMPT, TARGET = "a cat sitting next to a mirror", "a tiger sitting next to a mirror"
KINDS = ("sd1", "sd2-v", "xl", "xl-empty-null")
BACKENDS = ("reference", "fast")
STEPS, W = 4, 7.5
# relative latent error allowed against diffusers: v is read as noise before the DDIM step (diffusers forms x0 from
# v directly), a rounding difference of about 1e-7 per step that the random tiny UNet at w = 7.5 grows to ~1e-5
TOLERANCE = {"sd2-v": 3e-5}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One diffusers folder per model kind, each written by save_pipeline_folder (save_pretrained of every part)."""
    root = tmp_path_factory.mktemp("pipelines")
    out = {"sd1": save_pipeline_folder(build_tiny_pipeline(seed=0), root / "sd1"),
           "sd2-v": save_pipeline_folder(_sd2_shaped_pipeline(), root / "sd2-v"),
           "xl": save_pipeline_folder(build_tiny_xl_pipeline(seed=0), root / "xl")}
    out["xl-empty-null"] = root / "xl-empty-null"  # force_zeros_for_empty_prompt false: the null is ""'s
    shutil.copytree(out["xl"], out["xl-empty-null"])
    _edit_json(out["xl-empty-null"] / "model_index.json", force_zeros_for_empty_prompt=False)
    for kind in ("sd2-v", "xl-empty-null"):  # 48 px, not 32 (as SD 2.x's 768 is not 512): SDXL's time ids follow
        _edit_json(out[kind] / "unet" / "config.json", sample_size=24)
    return out


def _edit_json(file, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.fixture(scope="module", params=KINDS)
def pair(request, folders):
    """(kind, the engine's Pipeline, diffusers' pipeline) of one folder, each loaded on its own."""
    kind = request.param
    folder = folders[kind]
    ours = load_pipeline(folder, device="cpu")
    if kind.startswith("xl"):
        theirs = StableDiffusionXLPipeline.from_pretrained(folder)
    else:
        theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    return kind, ours, theirs


def _encode(theirs, prompt, negative=None, cfg=True):
    """diffusers' encode_prompt as (tokens, negative tokens, pooled, negative pooled); pooled None for SD 1.x/2.x."""
    if isinstance(theirs, StableDiffusionXLPipeline):
        return theirs.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=cfg, negative_prompt=negative)
    tokens, negative_tokens = theirs.encode_prompt(prompt, "cpu", 1, cfg, negative_prompt=negative)
    return tokens, negative_tokens, None, None


def _unpack(context, pooled):
    """The engine's context as (tokens, pooled): SDXL's last row holds the pooled embedding."""
    if pooled is None:
        return context, None
    return context[:, :-1], context[:, -1, :pooled.shape[1]]


def _pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_loaders_agree_on_the_model(pair):
    """The two loaders read one model: same weights, scheduler settings and (SDXL) zero-null flag."""
    kind, ours, theirs = pair
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if kind.startswith("xl") else ()):
        a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    config = theirs.scheduler.config
    assert type(theirs.scheduler).__name__ == "DDIMScheduler" and not config.clip_sample
    assert not config.set_alpha_to_one and config.steps_offset == 1
    assert config.prediction_type == ("v_prediction" if kind == "sd2-v" else "epsilon")
    assert ours.resolution == theirs.unet.config.sample_size * theirs.vae_scale_factor == (
        48 if kind in ("sd2-v", "xl-empty-null") else 32)
    if kind.startswith("xl"):
        assert ours.pooled.zero_null == theirs.config.force_zeros_for_empty_prompt == (kind == "xl")
        size = ours.resolution
        assert torch.equal(ours.pooled.time_ids, theirs._get_add_time_ids(
            (size, size), (0, 0), (size, size), torch.float32, ours.pooled.pooled_dim))


def test_prompt_and_null_embeddings_equal_encode_prompt(pair):
    """Conditional context = encode_prompt's tokens (SD: CLIP's last hidden state, also on SD 2.x; SDXL: both
    penultimate layers side by side) and pooled embedding; the null = its default negative embeddings: the empty
    prompt's, or zeros for tokens and pooled where SDXL's force_zeros_for_empty_prompt says so."""
    kind, ours, theirs = pair
    tokens, _, pooled, _ = _encode(theirs, [PROMPT, "a red bus"])
    ours_tokens, ours_pooled = _unpack(encode_prompts(ours, [PROMPT, "a red bus"]), pooled)
    _, negative, _, negative_pooled = _encode(theirs, PROMPT)  # batch 1, as the null is made (bitwise equal)
    null_tokens, null_pooled = _unpack(null_embedding(ours), pooled)
    assert torch.equal(ours_tokens, tokens) and torch.equal(null_tokens, negative)
    if pooled is not None:
        assert torch.equal(ours_pooled, pooled) and torch.equal(null_pooled, negative_pooled)
        assert not null_embedding(ours)[:, -1, pooled.shape[1]:].any()  # the pooled row's padding
    assert negative.abs().amax() > 0 if kind != "xl" else not negative.any() and not negative_pooled.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_edit_from_z_T_equals_the_pipeline(pair, cat_image, backend):
    """A null-text inversion with no inner iterations keeps the all-equal starting null (the pipeline's negative
    embeddings) at every step: editing it is the pipeline's DDIM sampling (eta 0) of the target from latents=z_T,
    latent to 1e-5 and decoded image to one level in 255."""
    kind, ours, theirs = pair
    config = NTIConfig(steps=STEPS, guidance=W, inner_steps=0, backend=backend)
    inv = nti.invert(ours, cat_image, PROMPT, config, progress=False)[0]
    assert torch.equal(inv.null_embeddings, null_embedding(ours).expand(STEPS, -1, -1))
    latent = nti.edit_latents(ours, [inv], TARGET, config, progress=False)
    run = dict(num_inference_steps=STEPS, guidance_scale=W, height=ours.resolution, width=ours.resolution)
    theirs_latent = theirs(TARGET, latents=inv.z_T[None].clone(), output_type="latent", **run).images
    assert rel_err(latent, theirs_latent) < TOLERANCE.get(kind, 1e-5), rel_err(latent, theirs_latent)
    image = nti.edit(ours, [inv], TARGET, config, progress=False)[0]
    theirs_image = theirs(TARGET, latents=inv.z_T[None].clone(), **run).images[0]
    assert image.size == theirs_image.size and np.abs(_pixels(image) - _pixels(theirs_image)).max() <= 1


def test_seeded_generation_equals_the_pipeline(pair):
    """nti.generate's noise is the pipeline's for the same seed (init_noise_sigma 1), and so is the image."""
    kind, ours, theirs = pair
    image = nti.generate(ours, PROMPT, NTIConfig(steps=STEPS, guidance=W, seed=3), progress=False)[0]
    theirs_image = theirs(PROMPT, num_inference_steps=STEPS, guidance_scale=W, height=ours.resolution,
                          width=ours.resolution, generator=torch.Generator().manual_seed(3)).images[0]
    assert np.abs(_pixels(image) - _pixels(theirs_image)).max() <= 1


def test_images_in_and_out_as_the_vae_image_processor(pair, cat_image):
    """Preprocessing: the notebook's centre square resized bicubic, mapped to [-1, 1], is VaeImageProcessor's
    (resample 'bicubic') of that square; diffusers' own default (Lanczos, stretch to size) is another image, so a
    non-square photo differs, by design. Encoding: the posterior mean times scaling_factor (notebook; diffusers'
    img2img draws a sample instead). Decoding: VaeImageProcessor.postprocess of vae.decode(z / scaling_factor)."""
    kind, ours, theirs = pair
    size = ours.resolution
    square = center_square(cat_image, size)
    pixels = to_tensor(square)
    bicubic = VaeImageProcessor(vae_scale_factor=theirs.vae_scale_factor, resample="bicubic")
    side = min(cat_image.size)
    left, top = (cat_image.size[0] - side) // 2, (cat_image.size[1] - side) // 2
    crop = cat_image.crop((left, top, left + side, top + side))
    assert (bicubic.preprocess(crop, height=size, width=size) - pixels).abs().max() < 1e-6
    default = theirs.image_processor.preprocess(cat_image, height=size, width=size)
    assert (default - pixels).abs().max() > 0.1  # documented: the notebook's crop and filter, not diffusers'

    with torch.no_grad():
        posterior = theirs.vae.encode(pixels).latent_dist
        mean = posterior.mean * theirs.vae.config.scaling_factor
        sample = posterior.sample(torch.Generator().manual_seed(0)) * theirs.vae.config.scaling_factor
        z0 = encode_images(ours, pixels)
        assert rel_err(z0, mean) < 1e-5 and rel_err(z0, sample) > 1e-2
        inv = nti.invert(ours, cat_image, PROMPT, NTIConfig(steps=1, method="ddim"), progress=False)[0]
        assert rel_err(inv.z_0[None], mean) < 1e-5
        decoded = theirs.vae.decode(mean / theirs.vae.config.scaling_factor).sample
    theirs_image = theirs.image_processor.postprocess(decoded, output_type="pil")[0]
    assert np.abs(_pixels(to_pil(decode_latents(ours, mean))[0]) - _pixels(theirs_image)).max() <= 1


@torch.no_grad()
def _inverse_ddim(theirs, z0, steps, **scheduler):
    """DDIM inversion (no CFG, the source prompt) with DDIMInverseScheduler.from_config of the pipeline's scheduler,
    the UNet fed as the pipeline feeds it (SDXL: pooled embedding and add_time_ids)."""
    inverse = DDIMInverseScheduler.from_config(theirs.scheduler.config, **scheduler)
    inverse.set_timesteps(steps)
    tokens, _, pooled, _ = _encode(theirs, PROMPT, cfg=False)
    extra = {}
    if pooled is not None:
        size = theirs.unet.config.sample_size * theirs.vae_scale_factor
        time_ids = theirs._get_add_time_ids((size, size), (0, 0), (size, size), dtype=tokens.dtype,
                                            text_encoder_projection_dim=pooled.shape[1])
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    z = z0
    for t in inverse.timesteps:
        z = inverse.step(theirs.unet(z, t, encoder_hidden_states=tokens, **extra).sample, t, z).prev_sample
    return z, [int(t) for t in inverse.timesteps]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddim_inversion_equals_ddim_inverse_scheduler(pair, cat_image, backend):
    """DDIM inversion (t = 1, 21, ... with the folder's steps_offset 1, v read as noise at the step's alpha) equals
    DDIMInverseScheduler's; with steps_offset 0 (the notebook's DDIMScheduler before StableDiffusionPipeline rewrites
    it to 1) both run t = 0, 20, ... instead: the offset is the one place they may differ, and it is a setting."""
    kind, ours, theirs = pair
    for offset in (None, 0):
        config = NTIConfig(steps=STEPS, method="ddim", backend=backend, steps_offset=offset)
        inv = nti.invert(ours, cat_image, PROMPT, config, progress=False)[0]
        scheduler = {} if offset is None else {"steps_offset": 0}
        z_T, timesteps = _inverse_ddim(theirs, inv.z_0[None], STEPS, **scheduler)
        assert timesteps[0] == (1 if offset is None else 0)
        assert rel_err(inv.z_T[None], z_T) < TOLERANCE.get(kind, 1e-5), (offset, rel_err(inv.z_T[None], z_T))


def test_guidance_one_is_the_pipelines_conditional_sampling(pair):
    """At w = 1 diffusers skips the unconditional pass (do_classifier_free_guidance is w > 1); the engine's
    eps_u + w (eps_c - eps_u) is then eps_c to rounding. Below 1 they differ by design (docs/models.md): diffusers
    turns guidance off, the engine keeps the formula."""
    kind, ours, theirs = pair
    z_T = torch.randn(1, *ours.latent_shape, generator=torch.Generator().manual_seed(5))
    run = dict(num_inference_steps=STEPS, height=ours.resolution, width=ours.resolution, output_type="latent")
    for w in (1.0, 0.5):
        job = EditJob(z_T=z_T, cond=encode_prompts(ours, [PROMPT]), null=null_embedding(ours),
                      schedule=make_schedule(ours.scheduler_config, STEPS), weights=[w] * STEPS)
        theirs_latent = theirs(PROMPT, latents=z_T.clone(), guidance_scale=w, **run).images
        error = rel_err(reference.sample(ours, job), theirs_latent)
        assert error < TOLERANCE.get(kind, 1e-5) if w == 1.0 else error > 1e-3, (w, error)


def test_linspace_inversion_mirrors_the_denoising_steps():
    """DDIMInverseScheduler refuses 'linspace' spacing; the engine inverts it as the mirror of DDIMScheduler's
    steps (which go from alpha(t) to alpha(t - 1000 // steps), not to the next timestep), so sampling from the
    inverted z_T retraces the pivots."""
    config = {**build_tiny_pipeline().scheduler_config, "timestep_spacing": "linspace"}
    with pytest.raises(ValueError, match="linspace is not supported"):
        DDIMInverseScheduler.from_config(config).set_timesteps(7)
    schedule = make_schedule(config, 7)
    assert schedule.timesteps[0] == 999 and schedule.timesteps[0] - schedule.timesteps[1] != schedule.step_ratio
    for i in range(7):
        t, a_from, a_to = schedule.invert_alphas(i)
        assert (t, a_to, a_from) == (schedule.timesteps[6 - i], *schedule.denoise_alphas(6 - i))


def test_an_sdxl_folder_without_its_first_text_encoder_is_refused_as_such(folders, tmp_path):
    """model_index.json naming no first text encoder (text_encoder null, as the refiner's; StableDiffusionXLPipeline
    then conditions on text_encoder_2 alone) is a model the engine does not feed, not a cut-short download: the
    error says so, rather than call the folder incomplete and send the user to copy it again."""
    folder = tmp_path / "te2-only"
    shutil.copytree(folders["xl"], folder)
    for sub in ("text_encoder", "tokenizer"):
        shutil.rmtree(folder / sub)
    _edit_json(folder / "model_index.json", text_encoder=[None, None], tokenizer=[None, None])
    with pytest.raises(nti.NTIError, match="first text encoder") as err:
        load_pipeline(folder, device="cpu")
    assert "incomplete" not in str(err.value)

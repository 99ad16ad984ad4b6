"""NTIConfig.clip_skip (--clip-skip): prompt embeddings from a layer before CLIP's last, as diffusers' encode_prompt
computes them (the independent truth, exactly), the null from the same layer, carried by the inversion to its edits
and to the cache key."""
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

import nti
from nti.api import null_embedding
from nti.cli import EXIT_BAD_INPUT, main
from nti.config import NTIError
from nti.models import build_tiny_pipeline, build_tiny_xl_pipeline, encode_prompts
from tests.conftest import rel_err

PROMPTS = ["a cat sitting next to a mirror", "a red bus"]
FEW = nti.NTIConfig(steps=3, inner_steps=2)
IMAGE = Image.new("RGB", (32, 32), (40, 160, 90))


def diffusers_pipeline(pipe):
    """diffusers' own pipeline around the engine's modules (encode_prompt reads only the encoders and tokenizers)."""
    scheduler = DDIMScheduler.from_config(pipe.scheduler_config)
    if pipe.pooled is None:
        return StableDiffusionPipeline(pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet, scheduler, None, None,
                                       requires_safety_checker=False)
    return StableDiffusionXLPipeline(pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer,
                                     pipe.tokenizer_2, pipe.unet, scheduler)


@pytest.fixture(scope="module")
def sd():
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def xl():
    return build_tiny_xl_pipeline(seed=0)


def without_last_layers(text_encoder, k: int):
    """CLIP with its last k transformer layers removed: its output (through the final layer norm, as always) is what
    clip_skip = k reads. The truth for SD 1.x, independent of hidden_states indexing: diffusers 0.42's encode_prompt
    cannot run clip_skip on transformers 5 (it reads text_encoder.text_model, which CLIPTextModel no longer has)."""
    import copy

    short = copy.deepcopy(text_encoder)
    encoder = getattr(short, "text_model", short).encoder
    encoder.layers = encoder.layers[:len(encoder.layers) - k]
    return short


@pytest.mark.parametrize("skip", [0, 1])
def test_sd_prompt_embeddings_are_clips_without_its_last_layers(sd, skip):
    tokens = sd.tokenizer(PROMPTS + [""], padding="max_length", max_length=sd.tokenizer.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = without_last_layers(sd.text_encoder, skip)(tokens)[0]
    assert torch.equal(encode_prompts(sd, PROMPTS, skip), want[:2])
    assert torch.equal(null_embedding(sd, skip), want[2:])  # the null: the empty prompt from the same layer
    if skip == 0:  # and diffusers' encode_prompt where it runs
        assert torch.equal(diffusers_pipeline(sd).encode_prompt(PROMPTS, "cpu", 1, False)[0], want[:2])


@pytest.mark.parametrize("skip", [0, 1])
def test_sdxl_prompt_embeddings_equal_encode_prompts_clip_skip(xl, skip):
    """Both encoders from the layer clip_skip + 2 from the end; the pooled row (the second encoder's projection of
    its last layer) as without clip_skip."""
    tokens, _, pooled, _ = diffusers_pipeline(xl).encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False,
                                                                clip_skip=skip or None)
    ours = encode_prompts(xl, PROMPTS, skip)
    assert torch.equal(ours[:, :-1], tokens) and torch.equal(ours[:, -1, :pooled.shape[1]], pooled)


def test_clip_skip_reaches_the_embeddings_and_changes_them(sd):
    assert not torch.equal(encode_prompts(sd, PROMPTS, 1), encode_prompts(sd, PROMPTS, 0))
    assert not torch.equal(null_embedding(sd, 1), null_embedding(sd, 0))


def test_an_inversion_carries_its_clip_skip_to_its_edits_and_cache_key(sd):
    config = FEW.replace(clip_skip=1)
    inv = nti.invert(sd, IMAGE, "a cat", config, progress=False)[0]
    plain = nti.invert(sd, IMAGE, "a cat", FEW, progress=False)[0]
    assert inv.settings["clip_skip"] == 1 and "clip_skip" not in plain.settings  # default: keys as before
    assert inv.key != plain.key and not torch.equal(inv.null_embeddings, plain.null_embeddings)
    edited = nti.edit_latents(sd, [inv], "a dog", config, progress=False)
    # the edit takes the inversion's clip_skip: a config left at the default edits it the same, without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = nti.edit_latents(sd, [inv], "a dog", FEW, progress=False)
    assert torch.equal(again, edited)
    # and a config that says otherwise is told it is not used
    with pytest.warns(UserWarning, match=r"clip_skip 1 \(the inversion's: 0\)"):
        nti.edit_latents(sd, [plain], "a dog", config, progress=False)


def test_fast_path_equals_the_reference_under_clip_skip(sd):
    config = FEW.replace(clip_skip=1)
    ref = nti.invert(sd, IMAGE, "a cat", config, progress=False)[0]
    fast = nti.invert(sd, [IMAGE] * 2, "a cat", config.replace(backend="fast", batch_size=2), progress=False)[0]
    assert fast.settings["clip_skip"] == 1
    assert rel_err(fast.z_T, ref.z_T) < 1e-4 and rel_err(fast.null_embeddings, ref.null_embeddings) < 3e-4


def test_too_many_skipped_layers_are_refused(sd, xl, tmp_path, capsys):
    with pytest.raises(NTIError, match=r"clip_skip 2 skips more layers than model tiny's text encoder has \(2\): at "
                                       r"most 1"):
        nti.invert(sd, IMAGE, "a cat", FEW.replace(clip_skip=2), progress=False)
    with pytest.raises(NTIError, match=r"at most 1"):
        nti.generate(xl, "a cat", FEW.replace(clip_skip=2), progress=False)
    with pytest.raises(NTIError, match="clip_skip must be a non-negative integer; got -1"):
        FEW.replace(clip_skip=-1)
    out = tmp_path / "out.png"
    assert main(["reconstruct", "skimage:chelsea", "--prompt", "a cat", "--model", "tiny", "--steps", "2",
                 "--clip-skip", "5", "--out", str(out), "--quiet"]) == EXIT_BAD_INPUT
    assert "clip_skip 5 skips more layers" in capsys.readouterr().err and not out.exists()

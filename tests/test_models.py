"""Model loading through the real diffusers/transformers path, offline, with clear errors."""
import json
import shutil

import pytest
import torch

from nti import NTIError, load_pipeline, save_pipeline_folder
from nti.models import encode_prompts, unet_eps


@pytest.fixture(scope="module")
def saved_folder(tiny_pipe, tmp_path_factory):
    return save_pipeline_folder(tiny_pipe, tmp_path_factory.mktemp("tiny-sd"))


def test_saved_tiny_folder_loads_and_predicts_the_same(tiny_pipe, saved_folder):
    pipe = load_pipeline(saved_folder, device="cpu")
    assert pipe.resolution == 32 and pipe.latent_shape == (4, 16, 16)
    text = encode_prompts(pipe, ["a cat sitting next to a mirror"])
    assert torch.equal(text, encode_prompts(tiny_pipe, ["a cat sitting next to a mirror"]))
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():  # same weights; the reloaded module may pick other kernels, so float-rounding close
        torch.testing.assert_close(unet_eps(pipe, z, 500, text), unet_eps(tiny_pipe, z, 500, text),
                                   rtol=1e-5, atol=1e-5)
    assert pipe.fingerprint == load_pipeline(saved_folder, device="cpu").fingerprint


def test_tokenizer_spells_scene_words_whole(tiny_pipe):
    assert tiny_pipe.tokenizer.tokenize("a cat sitting next to a mirror") == [
        "a</w>", "cat</w>", "sitting</w>", "next</w>", "to</w>", "a</w>", "mirror</w>"]
    assert tiny_pipe.tokenizer("a tiger").input_ids[0] == tiny_pipe.tokenizer.bos_token_id


def test_incomplete_folder_names_what_is_missing(saved_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved_folder, broken)
    shutil.rmtree(broken / "vae")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(NTIError, match=r"missing .*unet/diffusion_pytorch_model.*vae/"):
        load_pipeline(broken, device="cpu")


def test_corrupt_weights_give_a_clear_error(saved_folder, tmp_path):
    broken = tmp_path / "corrupt"
    shutil.copytree(saved_folder, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(NTIError, match="could not load the model"):
        load_pipeline(broken, device="cpu")


def test_missing_folder_and_uncached_repo_id_fail_without_network(tmp_path, monkeypatch):
    with pytest.raises(NTIError, match="does not exist"):
        load_pipeline(tmp_path / "nope", device="cpu")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(NTIError, match="not in the local Hugging Face cache"):
        load_pipeline("CompVis/stable-diffusion-v1-4", device="cpu")


def test_a_single_file_checkpoint_is_refused_with_how_to_convert_it(tmp_path):
    checkpoint, other = tmp_path / "v1-5-pruned.safetensors", tmp_path / "notes.txt"
    checkpoint.write_bytes(b"\0" * 16)
    other.write_text("x")
    with pytest.raises(NTIError, match=r"got a file; a single-file checkpoint must be converted once: .*from_single_file"):
        load_pipeline(checkpoint, device="cpu")
    with pytest.raises(NTIError, match=r"got a file$"):
        load_pipeline(other, device="cpu")


def test_unavailable_device_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(NTIError, match="CUDA is not available"):
        load_pipeline(None, device="cuda")
    with pytest.raises(NTIError, match="unknown device"):
        load_pipeline(None, device="tpu9")


def _edit_json(file, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.mark.parametrize("kind", ["zero_snr", "thresholding", "sdxl_index", "sdxl_encoder", "sdxl_unet", "inpainting"])
def test_unsupported_model_kinds_are_refused_at_load(saved_folder, tmp_path, kind):
    """A model the DDIM/NTI math here does not fit is refused in one line before any weight loads, never run."""
    folder = tmp_path / kind
    shutil.copytree(saved_folder, folder)
    if kind == "zero_snr":
        _edit_json(folder / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=True)
        match = "zero terminal SNR"
    elif kind == "thresholding":  # diffusers' DDIMScheduler would threshold x0; the engine's step does not
        _edit_json(folder / "scheduler" / "scheduler_config.json", thresholding=True)
        match = "thresholds the predicted x0"
    elif kind == "sdxl_index":
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
        match = "SDXL"
    elif kind == "sdxl_encoder":
        shutil.copytree(folder / "text_encoder", folder / "text_encoder_2")
        match = "SDXL"
    elif kind == "sdxl_unet":
        _edit_json(folder / "unet" / "config.json", addition_embed_type="text_time")
        match = "SDXL"
    else:
        _edit_json(folder / "unet" / "config.json", in_channels=9)
        match = "9 input channels"
    with pytest.raises(NTIError, match=match):
        load_pipeline(folder, device="cpu")


def test_unsupported_model_exits_2_on_the_cli(saved_folder, tmp_path, capsys):
    from nti.cli import main

    folder = tmp_path / "sdxl"
    shutil.copytree(saved_folder, folder)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    code = main(["edit", "skimage:chelsea", "--model", str(folder), "--prompt", "a cat", "--target", "a dog",
                 "--out", str(tmp_path / "out.png"), "--steps", "2", "--inner-steps", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "SDXL" in err and "Traceback" not in err
    assert not (tmp_path / "out.png").exists()

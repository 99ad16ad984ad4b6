"""Local Stable Diffusion folders in the shapes they are kept on disk: each loads and runs as diffusers would, or is
refused with one NTIError naming the folder and what to do (CLI: `nti: error:`, exit 2), never a traceback."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import nti
from nti import NTIConfig, NTIError, load_pipeline, save_pipeline_folder
from nti.models import build_tiny_pipeline, build_tiny_xl_pipeline, encode_prompts, fingerprint_folder, unet_eps

FEW = dict(steps=2, inner_steps=1)


@pytest.fixture(scope="module")
def sd_folder(tiny_pipe, tmp_path_factory):
    return save_pipeline_folder(tiny_pipe, tmp_path_factory.mktemp("audit-sd"))


@pytest.fixture(scope="module")
def other_folder(tmp_path_factory):
    """Another model of the same shapes and file sizes (seed 1)."""
    return save_pipeline_folder(build_tiny_pipeline(seed=1), tmp_path_factory.mktemp("audit-other"))


@pytest.fixture(scope="module")
def xl_folder(tmp_path_factory):
    return save_pipeline_folder(build_tiny_xl_pipeline(seed=0), tmp_path_factory.mktemp("audit-xl"))


def _copy(folder, tmp_path, name="model"):
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    return copy


def _edit_json(file, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _cli(tmp_path, model):
    from nti.cli import main
    return main(["edit", "skimage:chelsea", "--model", str(model), "--prompt", "a cat", "--target", "a dog",
                 "--out", str(tmp_path / "out.png"), "--steps", "2", "--inner-steps", "1"])


# ------------------------------------------------------------------------------------------- identity (fingerprint)

def test_symlinked_component_folders_are_fingerprinted_by_their_weights(sd_folder, other_folder, tmp_path):
    """A model folder whose unet/, vae/, ... are symlinks (one copy of the weights shared between folders): the
    fingerprint skipped every file behind them, so two different models had the same (empty) fingerprint, and a
    cached or saved inversion of the one was used with the other."""
    links = {}
    for name, source in (("a", sd_folder), ("b", other_folder)):
        links[name] = tmp_path / name
        links[name].mkdir()
        for entry in source.iterdir():
            (links[name] / entry.name).symlink_to(entry)
    assert fingerprint_folder(links["a"]) == fingerprint_folder(sd_folder)
    assert fingerprint_folder(links["b"]) == fingerprint_folder(other_folder) != fingerprint_folder(sd_folder)
    assert load_pipeline(links["b"], device="cpu").fingerprint == load_pipeline(other_folder, device="cpu").fingerprint


def test_a_lora_fused_into_attention_weights_is_another_model(tmp_path):
    """A LoRA fused into a cross-attention projection changes neither a weight file's size nor (for a tensor in the
    middle of it) its first and last MiB, all the fingerprint read: the fused model passed as the base model, so
    the base model's cached and saved inversions were edited with it. Whole-file hashes tell them apart; an
    inversion saved under the former fingerprint is still accepted by the model it names, and only by it."""
    import dataclasses

    from safetensors import safe_open

    from nti.models import SHAPES_FOLDER, legacy_fingerprint_folder

    fused = shutil.copytree(SHAPES_FOLDER, tmp_path / "fused")
    file = fused / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(file, "pt") as fh:
        metadata = fh.metadata()
    weights = load_file(file)
    name = sorted(n for n in weights if n.endswith("attn2.to_k.weight"))[1]
    down, up = torch.randn(4, weights[name].shape[1]), torch.randn(weights[name].shape[0], 4)
    weights[name] = weights[name] + 1e-3 * up @ down  # W + B A, a rank-4 LoRA fused
    save_file(weights, file, metadata)
    assert file.stat().st_size == (SHAPES_FOLDER / file.relative_to(fused)).stat().st_size
    assert legacy_fingerprint_folder(fused) == legacy_fingerprint_folder(SHAPES_FOLDER)  # the former blind spot
    assert fingerprint_folder(fused) != fingerprint_folder(SHAPES_FOLDER)

    base, other = nti.load_pipeline(), load_pipeline(fused, device="cpu")
    inv = nti.invert(base, "engine/assets/scenes/scene0.png", "a yellow triangle on a gray background",
                     NTIConfig(**FEW, method="ddim"), progress=False)[0]
    with pytest.raises(NTIError, match="made with model"):
        nti.edit_latents(other, inv, "a red triangle on a gray background", NTIConfig(**FEW), progress=False)
    old = dataclasses.replace(inv, model_fingerprint=base.legacy_fingerprint)  # saved by nti before this change
    nti.edit_latents(base, old, "a red triangle on a gray background", NTIConfig(**FEW, method="ddim"),
                     progress=False)


def test_file_hashes_are_remembered_until_the_file_changes(sd_folder, tmp_path, monkeypatch):
    """The whole-file hashes are kept (models.hash_memo_path) by path, size, times and inode: a second load reads
    no weight file through; a file rewritten in place to the same size, its mtime set back, is hashed again."""
    import hashlib
    import os

    from nti import models

    monkeypatch.setenv("NTI_HASH_MEMO", str(tmp_path / "memo.json"))
    folder = _copy(sd_folder, tmp_path)
    first = fingerprint_folder(folder)
    memo = json.loads((tmp_path / "memo.json").read_text())
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert memo[os.path.realpath(weights)]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    hashed = []
    real = models.hashlib.sha256
    monkeypatch.setattr(models.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    assert fingerprint_folder(folder) == first and len(hashed) == 1  # the folder's own digest only

    data, stat = bytearray(weights.read_bytes()), weights.stat()
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint_folder(folder) != first
    (tmp_path / "memo.json").write_text("not json")  # a damaged memo costs the hashing, nothing else
    assert fingerprint_folder(folder) == fingerprint_folder(folder) != first


# ---------------------------------------------------------------------------------------------- weight file layouts

def test_sharded_weights_with_an_index_load_to_the_same_model(sd_folder, tiny_pipe, tmp_path):
    """save_pretrained shards a component past its max_shard_size (SDXL's fp32 UNet, 10.3 GB, with diffusers'
    default 10 GB): `diffusion_pytorch_model-0000N-of-0000M.safetensors` plus an index json. It was refused as
    'incomplete: missing unet/diffusion_pytorch_model.safetensors'."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = _copy(sd_folder, tmp_path)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    shutil.rmtree(folder / "unet")
    shutil.rmtree(folder / "text_encoder")
    unet.save_pretrained(folder / "unet", max_shard_size="200KB")
    text_encoder.save_pretrained(folder / "text_encoder", max_shard_size="100KB", variant="fp16")  # fp32 values
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert (folder / "text_encoder" / "model.safetensors.index.fp16.json").is_file()
    pipe = load_pipeline(folder, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), tiny_pipe.unet.state_dict().values()))
    assert torch.equal(encode_prompts(pipe, ["a cat"]), encode_prompts(tiny_pipe, ["a cat"]))
    assert nti.invert(pipe, "skimage:chelsea", "a cat", NTIConfig(**FEW), progress=False)[0].z_T.isfinite().all()


def test_fp16_bin_variant_weights_load_as_fp32(sd_folder, tiny_pipe, tmp_path):
    """Only `*.fp16.bin` weight files (the pickled fp16 variant that SD v1.5 and 2.x repositories carry): refused
    as incomplete; now loaded, in the fp32 asked for, to the fp16-rounded weights."""
    folder = _copy(sd_folder, tmp_path)
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        file = folder / sub / f"{name}.safetensors"
        bin_name = "pytorch_model" if sub == "text_encoder" else name
        torch.save({k: v.half() for k, v in load_file(file).items()}, folder / sub / f"{bin_name}.fp16.bin")
        file.unlink()
    pipe = load_pipeline(folder, device="cpu")
    assert next(pipe.unet.parameters()).dtype == torch.float32
    assert torch.equal(pipe.unet.conv_in.weight, tiny_pipe.unet.conv_in.weight.half().float())
    ours, theirs = pipe.text_encoder.state_dict(), tiny_pipe.text_encoder.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k].half().float()) for k in ours)


@pytest.mark.parametrize("sub, file", [("unet", "diffusion_pytorch_model.safetensors"),
                                       ("vae", "diffusion_pytorch_model.safetensors"),
                                       ("text_encoder", "model.safetensors")])
def test_a_weight_file_lacking_tensors_is_refused_naming_them(sd_folder, tmp_path, sub, file):
    """A weight file without some of the model's tensors (truncated conversion, another architecture's file): the
    UNet and VAE failed later with NotImplementedError 'Cannot copy out of meta tensor' (a traceback from
    load_pipeline); the text encoder loaded with the missing tensors randomly initialized, a silently wrong model."""
    folder = _copy(sd_folder, tmp_path)
    weights = load_file(folder / sub / file)
    dropped = sorted(weights)[-1]
    del weights[dropped]
    save_file(weights, folder / sub / file, metadata={"format": "pt"})
    with pytest.raises(NTIError, match=rf"{sub}/ weights lack 1 of the model's tensors \({dropped}\)"):
        load_pipeline(folder, device="cpu")


def test_a_weight_file_lacking_tensors_exits_2_on_the_cli(sd_folder, tmp_path, capsys):
    folder = _copy(sd_folder, tmp_path)
    weights = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    del weights[sorted(weights)[0]]
    save_file(weights, folder / "vae" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    assert _cli(tmp_path, folder) == 2
    err = capsys.readouterr().err
    assert err.startswith("nti: error:") and "vae/ weights lack" in err and "internal error" not in err


# ------------------------------------------------------------------------------------------------ component configs

@pytest.mark.parametrize("length", [None, 100])
def test_a_tokenizer_longer_than_the_text_encoder_is_refused_at_load(sd_folder, tmp_path, length):
    """A tokenizer folder without tokenizer_config.json (vocab and merges, or tokenizer.json, alone) has
    model_max_length 1e30: the context was (1e30, D) and encoding a prompt padded to it. One of 100 positions for
    a 77-position text encoder failed at the first prompt with ValueError."""
    folder = _copy(sd_folder, tmp_path)
    config = folder / "tokenizer" / "tokenizer_config.json"
    if length is None:
        config.unlink()
    else:
        _edit_json(config, model_max_length=length)
    with pytest.raises(NTIError, match=r"tokenizer/ pads prompts to \d+ tokens, but text_encoder/ reads at most 77 "
                                       r"\(max_position_embeddings\); set \"model_max_length\": 77 in "
                                       r"tokenizer/tokenizer_config.json"):
        load_pipeline(folder, device="cpu")


def test_sdxl_tokenizers_of_different_lengths_are_refused_at_load(xl_folder, tmp_path):
    """SDXL concatenates the two encoders' token states along the features: 77 and 64 tokens loaded, then the first
    prompt failed in torch.cat with RuntimeError."""
    folder = _copy(xl_folder, tmp_path)
    _edit_json(folder / "tokenizer_2" / "tokenizer_config.json", model_max_length=64)
    with pytest.raises(NTIError, match=r"tokenizer/ pads prompts to 77 tokens and tokenizer_2/ to 64; .*same "
                                       r"model_max_length"):
        load_pipeline(folder, device="cpu")


def test_a_unet_whose_cross_attention_disagrees_with_the_text_encoder_is_refused(sd_folder, tmp_path):
    """A UNet from another model (cross_attention_dim 48) next to a 32-wide text encoder loaded, then the first UNet
    call failed: RuntimeError 'mat1 and mat2 shapes cannot be multiplied (77x32 and 48x32)'."""
    from diffusers import UNet2DConditionModel

    folder = _copy(sd_folder, tmp_path)
    _rebuild(folder, "unet", UNet2DConditionModel, cross_attention_dim=48)
    with pytest.raises(NTIError, match=r"UNet cross_attention_dim 48 is not its text encoder's width 32"):
        load_pipeline(folder, device="cpu")


def test_an_sdxl_unet_whose_cross_attention_disagrees_with_both_encoders_is_refused(xl_folder, tmp_path):
    folder = _copy(xl_folder, tmp_path)
    _edit_json(folder / "text_encoder_2" / "config.json", hidden_size=40)
    with pytest.raises(NTIError, match=r"UNet cross_attention_dim 48 is not its text encoders' widths 16 \+ 40"):
        load_pipeline(folder, device="cpu")


def _rebuild(folder, sub, cls, **changes):
    """Replace a component by a randomly initialized one of its config with `changes` (consistent weights)."""
    config = {k: v for k, v in json.loads((folder / sub / "config.json").read_text()).items() if not k.startswith("_")}
    shutil.rmtree(folder / sub)
    cls(**{**config, **changes}).save_pretrained(folder / sub)


def test_a_vae_with_other_latent_channels_is_refused(sd_folder, tmp_path):
    """A 16-channel VAE (SD3's kind) next to a 4-channel UNet loaded, then failed in the first UNet call."""
    from diffusers import AutoencoderKL

    folder = _copy(sd_folder, tmp_path)
    _rebuild(folder, "vae", AutoencoderKL, latent_channels=16)
    with pytest.raises(NTIError, match=r"its VAE makes 16-channel latents for a UNet of 4 input channels"):
        load_pipeline(folder, device="cpu")


@pytest.mark.parametrize("change, match", [
    # Playground v2.5 (SDXL architecture): latents normalized per channel, an EDM noise schedule without betas
    (("vae", "config.json", dict(latents_mean=[0.1] * 4, latents_std=[0.5] * 4)), "latents_mean"),
    (("vae", "config.json", dict(shift_factor=0.1159)), "shift_factor"),
    (("scheduler", "scheduler_config.json", dict(_class_name="EDMDPMSolverMultistepScheduler", sigma_data=0.5)),
     "EDMDPMSolverMultistepScheduler"),
    (("scheduler", "scheduler_config.json", dict(_class_name="FlowMatchEulerDiscreteScheduler", shift=3.0)),
     "FlowMatchEulerDiscreteScheduler"),
])
def test_latent_normalization_and_non_ddpm_schedules_are_refused(sd_folder, tmp_path, change, match):
    """The engine scales latents by scaling_factor alone and builds DDIM from the config's betas: a VAE that also
    shifts or normalizes latents, or an EDM / flow-matching scheduler (no betas: DDIMScheduler.from_config fell back
    to its default linear 1e-4..0.02), loaded and ran with silently wrong latents or noise levels."""
    folder = _copy(sd_folder, tmp_path)
    *parts, changes = change
    _edit_json(folder.joinpath(*parts), **changes)
    with pytest.raises(NTIError, match=rf"cannot be inverted by this engine: .*{match}"):
        load_pipeline(folder, device="cpu")


def test_null_latent_normalization_fields_are_fine(sd_folder, tiny_pipe, tmp_path):
    """AutoencoderKL writes latents_mean/latents_std/shift_factor as null (SDXL's VAE config has them so)."""
    folder = _copy(sd_folder, tmp_path)
    _edit_json(folder / "vae" / "config.json", latents_mean=None, latents_std=None, shift_factor=None)
    pipe = load_pipeline(folder, device="cpu")
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(unet_eps(pipe, z, 501, encode_prompts(pipe, ["a cat"])),
                                   unet_eps(tiny_pipe, z, 501, encode_prompts(tiny_pipe, ["a cat"])))


# --------------------------------------------------------------------------------- folders that are not SD pipelines

@pytest.mark.parametrize("kind", ["sd3", "flux", "unet_component", "controlnet"])
def test_folders_of_other_kinds_are_named_not_called_incomplete(sd_folder, tmp_path, kind):
    """An SD3 or Flux folder (transformer/, no unet/), one component folder (the model's unet/ itself, a
    ControlNet): each was refused as 'incomplete: missing unet/, ...', as if a download had been cut short."""
    folder = tmp_path / kind
    if kind in ("sd3", "flux"):
        name = "StableDiffusion3Pipeline" if kind == "sd3" else "FluxPipeline"
        (folder / "transformer").mkdir(parents=True)
        (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
        (folder / "model_index.json").write_text(json.dumps({"_class_name": name,
                                                             "transformer": ["diffusers", "SD3Transformer2DModel"]}))
        match = rf"model_index.json names {name}, not .*StableDiffusionPipeline"
    elif kind == "unet_component":
        folder = sd_folder / "unet"
        match = r"holds one UNet2DConditionModel \(a pipeline's component\), not a whole pipeline; pass the folder " \
                r"that holds model_index.json, unet/, vae/"
    else:
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 16)
        match = r"holds one ControlNetModel"
    with pytest.raises(NTIError, match=match):
        load_pipeline(folder, device="cpu")


LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 492265879\n".format("0" * 64)


@pytest.mark.parametrize("file, content, match", [
    # a `git clone` of a hub repository without git-lfs: transformers said 'SafetensorError: Error while
    # deserializing header: header too large'
    ("text_encoder/model.safetensors", LFS_POINTER,
     r"text_encoder/model.safetensors is a Git LFS pointer, not the weights \(a git clone without git-lfs\); run "
     r"`git lfs install && git lfs pull` in "),
    ("unet/diffusion_pytorch_model.safetensors", LFS_POINTER, r"unet/diffusion_pytorch_model.safetensors is a Git LFS"),
    # an interrupted copy: 'OSError: Unable to load weights from checkpoint file for ...'
    ("vae/diffusion_pytorch_model.safetensors", "", r"vae/diffusion_pytorch_model.safetensors is empty \(0 bytes: "
                                                    r"an interrupted download or copy\?\); copy it again"),
])
def test_placeholder_weight_files_are_named_with_what_to_do(sd_folder, tmp_path, file, content, match):
    folder = _copy(sd_folder, tmp_path)
    (folder / file).write_text(content)
    with pytest.raises(NTIError, match=match):
        load_pipeline(folder, device="cpu")


def test_a_non_square_unet_sample_size_is_refused(sd_folder, tmp_path):
    """sample_size [16, 8] loaded (resolution [16, 8, 16, 8]) and failed in the image preparation with TypeError."""
    folder = _copy(sd_folder, tmp_path)
    _edit_json(folder / "unet" / "config.json", sample_size=[16, 8])
    with pytest.raises(NTIError, match=r"its UNet sample_size \[16, 8\] is not square"):
        load_pipeline(folder, device="cpu")


@pytest.mark.parametrize("model, match", [
    # RuntimeError: Could not determine home directory (CLI: 'internal error')
    ("~nti-no-such-user/models/sd", r"--model ~nti-no-such-user/models/sd: there is no user nti-no-such-user to "
                                    r"expand ~nti-no-such-user"),
    # OSError: [Errno 36] File name too long
    ("m" * 300 + "/sd", r"--model m+/sd: File name too long"),
])
def test_unusable_model_paths_are_an_ntierror(model, match):
    with pytest.raises(NTIError, match=match):
        load_pipeline(model, device="cpu")


@pytest.mark.parametrize("unet_class", ["UNet2DModel", "UNetMotionModel", "UNetSpatioTemporalConditionModel"])
def test_a_unet_of_another_class_is_refused_naming_it(sd_folder, tmp_path, unet_class):
    """An unconditional DDPM folder (unet/ only) was 'incomplete: missing vae/, text_encoder/, ...'; AnimateDiff's
    motion UNet loaded as a plain image UNet with its motion modules dropped."""
    folder = _copy(sd_folder, tmp_path)
    _edit_json(folder / "unet" / "config.json", _class_name=unet_class)
    if unet_class == "UNet2DModel":
        for sub in ("vae", "text_encoder", "tokenizer"):
            shutil.rmtree(folder / sub)
        (folder / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    with pytest.raises(NTIError, match=rf"cannot be inverted by this engine: its unet/ is a {unet_class}, not "
                                       r"Stable Diffusion's UNet2DConditionModel"):
        load_pipeline(folder, device="cpu")


@pytest.mark.parametrize("sub, changes, match", [
    ("vae", dict(_class_name="AutoencoderTiny"), r"its vae/ is a AutoencoderTiny, not AutoencoderKL"),
    ("text_encoder", dict(model_type="t5", architectures=["T5EncoderModel"]),
     r"its text_encoder/ is a T5EncoderModel, not CLIP's text model"),
    ("text_encoder", dict(model_type="roberta", architectures=["RobertaSeriesModelWithTransformation"]),
     r"its text_encoder/ is a RobertaSeriesModelWithTransformation, not CLIP's text model"),
])
def test_other_vae_and_text_encoder_classes_are_refused_naming_them(sd_folder, tmp_path, sub, changes, match):
    """Loaded as AutoencoderKL / CLIPTextModel, another class's weights read as tensors missing from an incomplete
    file (or loaded into the wrong architecture): say what the component is instead."""
    folder = _copy(sd_folder, tmp_path)
    _edit_json(folder / sub / "config.json", **changes)
    with pytest.raises(NTIError, match=rf"cannot be inverted by this engine: {match}"):
        load_pipeline(folder, device="cpu")


def test_a_folder_of_single_file_checkpoints_is_named_with_how_to_convert(tmp_path):
    """A web UI's checkpoint folder (v1-5-pruned-emaonly.safetensors, ...): was 'incomplete: missing unet/, vae/,
    text_encoder/, tokenizer/, scheduler/'."""
    import os

    for name in ("v1-5-pruned-emaonly.safetensors", "dreamshaper_8.ckpt"):
        (tmp_path / name).touch()
        os.truncate(tmp_path / name, 2 << 30)  # sparse: 2 GB as a checkpoint is, no disk used
    (tmp_path / "inv.safetensors").write_bytes(b"\0" * 16)  # a saved inversion, not a checkpoint
    with pytest.raises(NTIError, match=r"holds single-file checkpoints \(dreamshaper_8.ckpt, v1-5-pruned-emaonly"
                                       r".safetensors\), not a diffusers folder; .*from_single_file\(FILE, "):
        load_pipeline(tmp_path, device="cpu")


SD14_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}  # stable-diffusion-v1-4/scheduler/scheduler_config.json


def test_sd14_layout_with_another_vae_scale_generates_as_stable_diffusion_pipeline(sd_folder, tmp_path):
    """SD v1.4's own layout (a PNDM scheduler config, safety checker and feature extractor listed and present) with
    a VAE scaling_factor of 0.5: the engine's DDIM from that config and its latent scaling give the images
    StableDiffusionPipeline gives with DDIMScheduler.from_config of the folder's scheduler."""
    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    folder = _copy(sd_folder, tmp_path)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD14_SCHEDULER))
    _edit_json(folder / "vae" / "config.json", scaling_factor=0.5)
    _edit_json(folder / "model_index.json", scheduler=["diffusers", "PNDMScheduler"], requires_safety_checker=True,
               safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
               feature_extractor=["transformers", "CLIPImageProcessor"])
    for sub, name in (("safety_checker", "config.json"), ("feature_extractor", "preprocessor_config.json")):
        (folder / sub).mkdir()
        (folder / sub / name).write_text("{}")
    pipe = load_pipeline(folder, device="cpu")
    assert pipe.scaling_factor == 0.5
    config = NTIConfig(steps=4, guidance=5.0, seed=3)
    ours = np.asarray(nti.generate(pipe, "a cat", config, progress=False)[0], dtype=np.float32) / 255
    theirs = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                     unet=pipe.unet, scheduler=DDIMScheduler.from_config(SD14_SCHEDULER),
                                     safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    z_T = torch.randn((1, *pipe.latent_shape), generator=torch.Generator().manual_seed(3))
    image = theirs("a cat", latents=z_T, num_inference_steps=4, guidance_scale=5.0, height=32, width=32,
                   output_type="np").images[0]
    assert np.abs(ours - image).max() <= 1 / 255 + 1e-4
    # and the latent scale is the folder's: with SD's 0.18215 the same latents decode to another image
    assert np.abs(np.asarray(nti.generate(load_pipeline(sd_folder, device="cpu"), "a cat", config, progress=False)[0],
                             dtype=np.float32) / 255 - image).max() > 0.05


def test_a_symlink_loop_in_a_model_folder_is_walked_once(sd_folder, tmp_path):
    """Following symlinked folders, a link back up (unet/up -> ..) was walked until the path was too long: forty
    nested copies of the model hashed into its fingerprint, seconds per load."""
    folder = _copy(sd_folder, tmp_path)
    (folder / "unet" / "up").symlink_to("..")
    assert fingerprint_folder(folder) == fingerprint_folder(sd_folder)


def test_an_sdxl_base_folder_without_its_first_text_encoder_is_incomplete_not_a_refiner(xl_folder, tmp_path):
    """model_index.json says StableDiffusionXLPipeline (a refiner's says StableDiffusionXLImg2ImgPipeline and
    requires_aesthetics_score): a missing text_encoder/ (a cut-short download) was called 'an SDXL refiner'."""
    folder = _copy(xl_folder, tmp_path)
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(NTIError, match=r"is incomplete: missing text_encoder/$"):
        load_pipeline(folder, device="cpu")


@pytest.mark.parametrize("offline", ["1", "0"])
def test_a_repo_id_in_the_local_cache_loads_without_the_network(sd_folder, tmp_path, monkeypatch, offline):
    """A repo id resolves to its snapshot in the local Hugging Face cache, HF_HUB_OFFLINE set or not, and nothing
    opens a connection; one not cached says so."""
    import socket

    import huggingface_hub.constants

    revision = "0" * 40
    repo = tmp_path / "hub" / "models--someone--sd-tiny"
    shutil.copytree(sd_folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail(f"a connection was opened: {a}"))
    pipe = load_pipeline("someone/sd-tiny", device="cpu")
    assert pipe.name == "someone/sd-tiny" and pipe.fingerprint == fingerprint_folder(sd_folder)
    with pytest.raises(NTIError, match="'someone/other' is not in the local Hugging Face cache and nothing is "
                                       "downloaded here"):
        load_pipeline("someone/other", device="cpu")


@pytest.mark.parametrize("file", ["tokenizer/tokenizer_config.json", "text_encoder/model.safetensors"])
def test_a_component_that_fails_to_load_is_named(sd_folder, tmp_path, file):
    """'could not load the model in FOLDER: JSONDecodeError: Unterminated string starting at: line 3 column 16' did
    not say which of the folder's files to replace."""
    folder = _copy(sd_folder, tmp_path)
    (folder / file).write_text((folder / file).read_text(errors="replace")[:50])
    part = file.split("/")[0]
    with pytest.raises(NTIError, match=rf"could not load the model in .*: its {part}/ failed to load \(\w+Error: .*"
                                       rf"\); copy or download {part}/ again"):
        load_pipeline(folder, device="cpu")


def test_a_hugging_face_cache_entry_is_named_with_its_repo_id(sd_folder, tmp_path):
    """~/.cache/huggingface/hub/models--org--name itself (its files are under snapshots/HASH/): was 'incomplete:
    missing unet/, vae/, text_encoder/, tokenizer/, scheduler/'."""
    entry = tmp_path / "models--someone--sd-tiny"
    shutil.copytree(sd_folder, entry / "snapshots" / ("0" * 40))
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    with pytest.raises(NTIError, match=r"is a Hugging Face cache entry; pass its repo id someone/sd-tiny \(from "
                                       r"this cache\) or its snapshot folder .*snapshots/0{40}"):
        load_pipeline(entry, device="cpu")


def test_a_controlnet_pipelines_folder_says_its_extra_network_takes_no_part(sd_folder, tmp_path, caplog):
    """A StableDiffusionControlNetPipeline folder holds a whole SD model beside controlnet/: it loaded as plain SD
    without a word, so a user could believe the ControlNet conditioned the edits. It still loads (the base model is
    valid), the warning names the pipeline and the unused component; a plain folder with a safety checker gets
    none."""
    folder = _copy(sd_folder, tmp_path)
    _edit_json(folder / "model_index.json", _class_name="StableDiffusionControlNetPipeline",
               controlnet=["diffusers", "ControlNetModel"])
    (folder / "controlnet").mkdir()
    (folder / "controlnet" / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    with caplog.at_level("WARNING", logger="nti"):
        pipe = load_pipeline(folder, device="cpu")
    assert "StableDiffusionControlNetPipeline with controlnet" in caplog.text and "uses only its unet" in caplog.text
    assert torch.equal(pipe.unet.conv_in.weight, load_pipeline(sd_folder, device="cpu").unet.conv_in.weight)

    caplog.clear()
    plain = _copy(sd_folder, tmp_path, "plain")
    _edit_json(plain / "model_index.json", safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
               feature_extractor=["transformers", "CLIPImageProcessor"], image_encoder=[None, None])
    with caplog.at_level("WARNING", logger="nti"):
        load_pipeline(plain, device="cpu")
    assert "model_index.json names" not in caplog.text

"""Stable Diffusion components (v1.x, 2.x, SDXL): offline loading from a local diffusers folder; built-in shapes and
tiny models; the one place that knows how a model takes its text conditioning."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import NTIError
from .ddim import scheduler_problems
from .conditioning import TIME_IDS, PooledConditioning, pack_pooled, unet_inputs
from .runner import RunStats

log = logging.getLogger("nti")

COMPONENTS = {  # subfolder -> files that must be there (any one of each tuple; weights in any form _weight_forms names)
    "unet": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "vae": (("config.json",), ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")),
    "text_encoder": (("config.json",), ("model.safetensors", "pytorch_model.bin")),
    "tokenizer": (("tokenizer_config.json", "vocab.json", "tokenizer.json"),),
    "scheduler": (("scheduler_config.json",),),
}
XL_COMPONENTS = {  # what an SDXL folder has on top of COMPONENTS
    "text_encoder_2": COMPONENTS["text_encoder"],
    "tokenizer_2": COMPONENTS["tokenizer"],
}
TINY = "tiny"  # the built-in random SD-shaped model (no files; edits are not meaningful)
TINY_XL = "tiny-xl"  # the built-in random SDXL-shaped model (two text encoders, pooled embedding, time ids)
RANDOM_MODELS = (TINY, TINY_XL)  # built in code with random weights: their images are noise
SHAPES = "shapes"  # the built-in trained test-bed model (engine/assets/shapes, see engine/testbed/); the default
SHAPES_FOLDER = Path(__file__).parent / "assets" / "shapes"
VOCABULARY_FILE = "vocabulary.json"  # optional in a model folder: {"words": [...], "example": "a caption"}


@dataclass
class Pipeline:
    """The parts of a Stable Diffusion pipeline that inversion and editing use."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler_config: dict
    device: torch.device
    name: str  # what the user asked for (a path, a repo id, or "tiny")
    fingerprint: str  # hash of configs and weights: an inversion is only valid for the model that made it
    legacy_fingerprint: str | None = None  # the folder's fingerprint as nti computed it before whole-file hashing
    uncond_cache: dict = field(default_factory=dict, repr=False)
    fast_unets: dict = field(default_factory=dict, repr=False)  # the fast path's prepared UNet copies (runner.py)
    fast_stats: RunStats = field(default_factory=RunStats, repr=False)  # UNet rows the fast path ran, captures
    vocabulary: tuple = ()  # words the model was trained on, when that is a closed set (the shapes model); else ()
    prompt_example: str = ""  # a caption of the kind a closed-vocabulary model was trained on
    text_encoder_2: torch.nn.Module | None = None  # SDXL: OpenCLIP bigG with projection (pooled embedding)
    tokenizer_2: object = None  # SDXL: its tokenizer (pads with '!', not the end token)
    pooled: PooledConditioning | None = None  # SDXL's pooled embedding and time ids; None for SD v1.x / 2.x
    # what the weights were when `fingerprint` was last set (weights_witness) and the fingerprint at load: weights
    # changed in memory since (a LoRA fused in Python) get a fingerprint of their own (refresh_identity)
    witness: tuple | None = field(default=None, repr=False)
    loaded_fingerprint: str | None = field(default=None, repr=False)

    @property
    def modules(self) -> tuple[torch.nn.Module, ...]:
        return tuple(m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None)

    @property
    def context_shape(self) -> tuple[int, int]:
        """(rows, width) of one prompt's context tensor: (77, D), or (77 + 1, D) for SDXL (see PooledConditioning)."""
        tokens = int(self.tokenizer.model_max_length)
        return (tokens + (self.pooled is not None), int(self.unet.config.cross_attention_dim))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))


# ----------------------------------------------------------------------------------------------- text, image, latents

@torch.no_grad()
def encode_prompts(pipe: Pipeline, prompts: list[str], clip_skip: int = 0) -> torch.Tensor:
    """Context tensors of prompts, fp32: CLIP's last hidden state, (B, 77, D), padded to the tokenizer's max length;
    SDXL: both encoders' penultimate hidden states side by side plus the pooled row, (B, 78, 2048), as
    StableDiffusionXLPipeline.encode_prompt builds them (see PooledConditioning). `clip_skip` layers fewer, as
    encode_prompt's clip_skip: SD's through the final layer norm, SDXL's not (NTIConfig.clip_skip)."""
    check_clip_skip(pipe, clip_skip)

    def tokens(tokenizer):
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(pipe.device)

    if pipe.pooled is None:
        if not clip_skip:
            return pipe.text_encoder(tokens(pipe.tokenizer))[0].float()
        hidden = pipe.text_encoder(tokens(pipe.tokenizer), output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        # CLIPTextModel.text_model.final_layer_norm before transformers 5, CLIPTextModel.final_layer_norm since
        return getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(hidden).float()
    first = pipe.text_encoder(tokens(pipe.tokenizer), output_hidden_states=True)
    second = pipe.text_encoder_2(tokens(pipe.tokenizer_2), output_hidden_states=True)
    layer = -(clip_skip + 2)
    hidden = torch.cat([first.hidden_states[layer], second.hidden_states[layer]], dim=-1).float()
    return pack_pooled(hidden, second.text_embeds.float())  # the pooled row: the last layer's, whatever clip_skip


def check_clip_skip(pipe: Pipeline, clip_skip: int) -> None:
    """clip_skip leaves at least one of the text encoders' layers (SDXL reads one layer below the last already)."""
    layers = min(int(m.config.num_hidden_layers) for m in (pipe.text_encoder, pipe.text_encoder_2) if m is not None)
    most = layers - 1 - (pipe.pooled is not None)
    if clip_skip > most:
        raise NTIError(f"clip_skip {clip_skip} skips more layers than model {pipe.name}'s text encoder has "
                       f"({layers}): at most {most}")


@torch.no_grad()
def encode_images(pipe: Pipeline, pixels: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Latents of images in [-1, 1], (B, 3, H, W): VAE posterior mean times the scaling factor (notebook). At most
    `rows` images per VAE call (None: all): in fp32 one 512px image takes about 0.7 GB to encode and 1.1 GB to decode
    (SD's VAE, peak memory measured on CPU), so a hundred at once would not fit a GPU."""
    def encode(part):
        part = part.to(pipe.device, next(pipe.vae.parameters()).dtype)
        return pipe.vae.encode(part).latent_dist.mean.float() * pipe.scaling_factor
    return torch.cat([encode(part) for part in pixels.split(rows or len(pixels) or 1)])


@torch.no_grad()
def decode_latents(pipe: Pipeline, latents: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Images in [0, 1], (B, 3, H, W) fp32, from latents; at most `rows` images per VAE call (None: all)."""
    def decode(part):
        part = (part / pipe.scaling_factor).to(next(pipe.vae.parameters()).dtype)
        return (pipe.vae.decode(part).sample.float() / 2 + 0.5).clamp(0, 1)
    return torch.cat([decode(part) for part in latents.split(rows or len(latents) or 1)])


def unet_eps(pipe: Pipeline, latents: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
    """The UNet's output at (z_t, t, context): the noise eps_theta for epsilon models, else what the scheduler config's
    prediction_type names (DDIMSchedule.eps turns it into eps)."""
    return pipe.unet(latents, t, **unet_inputs(pipe.pooled, context)).sample


def strict_fp32(fn):
    """Run fn with TF32 off, so fp32 matmuls and convolutions are really fp32 on CUDA: PyTorch runs cuDNN
    convolutions in TF32 by default, a ~1e-3 relative change per layer that every parity figure would carry."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            return fn(*args, **kwargs)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return wrapper


# ------------------------------------------------------------------------------------------------------------ loading

CONVERT_SINGLE_FILE = ("a single-file checkpoint must be converted once: diffusers' StableDiffusionPipeline"
                       ".from_single_file(FILE, config=A_DIFFUSERS_FOLDER_OF_THE_SAME_KIND).save_pretrained(FOLDER), "
                       "then --model FOLDER")


def resolve_model_path(model: str | os.PathLike) -> Path:
    """A local diffusers folder, or a repo id found in the local Hugging Face cache. Never touches the network."""
    try:
        path = Path(model).expanduser()
        exists = path.exists()
    except RuntimeError:  # '~name' of no user on this machine
        user = str(model).split("/")[0]
        raise NTIError(f"--model {model}: there is no user {user[1:]} to expand {user}; give the folder's full "
                       f"path") from None
    except OSError as err:  # a name too long to look up, say
        raise NTIError(f"--model {model}: {err.strerror or err}") from None
    if exists:
        if not path.is_dir():
            single = path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin")
            raise NTIError(f"--model {model}: expected a diffusers folder (with unet/, vae/, text_encoder/, "
                           f"tokenizer/, scheduler/), got a file" + (
                               "; " + CONVERT_SINGLE_FILE if single else ""))
        return path
    if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(str(model), local_files_only=True))
        except Exception:
            raise NTIError(f"model {model!r} is not in the local Hugging Face cache and nothing is downloaded here; "
                           f"copy a diffusers folder of it onto this machine and pass --model /path/to/it") from None
    raise NTIError(f"model folder {model} does not exist; pass --model PATH to a local Stable Diffusion (v1.x, 2.x "
                   f"or SDXL) diffusers folder, or omit --model for the built-in shapes model")


def is_xl_folder(path: Path) -> bool:
    """An SDXL-type diffusers folder: its pipeline class, a second text encoder, or a UNet with added embeddings."""
    index = _read_config(path, "model_index.json")
    unet = _read_config(path, "unet", "config.json")
    return ("XL" in str(index.get("_class_name", "")) or (path / "text_encoder_2").is_dir()
            or bool(unet.get("addition_embed_type")))


def _read_config(path: Path, *parts) -> dict:
    """A component's JSON config ({} when absent); NTIError naming the file when it is not valid JSON."""
    file = path.joinpath(*parts)
    try:
        config = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError) as err:
        raise NTIError(f"model folder {path}: {file.relative_to(path)} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise NTIError(f"model folder {path}: {file.relative_to(path)} is not a JSON object")
    return config


def check_model_folder(path: Path) -> None:
    """Name every missing component file of a diffusers SD (or SDXL) folder in one error."""
    missing = []
    components = {**COMPONENTS, **XL_COMPONENTS} if is_xl_folder(path) else COMPONENTS
    for sub, groups in components.items():
        if not (path / sub).is_dir():
            missing.append(f"{sub}/")
            continue
        for group in groups:
            if not any((path / sub / form).is_file() for name in group for form in _weight_forms(name)):
                weights = len(_weight_forms(group[0])) > 1
                missing.append(f"{sub}/{' or '.join(group)}" + (" (or their fp16 variant or shard index)"
                                                                if weights else ""))
    if missing:
        raise NTIError(f"model folder {path} is incomplete: missing {', '.join(missing)}")
    for sub in components:  # placeholders where weights belong: the libraries' own errors do not say what to do
        for file in sorted((path / sub).iterdir()):
            if file.suffix not in (".safetensors", ".bin") or not file.is_file() or file.stat().st_size > 1024:
                continue
            rel = file.relative_to(path).as_posix()
            head = file.read_bytes()
            if not head:
                raise NTIError(f"model folder {path}: {rel} is empty (0 bytes: an interrupted download or copy?); "
                               f"copy it again")
            if head.startswith(b"version https://git-lfs"):
                raise NTIError(f"model folder {path}: {rel} is a Git LFS pointer, not the weights (a git clone "
                               f"without git-lfs); run `git lfs install && git lfs pull` in {path}")


def _weight_forms(name: str) -> tuple[str, ...]:
    """The files from_pretrained reads a weight file's tensors from: the file, its fp16 variant, or the index json of
    its shards (save_pretrained shards a component past max_shard_size: SDXL's fp32 UNet is 10.3 GB, diffusers'
    default 10 GB), e.g. model.safetensors, model.fp16.safetensors, model.safetensors.index(.fp16).json."""
    stem, _, ext = name.rpartition(".")
    if ext not in ("safetensors", "bin"):
        return (name,)
    return name, f"{stem}.fp16.{ext}", f"{name}.index.json", f"{name}.index.fp16.json"


# model_index.json's components: what load_pipeline reads, what takes no part in a generation (the safety checker
# judges finished images; an image encoder serves IP-Adapters, which the engine does not load)
USED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
IGNORED_COMPONENTS = ("safety_checker", "feature_extractor", "image_encoder")
PLAIN_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusionImg2ImgPipeline",
                   "StableDiffusionXLImg2ImgPipeline")


def check_supported_model(path: Path) -> None:
    """Refuse, before any weight is read, a model this engine cannot invert correctly: the DDIM step (Eq. 12) and the
    null-text loss take a UNet output that DDIMSchedule.eps can read as noise, CLIP text conditioning (one encoder,
    or SDXL's two with pooled embedding and size time ids) and a plain 4-channel latent UNet."""
    index = _read_config(path, "model_index.json")
    if not (path / "unet").is_dir():  # say what the folder is, rather than call it incomplete (a cut-short download)
        own = _read_config(path, "config.json")
        own = own.get("_class_name") or (own.get("architectures") or [None])[0]
        if own:
            raise NTIError(f"model folder {path} holds one {own} (a pipeline's component), not a whole pipeline; "
                           f"pass the folder that holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and "
                           f"scheduler/")
        snapshots = sorted(p for p in (path / "snapshots").glob("*") if p.is_dir())
        if path.name.startswith("models--") and snapshots:  # the HF cache's folder of a repo, not a model folder
            repo = path.name[len("models--"):].replace("--", "/", 1)
            main = path / "refs" / "main"
            main = path / "snapshots" / main.read_text().strip() if main.is_file() else None
            raise NTIError(f"model folder {path} is a Hugging Face cache entry; pass its repo id {repo} (from this "
                           f"cache) or its snapshot folder {main if main in snapshots else snapshots[-1]}")
        # a web UI's checkpoint folder: whole models are GBs (SD 1.5 pruned fp16: 2 GB), saved inversions and
        # LoRAs are MBs
        singles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".safetensors", ".ckpt")
                         and p.is_file() and p.stat().st_size > 1 << 30)
        if singles and not index:
            raise NTIError(f"model folder {path} holds single-file checkpoints ({', '.join(singles[:3])}"
                           f"{', ...' if len(singles) > 3 else ''}), not a diffusers folder; {CONVERT_SINGLE_FILE}")
        pipeline = index.get("_class_name")
        if pipeline and pipeline not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
            raise NTIError(f"model folder {path} cannot be inverted by this engine: its model_index.json names "
                           f"{pipeline}, not a UNet Stable Diffusion pipeline (StableDiffusionPipeline, "
                           f"StableDiffusionXLPipeline). Use a Stable Diffusion v1.x, 2.x or SDXL base folder")
    unet, scheduler = _read_config(path, "unet", "config.json"), _read_config(path, "scheduler", "scheduler_config.json")
    vae = _read_config(path, "vae", "config.json")
    why = []
    added = unet.get("addition_embed_type")
    refiner = index.get("requires_aesthetics_score") or (  # an SDXL base folder without text_encoder/ is incomplete
        (path / "text_encoder_2").is_dir() and not (path / "text_encoder").is_dir()
        and index.get("_class_name") != "StableDiffusionXLPipeline")
    if refiner:
        why.append("it is an SDXL refiner (aesthetic-score conditioning, no first text encoder), which refines "
                   "images rather than generating them from text")
    elif index.get("text_encoder") == [None, None]:  # named absent on purpose: no cut-short download to copy again
        why.append("its model_index.json names no first text encoder (text_encoder null), so the pipeline would "
                   "condition on text_encoder_2 alone, which this engine does not feed")
    elif added not in (None, "text_time"):
        why.append(f"its UNet takes {added!r} added embeddings, not SDXL's 'text_time' (pooled text + time ids)")
    elif is_xl_folder(path):
        pooled = _read_config(path, "text_encoder_2", "config.json").get("projection_dim")
        want = unet.get("projection_class_embeddings_input_dim")
        got = None if pooled is None else (unet.get("addition_time_embed_dim") or 0) * TIME_IDS + pooled
        if pooled is None:
            why.append("it is an SDXL-type model without a second text encoder (text_encoder_2/config.json with a "
                       "projection_dim), so its pooled embedding cannot be made")
        elif added != "text_time" or got != want:
            why.append(f"its SDXL conditioning does not add up (UNet addition_embed_type {added!r}, added input "
                       f"{want} wide, text_encoder_2 projection_dim {pooled} + {TIME_IDS} time ids = {got})")
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":  # loaded as one, it would be
        # another model (an unconditional DDPM UNet) or lose what makes it one (AnimateDiff's motion modules)
        why.append(f"its unet/ is a {unet['_class_name']}, not Stable Diffusion's UNet2DConditionModel")
    if vae.get("_class_name", "AutoencoderKL") != "AutoencoderKL":  # the tiny, asymmetric, consistency decoders
        why.append(f"its vae/ is a {vae['_class_name']}, not AutoencoderKL")
    for name in ("text_encoder", "text_encoder_2"):  # AltDiffusion's XLM-R, T5: their weights do not fit CLIP's
        encoder = _read_config(path, name, "config.json")
        if encoder.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
            kind = (encoder.get("architectures") or [encoder["model_type"]])[0]
            why.append(f"its {name}/ is a {kind}, not CLIP's text model")
    for name in ("class_embed_type", "encoder_hid_dim_type", "time_cond_proj_dim"):
        if unet.get(name):
            why.append(f"its UNet has {name}={unet[name]!r} (a conditioning this engine does not feed)")
    # components taken from different models load, then fail at the first UNet call on a matmul or conv shape
    encoders = ["text_encoder", "text_encoder_2"] if is_xl_folder(path) and not refiner else ["text_encoder"]
    widths = [_read_config(path, name, "config.json").get("hidden_size") for name in encoders]
    width = unet.get("cross_attention_dim")
    if not refiner and isinstance(width, int) and all(isinstance(w, int) for w in widths) and width != sum(widths):
        named = (f"text encoder's width {widths[0]}" if len(widths) == 1 else
                 f"text encoders' widths {' + '.join(map(str, widths))}")
        why.append(f"its UNet cross_attention_dim {width} is not its {named} (components of different models?)")
    if not isinstance(unet.get("sample_size", 64), int):  # the engine's images and latents are square
        why.append(f"its UNet sample_size {unet['sample_size']} is not square (one number)")
    channels = vae.get("latent_channels", 4)
    if unet and unet.get("in_channels", 4) == unet.get("out_channels", 4) != channels:
        why.append(f"its VAE makes {channels}-channel latents for a UNet of {unet.get('in_channels', 4)} input "
                   f"channels (components of different models?)")
    shifted = [name for name in ("latents_mean", "latents_std", "shift_factor") if vae.get(name) is not None]
    if shifted:  # AutoencoderKL writes them as null; set, the pipelines shift or normalize latents with them
        why.append(f"its VAE shifts or normalizes latents ({', '.join(shifted)}: Playground v2.5, SD3, Flux), "
                   f"which this engine, scaling latents by scaling_factor alone, does not")
    why += scheduler_problems(scheduler)
    if unet and unet.get("in_channels", 4) != unet.get("out_channels", 4):
        why.append(f"its UNet takes {unet['in_channels']} input channels for {unet.get('out_channels', 4)} output "
                   f"channels (an inpainting or depth model), not a plain text-to-image UNet")
    if why:
        raise NTIError(f"model folder {path} cannot be inverted by this engine: {'; '.join(why)}. Use a Stable "
                       f"Diffusion v1.x, 2.x or SDXL base text-to-image folder")
    zeros = index.get("force_zeros_for_empty_prompt", True)
    if not isinstance(zeros, bool):  # "false" (a string) is true to Python and to diffusers' pipeline alike
        raise NTIError(f"model folder {path}: model_index.json's force_zeros_for_empty_prompt must be true or false "
                       f"(a JSON boolean, no quotes); got {zeros!r}")
    pipeline = index.get("_class_name")
    extra = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and any(v)
                   and k not in USED_COMPONENTS + IGNORED_COMPONENTS)
    if extra or pipeline not in (None, *PLAIN_PIPELINES):
        # a ControlNet / T2I-Adapter pipeline's folder holds a plain SD model beside its extra network: the engine
        # inverts and edits with that model alone, which is right for the base model but not what such a folder's
        # pipeline makes; say so rather than leave the user to think the extra network took part
        log.warning("%s: model_index.json names %s%s; this engine uses only its unet, vae, text encoders, tokenizers "
                    "and scheduler, as a plain Stable Diffusion pipeline", path, pipeline or "no pipeline",
                    f" with {', '.join(extra)}" if extra else "")


def _component_files(path: Path) -> list[Path]:
    """The files of a model folder's component folders (unet/, vae/, text_encoder*/, tokenizer*/, scheduler/)."""
    components = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    # os.walk following links, not rglob: rglob does not descend into symlinked folders (a unet/ linked to a shared
    # copy), whose weights then counted for nothing and two different models had one fingerprint. Only the component
    # folders are walked (a link elsewhere in the folder may lead anywhere), each real folder once (a link to a
    # folder above would loop until the path is too long)
    files, seen = [], {os.path.realpath(path)}
    for entry in sorted(path.iterdir()):
        if not entry.name.startswith(components):
            continue
        if not entry.is_dir():
            files.append(entry)
            continue
        for root, dirs, names in os.walk(entry, followlinks=True):
            if os.path.realpath(root) in seen:
                dirs.clear()
                continue
            seen.add(os.path.realpath(root))
            dirs.sort()  # which of two links to one folder is walked must not depend on the listing's order
            files += [Path(root, name) for name in names]
    return sorted(p for p in files if p.is_file() and not p.name.startswith(".")
                  and p.relative_to(path).as_posix().startswith(components))


def hash_memo_path() -> Path:
    """Where whole-file sha256s are remembered between runs: $NTI_HASH_MEMO, else ~/.cache/nti/file-sha256.json."""
    return Path(os.environ.get("NTI_HASH_MEMO") or Path.home() / ".cache" / "nti" / "file-sha256.json")


def _file_identity(stat: os.stat_result) -> list[int]:
    # a rewrite in place changes mtime and ctime (ctime cannot be set back by hand, as `touch -d` sets mtime)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def file_hashes(files: list[Path]) -> list[str]:
    """sha256 of each file's whole content, remembered (hash_memo_path) by its path, size, times and inode, so a
    model is read through once, not at every load; an unreadable or unwritable memo only costs the hashing."""
    memo_file = hash_memo_path()
    try:
        memo = json.loads(memo_file.read_text())
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    out, changed, todo = [], False, []
    for file in files:
        real, stat = os.path.realpath(file), file.stat()
        known = memo.get(real)
        if isinstance(known, dict) and known.get("id") == _file_identity(stat) and isinstance(known.get("sha256"), str):
            out.append(known["sha256"])
            continue
        todo.append((len(out), file, real, stat))
        out.append(None)
    if sum(stat.st_size for *_, stat in todo) > 256 << 20:
        log.info("hashing %d model files (%.1f GB) once for the model's fingerprint; remembered in %s", len(todo),
                 sum(stat.st_size for *_, stat in todo) / 1e9, memo_file)
    for k, file, real, stat in todo:
        sha = hashlib.sha256()
        with open(file, "rb") as fh:
            while chunk := fh.read(8 << 20):
                sha.update(chunk)
        out[k] = sha.hexdigest()
        memo.pop(real, None)
        memo[real] = {"id": _file_identity(stat), "sha256": out[k]}
        changed = True
    if changed:
        while len(memo) > 20000:  # forget the oldest entries (deleted models' files among them)
            memo.pop(next(iter(memo)))
        try:
            memo_file.parent.mkdir(parents=True, exist_ok=True)
            temp = memo_file.with_name(f".{memo_file.name}.{os.getpid()}.part")
            temp.write_text(json.dumps(memo))
            os.replace(temp, memo_file)  # whole or not at all; two processes at once: the last one's memo stays
        except OSError:
            pass
    return out


def fingerprint_folder(path: Path) -> str:
    """Model identity: every component file's path, size and whole-content sha256, and model_index.json's
    force_zeros_for_empty_prompt. Whole files: a LoRA fused into the attention weights changes neither the size nor
    the first and last MiB of a weight file (what this hashed before), so it passed as the base model and cached
    inversions crossed between them."""
    digest = hashlib.sha256()
    files = _component_files(path)
    for file, sha in zip(files, file_hashes(files)):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file.stat().st_size}\0{sha}\0".encode())
    _force_zeros(path, digest)
    return digest.hexdigest()[:16]


def legacy_fingerprint_folder(path: Path) -> str:
    """The fingerprint of nti before whole-file hashing (configs in full, weight files by size and their first and
    last MiB): inversions saved then are still accepted for this model (api.check_compatible)."""
    digest = hashlib.sha256()
    for file in _component_files(path):
        digest.update(file.relative_to(path).as_posix().encode())
        size = file.stat().st_size
        digest.update(str(size).encode())
        with open(file, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                digest.update(fh.read())
    return digest.hexdigest()[:16]


def _force_zeros(path: Path, digest) -> None:
    # model_index.json's force_zeros_for_empty_prompt decides SDXL's unconditional input (zeros or the empty
    # prompt's encoding), so flipping it changes every null-text inversion; only that key counts (the rest of the file
    # names the pipeline class, the safety checker and library versions, which change no latent)
    index = _read_config(path, "model_index.json")
    if "force_zeros_for_empty_prompt" in index:
        digest.update(f"force_zeros_for_empty_prompt={bool(index['force_zeros_for_empty_prompt'])}".encode())


def fingerprint_modules(*modules: torch.nn.Module) -> str:
    """Identity of in-memory weights (the tiny model): hash of every parameter's bytes."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def weights_witness(pipe: Pipeline) -> tuple:
    """A cheap witness of the weights in memory: every parameter's and buffer's name, shape and dtype, their L2 norms
    (bit patterns; a few foreach kernels on the weights' device, ~0.1 s per GB on CPU) and the tokenizers' sizes (a
    word added). A LoRA fused in place (`weight.data += delta`, PEFT's merge) changes neither a tensor's identity nor its
    version counter, only its values: a norm is the cheapest reading of those that any real edit moves."""
    names, tensors = [], []
    for module in pipe.modules:
        for name, tensor in module.state_dict(keep_vars=True).items():
            names.append((name, tuple(tensor.shape), str(tensor.dtype)))
            t = tensor.detach()
            tensors.append(t if t.is_floating_point() else t.double())
    words = tuple(len(t) for t in (pipe.tokenizer, pipe.tokenizer_2) if t is not None and hasattr(t, "__len__"))
    if any(t.is_meta for t in tensors):  # shapes without values (gpu_run's full-size models on meta): names only
        return tuple(names), "meta", words
    with torch.no_grad():  # one copy to the host, not one per tensor (a GPU sync each)
        norms = torch.stack([n.double() for n in torch._foreach_norm(tensors)]).cpu() if tensors else torch.zeros(0)
    return tuple(names), hashlib.sha256(norms.numpy().tobytes()).hexdigest(), words


def refresh_identity(pipe: Pipeline) -> None:
    """Weights changed in memory since load (a LoRA fused, a tensor edited, a word added): a new fingerprint from their
    bytes (fingerprint_modules over the loaded one), and the half-weight UNet copies and null embedding made from
    the old weights dropped, so no cached inversion, exported UNet or copy of the old model serves the new one."""
    now = weights_witness(pipe)
    if pipe.witness is None:  # a Pipeline built by hand, not by _assemble: its weights now are what its name says
        pipe.witness, pipe.loaded_fingerprint = now, pipe.loaded_fingerprint or pipe.fingerprint
        return
    if now == pipe.witness:
        return
    base = pipe.loaded_fingerprint or pipe.fingerprint
    words = json.dumps([now[2], *[sorted(t.get_added_vocab().items()) for t in (pipe.tokenizer, pipe.tokenizer_2)
                                  if hasattr(t, "get_added_vocab")]])
    fingerprint = hashlib.sha256(f"{base}:{fingerprint_modules(*pipe.modules)}:{words}".encode()).hexdigest()[:16]
    log.info("the pipeline's weights changed in memory since it was loaded: fingerprint %s -> %s (inversions and "
             "exports of the loaded weights are not reused)", pipe.fingerprint, fingerprint)
    pipe.fingerprint, pipe.legacy_fingerprint, pipe.witness = fingerprint, None, now
    pipe.fast_unets.clear()
    pipe.uncond_cache.clear()


def quiet_loading() -> None:
    """--quiet: no weight-loading or download bars from diffusers, transformers or huggingface_hub either."""
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass


def parse_device(device: str | torch.device | None) -> torch.device:
    """'auto'/None -> cuda if available else cpu; a clear error for a device this machine lacks."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise NTIError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type not in ("cpu", "cuda", "mps"):  # meta, xpu, ...: torch knows the name, the engine cannot run there
        raise NTIError(f"device {device!r} is not supported; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NTIError(f"device {device} requested but CUDA is not available here; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise NTIError(f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise NTIError(f"device {device} requested but MPS is not available here; use --device cpu")
    return dev


def load_pipeline(model: str | os.PathLike | None = None, device: str | torch.device | None = "auto",
                  dtype: torch.dtype = torch.float32, seed: int = 0) -> Pipeline:
    """Load SD v1.x / 2.x / SDXL from a local diffusers folder or the local HF cache; None or 'shapes' is the built-in
    trained shapes model (read from engine/assets/shapes through this same loader), 'tiny' and 'tiny-xl' the
    built-in random SD- and SDXL-shaped ones."""
    if model is not None and (not isinstance(model, (str, os.PathLike)) or not str(model).strip()):
        raise NTIError(f"model must be a diffusers folder path, a cached repo id, 'shapes', 'tiny', 'tiny-xl' or "
                       f"None (the shapes model); got {model!r}")  # '' was the working directory
    check_dtype(dtype)
    dev = parse_device(device)
    if str(model) == TINY:
        return build_tiny_pipeline(seed=seed, device=dev, dtype=dtype)
    if str(model) == TINY_XL:
        return build_tiny_xl_pipeline(seed=seed, device=dev, dtype=dtype)
    if model is None or str(model) == SHAPES:
        if not (SHAPES_FOLDER / "unet").is_dir():
            raise NTIError(f"the built-in shapes model is missing from {SHAPES_FOLDER} (a broken install?); "
                           f"reinstall, retrain it with `python -m nti.testbed`, or pass --model PATH")
        pipe = load_pipeline(SHAPES_FOLDER, dev, dtype, seed)
        pipe.name = SHAPES
        return pipe
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = resolve_model_path(model)
    check_supported_model(path)  # first: a refiner is refused as one, not as a folder missing text_encoder/
    check_model_folder(path)
    try:
        unet = _load_weights(UNet2DConditionModel, path, "unet", dtype)
        vae = _load_weights(AutoencoderKL, path, "vae", dtype)
        text_encoder = _load_weights(CLIPTextModel, path, "text_encoder", dtype)
        tokenizer = _load_part(path, "tokenizer", CLIPTokenizer.from_pretrained, local_files_only=True)
        second = {}
        if is_xl_folder(path):
            second = dict(
                text_encoder_2=_load_weights(CLIPTextModelWithProjection, path, "text_encoder_2", dtype),
                tokenizer_2=_load_part(path, "tokenizer_2", CLIPTokenizer.from_pretrained, local_files_only=True))
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except NTIError:
        raise
    except Exception as err:  # corrupt weights, wrong architecture, ...: say which folder, keep the cause
        raise NTIError(f"could not load the model in {path}: {type(err).__name__}: {err}") from err
    check_prompt_length(path, text_encoder, tokenizer, second.get("text_encoder_2"), second.get("tokenizer_2"))
    if not second and scheduler_config.get("steps_offset", 0) != 1:
        # StableDiffusionPipeline's constructor rewrites an outdated steps_offset to 1, so the official notebook (and
        # every SD 1.x/2.x pipeline) ran t = 981..1 on such a folder too; StableDiffusionXLPipeline keeps the config's.
        # Only 'leading' spacing adds the offset: under 'trailing' or 'linspace' the rewrite changes nothing, so
        # the warning would only alarm
        if scheduler_config.get("timestep_spacing", "leading") == "leading":
            log.warning("%s: the scheduler config's steps_offset %s is outdated; using 1, as StableDiffusionPipeline "
                        "does (--steps-offset N sets another)", path, scheduler_config.get("steps_offset", "(absent)"))
        scheduler_config = {**scheduler_config, "steps_offset": 1}
    if second and scheduler_config.get("clip_sample"):
        # StableDiffusionPipeline forces it off (clipping x0 latents to [-1, 1] ruins them); the SDXL pipeline would
        # clip: say that this engine does not, rather than differ from it without a word
        log.warning("%s: the scheduler config asks to clip the predicted x0 (clip_sample); this engine's DDIM step "
                    "does not clip latents, as StableDiffusionPipeline does not (StableDiffusionXLPipeline would)", path)
    zero_null = bool(_read_config(path, "model_index.json").get("force_zeros_for_empty_prompt", True))
    pipe = _assemble(unet, vae, text_encoder, tokenizer, scheduler_config, dev, str(model), fingerprint_folder(path),
                     zero_null=zero_null, **second)
    pipe.legacy_fingerprint = legacy_fingerprint_folder(path)
    if (path / VOCABULARY_FILE).is_file():  # a closed-vocabulary model (the shapes model) says which words it knows
        card = json.loads((path / VOCABULARY_FILE).read_text())
        pipe.vocabulary, pipe.prompt_example = tuple(card["words"]), card.get("example", "")
    return pipe


def check_prompt_length(path: Path, text_encoder, tokenizer, text_encoder_2=None, tokenizer_2=None) -> None:
    """Prompts are padded to the tokenizer's model_max_length (as the pipelines pad them): the text encoder must have
    that many positions. A tokenizer folder without tokenizer_config.json has transformers' 1e30, which padded every
    prompt towards it; SDXL's two token sequences also sit side by side, so they must be as long."""
    pairs = [("tokenizer", tokenizer, "text_encoder", text_encoder)]
    if tokenizer_2 is not None:
        pairs.append(("tokenizer_2", tokenizer_2, "text_encoder_2", text_encoder_2))
    for tok_name, tok, enc_name, enc in pairs:
        positions = int(enc.config.max_position_embeddings)
        if tok.model_max_length > positions:
            raise NTIError(f"model folder {path}: {tok_name}/ pads prompts to {tok.model_max_length} tokens, but "
                           f"{enc_name}/ reads at most {positions} (max_position_embeddings); set "
                           f"\"model_max_length\": {positions} in {tok_name}/tokenizer_config.json")
    if tokenizer_2 is not None and tokenizer_2.model_max_length != tokenizer.model_max_length:
        raise NTIError(f"model folder {path}: tokenizer/ pads prompts to {tokenizer.model_max_length} tokens and "
                       f"tokenizer_2/ to {tokenizer_2.model_max_length}; SDXL puts the two encoders' tokens side by "
                       f"side, so set the same model_max_length in both tokenizer_config.json files")


def check_dtype(dtype) -> None:
    """A weight dtype torch can load a model in (a string like 'float16' reached torch as a device name)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise NTIError(f"dtype must be a floating-point torch.dtype such as torch.float32; got {dtype!r}")


def check_seed(seed) -> None:
    """A tiny model's seed: an int (1.5 was recorded as seed 1.5 while torch drew seed 1)."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise NTIError(f"seed must be an integer; got {seed!r}")


def _load_part(path: Path, sub: str, from_pretrained, **kw):
    """from_pretrained(path, subfolder=sub, **kw); the libraries' errors (corrupt weights, a truncated json, another
    architecture's shapes) as an NTIError that names the component folder, the cause kept."""
    try:
        return from_pretrained(path, subfolder=sub, **kw)
    except Exception as err:
        raise NTIError(f"could not load the model in {path}: its {sub}/ failed to load ({type(err).__name__}: "
                       f"{err}); copy or download {sub}/ again") from err


def _load_weights(cls, path: Path, sub: str, dtype: torch.dtype):
    """One component's model from its subfolder, every tensor read from the folder's weights. A weight file that lacks
    some is refused: from_pretrained only warns, and transformers initializes those at random (a silently wrong
    text encoder) while diffusers leaves them on the meta device (NotImplementedError at the first .to())."""
    model, info = _load_part(path, sub, cls.from_pretrained, local_files_only=True, torch_dtype=dtype,
                             output_loading_info=True, **_variant(path / sub))
    missing = sorted(info["missing_keys"])
    if missing:
        raise NTIError(f"model folder {path}: its {sub}/ weights lack {len(missing)} of the model's tensors "
                       f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); the weight file is "
                       f"incomplete or from another model: download or convert {sub}/ again")
    return model


def _variant(folder: Path) -> dict:
    """from_pretrained's variant for a component folder that holds only fp16 weight files (a common way SD and SDXL
    folders are shipped); the weights are still loaded in the dtype asked for."""
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    plain = any(n in names for w in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                                     "model.safetensors", "pytorch_model.bin") for n in (w, f"{w}.index.json"))
    return {"variant": "fp16"} if not plain and any(".fp16." in n for n in names) else {}


def _assemble(unet, vae, text_encoder, tokenizer, scheduler_config, device, name, fingerprint, text_encoder_2=None,
              tokenizer_2=None, zero_null: bool = True) -> Pipeline:
    modules = (unet, vae, text_encoder) + ((text_encoder_2,) if text_encoder_2 is not None else ())
    for module in modules:
        module.to(device).eval().requires_grad_(False)
    pipe = Pipeline(unet, vae, text_encoder, tokenizer, dict(scheduler_config), device, name, fingerprint,
                    text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    if text_encoder_2 is not None:  # SDXL: time ids at the native resolution, no crop (the pipeline's defaults)
        size = float(pipe.resolution)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device)
        pooled_dim = int(text_encoder_2.config.projection_dim)
        if pooled_dim > pipe.context_shape[1]:
            raise NTIError(f"model {name}: its pooled embedding ({pooled_dim}) is wider than its token embeddings "
                           f"({pipe.context_shape[1]}); this engine packs the one into a row of the other")
        pipe.pooled = PooledConditioning(pooled_dim, time_ids, zero_null)
    pipe.witness, pipe.loaded_fingerprint = weights_witness(pipe), fingerprint
    return pipe


# --------------------------------------------------------------------------------------------------------- tiny model

TINY_WORDS = (
    "a an the of on in at with and next to near above below behind front sitting standing lying photo picture "
    "cat dog tiger lion horse bird car bus house tree mirror table chair bed flower cup mug astronaut rocket coffee "
    "man woman person red green blue yellow orange purple black white gray brown pink big small circle square "
    "triangle star background sky grass water beach room street city snow painting sketch").split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to unused code points."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def build_word_tokenizer(words=TINY_WORDS, max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer whose BPE merges spell out `words` whole; other text falls back to byte tokens."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges = []
    # longer words first: their merges get lower ranks, so a short word's pair cannot split a long word
    for word in sorted(dict.fromkeys(words), key=len, reverse=True):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = pieces[0]
        for piece in pieces[1:]:
            merged = prefix + piece
            if (prefix, piece) not in merges:
                merges.append((prefix, piece))
                if merged not in vocab_list:
                    vocab_list.append(merged)
            prefix = merged
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=pad_token)


CLIP_MERGES = Path(__file__).parent / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"


def build_clip_tokenizer(max_length: int = 77, pad_token: str = "<|endoftext|>"):
    """SD v1.x's tokenizer, offline: CLIP's byte-level BPE (49408 tokens) built as CLIP builds it from its merges
    (engine/assets/clip): the byte alphabet, the same with '</w>', the first 48894 merges, the start and end tokens."""
    import gzip

    from transformers import CLIPTokenizer

    lines = gzip.open(CLIP_MERGES, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=max_length,
                         pad_token=pad_token)


def build_tiny_components(seed: int = 0):
    """Random SD-v1-shaped UNet (cross-attention), VAE (4 latent channels) and CLIP text encoder; 32 px images."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_word_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=16, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler_config = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                        "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                        "set_alpha_to_one": False, "steps_offset": 1}
    return unet, vae, text_encoder, tokenizer, scheduler_config


def build_tiny_pipeline(seed: int = 0, device: str | torch.device = "cpu", dtype=torch.float32) -> Pipeline:
    """The built-in tiny model: same code paths as SD v1.4, random weights, so its edits mean nothing."""
    check_seed(seed)
    check_dtype(dtype)
    device = parse_device(device)  # None, 'gpu', 'cuda' without CUDA: one clear error, as load_pipeline's
    unet, vae, text_encoder, tokenizer, scheduler_config = build_tiny_components(seed)
    if dtype != torch.float32:
        unet, vae, text_encoder = (m.to(dtype) for m in (unet, vae, text_encoder))
    return _assemble(unet, vae, text_encoder, tokenizer, scheduler_config, torch.device(device), TINY,
                     f"tiny-{seed}-" + fingerprint_modules(unet, vae, text_encoder))


def build_tiny_xl_components(seed: int = 0):
    """Random SDXL-shaped components, 32 px: a UNet with 'text_time' added embeddings (pooled text + 6 time ids) and
    transformer depth (1, 2), two CLIP text encoders (the second with projection), tokenizer_2 padding with '!'."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_word_tokenizer(), build_word_tokenizer(pad_token="!")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=48, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TIME_IDS * 8 + 24, norm_num_groups=16)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=16, sample_size=32, scaling_factor=0.13025)
    common = dict(vocab_size=len(tokenizer), intermediate_size=64, num_hidden_layers=3, max_position_embeddings=77,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, num_attention_heads=2,
                                                pad_token_id=tokenizer.pad_token_id, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=32, num_attention_heads=4, projection_dim=24, pad_token_id=tokenizer_2.pad_token_id, **common))
    scheduler_config = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                        "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
                        "timestep_spacing": "leading", "prediction_type": "epsilon"}
    return unet, vae, text_encoder, tokenizer, scheduler_config, text_encoder_2, tokenizer_2


def build_tiny_xl_pipeline(seed: int = 0, device: str | torch.device = "cpu", dtype=torch.float32) -> Pipeline:
    """The built-in tiny SDXL-shaped model: SDXL's code paths (pooled embedding, time ids), random weights."""
    check_seed(seed)
    check_dtype(dtype)
    device = parse_device(device)
    unet, vae, text_encoder, tokenizer, scheduler_config, text_encoder_2, tokenizer_2 = build_tiny_xl_components(seed)
    modules = [m if dtype == torch.float32 else m.to(dtype) for m in (unet, vae, text_encoder, text_encoder_2)]
    return _assemble(*modules[:3], tokenizer, scheduler_config, torch.device(device), TINY_XL,
                     f"tiny-xl-{seed}-" + fingerprint_modules(*modules), text_encoder_2=modules[3],
                     tokenizer_2=tokenizer_2)


def build_sd14_shaped_pipeline(seed: int = 0, device: str | torch.device = "cpu", dtype=torch.float32) -> Pipeline:
    """Stable Diffusion v1.4's exact architecture and tokenizer with random weights (benchmarks: cost does not depend
    on values)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    with torch.device(device):  # initialize in place: 860M UNet parameters are slow to build on CPU and copy
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, sample_size=512)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    if dtype != torch.float32:
        unet, vae, text_encoder = (m.to(dtype) for m in (unet, vae, text_encoder))
    scheduler_config = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                        "beta_end": 0.012, "beta_schedule": "scaled_linear", "set_alpha_to_one": False,
                        "skip_prk_steps": True, "steps_offset": 1}
    return _assemble(unet, vae, text_encoder, tokenizer, scheduler_config, torch.device(device), "sd14-shaped",
                     f"sd14-shaped-random-{seed}")


def build_sdxl_shaped_pipeline(seed: int = 0, device: str | torch.device = "cpu", dtype=torch.float32) -> Pipeline:
    """SDXL base 1.0's architecture (UNet 2.6B, CLIP ViT-L + OpenCLIP bigG, 1024 px) with random weights and CLIP's
    tokenizer, for benchmarks: cost does not depend on values."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_clip_tokenizer(pad_token="!")
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2, sample_size=1024, scaling_factor=0.13025)
        common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            hidden_act="quick_gelu", pad_token_id=tokenizer.pad_token_id, **common))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", projection_dim=1280, pad_token_id=tokenizer_2.pad_token_id, **common))
    modules = [m if dtype == torch.float32 else m.to(dtype) for m in (unet, vae, text_encoder, text_encoder_2)]
    scheduler_config = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                        "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1,
                        "timestep_spacing": "leading"}
    return _assemble(*modules[:3], tokenizer, scheduler_config, torch.device(device), "sdxl-shaped",
                     f"sdxl-shaped-random-{seed}", text_encoder_2=modules[3], tokenizer_2=tokenizer_2)


def save_pipeline_folder(pipe: Pipeline, path: str | os.PathLike) -> Path:
    """Write a pipeline as a diffusers SD / SDXL folder (what `load_pipeline(path)` reads)."""
    from diffusers import DDIMScheduler

    if not isinstance(pipe, Pipeline) or not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        raise NTIError(f"save_pipeline_folder takes a Pipeline and a folder path; got {type(pipe).__name__} and "
                       f"{path!r}")
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():  # NotADirectoryError from the first component written into it
        raise NTIError(f"model folder {path} is a file; give a folder to write the model into")
    pipe.unet.save_pretrained(path / "unet")
    pipe.vae.save_pretrained(path / "vae")
    pipe.text_encoder.save_pretrained(path / "text_encoder")
    pipe.tokenizer.save_pretrained(path / "tokenizer")
    # the flags make_schedule reads as False when absent, written so: DDIMScheduler's own defaults are True
    scheduler_config = {"clip_sample": False, "set_alpha_to_one": False, **pipe.scheduler_config}
    DDIMScheduler.from_config(scheduler_config).save_pretrained(path / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"]}
    if pipe.pooled is not None:
        pipe.text_encoder_2.save_pretrained(path / "text_encoder_2")
        pipe.tokenizer_2.save_pretrained(path / "tokenizer_2")
        index.update(_class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=pipe.pooled.zero_null,
                     text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"])
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path

"""The built-in "shapes" model: a small Stable Diffusion v1 architecture trained on procedural scenes.

Same components and layout as SD v1.4 (AutoencoderKL, UNet2DConditionModel with cross-attention, CLIP text encoder
and tokenizer, DDIM scheduler config), scaled down: 32 px images, 8x8x4 latents (VAE factor 4), 16-token prompts.
Trained in two stages on scenes from `nti.testbed.scenes`, reproducibly (seeded, config recorded next to the
weights):

    python -m nti.testbed --out engine/assets/shapes            # resumes from --work if interrupted

1. VAE: L1 + MSE reconstruction with a tiny KL term (SD's recipe without the GAN/LPIPS terms); the latent scaling
   factor is then set to 1 / std of the latents, as SD's 0.18215 was.
2. UNet and text encoder together (no pretrained CLIP exists offline): epsilon-prediction MSE on SD's
   scaled-linear 1000-step schedule, 10% empty captions so classifier-free guidance has a null text to start
   from, EMA weights saved. Captions of `scenes.is_held_out` are never shown.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import scenes
from ..ddim import make_schedule
from ..models import (SHAPES_FOLDER, VOCABULARY_FILE, _assemble, build_word_tokenizer, fingerprint_modules,
                     parse_device, save_pipeline_folder)

MAX_TOKENS = 16  # longest caption is 11 words + start/end tokens


@dataclass
class TrainConfig:
    """Everything that decides the trained weights (written to train_config.json next to them)."""

    seed: int = 0  # seeds the scene stream, the noise draws and the initial weights
    vae_steps: int = 4000  # 1500 left decoded squares with round corners (oracle 91% on VAE round trips)
    vae_lr: float = 1e-3
    vae_batch: int = 32
    vae_kl: float = 1e-6  # SD's KL weight order of magnitude: latents stay close to deterministic
    unet_steps: int = 10000
    unet_lr: float = 5e-4  # AdamW, linear warm-up then cosine decay to 10% (both stages)
    warmup: int = 200
    batch_size: int = 64  # UNet stage
    caption_dropout: float = 0.1  # empty caption rate: trains the unconditional branch CFG and NTI start from
    ema_decay: float = 0.999  # the saved UNet and text encoder are the EMA weights
    checkpoint_every: int = 500  # steps between resumable checkpoints in --work


def build_shapes_components(seed: int = 0):
    """Untrained shapes-model components: (unet, vae, text_encoder, tokenizer, scheduler_config)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_word_tokenizer(scenes.SCENE_WORDS, max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16, sample_size=scenes.RESOLUTION)
    unet = UNet2DConditionModel(
        sample_size=scenes.RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler_config = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                        "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                        "set_alpha_to_one": False, "steps_offset": 1}
    return unet, vae, text_encoder, tokenizer, scheduler_config


def scene_batch(rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
    """n training scenes (held-out captions redrawn) as [-1, 1] pixels (n, 3, 32, 32) and their captions."""
    images, captions = [], []
    while len(captions) < n:
        scene = scenes.random_scene(rng)
        if scenes.is_held_out(scene.caption):
            continue
        images.append(np.asarray(scenes.render(scene)))
        captions.append(scene.caption)
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, captions


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save_checkpoint(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # atomic: an interrupt never leaves a half-written checkpoint


def train_vae(vae, config: TrainConfig, work: Path, log: list, device: torch.device) -> None:
    """Stage 1: reconstruction autoencoder (Rombach et al. 2022, Sec. 3.1, without the adversarial term)."""
    ckpt = work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    start, rng = 0, random.Random(config.seed)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        start, rng = state["step"], state["rng"]
        log[:] = [row for row in state.get("log", log) if row["stage"] == "vae"]  # drop rows past the checkpoint
        if "torch_rng" in state:  # the posterior samples draw from torch's global generator
            torch.set_rng_state(state["torch_rng"])
    vae.train()
    bar = tqdm(range(start, config.vae_steps), desc="vae", initial=start, total=config.vae_steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, config.vae_steps, config.vae_lr, config.warmup)
        pixels = scene_batch(rng, config.vae_batch)[0].to(device)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        rec = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels)
        loss = rec + config.vae_kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(rec=f"{rec.item():.4f}")
        if (step + 1) % 100 == 0:
            log.append({"stage": "vae", "step": step + 1, "rec": round(rec.item(), 5)})
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.vae_steps:
            _save_checkpoint(ckpt, model=vae.state_dict(), opt=opt.state_dict(), step=step + 1, rng=rng, log=log,
                             torch_rng=torch.get_rng_state())
    vae.eval()


@torch.no_grad()
def latent_scale(vae, seed: int, device: torch.device, n: int = 1024) -> float:
    """1 / std of VAE posterior means over n scenes: puts latents at unit variance like SD's 0.18215."""
    pixels = scene_batch(random.Random(seed + 1), n)[0].to(device)
    return float(1.0 / vae.encode(pixels).latent_dist.mean.std())


def train_unet(unet, text_encoder, tokenizer, vae, scale: float, scheduler_config: dict, config: TrainConfig,
               work: Path, log: list, device: torch.device):
    """Stage 2: epsilon-prediction (Ho et al. 2020, Eq. 14) on VAE latents, text encoder trained jointly; EMA."""
    alphas = make_schedule(scheduler_config, steps=1).alphas_cumprod.to(device)  # the shipped schedule's alpha_bar
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=config.unet_lr, weight_decay=0.01)
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)]
    ckpt = work / "unet.pt"
    start, rng = 0, random.Random(config.seed + 2)
    gen = torch.Generator().manual_seed(config.seed + 3)
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        unet.load_state_dict(state["unet"]), text_encoder.load_state_dict(state["text"])
        ema[0].load_state_dict(state["ema_unet"]), ema[1].load_state_dict(state["ema_text"])
        opt.load_state_dict(state["opt"])
        start, rng = state["step"], state["rng"]
        gen.set_state(state["gen"])
        log[:] = state.get("log", log)
    unet.train(), text_encoder.train()
    bar = tqdm(range(start, config.unet_steps), desc="unet", initial=start, total=config.unet_steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, config.unet_steps, config.unet_lr, config.warmup)
        pixels, captions = scene_batch(rng, config.batch_size)
        pixels = pixels.to(device)
        captions = ["" if rng.random() < config.caption_dropout else c for c in captions]
        with torch.no_grad():
            z0 = vae.encode(pixels).latent_dist.mean * scale
        ids = tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        # noise drawn on the CPU generator whatever the device: the same draws on GPU and CPU runs
        t = torch.randint(0, 1000, (len(captions),), generator=gen).to(device)
        noise = torch.randn(z0.shape, generator=gen).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=text_encoder(ids)[0]).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(config.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for model, avg in ((unet, ema[0]), (text_encoder, ema[1])):
                for p, q in zip(model.parameters(), avg.parameters()):
                    q.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 100 == 0:
            log.append({"stage": "unet", "step": step + 1, "loss": round(loss.item(), 5)})
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.unet_steps:
            _save_checkpoint(ckpt, unet=unet.state_dict(), text=text_encoder.state_dict(),
                             ema_unet=ema[0].state_dict(), ema_text=ema[1].state_dict(), opt=opt.state_dict(),
                             step=step + 1, rng=rng, gen=gen.get_state(), log=log)
    return ema[0].eval(), ema[1].eval()


def train(config: TrainConfig, out: Path, work: Path, device: str = "auto") -> Path:
    """Both stages, then the EMA weights written as a diffusers SD folder at `out` (with train_config.json)."""
    torch.manual_seed(config.seed)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else []
    unet, vae, text_encoder, tokenizer, scheduler_config = build_shapes_components(config.seed)
    dev = parse_device(device)
    unet, vae, text_encoder = unet.to(dev), vae.to(dev), text_encoder.to(dev)
    started = time.time()
    try:
        train_vae(vae, config, work, log, dev)
        scale = latent_scale(vae, config.seed, dev)
        vae.register_to_config(scaling_factor=scale)
        unet, text_encoder = train_unet(unet, text_encoder, tokenizer, vae, scale, scheduler_config, config, work,
                                        log, dev)
    finally:
        log_path.write_text(json.dumps(log))
    unet, vae, text_encoder = unet.cpu(), vae.cpu(), text_encoder.cpu()
    pipe = _assemble(unet, vae, text_encoder, tokenizer, scheduler_config, torch.device("cpu"), str(out),
                     fingerprint_modules(unet, vae, text_encoder))
    save_pipeline_folder(pipe, out)
    write_vocabulary(out)
    (out / "train_config.json").write_text(json.dumps({
        **asdict(config), "scaling_factor": scale, "torch": torch.__version__,
        "seconds_this_run": round(time.time() - started), "final_losses": log[-3:], "device": str(dev),
        "command": "python -m nti.testbed --out " + str(out)}, indent=2))
    return out


def write_vocabulary(out: Path) -> None:
    """The closed vocabulary next to the weights: the loader refuses prompts with other words (engine/api.py)."""
    example = "a red circle and a blue square on a gray background"
    (out / VOCABULARY_FILE).write_text(json.dumps({"words": list(scenes.SCENE_WORDS), "example": example}) + "\n")


EXAMPLES_FOLDER = Path(__file__).parent.parent / "assets" / "scenes"


def write_examples(folder: Path = EXAMPLES_FOLDER, n: int = 6, seed: int = 7) -> Path:
    """Example scenes (32 px PNGs, what the model sees) and prompts.jsonl with a colour and a shape edit of each.

    Each edit names the region it may change (`mask`: the edited object before and after, grown by 1 px), so
    `nti eval --data scenes` reports background-only SSIM/PSNR as it does for PIE-Bench masks.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng, lines = random.Random(seed), []
    for i in range(n):
        scene = scenes.random_scene(rng, n_objects=1 + i % 2)
        name = f"scene{i}.png"
        scenes.render(scene).save(folder / name)
        for kind, target, index in scenes.edit_pairs(rng, scene):
            mask = scenes.edit_mask(scene, target, index)
            Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"scene{i}-{kind}-mask.png")
            lines.append(json.dumps({"id": f"scene{i}-{kind}", "image": name, "mask": f"scene{i}-{kind}-mask.png",
                                     "source_prompt": scene.caption, "target_prompt": target.caption, "edit": kind}))
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help=f"diffusers folder to write (the shipped model is "
                        f"{SHAPES_FOLDER}: --out there needs --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    parser.add_argument("--work", type=Path, default=Path("out/train_shapes"), help="checkpoints (resume)")
    for name, value in asdict(TrainConfig()).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda")
    args = parser.parse_args(argv)
    if (args.out / "model_index.json").exists() and not args.overwrite:  # checked now, not after hours of training
        parser.error(f"--out {args.out} already holds a model; pass --overwrite to replace it, or choose another folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    print(train(config, args.out, args.work, args.device))


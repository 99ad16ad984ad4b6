"""`nti eval`'s protocols: which scores each output gets (seed report or PIE-Bench), and the scorer that computes
them with the metric models loaded once."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .config import METHODS
from .metrics import ClipScorer, PieModels, PieScores, SeedScores, pie_scores, seed_scores

EVAL_METHODS = ("baseline", *METHODS)  # baseline: text-to-image from the target prompt and seeded noise
KEY = ("id", "method", "guidance", "schedule")
ORACLE = "oracle"  # 1 when the scene oracle reads the output as its prompt (shapes model only), else 0


@dataclass(frozen=True)
class Protocol:
    """A preset of `nti eval`: the scores each output gets, and what the summary, plots and report show."""

    name: str
    metrics: tuple[str, ...]  # per-output scores; CSV columns recon_<metric> and edit_<metric>
    headline: tuple[str, ...]  # summary columns printed, plotted and tabled (those that have values)
    speed_panels: tuple[str, ...]  # fidelity axes of the speed plot
    schedule_panels: tuple[str, ...]  # metrics of the guidance-schedule plot

    @property
    def columns(self) -> tuple[str, ...]:
        """samples.csv's header."""
        return (*KEY, "edit_type", "source_prompt", "target_prompt", *(f"recon_{m}" for m in self.metrics),
                *(f"edit_{m}" for m in self.metrics), "invert_s", "recon_s", "edit_s", "inner_iterations",
                "recon_png", "edit_png")


SEED = Protocol(
    name="seed",
    metrics=(*(f.name for f in dataclasses.fields(SeedScores)), ORACLE),
    headline=("recon_psnr", "recon_ssim_global", "recon_clip_image", "edit_ssim_global", "edit_clip_image",
              "edit_clip_text", "edit_oracle", "edit_bg_ssim_windowed", "edit_bg_psnr", "inner_iterations",
              "s_per_sample"),
    speed_panels=("recon_psnr", "recon_ssim_global", "edit_ssim_global"),
    schedule_panels=("recon_psnr", "recon_ssim_global", "edit_ssim_global", "edit_clip_text"))
PIE_BENCH = Protocol(
    name="pie-bench",
    metrics=(*(f.name for f in dataclasses.fields(PieScores)), ORACLE),
    headline=("edit_structure_distance", "edit_bg_psnr", "edit_bg_lpips", "edit_bg_mse", "edit_bg_ssim",
              "edit_clip_whole", "edit_clip_edited", "edit_oracle", "recon_bg_psnr", "inner_iterations",
              "s_per_sample"),
    speed_panels=("edit_structure_distance", "edit_bg_psnr", "recon_bg_psnr"),
    schedule_panels=("edit_structure_distance", "edit_bg_psnr", "edit_clip_whole", "edit_clip_edited"))
PROTOCOLS = {p.name: p for p in (SEED, PIE_BENCH)}
# PIE-Bench's Table 1 layout: metric, column title, scale
PIE_TABLE = (("structure_distance", "structure distance ×10³ ↓", 1e3), ("bg_psnr", "PSNR ↑", 1.0),
             ("bg_lpips", "LPIPS ×10³ ↓", 1e3), ("bg_mse", "MSE ×10⁴ ↓", 1e4), ("bg_ssim", "SSIM ×10² ↑", 1e2),
             ("clip_whole", "CLIP whole ↑", 1.0), ("clip_edited", "CLIP edited ↑", 1.0))



@dataclass
class Scorer:
    """Scores outputs against their sources under one protocol, with the models loaded once for the run."""

    protocol: Protocol
    clip: ClipScorer | None = None
    pie: PieModels | None = None  # pie-bench: CLIP, LPIPS (SqueezeNet), DINO
    oracle: bool = False  # the model draws scenes the scene oracle can read (the shapes model)

    def __call__(self, prefix: str, source, output, prompt: str, mask) -> dict:
        """The protocol's scores of output vs source (prompt: what the output should show), keys prefixed."""
        if self.protocol is PIE_BENCH:
            scores = dataclasses.asdict(pie_scores(source, output, prompt, mask, self.pie or PieModels()))
        else:
            scores = dataclasses.asdict(seed_scores(source, output, prompt, mask, self.clip))
        scores[ORACLE] = oracle_reads(output, prompt) if self.oracle else None
        return {f"{prefix}_{name}": value for name, value in scores.items()}


def oracle_reads(image, caption: str) -> float | None:
    """1.0 when the scene oracle reads the image as the caption, 0.0 when not, None if it is no scene caption."""
    from .testbed.scenes import read_scene

    try:
        return float(read_scene(image).matches(caption))
    except ValueError:
        return None

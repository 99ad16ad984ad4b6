"""`nti eval`: methods x guidance settings on any data set, scored under a protocol, tabled, plotted.

For every sample x method x (guidance, schedule) setting it inverts once, reconstructs (source prompt) and edits
(target prompt) from that one inversion, scores both against the source photo, and appends one row to
samples.csv. A protocol (`--protocol`) is a preset of scores and report: `seed`, the seed report's experiments
(global SSIM, CLIP-T, CLIP-I, guidance schedules, baseline vs DDIM vs NTI), or `pie-bench`, PIE-Bench's metrics as
its official evaluation code computes them, tabled in the PnP Inversion paper's layout. The run's result-changing
settings live in run.json: a rerun with the same settings skips finished rows (resume), a rerun with other
settings is refused unless --overwrite.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import groupby
from pathlib import Path

from .config import GUIDANCE_SCHEDULES, METHODS, NTIError
from .metrics import ClipScorer, PieModels, PieScores, SeedScores, pie_scores, seed_scores
from .outputs import safe_name

log = logging.getLogger("nti")

EVAL_METHODS = ("baseline", *METHODS)  # baseline: text-to-image from the target prompt and seeded noise
MANIFEST, SAMPLES, SUMMARY, REPORT = "run.json", "samples.csv", "summary.csv", "report.md"
IMAGE_DIR, PLOT_DIR = "images", "plots"
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
GRID_SAMPLES = 8  # rows of an image grid; a grid of every sample of a large benchmark would be unreadable
PALETTE = ("tab:gray", "tab:blue", "tab:red", "tab:cyan", "tab:olive", "tab:brown", "tab:pink")
METHOD_COLORS = {m: PALETTE[k % len(PALETTE)] for k, m in enumerate(EVAL_METHODS)}
METHOD_STYLES = {m: (":", "--", "-", "-.")[k % 4] for k, m in enumerate(EVAL_METHODS)}
SCHEDULE_COLORS = {"constant": "tab:green", "linear": "tab:orange", "cosine": "tab:purple"}


def add_eval_parser(sub, add_common) -> None:
    """The `nti eval` subcommand and its options (plus the common model/algorithm/speed ones)."""
    from .cli import positive_int

    p = sub.add_parser("eval", help="evaluate methods x guidance settings on a data set: CSVs, plots, report.md")
    p.add_argument("--protocol", choices=tuple(PROTOCOLS), default=SEED.name,
                   help="seed: the seed report's scores (global SSIM, CLIP-T, CLIP-I; default); pie-bench: "
                   "PIE-Bench's metrics as its official evaluation computes them, in its Table 1 layout")
    p.add_argument("--data", default=None, help="'scenes' (bundled shape scenes; the default for the built-in "
                   "shapes model), 'sample' (bundled photos; the default for other models), a GenAI-Bench .parquet, "
                   "a PIE-Bench folder, or a folder with prompts.jsonl / a .jsonl file")
    p.add_argument("--n", type=positive_int, default=None, help="first N samples, one edit per source image before "
                   "a second edit of any (default: all)")
    p.add_argument("--methods", default="baseline,ddim,null-text",
                   help=f"comma list: {', '.join(EVAL_METHODS)} (default: baseline,ddim,null-text; replaces --method)")
    p.add_argument("--guidance-sweep", default=None, help="comma list of guidance weights, e.g. 1,3,7.5 "
                   "(default: --guidance)")
    p.add_argument("--schedules", default=None, help="comma list of constant, linear, cosine "
                   "(default: --guidance-schedule)")
    p.add_argument("--clip", default=None, help="local transformers CLIP folder for the CLIP scores "
                   "(PIE-Bench used openai/clip-vit-large-patch14; without it CLIP scores are skipped)")
    p.add_argument("--lpips", default=None, help="pie-bench: folder with torchvision's squeezenet1_1-*.pth (and "
                   "LPIPS's squeeze.pth unless torchmetrics is installed); default: the torch hub cache")
    p.add_argument("--dino", default=None, help="pie-bench: local transformers DINO ViT-B/8 folder "
                   "(facebook/dino-vitb8) for the structure distance (without it, skipped)")
    p.add_argument("--out", required=True, help="results folder (samples.csv, summary.csv, plots/, report.md)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="keep finished rows of a run with the same settings and do only the rest (default on)")
    p.add_argument("--overwrite", action="store_true", help="discard results already in --out, whatever made them")
    add_common(p)


def _split(text: str, what: str) -> list[str]:
    """Comma list -> unique non-empty items, in order."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise NTIError(f"{what}: empty list")
    return list(dict.fromkeys(items))


def parse_sweep(args) -> tuple[list[str], list[float], list[str]]:
    """Methods, guidance weights and schedules of the sweep, validated."""
    methods = _split(args.methods, "--methods")
    for method in methods:
        if method not in EVAL_METHODS:
            raise NTIError(f"--methods: unknown method {method!r}; choose from {', '.join(EVAL_METHODS)}")
    methods = [m for m in EVAL_METHODS if m in methods]  # fixed order in tables and plots
    guidances = [args.guidance]
    if args.guidance_sweep is not None:
        try:
            guidances = [float(g) for g in _split(args.guidance_sweep, "--guidance-sweep")]
        except ValueError:
            raise NTIError(f"--guidance-sweep must be comma-separated numbers, got {args.guidance_sweep!r}") from None
    if not all(math.isfinite(g) and g >= 0 for g in guidances):
        raise NTIError(f"guidance weights must be finite and >= 0, got {guidances}")
    guidances = sorted(set(guidances))
    schedules = [args.guidance_schedule] if args.schedules is None else _split(args.schedules, "--schedules")
    for schedule in schedules:
        if schedule not in GUIDANCE_SCHEDULES:
            raise NTIError(f"--schedules: unknown schedule {schedule!r}; choose from {', '.join(GUIDANCE_SCHEDULES)}")
    return methods, guidances, [s for s in GUIDANCE_SCHEDULES if s in schedules]


# --- run manifest and resume -------------------------------------------------------------------------------------


def run_settings(args, pipe, device, config, scorer: Scorer) -> dict:
    """Everything that changes a row's numbers or timings; a resumed run must match it exactly."""
    from .data import BUNDLED

    skip = {"method", "guidance", "guidance_schedule", "export_cache"}
    if config.backend == "reference":
        skip.add("batch_size")  # the reference path always runs one image at a time
    data = args.data if args.data in BUNDLED or not Path(args.data).exists() else str(Path(args.data).resolve())
    pie = scorer.pie or PieModels()
    settings = {"protocol": scorer.protocol.name, "data": data, "model": pipe.name,
                "model_fingerprint": pipe.fingerprint, "device": device.type,
                "clip": str(Path(scorer.clip.path).resolve()) if scorer.clip is not None else None,
                "lpips": str(Path(pie.lpips.path).resolve()) if pie.lpips is not None else None,
                "dino": str(Path(pie.dino.path).resolve()) if pie.dino is not None else None}
    settings.update({k: v for k, v in dataclasses.asdict(config).items() if k not in skip})
    return json.loads(json.dumps(settings))  # as it reads back from run.json


def prepare_out(out: Path, settings: dict, resume: bool, overwrite: bool) -> None:
    """Refuse to mix results of other settings into --out; clear it on --overwrite."""
    has_results = (out / MANIFEST).is_file() or (out / SAMPLES).is_file()
    if has_results and overwrite:
        for name in (MANIFEST, SAMPLES, SUMMARY, REPORT):
            (out / name).unlink(missing_ok=True)
        for name in (IMAGE_DIR, PLOT_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
    elif has_results:
        if not resume:
            raise NTIError(f"--out {out} already holds results; pass --overwrite to discard them, or --resume")
        try:
            previous = json.loads((out / MANIFEST).read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise NTIError(f"--out {out} holds results without a readable {MANIFEST}; use another folder, or "
                           "--overwrite to discard them") from None
        changed = [f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in sorted({*previous, *settings})
                   if previous.get(k) != settings.get(k)]
        if changed:
            raise NTIError(f"--out {out} holds results of a run with different settings ({'; '.join(changed)}); "
                           "use another --out, or --overwrite to discard them")
    out.mkdir(parents=True, exist_ok=True)


def row_key(row: dict) -> tuple:
    return row["id"], row["method"], float(row["guidance"]), row["schedule"]


def read_rows(path: Path, columns: tuple[str, ...]) -> list[dict]:
    """Finished rows of samples.csv; a row cut off by an interruption is dropped, and the file rewritten clean."""
    if not path.is_file():
        return []
    text = path.read_text()
    text = text[:text.rfind("\n") + 1]  # after a kill mid-write the last line may be partial
    reader = csv.DictReader(io.StringIO(text))
    rows = [row for row in reader if None not in row and None not in row.values()]
    if reader.fieldnames is not None and tuple(reader.fieldnames) != columns:
        raise NTIError(f"{path} has other columns than this version writes; use another --out, or --overwrite")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def cell(value) -> str:
    """CSV text of a value: floats to 6 significant digits, None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


# --- the work ----------------------------------------------------------------------------------------------------


def square_mask(mask):
    """The mask cropped like the image (centre square); metrics resize it to the image size."""
    if mask is None:
        return None
    h, w = mask.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return mask[top:top + side, left:left + side]


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
    from .scenes import read_scene

    try:
        return float(read_scene(image).matches(caption))
    except ValueError:
        return None


def run_chunk(pipe, chunk, config, sources, scorer: Scorer, out: Path, cache) -> list[dict]:
    """Rows of one batch of samples under one method and setting: invert once, reconstruct and edit from it."""
    from . import api
    from .images import save_png

    method, guidance, schedule = chunk[0][1:]
    cfg = config if method == "baseline" else config.replace(method=method)
    cfg = cfg.replace(guidance=guidance, guidance_schedule=schedule)
    samples = [item[0] for item in chunk]
    squares = [sources[s.id] for s in samples]
    count = len(samples)
    rows = [{"id": s.id, "method": method, "guidance": repr(float(guidance)), "schedule": schedule,
             "edit_type": s.edit_type, "source_prompt": s.source_prompt, "target_prompt": s.target_prompt}
            for s in samples]
    recons = [None] * count
    if method == "baseline":  # one prompt per call: every sample starts from the same seeded noise
        edits = []
        for row, s in zip(rows, samples):
            start = time.perf_counter()
            edits += api.generate(pipe, [s.target_prompt], cfg, progress=False)
            row.update(invert_s=0.0, recon_s=None, edit_s=time.perf_counter() - start, inner_iterations=0)
    else:
        inversions = api.invert_cached(pipe, squares, [s.source_prompt for s in samples], cfg, cache,
                                         progress=False)
        start = time.perf_counter()
        recons = api.reconstruct(pipe, inversions, cfg, progress=False)
        recon_s = (time.perf_counter() - start) / count
        start = time.perf_counter()
        edits = api.edit(pipe, inversions, [s.target_prompt for s in samples], cfg, progress=False)
        edit_s = (time.perf_counter() - start) / count
        for row, inv in zip(rows, inversions):
            # the inversion's own per-image timings (its share of a batch), so a cached inversion keeps its cost
            row.update(invert_s=sum(inv.timings.values()), recon_s=recon_s, edit_s=edit_s,
                       inner_iterations=sum(inv.iterations))
    for row, s, square, recon, edited in zip(rows, samples, squares, recons, edits):
        mask = square_mask(s.mask)
        folder = f"{IMAGE_DIR}/{safe_name(s.id)}"
        if not (out / folder / "source.png").is_file():
            save_png(square, out / folder / "source.png")  # the grids' first column: what the model saw
        stem = f"{folder}/{method}_w{guidance:g}_{schedule}"
        if recon is not None:
            row.update(scorer("recon", square, recon, s.source_prompt, mask), recon_png=f"{stem}_recon.png")
            save_png(recon, out / row["recon_png"])
        row.update(scorer("edit", square, edited, s.target_prompt, mask), edit_png=f"{stem}_edit.png")
        save_png(edited, out / row["edit_png"])
    return rows


def run_eval(args) -> int:
    """`nti eval`: run every missing (sample, method, setting) item, then write summary, plots and report."""
    from tqdm.auto import tqdm

    from .api import check_vocabulary, prepare_images
    from .cli import config_from_args
    from .data import load_dataset
    from .metrics import load_clip_scorer, load_dino, load_pie_lpips
    from .models import load_pipeline, parse_device

    try:
        import matplotlib  # noqa: F401
        import pandas  # noqa: F401
    except ImportError as err:
        raise NTIError(f"nti eval needs matplotlib and pandas ({err.name} is missing): pip install -e '.[eval]'")
    protocol = PROTOCOLS[args.protocol]
    if protocol is PIE_BENCH:
        try:
            import torchmetrics  # noqa: F401
        except ImportError:
            raise NTIError("--protocol pie-bench computes its metrics with torchmetrics, which is not installed: "
                           "pip install torchmetrics") from None
    methods, guidances, schedules = parse_sweep(args)
    device = parse_device(args.device)
    config = config_from_args(args, device)
    pipe = load_pipeline(args.model, device, seed=0)
    if args.data is None:  # photos mean nothing to the closed-vocabulary shapes model, and scenes nothing to SD
        args.data = "scenes" if pipe.vocabulary else "sample"
    samples = load_dataset(args.data, args.n)
    if not samples:
        raise NTIError(f"data set {args.data!r} has no samples")
    if len({s.id for s in samples}) != len(samples):
        raise NTIError(f"data set {args.data!r} repeats sample ids; results are keyed by id")
    check_vocabulary(pipe, [p for s in samples for p in (s.source_prompt, s.target_prompt)])
    out = Path(args.out)
    clip = load_clip_scorer(args.clip, device=str(device))
    pie = None
    if protocol is PIE_BENCH:
        pie = PieModels(clip, load_pie_lpips(args.lpips, device=str(device)), load_dino(args.dino, device=str(device)))
    scorer = Scorer(protocol, clip, pie, oracle=bool(pipe.vocabulary))
    settings = run_settings(args, pipe, device, config, scorer)
    prepare_out(out, settings, args.resume, args.overwrite)
    sweep = {"methods": methods, "guidance": guidances, "schedules": schedules, "n": len(samples)}
    swept = ("method", "guidance", "guidance_schedule")
    fixed = {k: v for k, v in dataclasses.asdict(config).items() if k not in swept}
    manifest = {"settings": settings, "sweep": sweep, "config": json.loads(json.dumps(fixed)),
                "command": command_line(args, sweep, config), "environment": environment(device),
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    columns = protocol.columns
    done = {row_key(row) for row in read_rows(out / SAMPLES, columns)}
    items = [(s, m, g, sch) for sch in schedules for g in guidances for m in methods for s in samples
             if (s.id, m, g, sch) not in done]
    total = len(samples) * len(methods) * len(guidances) * len(schedules)
    if total > len(items) and not args.quiet:
        print(f"resuming: {total - len(items)} of {total} items already in {out / SAMPLES}", file=sys.stderr)
    sources = {}
    cache = Path(args.cache) if args.cache else None
    new_file = not (out / SAMPLES).is_file()
    with open(out / SAMPLES, "a", newline="") as f, tqdm(total=len(items), desc="eval", unit="item",
                                                          disable=args.quiet) as bar:
        writer = csv.DictWriter(f, columns)
        if new_file:
            writer.writeheader()
        for (method, guidance, schedule), group in groupby(items, key=lambda item: item[1:]):
            group = list(group)
            size = config.batch_size if config.backend == "fast" and method != "baseline" else 1
            for k in range(0, len(group), size):
                chunk = group[k:k + size]
                bar.set_postfix_str(f"{method} w={guidance:g} {schedule}")
                for s, *_ in chunk:
                    if s.id not in sources:
                        sources[s.id] = prepare_images(pipe, [s.get_image()])[0][0]
                for row in run_chunk(pipe, chunk, config, sources, scorer, out, cache):
                    writer.writerow({c: cell(row.get(c)) for c in columns})
                    f.flush()  # an interrupted run keeps every finished row
                bar.update(len(chunk))

    write_outputs(out, manifest, pipe.name)
    return 0


def command_line(args, sweep: dict, config) -> str:
    """An `nti eval` command that reruns this sweep (the main options; the full config is in run.json)."""
    parts = ["nti eval", f"--protocol {args.protocol}", f"--data {args.data}", f"--n {sweep['n']}",
             f"--methods {','.join(sweep['methods'])}",
             f"--guidance-sweep {','.join(f'{g:g}' for g in sweep['guidance'])}",
             f"--schedules {','.join(sweep['schedules'])}", f"--steps {config.steps}",
             f"--inner-steps {config.inner_steps}", f"--seed {config.seed}", f"--backend {config.backend}",
             f"--precision {config.precision}", f"--device {args.device}", f"--out {args.out}"]
    if not config.early_stop:
        parts.append("--no-early-stop")
    if config.backend == "fast":
        parts.append(f"--batch-size {config.batch_size}")
    if args.model:
        parts.append(f"--model {args.model}")
    for option in ("clip", "lpips", "dino"):
        if getattr(args, option):
            parts.append(f"--{option} {getattr(args, option)}")
    return " ".join(parts)


def git_commit() -> str | None:
    """The checkout's commit (with '+dirty' for local changes), or None outside a git checkout."""
    import subprocess

    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def environment(device) -> dict:
    """Library versions and the machine, for the report."""
    import matplotlib
    import numpy
    import pandas
    import skimage
    import torch

    from .artifact import library_versions

    versions = {**library_versions(), "numpy": numpy.__version__, "scikit-image": skimage.__version__,
                "matplotlib": matplotlib.__version__, "pandas": pandas.__version__,
                "python": platform.python_version()}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{cpu_name()}, {torch.get_num_threads()} torch threads")
    return {"versions": versions, "machine": machine, "platform": platform.platform(), "commit": git_commit()}


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- tables, plots, grids, report -------------------------------------------------------------------------------


def load_results(path: Path):
    """samples.csv as a DataFrame, with s_per_sample = inversion + edit seconds (what one edit costs)."""
    import pandas as pd

    df = pd.read_csv(path, dtype={"id": str, "edit_type": str, "source_prompt": str, "target_prompt": str})
    df["s_per_sample"] = df["invert_s"] + df["edit_s"]
    df["method"] = pd.Categorical(df["method"], [m for m in EVAL_METHODS if m in set(df["method"])])
    df["schedule"] = pd.Categorical(df["schedule"], [s for s in GUIDANCE_SCHEDULES if s in set(df["schedule"])])
    return df


def summarize(df, by: tuple[str, ...] = ()):
    """Mean and std (over samples with a value) per method x guidance x schedule (x `by` columns) of every numeric
    column that has values."""
    import pandas as pd

    numeric = [c for c in df.columns if c not in (*KEY, "edit_type") and pd.api.types.is_numeric_dtype(df[c])
               and df[c].notna().any()]
    grouped = df.groupby(["method", "guidance", "schedule", *by], observed=True, sort=True)
    summary = grouped[numeric].agg(["mean", "std"])
    summary.columns = [f"{c}_{stat}" for c, stat in summary.columns]
    summary.insert(0, "n", grouped.size())
    return summary.reset_index()


def setting_label(row, multi_guidance: bool, multi_schedule: bool) -> str:
    parts = [str(row["method"])]
    if multi_guidance:
        parts.append(f"w={row['guidance']:g}")
    if multi_schedule:
        parts.append(str(row["schedule"]))
    return " ".join(parts)


def markdown_table(summary, columns: list[str]) -> str:
    """Summary rows as a markdown table of mean ± std."""
    head = ["method", "guidance", "schedule", "n", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in summary.iterrows():
        cells = [str(row["method"]), f"{row['guidance']:g}", str(row["schedule"]), str(int(row["n"]))]
        for c in columns:
            mean, std = row[f"{c}_mean"], row[f"{c}_std"]
            cells.append("-" if math.isnan(mean) else f"{mean:.4g}" + ("" if math.isnan(std) else f" ± {std:.2g}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def plot_metrics(summary, columns: list[str], labels: list[str], path: Path) -> None:
    """One bar panel per metric: a bar per method x setting, error bar = std over samples."""
    from matplotlib.figure import Figure

    cols = min(3, len(columns))
    rows = math.ceil(len(columns) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows + 0.3 * max(len(l) for l in labels) / 6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colors = [METHOD_COLORS[m] for m in summary["method"]]
    for ax, c in zip(axes, columns):
        ax.bar(range(len(summary)), summary[f"{c}_mean"], yerr=summary[f"{c}_std"].fillna(0), color=colors,
               capsize=3)
        ax.set_title(c)
        ax.set_xticks(range(len(summary)), labels, rotation=60, ha="right", fontsize=7)
    for ax in axes[len(columns):]:
        ax.set_visible(False)
    fig.suptitle("metrics per method and setting (mean ± std over samples)")
    save_figure(fig, path)


def pie_table(summary, prefix: str, by: tuple[str, ...] = ()) -> str:
    """Summary rows as PIE-Bench's Table 1 (its metrics, scales and column order), means over samples."""
    head = ["method", "guidance", "schedule", *by, "n", *(title for _, title, _ in PIE_TABLE)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in summary.iterrows():
        cells = [str(row["method"]), f"{row['guidance']:g}", str(row["schedule"]), *(str(row[b]) for b in by),
                 str(int(row["n"]))]
        for metric, _, scale in PIE_TABLE:
            mean = row.get(f"{prefix}_{metric}_mean", math.nan)
            cells.append("-" if math.isnan(mean) else f"{mean * scale:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_speed(summary, panels: list[str], labels: list[str], path: Path) -> None:
    """Seconds per sample (inversion + edit) against the protocol's fidelity measures."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(panels), 3.8), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False).ravel()
    for ax, c in zip(axes, panels):
        for method, part in summary.groupby("method", observed=True):
            part = part[part[f"{c}_mean"].notna()]
            if part.empty:
                continue
            ax.errorbar(part["s_per_sample_mean"], part[f"{c}_mean"], xerr=part["s_per_sample_std"].fillna(0),
                        yerr=part[f"{c}_std"].fillna(0), fmt="o", color=METHOD_COLORS[method], label=method,
                        capsize=3)
            if len(summary) <= 12:
                for i, row in part.iterrows():
                    ax.annotate(labels[i].split(" ", 1)[-1] if " " in labels[i] else "", fontsize=6,
                                xy=(row["s_per_sample_mean"], row[f"{c}_mean"]), xytext=(3, 3),
                                textcoords="offset points")
        ax.set_xlabel("seconds per sample (inversion + edit)")
        ax.set_ylabel(c)
        ax.legend(fontsize=8)
    fig.suptitle("speed vs fidelity")
    save_figure(fig, path)


def plot_schedules(summary, columns: list[str], path: Path) -> None:
    """The report's Figure 5: a metric against guidance, one line per schedule (x = schedule with one guidance)."""
    from matplotlib.figure import Figure

    by_guidance = summary["guidance"].nunique() > 1
    fig = Figure(figsize=(4.2 * len(columns), 3.6), layout="constrained")
    axes = fig.subplots(1, len(columns), squeeze=False).ravel()
    for ax, c in zip(axes, columns):
        for (method, schedule), part in summary.groupby(["method", "schedule"], observed=True):
            if not by_guidance or part[f"{c}_mean"].isna().all():
                continue
            part = part.sort_values("guidance")
            ax.errorbar(part["guidance"], part[f"{c}_mean"], yerr=part[f"{c}_std"].fillna(0), marker="o",
                        capsize=3, color=SCHEDULE_COLORS[schedule], linestyle=METHOD_STYLES[method],
                        label=f"{method} {schedule}")
        if not by_guidance:
            for method, part in summary.groupby("method", observed=True):
                if part[f"{c}_mean"].isna().all():
                    continue
                ax.errorbar([str(s) for s in part["schedule"]], part[f"{c}_mean"], yerr=part[f"{c}_std"].fillna(0),
                            marker="o", capsize=3, color=METHOD_COLORS[method], linestyle=METHOD_STYLES[method],
                            label=method)
        ax.set_xlabel("guidance weight w (at t = T)" if by_guidance else
                      f"guidance schedule (w = {summary['guidance'].iloc[0]:g} at t = T)")
        ax.set_title(c)
        ax.legend(fontsize=7)
    fig.suptitle("guidance schedules (cf. the seed report's Figure 5)")
    save_figure(fig, path)


def plot_grid(df, out: Path, guidance: float, schedule: str, path: Path) -> bool:
    """Source | each method's reconstruction and edit, one row per sample (the first GRID_SAMPLES)."""
    from matplotlib.figure import Figure
    from PIL import Image

    part = df[(df["guidance"] == guidance) & (df["schedule"] == schedule)]
    ids = list(dict.fromkeys(part["id"]))[:GRID_SAMPLES]
    columns = [(m, kind) for m in part["method"].cat.categories if (part["method"] == m).any()
               for kind in ("recon", "edit") if part.loc[part["method"] == m, f"{kind}_png"].notna().any()]
    if not ids or not columns:
        return False
    fig = Figure(figsize=(1.5 * (len(columns) + 1), 1.6 * len(ids)), layout="constrained")
    axes = fig.subplots(len(ids), len(columns) + 1, squeeze=False)
    for r, sample_id in enumerate(ids):
        rows = part[part["id"] == sample_id]
        cells = [("source", f"{IMAGE_DIR}/{safe_name(sample_id)}/source.png")]
        for m, kind in columns:
            paths = rows.loc[rows["method"] == m, f"{kind}_png"].dropna()
            cells.append((f"{m}\n{kind}", paths.iloc[0] if len(paths) else None))
        for ax, (title, name) in zip(axes[r], cells):
            ax.set_xticks([])
            ax.set_yticks([])
            if name is not None and (out / name).is_file():  # a missing image leaves its cell blank
                with Image.open(out / name) as image:
                    ax.imshow(image.convert("RGB"))
            if r == 0:
                ax.set_title(title, fontsize=8)
        axes[r][0].set_ylabel(sample_id, fontsize=8)
    fig.suptitle(f"w = {guidance:g}, {schedule} schedule", fontsize=9)
    save_figure(fig, path)
    return True


COMMON_DEFINITIONS = (
    "`recon_*`: the reconstruction (source prompt) vs the source photo; `edit_*`: the edit (target prompt) vs the "
    "source photo. `oracle` (shapes model only): 1 when the scene oracle (engine/scenes.py) reads the output as its "
    "prompt. `inner_iterations`: Adam iterations summed over steps; `s_per_sample`: inversion + edit seconds (the "
    "inversion's own per-image time, its share of a batch on the fast backend). The baseline generates from the "
    "target prompt and seeded noise: no inversion, so no reconstruction.")


def seed_sections(summary, headline) -> list[str]:
    """The seed protocol's part of report.md: the summary table and what its columns mean."""
    return [
        "## Summary (mean ± std over samples)", "", markdown_table(summary, headline), "",
        "Scored as the seed report scores edits: the edit against the source photo (SSIM and CLIP-I measure what "
        "was kept), CLIP-T against the target prompt. `ssim_global`: **the seed report's SSIM (its Algorithm 1)**, "
        "one SSIM from the means, variances and covariance of the whole grayscale images (the second resized to "
        "the first). `ssim_windowed`: the mean of scikit-image's 7x7 uniform-window grayscale SSIM map, the usual "
        "windowed SSIM, not the seed report's; `bg_ssim_windowed` averages that map over background pixels (mask "
        "False) when the data has masks, as `bg_psnr` / `bg_mse` do. SSIM data range 1; PSNR in dB on RGB in "
        "[0, 1]; CLIP-I / CLIP-T are raw cosines (not x100). " + COMMON_DEFINITIONS, ""]


def pie_sections(summary, headline, by_type) -> list[str]:
    """The pie-bench protocol's part of report.md: Table 1 layout for edits and reconstructions, the breakdown by
    editing type, the remaining columns, and the definitions."""
    lines = ["## PIE-Bench table: edits (mean over samples)", "", pie_table(summary, "edit"), "",
             "PIE-Bench's metrics as cure-lab/PnPInversion's evaluation code computes them (evaluation/"
             "matrics_calculator.py, evaluate.py), in the PnP Inversion paper's Table 1 layout. Structure distance: "
             "MSE between the DINO ViT-B/8 self-similarity matrices of the last block's keys of the edit and the "
             "source (whole image). PSNR, LPIPS (SqueezeNet), MSE and SSIM (RGB, 11x11 Gaussian window, sigma 1.5, "
             "data range 1) on the background: the edit mask, with the 1-pixel image border marked edited, is "
             "zeroed in both images and the metric is taken over the whole image. CLIP whole / edited: 100 * "
             "max(cos, 0) between the edit and the target prompt, the whole image / with everything outside the "
             "edited region blacked out. `-`: no mask in the data (background metrics, CLIP edited) or no local "
             "model for that metric.", "",
             "## Reconstructions (source prompt), same metrics", "", pie_table(summary, "recon"), ""]
    if by_type is not None:
        lines += ["## Edits by editing type", "", pie_table(by_type, "edit", by=("edit_type",)), ""]
    rest = [c for c in headline if c.removeprefix("edit_") not in {m for m, _, _ in PIE_TABLE}]
    if rest:
        lines += ["## Other columns (mean ± std over samples)", "", markdown_table(summary, rest), ""]
    return lines + [COMMON_DEFINITIONS, ""]


def write_outputs(out: Path, manifest: dict, model_name: str) -> None:
    """summary.csv, the printed table, plots, image grids and report.md from everything in samples.csv."""
    protocol = PROTOCOLS[manifest["settings"]["protocol"]]
    df = load_results(out / SAMPLES)
    if df.empty:
        raise NTIError(f"{out / SAMPLES} has no rows")
    summary = summarize(df)
    summary.to_csv(out / SUMMARY, index=False)
    headline = [c for c in protocol.headline if f"{c}_mean" in summary]
    print(pie_table(summary, "edit") if protocol is PIE_BENCH else markdown_table(summary, headline))

    multi_g, multi_s = summary["guidance"].nunique() > 1, summary["schedule"].nunique() > 1
    labels = [setting_label(row, multi_g, multi_s) for _, row in summary.iterrows()]
    plots = []
    shutil.rmtree(out / PLOT_DIR, ignore_errors=True)  # a plot of a setting no longer in the table would mislead
    plot_metrics(summary, headline, labels, out / PLOT_DIR / "metrics.png")
    plots.append(("Metrics per method and setting", "metrics.png"))
    speed = [c for c in protocol.speed_panels if f"{c}_mean" in summary]
    if speed:
        plot_speed(summary, speed, labels, out / PLOT_DIR / "speed_vs_fidelity.png")
        plots.append(("Speed vs fidelity", "speed_vs_fidelity.png"))
    fig5 = [c for c in protocol.schedule_panels if f"{c}_mean" in summary]
    if fig5:
        plot_schedules(summary, fig5, out / PLOT_DIR / "schedules.png")
        plots.append(("Guidance schedules", "schedules.png"))
    grids = []
    for (guidance, schedule), _ in summary.groupby(["guidance", "schedule"], observed=True):
        name = f"grid_w{guidance:g}_{schedule}.png"
        if plot_grid(df, out, guidance, schedule, out / PLOT_DIR / name):
            grids.append((f"w = {guidance:g}, {schedule}", name))
    has_types = protocol is PIE_BENCH and df["edit_type"].notna().any()
    by_type = summarize(df, by=("edit_type",)) if has_types else None
    (out / REPORT).write_text(report_text(df, summary, headline, manifest, model_name, plots, grids, by_type))
    print(f"wrote {out / SAMPLES}, {out / SUMMARY}, {out / PLOT_DIR}/, {out / REPORT}", file=sys.stderr)


def report_text(df, summary, headline, manifest, model_name, plots, grids, by_type=None) -> str:
    """report.md: what ran where, the protocol's tables, plots, grids and metric definitions."""
    from .models import SHAPES, TINY

    settings, env = manifest["settings"], manifest["environment"]
    protocol = PROTOCOLS[settings["protocol"]]
    lines = [f"# nti eval ({protocol.name} protocol): {settings['data']}, {df['id'].nunique()} samples", ""]
    if model_name == TINY:
        lines += ["> **Built-in tiny random model.** Its weights are random, so these numbers only check that the "
                  "harness runs end to end (inversion, reconstruction, editing, metrics, plots); they say nothing "
                  "about the paper's or the seed report's claims. Run with `--model` pointing at SD v1.4 for that.",
                  ""]
    elif model_name == SHAPES:
        lines += ["> **Built-in shapes model** (engine/testbed.py): a small Stable Diffusion architecture trained on "
                  "32 px scenes of coloured shapes. Its numbers are real for that model, which is not SD v1.4. "
                  "`oracle` is the share of outputs the scene oracle reads as their prompt: the one score here "
                  "that reads what an edit did (`python -m benchmarks.bench_testbed` grades more edits).", ""]
    config = manifest["config"]
    schedules = list(df["schedule"].cat.categories)
    # only a decaying schedule has a guidance_min; "constant (decay to ...)" would contradict itself
    decay = [s for s in schedules if s != "constant"]
    schedule_text = ", ".join(schedules) + (f" ({' and '.join(decay)}: w decays to guidance_min = "
                                            f"{config['guidance_min']:g})" if decay else "")
    skipped = {"clip": "skipped (no --clip folder)", "lpips": "skipped (no SqueezeNet weights: --lpips)",
               "dino": "skipped (no --dino folder)"}
    models = [f"- CLIP: {settings['clip'] or skipped['clip']}"]
    if protocol is PIE_BENCH:
        models += [f"- LPIPS (SqueezeNet): {settings['lpips'] or skipped['lpips']}",
                   f"- DINO ViT (structure distance): {settings['dino'] or skipped['dino']}"]
    lines += [
        f"- model: `{settings['model']}` (fingerprint `{settings['model_fingerprint']}`)",
        f"- device: {settings['device']} ({env['machine']}; {env['platform']})",
        f"- data: `{settings['data']}`, samples: {', '.join(dict.fromkeys(df['id']))}",
        f"- methods: {', '.join(df['method'].cat.categories)}; guidance: "
        f"{', '.join(f'{g:g}' for g in sorted(df['guidance'].unique()))}; schedules: {schedule_text}",
        f"- steps {config['steps']}, inner steps {config['inner_steps']} (early stop "
        f"{'on' if config['early_stop'] else 'off'}), lr {config['lr']:g}, seed {config['seed']}, backend "
        f"{config['backend']}, precision {config['precision']}"
        + (f", batch size {config['batch_size']}" if config["backend"] == "fast" else ""),
        f"- code: commit {env['commit'] or 'unknown'}; rerun: `{manifest['command']}`",
        *models,
        f"- updated {manifest['updated']}; rows: {len(df)} in [{SAMPLES}]({SAMPLES}), means in [{SUMMARY}]({SUMMARY})",
        ""]
    lines += pie_sections(summary, headline, by_type) if protocol is PIE_BENCH else seed_sections(summary, headline)
    lines += ["## Plots", ""]
    lines += [f"### {title}\n\n![{title}]({PLOT_DIR}/{name})\n" for title, name in plots]
    lines += ["## Image grids", "", f"Source | each method's reconstruction and edit (first {GRID_SAMPLES} samples).",
              ""]
    lines += [f"### {title}\n\n![{title}]({PLOT_DIR}/{name})\n" for title, name in grids]
    lines += ["## Config and versions", "", "Every setting but the swept method, guidance and schedule:", "",
              "```json", json.dumps(config, indent=2, sort_keys=True), "```", "",
              "| library | version |", "|---|---|"]
    lines += [f"| {name} | {version} |" for name, version in env["versions"].items()]
    return "\n".join(lines) + "\n"

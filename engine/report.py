"""`nti eval`'s outputs from samples.csv: summary.csv, the markdown tables, plots, image grids and report.md."""
from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from pathlib import Path, PurePosixPath

from .outputs import atomic_write, safe_name  # noqa: F401  (evaluate imports safe_name from here)
from .config import GUIDANCE_SCHEDULES, NTIError
from .scoring import EVAL_METHODS, KEY, PIE_BENCH, PIE_TABLE, PROTOCOLS

log = logging.getLogger("nti")
MANIFEST, SAMPLES, SUMMARY, REPORT = "run.json", "samples.csv", "summary.csv", "report.md"
IMAGE_DIR, PLOT_DIR = "images", "plots"
GRID_SAMPLES = 8  # rows of an image grid; a grid of every sample of a large benchmark would be unreadable
PALETTE = ("tab:gray", "tab:blue", "tab:red", "tab:cyan", "tab:olive", "tab:brown", "tab:pink")
METHOD_COLORS = {m: PALETTE[k % len(PALETTE)] for k, m in enumerate(EVAL_METHODS)}
METHOD_STYLES = {m: (":", "--", "-", "-.")[k % 4] for k, m in enumerate(EVAL_METHODS)}
SCHEDULE_COLORS = {"constant": "tab:green", "linear": "tab:orange", "cosine": "tab:purple"}


def load_results(path: Path):
    """samples.csv as a DataFrame, with s_per_sample = inversion + edit seconds (what one edit costs)."""
    import pandas as pd

    text = ("id", "source_prompt", "target_prompt")
    header = pd.read_csv(path, nrows=0).columns
    # an id or prompt "NA", "None" or "null" is text: pandas' default missing-value words would make it NaN (a sample
    # lost from the report's list and grids); the other columns' empty cells and cell()'s "nan" are missing
    df = pd.read_csv(path, dtype={**dict.fromkeys(text, str), "edit_type": str}, keep_default_na=False,
                     na_values={c: ["", "nan"] for c in header if c not in text})
    df["s_per_sample"] = df["invert_s"] + df["edit_s"]
    df["method"] = pd.Categorical(df["method"], [m for m in EVAL_METHODS if m in set(df["method"])])
    df["schedule"] = pd.Categorical(df["schedule"], [s for s in GUIDANCE_SCHEDULES if s in set(df["schedule"])])
    return df


def summarize(df, by: tuple[str, ...] = ()):
    """Mean, std and count (of samples with a value) per method x guidance x schedule (x `by` columns) of every
    numeric column that has values."""
    import pandas as pd

    numeric = [c for c in df.columns if c not in (*KEY, "edit_type") and pd.api.types.is_numeric_dtype(df[c])
               and df[c].notna().any()]
    grouped = df.groupby(["method", "guidance", "schedule", *by], observed=True, sort=True)
    summary = grouped[numeric].agg(["mean", "std", "count"])  # count: the mean's own n (NaN cells left out)
    summary.columns = [f"{c}_{stat}" for c, stat in summary.columns]
    summary.insert(0, "n", grouped.size())
    return summary.reset_index()


def guidance_label(guidance: float) -> str:
    """A guidance weight as file names and tables show it: short (7.5, 1) when that reads back as the same float,
    else in full (7.5000001), so two weights of one sweep never share an image, grid or table row name."""
    short = f"{float(guidance):g}"
    return short if float(short) == float(guidance) else repr(float(guidance))


def setting_label(row, multi_guidance: bool, multi_schedule: bool) -> str:
    parts = [str(row["method"])]
    if multi_guidance:
        parts.append(f"w={guidance_label(row['guidance'])}")
    if multi_schedule:
        parts.append(str(row["schedule"]))
    return " ".join(parts)


def markdown_table(summary, columns: list[str]) -> str:
    """Summary rows as a markdown table of mean ± std."""
    head = ["method", "guidance", "schedule", "n", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, row in summary.iterrows():
        cells = [str(row["method"]), guidance_label(row["guidance"]), str(row["schedule"]), str(int(row["n"]))]
        for c in columns:
            mean, std = row[f"{c}_mean"], row[f"{c}_std"]
            cells.append("-" if math.isnan(mean) else f"{mean:.4g}" + ("" if math.isnan(std) else f" ± {std:.2g}")
                         + partial_count(row, c))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_figure(fig, path: Path) -> None:
    """The figure to path, atomically."""
    with warnings.catch_warnings():  # a sample id in a script the font lacks (CJK) is drawn as boxes: no raw
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")  # Python warning for each letter
        atomic_write(path, lambda temp: fig.savefig(temp, format=path.suffix[1:], dpi=100, bbox_inches="tight"))


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
        cells = [str(row["method"]), guidance_label(row["guidance"]), str(row["schedule"]),
                 *(table_text(row[b]) for b in by), str(int(row["n"]))]
        for metric, _, scale in PIE_TABLE:
            mean = row.get(f"{prefix}_{metric}_mean", math.nan)
            cells.append("-" if math.isnan(mean) else f"{mean * scale:.2f}" + partial_count(row, f"{prefix}_{metric}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def partial_count(row, column: str) -> str:
    """' (n=K)' after a mean over fewer samples than the setting's n (the others have no value), else ''."""
    count = row.get(f"{column}_count", row["n"])
    return f" (n={int(count)})" if count < row["n"] else ""


def table_text(value) -> str:
    """A data set's own text (a JSONL's edit type) as one markdown table cell: '|' escaped, line breaks made spaces."""
    return " ".join(str(value).split()).replace("|", "\\|")


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
        # beside the sample's outputs: evaluate.sample_folder names it (an older run's rows keep their folder)
        cells = [("source", f"{PurePosixPath(rows['edit_png'].iloc[0]).parent}/source.png")]
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
    fig.suptitle(f"w = {guidance_label(guidance)}, {schedule} schedule", fontsize=9)
    save_figure(fig, path)
    return True


COMMON_DEFINITIONS = (
    "`recon_*`: the reconstruction (source prompt) vs the source photo; `edit_*`: the edit (target prompt) vs the "
    "source photo. `oracle` (shapes model only): 1 when the scene oracle (engine/testbed/scenes.py) reads the "
    "output as its prompt. `inner_iterations`: Adam iterations summed over steps; `s_per_sample`: inversion + edit seconds (the "
    "inversion's own per-image time, its share of a batch on the fast backend). The baseline generates from the "
    "target prompt and seeded noise: no inversion, so no reconstruction. `n`: the setting's samples; each mean and "
    "std is over those with a value (empty and NaN cells left out; `(n=K)` after a mean over fewer than n samples, "
    "`_count` in summary.csv); std is the sample standard deviation (n - 1), left out when fewer than two samples "
    "have a value.")


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


def write_outputs(out: Path, manifest: dict, model_name: str) -> str:
    """summary.csv, plots, image grids and report.md from everything in samples.csv; returns the summary table
    (markdown) for the command line to print."""
    protocol = PROTOCOLS[manifest["settings"]["protocol"]]
    df = load_results(out / SAMPLES)
    if df.empty:
        raise NTIError(f"{out / SAMPLES} has no rows")
    summary = summarize(df)
    atomic_write(out / SUMMARY, lambda temp: summary.to_csv(temp, index=False))
    headline = [c for c in protocol.headline if f"{c}_mean" in summary]
    table = pie_table(summary, "edit") if protocol is PIE_BENCH else markdown_table(summary, headline)

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
        name = f"grid_w{guidance_label(guidance)}_{schedule}.png"
        if plot_grid(df, out, guidance, schedule, out / PLOT_DIR / name):
            grids.append((f"w = {guidance_label(guidance)}, {schedule}", name))
    has_types = protocol is PIE_BENCH and df["edit_type"].notna().any()
    by_type = summarize(df, by=("edit_type",)) if has_types else None
    text = report_text(df, summary, headline, manifest, model_name, plots, grids, by_type)
    atomic_write(out / REPORT, lambda temp: temp.write_text(text, encoding="utf-8"))  # its ± and ×10³ on any locale
    log.info("wrote %s, %s, %s/, %s", out / SAMPLES, out / SUMMARY, out / PLOT_DIR, out / REPORT)
    return table


def report_text(df, summary, headline, manifest, model_name, plots, grids, by_type=None) -> str:
    """report.md: what ran where, the protocol's tables, plots, grids and metric definitions."""
    from .models import RANDOM_MODELS, SHAPES

    settings, env = manifest["settings"], manifest["environment"]
    protocol = PROTOCOLS[settings["protocol"]]
    lines = [f"# nti eval ({protocol.name} protocol): {settings['data']}, {df['id'].nunique()} samples", ""]
    if model_name in RANDOM_MODELS:
        lines += ["> **Built-in tiny random model.** Its weights are random, so these numbers only check that the "
                  "harness runs end to end (inversion, reconstruction, editing, metrics, plots); they say nothing "
                  "about the paper's or the seed report's claims. Run with `--model` pointing at SD v1.4 for that.",
                  ""]
    elif model_name == SHAPES:
        lines += ["> **Built-in shapes model** (engine/testbed/): a small Stable Diffusion architecture trained on "
                  "32 px scenes of coloured shapes. Its numbers are real for that model, which is not SD v1.4. "
                  "`oracle` is the share of outputs the scene oracle reads as their prompt: the one score here "
                  "that reads what an edit did (`python -m nti.benchmarks.bench_testbed` grades more edits).", ""]
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
        f"{', '.join(guidance_label(g) for g in sorted(df['guidance'].unique()))}; schedules: {schedule_text}",
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

"""`nti eval`: methods x guidance settings on any data set, scored under a protocol, tabled, plotted.

For every sample x method x (guidance, schedule) setting it inverts once, reconstructs (source prompt) and edits
(target prompt) from that one inversion, scores both against the source photo, and appends one row to
samples.csv. A protocol (`--protocol`) is a preset of scores and report: `seed`, the seed report's experiments
(global SSIM, CLIP-T, CLIP-I, guidance schedules, baseline vs DDIM vs NTI), or `pie-bench`, PIE-Bench's metrics as
its official evaluation code computes them, tabled in the PnP Inversion paper's layout. The run's result-changing
settings live in run.json: a rerun with the same settings skips finished rows (resume), a rerun with other
settings is refused unless --overwrite.

Split by responsibility: this module is the sweep (arguments, resume, the runs); engine/scoring.py the protocols and
scores; engine/report.py the tables, plots and report.md; engine/provenance.py the commit and environment.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from itertools import groupby
from pathlib import Path

from .config import GUIDANCE_SCHEDULES, NTIError
from .metrics import PieModels
from .options import positive_int
from .outputs import atomic_write, check_writable_folder
from .provenance import environment
from .report import IMAGE_DIR, MANIFEST, PLOT_DIR, REPORT, SAMPLES, SUMMARY, guidance_label, safe_name, write_outputs
from .scoring import EVAL_METHODS, PIE_BENCH, PROTOCOLS, SEED, Scorer  # noqa: F401  (SEED: tests read it here)

log = logging.getLogger("nti")
HASHED_NAME = re.compile(r"-[0-9a-fA-F]{8}$")  # what sample_folder appends to a name it hashes
EVAL_LOCK = ".nti-eval.lock"  # held by the run writing into --out (claim_out)
CROP_WARNINGS_SHOWN = 3  # samples whose crop warning is logged in full; the rest are counted


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """`nti eval`'s own options (engine/cli.py adds the common model/algorithm/speed ones)."""
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
    p.add_argument("--sample-words", action=argparse.BooleanOptionalAction, default=True,
                   help="with a p2p --edit, each sample's own words where the data set has them (PIE-Bench's "
                   "blended_word 'SRC TGT'): local blend of SRC in the source and TGT in the target, TGT's attention "
                   "x2, as PnPInversion's P2P runs behind the published table (default on)")
    p.add_argument("--out", required=True, help="results folder (samples.csv, summary.csv, plots/, report.md)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="keep finished rows of a run with the same settings and do only the rest (default on)")
    p.add_argument("--overwrite", action="store_true", help="discard results already in --out, whatever made them")


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
    from .artifact import library_versions
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
                "dino": str(Path(pie.dino.path).resolve()) if pie.dino is not None else None,
                # another release of the engine or of the libraries under it can change a row's numbers (a fixed
                # defect, another kernel): a resume under other versions would mix two sets of results in one table
                "versions": library_versions(),
                # each sample's own P2P words change its edit (and only p2p edits have any)
                "sample_words": bool(args.sample_words) and config.edit != "regenerate"}
    settings.update({k: v for k, v in dataclasses.asdict(config).items() if k not in skip})
    return json.loads(json.dumps(settings))  # as it reads back from run.json


def prepare_out(out: Path, settings: dict, resume: bool, overwrite: bool) -> None:
    """Refuse to mix results of other settings into --out; clear it on --overwrite. Names an eval run writes or
    clears that already hold something with no run.json beside them (written first by every run) are the user's:
    refused, even with --overwrite, rather than replaced or deleted. Runs inside claim_out, which made --out a
    folder (or refused a file there)."""
    theirs = [name for name in (SAMPLES, SUMMARY, REPORT, IMAGE_DIR, PLOT_DIR) if (out / name).exists()]
    if theirs and not (out / MANIFEST).is_file():
        raise NTIError(f"--out {out} already holds {', '.join(theirs)} that no nti eval run wrote (no {MANIFEST}); "
                       f"choose a new or empty folder, so that nothing of yours is replaced or deleted")
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


def row_key(row: dict) -> tuple:
    return row["id"], row["method"], float(row["guidance"]), row["schedule"]


def read_rows(path: Path, columns: tuple[str, ...]) -> list[dict]:
    """Finished rows of samples.csv; a row cut off by an interruption is dropped, and the file rewritten clean."""
    if not path.is_file():
        return []
    # newline="" as csv wants it: a prompt's "\r" is text, not a line end to translate; UTF-8, as pandas reads it
    with open(path, newline="", encoding="utf-8") as f:
        text = f.read()
    text = text[:text.rfind("\n") + 1]  # after a kill mid-write the last line may be partial
    reader = csv.DictReader(io.StringIO(text))
    rows = [row for row in reader if None not in row and None not in row.values()]
    if reader.fieldnames is not None and tuple(reader.fieldnames) != columns:
        raise NTIError(f"{path} has other columns than this version writes; use another --out, or --overwrite")
    def rewrite(temp: Path) -> None:  # atomically: a kill here must not lose the finished rows
        with open(temp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, rewrite)
    return rows


def check_rows_match(rows: list[dict], samples, out: Path) -> None:
    """Refuse to resume a finished row of a sample whose prompts are no longer the data set's: run.json records the
    data set by its path, so a JSONL edited in place since would have its old rows reported as the new prompts'."""
    wanted = {s.id: (s.source_prompt, s.target_prompt, cell(s.edit_type)) for s in samples}
    for row in rows:
        now = wanted.get(row["id"])  # a sample left out now (a smaller --n) keeps its rows, as documented
        if now is not None and now != (row["source_prompt"], row["target_prompt"], row["edit_type"]):
            raise NTIError(f"--out {out} holds results of sample {row['id']!r} made under other prompts "
                           f"({row['source_prompt']!r} -> {row['target_prompt']!r}; the data set now has "
                           f"{now[0]!r} -> {now[1]!r}); use another --out, or --overwrite to discard them")


def append_rows(path: Path, columns: tuple[str, ...], rows: list[dict], header: bool = False) -> None:
    """Append rows to samples.csv, opened and closed per call so that an interrupted run keeps every finished row;
    a full disk is bad input (exit 2) that names the file. A row it cuts off is dropped by the next run's
    read_rows."""
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    if header:
        writer.writeheader()
    writer.writerows({c: cell(row.get(c)) for c in columns} for row in rows)
    try:  # the whole `with`: closing flushes, and a full disk can fail there too
        with open(path, "a", newline="", encoding="utf-8") as f:  # not the locale's: a prompt's é, 猫
            f.write(text.getvalue())
    except OSError as err:
        raise NTIError(f"could not write {path}: {err.strerror or err}; its finished rows are kept: make room and "
                       f"run the same command again to resume") from None


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


def check_mask_shape(sample, size: tuple[int, int]) -> None:
    """Refuse a mask shaped unlike its image (beyond a pixel of rounding): the metrics would stretch it onto the
    image, scoring the background over the wrong pixels. A mask at another scale of the same shape is fine."""
    if sample.mask is None:
        return
    (mask_h, mask_w), (width, height) = sample.mask.shape[:2], size
    if abs(mask_w * height - mask_h * width) > max(width, height):
        raise NTIError(f"sample {sample.id}: its mask is {mask_w}x{mask_h} but its image {width}x{height} (width x "
                       f"height); give a mask of the image's size (a PIE-Bench mask is for a 512x512 image)")


def sample_folder(sample_id: str) -> str:
    """The sample's folder under images/: its safe name, with a hash of the id when that name is not the id
    (lower-cased: case-insensitive disks), so ids that differ in unsafe characters or case never share one. An id
    that itself ends like a hashed name ('-' and 8 hex digits) is hashed too: id 'a-<hash of A>' kept its name,
    the folder of id 'A' on a case-insensitive disk."""
    name, text = safe_name(sample_id), str(sample_id)
    if name != text.lower() or HASHED_NAME.search(name):
        name += "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return f"{IMAGE_DIR}/{name}"


def check_same_source(sample, square, out: Path) -> None:
    """Refuse to add rows to a sample's finished ones when its image now differs from the centre square those were
    scored against (images/ID/source.png, written losslessly with its first row)."""
    import numpy as np
    from PIL import Image

    saved = out / sample_folder(sample.id) / "source.png"
    if not saved.is_file():
        return
    with Image.open(saved) as img:
        then = np.asarray(img.convert("RGB"))
    if not np.array_equal(then, np.asarray(square.convert("RGB"))):
        raise NTIError(f"--out {out} holds results of sample {sample.id!r} made from another image than the data "
                       f"set's now ({saved} differs: was the file replaced?); use another --out, or --overwrite to "
                       f"discard them")


def sample_words(sample, config, on: bool):
    """A sample's own P2P words (p2p.SampleWords) from PIE-Bench's blended_word "SRC TGT", as PnPInversion's
    run_editing_p2p.py uses it: blend ((SRC,), (TGT,)), reweight TGT x2. None without one, off, or under
    'regenerate'."""
    from .p2p import SampleWords

    blended = (sample.meta or {}).get("blended_word") or ""
    if not on or config.edit == "regenerate" or not blended.strip():
        return None
    words = blended.split()
    if len(words) != 2:
        raise NTIError(f"sample {sample.id}: blended_word must be two words 'SOURCE_WORD TARGET_WORD' (or empty), "
                       f"got {blended!r}; fix the data set, or pass --no-sample-words")
    return SampleWords(blend_source=(words[0],), blend_target=(words[1],), reweight=((words[1], 2.0),))


def run_chunk(pipe, chunk, config, sources, scorer: Scorer, out: Path, cache, words: bool = True) -> list[dict]:
    """Rows of one batch of samples under one method and setting: invert once, reconstruct and edit from it."""
    from .api import method_outputs

    method, guidance, schedule = chunk[0][1:]
    samples = [item[0] for item in chunk]
    outputs = method_outputs(pipe, config, method, guidance, schedule, [sources[s.id] for s in samples],
                             [s.source_prompt for s in samples], [s.target_prompt for s in samples], cache,
                             [sample_words(s, config, words) for s in samples])
    return score_chunk(chunk, sources, *outputs, scorer, out)


def score_chunk(chunk, sources, timings: list[dict], recons, edits, scorer: Scorer, out: Path) -> list[dict]:
    """samples.csv rows of a chunk's outputs: scored against the sources, images written under out/images."""
    from .images import save_png

    method, guidance, schedule = chunk[0][1:]
    rows = []
    for (s, *_), timing, recon, edited in zip(chunk, timings, recons, edits):
        row = {"id": s.id, "method": method, "guidance": repr(float(guidance)), "schedule": schedule,
               "edit_type": s.edit_type, "source_prompt": s.source_prompt, "target_prompt": s.target_prompt, **timing}
        square, mask = sources[s.id], square_mask(s.mask)
        folder = sample_folder(s.id)
        if not (out / folder / "source.png").is_file():
            save_png(square, out / folder / "source.png")  # the grids' first column: what the model saw
        stem = f"{folder}/{method}_w{guidance_label(guidance)}_{schedule}"
        if recon is not None:
            row.update(scorer("recon", square, recon, s.source_prompt, mask), recon_png=f"{stem}_recon.png")
            save_png(recon, out / row["recon_png"])
        row.update(scorer("edit", square, edited, s.target_prompt, mask), edit_png=f"{stem}_edit.png")
        save_png(edited, out / row["edit_png"])
        rows.append(row)
    return rows


@contextmanager
def claim_out(out: Path):
    """One nti eval at a time in a --out folder (an flock on OUT/.nti-eval.lock, dropped by the kernel if the run is
    killed): two would append the same rows twice to samples.csv and write over each other's report."""
    from .cache import Claim

    if out.exists() and not out.is_dir():
        raise NTIError(f"--out {out} is a file; nti eval writes a folder of results: choose a folder")
    check_writable_folder(out, "--out")
    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # out first, then its new parents
    out.mkdir(parents=True, exist_ok=True)
    claim = Claim(out / EVAL_LOCK)
    try:
        if not claim.try_acquire():
            try:
                holder = f" (process {int((out / EVAL_LOCK).read_text().split()[0])})"
            except (OSError, ValueError, IndexError):
                holder = ""
            raise NTIError(f"--out {out} is in use by another nti eval run{holder}; wait for it to finish, or give "
                           f"another --out")
        yield
    finally:
        claim.release()
        for folder in made:  # a run refused before it wrote anything leaves no empty folders
            if any(folder.iterdir()):
                break
            folder.rmdir()


def run_eval(args) -> str:
    """`nti eval`: run every missing (sample, method, setting) item, then write summary, plots and report; returns
    the summary table for the command line to print. With --ray the model's work runs on Ray engine actors
    (engine/distributed.py) and the scoring here, on the same chunks: the same rows and images."""
    if not args.out.strip():  # Path('') is the current folder: an unset $OUT in a script would spill results there
        raise NTIError("--out is empty: give the folder for the results")
    with claim_out(Path(args.out).expanduser()):
        if getattr(args, "ray", None) is not None:
            from .distributed import EvalSession

            with EvalSession(args) as session:
                return _run_eval(args, session)
        return _run_eval(args, None)


def _run_eval(args, session) -> str:
    import torch
    from tqdm.auto import tqdm

    from .api import check_vocabulary
    from .batch import check_prompts
    from .images import MAX_UPSCALE, center_square, crop_warning, load_image
    from .options import config_from_args
    from .data import load_dataset
    from .metrics import load_clip_scorer, load_dino, load_pie_lpips
    from .models import load_pipeline, parse_device

    try:
        import matplotlib  # noqa: F401
        import pandas  # noqa: F401
    except ImportError as err:
        raise NTIError(f"nti eval needs matplotlib and pandas ({err.name} is missing): pip install matplotlib "
                       "pandas") from None
    protocol = PROTOCOLS[args.protocol]
    if protocol is PIE_BENCH:
        try:
            import torchmetrics  # noqa: F401
        except ImportError:
            raise NTIError("--protocol pie-bench computes its metrics with torchmetrics, which is not installed: "
                           "pip install torchmetrics") from None
    methods, guidances, schedules = parse_sweep(args)
    # the engines' device (in process, or the cluster's GPUs or cpu); the scorers run here
    device = parse_device(args.device) if session is None else torch.device(session.device.split(":")[0])
    score_device = device if session is None else parse_device("auto")
    clip = load_clip_scorer(args.clip, device=str(score_device))  # a wrong folder is refused before the model loads
    pie = None
    if protocol is PIE_BENCH:
        pie = PieModels(clip, load_pie_lpips(args.lpips, device=str(score_device)),
                        load_dino(args.dino, device=str(score_device)))
    pipe = load_pipeline(args.model, device, seed=0) if session is None else session.card
    config = config_from_args(args, device)
    if args.data is None:  # photos mean nothing to the closed-vocabulary shapes model, and scenes nothing to SD
        args.data = "scenes" if pipe.vocabulary else "sample"
    samples = load_dataset(args.data, args.n)
    if not samples:
        raise NTIError(f"data set {args.data!r} has no samples")
    if len({s.id for s in samples}) != len(samples):
        raise NTIError(f"data set {args.data!r} repeats sample ids; results are keyed by id")
    check_vocabulary(pipe, [p for s in samples for p in (s.source_prompt, s.target_prompt)])
    # every sample's length and P2P word match too, as `nti edit` checks a batch's: a benchmark must not stop at its
    # 500th sample hours in. The baseline generates from the target alone: no edit plan to check for it
    needs_plan = any(method != "baseline" for method in methods)
    for s in samples:
        try:
            check_prompts(pipe, s.source_prompt, s.target_prompt, config, needs_plan)
        except NTIError as err:
            raise NTIError(f"sample {s.id}: {err}") from None
    out = Path(args.out).expanduser()  # as every other path option: `--out=~/x` is no folder named '~'
    scorer = Scorer(protocol, clip, pie, oracle=bool(pipe.vocabulary))
    settings = run_settings(args, pipe, device, config, scorer)
    prepare_out(out, settings, args.resume, args.overwrite)
    sweep = {"methods": methods, "guidance": guidances, "schedules": schedules, "n": len(samples)}
    swept = ("method", "guidance", "guidance_schedule")
    fixed = {k: v for k, v in dataclasses.asdict(config).items() if k not in swept}
    manifest = {"settings": settings, "sweep": sweep, "config": json.loads(json.dumps(fixed)),
                "command": command_line(args, sweep, config), "environment": environment(score_device),
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if session is not None:  # where the engines ran; "environment" is this machine, where the scores were computed
        manifest["ray"] = {"address": args.ray, "engine_device": session.device}
    columns = protocol.columns
    finished = read_rows(out / SAMPLES, columns)
    check_rows_match(finished, samples, out)  # as check_same_source below: before run.json is rewritten
    done = {row_key(row) for row in finished}
    items = [(s, m, g, sch) for sch in schedules for g in guidances for m in methods for s in samples
             if (s.id, m, g, sch) not in done]
    total = len(samples) * len(methods) * len(guidances) * len(schedules)
    if total > len(items):
        log.info("resuming: %d of %d items already in %s", total - len(items), total, out / SAMPLES)
    chunks = []  # one model batch each: a method and setting, up to --batch-size samples (fast backend)
    for (method, guidance, schedule), group in groupby(items, key=lambda item: item[1:]):
        group = list(group)
        size = config.model_batch if method != "baseline" else 1
        chunks += [group[k:k + size] for k in range(0, len(group), size)]
    sources, cropped = {}, []

    def prepare(chunk) -> None:  # the centre square the model sees, loaded once per sample
        for s, *_ in chunk:
            if s.id not in sources:
                img = load_image(s.get_image())
                check_mask_shape(s, img.size)
                message = crop_warning(img.size, pipe.resolution, f"sample {s.id}")
                if message is not None:  # a data set of wide photos: the first few in full, then a count at the end
                    cropped.append(s.id)
                    if len(cropped) <= CROP_WARNINGS_SHOWN:
                        log.warning(message)
                sources[s.id] = center_square(img, pipe.resolution)

    # a sample with finished rows and items still to run: its image must still be the one those rows were scored
    # against (the source.png they wrote), or the report would mix two images under one id (a file replaced in place)
    finished_ids = {row["id"] for row in finished}
    for s, *rest in items:
        if s.id in finished_ids and s.id not in sources:
            prepare([(s, *rest)])
            check_same_source(s, sources[s.id], out)
    text = json.dumps(manifest, indent=2) + "\n"  # atomically: a resume reads it to check the settings
    atomic_write(out / MANIFEST, lambda temp: temp.write_text(text))  # before any row or image (prepare_out)

    cache = Path(args.cache) if args.cache else None
    remote, gave_up = None, []
    if session is not None:  # every chunk's pixels go out at once; the outputs stream back in chunk order
        for chunk in chunks:
            prepare(chunk)
        remote = session.outputs(chunks, sources, config, str(cache.resolve()) if cache else None,
                                 lambda s: sample_words(s, config, args.sample_words))
    if not (out / SAMPLES).is_file():
        append_rows(out / SAMPLES, columns, [], header=True)
    with tqdm(total=len(items), desc="eval", unit="item", disable=args.quiet) as bar:
        for chunk in chunks:
            method, guidance, schedule = chunk[0][1:]
            bar.set_postfix_str(f"{method} w={guidance_label(guidance)} {schedule}")
            prepare(chunk)
            if remote is None:
                rows = run_chunk(pipe, chunk, config, sources, scorer, out, cache, args.sample_words)
            else:
                outputs = next(remote)
                if isinstance(outputs, Exception):  # GaveUp: its batch killed the workers; the rest goes on
                    gave_up.append(str(outputs))
                    bar.update(len(chunk))
                    continue
                rows = score_chunk(chunk, sources, *outputs, scorer, out)
            append_rows(out / SAMPLES, columns, rows)
            bar.update(len(chunk))
    if len(cropped) > CROP_WARNINGS_SHOWN:
        log.warning("%d of %d samples lost over half of their image to the centre crop or were upscaled over %dx (the "
                    "first %d are named above): their scores rate the model on what it saw", len(cropped),
                    len(samples), MAX_UPSCALE, CROP_WARNINGS_SHOWN)
    if gave_up:
        from .distributed import GaveUp
        raise GaveUp("; ".join(gave_up) + f". The other rows are in {out / SAMPLES}: rerun to resume")

    return write_outputs(out, manifest, pipe.name)


def command_line(args, sweep: dict, config) -> str:
    """An `nti eval` command that reruns this sweep (the main options; the full config is in run.json)."""
    parts = ["nti eval", f"--protocol {args.protocol}", f"--data {args.data}", f"--n {sweep['n']}",
             f"--methods {','.join(sweep['methods'])}",
             f"--guidance-sweep {','.join(guidance_label(g) for g in sweep['guidance'])}",
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



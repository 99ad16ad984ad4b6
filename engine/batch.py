"""`nti invert | edit | reconstruct` over many inputs: every input, option and output path checked before the first
UNet call, the good inputs done, every bad one listed at the end (exit 2), or a stop at the first with --fail-fast.

Order of work: inputs and inversion files are read and the outputs planned without a model (a typo costs no model
load); then the model loads and each image is decoded and each prompt checked against it; only then does the UNet
run. Results are checked finite before they are written, and written atomically (engine/outputs.py).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .artifact import Inversion, check_inversion, load_inversion
from .config import NTIConfig, NTIError
from .data import read_prompts_jsonl
from .images import SKIMAGE_PREFIX, pixel_hash
from .outputs import check_writable_folder, file_digest, plan_outputs, recorded_request, request_key
from .validate import check_flags_against_inversion, check_prompt_length, is_blank
from .version import __version__

log = logging.getLogger("nti")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
JSONL_FIELDS = ("image", "source_prompt", "target_prompt", "id")


@dataclass
class Job:
    """One input of the batch and what becomes of it."""

    label: str  # how messages name it: the image path, "jobs.jsonl:3", or the inversion file
    name: str  # the output file's stem before outputs.plan_outputs makes it safe and unique
    image: str | None = None  # an image path or skimage:NAME (None: edit a saved inversion)
    inversion_path: str | None = None
    source_prompt: str | None = None
    target_prompt: str | None = None
    square: Image.Image | None = None  # the preprocessed image, once the model's resolution is known
    inversion: Inversion | None = None
    out: Path | None = None
    request: str | None = None  # outputs.request_key of its output (--resume)
    kept: bool = False  # its output is an earlier run's of the same request: computed only if batched with the rest
    error: str | None = None


class Problems:
    """Bad inputs found so far: each is kept for the list at the end, or stops the run at once with --fail-fast."""

    def __init__(self, fail_fast: bool):
        self.fail_fast, self.messages = fail_fast, []

    def add(self, job: Job | None, message: str) -> None:
        if self.fail_fast:
            raise NTIError(message)
        if job is not None:
            job.error = message
        self.messages.append(message)


# ---------------------------------------------------------------------------------------------- inputs into jobs

def collect_jobs(args, need_target: bool, problems: Problems) -> tuple[list[Job], list[Path]]:
    """Jobs from the positional inputs and --inversion files, and the user's own files that --out must keep apart
    from (images, image folders, JSONL files). Unusable inputs are reported, not fatal."""
    for flag in ("prompt", "target"):  # as a JSONL line's: an empty prompt is a missing one ("$UNSET" in a script)
        value = getattr(args, flag, None)
        if value is not None and is_blank(value):
            raise NTIError(f"--{flag} is empty: give the text of the prompt (or leave --{flag} out to use each JSONL "
                           f"line's own)")
    jobs, photos = [], []
    for item in args.images:
        try:
            path = Path(item).expanduser()
            if not item.strip():  # Path("") is ".": an empty argument must not mean "every image here"
                problems.add(None, "an input is an empty string; give an image, a folder, a JSONL or skimage:NAME")
            elif item.startswith(SKIMAGE_PREFIX):
                jobs.append(Job(label=item, name=item[len(SKIMAGE_PREFIX):], image=item))
            elif path.suffix.lower() == ".jsonl":
                photos.append(path)
                jobs += read_jsonl(path, problems, photos)
            elif path.suffix.lower() == ".safetensors":  # a saved inversion: "not a readable image" would not say why
                problems.add(None, f"{item} is a saved inversion, not an image: edit it with "
                                   f"`nti edit --inversion {item} --target PROMPT`")
            elif path.is_dir() and args.prompt is None and (path / "prompts.jsonl").is_file():
                # a data set folder (`nti eval --data` reads it so): its images have no prompt but the JSONL's
                problems.add(None, f"folder {path} is a data set: pass {path / 'prompts.jsonl'} to use its records "
                                   f"(a folder means each image in it, under --prompt)")
            elif path.is_dir():
                photos.append(path)
                try:
                    files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
                except OSError as err:
                    problems.add(None, f"folder {path} could not be read: {err.strerror or err}")
                    continue
                if not files:
                    problems.add(None, f"folder {path} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
                photos += files
                jobs += [Job(label=str(f), name=f.stem, image=str(f)) for f in files]
            else:
                photos.append(path)
                jobs.append(Job(label=item, name=path.stem, image=item))
        except OSError as err:  # a name the filesystem will not look up (too long): Path.is_dir raises, not False
            problems.add(None, f"input {item}: {err.strerror or err}")
    for item in getattr(args, "inversion", None) or []:
        jobs.append(Job(label=item, name=Path(item).stem, inversion_path=item))
    for job in jobs:
        if job.image is None:
            continue
        if job.source_prompt is None:
            job.source_prompt = args.prompt
        if need_target and job.target_prompt is None:
            job.target_prompt = args.target
        if not job.image.startswith(SKIMAGE_PREFIX) and not Path(job.image).expanduser().exists():
            problems.add(job, f"image {job.image} does not exist")
        elif job.source_prompt is None:
            problems.add(job, f"no source prompt for {job.label}: pass --prompt or give one in the JSONL")
        elif need_target and job.target_prompt is None:
            problems.add(job, f"no target prompt for {job.label}: pass --target or give one in the JSONL")
        if not need_target:  # reconstruct: the source prompt is the target; invert: no target at all
            job.target_prompt = job.source_prompt
    return jobs, photos


def read_jsonl(path: Path, problems: Problems, photos: list[Path]) -> list[Job]:
    """One job per record of a prompts JSONL, read by data.read_prompts_jsonl (the reader `nti eval` uses); each
    bad line is reported with its number and skipped."""
    jobs, reported = [], len(problems.messages)
    records = read_prompts_jsonl(path, on_error=lambda message: problems.add(None, message))
    if not records and len(problems.messages) == reported:  # empty: say so, as for an empty folder
        problems.add(None, f"JSONL {path} has no records (one JSON object per line, e.g. {{\"image\": \"cat.png\", "
                           f"\"source_prompt\": ..., \"target_prompt\": ...}})")
    for record in records:
        if not record.image.startswith(SKIMAGE_PREFIX):
            photos.append(Path(record.image))
        # the id only names the output; outputs.plan_outputs makes it a safe file name inside --out
        jobs.append(Job(label=f"{record.where} ({record.image})", name=record.id, image=record.image,
                        source_prompt=record.source_prompt, target_prompt=record.target_prompt))
    return jobs


# --------------------------------------------------------------------------------------------------------- the run

def run_jobs(args, config: NTIConfig, device) -> int:
    """The invert / edit / reconstruct commands. Returns 0, or raises NTIError (exit 2) naming every bad input."""
    from .models import RANDOM_MODELS, load_pipeline

    need_target = args.command == "edit"
    progress = not args.quiet
    problems = Problems(getattr(args, "fail_fast", False))
    jobs, photos = collect_jobs(args, need_target, problems)
    if not jobs and not problems.messages:
        raise NTIError("no inputs: give image paths (or skimage:chelsea), a folder, a JSONL, or --inversion FILE")
    saved = [j for j in jobs if j.inversion_path is not None]
    if saved and need_target and not args.target:
        raise NTIError("--inversion needs --target PROMPT")
    only_saved = len(saved) == len(jobs)  # no image to invert: a --prompt can only be meant for the saved ones
    for job in saved:
        try:
            job.inversion = load_inversion(job.inversion_path)
        except NTIError as err:
            problems.add(job, str(err))
            continue
        except OSError as err:  # a name too long to look up
            problems.add(job, f"inversion file {job.inversion_path}: {err.strerror or err}")
            continue
        # a flag the file's settings override would be silently ignored: refuse the command
        check_flags_against_inversion(args, getattr(args, "explicit", set()), job.inversion.settings,
                                      job.inversion_path)
        source = job.inversion.source_prompt  # --prompt is for images to invert; with none, it would go unused
        if args.prompt is not None and args.prompt != source and only_saved:
            raise NTIError(f"--prompt {args.prompt!r} conflicts with inversion {job.inversion_path}, made under "
                           f"{source!r}: a saved inversion is edited from its own source prompt; drop --prompt or "
                           f"invert again with it")
        job.target_prompt = args.target if need_target else job.inversion.source_prompt

    if not jobs:
        return report(problems, 0)
    suffix = ".safetensors" if args.command == "invert" else ".png"
    plan = plan_outputs(args.out, [j.name for j in jobs], suffix, inputs=[Path(j.inversion_path) for j in saved],
                        photos=photos, sidecar_suffixes=(".json",) if args.command == "invert" else ())
    for job, path in zip(jobs, plan.paths):
        job.out = path
    if args.cache is not None:
        check_writable_folder(Path(args.cache), "--cache")

    start = time.perf_counter()
    if any(j.error is None for j in jobs):
        pipe = load_pipeline(args.model, device, seed=0)
        if pipe.name in RANDOM_MODELS:
            log.warning(f"--model {pipe.name} is a small model with random weights: its images are colour noise (it "
                        f"exists to test the machinery; give --model PATH for Stable Diffusion)")
        check_against_model(pipe, jobs, config, need_target, problems)
        edit_config = edit_config_for(args.command, config)
        valid = [j for j in jobs if j.error is None]
        for job in valid:
            job.request = request_of(args.command, job, pipe.fingerprint, edit_config, device)
        if getattr(args, "resume", True):
            for job in valid:
                job.kept = job.request is not None and recorded_request(job.out) == job.request
            kept = [j for j in valid if j.kept]
            if kept and progress:
                log.info("kept %d finished output%s of an earlier run of this request (--no-resume makes them "
                         "again)", len(kept), "s" if len(kept) != 1 else "")
            for job in kept:  # stdout lists every output of the command, kept or made, as a script reads it:
                # each line flushed, as its file is done (a pipe is block-buffered: a reader, or a killed run's
                # listing, would get no path until the batch ended)
                print(job.out, flush=True)
        todo = [j for j in valid if not j.kept]
        written, done, work_start = 0, 0, time.perf_counter()
        try:
            # chunks of every job, finished or not: the fast backend's results depend (to rounding) on which images
            # share a batch, so a chunk an interruption cut in two runs whole again, and its unfinished outputs come
            # out byte for byte as an uninterrupted run makes them; only chunks finished entirely are skipped
            for part in work_chunks(valid, config):  # each chunk written before the next: an interruption keeps them
                if all(j.kept for j in part):
                    continue
                invert_jobs(pipe, [j for j in part if j.image is not None], config, args.cache, progress, problems)
                ready = [j for j in part if j.error is None]
                if args.command == "invert":
                    from .artifact import save_inversion
                    for job in ready:
                        if not job.kept:
                            save_inversion(job.inversion, job.out, job.request)
                            print(job.out, flush=True)
                else:
                    chunk = config.model_batch
                    for k in range(0, len(ready), chunk):
                        if not all(j.kept for j in ready[k:k + chunk]):
                            edit_and_save(pipe, ready[k:k + chunk], edit_config, progress, problems)
                written += sum(j.error is None and not j.kept for j in part)
                done += sum(not j.kept for j in part)
                if progress and len(todo) > done:
                    per = (time.perf_counter() - work_start) / done
                    log.info("written %d/%d outputs (%.1f s each, about %s left)", written, len(todo), per,
                             duration(per * (len(todo) - done)))
        except KeyboardInterrupt:
            if written:
                log.warning("%d of %d outputs were written before the interruption; the same command again keeps "
                            "them and does the rest", written, len(todo))
            raise
        if progress:
            # the count too: a run whose every input failed said only "done" above its error line (none when every
            # output was kept: the line above says so)
            asked = sum(not j.kept for j in jobs)
            log.info("done in %.1f s on %s (%s backend, %s)%s", time.perf_counter() - start, device, config.backend,
                     config.method, f": {written} of {asked} outputs written" if asked else "")
    return report(problems, sum(j.error is None for j in jobs))


def edit_config_for(command: str, config: NTIConfig) -> NTIConfig:
    """The config an output is made with: `edit`'s own; `reconstruct` and `invert` regenerate under the source
    prompt, so no prompt-to-prompt setting applies to them."""
    if command == "edit":
        return config
    return config.replace(edit="regenerate", reweight=(), blend_words=(), cross_replace_words=())


def duration(seconds: float) -> str:
    """A progress estimate in words: 42 s, 7 min, 2.5 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def request_of(command: str, job: Job, fingerprint: str, config: NTIConfig, device) -> str | None:
    """The outputs.request_key of a job's output: what --resume compares with the one an existing output recorded
    (None for an input that is not a readable regular file: its error is reported where it is read)."""
    source = job.image if job.image is not None else job.inversion_path
    if source.startswith(SKIMAGE_PREFIX):
        content = source
    else:
        path = Path(source).expanduser()
        try:  # is_file first: reading a named pipe would block
            content = file_digest(path) if path.is_file() else None
        except OSError:
            content = None
        if content is None:
            return None
    return request_key(command, content, job.source_prompt, job.target_prompt, fingerprint, config.to_json(),
                       str(getattr(device, "type", device)), __version__)


def work_chunks(jobs: list[Job], config: NTIConfig) -> list[list[Job]]:
    """The jobs cut into chunks that are inverted, edited and written in turn: saved inversions first (nothing to
    invert), then the images, `batch_size` distinct (image, prompt) pairs per chunk on the fast backend, one on the
    reference, as the inversion batches them; edits of the same image share its chunk, and so its inversion."""
    per = config.model_batch
    saved = [j for j in jobs if j.image is None]
    groups: dict = {}
    for job in (j for j in jobs if j.image is not None):
        groups.setdefault((pixel_hash(job.square), job.source_prompt), []).append(job)
    members = list(groups.values())
    return ([saved[k:k + per] for k in range(0, len(saved), per)]
            + [[j for group in members[k:k + per] for j in group] for k in range(0, len(members), per)])


def check_against_model(pipe, jobs: list[Job], config: NTIConfig, need_target: bool, problems: Problems) -> None:
    """Everything that needs the model but not the UNet: the schedule, each image decoded at the model's resolution,
    each prompt against the tokenizer (length, the shapes model's words), the inversion's model, P2P's word match."""
    from . import api
    from .ddim import make_schedule
    from .images import load_square

    make_schedule(pipe.scheduler_config, config.steps, config.timestep_offset(pipe.scheduler_config))  # NTIError
    squares = {}  # JSONL lines that edit one image decode it, and warn about it, once (read-only: shared)
    for job in jobs:
        if job.error is not None:
            continue
        try:
            if job.image is not None and job.image not in squares:
                squares[job.image] = load_square(job.image, pipe.resolution, f"image {job.image}")
            if job.image is not None:
                job.square = squares[job.image]
            else:
                api.check_compatible(pipe, job.inversion)
        except NTIError as err:
            problems.add(job, str(err) if job.image is not None else f"{job.label}: {err}")
            continue
        source = job.source_prompt if job.image is not None else job.inversion.source_prompt
        try:
            check_prompts(pipe, source, job.target_prompt, config, need_target)
        except NTIError as err:
            problems.add(job, f"{job.label}: {err}")


def check_prompts(pipe, source: str, target: str | None, config: NTIConfig, need_target: bool) -> None:
    """One job's prompts against the model's tokenizer (the shapes model's words, length, P2P's word match): NTIError.
    `pipe` is a Pipeline, or the --ray driver's distributed.ModelCard (a tokenizer and no weights)."""
    from . import api, p2p

    prompts = [source] + ([target] if target is not None else [])
    api.check_vocabulary(pipe, prompts)
    check_prompt_length(pipe.tokenizer, prompts)
    if need_target and config.edit != "regenerate":
        p2p.make_plan(pipe.tokenizer, source, target, config)


def check_new_inversion(inv, config: NTIConfig) -> None:
    """artifact.check_inversion for an inversion just made: one that is not finite diverged; the NTIError names the
    raised setting to lower (the guidance weight by default)."""
    try:
        check_inversion(inv)
    except NTIError as err:
        raise NTIError(f"the inversion diverged ({err}); {config.divergence_advice()}") from None


def invert_jobs(pipe, jobs: list[Job], config: NTIConfig, cache, progress: bool, problems: Problems) -> None:
    """Inversions of the image jobs (through --cache when given); one that is not finite is a bad input."""
    if not jobs:
        return
    from .api import invert_cached
    inversions = invert_cached(pipe, [j.square for j in jobs], [j.source_prompt for j in jobs], config, cache,
                               progress)
    for job, inv in zip(jobs, inversions):
        try:
            check_new_inversion(inv, config)
        except NTIError as err:
            problems.add(job, f"{job.label}: {err}")
            continue
        job.inversion = inv


def edit_and_save(pipe, jobs: list[Job], config: NTIConfig, progress: bool, problems: Problems) -> None:
    """Edit one batch, check each result, write it. A batch refused as a whole is retried image by image, so one
    bad input does not cost the others their results."""
    from . import api
    from .images import save_png

    try:
        latents = api.edit_latents(pipe, [j.inversion for j in jobs], [j.target_prompt for j in jobs], config,
                                   progress)
    except NTIError as err:
        if len(jobs) == 1:
            problems.add(jobs[0], f"{jobs[0].label}: {err}")
        else:
            for job in jobs:
                edit_and_save(pipe, [job], config, progress, problems)
        return
    for job, image in zip(jobs, api.decode_checked(pipe, latents, [job.label for job in jobs])):
        if isinstance(image, NTIError):  # not finite: reported, never written as a black image
            problems.add(job, str(image))
            continue
        if job.kept:  # made only to batch the others as before: its file is already there
            continue
        save_png(image, job.out, job.request)
        print(job.out, flush=True)  # as run_jobs lists them: each path as its file is done


def report(problems: Problems, done: int) -> int:
    """0 when every input worked; else every bad input listed, then one error line (exit 2)."""
    messages = problems.messages
    if not messages:
        return 0
    others = f" ({done} other input{'s' if done != 1 else ''} finished and written)" if done else ""
    if len(messages) == 1:
        raise NTIError(messages[0] + others)
    for message in messages:
        print(f"nti:   {message}", file=sys.stderr)
    raise NTIError(f"{len(messages)} inputs failed, listed above{others}")

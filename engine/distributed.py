"""`nti invert|edit|reconstruct ... --ray [ADDRESS]`: the single-process run's jobs, spread over a Ray cluster.

A Ray Data pipeline (issue 20): records (driver) -> load and check images (CPU tasks) -> invert + edit (actors, one
engine each: one per GPU, or --num-workers on CPU) -> outputs written by the driver as results stream in. Only the
--cache folder must be shared by the nodes (finished inversions, keyed by content, written atomically); every node
needs nti-engine installed and the model folder at the same path. Ray is imported here only: the single-process
path never needs it.
"""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import NTIError

RAY_EXTRA = "install the ray extra: pip install -e '.[ray]'"
LOCAL = "local"  # --ray with no address: start a local cluster for this run (or use the one this process has)
# Test hook: "N:FLAG" makes the first actor that reaches its Nth batch exit hard, once per FLAG file, after the
# batch's inversions are in --cache and before its outputs are returned (issue 20: an actor dies mid-run);
# "input:NAME" makes every actor exit hard whenever its batch holds the job NAME (a batch that kills every worker).
CRASH_HOOK = "NTI_TEST_RAY_CRASH"
MAX_RETRIES = 2  # default --max-retries: a batch whose actor died is sent again this many times, then given up
LOAD_CPUS = 0.5  # logical CPUs of one image-loading task (decode + resize: light next to an engine's work)


def add_ray_options(p) -> None:
    """The --ray option group of invert / edit / reconstruct."""
    from .options import int_at_least, positive_int

    g = p.add_argument_group("scale-out on Ray (pip install -e '.[ray]'; docs/ray.md)")
    g.add_argument("--ray", nargs="?", const=LOCAL, default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: ADDRESS of its head (e.g. auto, 10.0.0.1:6379, ray://host:10001) or "
                   "none for a local one; --cache must then be a folder every node sees")
    g.add_argument("--num-workers", type=positive_int, default=None, metavar="N",
                   help="engine actors (default: one per GPU of the cluster; on CPU one per node)")
    g.add_argument("--max-retries", type=int_at_least(0), default=MAX_RETRIES, metavar="N",
                   help=f"times a batch is sent again after the actor running it died (default {MAX_RETRIES}); then "
                   "its inputs are reported failed, the other outputs are still written, and the exit code is 1")


@dataclass
class Batch:
    """What one actor call gets: the jobs of up to --batch-size distinct (image, source prompt) pairs."""

    index: int
    jobs: list  # [{name, image, source_prompt, target_prompt?, out}], grouped by (image, source_prompt)


@dataclass
class RunReport:
    """The whole run, as the driver saw it stream by."""

    written: list = field(default_factory=list)  # output paths, in arrival order
    failed: list = field(default_factory=list)  # (name, image, message): bad inputs
    abandoned: list = field(default_factory=list)  # ([names], message): batches that killed their workers
    actor_load_s: dict = field(default_factory=dict)  # actor id -> seconds to load its engine
    batch_s: list = field(default_factory=list)  # seconds each actor call took (invert + edit)
    wall_s: float = 0.0
    workers: int = 0
    device: str = "cpu"


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise NTIError(f"--ray needs Ray Data, which is not installed: {RAY_EXTRA}") from None
    return ray


def model_facts(model) -> tuple[int, tuple, str]:
    """(resolution, closed vocabulary, prompt example) from the model folder's configs, without loading weights: the
    driver sizes images and checks prompts while only the actors hold engines (an SD v1.4 UNet is 3.4 GB)."""
    from .models import SHAPES, SHAPES_FOLDER, TINY, VOCABULARY_FILE, build_tiny_pipeline, check_model_folder, \
        resolve_model_path

    if str(model) == TINY:  # built in code, a few MB: just build it
        return build_tiny_pipeline(seed=0).resolution, (), ""
    path = SHAPES_FOLDER if model is None or str(model) == SHAPES else resolve_model_path(model)
    check_model_folder(path)
    unet = json.loads((path / "unet" / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    resolution = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)  # = Pipeline.resolution
    if (path / VOCABULARY_FILE).is_file():
        card = json.loads((path / VOCABULARY_FILE).read_text())
        return resolution, tuple(card["words"]), card.get("example", "")
    return resolution, (), ""


def make_batches(jobs: list[dict], images_per_call: int) -> list[Batch]:
    """Group jobs by (image, source prompt), so several edits of one image share one inversion on one actor, and cut
    the groups into batches of `images_per_call` in input order: on a fresh cache the fast path then inverts the same
    images together as the single-process run does (same batches, same rounding)."""
    groups: dict = {}
    for job in jobs:
        groups.setdefault((job["image"], job["source_prompt"]), []).append(job)
    members = list(groups.values())
    return [Batch(i, [job for group in members[k:k + images_per_call] for job in group])
            for i, k in enumerate(range(0, len(members), images_per_call))]


# ------------------------------------------------------------------------------------------ stages (run on workers)

class AttemptLedger:
    """A Ray actor that counts the times each batch was started. Ray Data restarts a dead actor and sends its batch
    again without end; an actor that finds its batch over the budget gives it up instead of running it again."""

    def __init__(self):
        self.attempts: dict[int, int] = {}

    def begin(self, index: int) -> int:
        self.attempts[index] = self.attempts.get(index, 0) + 1
        return self.attempts[index]


def load_stage(row: dict, resolution: int) -> dict:
    """CPU task: read, decode and centre-crop a batch's images; a bad one is set aside with its reason, not raised."""
    import numpy as np

    from .images import center_square, load_image

    jobs, bad, pixels, loaded = json.loads(row["jobs"]), [], [], {}
    for job in jobs:
        if job["image"] not in loaded:
            try:
                loaded[job["image"]] = np.asarray(center_square(load_image(job["image"]), resolution))
            except NTIError as err:
                loaded[job["image"]] = str(err)
            except Exception as err:  # a decoder crash on a hostile file is still one bad input
                loaded[job["image"]] = f"image {job['image']} could not be read: {type(err).__name__}: {err}"
        if isinstance(loaded[job["image"]], str):
            bad.append({**job, "error": loaded[job["image"]]})
        else:
            pixels.append(loaded[job["image"]])
    good = [job for job in jobs if not isinstance(loaded[job["image"]], str)]
    data = np.stack(pixels).tobytes() if pixels else b""
    return {"index": row["index"], "jobs": json.dumps(good), "bad": json.dumps(bad), "pixels": data}


class EngineWorker:
    """A Ray actor holding one engine (pipeline + fast-path state), loaded once, then fed batches."""

    def __init__(self, command: str, model, device: str, config_json: str, cache, resolution: int, ledger=None,
                 max_retries: int = MAX_RETRIES):
        import torch

        from .config import NTIConfig
        from .models import load_pipeline

        import ray
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if device == "cpu" and cpus:  # the whole CPUs Ray gave this actor, no more: OpenMP threads beyond the
            # cores they share spin at barriers, which made a 2-thread actor several times slower on a busy 2-core box
            torch.set_num_threads(max(1, int(cpus)))
        start = time.perf_counter()
        self.pipe = load_pipeline(model, device, seed=0)
        self.load_s = time.perf_counter() - start
        if self.pipe.resolution != resolution:
            raise NTIError(f"the model on this node makes {self.pipe.resolution} px images, the driver's config "
                           f"{resolution} px: every node needs the same model folder")
        self.command, self.cache, self.resolution = command, cache, resolution
        self.config = NTIConfig(**json.loads(config_json))
        self.actor = f"{os.uname().nodename}:{os.getpid()}"
        self.calls = 0
        self.ledger, self.max_retries = ledger, max_retries

    def __call__(self, batch: dict) -> dict:
        import ray

        rows = []
        for k in range(len(batch["index"])):
            good, bad = json.loads(batch["jobs"][k]), json.loads(batch["bad"][k])
            attempt = ray.get(self.ledger.begin.remote(int(batch["index"][k]))) if self.ledger is not None else 1
            if attempt > self.max_retries + 1:  # every earlier attempt died with its actor: do not run it again
                why = (f"its batch killed the Ray worker running it {attempt - 1} time(s) (--max-retries "
                       f"{self.max_retries}); given up")
                rows += [{"name": j["name"], "image": j["image"], "out": j["out"], "data": b"", "json": "",
                          "error": why, "seconds": 0.0, "gave_up": True} for j in good]
            else:
                rows += [{**r, "error": "", "gave_up": False} for r in self.run_batch(good, batch["pixels"][k])]
            rows += [{"name": j["name"], "image": j["image"], "out": j["out"], "data": b"", "json": "",
                      "error": j["error"], "seconds": 0.0, "gave_up": False} for j in bad]
        columns = ("name", "image", "out", "data", "json", "error", "seconds", "gave_up")
        out = {c: [r[c] for r in rows] for c in columns}
        out["actor"], out["load_s"] = [self.actor] * len(rows), [self.load_s] * len(rows)
        return out

    def run_batch(self, jobs: list[dict], pixels: bytes) -> list[dict]:
        """Invert (reusing --cache) and edit one batch as the single-process run does, outputs as bytes."""
        import numpy as np
        from PIL import Image

        from . import api
        from .artifact import inversion_bytes

        self.calls += 1
        if not jobs:
            return []
        start = time.perf_counter()
        side = self.resolution
        arrays = np.frombuffer(pixels, np.uint8).reshape(len(jobs), side, side, 3)
        images = [Image.fromarray(a) for a in arrays]
        config = self.config
        self.maybe_crash(jobs, before=True)
        inversions = api.invert_cached(self.pipe, images, [j["source_prompt"] for j in jobs], config, self.cache,
                                       progress=False)
        self.maybe_crash(jobs)
        if self.command == "invert":
            files = [inversion_bytes(inv) for inv in inversions]
        else:
            targets = [j["target_prompt"] if self.command == "edit" else inv.source_prompt
                       for j, inv in zip(jobs, inversions)]
            chunk = config.batch_size if config.backend == "fast" else 1  # as the single-process run edits
            files = []
            for k in range(0, len(jobs), chunk):
                for img in api.edit(self.pipe, inversions[k:k + chunk], targets[k:k + chunk], config, False):
                    buffer = io.BytesIO()
                    img.save(buffer, format="PNG")  # what images.save_png writes
                    files.append((buffer.getvalue(), ""))
        seconds = (time.perf_counter() - start) / len(jobs)
        return [{"name": j["name"], "image": j["image"], "out": j["out"], "data": data, "json": readable,
                 "seconds": seconds} for j, (data, readable) in zip(jobs, files)]

    def maybe_crash(self, jobs: list[dict], before: bool = False) -> None:
        hook = os.environ.get(CRASH_HOOK)
        if not hook:
            return
        at, flag = hook.split(":", 1)
        if at == "input":
            if before and any(j["name"] == flag for j in jobs):
                os._exit(1)
            return
        if not before and self.calls == int(at):
            try:
                fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # only the first actor there, only once
            except FileExistsError:
                return
            os.write(fd, self.actor.encode())
            os.close(fd)
            os._exit(1)


# ------------------------------------------------------------------------------------------------- the driver

def run_ray(args) -> int:
    """`--ray`: run the command's jobs on a Ray cluster; exit 2 if any input was bad (the rest still finish)."""
    from .options import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_OK

    report = run_batch(args)
    for name, image, message in report.failed:
        print(f"nti: error: skipped {name} ({image}): {message}", file=sys.stderr)
    for names, message in report.abandoned:
        print(f"nti: error: gave up on {', '.join(names)}: {message}; the cause is in the Ray worker logs (out of "
              f"memory? a lower --batch-size may fit)", file=sys.stderr)
    lost = len(report.failed) + sum(len(names) for names, _ in report.abandoned)
    if lost:
        print(f"nti: error: {lost} of {lost + len(report.written)} inputs failed; the other {len(report.written)} "
              f"outputs are written", file=sys.stderr)
    # a batch that killed its workers is not an input the checks could refuse: 1, as for other internal errors
    return EXIT_INTERNAL if report.abandoned else EXIT_BAD_INPUT if report.failed else EXIT_OK


def run_batch(args) -> RunReport:
    """Collect the jobs as the single-process run does, stream them through the cluster, write what comes back."""
    import torch

    from .api import check_vocabulary
    from .artifact import write_atomic
    from .batch import Problems, collect_jobs
    from .options import config_from_args
    from .outputs import plan_outputs

    if getattr(args, "inversion", None):
        raise NTIError("--inversion edits saved inversions in one process: run it without --ray")
    ray = import_ray()
    if args.ray != LOCAL and Path(args.ray).exists():  # `--ray scenes.jsonl`: an input, not a cluster address
        args.images, args.ray = [args.ray, *args.images], LOCAL
    need_target = args.command == "edit"
    # the single-process run's collection and output plan (bad inputs named before any work); the rows that cross
    # to Ray workers are plain JSON dicts
    records, photos = collect_jobs(args, need_target, Problems(fail_fast=True))
    jobs = [{"name": r.name, "image": r.image, "source_prompt": r.source_prompt, "target_prompt": r.target_prompt}
            for r in records]
    if not jobs:
        raise NTIError("no inputs: give image paths (or skimage:chelsea), a folder or a JSONL")
    for job in jobs:  # workers resolve paths in their own folder, on their own node: give them absolute ones
        if not job["image"].startswith("skimage:"):
            job["image"] = str(Path(job["image"]).expanduser().resolve())
    suffix = ".safetensors" if args.command == "invert" else ".png"
    plan = plan_outputs(args.out, [j["name"] for j in jobs], suffix, photos=photos,
                        sidecar_suffixes=(".json",) if args.command == "invert" else ())
    for job, path in zip(jobs, plan.paths):
        job["out"] = str(path)
    resolution, words, example = model_facts(args.model)
    check_vocabulary(_Vocabulary(args.model or "shapes", words, example),
                     [j[k] for j in jobs for k in ("source_prompt", "target_prompt") if j.get(k)])

    started_here = not ray.is_initialized()
    if started_here:
        try:
            # "local" starts a cluster of its own even where `ray start` made one on this machine (None would join it)
            ray.init(address=args.ray, include_dashboard=False,
                     log_to_driver=args.debug, logging_level="ERROR")
        except (ConnectionError, ValueError, RuntimeError) as err:  # no cluster there, or a malformed address
            raise NTIError(f"could not start or reach the Ray cluster at {args.ray!r}: {err}") from None
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        device = args.device if args.device != "auto" else ("cuda" if gpus else "cpu")
        if device.startswith("cuda") and not gpus:
            raise NTIError(f"--device {device} but the Ray cluster has no GPUs")
        config = config_from_args(args, torch.device(device.split(":")[0]))
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        workers = args.num_workers or (gpus if device.startswith("cuda") else nodes)
        report = RunReport(workers=workers, device=device)
        per_call = config.batch_size if config.backend == "fast" else 1  # what the single-process run inverts at once
        batches = make_batches(jobs, per_call)
        workers = min(workers, len(batches))  # an actor with no batch to run would only load the model
        report.workers = workers
        cache = str(Path(args.cache).resolve()) if args.cache else None
        start = time.perf_counter()
        ledger = ray.remote(num_cpus=0)(AttemptLedger).remote()
        dataset = _pipeline(ray, args, batches, resolution, device, config, cache, workers, ledger)
        total, seen = len(jobs), set()
        gave_up: dict[str, list] = {}  # message -> names of one abandoned batch
        for row in dataset.iter_rows():
            if row["out"] in seen:  # a retried batch can never write an output twice
                continue
            seen.add(row["out"])
            report.actor_load_s.setdefault(row["actor"], row["load_s"])
            if row["gave_up"]:
                gave_up.setdefault(row["error"], []).append(row["name"])
            elif row["error"]:
                report.failed.append((row["name"], row["image"], row["error"]))
            else:
                path = Path(row["out"])
                path.parent.mkdir(parents=True, exist_ok=True)
                if row["json"]:  # an inversion's readable twin, as save_inversion writes it
                    write_atomic(path.with_suffix(".json"), row["json"].encode())
                write_atomic(path, row["data"])
                report.written.append(str(path))
                report.batch_s.append(row["seconds"])
                print(path)
            if not args.quiet:
                print(f"nti: ray: {len(seen)}/{total} done ({len(report.failed)} failed), "
                      f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        report.wall_s = time.perf_counter() - start
        report.abandoned = [(names, message) for message, names in gave_up.items()]
        if not args.quiet:
            print(f"done in {report.wall_s:.1f} s on {workers} Ray worker(s), {device} ({config.backend} backend, "
                  f"{config.method})", file=sys.stderr)
        return report
    finally:
        if started_here:
            ray.shutdown()


@dataclass
class _Vocabulary:
    """What api.check_vocabulary reads of a Pipeline, from the model folder alone."""

    name: str
    vocabulary: tuple
    prompt_example: str


def _pipeline(ray, args, batches: list[Batch], resolution: int, device: str, config, cache, workers: int,
              ledger=None):
    """The Ray Data plan: one row per batch -> load (CPU tasks) -> engine actors, one call per batch."""
    import dataclasses

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = not args.quiet
    if args.quiet:  # Ray Data logs each stage's progress at INFO; --quiet leaves our own lines only
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    rows = [{"index": b.index, "jobs": json.dumps(b.jobs)} for b in batches]
    cuda = device.startswith("cuda")
    # on GPUs an actor needs one core to drive its GPU; on CPU the actors share the cluster's cores (one torch thread
    # per whole CPU they get), less half a CPU kept for the image-loading tasks, which would otherwise never run
    cpus_per_worker = 1 if cuda else max(0.25, (ray.cluster_resources().get("CPU", 1) - LOAD_CPUS) / workers)
    # one batch in flight per actor: batches are seconds to minutes of work, and a batch queued behind a busy actor
    # while another actor idles would only lengthen the tail of the run
    pool = ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1)
    return (ray.data.from_items(rows, override_num_blocks=len(rows))
            .map(load_stage, fn_kwargs={"resolution": resolution}, num_cpus=LOAD_CPUS)
            .map_batches(EngineWorker, batch_size=1, compute=pool,
                         # each actor sees only its own GPU, as cuda:0
                         fn_constructor_kwargs={"command": args.command, "model": args.model,
                                                "device": "cuda" if cuda else device,
                                                "config_json": json.dumps(dataclasses.asdict(config)),
                                                "cache": cache, "resolution": resolution, "ledger": ledger,
                                                "max_retries": getattr(args, "max_retries", MAX_RETRIES)},
                         num_gpus=1 if cuda else 0, num_cpus=cpus_per_worker,
                         # an actor that dies is restarted and the batch it held sent again: Ray Data's own
                         # default for actor pools (max_restarts=-1, max_task_retries=-1), bounded per batch by the
                         # ledger (--max-retries); the crash hook is handed over explicitly, as actors inherit the
                         # cluster's environment, not the driver's
                         runtime_env={"env_vars": {CRASH_HOOK: os.environ[CRASH_HOOK]}} if CRASH_HOOK in os.environ
                         else None))

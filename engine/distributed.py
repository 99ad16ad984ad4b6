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
import socket
import sys
import time
from contextlib import contextmanager
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
    """The --ray option group of invert / edit / reconstruct / eval."""
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


@dataclass
class ModelCard:
    """What the driver needs of the model (sizes, prompt checks, cache keys, eval's run settings), read from the
    model folder's configs without loading weights: only the actors hold engines (an SD v1.4 UNet is 3.4 GB)."""

    name: str  # as load_pipeline names it
    fingerprint: str  # as load_pipeline computes it; every actor checks its own against it
    resolution: int
    vocabulary: tuple = ()
    prompt_example: str = ""
    tokenizer: object = None  # for the prompt checks the single-process run makes (length, P2P's word match)


def model_card(model) -> ModelCard:
    from .models import RANDOM_MODELS, SHAPES, SHAPES_FOLDER, VOCABULARY_FILE, check_model_folder, \
        check_supported_model, fingerprint_folder, load_pipeline, resolve_model_path

    if str(model) in RANDOM_MODELS:  # built in code, a few MB: just build it
        pipe = load_pipeline(str(model), device="cpu", seed=0)
        return ModelCard(pipe.name, pipe.fingerprint, pipe.resolution, tokenizer=pipe.tokenizer)
    path = SHAPES_FOLDER if model is None or str(model) == SHAPES else resolve_model_path(model)
    check_supported_model(path)  # refused here, once, rather than by every actor
    check_model_folder(path)
    unet = json.loads((path / "unet" / "config.json").read_text())
    vae = json.loads((path / "vae" / "config.json").read_text())
    resolution = unet["sample_size"] * 2 ** (len(vae["block_out_channels"]) - 1)  # = Pipeline.resolution
    name = SHAPES if model is None or str(model) == SHAPES else str(model)
    card = ModelCard(name, fingerprint_folder(path), resolution)
    try:  # the tokenizer alone (a few MB): the driver checks every prompt as the single-process run does
        from transformers import CLIPTokenizer
        card.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    except Exception as err:
        raise NTIError(f"could not load the model's tokenizer in {path}: {type(err).__name__}: {err}") from err
    if (path / VOCABULARY_FILE).is_file():
        words = json.loads((path / VOCABULARY_FILE).read_text())
        card.vocabulary, card.prompt_example = tuple(words["words"]), words.get("example", "")
    return card


def worker_model(model):
    """--model as the engine actors get it: a local folder as an absolute path (an actor runs in a folder of its own,
    on a node of its own, where a relative path names nothing), anything else (shapes, tiny, a hub id) as given."""
    if model is None or not str(model).strip():
        return model
    path = Path(model).expanduser()
    return str(path.resolve()) if path.is_dir() else model


def actor_config(config):
    """The config as the engine actors get it: --export-cache (the exported UNets) as an absolute folder, since an
    actor runs in a working folder of its own, where a relative one would be looked up and built again."""
    if config.export_cache is None:
        return config
    return config.replace(export_cache=str(Path(config.export_cache).expanduser().resolve()))


def worker_error(err) -> str | None:
    """The message of an NTIError a Ray worker raised (an engine actor refusing its node's model, say), read from the
    error (or status message) Ray hands the driver; None for any other failure (a bug: reported as one)."""
    marker = f"{NTIError.__module__}.{NTIError.__name__}: "
    lines = [line.strip() for line in str(err).splitlines() if line.strip().startswith(marker)]
    return lines[-1][len(marker):] if lines else None


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
                 max_retries: int = MAX_RETRIES, fingerprint: str | None = None, name: str | None = None):
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
        if fingerprint is not None and self.pipe.fingerprint != fingerprint:
            raise NTIError(f"the model on this node has fingerprint {self.pipe.fingerprint}, the driver's folder "
                           f"{fingerprint}: every node needs the same model folder")
        if name is not None:  # a folder given relative to the driver's: named as the single-process run names it
            self.pipe.name = name
        self.command, self.cache, self.resolution = command, cache, resolution
        self.config = NTIConfig(**json.loads(config_json))
        self.actor = f"{os.uname().nodename}:{os.getpid()}"
        self.calls = 0
        self.ledger, self.max_retries = ledger, max_retries

    def given_up(self, index: int) -> str:
        """Why batch `index` is not run again (every earlier attempt died with its actor), or ''."""
        import ray

        attempt = ray.get(self.ledger.begin.remote(index)) if self.ledger is not None else 1
        if attempt <= self.max_retries + 1:
            return ""
        return (f"its batch killed the Ray worker running it {attempt - 1} time(s) (--max-retries "
                f"{self.max_retries}); given up")

    def __call__(self, batch: dict) -> dict:
        rows = []
        for k in range(len(batch["index"])):
            good, bad = json.loads(batch["jobs"][k]), json.loads(batch["bad"][k])
            why = self.given_up(int(batch["index"][k]))
            if why:
                rows += [{"name": j["name"], "image": j["image"], "out": j["out"], "data": b"", "json": "",
                          "error": why, "seconds": 0.0, "gave_up": True} for j in good]
            else:
                rows += [{"error": "", "gave_up": False, **r} for r in self.run_batch(good, batch["pixels"][k])]
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
        from .batch import check_new_inversion, edit_config_for
        from .images import png_bytes

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
        errors, files = {}, {}  # job index -> why it has no output / its file's bytes and readable twin
        for k, inv in enumerate(inversions):  # checked as the single-process run checks (batch.py)
            try:
                check_new_inversion(inv, config)
            except NTIError as err:
                errors[k] = str(err)
        kept = [k for k in range(len(jobs)) if k not in errors]
        if self.command == "invert":
            files = {k: inversion_bytes(inversions[k], jobs[k]["request"]) for k in kept}
        else:
            chunk = config.model_batch  # as the single-process run edits
            edit_config = edit_config_for(self.command, config)  # reconstruct: no prompt-to-prompt setting applies
            parts = [kept[start_k:start_k + chunk] for start_k in range(0, len(kept), chunk)]
            while parts:
                part = parts.pop(0)
                targets = [jobs[k]["target_prompt"] if self.command == "edit" else inversions[k].source_prompt
                           for k in part]
                try:
                    latents = api.edit_latents(self.pipe, [inversions[k] for k in part], targets, edit_config, False)
                except NTIError as err:  # as batch.edit_and_save: a batch refused as a whole is retried image by
                    # image, so one refused edit fails only its own job (raised, it aborted the whole Ray run)
                    if len(part) == 1:
                        errors[part[0]] = str(err)
                    else:
                        parts[:0] = [[k] for k in part]
                    continue
                for k, img in zip(part, api.decode_checked(self.pipe, latents, [jobs[k]["name"] for k in part])):
                    if isinstance(img, Exception):  # not finite: reported, not written, as the single-process run
                        errors[k] = str(img)
                    else:
                        files[k] = (png_bytes(img, jobs[k]["request"]), "")  # what images.save_png writes
        seconds = (time.perf_counter() - start) / len(jobs)
        return [{"name": j["name"], "image": j["image"], "out": j["out"], "data": files.get(k, (b"", ""))[0],
                 "json": files.get(k, (b"", ""))[1], "error": errors.get(k, ""), "seconds": seconds}
                for k, j in enumerate(jobs)]

    def maybe_crash(self, jobs: list[dict], before: bool = False) -> None:
        """The test hook (CRASH_HOOK)."""
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


class EvalWorker(EngineWorker):
    """`nti eval --ray`'s actor: the model's share of eval chunks (api.method_outputs: invert, reconstruct, edit;
    or generate for the baseline), images back as PNG bytes; the driver scores them."""

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        from PIL import Image

        from .api import method_outputs

        rows = []
        for k in range(len(batch["index"])):
            index, prompts = int(batch["index"][k]), json.loads(batch["prompts"][k])
            names = [p["id"] for p in prompts]
            why = self.given_up(index)
            if not why:
                side = self.resolution
                pixels = np.frombuffer(batch["pixels"][k], np.uint8).reshape(len(prompts), side, side, 3)
                self.calls += 1
                self.maybe_crash([{"name": name} for name in names], before=True)
                try:
                    timings, recons, edits = method_outputs(
                        self.pipe, self.config, batch["method"][k], float(batch["guidance"][k]),
                        batch["schedule"][k], [Image.fromarray(a) for a in pixels],
                        [p["source_prompt"] for p in prompts], [p["target_prompt"] for p in prompts], self.cache,
                        [sample_words_of(p.get("words")) for p in prompts])
                except NTIError as err:  # the single-process eval stops here too: the driver says why
                    rows += [_eval_row(index, n, name, error=str(err)) for n, name in enumerate(names)]
                    continue
                rows += [_eval_row(index, n, name, json.dumps(timing), _png(recon), _png(edit))
                         for n, (name, timing, recon, edit) in enumerate(zip(names, timings, recons, edits))]
                continue
            rows += [_eval_row(index, n, name, error=why, gave_up=True) for n, name in enumerate(names)]
        columns = ("index", "position", "name", "timing", "recon", "edit", "error", "gave_up")
        return {c: [r[c] for r in rows] for c in columns}


def sample_words_of(record: dict | None):
    """A p2p.SampleWords back from its JSON (lists for tuples), or None."""
    from .p2p import SampleWords

    if record is None:
        return None
    return SampleWords(tuple(record["blend_source"]), tuple(record["blend_target"]),
                       tuple((word, float(factor)) for word, factor in record["reweight"]))


def _eval_row(index: int, position: int, name: str, timing: str = "", recon: bytes = b"", edit: bytes = b"",
              error: str = "", gave_up: bool = False) -> dict:
    return {"index": index, "position": position, "name": name, "timing": timing, "recon": recon, "edit": edit,
            "error": error, "gave_up": gave_up}


def _png(img) -> bytes:
    if img is None:
        return b""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")  # lossless: the driver scores exactly these pixels
    return buffer.getvalue()


class GaveUp(Exception):
    """Batches that killed every worker they reached (--max-retries spent): exit 1, the other results are kept."""


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


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse a HOST:PORT (or ray://HOST:PORT) cluster address where nothing accepts a connection: ray.init would
    retry it for minutes without a word. `local`, `auto` and malformed addresses are left to ray.init (it is quick)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address in (LOCAL, "auto") or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) else err.strerror or str(err)
        raise NTIError(f"nothing answers at the Ray cluster address {address!r} ({why}): check the address, start "
                       f"the cluster there (`ray start --head --port {port}` on that machine), or give --ray without "
                       f"an address for a local cluster") from None


@contextmanager
def connect(ray, address: str, debug: bool = False):
    """Start or join the cluster for one run (one this process already has is used as it is, and left running)."""
    started_here = not ray.is_initialized()
    if started_here:
        check_reachable(address)
        try:
            # "local" starts a cluster of its own even where `ray start` made one on this machine (None would join it)
            ray.init(address=address, include_dashboard=False, log_to_driver=debug, logging_level="ERROR")
        except (ConnectionError, ValueError, RuntimeError) as err:  # no cluster there, or a malformed address
            raise NTIError(f"could not start or reach the Ray cluster at {address!r}: {err}") from None
    try:
        yield ray
    finally:
        if started_here:
            ray.shutdown()


def engine_device(ray, requested: str) -> tuple[str, int]:
    """(the engines' device, the cluster's GPUs): --device auto is cuda when the cluster has GPUs."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    device = requested if requested != "auto" else ("cuda" if gpus else "cpu")
    if device.startswith("cuda") and not gpus:
        raise NTIError(f"--device {device} but the Ray cluster has no GPUs")
    return device, gpus


def run_batch(args) -> RunReport:
    """Collect the jobs as the single-process run does, stream them through the cluster, write what comes back."""
    import torch

    from .artifact import write_atomic
    from .images import file_crop_warning
    from .batch import Problems, check_prompts, collect_jobs, edit_config_for, request_of
    from .options import config_from_args
    from .outputs import check_writable_folder, plan_outputs, recorded_request

    if getattr(args, "inversion", None):
        raise NTIError("--inversion edits saved inversions in one process: run it without --ray")
    ray = import_ray()
    if args.ray != LOCAL and Path(args.ray).exists():  # `--ray scenes.jsonl`: an input, not a cluster address
        args.images, args.ray = [args.ray, *args.images], LOCAL
    need_target = args.command == "edit"
    # the single-process run's collection and output plan (bad inputs named before any work); the rows that cross
    # to Ray workers are plain JSON dicts
    records, photos = collect_jobs(args, need_target, Problems(fail_fast=True))
    jobs = [{"name": r.name, "image": r.image, "source_prompt": r.source_prompt, "target_prompt": r.target_prompt,
             "request": None} for r in records]
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
    if args.cache is not None:  # as the single-process run: refused here, not by every actor's first save
        check_writable_folder(Path(args.cache), "--cache")
    card = model_card(args.model)
    resolution = card.resolution
    for image in dict.fromkeys(j["image"] for j in jobs if not j["image"].startswith("skimage:")):
        message = file_crop_warning(image, resolution)  # workers decode, but the user reads the driver's terminal
        if message is not None:
            print(f"nti: {message}", file=sys.stderr)

    with connect(ray, args.ray, args.debug):
        device, gpus = engine_device(ray, args.device)
        config = config_from_args(args, torch.device(device.split(":")[0]))
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        workers = args.num_workers or (gpus if device.startswith("cuda") else nodes)
        report = RunReport(workers=workers, device=device)
        # each job's prompts checked as the single-process run checks them (the shapes model's words, length, P2P's
        # word match): a bad one is named and skipped here, not raised by the actor running its batch (which lost
        # the whole run), and the others go on
        checked = []
        for job, record in zip(jobs, records):
            try:
                check_prompts(card, job["source_prompt"], job["target_prompt"], config, need_target)
            except NTIError as err:
                if getattr(args, "fail_fast", False):
                    raise NTIError(f"{record.label}: {err}") from None
                report.failed.append((job["name"], job["image"], str(err)))
                continue
            checked.append((job, record))
        jobs, records = [job for job, _ in checked], [record for _, record in checked]
        if not jobs:
            return report
        per_call = config.model_batch  # what the single-process run inverts at once
        edit_config = edit_config_for(args.command, config)
        for job, record in zip(jobs, records):  # the key the single-process run records, so either resumes the other
            job["request"] = request_of(args.command, record, card.fingerprint, edit_config, device.split(":")[0])
        if getattr(args, "resume", True):
            kept = [j for j in jobs if j["request"] and recorded_request(Path(j["out"])) == j["request"]]
            if kept and not args.quiet:
                print(f"nti: kept {len(kept)} finished output(s) of an earlier run of this request (--no-resume makes "
                      f"them again)", file=sys.stderr)
            for job in kept:  # stdout lists every output, kept or made, as the single-process run does (flushed)
                print(job["out"], flush=True)
            jobs = [j for j in jobs if j not in kept]
            if not jobs:
                return report
        batches = make_batches(jobs, per_call)
        config = actor_config(config)  # after the request keys: they hold the option as typed, as the single run's
        workers = min(workers, len(batches))  # an actor with no batch to run would only load the model
        report.workers = workers
        cache = str(Path(args.cache).resolve()) if args.cache else None
        start = time.perf_counter()
        ledger = ray.remote(num_cpus=0)(AttemptLedger).remote()
        dataset = _pipeline(ray, args, batches, card, device, config, cache, workers, ledger)
        total, seen = len(jobs), set()
        gave_up: dict[str, list] = {}  # message -> names of one abandoned batch
        try:
            for row in _rows(ray, dataset):
                if row["out"] in seen:  # a retried batch can never write an output twice
                    continue
                seen.add(row["out"])
                report.actor_load_s.setdefault(row["actor"], row["load_s"])
                if row["gave_up"]:
                    gave_up.setdefault(row["error"], []).append(row["name"])
                elif row["error"]:
                    if getattr(args, "fail_fast", False):  # the flag's promise: stop at the first bad input
                        # (the outputs written so far are kept, and a rerun keeps them)
                        raise NTIError(f"{row['name']}: {row['error']}")
                    report.failed.append((row["name"], row["image"], row["error"]))
                else:
                    path = Path(row["out"])
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if row["json"]:  # an inversion's readable twin, as save_inversion writes it
                        write_atomic(path.with_suffix(".json"), row["json"].encode())
                    write_atomic(path, row["data"])
                    report.written.append(str(path))
                    report.batch_s.append(row["seconds"])
                    print(path, flush=True)
                if not args.quiet:
                    print(f"nti: ray: {len(seen)}/{total} done ({len(report.failed)} failed), "
                          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        except KeyboardInterrupt:  # as the single-process run says it: what is kept, and how to go on
            if report.written:
                print(f"nti: {len(report.written)} of {total} outputs were written before the interruption; the same "
                      f"command again keeps them and does the rest", file=sys.stderr)
            raise
        report.wall_s = time.perf_counter() - start
        report.abandoned = [(names, message) for message, names in gave_up.items()]
        if not args.quiet:
            print(f"done in {report.wall_s:.1f} s on {workers} Ray worker(s), {device} ({config.backend} backend, "
                  f"{config.method})", file=sys.stderr)
        return report


def _pipeline(ray, args, batches: list[Batch], card: ModelCard, device: str, config, cache, workers: int,
              ledger=None):
    """The Ray Data plan: one row per batch -> load (CPU tasks) -> engine actors, one call per batch."""
    import dataclasses

    _quiet_data(ray, args.quiet)
    rows = [{"index": b.index, "jobs": json.dumps(b.jobs)} for b in batches]
    return (ray.data.from_items(rows, override_num_blocks=len(rows))
            .map(load_stage, fn_kwargs={"resolution": card.resolution}, num_cpus=LOAD_CPUS)
            .map_batches(EngineWorker, batch_size=1,
                         fn_constructor_kwargs={"command": args.command, "model": worker_model(args.model),
                                                "device": "cuda" if device.startswith("cuda") else device,
                                                "config_json": json.dumps(dataclasses.asdict(config)),
                                                "cache": cache, "resolution": card.resolution, "ledger": ledger,
                                                "max_retries": getattr(args, "max_retries", MAX_RETRIES),
                                                # each actor checks that its node's model is the driver's: the
                                                # request keys the outputs record hold the driver's fingerprint
                                                "fingerprint": card.fingerprint, "name": card.name},
                         **_actor_options(ray, device, workers)))


def _rows(ray, dataset):
    """dataset.iter_rows(), with an NTIError raised in a worker (an actor that cannot load its node's model: a
    missing folder, another fingerprint) given to the driver as one, a `nti: error:` line, not Ray's traceback."""
    try:
        yield from dataset.iter_rows()
    except ray.exceptions.RayError as err:
        message = worker_error(err)
        if message is None:
            raise
        raise NTIError(f"a Ray worker stopped the run: {message}") from None


def _quiet_data(ray, quiet: bool) -> None:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = not quiet
    if quiet:  # Ray Data logs each stage's progress at INFO; --quiet leaves our own lines only
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def _actor_options(ray, device: str, workers: int, load_cpus: float = LOAD_CPUS) -> dict:
    """map_batches arguments of the engine actors: the pool, their GPU or CPU share, and the test hook."""
    cuda = device.startswith("cuda")
    # on GPUs an actor needs one core to drive its GPU; on CPU the actors share the cluster's cores (one torch thread
    # per whole CPU they get), less what the image-loading tasks need, which would otherwise never run
    cpus_per_worker = 1 if cuda else max(0.25, (ray.cluster_resources().get("CPU", 1) - load_cpus) / workers)
    # one batch in flight per actor: batches are seconds to minutes of work, and a batch queued behind a busy actor
    # while another actor idles would only lengthen the tail of the run
    pool = ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1)
    # each actor sees only its own GPU, as cuda:0. An actor that dies is restarted and the batch it held sent again:
    # Ray Data's own default for actor pools (max_restarts=-1, max_task_retries=-1), bounded per batch by the ledger
    # (--max-retries); the crash hook is handed over explicitly, as actors inherit the cluster's environment, not the
    # driver's
    hook = {"env_vars": {CRASH_HOOK: os.environ[CRASH_HOOK]}} if CRASH_HOOK in os.environ else None
    return {"compute": pool, "num_gpus": 1 if cuda else 0, "num_cpus": cpus_per_worker, "runtime_env": hook}


class EvalSession:
    """`nti eval --ray`: the cluster, the engines' device and model card for the driver's checks and run settings, and
    the chunks' outputs streamed back from engine actors in chunk order (the driver scores and writes them)."""

    def __init__(self, args):
        self.args = args
        self.ray = import_ray()
        self._connection = None

    def __enter__(self) -> "EvalSession":
        if self.args.ray != LOCAL and Path(self.args.ray).exists():
            raise NTIError(f"--ray {self.args.ray}: that is a file, not a cluster address (eval reads --data)")
        self._connection = connect(self.ray, self.args.ray, self.args.debug)
        self._connection.__enter__()
        try:
            self.device, self.gpus = engine_device(self.ray, self.args.device)
            self.card = model_card(self.args.model)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._connection.__exit__(*exc)

    def outputs(self, chunks: list[list], sources: dict, config, cache, words=lambda sample: None):
        """(timings, recons, edits) of each chunk, in order, like api.method_outputs; a chunk whose batch killed
        its workers past --max-retries yields GaveUp(message) instead. `words(sample)`: its own P2P words."""
        import dataclasses

        import numpy as np
        from PIL import Image

        args, ray = self.args, self.ray
        config = actor_config(config)
        _quiet_data(ray, args.quiet)
        ray.data.DataContext.get_current().execution_options.preserve_order = True  # samples.csv in the same order
        rows = [{"index": i, "method": chunk[0][1], "guidance": float(chunk[0][2]), "schedule": chunk[0][3],
                 "prompts": json.dumps([{"id": s.id, "source_prompt": s.source_prompt, "target_prompt": s.target_prompt,
                                         "words": dataclasses.asdict(w) if (w := words(s)) else None}
                                        for s, *_ in chunk]),
                 "pixels": np.stack([np.asarray(sources[s.id]) for s, *_ in chunk]).tobytes()}
                for i, chunk in enumerate(chunks)]
        workers = min(args.num_workers or (self.gpus if self.device.startswith("cuda") else
                                           len([n for n in ray.nodes() if n.get("Alive")])), len(rows))
        ledger = ray.remote(num_cpus=0)(AttemptLedger).remote()
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            EvalWorker, batch_size=1,
            fn_constructor_kwargs={"command": "eval", "model": worker_model(args.model),
                                   "device": "cuda" if self.device.startswith("cuda") else self.device,
                                   "config_json": json.dumps(dataclasses.asdict(config)), "cache": cache,
                                   "resolution": self.card.resolution, "ledger": ledger,
                                   "max_retries": args.max_retries, "fingerprint": self.card.fingerprint,
                                   "name": self.card.name},
            **_actor_options(ray, self.device, workers, load_cpus=0))
        pending: dict[int, dict] = {}
        following = 0
        for row in _rows(ray, dataset):
            pending.setdefault(row["index"], {})[row["position"]] = row  # a retried chunk's rows replace its own
            while following in pending and len(pending[following]) == len(chunks[following]):
                done = [pending.pop(following)[n] for n in range(len(chunks[following]))]
                following += 1
                if done[0]["gave_up"]:
                    yield GaveUp(f"gave up on {', '.join(r['name'] for r in done)} ({chunks[following - 1][0][1]}): "
                                 f"{done[0]['error']}")
                    continue
                if done[0]["error"]:
                    raise NTIError(done[0]["error"])
                yield ([json.loads(r["timing"]) for r in done],
                       [Image.open(io.BytesIO(r["recon"])).convert("RGB") if r["recon"] else None for r in done],
                       [Image.open(io.BytesIO(r["edit"])).convert("RGB") for r in done])

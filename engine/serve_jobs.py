"""Durable jobs for `nti serve`: a SQLite (WAL) job table beside an artifact folder, the dynamic batcher, and the
engine that runs one batch of jobs (shared by the single-process worker and the Ray replicas of engine/serve_ray.py).

The table is the truth: a job is acknowledged only after its row (and its source image) is on disk, and a job that
was running when the process died is queued again at the next start, so nothing acknowledged is lost. Files are
named after server-generated hex ids only; no request value ever becomes part of a path.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

@dataclass
class ServeSettings:
    """What `nti serve` was started with (CLI flags); limits are per request."""
    data: str = "nti-serve-data"  # the job table and artifacts
    model: str | None = None  # None: the built-in shapes model
    device: str = "auto"
    batch_size: int = 8
    max_delay_ms: float = 50.0
    max_queue: int = 256  # queued jobs; more gets 429 + Retry-After
    request_timeout_s: float = 600.0  # how long a waiting request waits at most (its job is then cancelled)
    token: str | None = None
    max_upload_bytes: int = 10 * 2**20
    max_pixels: int = 4096 * 4096  # decoded size limit, checked from the header before decoding
    max_prompt_chars: int = 500
    max_steps: int = 100
    max_inner_steps: int = 50
    steps: int = 50  # defaults for requests that do not say
    inner_steps: int = 10
    drain_s: float = 30.0
    local_only: bool = False  # bound to a loopback address: requests must name this machine in Host (DNS rebinding)


STATES = ("queued", "running", "done", "failed", "cancelled")
KINDS = ("invert", "edit")
FINAL = ("done", "failed", "cancelled")

log = logging.getLogger("nti.serve")


def log_event(event: str, level: int = logging.INFO, **fields) -> None:
    """One JSON object per line: easy to grep, easy to ship to a log store."""
    log.log(level, json.dumps({"event": event, **fields}, sort_keys=True, default=str))


def new_id() -> str:
    return secrets.token_hex(16)


def atomic_write(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Write beside the target, fsync, rename: a reader (or a restart after kill -9) sees the old file or the new.
    sync_dir=False leaves the folder's fsync (which makes the rename itself durable) to the caller: once per batch."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)  # removed under a running server: made again, as at start
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Job:
    id: str
    kind: str  # 'invert' or 'edit'
    state: str
    request: dict  # invert: {source_prompt, settings}; edit: {target_prompt, edit}
    parent: str | None = None  # an edit's inversion job id
    key: str | None = None  # an inversion's cache key (pixels, prompt, model, result-changing settings)
    result: dict = field(default_factory=dict)
    error: str | None = None
    error_param: str | None = None
    cancel: bool = False  # asked to cancel while running: the result is dropped when its batch ends
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    seq: int = 0

    def public(self) -> dict:
        out = {"id": self.id, "kind": self.kind, "status": self.state, "created_at": self.created_at,
               "started_at": self.started_at, "finished_at": self.finished_at}
        if self.error:
            out["error"] = {"message": self.error, "param": self.error_param}
        return out


COLUMNS = ("id", "kind", "state", "request", "parent", "key", "result", "error", "error_param", "cancel",
           "created_at", "started_at", "finished_at", "seq")


class JobStore:
    """The job table (jobs.sqlite3, WAL) and the files beside it: sources/, inversions/, edits/ (all named by id)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        for sub in ("sources", "inversions", "edits", "tmp"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.db = sqlite3.connect(self.folder / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # an acknowledged job survives a power cut, not only kill -9
        self.db.execute("""CREATE TABLE IF NOT EXISTS jobs (
            id TEXT PRIMARY KEY, kind TEXT NOT NULL, state TEXT NOT NULL, request TEXT NOT NULL, parent TEXT,
            key TEXT, result TEXT NOT NULL DEFAULT '{}', error TEXT, error_param TEXT, cancel INTEGER DEFAULT 0,
            created_at REAL NOT NULL, started_at REAL, finished_at REAL, seq INTEGER NOT NULL)""")
        self.db.execute("CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, seq)")
        self.db.execute("CREATE INDEX IF NOT EXISTS jobs_key ON jobs(key)")
        self.db.execute("CREATE INDEX IF NOT EXISTS jobs_parent ON jobs(parent)")
        for tmp in (self.folder / "tmp").iterdir():  # half-written artifacts of a killed run
            tmp.unlink(missing_ok=True)

    # --- paths (ids are server-made hex; checked again here so a path can never be steered from outside)
    def path(self, what: str, job_id: str) -> Path:
        if len(job_id) != 32 or any(c not in "0123456789abcdef" for c in job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        suffix = {"sources": ".png", "inversions": ".safetensors", "edits": ".png"}[what]
        return self.folder / what / f"{job_id}{suffix}"

    # --- rows
    def _row(self, row) -> Job:
        d = dict(zip(COLUMNS, row))
        d["request"], d["result"], d["cancel"] = json.loads(d["request"]), json.loads(d["result"]), bool(d["cancel"])
        return Job(**d)

    def _select(self, where: str, args=()) -> list[Job]:
        with self.lock:
            rows = self.db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE {where}", args).fetchall()
        return [self._row(r) for r in rows]

    def get(self, job_id: str, kind: str | None = None) -> Job | None:
        jobs = self._select("id = ?", (job_id,))
        return jobs[0] if jobs and (kind is None or jobs[0].kind == kind) else None

    def add(self, job: Job) -> Job:
        with self.lock:
            job.seq = (self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0] or 0) + 1
            job.created_at = job.created_at or time.time()
            self.db.execute(f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                            (job.id, job.kind, job.state, json.dumps(job.request), job.parent, job.key,
                             json.dumps(job.result), job.error, job.error_param, int(job.cancel), job.created_at,
                             job.started_at, job.finished_at, job.seq))
        return job

    def find_inversion(self, key: str) -> Job | None:
        """A live inversion with this key (queued, running or done): a new request reuses it. Not one a DELETE came
        for while it ran (cancel set): its batch drops it."""
        jobs = self._select("kind = 'invert' AND key = ? AND state IN ('queued', 'running', 'done') AND NOT cancel "
                            "ORDER BY seq DESC LIMIT 1", (key,))
        return jobs[0] if jobs else None

    def queued(self) -> list[Job]:
        return self._select("state = 'queued' ORDER BY seq")

    def children(self, parent: str) -> list[Job]:
        return self._select("parent = ? ORDER BY seq", (parent,))

    def update(self, job_id: str, **fields) -> None:
        for name in ("request", "result"):
            if name in fields:
                fields[name] = json.dumps(fields[name])
        with self.lock:
            self.db.execute(f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?",
                            (*fields.values(), job_id))

    def start(self, ids: list[str]) -> list[str]:
        """Mark picked jobs running, in one transaction; the ids it started. A job cancelled since it was picked (a
        DELETE, a request's timeout) stays cancelled: it must not run and end 'done'."""
        now, started = time.time(), []
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for i in ids:
                    if self.db.execute("UPDATE jobs SET state = 'running', started_at = ? WHERE id = ? AND "
                                       "state = 'queued'", (now, i)).rowcount:
                        started.append(i)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return started

    def finish(self, results: dict[str, dict]) -> dict[str, str]:
        """Mark a batch's jobs done (each unless a cancel came while it ran: then cancelled), in one transaction:
        one fsync for the batch. Returns each job's final state."""
        states = {}
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                for job_id, result in results.items():
                    job = self.get(job_id)
                    states[job_id] = "cancelled" if job is None or job.cancel else "done"
                    self.update(job_id, state=states[job_id], result=result, finished_at=now)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        return states

    def fail(self, job_id: str, message: str, param: str | None = None) -> None:
        """Mark a job failed, with why; cancelled (why kept) when a cancel came while it ran, as finish does."""
        with self.lock:
            job = self.get(job_id)
            state = "cancelled" if job is not None and job.cancel else "failed"
            self.update(job_id, state=state, error=message, error_param=param, finished_at=time.time())

    def cancel(self, job_id: str) -> str | None:
        """Cancel a queued job at once, a running one when its batch ends; the state after, None if unknown."""
        with self.lock:
            job = self.get(job_id)
            if job is None or job.state in FINAL:
                return None if job is None else job.state
            if job.state == "queued":
                self.update(job_id, state="cancelled", finished_at=time.time())
                return "cancelled"
            self.update(job_id, cancel=1)
            return "running"

    def delete(self, job_id: str) -> None:
        with self.lock:
            self.db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def requeue_unfinished(self) -> int:
        """After a crash: jobs that were running go back to the queue (a cancel asked for meanwhile still holds)."""
        with self.lock:
            self.db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE state = 'running' AND cancel",
                            (time.time(),))
            return self.db.execute("UPDATE jobs SET state = 'queued', started_at = NULL WHERE state = 'running'"
                                   ).rowcount

    def counts(self) -> dict[tuple[str, str], int]:
        with self.lock:
            rows = self.db.execute("SELECT kind, state, COUNT(*) FROM jobs GROUP BY kind, state").fetchall()
        return {(k, s): n for k, s, n in rows}

    def queue_depth(self) -> int:
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]

    def close(self) -> None:
        with self.lock:
            self.db.close()


@dataclass
class BatchPolicy:
    """Triton-style dynamic batching: up to batch_size compatible jobs, or whatever is there after max_delay_s."""
    batch_size: int = 8
    max_delay_s: float = 0.05


class Batcher:
    """One worker thread owns the pipeline: it picks a batch of compatible jobs, runs it through the public API
    (nti.invert / nti.edit), writes each result atomically and wakes whoever waits for it."""

    def __init__(self, store: JobStore, policy: BatchPolicy, load, run_batch, on_batch=None):
        self.store, self.policy = store, policy
        self._load, self._run_batch, self._on_batch = load, run_batch, on_batch
        self.pipe = None
        self.load_error: str | None = None
        self.cond = threading.Condition()
        self.stopping = False
        self.drain_deadline = float("inf")
        self.busy_since: float | None = None  # start of the running batch (progress estimates)
        self.seconds_per_step: dict[str, float] = {}  # kind -> recent batch seconds per DDIM step
        self._waiters: dict[str, list] = {}  # job id -> [(loop, future)]
        self.thread = threading.Thread(target=self._main, name="nti-worker", daemon=True)

    # --- life
    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, drain_s: float) -> None:
        """Graceful: finish what is queued for up to drain_s, then stop; what is left stays queued on disk."""
        with self.cond:
            self.stopping = True
            self.drain_deadline = time.time() + drain_s
            self.cond.notify_all()
        self.thread.join(timeout=drain_s + 60)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    # --- waiting from the event loop
    async def wait(self, job_id: str, timeout: float) -> Job | None:
        """The job once final, or None after timeout seconds or once its row is deleted."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self.cond:
            self._waiters.setdefault(job_id, []).append((loop, future))
        job = self.store.get(job_id)
        if job is None or job.state in FINAL:  # None: deleted before we got here, nothing will ever notify
            return job
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            return None
        finally:
            with self.cond:
                waiters = self._waiters.get(job_id, [])
                if (loop, future) in waiters:
                    waiters.remove((loop, future))
                if not waiters:
                    self._waiters.pop(job_id, None)
        return self.store.get(job_id)

    def release_waiters(self) -> None:
        """Wake every waiting request now, its job final or not: a shutdown's drain time is up."""
        with self.cond:
            job_ids = list(self._waiters)
        for job_id in job_ids:
            self.notify(job_id)

    def notify(self, job_id: str) -> None:
        with self.cond:
            waiters = self._waiters.pop(job_id, [])
        for loop, future in waiters:
            loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_result(None))

    # --- the worker
    def runnable(self) -> list[tuple[Job, float, str]]:
        """Queued jobs that can run now, oldest first, as (job, ready time, compatibility group). An edit is ready
        once its inversion is done; an edit whose inversion failed or vanished fails with it."""
        out = []
        parents: dict[str, Job | None] = {}
        for job in self.store.queued():
            if job.kind == "invert":
                out.append((job, job.created_at, "invert:" + json.dumps(job.request["settings"], sort_keys=True)))
                continue
            if job.parent not in parents:
                parents[job.parent] = self.store.get(job.parent)
            parent = parents[job.parent]
            if parent is None or parent.state in ("failed", "cancelled"):
                why = "was deleted" if parent is None else f"{parent.state}: {parent.error or 'cancelled'}"
                self.store.fail(job.id, f"its inversion {job.parent} {why}", "inversion_id")
                self.notify(job.id)
                continue
            if parent.state == "done":
                group = json.dumps([job.request["edit"], parent.request["settings"]], sort_keys=True)
                out.append((job, max(job.created_at, parent.finished_at or 0), "edit:" + group))
        return out

    def pick(self) -> tuple[list[Job], float]:
        """(batch, 0) to run now, or ([], seconds to wait): the oldest ready job's group, once it is full or the
        oldest has waited max_delay."""
        ready = self.runnable()
        if not ready:
            return [], 1.0
        _, oldest, group = ready[0]
        jobs = [job for job, _, g in ready if g == group][:self.policy.batch_size]
        wait = oldest + self.policy.max_delay_s - time.time()
        if len(jobs) >= self.policy.batch_size or wait <= 0 or self.stopping:
            return jobs, 0.0
        return [], wait

    def _load_model(self) -> bool:
        """Load the model this worker runs; False when that failed (the server stays up and says why in /readyz)."""
        try:
            self.pipe = self._load()
        except Exception as err:
            self.load_error = f"{type(err).__name__}: {err}"
            log_event("model_load_failed", logging.ERROR, error=self.load_error)
            return False
        log_event("worker_ready")
        return True

    def _main(self) -> None:
        try:
            self._work()
        finally:  # stopped, or died of an error (logged): requests still waiting answer now, their jobs stay queued
            self.release_waiters()

    def _work(self) -> None:
        if not self._load_model():
            return
        while True:
            with self.cond:
                while True:
                    if self.stopping and time.time() >= self.drain_deadline:
                        log_event("worker_stopped", left_queued=self.store.queue_depth())
                        return
                    jobs, wait = self.pick()
                    if jobs:
                        break
                    if self.stopping:  # drained: nothing runnable is left
                        log_event("worker_stopped", left_queued=self.store.queue_depth())
                        return
                    self.cond.wait(timeout=min(wait, 1.0))
            started = self.store.start([j.id for j in jobs])
            jobs = [job for job in jobs if job.id in started]
            if not jobs:
                continue
            self.busy_since = time.time()
            try:
                self._run_batch(self.pipe, jobs)
            except Exception as err:  # a bug in a batch must not kill the worker: fail those jobs, go on
                log.exception("batch failed")
                for job in jobs:
                    if self.store.get(job.id).state == "running":
                        self.store.fail(job.id, f"internal error: {type(err).__name__}: {err}")
            finally:
                elapsed = time.time() - self.busy_since
                self.busy_since = None
                steps = max(1, int(jobs[0].request.get("steps", 1)))
                self.seconds_per_step[jobs[0].kind] = elapsed / steps
                if self._on_batch:
                    self._on_batch(jobs[0].kind, len(jobs), elapsed)
                for job in jobs:
                    self.notify(job.id)


# ------------------------------------------------------------------------------------------------------ the engine

def base_config(settings: ServeSettings, device_type: str):
    """The config every request starts from: the fast backend, bf16 on CUDA, fp32 elsewhere, the served defaults."""
    from .config import NTIConfig

    return NTIConfig(backend="fast", batch_size=settings.batch_size,
                     precision="bf16" if device_type == "cuda" else "fp32", steps=settings.steps,
                     inner_steps=settings.inner_steps)


@dataclass
class ModelCard:
    """What the request side reads of a pipeline (prompt checks, cache keys, P2P word alignment), without weights:
    a Ray ingress holds this while the replicas hold the model."""
    name: str
    resolution: int
    vocabulary: tuple
    prompt_example: str
    scheduler_config: dict
    fingerprint: str
    tokenizer: object
    device: object  # torch.device of the engine

    @classmethod
    def of(cls, pipe) -> "ModelCard":
        return cls(pipe.name, pipe.resolution, tuple(pipe.vocabulary), pipe.prompt_example,
                   dict(pipe.scheduler_config), pipe.fingerprint, pipe.tokenizer, pipe.device)


@dataclass
class Task:
    """One job as the engine runs it: images and tensors, no paths (a Ray replica may run on another node)."""
    job_id: str
    kind: str  # 'invert' or 'edit'
    prompt: str  # invert: the source prompt; edit: the target prompt
    settings: dict  # NTIConfig changes: the inversion's settings, plus the edit's for an edit
    image: object = None  # invert: the source square (PIL, RGB)
    inversion: object = None  # edit: the loaded Inversion

    @property
    def group(self) -> str:
        """Jobs of one group run as one fast-path batch (same kind, same result-changing settings)."""
        return self.kind + ":" + json.dumps(self.settings, sort_keys=True)


@dataclass
class Outcome:
    """A job's result: its artifact's bytes (.safetensors for an inversion, PNG for an edit) and timings, or why it
    failed."""
    job_id: str
    data: bytes = b""
    result: dict = field(default_factory=dict)
    error: str | None = None
    batch: str = ""  # id of the batch it ran in (metrics count each batch once)
    batch_s: float = 0.0


class Engine:
    """One pipeline and the served base config: runs tasks as fast-path batches through the public API (nti.invert,
    nti.edit), one batch per compatible group, results as file bytes."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.pipe = None
        self.base = None

    def load(self):
        from . import load_pipeline

        start = time.perf_counter()
        self.pipe = load_pipeline(self.settings.model, self.settings.device)
        self.base = base_config(self.settings, self.pipe.device.type)
        log_event("model_loaded", model=self.pipe.name, device=str(self.pipe.device),
                  seconds=time.perf_counter() - start)
        return self.pipe

    def run(self, tasks: list[Task]) -> list[Outcome]:
        """Each task's outcome, in order. A bad job (NTIError) must not fail its batch mates: its group is then rerun
        job by job. Other exceptions (bugs) propagate."""
        groups: dict[str, list[Task]] = {}
        for task in tasks:
            groups.setdefault(task.group, []).append(task)
        done = {o.job_id: o for group in groups.values() for o in self._run_group(group)}
        return [done[t.job_id] for t in tasks]

    def _run_group(self, tasks: list[Task]) -> list[Outcome]:
        from .config import NTIError

        try:
            return (self._invert if tasks[0].kind == "invert" else self._edit)(tasks)
        except NTIError as err:
            if len(tasks) == 1:
                log_event("job_failed", logging.WARNING, job=tasks[0].job_id, error=str(err))
                return [Outcome(tasks[0].job_id, error=str(err))]
            return [o for task in tasks for o in self._run_group([task])]

    def _invert(self, tasks: list[Task]) -> list[Outcome]:
        from . import invert
        from .artifact import inversion_bytes
        from .batch import check_new_inversion
        from .config import NTIError

        config = self.base.replace(**tasks[0].settings)
        start = time.perf_counter()
        inversions = invert(self.pipe, [t.image for t in tasks], [t.prompt for t in tasks], config, progress=False)
        seconds = time.perf_counter() - start
        log_event("batch", kind="invert", size=len(tasks), seconds=round(seconds, 3))
        batch, outcomes = new_id(), []
        for task, inv in zip(tasks, inversions):
            try:  # as the CLI: a diverged inversion is the job's error, never a stored artifact an edit reads later
                check_new_inversion(inv, config)
            except NTIError as err:
                outcomes.append(self._failed(task, str(err)))
                continue
            outcomes.append(Outcome(task.job_id, inversion_bytes(inv)[0],
                                    {"invert_s": seconds, "batch_size": len(tasks),
                                     "inner_iterations": int(sum(inv.iterations))}, batch=batch, batch_s=seconds))
        return outcomes

    def _edit(self, tasks: list[Task]) -> list[Outcome]:
        import io

        from .api import decode_checked, edit_latents

        config = self.base.replace(**tasks[0].settings)
        start = time.perf_counter()
        latents = edit_latents(self.pipe, [t.inversion for t in tasks], [t.prompt for t in tasks], config,
                               progress=False)
        images = decode_checked(self.pipe, latents, ["the edit"] * len(tasks))  # as the CLI: never a black PNG
        seconds = time.perf_counter() - start
        log_event("batch", kind="edit", size=len(tasks), seconds=round(seconds, 3))
        batch, outcomes = new_id(), []
        for task, img in zip(tasks, images):
            if isinstance(img, Exception):
                outcomes.append(self._failed(task, str(img)))
                continue
            png = io.BytesIO()
            img.save(png, format="PNG")
            outcomes.append(Outcome(task.job_id, png.getvalue(), {"edit_s": seconds, "batch_size": len(tasks)},
                                    batch=batch, batch_s=seconds))
        return outcomes

    @staticmethod
    def _failed(task: Task, error: str) -> Outcome:
        """A diverged result's outcome; its advice names the request's field, not the CLI's flag."""
        error = error.replace("--guidance", "guidance")
        log_event("job_failed", logging.WARNING, job=task.job_id, error=error)
        return Outcome(task.job_id, error=error)

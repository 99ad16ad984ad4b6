"""`nti serve`: an HTTP backend (FastAPI + uvicorn) over the fast path, behind a dynamic batcher and durable jobs.

Routes: the OpenAI-compatible POST /v1/images/edits; the native POST /v1/inversions (202 + id), GET/DELETE
/v1/inversions/{id}, POST /v1/inversions/{id}/edits (any number of edits reuse one stored inversion), GET/DELETE
/v1/edits/{id}; /healthz, /readyz, /metrics, and a small page at /. Every bad input is a 4xx JSON error
{"error": {"message", "type", "param", "code"}} (OpenAI's shape) that names the field. docs/serving.md has the rest.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import threading
import time
import warnings
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, File, Form, Path as PathParam, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool  # decoding, hashing, fsync: off the event loop
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import GUIDANCE_SCHEDULES, METHODS, NTIConfig, NTIError
from .validate import is_blank
from .serve_jobs import (FINAL, Batcher, BatchPolicy, Engine, Job, JobStore, Outcome, ServeSettings,  # noqa: F401
                         Task, atomic_write, fsync_dir, log_event, new_id)

PAGE = Path(__file__).parent / "assets" / "serve" / "index.html"
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
EDIT_MODES = ("regenerate", "p2p-replace", "p2p-refine", "p2p-reweight")
PUBLIC_PATHS = ("/healthz", "/readyz", "/")  # no data behind them; the page's own API calls carry the token
ID_PATTERN = "^[0-9a-f]{32}$"
Id = Annotated[str, PathParam(pattern=ID_PATTERN, description="a server-generated id (32 hex digits)")]


# ------------------------------------------------------------------------------------------------------ errors

class APIError(Exception):
    """A request that cannot be served: status, a message that says what to do, and the field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": str(status)}}
    return JSONResponse(body, status_code=status, headers=headers)


ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 410, 413, 422, 429, 503, 504)}


# ------------------------------------------------------------------------------------------------------ schemas

class Timings(BaseModel):
    model_config = ConfigDict(extra="allow")
    queue_s: float | None = None
    total_s: float | None = None
    batch_size: int | None = None


class Progress(BaseModel):
    phase: str
    fraction: float | None = Field(None, description="0..1; while running an estimate from recent batches")


class InversionStatus(BaseModel):
    id: str
    status: str
    key: str
    source_prompt: str
    settings: dict
    progress: Progress
    reused: bool = Field(False, description="this request matched an existing inversion (same pixels, prompt, "
                                            "model and settings): nothing new was queued")
    edits: int = 0
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    timings: dict = {}
    error: ErrorDetail | None = None
    warnings: list[str] = Field([], description="what the request's image loses before the model sees it (a centre "
                                                "crop that drops most of it); the job runs regardless")


class EditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    target_prompt: str = Field(..., min_length=1)
    edit: Literal[EDIT_MODES] = "regenerate"
    cross_replace: float = Field(0.8, ge=0, le=1)
    self_replace: float = Field(0.5, ge=0, le=1)
    cross_replace_words: dict[str, float] = Field({}, description="p2p: target words with a cross-replace fraction "
                                                  "of their own (P2P's cross_replace_steps dict; the rest keep "
                                                  "cross_replace)")
    reweight: dict[str, float] = Field({}, description="p2p: scale the target's cross-attention to these words "
                                       "(p2p-reweight needs at least one)")
    blend_words: list[str] = Field([], description="p2p local blend: the edit stays inside these words' "
                                   "cross-attention masks")
    response_format: Literal["b64_json", "png"] = "b64_json"
    wait: bool = Field(True, description="false: answer 202 at once; poll GET /v1/edits/{id}")
    timeout_s: float | None = Field(None, gt=0, description="wait at most this long (capped by the server's limit)")


class EditStatus(BaseModel):
    id: str
    inversion_id: str
    status: str
    target_prompt: str
    settings: dict
    b64_json: str | None = None
    timings: dict = {}
    created_at: float
    finished_at: float | None = None
    error: ErrorDetail | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    nti: dict = Field({}, description="inversion and edit ids, timings and batch sizes (not in OpenAI's API)")


class Deleted(BaseModel):
    id: str
    deleted: bool
    status: str


# ------------------------------------------------------------------------------------------------------ metrics

class Metrics:
    """Prometheus metrics in the app's own registry (several apps in one process stay apart)."""

    def __init__(self, store: JobStore):
        self.registry = CollectorRegistry()
        self.requests = Counter("nti_http_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("nti_http_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
                                 registry=self.registry)
        self.batch_size = Histogram("nti_batch_size", "jobs per batch the worker ran", ["kind"],
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64), registry=self.registry)
        self.batch_seconds = Histogram("nti_batch_seconds", "wall time of one batch", ["kind"],
                                       buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
                                       registry=self.registry)
        self.job_seconds = Histogram("nti_job_seconds", "accepted to finished, per job", ["kind"],
                                     buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600), registry=self.registry)
        self.registry.register(_StoreCollector(store))


class _StoreCollector:
    """Queue depth and jobs by state, read from the job table at scrape time (so they survive restarts)."""

    def __init__(self, store: JobStore):
        self.store = store

    def describe(self):
        return []

    def collect(self):
        counts = self.store.counts()
        depth = GaugeMetricFamily("nti_queue_depth", "queued jobs (all kinds)")
        depth.add_metric([], sum(n for (_, s), n in counts.items() if s == "queued"))
        yield depth
        jobs = GaugeMetricFamily("nti_jobs", "jobs in the table by kind and state", labels=["kind", "state"])
        for kind in ("invert", "edit"):
            for state in ("queued", "running", "done", "failed", "cancelled"):
                jobs.add_metric([kind, state], counts.get((kind, state), 0))
        yield jobs


# ------------------------------------------------------------------------------------------------------ uploads

def read_image(data: bytes, settings: ServeSettings, param: str = "image") -> Image.Image:
    """An RGB image from upload bytes, or a 4xx naming the field: empty, not an image, too big, a decompression
    bomb (its pixel count is read from the header, before anything is decoded), truncated or corrupt."""
    if not data:
        raise APIError(400, f"{param}: the upload is empty", param)
    if len(data) > settings.max_upload_bytes:
        raise APIError(413, f"{param}: {len(data)} bytes is over the limit of {settings.max_upload_bytes}", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise APIError(413, f"{param}: refused as a decompression bomb ({err}); the limit is {settings.max_pixels} "
                            f"pixels", param) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise APIError(400, f"{param}: not a readable image ({', '.join(IMAGE_FORMATS)}): "
                            f"{type(err).__name__}", param) from None
    if img.format not in IMAGE_FORMATS and img.format != "MPO":  # MPO: a JPEG with a gain map or preview after it
        raise APIError(400, f"{param}: format {img.format} is not accepted; send one of {', '.join(IMAGE_FORMATS)}",
                       param)
    width, height = img.size
    if width * height > settings.max_pixels:
        raise APIError(413, f"{param}: {width}x{height} = {width * height} pixels is over the limit of "
                            f"{settings.max_pixels}", param)
    if width < 1 or height < 1:
        raise APIError(400, f"{param}: image has no pixels", param)
    from .images import frame_count, is_signed_16bit, to_rgb, upright  # here: torch is not needed to start the server

    try:
        frames = frame_count(img)  # counting seeks through the file: a broken one fails here
        signed = is_signed_16bit(img)  # before upright: its turned copy has no TIFF tags
        img.load()
        # the CLI's reading (images.open_image): EXIF orientation (as stored when the EXIF cannot be parsed), 16-bit
        # greys scaled by their sample format, transparency over white
        rgb = to_rgb(upright(img)[0], param, signed)
    except NTIError as err:  # pixel values it will not guess at
        raise APIError(400, str(err), param) from None
    except Exception as err:  # truncated data, bad CRC, a codec error: all the upload's fault
        raise APIError(400, f"{param}: the image data is truncated or corrupt ({type(err).__name__}: {err})",
                       param) from None
    if frames > 1:  # as the CLI: which frame was meant is a guess
        raise APIError(400, f"{param}: the image is animated or multi-page ({frames} frames); send one frame", param)
    return rgb


def png_bytes(img: Image.Image) -> bytes:
    """A stored upload square as the CLI writes its PNGs (images.png_bytes: without the upload's ICC profile, which
    would show other colours than the pixels the model sees); imported here, as torch is not needed to start."""
    from .images import png_bytes as encode
    return encode(img)


def is_loopback(host: str) -> bool:
    """Whether a host name or address (a Host header's, without its port) is this machine's loopback."""
    import ipaddress

    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(value: str) -> str:
    """The host of a Host header or an origin's authority, without port: 'localhost:8000' -> 'localhost',
    '[::1]:8000' -> '[::1]'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[:value.find("]") + 1]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def cross_site(headers: dict) -> str | None:
    """Why a request comes from another site's web page, or None. The server sends no CORS headers, so such a page
    cannot read an answer, but a browser still delivers its form POSTs ('simple' requests): without a token any
    site the user visits could queue jobs on a local server. Browsers say where a request comes from (Origin on
    POSTs, Sec-Fetch-Site); programs (curl, the OpenAI client) send neither and pass."""
    if headers.get("sec-fetch-site") == "cross-site":
        return "sent by another site's web page (Sec-Fetch-Site: cross-site)"
    origin = headers.get("origin")
    if origin is not None:
        authority = (origin.split("://", 1)[1] if "://" in origin else "").lower()
        # behind a reverse proxy the page's origin is the proxy's name, which it forwards (a page cannot set this)
        served_as = {headers.get("host", "").lower(), headers.get("x-forwarded-host", "").split(",")[0].strip().lower()}
        if authority not in served_as - {""}:
            return f"sent by a web page of another origin ({origin}) than this server ({headers.get('host', '')})"
    return None


def forwarded(headers: dict) -> bool:
    """Whether a reverse proxy forwarded the request (X-Forwarded-For or -Host, which a web page cannot set): the
    proxy's own server names decide which host names reach a loopback-bound server behind it."""
    return "x-forwarded-for" in headers or "x-forwarded-host" in headers


class Guard:
    """ASGI middleware before everything: requests of other sites' web pages refused, the Host checked on a
    loopback-bound server, the bearer token on every route but the public ones, and the upload byte limit (by
    Content-Length, and counted as the body streams in for uploads without one)."""

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        why = cross_site(headers)
        if why is not None:
            return await error_response(403, f"request refused: {why}; call this server from its own page or from a "
                                             f"program", "origin", "permission_error")(scope, receive, send)
        if self.settings.local_only and not is_loopback(host_name(headers.get("host", ""))) and not forwarded(headers):
            # a DNS-rebinding page (its name resolved to 127.0.0.1) would otherwise read everything as same-origin
            return await error_response(403, f"Host {headers.get('host', '')!r} is not this machine's loopback, which "
                                             f"this server is bound to; call it as localhost or 127.0.0.1", "host",
                                        "permission_error")(scope, receive, send)
        token = self.settings.token
        if token and scope["path"] not in PUBLIC_PATHS:
            given = headers.get("authorization", "")
            if not (given.startswith("Bearer ") and secrets.compare_digest(given[7:].encode(), token.encode())):
                why = "missing" if not given else "wrong"
                return await error_response(401, f"authorization: {why} bearer token (send 'Authorization: Bearer "
                                                 f"TOKEN')", "authorization", "authentication_error",
                                            {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        limit = self.settings.max_upload_bytes + 64 * 1024  # multipart framing and form fields on top
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return await error_response(400, f"content-length: not a byte count: {length!r}",
                                        "content-length")(scope, receive, send)
        if length is not None and int(length) > limit:
            return await error_response(413, f"request body of {length} bytes is over the limit of {limit}",
                                        "image")(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise StarletteHTTPException(413, f"request body is over the limit of {limit} bytes")
            return message

        await self.app(scope, counted, send)


# ------------------------------------------------------------------------------------------------------ the service

class Service:
    """The job store, the worker and the rules that turn requests into jobs. The worker is the in-process Batcher
    (one thread owns the pipeline), or whatever `worker(service)` makes: engine/serve_ray.py's, which sends each
    job to Ray Serve replicas. Requests, checks, the table and the artifacts are the same either way."""

    def __init__(self, settings: ServeSettings, worker=None):
        self.settings = settings
        self.store = JobStore(settings.data)
        self.metrics = Metrics(self.store)
        self.submit_lock = threading.Lock()
        self.base: NTIConfig | None = None
        self.engine = Engine(settings)
        self._inversions: dict[str, object] = {}  # inversion id -> loaded Inversion (small LRU)
        requeued = self.store.requeue_unfinished()
        if requeued:
            log_event("requeued_after_restart", jobs=requeued)
        self.batcher = worker(self) if worker else Batcher(
            self.store, BatchPolicy(settings.batch_size, settings.max_delay_ms / 1000), self._load, self._run_batch,
            self._on_batch)

    # --- the worker side
    def _load(self):
        pipe = self.engine.load()
        self.base = self.engine.base
        return pipe

    def _on_batch(self, kind: str, size: int, seconds: float) -> None:
        self.metrics.batch_size.labels(kind).observe(size)
        self.metrics.batch_seconds.labels(kind).observe(seconds)

    def _run_batch(self, pipe, jobs: list[Job]) -> None:
        """One fast-path batch in this process; a job whose stored input cannot be read fails alone."""
        tasks, outcomes = {}, {}
        for job in jobs:
            try:
                tasks[job.id] = self.task(job)
            except NTIError as err:
                outcomes[job.id] = Outcome(job.id, error=str(err))
        if tasks:
            outcomes.update(zip(tasks, self.engine.run(list(tasks.values()))))
        self.complete(jobs, [outcomes[job.id] for job in jobs])

    def task(self, job: Job) -> Task:
        """What the engine needs of a job: the stored source square, or the stored inversion and edit settings.
        NTIError when what is stored cannot be read (a damaged disk, a file removed by hand)."""
        if job.kind == "invert":
            from .images import open_image

            try:  # the readers' own checks; their message names the server's path, so it goes to the log only
                image = open_image(self.store.path("sources", job.id), "the stored upload")
            except NTIError as err:
                log_event("upload_unreadable", logging.ERROR, job=job.id, error=str(err))
                raise NTIError("the stored upload is damaged and could not be read; post the image again") from None
            return Task(job.id, "invert", job.request["source_prompt"], job.request["settings"], image=image)
        parent = self.store.get(job.parent)
        if parent is None:  # DELETE /v1/inversions/ID came while this edit was already running
            raise NTIError(f"inversion {job.parent} was deleted before this edit ran")
        return Task(job.id, "edit", job.request["target_prompt"], {**parent.request["settings"],
                                                                   **job.request["edit"]},
                    inversion=self.inversion(job.parent))

    def complete(self, jobs: list[Job], outcomes: list[Outcome]) -> None:
        """Store a batch's outcomes: failed jobs get their error; each artifact is written to tmp/, fsynced and
        renamed into place (tmp/ is cleared at start), the renames made durable, then the jobs are marked done in
        one transaction."""
        done = []
        for job, outcome in zip(jobs, outcomes):
            if outcome.error is not None:
                self.store.fail(job.id, outcome.error)
                continue
            path = self.store.path("inversions" if job.kind == "invert" else "edits", job.id)
            tmp = self.store.folder / "tmp" / path.name  # same file system: the rename is atomic
            for folder in (tmp.parent, path.parent):  # removed under a running server: made again, as at start
                folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(outcome.data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            done.append((job, outcome.result, path))
        if done:
            self._finish(*map(list, zip(*done)))

    def _finish(self, jobs: list[Job], results: list[dict], outputs: list[Path]) -> None:
        """The batch's files are written and fsynced; make their renames durable, then mark the jobs done."""
        fsync_dir(outputs[0].parent)
        states = self.store.finish({job.id: result for job, result in zip(jobs, results)})
        for job, output in zip(jobs, outputs):
            if states[job.id] == "cancelled":
                output.unlink(missing_ok=True)
            self.metrics.job_seconds.labels(job.kind).observe(time.time() - job.created_at)
            log_event("job_" + states[job.id], job=job.id, kind=job.kind, batch_size=len(jobs))

    def inversion(self, job_id: str):
        """A stored inversion (cached). One that cannot be read fails its edits with NTIError, and its own job is
        marked failed: the same upload then inverts anew instead of reusing it, and new edits get a 409."""
        from . import load_inversion

        with self.submit_lock:  # the Ray worker loads inversions from several threads
            if job_id in self._inversions:
                return self._inversions[job_id]
        try:
            inv = load_inversion(self.store.path("inversions", job_id))
        except NTIError as err:
            why = "its stored file is damaged and could not be read; post the image again to invert it anew"
            self.store.fail(job_id, why)  # what was wrong, with the server's path, goes to the log only
            log_event("inversion_unreadable", logging.ERROR, job=job_id, error=str(err))
            raise NTIError(f"inversion {job_id}: {why}") from None
        with self.submit_lock:
            if len(self._inversions) >= 64:
                self._inversions.pop(next(iter(self._inversions)))
            self._inversions[job_id] = inv
        return inv

    # --- the request side
    def pipe(self):
        b = self.batcher
        if b.pipe is None or self.base is None:
            why = b.load_error or "the model is still loading"
            raise APIError(503, f"not ready: {why}", None, "unavailable", {"Retry-After": "2"})
        if b.stopping:
            raise APIError(503, "the server is shutting down", None, "unavailable", {"Retry-After": "5"})
        if b.thread.ident is not None and not b.alive:  # started and died (the log says why): nothing would run it
            raise APIError(503, "the server's worker has stopped (its log says why); restart the server: jobs already "
                                "accepted stay queued on disk and run then", None, "unavailable")
        return b.pipe

    def check_prompt(self, prompt: str, param: str) -> None:
        from .api import check_vocabulary

        if is_blank(prompt):  # zero-width characters alone count as empty
            raise APIError(400, f"{param}: must not be empty", param)
        if len(prompt) > self.settings.max_prompt_chars:
            raise APIError(400, f"{param}: {len(prompt)} characters is over the limit of "
                                f"{self.settings.max_prompt_chars}", param)
        try:
            check_vocabulary(self.pipe(), [prompt])
        except NTIError as err:
            raise APIError(400, f"{param}: {err}", param) from None

    def config(self, **changes) -> NTIConfig:
        try:
            return self.base.replace(**changes)
        except NTIError as err:
            message = str(err)
            param = max((k for k in changes if message.startswith(k)), key=len, default=None)  # cross_replace_words,
            # not the cross_replace its message also starts with
            raise APIError(400, message, param) from None

    def check_room(self, jobs: int) -> None:
        depth = self.store.queue_depth()
        if depth + jobs > self.settings.max_queue:
            per_batch = max(self.batcher.seconds_per_step.values(), default=1.0) * self.settings.steps
            wait = max(1, math.ceil(depth / self.settings.batch_size * per_batch))
            raise APIError(429, f"the queue is full ({depth} jobs); retry after {wait} s", None, "rate_limit_error",
                           {"Retry-After": str(wait)})

    def check_steps(self, steps: int | None, inner_steps: int | None) -> None:
        if steps is not None and not 1 <= steps <= self.settings.max_steps:
            raise APIError(400, f"steps: must be in [1, {self.settings.max_steps}]; got {steps}", "steps")
        if inner_steps is not None and not 0 <= inner_steps <= self.settings.max_inner_steps:
            raise APIError(400, f"inner_steps: must be in [0, {self.settings.max_inner_steps}]; got {inner_steps}",
                           "inner_steps")

    def submit_inversion(self, img: Image.Image, source_prompt: str, settings: dict) -> tuple[Job, bool, list[str]]:
        """The inversion job for these pixels, prompt and settings (an existing live one, or a new queued one), and
        this upload's warnings (images.crop_warning: the model sees only its centre square)."""
        from .artifact import inversion_key
        from .images import center_square, crop_warning, pixel_hash

        pipe = self.pipe()
        self.check_prompt(source_prompt, "source_prompt")
        settings = {k: v for k, v in settings.items() if v is not None}
        self.check_steps(settings.get("steps"), settings.get("inner_steps"))
        config = self.config(**settings)
        warned = [w for w in (crop_warning(img.size, pipe.resolution, "image"),) if w]
        square = center_square(img, pipe.resolution)
        result_settings = config.result_settings(pipe.scheduler_config)
        key = inversion_key(pixel_hash(square), source_prompt, pipe.fingerprint, result_settings)
        existing = self.store.find_inversion(key)
        if existing is not None:
            return existing, True, warned
        job = Job(id=new_id(), kind="invert", state="queued", key=key,
                  request={"source_prompt": source_prompt, "settings": settings, "steps": config.steps,
                           "result_settings": result_settings, "warnings": warned})
        source = self.store.path("sources", job.id)
        atomic_write(source, png_bytes(square))  # the file before the row (outside the lock: fsyncs overlap)
        with self.submit_lock:
            existing = self.store.find_inversion(key)  # the same image may have come in meanwhile
            if existing is None:
                try:
                    self.check_room(1)
                except APIError:
                    source.unlink(missing_ok=True)
                    raise
                self.store.add(job)
        if existing is not None:
            source.unlink(missing_ok=True)
            return existing, True, warned
        log_event("job_accepted", job=job.id, kind="invert", key=key, warnings=len(warned))
        self.batcher.wake()
        return job, False, warned

    def submit_edit(self, inversion: Job, target_prompt: str, edit_settings: dict) -> Job:
        if inversion.cancel:  # a DELETE came while it ran: its batch drops it, so this edit could only fail
            raise APIError(409, f"inversion {inversion.id} is being deleted; post the image again to invert it anew",
                           "inversion_id", "conflict")
        self.check_prompt(target_prompt, "target_prompt")
        config = self.config(**inversion.request["settings"], **edit_settings)
        if config.edit != "regenerate":  # P2P word alignment errors (replace needs equal word counts) belong here
            from .p2p import make_plan
            try:
                make_plan(self.pipe().tokenizer, inversion.request["source_prompt"], target_prompt, config)
            except NTIError as err:  # a word setting none of whose words is in the prompts names that field
                param = next((field for prefix, field in (("reweight", "reweight"), ("blend words", "blend_words"),
                                                          ("cross-replace words", "cross_replace_words"))
                              if str(err).startswith(prefix)), "target_prompt")
                raise APIError(400, f"{param}: {err}", param) from None
        with self.submit_lock:
            self.check_room(1)
            job = self.store.add(Job(id=new_id(), kind="edit", state="queued", parent=inversion.id,
                                     request={"target_prompt": target_prompt, "edit": edit_settings,
                                              "steps": inversion.request["steps"]}))
        log_event("job_accepted", job=job.id, kind="edit", inversion=inversion.id)
        self.batcher.wake()
        return job

    async def wait(self, job: Job, timeout_s: float | None) -> Job:
        limit = min(timeout_s or self.settings.request_timeout_s, self.settings.request_timeout_s)
        done = await self.batcher.wait(job.id, limit)
        if done is None and self.store.get(job.id) is None:  # a DELETE of it (or of its inversion) woke us
            raise APIError(409, f"job {job.id} was cancelled and deleted (DELETE) before it finished", None,
                           "cancelled")
        if done is None:
            self.store.cancel(job.id)
            log_event("job_timeout", logging.WARNING, job=job.id, seconds=limit)
            raise APIError(504, f"the job did not finish within {limit:g} s and was cancelled; raise timeout_s or "
                                f"submit with wait=false and poll", "timeout_s", "timeout")
        if done.state not in FINAL:  # released by a shutdown whose drain time is up, or a dead worker: kept on disk
            raise APIError(503, f"the server is shutting down or its worker has stopped; edit {job.id} is kept and runs "
                                f"after the restart: poll GET /v1/edits/{job.id}", None, "unavailable",
                           {"Retry-After": "10"})
        return done

    # --- views
    def progress(self, job: Job) -> Progress:
        if job.state != "running":
            return Progress(phase=job.state, fraction={"queued": 0.0, "done": 1.0}.get(job.state))
        per_step = self.batcher.seconds_per_step.get(job.kind)
        if per_step is None or job.started_at is None:
            return Progress(phase="running", fraction=None)
        expected = per_step * job.request.get("steps", self.settings.steps)
        return Progress(phase="running", fraction=round(min(0.99, (time.time() - job.started_at) / expected), 3))

    def inversion_status(self, job: Job, reused: bool = False, warned: list[str] | None = None) -> InversionStatus:
        """The job's public status; warned: this request's warnings (a reused job's stored ones are another
        upload's)."""
        timings = {}
        if job.started_at:
            timings["queue_s"] = job.started_at - job.created_at
        timings.update(job.result)
        settings = job.request.get("result_settings", job.request["settings"])
        return InversionStatus(id=job.id, status=job.state, key=job.key, source_prompt=job.request["source_prompt"],
                               settings=settings, progress=self.progress(job), reused=reused,
                               edits=len(self.store.children(job.id)), created_at=job.created_at,
                               started_at=job.started_at, finished_at=job.finished_at, timings=timings,
                               error=ErrorDetail(message=job.error, type="job_failed", param=job.error_param)
                               if job.error else None,
                               warnings=job.request.get("warnings", []) if warned is None else warned)

    def edit_timings(self, job: Job) -> dict:
        """Where the time went, and whether this edit had to wait for an inversion or reused a stored one."""
        parent = self.store.get(job.parent)
        t = {"batch_size": job.result.get("batch_size"), "edit_s": job.result.get("edit_s")}
        if job.started_at:
            t["queue_s"] = round(job.started_at - job.created_at, 4)
        if job.finished_at:
            t["total_s"] = round(job.finished_at - job.created_at, 4)
        reused = parent is not None and parent.finished_at is not None and parent.finished_at <= job.created_at
        t["inversion_reused"] = reused  # stored before this edit arrived: no inversion ran for it
        t["invert_s"] = 0.0 if reused or parent is None else parent.result.get("invert_s")
        t["inversion_id"] = job.parent
        return t

    def edit_png(self, job: Job) -> bytes:
        """A done edit's stored PNG; 410 when its file was removed from the data folder under the server."""
        try:
            return self.store.path("edits", job.id).read_bytes()
        except FileNotFoundError:
            raise APIError(410, f"edit {job.id}: its image is no longer stored on the server (removed from the data "
                                f"folder); submit the edit again", "edit_id", "gone") from None

    def edit_status(self, job: Job, with_image: bool) -> EditStatus:
        image = None
        if with_image and job.state == "done":
            image = base64.b64encode(self.edit_png(job)).decode()
        return EditStatus(id=job.id, inversion_id=job.parent, status=job.state,
                          target_prompt=job.request["target_prompt"], settings=job.request["edit"], b64_json=image,
                          timings=self.edit_timings(job), created_at=job.created_at, finished_at=job.finished_at,
                          error=ErrorDetail(message=job.error, type="job_failed", param=job.error_param)
                          if job.error else None)

    def job_or_404(self, job_id: str, kind: str) -> Job:
        job = self.store.get(job_id, kind)
        if job is None:
            what = "inversion" if kind == "invert" else "edit"
            raise APIError(404, f"no {what} with id {job_id}", "id", "not_found")
        return job

    def failed(self, job: Job) -> APIError:
        if job.state == "cancelled":
            return APIError(409, f"job {job.id} was cancelled", None, "cancelled")
        return APIError(422, job.error or "the job failed", job.error_param, "job_failed")


# ------------------------------------------------------------------------------------------------------ the app

def page_headers(html: str) -> dict:
    """Content-Security-Policy (CSP Level 3 hash sources) and friends for the page, which holds the bearer token: only
    its own inline script and style run, it talks to its own origin only, and no other site may frame it."""
    def hashes(tag: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S))
    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
              "img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


async def upload_bytes(upload: UploadFile, settings: ServeSettings) -> bytes:
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise APIError(413, f"image: over the limit of {settings.max_upload_bytes} bytes", "image")
    return data


def create_app(settings: ServeSettings, service: Service | None = None) -> FastAPI:
    """The HTTP API over a Service: the in-process one by default; `nti serve --ray` passes one whose worker sends
    jobs to Ray Serve replicas, and serves this same app as its ingress (engine/serve_ray.py)."""
    service = service or Service(settings)

    @asynccontextmanager
    async def lifespan(app):
        service.batcher.start()
        log_event("serving", data=str(Path(settings.data).resolve()), batch_size=settings.batch_size,
                  max_delay_ms=settings.max_delay_ms, auth=bool(settings.token))
        yield
        log_event("draining", queued=service.store.queue_depth(), drain_s=settings.drain_s)
        service.batcher.stop(settings.drain_s)
        service.store.close()

    app = FastAPI(title="nti serve", version="1", lifespan=lifespan,
                  description="Null-text inversion and text-guided editing over HTTP: invert once, edit many.")
    app.state.service = service
    app.add_middleware(Guard, settings=settings)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()

        def count(status: int) -> None:
            route = getattr(request.scope.get("route"), "path", "unmatched")
            service.metrics.requests.labels(route, str(status)).inc()
            service.metrics.latency.labels(route).observe(time.perf_counter() - start)
        try:
            response = await call_next(request)
        except Exception:  # a bug, on its way to internal_error's JSON 500: counted as that
            count(500)
            raise
        count(response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return error_response(err.status, err.message, err.param, err.kind, err.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err: RequestValidationError):
        first = err.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "header", "form")]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid')}" if param else first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":  # its loc is a character position, not a field
            param, message = None, (f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'decode error')})"
                                    f"; send a JSON object such as {{\"target_prompt\": \"...\"}}")
        elif "Expected UploadFile" in message:  # a multipart part without a filename arrives as text
            message = f"{param}: send it as a file, a multipart part with a filename (curl -F '{param}=@FILE')"
        return error_response(422, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(err.status_code, "http_error")
        return error_response(err.status_code, str(err.detail), "image" if err.status_code == 413 else None, kind)

    @app.exception_handler(Exception)
    async def internal_error(request, err: Exception):  # a bug: logged with its traceback, answered in JSON
        logging.getLogger("nti.serve").exception("unhandled error")
        return error_response(500, f"internal error: {type(err).__name__}", None, "server_error")

    # --- operations
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        html = PAGE.read_text()
        return HTMLResponse(html, headers=page_headers(html))

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict:
        """The process answers (no auth)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], responses={503: {"model": dict}})
    def readyz():
        """The model is loaded and the worker is alive (no auth)."""
        b = service.batcher
        reasons = [why for bad, why in ((b.pipe is None, b.load_error or "model loading"),
                                        (b.pipe is not None and not b.alive, "worker stopped"),
                                        (b.stopping, "shutting down")) if bad]
        body = {"ready": not reasons, "reasons": reasons, "queue_depth": service.store.queue_depth()}
        return JSONResponse(body, status_code=200 if not reasons else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}, 401: ERRORS[401]})
    def metrics():
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- OpenAI-compatible
    @app.post("/v1/images/edits", tags=["openai"], response_model=ImagesResponse, responses=ERRORS)
    async def images_edits(
            image: Annotated[UploadFile, File(description="the image to edit (PNG, JPEG, WebP, ...)")],
            prompt: Annotated[str, Form(description="the target prompt: what the edited image shows")],
            source_prompt: Annotated[str, Form(description="what the source image shows (NTI inverts under it)")],
            model: Annotated[str | None, Form()] = None,
            n: Annotated[int | None, Form()] = None,
            size: Annotated[str | None, Form()] = None,
            response_format: Annotated[str | None, Form()] = None,
            user: Annotated[str | None, Form()] = None,
            method: Annotated[Literal[METHODS] | None, Form()] = None,
            steps: Annotated[int | None, Form()] = None,
            inner_steps: Annotated[int | None, Form()] = None,
            guidance: Annotated[float | None, Form(ge=0, le=50)] = None,
            guidance_schedule: Annotated[Literal[GUIDANCE_SCHEDULES] | None, Form()] = None,
            edit: Annotated[Literal[EDIT_MODES] | None, Form()] = None,
            timeout_s: Annotated[float | None, Form(gt=0)] = None,
            mask: Annotated[UploadFile | None, File(description="refused: inpainting masks are not served")] = None,
            stream: Annotated[bool | None, Form(description="refused when true")] = None,
            output_format: Annotated[str | None, Form(description="png only")] = None,
            background: Annotated[str | None, Form(description="auto or opaque only")] = None):
        """Edit an image (OpenAI's images.edit): invert it under source_prompt (or reuse a stored inversion of the
        same pixels, prompt and settings), regenerate it under prompt. One image per call (n = 1)."""
        # OpenAI fields that change what comes back: refused, since ignoring them answers something else
        if mask is not None:
            raise APIError(400, "mask: inpainting masks are not served (the edit changes the whole image by prompt); "
                                "send no mask", "mask")
        if stream:
            raise APIError(400, "stream: true is not served (no partial images); send no stream or stream=false",
                           "stream")
        if output_format not in (None, "png"):
            raise APIError(400, f"output_format: only png is served; got {output_format!r}", "output_format")
        if background not in (None, "auto", "opaque"):
            raise APIError(400, f"background: only opaque images are made; got {background!r}", "background")
        if n not in (None, 1):
            raise APIError(400, f"n: only n=1 is served (one edit per inversion and prompt); got {n}", "n")
        if response_format not in (None, "b64_json"):
            raise APIError(400, "response_format: only b64_json is served (no image URLs)", "response_format")
        pipe = service.pipe()
        side = pipe.resolution
        if size not in (None, "auto", f"{side}x{side}"):
            raise APIError(400, f"size: this model makes {side}x{side} images; got {size!r}", "size")
        service.check_prompt(prompt, "prompt")
        img = await run_in_threadpool(read_image, await upload_bytes(image, settings), settings)
        inversion, _, warned = await run_in_threadpool(service.submit_inversion, img, source_prompt, {
            "method": method, "steps": steps, "inner_steps": inner_steps, "guidance": guidance,
            "guidance_schedule": guidance_schedule})
        job = await run_in_threadpool(service.submit_edit, inversion, prompt, {"edit": edit} if edit else {})
        job = await service.wait(job, timeout_s)
        if job.state != "done":
            raise service.failed(job)
        b64 = base64.b64encode(service.edit_png(job)).decode()
        return ImagesResponse(created=int(time.time()), data=[ImageData(b64_json=b64)],
                              nti={"edit_id": job.id, "inversion_id": inversion.id,
                                   "timings": service.edit_timings(job), "warnings": warned})

    # --- native
    @app.post("/v1/inversions", tags=["inversions"], status_code=202, response_model=InversionStatus,
              responses={200: {"model": InversionStatus, "description": "an identical inversion exists: reused"},
                         **ERRORS})
    async def create_inversion(
            image: Annotated[UploadFile, File(description="the image to invert")],
            source_prompt: Annotated[str, Form(description="what the image shows")],
            method: Annotated[Literal[METHODS] | None, Form()] = None,
            steps: Annotated[int | None, Form()] = None,
            inner_steps: Annotated[int | None, Form()] = None,
            guidance: Annotated[float | None, Form(ge=0, le=50)] = None,
            guidance_schedule: Annotated[Literal[GUIDANCE_SCHEDULES] | None, Form()] = None,
            early_stop: Annotated[bool | None, Form()] = None):
        """Queue an inversion (202 + id), or return the stored one for the same pixels, prompt, model and
        result-changing settings (200, reused=true)."""
        service.pipe()
        img = await run_in_threadpool(read_image, await upload_bytes(image, settings), settings)
        job, reused, warned = await run_in_threadpool(service.submit_inversion, img, source_prompt, {
            "method": method, "steps": steps, "inner_steps": inner_steps, "guidance": guidance,
            "guidance_schedule": guidance_schedule, "early_stop": early_stop})
        body = service.inversion_status(job, reused, warned).model_dump(mode="json")
        return JSONResponse(body, status_code=200 if reused else 202)

    @app.get("/v1/inversions/{inversion_id}", tags=["inversions"], response_model=InversionStatus,
             responses=ERRORS)
    def get_inversion(inversion_id: Id):
        """Status and progress of an inversion."""
        return service.inversion_status(service.job_or_404(inversion_id, "invert"))

    @app.get("/v1/inversions/{inversion_id}/source", tags=["inversions"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}, **ERRORS})
    def get_source(inversion_id: Id):
        """The preprocessed source image (centre square at the model's resolution) as PNG."""
        job = service.job_or_404(inversion_id, "invert")
        path = service.store.path("sources", job.id)
        if not path.is_file():
            raise APIError(404, f"inversion {job.id} has no stored source image", "inversion_id", "not_found")
        return Response(path.read_bytes(), media_type="image/png")

    @app.delete("/v1/inversions/{inversion_id}", tags=["inversions"], response_model=Deleted, responses=ERRORS)
    def delete_inversion(inversion_id: Id):
        """Cancel an inversion and its edits, and delete what is stored for them."""
        job = service.job_or_404(inversion_id, "invert")
        for child in service.store.children(job.id):
            service.store.cancel(child.id)
        state = service.store.cancel(job.id)
        if state == "running":  # its batch is on the worker: marked, dropped when the batch ends
            for child in service.store.children(job.id):  # its edits, cancelled above, are kept: requests waiting
                service.batcher.notify(child.id)  # on them answer now (409), not at their timeout
            return Deleted(id=job.id, deleted=False, status="cancelling")
        for child in service.store.children(job.id):
            if service.store.get(child.id).state in FINAL:
                service.store.delete(child.id)
                service.store.path("edits", child.id).unlink(missing_ok=True)
                service.batcher.notify(child.id)  # a request waiting on it answers now, not at its timeout
        # the row before its files: an edit already running then finds no inversion ("deleted"), never a row whose
        # file is missing ("damaged"); a crash in between leaves only files no row names
        service.store.delete(job.id)
        with service.submit_lock:
            service._inversions.pop(job.id, None)
        service.store.path("sources", job.id).unlink(missing_ok=True)
        service.store.path("inversions", job.id).unlink(missing_ok=True)
        log_event("inversion_deleted", job=job.id)
        return Deleted(id=job.id, deleted=True, status="deleted")

    @app.post("/v1/inversions/{inversion_id}/edits", tags=["edits"], response_model=EditStatus,
              responses={200: {"content": {"image/png": {}}, "model": EditStatus},
                         202: {"model": EditStatus, "description": "wait=false: queued"}, **ERRORS})
    async def create_edit(inversion_id: Id, body: EditRequest):
        """Edit a stored inversion under a target prompt: no new inversion runs. Answers the edit (JSON with
        base64, or the PNG itself with response_format=png), or 202 at once with wait=false."""
        inversion = service.job_or_404(inversion_id, "invert")
        if inversion.state in ("failed", "cancelled"):
            raise APIError(409, f"inversion {inversion.id} {inversion.state}: {inversion.error or ''}".strip(),
                           "inversion_id", "conflict")
        edit_settings = {"edit": body.edit}
        if body.edit != "regenerate":
            edit_settings.update(cross_replace=body.cross_replace, self_replace=body.self_replace)
        # only what was given: the settings key the job (and which edits share a batch), as a plain edit's always did
        edit_settings.update({name: value for name in ("cross_replace_words", "reweight", "blend_words")
                              if (value := getattr(body, name))})
        job = await run_in_threadpool(service.submit_edit, inversion, body.target_prompt, edit_settings)
        if not body.wait:
            return JSONResponse(service.edit_status(job, False).model_dump(mode="json"), status_code=202)
        job = await service.wait(job, body.timeout_s)
        if job.state != "done":
            raise service.failed(job)
        if body.response_format == "png":
            return Response(service.edit_png(job), media_type="image/png",
                            headers={"X-NTI-Edit-Id": job.id,
                                     "X-NTI-Timings": json.dumps(service.edit_timings(job))})
        return service.edit_status(job, True)

    @app.get("/v1/edits/{edit_id}", tags=["edits"], response_model=EditStatus, responses=ERRORS)
    def get_edit(edit_id: Id):
        """Status of an edit, with the image (base64) once done."""
        return service.edit_status(service.job_or_404(edit_id, "edit"), True)

    @app.get("/v1/edits/{edit_id}/image", tags=["edits"], response_class=Response,
             responses={200: {"content": {"image/png": {}}}, **ERRORS})
    def get_edit_image(edit_id: Id):
        """The edited image as PNG (409 until it is done)."""
        job = service.job_or_404(edit_id, "edit")
        if job.state != "done":
            raise APIError(409, f"edit {job.id} is {job.state}", "edit_id", "not_ready")
        return Response(service.edit_png(job), media_type="image/png")

    @app.delete("/v1/edits/{edit_id}", tags=["edits"], response_model=Deleted, responses=ERRORS)
    def delete_edit(edit_id: Id):
        """Cancel an edit (a queued one at once, a running one when its batch ends) and delete its image."""
        job = service.job_or_404(edit_id, "edit")
        state = service.store.cancel(job.id)
        if state == "running":
            return Deleted(id=job.id, deleted=False, status="cancelling")
        service.store.path("edits", job.id).unlink(missing_ok=True)
        service.store.delete(job.id)
        service.batcher.notify(job.id)  # a request waiting on it answers now, not at its timeout
        return Deleted(id=job.id, deleted=True, status="deleted")

    return app


# ------------------------------------------------------------------------------------------------------ running

class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line; messages that are JSON objects (log_event) are merged in."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name}
        message = record.getMessage()
        try:
            fields = json.loads(message)
            out.update(fields if isinstance(fields, dict) else {"msg": message})
        except ValueError:
            out["msg"] = message
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app under uvicorn; SIGTERM/SIGINT stop taking requests, let waiting ones finish (the worker keeps
    batching for up to drain_s), then stop the worker."""
    import uvicorn

    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    app = create_app(settings)
    service = app.state.service

    class Server(uvicorn.Server):
        """uvicorn's, but requests still waiting when the drain time is up answer 503 with their job's id (kept on
        disk for the next start) in the second uvicorn gives them, instead of being cut off with no answer."""

        async def shutdown(self, sockets=None):
            asyncio.get_running_loop().call_later(settings.drain_s, service.batcher.release_waiters)
            await super().shutdown(sockets)

    Server(uvicorn.Config(app, host=host, port=port, log_config=None,
                          timeout_graceful_shutdown=int(settings.drain_s) + 1)).run()

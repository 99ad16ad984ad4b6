"""`nti serve --ray [ADDRESS]`: the HTTP API of `nti serve`, served as a Ray Serve application.

Two deployments. The ingress (one replica, `serve.ingress`) is engine/serve.py's FastAPI app itself: the same routes,
checks, error JSON, job table and artifacts, with a worker that sends each runnable job to the engine deployment
instead of running it in-process. The engine (`EngineReplica`: one per GPU, `num_gpus=1`, or CPU replicas) holds a
pipeline and forms batches with Ray Serve's own `@serve.batch` (max_batch_size = --batch-size, batch_wait_timeout_s
= --max-delay-ms), and autoscales between --min-replicas and --max-replicas on --target-ongoing-requests. Replicas
are stateless: a job's image or inversion goes to them and its artifact comes back as bytes, so only the ingress's
node holds --data (the SQLite job table cannot be shared over a network file system; docs/serving.md).

Ray is imported here only: the single-process `nti serve` never needs it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import ray
from ray import serve

from .config import NTIError
from .serve import Service, create_app
from .serve_jobs import (Batcher, BatchPolicy, Engine, Job, ModelCard, Outcome, ServeSettings, Task, base_config,
                         log_event)

APP = "nti"  # the Ray Serve application's name
SEND_ATTEMPTS = 2  # a job whose replica died under it is sent again once, then failed (a job that kills replicas)


@dataclass
class Scaling:
    """How many engine replicas, and when Ray Serve adds one (its autoscaling config)."""
    min_replicas: int = 1
    max_replicas: int | None = None  # None: one per GPU of the cluster (1 on CPU)
    target_ongoing_requests: float | None = None  # None: --batch-size (a full batch per replica)
    replica_cpus: float = 1.0  # CPUs per replica on CPU (torch threads); on GPUs 1 CPU drives each GPU


# ------------------------------------------------------------------------------------------------ the engine replica

def log_to_replica_file() -> None:
    """nti's JSON events (job accepted, batch, job done...) into this replica's Serve log file, beside Serve's own
    lines (Ray's session folder: logs/serve/replica_nti_*.log)."""
    ours = logging.getLogger("nti.serve")
    ours.setLevel(logging.INFO)
    for handler in logging.getLogger("ray.serve").handlers:
        if handler not in ours.handlers:
            ours.addHandler(handler)
    ours.propagate = False


@serve.deployment(name="NtiEngine")
class EngineReplica:
    """One engine (pipeline + fast-path state) per replica; batches formed by Ray Serve from concurrent job calls."""

    def __init__(self, settings: dict, name: str | None = None):
        import torch

        log_to_replica_file()
        self.settings = ServeSettings(**settings)
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if self.settings.device == "cpu" and cpus:  # the CPUs Ray gave this replica, no more (engine/distributed.py)
            torch.set_num_threads(max(1, int(cpus)))
        self.engine = Engine(self.settings)
        self.engine.load()
        if name is not None:  # a folder given relative to the command's: named as plain `nti serve` names it
            self.engine.pipe.name = name
        # one thread owns the pipeline, as in the single-process worker; the replica's event loop stays free to
        # collect the next batch meanwhile
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="nti-engine")
        self.run.set_max_batch_size(self.settings.batch_size)
        self.run.set_batch_wait_timeout_s(self.settings.max_delay_ms / 1000)

    def describe(self) -> ModelCard:
        return ModelCard.of(self.engine.pipe)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # set from the settings in __init__
    async def run(self, tasks: list[Task]) -> list[Outcome]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._run, tasks)

    def _run(self, tasks: list[Task]) -> list[Outcome]:
        try:
            return self.engine.run(tasks)
        except Exception as err:  # a bug in one batch fails its jobs, not the replica
            logging.getLogger("nti.serve").exception("batch failed")
            return [Outcome(t.job_id, error=f"internal error: {type(err).__name__}: {err}") for t in tasks]


# ------------------------------------------------------------------------------------------------ the ingress

class RemoteBatcher(Batcher):
    """The ingress's worker: the single-process Batcher's job table, waiting and draining, but every runnable job is
    one call to the engine deployment (Ray Serve batches them on the replicas) and its outcome is stored here."""

    def __init__(self, service: Service, engine, max_in_flight: int):
        settings = service.settings
        super().__init__(service.store, BatchPolicy(settings.batch_size, settings.max_delay_ms / 1000),
                         self._describe, None, service._on_batch)
        self.service, self.engine, self.max_in_flight = service, engine, max_in_flight
        self.in_flight = 0
        self.sent: dict[str, int] = {}  # job id -> calls made for it
        self.batches_seen: dict[str, None] = {}  # batch ids already counted in the metrics (small LRU)
        self.pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="nti-send")

    def _describe(self) -> ModelCard:
        """The model as a replica holds it (name, resolution, fingerprint, tokenizer): what the checks need."""
        card = self.engine.describe.remote().result()
        self.service.base = base_config(self.service.settings, card.device.type)
        log_event("model_ready", model=card.name, device=str(card.device))
        return card

    def stop(self, drain_s: float) -> None:
        super().stop(drain_s)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _work(self) -> None:  # Batcher._main runs it and wakes waiting requests when it ends
        if not self._load_model():  # the ingress stays up and says why in /readyz
            return
        while True:
            with self.cond:
                while True:
                    room = self.max_in_flight - self.in_flight
                    jobs = [job for job, _, _ in self.runnable()][:room] if room > 0 else []
                    if self.stopping and (time.time() >= self.drain_deadline or not (jobs or self.in_flight)):
                        log_event("worker_stopped", left_queued=self.store.queue_depth())
                        return
                    if jobs:
                        break
                    self.cond.wait(timeout=1.0)
            started = self.store.start([j.id for j in jobs])  # a job cancelled since it was picked stays cancelled
            jobs = [job for job in jobs if job.id in started]
            with self.cond:
                self.in_flight += len(jobs)
            for job in jobs:
                self.pool.submit(self._send, job)

    def _send(self, job: Job) -> None:
        """One job through a replica; its outcome stored as the in-process worker stores a batch's."""
        try:
            self.sent[job.id] = self.sent.get(job.id, 0) + 1
            try:
                task = self.service.task(job)
            except NTIError as err:  # e.g. its stored inversion is unreadable
                outcome = Outcome(job.id, error=str(err))
            else:
                try:
                    outcome = self.engine.run.remote(task).result()
                except Exception as err:  # the replica died under it (or Ray failed): not the job's fault, once
                    if self.stopping:  # the engine is going away with the app: the job stays for the next start
                        with self.cond:
                            self.drain_deadline = 0.0
                        self.store.update(job.id, state="queued", started_at=None)
                        return
                    if self.sent[job.id] < SEND_ATTEMPTS:
                        log_event("job_resent", logging.WARNING, job=job.id, error=f"{type(err).__name__}: {err}")
                        self.store.update(job.id, state="queued", started_at=None)
                        return
                    outcome = Outcome(job.id, error=f"internal error: the engine replica failed "
                                                    f"{self.sent[job.id]} time(s) on this job: {type(err).__name__}")
            self.service.complete([job], [outcome])
            self.sent.pop(job.id, None)
            with self.cond:  # the jobs of one batch come back on several threads: count it once
                first = bool(outcome.batch) and outcome.batch not in self.batches_seen
                if first:
                    self.batches_seen[outcome.batch] = None
                    if len(self.batches_seen) > 1024:
                        self.batches_seen.pop(next(iter(self.batches_seen)))
            if first:
                size = outcome.result.get("batch_size", 1)
                self.seconds_per_step[job.kind] = outcome.batch_s / max(1, int(job.request.get("steps", 1)))
                self._on_batch(job.kind, size, outcome.batch_s)
        except Exception:  # a bug here must not leave the job running forever unseen
            logging.getLogger("nti.serve").exception("storing an outcome failed")
            self.store.fail(job.id, "internal error while storing the result")
        finally:
            with self.cond:
                self.in_flight -= 1
                self.cond.notify_all()
            self.notify(job.id)


@serve.deployment(name="NtiIngress")
@serve.ingress()
class Ingress:
    """engine/serve.py's app and Service, with the job table in --data on this replica's node."""

    def __init__(self, settings: dict, engine, max_in_flight: int):
        log_to_replica_file()
        self.settings = ServeSettings(**settings)
        self.service = Service(self.settings, worker=lambda service: RemoteBatcher(service, engine, max_in_flight))

    def __serve_build_asgi_app__(self):
        return create_app(self.settings, self.service)


# ------------------------------------------------------------------------------------------------ running it

def build_app(settings: ServeSettings, scaling: Scaling, cuda: bool, node_ip: str | None, name: str | None = None):
    """The Ray Serve application: the ingress pinned to `node_ip` (where --data is), the engine replicas anywhere
    (`name`: the model's name as the command gave it, settings.model the folder the replicas load)."""
    max_replicas = scaling.max_replicas or 1
    engine = EngineReplica.options(
        ray_actor_options={"num_gpus": 1 if cuda else 0, "num_cpus": 1 if cuda else scaling.replica_cpus},
        # room for a full batch running and the next one filling
        max_ongoing_requests=2 * settings.batch_size,
        autoscaling_config={"min_replicas": scaling.min_replicas, "initial_replicas": scaling.min_replicas,
                            "max_replicas": max_replicas,
                            "target_ongoing_requests": scaling.target_ongoing_requests or settings.batch_size},
        graceful_shutdown_timeout_s=settings.drain_s + 10,
    ).bind(asdict(settings), name)
    ingress_options = {"num_cpus": 0}
    if node_ip:
        ingress_options["resources"] = {f"node:{node_ip}": 0.001}
    max_in_flight = max_replicas * 2 * settings.batch_size
    return Ingress.options(
        num_replicas=1,  # one job table; it cannot be shared between nodes (docs/serving.md)
        ray_actor_options=ingress_options,
        max_ongoing_requests=settings.max_queue + 64,  # waiting requests hold a slot each: the queue limit says no
        graceful_shutdown_timeout_s=settings.drain_s + 10,
    ).bind(asdict(settings), engine, max_in_flight)


def replica_error() -> str | None:
    """The NTIError an engine replica raised while starting (its node's model folder missing or unreadable, say), from
    Ray Serve's status of the app's deployments; None when none says one."""
    from .distributed import worker_error

    try:
        deployments = serve.status().applications[APP].deployments
    except Exception:  # no status to read: the caller reports Ray's own error
        return None
    for status in deployments.values():
        why = worker_error(status.message)
        if why is not None:
            return why
    return None


def serve_on_ray(settings: ServeSettings, host: str, port: int, address: str, scaling: Scaling,
                 quiet: bool = False) -> int:
    """Start (or join) a Ray cluster, run the app on it, serve until SIGTERM/SIGINT, then drain and stop."""
    from .distributed import check_reachable, model_card, worker_model

    local = address == "local"
    card = model_card(settings.model)  # a missing or broken model folder is refused here, not by replicas failing
    # to start; the replicas run in folders of their own (a cluster's workers where `ray start` ran): they get the
    # folder as an absolute path
    settings.model = worker_model(settings.model)
    if scaling.max_replicas is not None and scaling.min_replicas > scaling.max_replicas:
        raise NTIError(f"--min-replicas {scaling.min_replicas} is over --max-replicas {scaling.max_replicas}")
    if address.startswith("ray://"):
        raise NTIError("nti serve --ray needs to run on a node of the cluster (its job table lives in --data on the "
                       "ingress's node): give the GCS address (HEAD_IP:6379 or auto), not a ray:// client address")
    check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as err:
        raise NTIError(f"could not start or reach the Ray cluster at {address!r}: {err}") from None
    stop = threading.Event()
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        device = settings.device if settings.device != "auto" else ("cuda" if gpus else "cpu")
        if device.startswith("cuda") and not gpus:
            raise NTIError(f"--device {device} but the Ray cluster has no GPUs")
        cuda = device.startswith("cuda")
        settings.device = "cuda" if cuda else device  # each replica sees its own GPU as cuda:0
        settings.data = os.path.abspath(settings.data)
        if scaling.max_replicas is None:
            scaling.max_replicas = max(gpus, scaling.min_replicas) if cuda else scaling.min_replicas
        if cuda and scaling.min_replicas > gpus:
            raise NTIError(f"--min-replicas {scaling.min_replicas} needs as many GPUs; the cluster has {gpus}")
        node_ip = ray.util.get_node_ip_address()
        if not any(n.get("Alive") and n.get("NodeManagerAddress") == node_ip for n in ray.nodes()):
            raise NTIError(f"this machine ({node_ip}) is not a node of the Ray cluster at {address!r}: run nti serve "
                           "--ray on one of its nodes (the job table lives in --data there)")
        try:
            serve.start(http_options={"host": host, "port": port})
        except ray.exceptions.RayError as err:  # the proxy could not bind: the port is taken, or not ours to take
            cause = str(err).strip().splitlines()[-1]
            raise NTIError(f"Ray Serve could not listen on {host}:{port}: {cause}") from None
        start = time.perf_counter()
        try:
            serve.run(build_app(settings, scaling, cuda, node_ip, card.name), name=APP, route_prefix="/")
        except RuntimeError:  # "Deploying application nti failed": say why, when a replica refused its model
            why = replica_error()
            if why is None:
                raise
            serve.delete(APP, _blocking=False)  # off a joined cluster too; no replica of it runs to wait for
            raise NTIError(f"the engine replicas could not start: {why}") from None
        if not quiet:
            print(f"nti serve: http://{host}:{port} on Ray ({'local cluster' if local else address}): "
                  f"{scaling.min_replicas}-{scaling.max_replicas} engine replica(s) on {device}, started in "
                  f"{time.perf_counter() - start:.1f} s; job table in {settings.data}", file=sys.stderr, flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        if not quiet:
            print("nti serve: stopping (draining the ingress)", file=sys.stderr, flush=True)
        serve.delete(APP)  # the ingress's shutdown drains: waiting requests finish, the queue stays on disk
        if local:
            serve.shutdown()
        return 0
    finally:
        ray.shutdown()

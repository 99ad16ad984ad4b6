"""`nti serve --ray`'s ingress worker (serve_ray.RemoteBatcher) without a Ray cluster: the engine deployment's handle
is replaced by one that runs an in-process Engine, so the job-table rules it shares with the single-process worker
(tests/test_serve_audit.py) are checked in seconds instead of a Ray Serve start's ~40 s."""
import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
from PIL import Image

pytest.importorskip("ray")

from nti.serve import APIError, Service  # noqa: E402
from nti.serve_jobs import Engine, ModelCard, ServeSettings  # noqa: E402
from nti.serve_ray import RemoteBatcher  # noqa: E402


class Method:
    """A deployment method as a Ray Serve handle has it: `.remote(*args).result()`."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        return SimpleNamespace(result=lambda: self.fn(*args))


class EngineHandle:
    """The engine deployment, in this process: one task per call, each recorded; `gate` holds calls back."""

    def __init__(self, settings: ServeSettings):
        self.engine = Engine(settings)
        self.engine.load()
        self.sent: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.describe = Method(lambda: ModelCard.of(self.engine.pipe))
        self.run = Method(self._run)

    def _run(self, task):
        self.sent.append(task.job_id)
        self.gate.wait(30)
        return self.engine.run([task])[0]


def ray_service(tmp_path, max_in_flight: int = 2) -> tuple[Service, EngineHandle]:
    settings = ServeSettings(data=str(tmp_path), model="tiny", device="cpu", steps=2, inner_steps=1, max_delay_ms=0)
    handle = EngineHandle(settings)
    return Service(settings, worker=lambda service: RemoteBatcher(service, handle, max_in_flight)), handle


def start_ready(batcher) -> None:
    """Start the worker and wait for its model card (uploads are refused until then)."""
    batcher.start()
    deadline = time.time() + 60
    while batcher.pipe is None and time.time() < deadline:
        time.sleep(0.02)


def upload(service: Service, colour) -> str:
    return service.submit_inversion(Image.new("RGB", (32, 32), colour), "a photo", {})[0].id


def test_a_job_cancelled_between_pick_and_start_is_not_sent(tmp_path):
    """The ingress picks runnable jobs, then marks them running. A job cancelled in between (a DELETE, a request's
    timeout) stays cancelled and is never sent to a replica; the other one of the pick runs."""
    service, handle = ray_service(tmp_path)
    batcher = service.batcher
    real_runnable = batcher.runnable
    cancelled = []

    def runnable():
        picked = real_runnable()
        if picked and not cancelled:
            cancelled.append(service.store.cancel(picked[0][0].id))  # a DELETE lands between the pick and the start
        return picked
    batcher.runnable = runnable
    start_ready(batcher)
    a = upload(service, (200, 10, 10))
    deadline = time.time() + 60
    while not cancelled and time.time() < deadline:
        time.sleep(0.02)
    b = upload(service, (10, 200, 10))
    while service.store.get(b).state != "done" and time.time() < deadline:
        time.sleep(0.02)
    batcher.stop(0)
    assert cancelled == ["cancelled"] and handle.sent == [b]
    assert service.store.get(a).state == "cancelled" and service.store.get(b).state == "done"
    service.store.close()


def test_a_request_waiting_when_the_drain_ends_is_answered_at_once(tmp_path):
    """Shutdown with a job still queued behind a running one (no room to send it): the request waiting on it gets
    the 503 that says its job is kept, as soon as the worker stops, not at its own timeout (or never)."""
    service, handle = ray_service(tmp_path, max_in_flight=1)
    handle.gate.clear()  # the first job stays in its replica call
    batcher = service.batcher
    start_ready(batcher)
    first = upload(service, (1, 2, 3))
    deadline = time.time() + 60
    while handle.sent != [first] and time.time() < deadline:
        time.sleep(0.02)
    second = upload(service, (4, 5, 6))

    async def wait_then_stop():
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(service.wait(service.store.get(second), 30))
        await asyncio.sleep(0.2)
        start = time.time()
        await loop.run_in_executor(None, batcher.stop, 0)
        with pytest.raises(APIError) as answered:
            await waiting
        return answered.value, time.time() - start
    answered, seconds = asyncio.run(wait_then_stop())
    handle.gate.set()
    deadline = time.time() + 60
    while service.store.get(first).state != "done" and time.time() < deadline:  # its call ends, then the table closes
        time.sleep(0.02)
    assert answered.status == 503 and second in answered.message and seconds < 5, (answered.message, seconds)
    assert handle.sent == [first] and service.store.get(second).state == "queued"  # kept for the next start
    service.store.close()

"""`nti serve` audit: what the schema fuzzing of tests/test_serve.py does not reach. Cancelling and deleting jobs
while a request waits on them, a deleted inversion that is still running, results and folders removed under the
server, and OpenAI fields the server cannot honour. One server is shared by the module (loopback, the shapes model,
few steps, a long batch delay so that jobs stay queued for a while); the job-table tests run a Service in-process."""
import asyncio
import base64
import io
import json
import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="nti serve needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

from nti.benchmarks.bench_serve import ServerProcess  # noqa: E402

SOURCE, TARGET = "a yellow triangle on a gray background", "a blue triangle on a gray background"
DELAY_MS = 1500  # the oldest queued job waits this long for its batch to fill: time to act on a queued job
DRAIN_S = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("serve-audit") / "data", "--steps", "4", "--inner-steps", "1",
                        "--device", "cpu", "--batch-size", "4", "--max-delay-ms", str(DELAY_MS), "--drain", str(DRAIN_S))
    srv.start()
    yield srv
    code = srv.stop()
    assert code == 0, f"graceful shutdown exited {code}: {srv.log()[-2000:]}"


def png(colour) -> bytes:
    """A distinct upload per test (no test reuses another's inversion)."""
    out = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(out, format="PNG")
    return out.getvalue()


def client(server):
    return httpx.Client(base_url=server.url, timeout=120)


def invert(c, colour) -> str:
    r = c.post("/v1/inversions", files={"image": ("s.png", png(colour), "image/png")}, data={"source_prompt": SOURCE})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def accepted_edit(server, inversion_id: str, timeout: float = 10.0) -> str:
    """The id of the edit of this inversion that a still-waiting request made (from the server's JSON log)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for line in server.log().splitlines():
            try:  # the CLI's log handler may prefix the JSON with 'nti: '
                event = json.loads(line[line.find("{"):])
            except ValueError:
                continue
            if event.get("event") == "job_accepted" and event.get("inversion") == inversion_id:
                return event["job"]
        time.sleep(0.05)
    raise AssertionError(f"no edit of {inversion_id} was accepted")


def waiting_edit(server, inversion_id: str, answer: dict):
    """POST an edit that waits (timeout_s 10) in a thread; its answer and how long it took land in `answer`."""
    def run():
        start = time.time()
        try:
            with client(server) as c:
                r = c.post(f"/v1/inversions/{inversion_id}/edits", json={"target_prompt": TARGET, "timeout_s": 10})
            answer.update(status=r.status_code, body=r.json(), headers=r.headers)
        except httpx.HTTPError as err:  # e.g. the server closed the connection without an answer
            answer.update(status=repr(err))
        answer.update(seconds=time.time() - start, ended=time.time())
    thread = threading.Thread(target=run)
    thread.start()
    return thread


# --------------------------------------------------------------------------------------------------- cancelling

def test_deleting_an_edit_answers_the_request_waiting_on_it_at_once(server):
    """Before: the waiting request was never woken; it waited out its timeout_s, then got 504 'did not finish'."""
    with client(server) as c:
        inv = invert(c, (210, 30, 30))
        answer = {}
        thread = waiting_edit(server, inv, answer)
        edit_id = accepted_edit(server, inv)
        r = c.delete(f"/v1/edits/{edit_id}")
        assert r.status_code == 200 and r.json()["status"] == "deleted", r.text
        thread.join(30)
    assert answer["status"] == 409, answer
    assert answer["body"]["error"]["code"] == "409" and "deleted" in answer["body"]["error"]["message"], answer
    assert answer["seconds"] < 5, answer


def test_deleting_an_inversion_answers_the_requests_waiting_on_its_edits_at_once(server):
    with client(server) as c:
        inv = invert(c, (30, 210, 30))
        answer = {}
        thread = waiting_edit(server, inv, answer)
        edit_id = accepted_edit(server, inv)
        r = c.delete(f"/v1/inversions/{inv}")
        assert r.status_code == 200 and r.json()["status"] == "deleted", r.text
        thread.join(30)
        assert c.get(f"/v1/edits/{edit_id}").status_code == 404
    assert answer["status"] == 409 and "deleted" in answer["body"]["error"]["message"], answer
    assert answer["seconds"] < 5, answer



def test_deleting_a_running_inversion_answers_the_requests_waiting_on_its_edits_at_once(server):
    """The inversion is running, so DELETE only marks it ('cancelling') and cancels its queued edits. Before: those
    edits' waiting requests were never woken and got 504 'did not finish' at their timeout."""
    with client(server) as c:
        inv = running_inversion(c, (210, 210, 30))
        answer = {}
        thread = waiting_edit(server, inv, answer)
        edit_id = accepted_edit(server, inv)
        assert c.get(f"/v1/inversions/{inv}").json()["status"] == "running"
        r = c.delete(f"/v1/inversions/{inv}")
        assert r.status_code == 200 and r.json()["status"] == "cancelling", r.text
        thread.join(30)
        assert c.get(f"/v1/edits/{edit_id}").json()["status"] == "cancelled"
    assert answer["status"] == 409 and "cancelled" in answer["body"]["error"]["message"], answer
    assert answer["seconds"] < 5, answer



def test_a_body_that_is_not_json_and_an_image_without_a_filename_say_what_to_send(server):
    """Before: 'param': '1', '1: JSON decode error' (a character position taken for a field), and 'image: Value
    error, Expected UploadFile, received: <class 'str'>'."""
    with client(server) as c:
        inv = invert(c, (60, 160, 60))
        r = c.post(f"/v1/inversions/{inv}/edits", content=b"{target_prompt: 1", headers={"content-type":
                                                                                           "application/json"})
        assert r.status_code == 422 and r.json()["error"]["param"] is None, r.text
        assert r.json()["error"]["message"].startswith("the body is not valid JSON (") and "target_prompt" in r.text
        body = (b'--B\r\nContent-Disposition: form-data; name="image"\r\nContent-Type: image/png\r\n\r\n' +
                png((60, 160, 61)) + b'\r\n--B\r\nContent-Disposition: form-data; name="source_prompt"\r\n\r\n' +
                SOURCE.encode() + b"\r\n--B--\r\n")
        r = c.post("/v1/inversions", content=body, headers={"content-type": "multipart/form-data; boundary=B"})
        assert r.status_code == 422 and r.json()["error"]["param"] == "image", r.text
        assert r.json()["error"]["message"] == "image: send it as a file, a multipart part with a filename " \
                                               "(curl -F 'image=@FILE')"
        assert c.delete(f"/v1/inversions/{inv}").json()["status"] == "deleted"


# --------------------------------------------------------------------------------------------------- files removed

def test_an_edit_whose_stored_image_was_removed_is_410_not_500(server):
    """Results fetched twice are the same bytes; once the PNG is removed from the data folder (by hand, a cleanup
    job), every route that serves it says so (410, JSON) instead of 500 'internal error: FileNotFoundError'."""
    with client(server) as c:
        inv = invert(c, (30, 30, 210))
        r = c.post(f"/v1/inversions/{inv}/edits", json={"target_prompt": TARGET})
        assert r.status_code == 200, r.text
        edit = r.json()
        first, second = (c.get(f"/v1/edits/{edit['id']}/image").content for _ in range(2))
        assert first == second == base64.b64decode(edit["b64_json"])
        assert c.get(f"/v1/edits/{edit['id']}").json()["b64_json"] == edit["b64_json"]
        (server_data(server) / "edits" / f"{edit['id']}.png").unlink()
        for path in (f"/v1/edits/{edit['id']}", f"/v1/edits/{edit['id']}/image"):
            r = c.get(path)
            assert r.status_code == 410, (path, r.status_code, r.text)
            assert "no longer stored" in r.json()["error"]["message"] and r.json()["error"]["param"] == "edit_id"
        assert c.delete(f"/v1/edits/{edit['id']}").json()["status"] == "deleted"  # and it can still be deleted
        assert c.delete(f"/v1/inversions/{inv}").json()["status"] == "deleted"


def server_data(server):
    from pathlib import Path
    return Path(server.data)




# --------------------------------------------------------------------------------------------------- OpenAI fields

@pytest.mark.parametrize("field, value", [("output_format", "jpeg"), ("output_format", "webp"), ("stream", "true"),
                                          ("background", "transparent")])
def test_openai_fields_the_server_cannot_honour_are_400_not_ignored(server, field, value):
    """Before: FastAPI dropped form fields the route does not declare, so a request for a JPEG got a PNG, a
    streaming client got one JSON body it cannot parse as events, and a transparent background came back opaque."""
    with client(server) as c:
        r = c.post("/v1/images/edits", files={"image": ("s.png", png((90, 90, 90)), "image/png")},
                   data={"source_prompt": SOURCE, "prompt": TARGET, field: value})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field and value in r.json()["error"]["message"]


def test_an_openai_mask_is_refused_not_ignored(server):
    """An inpainting mask says 'change only here'; ignoring it (before) answered an edit of the whole image."""
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        api.images.edit(image=("s.png", png((90, 30, 90)), "image/png"), mask=("m.png", png((0, 0, 0)), "image/png"),
                        prompt=TARGET, extra_body={"source_prompt": SOURCE})
    assert refused.value.param == "mask" and "mask" in refused.value.message
    # the fields the server does honour, and the defaults of the others, still work from the same client
    ok = api.images.edit(image=("s.png", png((90, 30, 90)), "image/png"), prompt=TARGET, output_format="png",
                         background="auto", quality="auto", size="auto", extra_body={"source_prompt": SOURCE})
    assert Image.open(io.BytesIO(base64.b64decode(ok.data[0].b64_json))).size == (32, 32)


# --------------------------------------------------------------------------------------------------- the job table

@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A Service in this process, its model loaded, its worker not started: the tests move jobs by hand."""
    from nti.serve import Service
    from nti.serve_jobs import ServeSettings

    svc = Service(ServeSettings(data=str(tmp_path_factory.mktemp("service")), model="tiny", device="cpu", steps=2,
                                inner_steps=1, batch_size=4))
    assert svc.batcher._load_model()
    yield svc
    svc.store.close()


def test_an_upload_is_not_reused_by_an_inversion_being_deleted(service):
    """DELETE /v1/inversions/ID of a running inversion marks it, and its batch drops it. Before: the same upload
    posted again meanwhile got that doomed job back (200, reused), and its edits then failed 'inversion cancelled';
    an edit of the doomed inversion was accepted the same way. Now the upload queues a new inversion, and the edit
    is refused (409)."""
    from nti.serve import APIError

    red = Image.new("RGB", (32, 32), (200, 40, 40))
    first, reused, _ = service.submit_inversion(red, "a photo", {})
    assert not reused
    service.store.start([first.id])
    assert service.store.cancel(first.id) == "running"  # what the DELETE route does to a running inversion
    again, reused, _ = service.submit_inversion(red, "a photo", {})
    assert not reused and again.id != first.id and again.state == "queued"
    with pytest.raises(APIError) as refused:
        service.submit_edit(service.store.get(first.id), "a photo", {"edit": "regenerate"})
    assert refused.value.status == 409 and "being deleted" in refused.value.message
    assert [job.id for job in service.store.children(first.id)] == []



def test_a_500_is_counted_in_metrics(service, monkeypatch):
    """/metrics is where an operator sees errors. Before: a request that ended in the JSON 500 (a bug) was not
    counted at all, since the exception passed the metrics middleware on its way to the error handler."""
    from fastapi.testclient import TestClient

    from nti.serve import create_app

    app = create_app(service.settings, service)  # no lifespan: the worker stays stopped, the model is loaded
    job = service.submit_inversion(Image.new("RGB", (32, 32), (10, 200, 200)), "a photo", {})[0]

    def bug(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(service, "inversion_status", bug)
    c = TestClient(app, raise_server_exceptions=False)
    r = c.get(f"/v1/inversions/{job.id}")
    assert r.status_code == 500 and r.json()["error"]["message"] == "internal error: RuntimeError"
    metrics = c.get("/metrics").text
    assert 'nti_http_requests_total{route="/v1/inversions/{inversion_id}",status="500"} 1.0' in metrics, metrics
    assert 'nti_http_request_seconds_count{route="/v1/inversions/{inversion_id}"} 1.0' in metrics



@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the worker's death, on purpose
def test_uploads_are_refused_once_the_worker_has_died(tmp_path):
    """The worker thread died (here: the job table cannot be written, as on a full disk). Before: /readyz said
    'worker stopped' but uploads were still accepted (202) into a queue nothing runs, and a waiting request hung
    until its timeout (then 504). Now both are 503 at once, saying to restart (what was accepted stays queued)."""
    import sqlite3

    from nti.serve import APIError, Service
    from nti.serve_jobs import ServeSettings

    service = Service(ServeSettings(data=str(tmp_path), model="tiny", device="cpu", steps=2, inner_steps=1,
                                    max_delay_ms=0))

    gate = threading.Event()

    def disk_full(ids):
        gate.wait(30)  # once the test waits on an edit
        raise sqlite3.OperationalError("database or disk is full")
    service.store.start = disk_full
    service.batcher.start()
    deadline = time.time() + 60
    while service.batcher.pipe is None and time.time() < deadline:
        time.sleep(0.05)
    first, _, _ = service.submit_inversion(Image.new("RGB", (32, 32), (1, 2, 3)), "a photo", {})
    edit = service.submit_edit(first, "a photo", {"edit": "regenerate"})

    async def wait_on_the_edit():
        asyncio.get_running_loop().call_later(0.5, gate.set)
        start = time.time()
        with pytest.raises(APIError) as waited:
            await service.wait(edit, 10)
        return waited.value, time.time() - start
    waited, seconds = asyncio.run(wait_on_the_edit())
    assert waited.status == 503 and edit.id in waited.message and seconds < 5, (waited.message, seconds)
    service.batcher.thread.join(30)
    assert not service.batcher.alive
    with pytest.raises(APIError) as refused:
        service.submit_inversion(Image.new("RGB", (32, 32), (4, 5, 6)), "a photo", {})
    assert refused.value.status == 503 and "restart" in refused.value.message
    assert service.store.get(first.id).state == "queued"  # kept for the next start
    service.store.close()



def test_a_job_cancelled_between_pick_and_start_does_not_run(tmp_path):
    """The worker picks a batch, then marks it running. Before: a job cancelled in between (a DELETE, a request's
    timeout) was set running anyway, ran, and ended 'done' after its client was told it was cancelled."""
    from nti.serve_jobs import Batcher, BatchPolicy, Job, JobStore, new_id

    store = JobStore(tmp_path)
    a, b = (store.add(Job(id=new_id(), kind="invert", state="queued",
                          request={"source_prompt": "a photo", "settings": {}})) for _ in range(2))
    ran = []

    def run_batch(pipe, jobs):
        ran.append([job.id for job in jobs])
        store.finish({job.id: {} for job in jobs})
    batcher = Batcher(store, BatchPolicy(4, 0.0), lambda: object(), run_batch)
    real_pick = batcher.pick

    def pick():
        jobs, wait = real_pick()
        if jobs:
            assert store.cancel(a.id) == "cancelled"  # the DELETE lands between the pick and the start
        return jobs, wait
    batcher.pick = pick
    batcher.start()
    deadline = time.time() + 10
    while not ran and time.time() < deadline:
        time.sleep(0.01)
    batcher.stop(0)
    assert ran == [[b.id]]
    assert store.get(a.id).state == "cancelled" and store.get(b.id).state == "done"
    store.close()


# Last in the file: they remove the module server's artifact folders, then stop and restart it.

def test_artifact_folders_removed_under_the_server_are_made_again(server):
    """Before: every upload was 500 (the source could not be written) and every batch failed with 'internal error:
    FileNotFoundError' naming the server's path, for good, while /readyz said ready."""
    for sub in ("sources", "inversions", "edits", "tmp"):
        shutil.rmtree(server_data(server) / sub)
    with client(server) as c:
        r = c.post("/v1/images/edits", files={"image": ("s.png", png((120, 60, 200)), "image/png")},
                   data={"source_prompt": SOURCE, "prompt": TARGET})
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).size == (32, 32)
        edit_id = r.json()["nti"]["edit_id"]
        assert c.get(f"/v1/edits/{edit_id}/image").content == base64.b64decode(r.json()["data"][0]["b64_json"])



def running_inversion(c, colour) -> str:
    """An inversion long enough (60 steps x 20 iterations) to act while it runs; returned once it is running."""
    r = c.post("/v1/inversions", files={"image": ("s.png", png(colour), "image/png")},
               data={"source_prompt": SOURCE, "steps": "60", "inner_steps": "20"})
    assert r.status_code == 202, r.text
    deadline = time.time() + 30
    while c.get(f"/v1/inversions/{r.json()['id']}").json()["status"] == "queued" and time.time() < deadline:
        time.sleep(0.05)
    return r.json()["id"]


def test_sigterm_answers_a_request_still_waiting_after_the_drain_with_503_and_its_job_id(server):
    """SIGTERM lets waiting requests finish for --drain seconds. Before: one whose job was still running then was cut
    off with no answer at all ('Server disconnected without sending a response'), so an OpenAI-route client never
    learned its edit's id. Now it gets 503 + Retry-After naming the edit, which runs after the restart."""
    with client(server) as c:
        inv = running_inversion(c, (15, 90, 160))
        answer = {}
        thread = waiting_edit(server, inv, answer)
        edit_id = accepted_edit(server, inv)
        assert c.get(f"/v1/inversions/{inv}").json()["status"] == "running"
    term = time.time()
    server.proc.terminate()
    thread.join(60)
    assert answer["status"] == 503, answer
    assert edit_id in answer["body"]["error"]["message"] and int(answer["headers"]["retry-after"]) >= 1, answer
    assert answer["ended"] - term < DRAIN_S + 1.5, answer
    server.proc.wait(120)
    server.log_file.close()
    server.restart()  # the fixture stops it
    with client(server) as c:
        deadline = time.time() + 120
        while (state := c.get(f"/v1/edits/{edit_id}").json()["status"]) in ("queued", "running"):
            assert time.time() < deadline
            time.sleep(0.1)
        assert state == "done"
        assert Image.open(io.BytesIO(c.get(f"/v1/edits/{edit_id}/image").content)).size == (32, 32)

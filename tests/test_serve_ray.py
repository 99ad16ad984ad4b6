"""`nti serve --ray`: the same API as `nti serve`, on a local Ray cluster the server starts (2 CPUs, loopback) and
stops when the module ends. Every answer is compared with the single-process server's (the same app in this process)
for the same requests: the same PNG bytes, the same error JSON."""
import base64
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="nti serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("ray.serve", reason="nti serve --ray needs Ray Serve: pip install -e '.[ray]'")
httpx = pytest.importorskip("httpx")

from nti.benchmarks.bench_serve import free_port, metric_values  # noqa: E402

TOKEN = "test-token-20"
SETTINGS = {"steps": 4, "inner_steps": 1, "device": "cpu", "batch_size": 4, "max_delay_ms": 300.0}
FLAGS = ["--steps", "4", "--inner-steps", "1", "--device", "cpu", "--batch-size", "4", "--max-delay-ms", "300"]
SCENES = os.path.join(os.path.dirname(__file__), "..", "engine", "assets", "scenes")
SOURCE, TARGET = "a yellow triangle on a gray background", "a blue triangle on a gray background"


def scene_png(name: str) -> bytes:
    with open(os.path.join(SCENES, f"{name}.png"), "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    """`nti serve --ray` in its own session: it starts a local Ray cluster, serves, and on SIGTERM drains, deletes the
    app and stops the cluster."""
    folder = tmp_path_factory.mktemp("serve-ray")
    port = free_port()
    # Ray starts workers at nice 15: on a busy shared machine the replicas would crawl behind everything else
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_worker_niceness": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(folder / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "nti.cli", "serve", "--ray", "--port", str(port), "--data",
                             str(folder / "data"), "--token", TOKEN, *FLAGS], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (folder / "serve.log").read_text()[-3000:]
            assert time.time() < deadline, "not ready in 240 s: " + (folder / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield url
        proc.send_signal(signal.SIGTERM)  # the server alone: it stops its cluster itself
        assert proc.wait(120) == 0, (folder / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:  # a failed start or a hung stop: everything this test started, by its group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process server: the same app, settings and token, in this process (one torch thread, as each CPU
    replica gets)."""
    import torch
    from fastapi.testclient import TestClient

    from nti.serve import ServeSettings, create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    settings = ServeSettings(data=str(tmp_path_factory.mktemp("serve-single") / "data"), token=TOKEN, **SETTINGS)
    try:
        with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            deadline = time.time() + 120
            while client.get("/readyz").status_code != 200:
                assert time.time() < deadline
                time.sleep(0.1)
            yield client
    finally:
        torch.set_num_threads(threads)


def ray_client(url):
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)


def test_openai_client_edit_is_the_single_process_servers_bytes(ray_server, single):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=ray_server + "/v1", api_key=TOKEN, max_retries=0)
    result = api.images.edit(image=("scene0.png", scene_png("scene0"), "image/png"), prompt=TARGET,
                             extra_body={"source_prompt": SOURCE})
    local = single.post("/v1/images/edits", files={"image": ("scene0.png", scene_png("scene0"), "image/png")},
                        data={"prompt": TARGET, "source_prompt": SOURCE})
    assert local.status_code == 200, local.text
    assert base64.b64decode(result.data[0].b64_json) == base64.b64decode(local.json()["data"][0]["b64_json"])
    assert result.data[0].b64_json[:8] == "iVBORw0K"  # a PNG
    with pytest.raises(openai.AuthenticationError):  # the token is checked behind Ray Serve's proxy too
        openai.OpenAI(base_url=ray_server + "/v1", api_key="wrong", max_retries=0).images.edit(
            image=("scene0.png", scene_png("scene0"), "image/png"), prompt=TARGET,
            extra_body={"source_prompt": SOURCE})


def test_invert_once_edit_many_gives_the_single_process_servers_bytes(ray_server, single):
    source = "a red square and a red triangle on a black background"
    edits = [{"target_prompt": "a red circle and a red triangle on a black background"},
             {"target_prompt": "a red square and a blue triangle on a black background", "edit": "p2p-replace",
              "response_format": "png"}]
    answers = {}
    with ray_client(ray_server) as remote:
        for name, client in (("ray", remote), ("single", single)):
            inv = client.post("/v1/inversions", files={"image": ("s.png", scene_png("scene1"), "image/png")},
                              data={"source_prompt": source})
            assert inv.status_code == 202, inv.text
            inv_id = inv.json()["id"]
            pngs = []
            for body in edits:
                r = client.post(f"/v1/inversions/{inv_id}/edits", json=body)
                assert r.status_code == 200, r.text
                pngs.append(r.content if body.get("response_format") == "png"
                            else base64.b64decode(r.json()["b64_json"]))
                if body.get("response_format") != "png":
                    assert r.json()["status"] == "done" and r.json()["inversion_id"] == inv_id
            status = client.get(f"/v1/inversions/{inv_id}").json()
            assert status["status"] == "done" and status["edits"] == 2
            stored = client.get(f"/v1/inversions/{inv_id}/source")
            again = client.post("/v1/inversions", files={"image": ("s.png", scene_png("scene1"), "image/png")},
                                data={"source_prompt": source})
            assert again.status_code == 200 and again.json()["id"] == inv_id and again.json()["reused"] is True
            answers[name] = (pngs, stored.content, status["key"])
            third = client.post(f"/v1/inversions/{inv_id}/edits", json=edits[0]).json()
            assert third["timings"]["inversion_reused"] is True and third["timings"]["invert_s"] == 0.0
    assert answers["ray"] == answers["single"]  # both edits, the stored source and the inversion's key
    assert answers["ray"][0][0] != answers["ray"][0][1]  # two different edits, not one image twice


def test_errors_are_the_single_process_servers_json(ray_server, single):
    image = {"image": ("s.png", scene_png("scene0"), "image/png")}
    cases = [("post", "/v1/inversions", {"files": image, "data": {"source_prompt": "a yellow giraffe"}}),
             ("post", "/v1/inversions", {"files": image, "data": {}}),
             ("post", "/v1/inversions", {"files": image, "data": {"source_prompt": SOURCE, "steps": "0"}}),
             ("post", "/v1/images/edits", {"files": {"image": ("x.png", b"<html>", "image/png")},
                                           "data": {"source_prompt": SOURCE, "prompt": TARGET}}),
             ("get", "/v1/inversions/" + "0" * 32, {}),
             ("get", "/v1/edits/xyz", {})]
    with ray_client(ray_server) as remote:
        for method, path, kw in cases:
            r, s = getattr(remote, method)(path, **kw), getattr(single, method)(path, **kw)
            assert 400 <= r.status_code < 500 and (r.status_code, r.json()) == (s.status_code, s.json()), path
        r = httpx.get(ray_server + "/metrics", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["param"] == "authorization"


def test_concurrent_jobs_form_ray_serve_batches(ray_server):
    """Four inversions at once reach the replica as one @serve.batch call (batch size 4, 300 ms wait)."""
    from nti.benchmarks.bench_serve import scene_jobs

    jobs = scene_jobs(4, seed=5)
    answers = [None] * len(jobs)

    def invert(k):
        with ray_client(ray_server) as c:
            answers[k] = c.post("/v1/inversions", files={"image": ("s.png", jobs[k]["png"], "image/png")},
                                data={"source_prompt": jobs[k]["source_prompt"]}).json()

    threads = [threading.Thread(target=invert, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with ray_client(ray_server) as c:
        for answer in answers:
            deadline = time.time() + 120
            while (state := c.get(f"/v1/inversions/{answer['id']}").json())["status"] in ("queued", "running"):
                assert time.time() < deadline
                time.sleep(0.1)
            assert state["status"] == "done"
        sizes = [state["timings"]["batch_size"] for state in
                 (c.get(f"/v1/inversions/{a['id']}").json() for a in answers)]
        metrics = c.get("/metrics").text
    assert max(sizes) > 1, sizes
    # each replica batch is counted once in the ingress's metrics, though each of its jobs came back on its own
    done = metric_values(metrics, "nti_jobs")['{kind="invert",state="done"}']
    assert metric_values(metrics, "nti_batch_size_sum")['{kind="invert"}'] == done
    assert metric_values(metrics, "nti_batch_size_count")['{kind="invert"}'] < done

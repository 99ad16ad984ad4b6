"""`nti serve` end to end: the real server (uvicorn in a subprocess on a free loopback port), the shapes model, few
steps. One server is shared by the module; the crash test runs its own."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
import struct

import pytest

pytest.importorskip("fastapi", reason="nti serve needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

from nti.benchmarks.bench_serve import ServerProcess, load_test, scene_jobs  # noqa: E402

TOKEN = "test-token-19"
FAST = ("--steps", "4", "--inner-steps", "1", "--device", "cpu", "--batch-size", "4", "--max-delay-ms", "150")
SOURCE, TARGET = "a yellow triangle on a gray background", "a blue triangle on a gray background"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("serve") / "data", *FAST, "--max-queue", "40",
                        "--max-upload-bytes", "300000", "--max-pixels", "1000000", "--max-prompt-chars", "200",
                        token=TOKEN)
    srv.start()
    yield srv
    code = srv.stop()
    assert code == 0, f"graceful shutdown exited {code}: {srv.log()[-2000:]}"


def scene_png(name: str) -> bytes:
    with open(os.path.join(os.path.dirname(__file__), "..", "engine", "assets", "scenes", f"{name}.png"), "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def scene0():
    return scene_png("scene0")


def png_of(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return img


def client(server, **kw):
    return httpx.Client(base_url=server.url, headers=server.headers(), timeout=300, **kw)


# --------------------------------------------------------------------------------------------------- the happy paths

def test_openai_client_edits_through_nti(server, scene0):
    openai = pytest.importorskip("openai")
    api = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0)
    result = api.images.edit(image=("scene0.png", scene0, "image/png"), prompt=TARGET,
                             extra_body={"source_prompt": SOURCE})
    img = png_of(result.data[0].b64_json)
    assert img.size == (32, 32)
    assert result.created > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).images.edit(
            image=("scene0.png", scene0, "image/png"), prompt=TARGET, extra_body={"source_prompt": SOURCE})


def test_native_flow_inverts_once_and_serves_three_edits(server, scene1_png):
    with client(server) as c:
        r = c.post("/v1/inversions", files={"image": ("s.png", scene1_png, "image/png")},
                   data={"source_prompt": "a red square and a red triangle on a black background"})
        assert r.status_code == 202, r.text
        inv = r.json()
        assert inv["status"] in ("queued", "running") and len(inv["id"]) == 32
        targets = ["an orange square and a red triangle on a black background",
                   "a red circle and a red triangle on a black background",
                   "a red square and a blue triangle on a black background"]
        edits = []
        for target in targets:
            r = c.post(f"/v1/inversions/{inv['id']}/edits", json={"target_prompt": target})
            assert r.status_code == 200, r.text
            edits.append(r.json())
        for e, target in zip(edits, targets):
            assert e["status"] == "done" and e["target_prompt"] == target and e["inversion_id"] == inv["id"]
            assert png_of(e["b64_json"]).size == (32, 32)
        # the later edits found the inversion stored before they arrived: no inversion ran for them
        for e in edits[1:]:
            assert e["timings"]["inversion_reused"] is True and e["timings"]["invert_s"] == 0.0
        status = c.get(f"/v1/inversions/{inv['id']}").json()
        assert status["status"] == "done" and status["edits"] == 3 and status["progress"]["fraction"] == 1.0
        assert inv["warnings"] == [] and status["warnings"] == []  # a square image loses nothing
        # the same pixels, prompt and settings again: the stored inversion, nothing queued
        again = c.post("/v1/inversions", files={"image": ("s.png", scene1_png, "image/png")},
                       data={"source_prompt": "a red square and a red triangle on a black background"})
        assert again.status_code == 200 and again.json()["id"] == inv["id"] and again.json()["reused"] is True
        # a PNG answer, and the edit's own routes
        png = c.post(f"/v1/inversions/{inv['id']}/edits", json={"target_prompt": targets[0],
                                                                 "response_format": "png"})
        assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).size == (32, 32)
        edit_id = png.headers["x-nti-edit-id"]
        assert c.get(f"/v1/edits/{edit_id}").json()["status"] == "done"
        assert c.get(f"/v1/edits/{edit_id}/image").content == png.content
        metrics = c.get("/metrics").text
        assert "nti_batch_size_bucket" in metrics and "nti_queue_depth" in metrics and 'nti_jobs{kind="edit"' in metrics
        # delete: gone, and its edits with it
        assert c.delete(f"/v1/inversions/{inv['id']}").json()["deleted"] is True
        assert c.get(f"/v1/inversions/{inv['id']}").status_code == 404
        assert c.get(f"/v1/edits/{edit_id}").status_code == 404


def test_p2p_word_settings_over_http(server, scene1_png):
    """Reweighting, local blend and per-word cross-replace windows (what the CLI's --reweight, --blend-word and
    --cross-replace-word give) are fields of the edit request: each changes the edit, is echoed in its settings, and
    a word that fits no prompt, a fraction outside [0, 1] or a word setting on a plain regenerate is a 400 naming
    the field."""
    # a prompt of its own: the other tests' uploads of scene 1 must not find this inversion stored
    source = "a red square and a red triangle on a white background"
    target = "a red square and a blue triangle on a white background"
    with client(server) as c:
        inv = c.post("/v1/inversions", files={"image": ("s.png", scene1_png, "image/png")},
                     data={"source_prompt": source}).json()
        url = f"/v1/inversions/{inv['id']}/edits"
        plain = c.post(url, json={"target_prompt": target, "edit": "p2p-refine"})
        words = {"reweight": {"blue": 2.0}, "blend_words": ["triangle"], "cross_replace_words": {"square": 0.2}}
        worded = c.post(url, json={"target_prompt": target, "edit": "p2p-reweight", **words})
        assert plain.status_code == 200 and worded.status_code == 200, worded.text
        assert worded.json()["settings"] == {"edit": "p2p-reweight", "cross_replace": 0.8, "self_replace": 0.5,
                                             **words}
        assert worded.json()["b64_json"] != plain.json()["b64_json"]
        for body, param in (({"edit": "p2p-reweight"}, "edit"),  # no words to reweight
                            ({"edit": "regenerate", "reweight": {"triangle": 2.0}}, "reweight"),
                            ({"edit": "p2p-refine", "blend_words": ["circle"]}, "blend_words"),
                            ({"edit": "p2p-refine", "reweight": {"green": 2.0}}, "reweight"),
                            ({"edit": "p2p-replace", "target_prompt": "a red square on a black background"},
                             "target_prompt"),
                            ({"edit": "p2p-refine", "cross_replace_words": {"triangle": 1.5}}, "cross_replace_words"),
                            ({"edit": "p2p-refine", "reweight": {"big triangle": 2.0}}, "reweight")):
            r = c.post(url, json={"target_prompt": target, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        assert c.delete(f"/v1/inversions/{inv['id']}").json()["deleted"] is True


@pytest.fixture(scope="module")
def scene1_png():
    return scene_png("scene1")


def test_a_wide_upload_is_served_with_the_crop_warning(server, scene1_png):
    """As the CLI's: the model sees only the centre square of a 3:1 image; the job runs, the answers say so."""
    wide = Image.new("RGB", (96, 32), (128, 128, 128))
    wide.paste(Image.open(io.BytesIO(scene1_png)).convert("RGB"), (32, 0))
    buf = io.BytesIO()
    wide.save(buf, format="PNG")
    with client(server) as c:
        r = c.post("/v1/images/edits", files={"image": ("wide.png", buf.getvalue(), "image/png")},
                   data={"prompt": "a red square and a blue triangle on a black background",
                         "source_prompt": "a red square and a red triangle on a black background"})
        assert r.status_code == 200, r.text
        nti = r.json()["nti"]
        [message] = nti["warnings"]
        assert "96x32" in message and "centre 32x32 square (33% of the image)" in message
        status = c.get(f"/v1/inversions/{nti['inversion_id']}").json()
        assert status["warnings"] == [message]
        # the same centre square sent alone: the stored inversion is reused, and this upload loses nothing
        again = c.post("/v1/inversions", files={"image": ("s.png", scene1_png, "image/png")},
                       data={"source_prompt": "a red square and a red triangle on a black background"}).json()
        assert again["id"] == nti["inversion_id"] and again["reused"] is True and again["warnings"] == []
        assert c.delete(f"/v1/inversions/{nti['inversion_id']}").json()["deleted"] is True


def test_a_diverged_job_fails_alone_and_stores_nothing(tmp_path, monkeypatch):
    """As the CLI: an inversion or edit that is not finite is that job's error (never a stored artifact or a black
    PNG), and its batch mate still gets its result."""
    import nti
    import nti.api
    from nti.serve_jobs import Engine, ServeSettings, Task

    engine = Engine(ServeSettings(data=str(tmp_path), model="tiny", device="cpu", steps=2, inner_steps=1))
    engine.load()
    images = [Image.new("RGB", (32, 32), colour) for colour in ((200, 40, 40), (40, 40, 200))]
    tasks = [Task(f"job{k}", "invert", "a photo", {}, image=img) for k, img in enumerate(images)]
    real_invert, real_edit = nti.invert, nti.api.edit_latents

    def invert_second_diverges(*args, **kwargs):
        invs = real_invert(*args, **kwargs)
        invs[1].null_embeddings[0, 0, 0] = float("nan")
        return invs
    monkeypatch.setattr(nti, "invert", invert_second_diverges)
    good, bad = engine.run(tasks)
    assert bad.error.startswith("the inversion diverged (null_embeddings holds non-finite values") and not bad.data
    assert good.error is None and good.data
    (tmp_path / "inv.safetensors").write_bytes(good.data)
    inversion = nti.load_inversion(tmp_path / "inv.safetensors")  # checked: finite, consistent

    def edit_second_diverges(*args, **kwargs):
        latents = real_edit(*args, **kwargs)
        latents[1] = float("inf")
        return latents
    monkeypatch.setattr(nti.api, "edit_latents", edit_second_diverges)
    edits = [Task(f"edit{k}", "edit", "a photo", {}, inversion=inversion) for k in range(2)]
    good, bad = engine.run(edits)
    assert bad.error.startswith("the edit: the result is not finite") and "lower guidance" in bad.error
    assert not bad.data and good.error is None and png_of(base64.b64encode(good.data)).size == (32, 32)


def test_a_damaged_stored_inversion_fails_its_edit_alone_and_is_inverted_anew(tmp_path):
    """A stored inversion that no longer reads (a damaged disk, a file cut short) fails its own edits with a message
    that says what to do, its batch mate still gets its image, and the same upload then inverts anew instead of
    reusing the damaged file; no server path leaks into the message."""
    from nti.serve import Service
    from nti.serve_jobs import ServeSettings

    service = Service(ServeSettings(data=str(tmp_path), model="tiny", device="cpu", steps=2, inner_steps=1,
                                    batch_size=4))
    assert service.batcher._load_model()
    pipe = service.batcher.pipe

    def run(jobs):
        service.store.start([job.id for job in jobs])
        service._run_batch(pipe, jobs)
        return [service.store.get(job.id) for job in jobs]
    red, blue = (Image.new("RGB", (32, 32), colour) for colour in ((200, 40, 40), (40, 40, 200)))
    inversions = [service.submit_inversion(img, "a photo", {})[0] for img in (red, blue)]
    assert [job.state for job in run(inversions)] == ["done", "done"]
    stored = service.store.path("inversions", inversions[0].id)
    stored.write_bytes(stored.read_bytes()[:100])  # cut short
    edits = [service.submit_edit(service.store.get(inv.id), "a photo", {"edit": "regenerate"}) for inv in inversions]
    damaged, good = run(edits)
    assert damaged.state == "failed" and "could not be read" in damaged.error, damaged.error
    assert "post the image again" in damaged.error and str(tmp_path) not in damaged.error
    assert good.state == "done" and service.store.path("edits", good.id).stat().st_size > 0
    assert service.store.get(inversions[0].id).state == "failed"  # new edits of it: 409, not the same error again
    again, reused, _ = service.submit_inversion(red, "a photo", {})
    assert not reused and again.id != inversions[0].id and run([again])[0].state == "done"
    # DELETE /v1/inversions/ID while an edit of it was already running (the route removes the row, then the files):
    # that edit alone fails, saying so
    blue_edit = service.submit_edit(service.store.get(inversions[1].id), "a photo", {"edit": "regenerate"})
    again_edit = service.submit_edit(service.store.get(again.id), "a photo", {"edit": "regenerate"})
    service.store.start([blue_edit.id, again_edit.id])
    assert service.store.cancel(blue_edit.id) == "running"  # what the route does to a running edit of it
    service.store.delete(inversions[1].id)
    service._run_batch(pipe, [service.store.get(job.id) for job in (blue_edit, again_edit)])
    gone = service.store.get(blue_edit.id)
    assert gone.state == "cancelled" and gone.error == f"inversion {inversions[1].id} was deleted before this edit ran"
    assert service.store.get(again_edit.id).state == "done"
    green = service.submit_inversion(Image.new("RGB", (32, 32), (40, 200, 40)), "a photo", {})[0]
    service.store.path("sources", green.id).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # the upload, damaged
    failed = run([green])[0]
    assert failed.state == "failed" and failed.error.startswith("the stored upload is damaged")
    assert str(tmp_path) not in failed.error


def test_concurrent_edits_form_batches(server):
    """A small load test: 8 concurrent OpenAI-route edits at batch size 4 form batches larger than one."""
    jobs = scene_jobs(8, seed=3)
    out = load_test(server, jobs)
    assert out["requests"] == 8
    sizes = [int(k) for k in out["batches_invert"]] + [int(k) for k in out["batches_edit"]]
    assert max(sizes) > 1, out
    assert max(int(k) for k in out["edits_by_batch_size"]) > 1, out


# --------------------------------------------------------------------------------------------------- bad inputs

def _bomb_png(side: int = 20000) -> bytes:
    """A valid PNG header claiming side x side pixels, with a tiny compressed body: a decompression bomb."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = zlib.compress(b"\x00" * (side // 8 + 1) * 64, 9)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


BAD_UPLOADS = {
    "truncated": (lambda png: png[:len(png) // 2], 400),
    "empty": (lambda png: b"", 400),
    "html-as-png": (lambda png: b"<!doctype html><html><body>not an image</body></html>", 400),
    "oversized": (lambda png: png + b"\0" * 400000, 413),
    "bomb": (lambda png: _bomb_png(), 413),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_4xx_json_naming_the_field(server, scene0, case):
    make, status = BAD_UPLOADS[case]
    with client(server) as c:
        for route, data in (("/v1/inversions", {"source_prompt": SOURCE}),
                            ("/v1/images/edits", {"source_prompt": SOURCE, "prompt": TARGET})):
            r = c.post(route, files={"image": ("x.png", make(scene0), "image/png")}, data=data)
            assert r.status_code == status, (route, r.status_code, r.text)
            err = r.json()["error"]
            assert err["param"] == "image" and err["message"], err


def test_bad_fields_are_4xx_json_naming_the_field(server, scene0):
    image = {"image": ("s.png", scene0, "image/png")}
    cases = [  # (route, form data, expected status, expected param)
        ("/v1/inversions", {"source_prompt": "a yellow giraffe on a gray background"}, 400, "source_prompt"),
        ("/v1/inversions", {"source_prompt": "a " * 150}, 400, "source_prompt"),
        ("/v1/inversions", {}, 422, "source_prompt"),
        ("/v1/inversions", {"source_prompt": SOURCE, "steps": "0"}, 400, "steps"),
        ("/v1/inversions", {"source_prompt": SOURCE, "steps": "many"}, 422, "steps"),
        ("/v1/inversions", {"source_prompt": SOURCE, "method": "magic"}, 422, "method"),
        ("/v1/images/edits", {"source_prompt": SOURCE}, 422, "prompt"),
        ("/v1/images/edits", {"source_prompt": SOURCE, "prompt": "a yellow unicorn on a gray background"}, 400,
         "prompt"),
        ("/v1/images/edits", {"source_prompt": SOURCE, "prompt": "\u200b "}, 400, "prompt"),  # invisible = empty
        ("/v1/images/edits", {"source_prompt": SOURCE, "prompt": TARGET, "n": "2"}, 400, "n"),
        ("/v1/images/edits", {"source_prompt": SOURCE, "prompt": TARGET, "size": "1024x1024"}, 400, "size"),
    ]
    with client(server) as c:
        for route, data, status, param in cases:
            r = c.post(route, files=image, data=data)
            assert r.status_code == status, (route, data, r.text)
            assert r.json()["error"]["param"] == param, (route, data, r.json())
        r = c.post("/v1/inversions", data={"source_prompt": SOURCE})  # no image at all
        assert r.status_code == 422 and r.json()["error"]["param"] == "image"
        inv = c.post("/v1/inversions", files=image, data={"source_prompt": SOURCE}).json()
        for body, param in (({}, "target_prompt"), ({"target_prompt": "a pink dragon"}, "target_prompt"),
                            ({"target_prompt": TARGET, "colour": "red"}, "colour"),
                            ({"target_prompt": "a yellow triangle and a blue circle on a gray background",
                              "edit": "p2p-replace"}, "target_prompt")):
            r = c.post(f"/v1/inversions/{inv['id']}/edits", json=body)
            assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param, (body, r.text)
        for path in ("/v1/inversions/../../etc/passwd", "/v1/inversions/" + "0" * 32, "/v1/edits/xyz"):
            r = c.get(path)
            assert r.status_code in (404, 422) and "error" in r.json(), (path, r.text)


def test_token_is_required_on_every_route_but_health(server):
    for path in ("/metrics", "/v1/inversions/" + "0" * 32, "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = httpx.get(server.url + path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["param"] == "authorization", (path, headers, r.text)
    r = httpx.post(server.url + "/v1/images/edits", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").json()["ready"] is True


def test_full_queue_is_429_with_retry_after_and_jobs_cancel(server, scene0):
    with client(server) as c:
        inv = c.post("/v1/inversions", files={"image": ("s.png", scene0, "image/png")},
                     data={"source_prompt": SOURCE}).json()
        accepted = []
        for _ in range(60):
            r = c.post(f"/v1/inversions/{inv['id']}/edits", json={"target_prompt": TARGET, "wait": False})
            if r.status_code == 429:
                break
            assert r.status_code == 202, r.text
            accepted.append(r.json()["id"])
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and r.json()["error"]["message"]
        for edit_id in accepted:  # cancellation: queued ones go at once
            assert c.delete(f"/v1/edits/{edit_id}").json()["status"] in ("deleted", "cancelling")
        # a request that waits past its timeout: 504, and its job is cancelled rather than left to run unseen
        r = c.post(f"/v1/inversions/{inv['id']}/edits", json={"target_prompt": TARGET, "timeout_s": 0.001})
        assert r.status_code == 504 and r.json()["error"]["param"] == "timeout_s", r.text


# --------------------------------------------------------------------------------------------------- schema, page

def test_schemathesis_finds_no_5xx_and_no_schema_violation(server, tmp_path):
    st = shutil.which("st", path=os.path.dirname(sys.executable)) or shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    with client(server) as c:  # a real id for the {inversion_id} routes, else they only ever see 404
        inv = c.post("/v1/inversions", files={"image": ("s.png", scene_png("scene2"), "image/png")},
                     data={"source_prompt": "a red triangle on a white background"}).json()
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\n"path.inversion_id" = "{inv["id"]}"\n')
    cmd = [st, "--config-file", str(config), "run", server.url + "/openapi.json",
           "-H", f"Authorization: Bearer {TOKEN}",
           "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,"
           "content_type_conformance", "--max-examples", "6", "--phases", "examples,coverage,fuzzing",
           "--seed", "19", "--no-shrink", "--workers", "1", "--request-timeout", "60",
           "--exclude-path", "/metrics", "--suppress-health-check", "all"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


CHROMIUM = "/usr/bin/chromium"


def test_page_makes_an_edit_in_headless_chromium(server, scene0, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install -y chromium); the page test needs a real browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the driver) is not installed")
    image = tmp_path / "scene0.png"
    image.write_bytes(scene0)
    with sync_api.sync_playwright() as p:
        # an empty profile folder of its own (playwright passes it as --user-data-dir)
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.set_input_files("#image", str(image))
            page.fill("#source", SOURCE)
            page.fill("#token", TOKEN)
            page.click("#invert")
            page.wait_for_selector("#edit-button:not([disabled])", timeout=120_000)
            page.fill("#target", TARGET)
            page.click("#edit-button")
            # selectors, not wait_for_function: the page's Content-Security-Policy forbids the eval that needs
            page.wait_for_selector("#result-image[src^='data:image/png;base64,']", timeout=120_000)
            assert page.eval_on_selector("#result-image", "img => img.src").startswith("data:image/png;base64,")
            assert page.eval_on_selector("#source-image", "img => img.naturalWidth") == 32
            first = page.eval_on_selector("#result-image", "img => img.src")
            page.fill("#target", "a yellow circle on a gray background")  # re-edit the same inversion
            page.click("#edit-button")
            page.wait_for_selector(f"#result-image:not([src={json.dumps(first)}])", timeout=120_000)
            assert "inversion reused: true" in page.text_content("#status")
        finally:
            browser.close()


# --------------------------------------------------------------------------------------------------- durability
# Last in the file: it kills the module's server and leaves the restarted one for the fixture to stop.

def test_kill_9_during_a_batch_then_restart_finishes_every_accepted_job(server, shapes_pipe):
    """Acknowledged jobs survive kill -9 in the middle of a batch, and their outputs equal an undisturbed run's."""
    import nti

    jobs = scene_jobs(6, seed=11)
    ids = []
    with client(server) as c:
        for job in jobs:
            inv = c.post("/v1/inversions", files={"image": ("s.png", job["png"], "image/png")},
                         data={"source_prompt": job["source_prompt"]})
            assert inv.status_code == 202, inv.text
            edit = c.post(f"/v1/inversions/{inv.json()['id']}/edits",
                          json={"target_prompt": job["target_prompt"], "wait": False})
            assert edit.status_code == 202, edit.text
            ids.append((inv.json()["id"], edit.json()["id"]))
        deadline = time.time() + 60
        while c.get(f"/v1/inversions/{ids[0][0]}").json()["status"] != "running" and time.time() < deadline:
            time.sleep(0.02)
        assert c.get(f"/v1/inversions/{ids[0][0]}").json()["status"] == "running"
    server.kill()

    server.restart()
    crashed_pngs = []
    with client(server) as c:
        for _, edit_id in ids:
            deadline = time.time() + 120
            while (state := c.get(f"/v1/edits/{edit_id}").json()["status"]) in ("queued", "running"):
                assert time.time() < deadline
                time.sleep(0.1)
            assert state == "done"
            crashed_pngs.append(c.get(f"/v1/edits/{edit_id}/image").content)
    assert '"requeued_after_restart"' in server.log()

    # the undisturbed run: the same jobs through the public API in this process, in the batches the worker forms
    # from a full queue (inversions 4 + 2, then edits 4 + 2), at the server's settings
    config = nti.NTIConfig(backend="fast", batch_size=4, precision="fp32", steps=4, inner_steps=1)
    images = [Image.open(io.BytesIO(j["png"])).convert("RGB") for j in jobs]
    expected = []
    for part in (slice(0, 4), slice(4, 6)):
        invs = nti.invert(shapes_pipe, images[part], [j["source_prompt"] for j in jobs[part]], config,
                             progress=False)
        for img in nti.edit(shapes_pipe, invs, [j["target_prompt"] for j in jobs[part]], config, progress=False):
            out = io.BytesIO()
            img.save(out, format="PNG")
            expected.append(out.getvalue())
    assert crashed_pngs == expected

"""`nti serve`'s page (engine/assets/serve/index.html) as a user and as an attacker: the real server (uvicorn in a
subprocess, the shapes model, few steps, one for the module), driven by headless chromium through playwright where
they are installed; the HTTP-only checks run without them."""
import base64
import hashlib
import io
import os
import re

import pytest

pytest.importorskip("fastapi", reason="nti serve needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")
from PIL import Image  # noqa: E402

from nti.benchmarks.bench_serve import ServerProcess  # noqa: E402

TOKEN = "page-token-7"
SOURCE, TARGET = "a yellow triangle on a gray background", "a blue triangle on a gray background"
CHROMIUM = "/usr/bin/chromium"
MAX_UPLOAD = 300_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("serve-page") / "data", "--steps", "2", "--inner-steps", "1",
                        "--device", "cpu", "--batch-size", "4", "--max-delay-ms", "50",
                        "--max-upload-bytes", str(MAX_UPLOAD), token=TOKEN)
    srv.start()
    yield srv
    assert srv.stop() == 0, srv.log()[-2000:]


def scene0() -> bytes:
    with open(os.path.join(os.path.dirname(__file__), "..", "engine", "assets", "scenes", "scene0.png"), "rb") as fh:
        return fh.read()


def png(size: tuple[int, int], colour=(128, 128, 128)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


# --------------------------------------------------------------------------------------------------- over HTTP

def test_page_is_served_with_a_content_security_policy(server):
    """The page holds the bearer token: no script runs on it but its own (by hash, no 'unsafe-inline'), it talks to
    its own origin only, and no other site may frame it (clickjacking)."""
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    policy = dict((d.split()[0], d.split()[1:]) for d in r.headers["content-security-policy"].split(";") if d.strip())
    scripts = re.findall(r"<script>(.*?)</script>", r.text, re.S)
    styles = re.findall(r"<style>(.*?)</style>", r.text, re.S)
    assert len(scripts) == 1 and len(styles) == 1

    def digest(text):
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == [digest(scripts[0])]
    assert policy["style-src"] == [digest(styles[0])]
    assert policy["connect-src"] == ["'self'"]
    assert sorted(policy["img-src"]) == ["'self'", "blob:", "data:"]
    assert policy["frame-ancestors"] == ["'none'"] and policy["base-uri"] == ["'none'"]
    assert policy["form-action"] == ["'none'"]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"


def test_page_needs_no_network(server):
    """Nothing is fetched from elsewhere (no CDN, no remote fonts or scripts: the world this runs in is offline)."""
    html = httpx.get(server.url + "/").text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html, re.I)
    assert "@import" not in html and "url(" not in html
    assert not re.search(r"""fetch\(\s*["'`]https?:""", html)


def test_page_fields_match_the_api(server):
    """The page offers exactly the methods, schedules and edit modes the routes take (p2p-reweight needs words to
    reweight, which the page has no field for), and sends the routes' field names."""
    from nti.config import GUIDANCE_SCHEDULES, METHODS

    schema = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    html = httpx.get(server.url + "/").text

    def options(select_id):
        block = re.search(rf'<select id="{select_id}">(.*?)</select>', html, re.S).group(1)
        return re.findall(r"<option>([^<]+)</option>", block)
    assert sorted(options("method")) == sorted(METHODS)
    assert sorted(options("schedule")) == sorted(GUIDANCE_SCHEDULES)
    edit_modes = schema["components"]["schemas"]["EditRequest"]["properties"]["edit"]["enum"]
    assert sorted(options("edit")) == sorted(m for m in edit_modes if m != "p2p-reweight")
    form = schema["components"]["schemas"]["Body_create_inversion_v1_inversions_post"]["properties"]
    sent = set(re.findall(r'form\.append\("(\w+)"', html))
    assert sent <= set(form) and {"image", "source_prompt"} <= sent

"""`nti serve`'s page (engine/assets/serve/index.html) as a user and as an attacker: the real server (uvicorn in a
subprocess, the shapes model, few steps, one for the module), driven by headless chromium through playwright where
they are installed; the HTTP-only checks run without them."""
import base64
import hashlib
import io
import json
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
    """The page offers exactly the methods, schedules and edit modes the routes take, and sends the routes' field
    names (the edit's JSON fields included)."""
    from nti.config import GUIDANCE_SCHEDULES, METHODS

    schema = httpx.get(server.url + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    html = httpx.get(server.url + "/").text

    def options(select_id):
        block = re.search(rf'<select id="{select_id}">(.*?)</select>', html, re.S).group(1)
        return re.findall(r"<option>([^<]+)</option>", block)
    assert sorted(options("method")) == sorted(METHODS)
    assert sorted(options("schedule")) == sorted(GUIDANCE_SCHEDULES)
    edit_modes = schema["components"]["schemas"]["EditRequest"]["properties"]["edit"]["enum"]
    assert sorted(options("edit")) == sorted(edit_modes)
    edit_fields = schema["components"]["schemas"]["EditRequest"]["properties"]
    assert {"target_prompt", "edit", "reweight", "blend_words"} <= set(edit_fields)
    assert set(re.findall(r"request\.(\w+) =", html)) == {"reweight", "blend_words"}
    form = schema["components"]["schemas"]["Body_create_inversion_v1_inversions_post"]["properties"]
    sent = set(re.findall(r'form\.append\("(\w+)"', html))
    assert sent <= set(form) and {"image", "source_prompt"} <= sent


# --------------------------------------------------------------------------------------------------- in chromium

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (Debian: apt-get install -y chromium); the page tests need a real browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the driver) is not installed")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")), executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
        yield context
        context.close()


class Page:
    """One page of the server's, with the token filled in, and every request, console message and dialog seen."""

    def __init__(self, browser, server, files):
        self.page, self.server, self.files = browser.new_page(), server, files
        self.requests, self.console, self.dialogs = [], [], []
        self.page.on("request", lambda r: self.requests.append((r.method, r.url)))
        self.page.on("console", lambda m: self.console.append(m.text))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(server.url + "/")
        self.page.fill("#token", TOKEN)

    def upload(self, name: str, data: bytes) -> None:
        path = self.files / name
        path.write_bytes(data)
        self.page.set_input_files("#image", str(path))

    def posts(self, suffix: str) -> int:
        return sum(1 for method, url in self.requests if method == "POST" and url.endswith(suffix))

    def status(self) -> str:
        return self.page.text_content("#status")

    def wait_error(self) -> str:
        self.page.wait_for_selector("#status.error", timeout=60_000)
        return self.status()

    def invert(self, source: str = SOURCE) -> str:
        self.page.fill("#source", source)
        self.page.click("#invert")
        self.page.wait_for_selector("#edit-button:not([disabled])", timeout=120_000)
        return self.status()


@pytest.fixture
def page(browser, server, tmp_path):
    p = Page(browser, server, tmp_path)
    yield p
    p.page.close()


def test_text_from_user_and_server_is_never_html(page):
    """A prompt that is markup comes back in the server's error message and in an edit's caption: both are shown as
    the characters typed, and no element or script comes of them."""
    title = page.page.title()
    page.upload("scene0.png", scene0())
    page.page.fill("#source", '<img src=x onerror="document.title=1">')
    page.page.click("#invert")
    message = page.wait_error()
    assert "the shapes model does not know the word(s)" in message and "'img'" in message
    page.invert()
    page.page.fill("#target", "a blue triangle on a gray background <a>")  # words the model knows, as markup
    page.page.click("#edit-button")
    # selectors, not wait_for_function: the page's Content-Security-Policy forbids the eval that needs
    page.page.wait_for_selector("#result-caption:has-text('<a>')", timeout=120_000)
    assert page.page.text_content("#result-caption") == "a blue triangle on a gray background <a>"
    assert page.page.eval_on_selector_all("#status *, #result-caption *", "els => els.length") == 0
    assert page.page.title() == title and page.dialogs == []


@pytest.mark.parametrize("name, data, expected", [
    ("page.html", b"<html><body>not an image</body></html>", "400: image: not a readable image"),
    ("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * (2 * MAX_UPLOAD), "413: request body of"),
])
def test_a_bad_upload_shows_the_servers_message(page, name, data, expected):
    page.upload(name, data)
    page.page.click("#invert")
    assert page.wait_error().startswith(expected)
    assert page.page.is_disabled("#edit-button") and not page.page.is_disabled("#invert")


def test_every_failure_shows_a_readable_message(page):
    """Errors as the server words them (JSON), as a reverse proxy words them (HTML), and no answer at all: each is
    a message on the page that says what happened, never a parser's complaint or [object Object]."""
    page.upload("scene0.png", scene0())
    cases = [
        (429, "application/json", json.dumps({"error": {"message": "the queue is full (9 jobs); retry after 4 s",
                                                        "type": "rate_limit_error", "param": None, "code": "429"}}),
         "429: the queue is full (9 jobs); retry after 4 s"),
        (503, "application/json", json.dumps({"error": {"message": "not ready: the model is still loading",
                                                        "type": "unavailable", "param": None, "code": "503"}}),
         "503: not ready: the model is still loading"),
        (502, "text/html", "<html><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>", "502: Bad Gateway"),
        (413, "text/html", "<html><body><h1>413 Request Entity Too Large</h1></body></html>",
         "413: Payload Too Large"),  # the browser's own words for the status
        (422, "application/json", json.dumps({"detail": [{"loc": ["body"], "msg": "bad"}]}),
         "422: Unprocessable Entity"),
    ]
    for status, content_type, body, expected in cases:
        page.page.route("**/v1/inversions", lambda route: route.fulfill(status=status, content_type=content_type,
                                                                        body=body))
        page.page.click("#invert")
        assert page.wait_error() == expected
        page.page.unroute("**/v1/inversions")
        page.page.evaluate("document.getElementById('status').className = ''")
    page.page.route("**/v1/inversions", lambda route: route.abort("connectionreset"))
    page.page.click("#invert")
    message = page.wait_error()
    assert message.startswith("could not reach the server") and "is nti serve running" in message
    page.page.unroute("**/v1/inversions")


def test_a_source_image_that_does_not_load_is_an_error(page):
    """The preprocessed source is fetched after the inversion: its failure is said, not shown as a broken image
    beside 'done'."""
    page.upload("scene0.png", scene0())
    page.page.route("**/source", lambda route: route.fulfill(status=404, content_type="application/json", body=(
        json.dumps({"error": {"message": "inversion x has no stored source image", "type": "not_found"}}))))
    page.page.fill("#source", SOURCE)
    page.page.click("#invert")
    assert page.wait_error() == "404: inversion x has no stored source image"
    assert page.page.is_disabled("#edit-button")


def test_a_second_click_while_a_request_runs_sends_nothing(page):
    """Double-clicking Invert or Edit queues one job, not two racing ones (the second's answer would overwrite the
    first's, or pair one inversion's source with another's edits)."""
    page.upload("scene0.png", scene0())
    page.page.fill("#source", SOURCE)
    page.page.dblclick("#invert")
    page.page.wait_for_selector("#edit-button:not([disabled])", timeout=120_000)
    assert page.posts("/v1/inversions") == 1
    page.page.fill("#target", TARGET)
    page.page.dblclick("#edit-button")
    assert page.page.is_disabled("#edit-button") and page.page.is_disabled("#invert")
    page.page.wait_for_selector("#result-image[src^='data:image/png;base64,']", timeout=120_000)
    assert page.posts("/edits") == 1
    assert not page.page.is_disabled("#edit-button") and not page.page.is_disabled("#invert")


def test_a_number_the_browser_cannot_read_is_refused(page):
    """A number field holding what is not a number reads as empty in the DOM: sent as such, the server's default
    would run instead of what the user typed."""
    page.upload("scene0.png", scene0())
    page.page.focus("#steps")
    page.page.keyboard.type("1e")
    page.page.click("#invert")
    assert page.wait_error() == "Steps: not a number; correct it or clear the field for the server's default."
    assert page.posts("/v1/inversions") == 0


def test_wide_and_tiny_images(page):
    """docs/serving.md: an upload wider than 2:1 runs, and the page says the model sees only its centre square; a
    1x1 image is upscaled and runs, and the page says so."""
    wide = Image.new("RGB", (96, 32), (128, 128, 128))
    wide.paste(Image.open(io.BytesIO(scene0())).convert("RGB"), (32, 0))
    out = io.BytesIO()
    wide.save(out, format="PNG")
    page.upload("wide.png", out.getvalue())
    status = page.invert()
    assert "\nwarning: image is 96x32: the model sees only its centre 32x32 square (33% of the image)" in status
    page.upload("tiny.png", png((1, 1), (200, 200, 0)))
    status = page.invert()
    assert "\nwarning: image is 1x1: upscaled 32.0x to 32x32" in status
    assert page.page.eval_on_selector("#source-image", "i => i.naturalWidth") == 32


def test_page_is_labelled_and_usable_from_the_keyboard(page):
    """Every field has a label, progress and errors are announced (a live region), and Tab + Enter alone invert."""
    for label, element in (("Image", "image"), ("Source prompt", "source"), ("Method", "method"), ("Steps", "steps"),
                           ("Inner steps", "inner"), ("Guidance", "guidance"), ("Schedule", "schedule"),
                           ("Token", "token"), ("Target prompt", "target"), ("Edit", "edit")):
        text = page.page.evaluate(f"document.getElementById('{element}').labels[0].childNodes[0].textContent")
        assert text.strip() == label
    assert page.page.get_by_role("button", name="Invert").count() == 1
    assert page.page.get_attribute("#status", "role") == "status"
    assert page.page.get_attribute("#status", "aria-live") == "polite"
    page.upload("scene0.png", scene0())
    page.page.focus("#token")
    page.page.keyboard.press("Tab")
    assert page.page.evaluate("document.activeElement.id") == "invert"
    page.page.keyboard.press("Enter")
    page.page.wait_for_selector("#edit-button:not([disabled])", timeout=120_000)
    assert "done" in page.status()
    csp = [m for m in page.console if "Content Security Policy" in m]
    assert csp == []  # the page's own script, style and images are allowed by its policy


def test_a_p2p_edit_takes_reweight_and_blend_words(page):
    """The page had no p2p-reweight and no word fields: the edit route's words could not be given from it. Bad
    reweight text is refused on the page, naming the field, with nothing sent."""
    page.upload("scene0.png", scene0())
    page.invert()
    page.page.fill("#target", TARGET)
    page.page.select_option("#edit", "p2p-reweight")
    page.page.fill("#reweight", "blue")
    page.page.click("#edit-button")
    assert page.wait_error() == 'Reweight: "blue" is not word=factor (e.g. blue=2).' and page.posts("/edits") == 0
    sent = []
    page.page.on("request", lambda r: sent.append(r.post_data) if r.url.endswith("/edits") else None)
    page.page.fill("#reweight", "blue=2")
    page.page.fill("#blend", "triangle")
    page.page.click("#edit-button")
    page.page.wait_for_selector("#result-image[src^='data:image/png;base64,']", timeout=120_000)
    assert json.loads(sent[0]) == {"target_prompt": TARGET, "edit": "p2p-reweight", "reweight": {"blue": 2},
                                   "blend_words": ["triangle"]}
    assert page.status().startswith("edit ") and "done" in page.status()

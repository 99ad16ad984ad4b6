"""Issue 18: bad input never costs a user data and never yields a silently wrong image. One test (or a few) per class
of problem the issue lists; tests/test_bad_input_property.py throws generated input at the same entry point."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import nti
from nti.cli import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, main

TINY = ["--steps", "2", "--inner-steps", "1", "--quiet", "--device", "cpu", "--model", "tiny"]


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of main(argv), argparse's SystemExit included."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("nti: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is loaded: the problem must be found before any model (let alone UNet) work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the input was already known to be bad")
    monkeypatch.setattr("nti.models.load_pipeline", refuse)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.full((40, 48, 3), 120, np.uint8)).save(folder / "grey.png")
    Image.fromarray(np.full((40, 40, 3), (200, 30, 30), np.uint8)).save(folder / "red.png")
    return folder


@pytest.fixture(scope="module")
def saved_inversion(tmp_path_factory):
    """A tiny-model inversion of 2 steps, written by the CLI."""
    path = tmp_path_factory.mktemp("inv") / "cat.safetensors"
    assert main(["invert", "skimage:chelsea", "--prompt", "a cat", "--out", str(path), *TINY]) == EXIT_OK
    return path


# ------------------------------------------------------------------------------------------------ data and files

def test_out_equal_to_an_input_or_its_folder_is_refused(photos, capsys, no_model):
    before = {p: digest(p) for p in photos.iterdir()}
    for out in (photos / "grey.png", photos, photos.parent):  # the file itself, its folder, a folder above it
        code, _, err = run_cli(["edit", photos / "grey.png", "--prompt", "a", "--target", "b", "--out", out, *TINY],
                               capsys)
        assert code == EXIT_BAD_INPUT and "input" in error_line(err)
    code, _, err = run_cli(["edit", photos, "--prompt", "a", "--target", "b", "--out", photos, *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "holds the input" in error_line(err)
    assert {p: digest(p) for p in photos.iterdir()} == before


def test_jsonl_ids_never_leave_out(tmp_path, capsys):
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "a.png")
    records = [{"image": "a.png", "id": "../../x", "source_prompt": "a cat", "target_prompt": "a dog"},
               {"image": "a.png", "id": "/etc/passwd", "source_prompt": "a cat", "target_prompt": "a dog"},
               {"image": "a.png", "id": "..", "source_prompt": "a cat", "target_prompt": "a dog"}]
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "deep" / "out"
    code, stdout, err = run_cli(["edit", jsonl, "--out", out, "--method", "ddim", *TINY], capsys)
    assert code == EXIT_OK, err
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["a.png", "deep/out/etc_passwd.png", "deep/out/item.png", "deep/out/x.png", "jobs.jsonl"]


@pytest.mark.parametrize("case, message", [
    ("suffix", "expected a .png file or a folder"),
    ("several-to-one-file", "2 inputs need a folder"),
    ("parent-is-a-file", "is a file, not a folder"),
    ("unwritable", "no permission to write"),
    ("cache-is-a-file", "--cache"),
])
def test_output_problems_are_found_before_the_model_loads(photos, tmp_path, capsys, no_model, monkeypatch, case,
                                                          message):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    base = ["edit", "--prompt", "a", "--target", "b", *TINY]
    argv = {
        "suffix": base + [photos / "grey.png", "--out", tmp_path / "o.jpg"],
        "several-to-one-file": base + [photos, "--out", tmp_path / "o.png"],
        "parent-is-a-file": base + [photos / "grey.png", "--out", blocker / "o.png"],
        "unwritable": base + [photos / "grey.png", "--out", tmp_path / "ro" / "o.png"],
        "cache-is-a-file": base + [photos / "grey.png", "--out", tmp_path / "o.png", "--cache", blocker],
    }[case]
    if case == "unwritable":  # root may write anywhere, so the permission is taken away where the check looks
        monkeypatch.setattr("nti.outputs.os.access", lambda path, mode: False)
    code, _, err = run_cli(argv, capsys)
    assert code == EXIT_BAD_INPUT and message in error_line(err)


def test_an_existing_folder_named_like_a_file_is_a_folder(tmp_path):
    from nti.outputs import plan_outputs
    (tmp_path / "x.png").mkdir()
    assert plan_outputs(str(tmp_path / "x.png"), ["cat"], ".png").paths == [tmp_path / "x.png" / "cat.png"]


def test_a_batch_finishes_the_good_inputs_and_lists_every_bad_one(photos, tmp_path, capsys):
    (photos / "broken.png").write_bytes(b"\x89PNG not really")
    (photos / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    code, stdout, err = run_cli(["edit", photos, "--prompt", "a cat", "--target", "a dog", "--out", out,
                                 "--method", "ddim", *TINY], capsys)
    assert code == EXIT_BAD_INPUT
    assert sorted(p.name for p in out.iterdir()) == ["grey.png", "red.png"]
    assert "broken.png" in err and "empty.jpg" in err and "2 inputs failed" in error_line(err)
    quiet = TINY.index("--quiet")  # the closing progress line counts what failed too (it said only "done in")
    code, _, err = run_cli(["edit", photos, "--prompt", "a cat", "--target", "a dog", "--out", out, "--no-resume",
                            "--method", "ddim", *TINY[:quiet], *TINY[quiet + 1:]], capsys)
    assert code == EXIT_BAD_INPUT and ": 2 of 4 outputs written" in err
    # --fail-fast: the old behaviour, the first bad input stops the run before anything is written
    code, _, err = run_cli(["edit", photos, "--prompt", "a cat", "--target", "a dog", "--out", tmp_path / "ff",
                            "--fail-fast", "--method", "ddim", *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "broken.png" in error_line(err) and not (tmp_path / "ff").exists()


def test_a_damaged_cache_entry_is_moved_aside_and_redone(tmp_path, capsys):
    cache, argv = tmp_path / "cache", ["invert", "skimage:chelsea", "--prompt", "a cat", *TINY]
    assert run_cli([*argv, "--out", tmp_path / "a.safetensors", "--cache", cache], capsys)[0] == EXIT_OK
    (entry,) = cache.glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:200])  # cut short, as by a full disk in an older version
    code, _, err = run_cli([*argv, "--out", tmp_path / "b.safetensors", "--cache", cache], capsys)
    assert code == EXIT_OK and "moved aside" in err
    assert (cache / (entry.name + ".corrupt")).is_file() and nti.load_inversion(entry).key == entry.stem
    a, b = (load_file(str(tmp_path / f"{n}.safetensors")) for n in "ab")
    assert torch.equal(a["null_embeddings"], b["null_embeddings"])


def test_runs_sharing_a_cache_share_the_work(tiny_pipe, tmp_path, monkeypatch):
    """Another run holds the claim on one entry: this run inverts the other image, waits, then takes the entry the
    other run saved instead of inverting it again."""
    from nti import api, cache as cache_module
    from nti.artifact import inversion_key
    from nti.images import center_square, load_image, pixel_hash

    config = nti.NTIConfig(steps=2, inner_steps=1)
    squares = [center_square(load_image(f"skimage:{name}"), tiny_pipe.resolution) for name in ("chelsea", "coffee")]
    keys = [inversion_key(pixel_hash(sq), "a cat", tiny_pipe.fingerprint, config.result_settings(
        tiny_pipe.scheduler_config)) for sq in squares]
    other = cache_module.Claim(tmp_path / f"{keys[0]}.lock")
    assert other.try_acquire()
    inverted = []
    real_invert = api.invert
    monkeypatch.setattr(api, "invert", lambda pipe, images, *a, **k: inverted.extend(images) or real_invert(
        pipe, images, *a, **k))
    monkeypatch.setattr(cache_module, "POLL_S", 0.05)
    result = {}
    worker = threading.Thread(target=lambda: result.update(invs=api.invert_cached(
        tiny_pipe, squares, ["a cat"] * 2, config, tmp_path, progress=False)))
    worker.start()
    for _ in range(400):  # wait until this run has done its own image
        if (tmp_path / f"{keys[1]}.safetensors").is_file():
            break
        time.sleep(0.05)
    assert worker.is_alive() and len(inverted) == 1  # waiting for the claimed entry, not redoing it
    theirs = real_invert(tiny_pipe, [squares[0]], ["a cat"], config, progress=False)[0]
    nti.save_inversion(theirs, tmp_path / f"{keys[0]}.safetensors")
    other.release()
    worker.join(60)
    assert not worker.is_alive() and len(inverted) == 1
    assert torch.equal(result["invs"][0].null_embeddings, theirs.null_embeddings)
    assert not list(tmp_path.glob("*.lock"))


# ------------------------------------------------------------------------------------------ silently wrong images

@pytest.mark.parametrize("value", ["inf", "nan", "1e30", "-1"])
def test_guidance_out_of_range_is_refused(capsys, tmp_path, no_model, value):
    code, _, err = run_cli(["edit", "skimage:chelsea", "--prompt", "a", "--target", "b", "--guidance", value,
                            "--out", tmp_path / "o.png", *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "guidance must be a number in [0, 100]" in error_line(err)


@pytest.mark.parametrize("option, message", [
    (["--steps-offset", "5000"], "reaches timestep"),
    (["--device", "meta"], "not supported"),
    (["--seed", "99999999999999999999"], "seed must be an integer"),
    (["--edit", "p2p-reweight", "--reweight", "b=1e39"], "float32's largest"),  # was exit 1: overflow in the fp32
    # attention equalizer
])
def test_other_options_out_of_range_exit_2(capsys, tmp_path, option, message):
    code, _, err = run_cli(["edit", "skimage:chelsea", "--prompt", "a", "--target", "b", "--out",
                            tmp_path / "o.png", *TINY, *option], capsys)
    assert code == EXIT_BAD_INPUT and message in error_line(err) and not (tmp_path / "o.png").exists()


def test_half_precision_on_the_reference_backend_is_refused(capsys, tmp_path, no_model):
    """The reference is fp32: --precision bf16 there would run fp32 and record bf16 (a mislabelled result)."""
    code, _, err = run_cli(["invert", "skimage:chelsea", "--prompt", "a", "--backend", "reference", "--precision",
                            "bf16", "--out", tmp_path / "i.safetensors", *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "needs --backend fast" in error_line(err)
    assert not list(tmp_path.iterdir())
    # through the API a reference run records the precision it really ran in
    config = nti.NTIConfig(backend="reference", precision="bf16")
    assert config.result_settings({})["precision"] == "fp32"


def test_speed_switches_on_the_reference_backend_are_named_as_ignored(capsys, tmp_path):
    code, _, err = run_cli(["invert", "skimage:chelsea", "--prompt", "a", "--backend", "reference", "--cuda-graphs",
                            "--batch-size", "4", "--out", tmp_path / "i.safetensors", *TINY], capsys)
    assert code == EXIT_OK and (tmp_path / "i.safetensors").is_file()
    assert "--batch-size, --cuda-graphs act on the fast backend only" in err


def test_a_result_that_is_not_finite_is_never_written(tmp_path, capsys, monkeypatch):
    from nti import api
    real = api.edit_latents
    monkeypatch.setattr(api, "edit_latents", lambda *a, **k: real(*a, **k) * float("nan"))
    out = tmp_path / "o.png"
    code, _, err = run_cli(["edit", "skimage:chelsea", "--prompt", "a cat", "--target", "a dog", "--out", out,
                            "--method", "ddim", *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "not finite" in error_line(err) and not out.exists()


def rewrite_inversion(src: Path, dst: Path, tensors=None, meta=None, drop=()):
    """A copy of a saved inversion with tensors replaced, metadata fields changed or dropped."""
    from safetensors import safe_open
    with safe_open(str(src), framework="pt") as fh:
        header = json.loads(fh.metadata()["nti"])
    data = {**load_file(str(src)), **(tensors or {})}
    header = {k: v for k, v in {**header, **(meta or {})}.items() if k not in drop}
    save_file(data, str(dst), metadata={"nti": json.dumps(header)})
    return dst


@pytest.mark.parametrize("case, message", [
    ("nan-latent", "non-finite"),
    ("steps-vs-embeddings", "records 3 steps"),
    ("missing-metadata", "'model_fingerprint' is missing"),
    ("broken-settings", "invalid settings"),
    ("not-json", "not valid JSON"),
    ("folder", "is a folder"),
])
def test_a_damaged_or_inconsistent_inversion_file_is_refused(saved_inversion, tmp_path, capsys, no_model, case,
                                                             message):
    bad = tmp_path / "bad.safetensors"
    z_t = load_file(str(saved_inversion))["z_T"]
    settings = json.loads(saved_inversion.with_suffix(".json").read_text())["settings"]
    if case == "nan-latent":
        rewrite_inversion(saved_inversion, bad, tensors={"z_T": torch.full_like(z_t, float("nan"))})
    elif case == "steps-vs-embeddings":
        rewrite_inversion(saved_inversion, bad, meta={"settings": {**settings, "steps": 3}})
    elif case == "missing-metadata":
        rewrite_inversion(saved_inversion, bad, drop=("model_fingerprint",))
    elif case == "broken-settings":
        rewrite_inversion(saved_inversion, bad, meta={"settings": {**settings, "guidance": 1e30}})
    elif case == "not-json":
        save_file(load_file(str(saved_inversion)), str(bad), metadata={"nti": "{not json"})
    else:
        bad = tmp_path
    code, _, err = run_cli(["edit", "--inversion", bad, "--target", "a dog", "--out", tmp_path / "o.png", *TINY],
                           capsys)
    assert code == EXIT_BAD_INPUT and message in error_line(err)


def test_flags_an_inversion_file_overrides_are_refused_when_they_conflict(saved_inversion, tmp_path, capsys):
    base = ["edit", "--inversion", saved_inversion, "--target", "a dog", "--out", tmp_path / "o.png", "--quiet",
            "--device", "cpu", "--model", "tiny"]
    code, _, err = run_cli([*base, "--steps", "9", "--guidance", "1"], capsys)
    line = error_line(err)
    assert code == EXIT_BAD_INPUT and "--steps 9" in line and "--guidance 1.0" in line and "steps=2" in line
    assert run_cli([*base, "--steps", "2"], capsys)[0] == EXIT_OK  # the file's own value is no conflict


def test_sixteen_bit_exif_animated_and_bomb_images(tmp_path, monkeypatch):
    from nti.config import NTIError
    from nti.images import load_image
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # 16-bit grey
    grey = np.asarray(load_image(tmp_path / "deep.png"))[..., 0].astype(int)
    assert grey.min() == 0 and grey.max() == 255 and abs(grey.mean() - 127.5) < 1  # scaled, not clipped to white
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    Image.fromarray(wide).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    upright = np.asarray(load_image(tmp_path / "turned.jpg"))
    assert upright.shape == (40, 20, 3) and upright[:15].mean() > 200 and upright[25:].mean() < 50
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(NTIError, match="animated"):
        load_image(tmp_path / "anim.gif")
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    for limit in (2048 + 1, 1000):  # PIL's warning zone (over the limit) and its error zone (over twice the limit)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(NTIError, match="too large"):
            load_image(tmp_path / "big.png")


def test_a_decompression_bomb_exits_2(tmp_path, capsys, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    code, _, err = run_cli(["edit", tmp_path / "big.png", "--prompt", "a", "--target", "b", "--out",
                            tmp_path / "o.png", *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "too large" in error_line(err)


def test_a_prompt_past_the_token_limit_is_refused(tmp_path, capsys):
    long = " ".join(["a cat"] * 40)
    code, _, err = run_cli(["edit", "skimage:chelsea", "--prompt", "a cat", "--target", long, "--out",
                            tmp_path / "o.png", *TINY], capsys)
    line = error_line(err)
    assert code == EXIT_BAD_INPUT and "82 tokens long" in line and "only 77" in line


def test_non_string_prompts_in_a_jsonl_exit_2(tmp_path, capsys, no_model):
    jsonl = tmp_path / "jobs.jsonl"
    # a byte-order mark first (Windows editors write one): skipped, the line itself is what is wrong
    jsonl.write_text("\ufeff" + json.dumps({"image": "skimage:chelsea", "source_prompt": ["a", "cat"],
                                            "target_prompt": 3}), encoding="utf-8")
    code, _, err = run_cli(["edit", jsonl, "--out", tmp_path / "out"], capsys)
    assert code == EXIT_BAD_INPUT and "source_prompt, target_prompt must be text" in error_line(err)


# ------------------------------------------------------------------------------------------ exit codes and messages

def test_filesystem_errors_while_writing_exit_2_and_leave_no_part_file(tmp_path, capsys, monkeypatch):
    def disk_full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a png")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", disk_full)
    code, _, err = run_cli(["edit", "skimage:chelsea", "--prompt", "a cat", "--target", "a dog", "--out",
                            tmp_path / "o.png", "--method", "ddim", *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "No space left on device" in error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_while_writing_keeps_the_old_file_whole(tmp_path, capsys, monkeypatch):
    from nti.images import save_png
    out = save_png(Image.new("RGB", (8, 8)), tmp_path / "o.png")  # the previous run's result (nti replaces its own)
    previous = out.read_bytes()
    def interrupted(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a png")
        raise KeyboardInterrupt
    monkeypatch.setattr(Image.Image, "save", interrupted)
    code, _, err = run_cli(["edit", "skimage:chelsea", "--prompt", "a cat", "--target", "a dog", "--out", out,
                            "--method", "ddim", *TINY], capsys)
    assert code == EXIT_INTERRUPTED and "Traceback" not in err and "interrupted" in err
    assert out.read_bytes() == previous and [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_ctrl_c_in_the_first_seconds_exits_130_without_a_traceback(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "nti.cli", "edit", "skimage:chelsea", "--prompt", "a",
                             "--target", "b", "--out", str(tmp_path / "o.png"), *TINY], stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # inside the imports of torch and diffusers: wait until libtorch is mapped (a fixed sleep raced the interpreter's
    # own start on a loaded CI box, where Python's handler, not nti's, still held SIGINT: a -2 exit)
    maps = Path(f"/proc/{proc.pid}/maps")
    if not maps.exists():
        proc.kill()
        pytest.skip("needs /proc to see when the child is importing torch")
    deadline = time.monotonic() + 60
    while "libtorch" not in maps.read_text() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED and "Traceback" not in err and "nti: interrupted" in err


def test_tiny_model_warns_and_inversion_folder_says_folder(tmp_path, capsys):
    code, _, err = run_cli(["reconstruct", "skimage:chelsea", "--prompt", "a cat", "--out", tmp_path / "r.png",
                            "--method", "ddim", *TINY], capsys)
    assert code == EXIT_OK and "random weights" in err
    code, _, err = run_cli(["edit", "--inversion", tmp_path, "--target", "b", "--out", tmp_path / "o.png", *TINY],
                           capsys)
    assert code == EXIT_BAD_INPUT and "is a folder" in error_line(err)


def test_punctuation_is_not_an_unknown_word():
    from nti.api import check_vocabulary
    from nti.config import NTIError
    shapes = SimpleNamespace(vocabulary=("a", "red", "circle", "on", "gray", "background"), name="shapes",
                             prompt_example="")
    check_vocabulary(shapes, ["a red circle on a gray background.", "a red circle, on a gray background!"])
    with pytest.raises(NTIError, match="'cat'"):
        check_vocabulary(shapes, ["a red cat."])


def test_quiet_hides_the_weight_loading_bar(tmp_path, capsys):
    import diffusers.utils.logging
    import transformers.utils.logging
    transformers.utils.logging.enable_progress_bar()
    try:
        code, _, err = run_cli(["reconstruct", "skimage:chelsea", "--prompt", "a red circle", "--method", "ddim",
                                "--steps", "1", "--quiet", "--device", "cpu", "--out", tmp_path / "r.png"], capsys)
        assert code == EXIT_OK and "Loading" not in err and "%|" not in err, err
    finally:  # the switch is global in the libraries: leave them as other tests expect
        transformers.utils.logging.enable_progress_bar()
        diffusers.utils.logging.enable_progress_bar()


def test_readme_exit_code_table_matches_the_cli():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## What happens to bad input"):]
    rows = {int(code): meaning for code, meaning in
            (line.strip("| ").split(" | ")[:2] for line in section.splitlines()
             if line.startswith("| ") and line[2:3].isdigit())}
    assert rows.keys() == {EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED}
    assert "bad input" in rows[EXIT_BAD_INPUT] and "internal" in rows[EXIT_INTERNAL]
    assert "interrupted" in rows[EXIT_INTERRUPTED]

"""More bad input (issue 18), found by running `nti` on inputs tests/test_bad_input.py does not cover: odd files
(a pipe, over-long names), unusual pixel formats, JSONL edge cases and prompts. Each test failed before its fix."""
import json
import os
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nti.cli import EXIT_BAD_INPUT, EXIT_OK
# the CLI runner, its one-error-line check and the fixture that fails a test if the model loads
from test_bad_input import TINY, error_line, no_model, run_cli  # noqa: F401  (no_model: a fixture)


@pytest.fixture
def grey(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.full((40, 48, 3), 120, np.uint8)).save(path)
    return path


# ------------------------------------------------------------------------------------------------------- odd files

def test_a_named_pipe_given_as_an_image_is_refused_not_waited_on(tmp_path, grey, capsys):
    """Opening a FIFO for reading blocks until a writer comes: the run hung forever after loading the model."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = {}
    worker = threading.Thread(daemon=True, target=lambda: result.update(res=run_cli(
        ["reconstruct", fifo, grey, "--prompt", "a cat", "--out", tmp_path / "out", "--method", "ddim", *TINY],
        capsys)))
    worker.start()
    worker.join(60)
    if worker.is_alive():  # let the blocked open() return so the thread ends, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(30)
        pytest.fail("the run waited on the named pipe")
    code, _, err = result["res"]
    assert code == EXIT_BAD_INPUT and "pipe.png is not a regular file" in error_line(err)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["grey.png"]  # the good input is still done


# ---------------------------------------------------------------------------------------------------- pixel formats

def test_a_non_finite_float_image_is_named_in_a_batch(tmp_path, grey, capsys):
    """The error said only 'image has non-finite pixel values': in a batch of many, which one?"""
    Image.fromarray(np.full((32, 32), np.nan, np.float32), mode="F").save(tmp_path / "nan.tif")
    code, _, err = run_cli(["reconstruct", tmp_path / "nan.tif", grey, "--prompt", "a cat", "--out", tmp_path / "out",
                            "--method", "ddim", *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "nan.tif" in error_line(err) and "non-finite" in error_line(err)


@pytest.mark.parametrize("mode, values", [("I", (-70000, 0, 100000)), ("F", (-3.0, 0.5, 900.0))])
def test_wide_integer_and_float_pixels_out_of_range_are_refused_not_clipped(tmp_path, mode, values):
    """A 32-bit or float image outside the range the reader scales (0..65535, 0..255) was clipped: a silently
    black-and-white image."""
    from nti.config import NTIError
    from nti.images import load_image
    array = np.resize(np.array(values, np.int32 if mode == "I" else np.float32), (16, 16))
    Image.fromarray(array, mode=mode).save(tmp_path / "wide.tif")
    with pytest.raises(NTIError, match=r"wide.tif has pixel values from .* outside"):
        load_image(tmp_path / "wide.tif")
    # in range, both still load: 16-bit-scale ints are scaled, floats in [0, 255] kept
    Image.fromarray(np.resize(np.array([0, 65535], np.int32), (16, 16)), mode="I").save(tmp_path / "ok.tif")
    assert np.asarray(load_image(tmp_path / "ok.tif")).max() == 255


def test_a_colour_key_transparency_is_shown_over_white(tmp_path):
    """PNG's tRNS chunk on an RGB or grey image marks one colour transparent; convert('RGB') kept that colour
    (a green screen stayed green) though transparent pixels are read over white."""
    from nti.images import load_image
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = (0, 255, 0)
    Image.fromarray(rgb).save(tmp_path / "key.png", transparency=(0, 255, 0))
    shown = np.asarray(load_image(tmp_path / "key.png"))
    assert (shown[:, :4] == 255).all() and (shown[:, 4:] == 0).all()
    grey = np.zeros((8, 8), np.uint8)
    grey[:, :4] = 7
    Image.fromarray(grey).save(tmp_path / "key-l.png", transparency=7)
    shown = np.asarray(load_image(tmp_path / "key-l.png"))
    assert (shown[:, :4] == 255).all() and (shown[:, 4:] == 0).all()


# ------------------------------------------------------------------------------------------------- inputs and JSONL

def jsonl_line(image="grey.png", **fields):
    return json.dumps({"image": str(image), "source_prompt": "a cat", "target_prompt": "a dog", **fields})


def test_an_upper_case_jsonl_suffix_is_read_as_jsonl(tmp_path, grey, capsys):
    """JOBS.JSONL was taken for an image ('no source prompt for JOBS.JSONL'); image suffixes were case-blind."""
    jsonl = tmp_path / "JOBS.JSONL"
    jsonl.write_text(jsonl_line(id="from-jsonl") + "\n")
    code, stdout, err = run_cli(["edit", jsonl, "--out", tmp_path / "out", "--method", "ddim", *TINY], capsys)
    assert code == EXIT_OK, err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["from-jsonl.png"]


@pytest.mark.parametrize("text", ["", "\n\n  \n", "\ufeff\r\n"])
def test_a_jsonl_without_records_is_named(tmp_path, grey, capsys, text):
    """An empty JSONL said 'no inputs: give ... a JSONL' (one was given), and beside other inputs it vanished
    without a word; an empty folder is named as such."""
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text(text, encoding="utf-8")
    code, _, err = run_cli(["edit", jsonl, "--out", tmp_path / "out", *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "jobs.jsonl has no records" in error_line(err)
    code, _, err = run_cli(["edit", jsonl, grey, "--prompt", "a cat", "--target", "a dog", "--out", tmp_path / "out",
                            "--method", "ddim", *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "jobs.jsonl has no records" in error_line(err)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["grey.png"]


def test_an_inversion_file_given_as_an_image_says_to_use_inversion(tmp_path, capsys, no_model):
    """`nti edit cat.safetensors ...` said only 'is not a readable image'."""
    saved = tmp_path / "cat.safetensors"
    saved.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    code, _, err = run_cli(["edit", saved, "--prompt", "a cat", "--target", "a dog", "--out", tmp_path / "o.png",
                            *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "--inversion" in error_line(err)


# ---------------------------------------------------------------------------------------------------------- prompts

@pytest.mark.parametrize("flag, value", [("--prompt", ""), ("--prompt", "   "), ("--target", ""), ("--target", "\t"),
                                         ("--target", "\u200b"), ("--prompt", "\ufeff \u200b")])  # invisible
def test_an_empty_prompt_flag_is_refused(tmp_path, grey, capsys, no_model, flag, value):
    """A JSONL line (and nti serve) refuse an empty prompt; `--target "$UNSET"` ran an unconditional 'edit' and
    wrote it as the result."""
    prompts = {"--prompt": "a cat", "--target": "a dog", flag: value}
    code, _, err = run_cli(["edit", grey, *(x for kv in prompts.items() for x in kv), "--out", tmp_path / "o.png",
                            *TINY], capsys)
    assert code == EXIT_BAD_INPUT and f"{flag} is empty" in error_line(err)
    assert not (tmp_path / "o.png").exists()


def test_a_prompt_flag_an_inversion_file_overrides_is_refused(tmp_path, capsys):
    """`nti edit --inversion F --prompt P` edited from F's own source prompt and ignored P without a word, as the
    other flags F's settings override are refused."""
    saved = tmp_path / "cat.safetensors"
    assert run_cli(["invert", "skimage:chelsea", "--prompt", "a cat", "--out", saved, *TINY], capsys)[0] == EXIT_OK
    base = ["edit", "--inversion", saved, "--target", "a dog", "--out", tmp_path / "o.png", *TINY]
    code, _, err = run_cli([*base, "--prompt", "a bird"], capsys)
    assert code == EXIT_BAD_INPUT and "--prompt 'a bird'" in error_line(err) and "'a cat'" in error_line(err)
    assert not (tmp_path / "o.png").exists()
    assert run_cli([*base, "--prompt", "a cat"], capsys)[0] == EXIT_OK  # the file's own prompt is no conflict


# --------------------------------------------------------------------------------------------------- long file names

LONG = "y" * 300  # past every filesystem's 255-byte name limit: stat() itself fails (ENAMETOOLONG)


@pytest.mark.parametrize("where", ["image", "jsonl", "jsonl-line", "inversion", "out-folder", "cache", "model"])
def test_a_path_the_filesystem_calls_too_long_is_bad_input(tmp_path, grey, capsys, where):
    """Path.exists() raises ENAMETOOLONG instead of answering False: an internal error (exit 1) for a typo."""
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text(jsonl_line(id="good") + "\n" + jsonl_line(f"{LONG}.png", id="long") + "\n")
    argv = {"image": [tmp_path / f"{LONG}.png", grey, "--prompt", "a cat", "--target", "a dog"],
            "jsonl": [tmp_path / f"{LONG}.jsonl", grey, "--prompt", "a cat", "--target", "a dog"],
            "jsonl-line": [jsonl],
            "inversion": ["--inversion", tmp_path / f"{LONG}.safetensors", "--target", "a dog"],
            "out-folder": [grey, "--prompt", "a cat", "--target", "a dog"],
            "cache": [grey, "--prompt", "a cat", "--target", "a dog", "--cache", tmp_path / LONG / "cache"],
            "model": [grey, "--prompt", "a cat", "--target", "a dog"]}[where]
    model = ["--model", tmp_path / LONG] if where == "model" else []
    out = tmp_path / LONG / "out" if where == "out-folder" else tmp_path / "out"
    code, _, err = run_cli(["edit", *argv, "--out", out, "--method", "ddim", *TINY, *model], capsys)
    assert code == EXIT_BAD_INPUT and "too long" in error_line(err)
    if where in ("image", "jsonl", "jsonl-line"):  # the batch goes on with the good inputs
        assert len(list(out.iterdir())) == 1


def test_an_out_name_too_long_for_the_filesystem_is_refused_before_the_work(tmp_path, grey, capsys, no_model):
    """The name fit (250 bytes) but its temp file '.NAME.xxxxxxxx.part' did not: refused only at the write, after
    the inversion."""
    out = tmp_path / ("x" * 250 + ".png")
    code, _, err = run_cli(["edit", grey, "--prompt", "a cat", "--target", "a dog", "--out", out, *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "too long" in error_line(err)


def test_an_out_that_is_a_device_says_so(tmp_path, grey, capsys, no_model):
    """--out /dev/null said '1 inputs need a folder'."""
    code, _, err = run_cli(["reconstruct", grey, "--prompt", "a cat", "--out", "/dev/null", *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "--out /dev/null is a device or pipe" in error_line(err)


@pytest.mark.parametrize("given, said", [("/dev/null", "is not a regular file (a device or pipe)"),
                                        ("", "the inversion path is empty")])
def test_an_inversion_that_is_a_device_or_empty_says_so(tmp_path, capsys, no_model, given, said):
    """--inversion /dev/null said 'does not exist', and --inversion '' that '.' is a folder."""
    code, _, err = run_cli(["edit", "--inversion", given, "--target", "a dog", "--out", tmp_path / "out"], capsys)
    assert code == EXIT_BAD_INPUT and said in error_line(err)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_a_diverged_inversion_names_the_setting_to_lower(tmp_path, grey, capsys, backend):
    """--lr 1e30 made the null embeddings NaN, and the message blamed a damaged file and --guidance (reference
    backend) or 'the input image and prompt' (fast backend, which finds it during the optimization)."""
    code, _, err = run_cli(["reconstruct", grey, "--prompt", "a cat", "--lr", "1e30", "--steps", "2",
                            "--inner-steps", "2", "--backend", backend, "--out", tmp_path / "out", *TINY], capsys)
    line = error_line(err)
    assert code == EXIT_BAD_INPUT and "diverged" in line and line.endswith("lower --lr")
    assert "damaged" not in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing written


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_mode_of_any_new_file(tmp_path, grey, capsys, umask):
    """Outputs went through mkstemp's temp file and kept its 0600: results in a shared folder no one else could read.
    Now 0666 less the umask, as for any file a program creates, and no temp file stays behind."""
    old = os.umask(umask)
    try:
        code, _, err = run_cli(["edit", grey, "--prompt", "a cat", "--target", "a dog", "--out", tmp_path / "out",
                                "--method", "ddim", *TINY], capsys)
    finally:
        os.umask(old)
    assert code == EXIT_OK, err
    written = sorted((tmp_path / "out").iterdir())
    assert written and all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in written)
    assert not [p for p in written if p.name.endswith(".part")]


def test_an_out_that_is_a_symbolic_link_is_written_through(tmp_path, grey, capsys):
    """--out latest.png -> runs/edit.png: the rename into place used to put a plain file where the link was (the
    link lost, the target never written). Now the target gets the image, as a shell's `>` would, and the link stays;
    a dangling link too."""
    (tmp_path / "runs").mkdir()
    link = tmp_path / "latest.png"
    link.symlink_to(tmp_path / "runs" / "edit.png")  # dangling until nti writes
    requests = []
    for target in ("a dog", "a fox"):  # the second run replaces nti's own earlier image through the link
        code, out, err = run_cli(["edit", grey, "--prompt", "a cat", "--target", target, "--out", link,
                                  "--method", "ddim", *TINY], capsys)
        assert code == EXIT_OK, err
        assert link.is_symlink() and os.readlink(link) == str(tmp_path / "runs" / "edit.png")
        with Image.open(tmp_path / "runs" / "edit.png") as img:
            assert img.format == "PNG" and img.text["Software"] == "nti"
            requests.append(img.text["nti-request"])
    assert requests[0] != requests[1]  # the second image, not the first kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grey.png", "latest.png", "runs"]


def test_jsonl_messages_say_what_is_wrong(tmp_path, grey, capsys, no_model):
    """A folder named as a line's image was reported as 'does not exist'; a file not in UTF-8 as a byte position,
    with no line and no way out."""
    (tmp_path / "album").mkdir()
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text(jsonl_line("album") + "\n")
    code, _, err = run_cli(["edit", jsonl, "--out", tmp_path / "out", *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "line 1: image" in error_line(err) and "is a folder" in error_line(err)
    jsonl.write_bytes((jsonl_line() + "\n").encode() + b'{"image": "grey.png", "source_prompt": "caf\xe9"}\n')
    code, _, err = run_cli(["edit", jsonl, "--out", tmp_path / "out", *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "line 2 is not UTF-8" in error_line(err) and "save it as UTF-8" in err


# --------------------------------------------------------------------------------------------- nti serve's uploads

def test_nti_serve_reads_an_upload_as_the_cli_reads_the_file(tmp_path):
    """nti serve decoded uploads with a bare convert('RGB'): a 16-bit grey PNG came out all white, an EXIF-turned
    photo on its side, a colour key kept its colour, an animation silently became its first frame."""
    pytest.importorskip("fastapi")
    from nti.images import load_image
    from nti.serve import APIError, ServeSettings, read_image
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(wide).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    key = np.zeros((8, 8, 3), np.uint8)
    key[:, :4] = (0, 255, 0)
    Image.fromarray(key).save(tmp_path / "key.png", transparency=(0, 255, 0))
    for name in ("deep.png", "turned.jpg", "key.png"):
        served = read_image((tmp_path / name).read_bytes(), ServeSettings())
        assert np.array_equal(np.asarray(served), np.asarray(load_image(tmp_path / name))), name
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(APIError, match="animated"):
        read_image((tmp_path / "anim.gif").read_bytes(), ServeSettings())


def test_a_folder_with_a_prompts_jsonl_and_no_prompt_points_at_the_jsonl(tmp_path, grey, capsys, no_model):
    """`nti edit engine/assets/scenes` listed 'no source prompt for ...: give one in the JSONL' for each of its 18
    images (masks included) while the folder's prompts.jsonl, which `nti eval --data FOLDER` reads, went unused."""
    (tmp_path / "prompts.jsonl").write_text(jsonl_line() + "\n")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "grey-mask.png")
    code, _, err = run_cli(["edit", tmp_path, "--out", tmp_path.parent / "out", *TINY], capsys)
    line = error_line(err)
    assert code == EXIT_BAD_INPUT and f"pass {tmp_path / 'prompts.jsonl'}" in line and "inputs failed" not in line


def test_a_users_file_at_an_output_path_is_kept_and_nti_replaces_only_its_own(tmp_path, capsys, monkeypatch):
    """--out folders are shared with the user's files: a file nti did not write (no 'Software: nti' PNG chunk, no
    inversion metadata) is never replaced; nti's own earlier outputs are, so a rerun writes the same names again."""
    scene = Path(__file__).resolve().parents[1] / "engine" / "assets" / "scenes" / "scene0.png"
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / "scene0.png"
    Image.new("RGB", (8, 8), "red").save(theirs)  # the user's own PNG, under the name the edit would take
    before = theirs.read_bytes()
    argv = ["edit", scene, "--prompt", "a yellow triangle on a gray background", "--target",
            "a blue triangle on a gray background", "--out", out, "--steps", "2", "--inner-steps", "1", "--quiet",
            "--device", "cpu"]
    with monkeypatch.context() as patch:
        patch.setattr("nti.models.load_pipeline", lambda *a, **k: pytest.fail("refused only after loading"))
        code, _, err = run_cli(argv, capsys)
    assert code == EXIT_BAD_INPUT and "exists and was not written by nti" in error_line(err) and str(theirs) in err
    assert theirs.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["scene0.png"]

    theirs.unlink()
    assert run_cli(argv, capsys)[0] == EXIT_OK
    first = theirs.read_bytes()
    assert Image.open(theirs).info["Software"] == "nti"
    assert run_cli(argv, capsys)[0] == EXIT_OK and theirs.read_bytes() == first  # its own output: replaced, same

    saved = tmp_path / "inv" / "scene0.safetensors"  # invert's .safetensors and .json twin are nti's too
    invert = ["invert", scene, "--prompt", "a yellow triangle on a gray background", "--out", saved, "--steps", "2",
              "--inner-steps", "1", "--quiet", "--device", "cpu"]
    assert run_cli(invert, capsys)[0] == EXIT_OK and run_cli(invert, capsys)[0] == EXIT_OK
    saved.with_suffix(".json").write_text('{"notes": "mine"}')  # a user's JSON where the twin would go
    code, _, err = run_cli(invert, capsys)
    assert code == EXIT_BAD_INPUT and "scene0.json exists and was not written by nti" in error_line(err)
    assert saved.with_suffix(".json").read_text() == '{"notes": "mine"}'


# ------------------------------------------------------------------------------- arrays and skimage:NAME (the API)

def test_arrays_are_read_as_image_files_of_their_kind_not_cast_to_uint8():
    """load_image cast every array to uint8: floats in [0, 1] (skimage:shepp_logan_phantom) and bool masks
    (skimage:binary_blobs, skimage:horse) became an all-black image, 300 wrapped to 44, -5 to 251, NaN to noise."""
    from nti.config import NTIError
    from nti.images import load_image
    assert np.asarray(load_image(np.full((8, 8, 3), 0.5))).max() == 128  # [0, 1] floats, as a float TIFF
    assert np.asarray(load_image(np.ones((8, 8), bool))).min() == 255
    assert np.asarray(load_image(np.full((8, 8), 65535, np.uint16))).min() == 255
    assert np.asarray(load_image("skimage:binary_blobs")).max() == 255
    assert np.asarray(load_image(np.dstack([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)]))).min() == 255
    for bad, message in [(np.full((8, 8, 3), np.nan), "non-finite"), (np.full((8, 8, 3), -5), "outside 0..255"),
                         (np.full((8, 8), 1e6), "outside 0..255"), (np.zeros((8, 8), complex), "complex")]:
        with pytest.raises(NTIError, match=message):
            load_image(bad)


@pytest.mark.parametrize("source, message", [
    (np.zeros((0, 0, 3), np.uint8), r"images\[0\] is empty \(0x0 pixels\)"),
    (Image.new("RGB", (0, 4)), r"images\[0\] is empty \(0x4 pixels\)"),
    ("torch", "an image must be a file path, 'skimage:NAME', a PIL image or a numpy array; got Tensor"),
    (b"\x89PNG", "got bytes"),
    (None, "got NoneType"),
])
def test_the_api_refuses_empty_images_and_other_objects_with_nti_errors(tiny_pipe, source, message):
    """A 0x0 image was resized into a made-up 32x32 one; a tensor's str() was looked up as a file name (OSError:
    File name too long); bytes were read as one image per byte ('image 137 does not exist')."""
    import torch

    import nti
    from nti.config import NTIError
    source = torch.zeros(3, 8, 8) if isinstance(source, str) and source == "torch" else source
    with pytest.raises(NTIError, match=message):
        nti.invert(tiny_pipe, source, "a cat", nti.NTIConfig(steps=1, inner_steps=0), progress=False)


@pytest.mark.parametrize("prompts", [None, 5])
def test_the_api_says_prompts_must_be_strings(tiny_pipe, prompts):
    """TypeError: 'NoneType' object is not iterable."""
    import nti
    from nti.config import NTIError
    with pytest.raises(NTIError, match="source prompts must be a string or a list of strings"):
        nti.invert(tiny_pipe, "skimage:chelsea", prompts, nti.NTIConfig(steps=1, inner_steps=0), progress=False)


def test_skimage_names_run_only_photos_and_name_what_is_not_bundled(tmp_path, capsys, monkeypatch):
    """skimage:NAME called any function of skimage.data: download_all (a download of every data set), file_hash
    (TypeError: internal error, exit 1), stereo_motorcycle (a tuple, whose repr became a 'File name too long' error
    of 600 lines), and brain & co. (need pooch and a download: internal error, exit 1)."""
    import skimage.data

    monkeypatch.setattr(skimage.data, "download_all", lambda *a, **k: pytest.fail("skimage:download_all was run"))
    monkeypatch.setattr(skimage.data, "brain", lambda: (_ for _ in ()).throw(ModuleNotFoundError("needs pooch")))
    code, _, err = run_cli(["reconstruct", "skimage:download_all", "skimage:file_hash", "skimage:stereo_motorcycle",
                            "skimage:brain", "--prompt", "a cat", "--out", tmp_path / "out", *TINY], capsys)
    assert code == EXIT_BAD_INPUT and "4 inputs failed" in error_line(err) and "internal error" not in err
    assert "skimage:download_all: scikit-image has no bundled image" in err
    assert "skimage:stereo_motorcycle is not one image" in err and len(err.splitlines()) < 10
    assert "skimage:brain is not bundled with scikit-image" in err and "skimage:chelsea" in err


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_nti_eval_never_replaces_or_deletes_a_users_files_in_out(tmp_path, capsys, overwrite):
    """`nti eval --out FOLDER` wrote its report.md and summary.csv over the user's files of those names and deleted
    the folder's plots/ with whatever was in it (rmtree before drawing the plots), with exit 0."""
    out = tmp_path / "notes"
    (out / "plots").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(out / "plots" / "mine.png")
    (out / "report.md").write_text("my notes")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = ["eval", "--out", out, "--methods", "ddim", "--n", "1", "--steps", "2", "--inner-steps", "1", "--quiet",
            "--device", "cpu", *overwrite]
    code, _, err = run_cli(argv, capsys)
    assert code == EXIT_BAD_INPUT and "holds report.md, plots that no nti eval run wrote" in error_line(err)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    code, _, err = run_cli([*argv[:2], out / "report.md", *argv[3:]], capsys)
    assert code == EXIT_BAD_INPUT and "report.md is a file; nti eval writes a folder" in error_line(err)
    assert run_cli([*argv[:2], tmp_path / "results", *argv[3:]], capsys)[0] == EXIT_OK  # a new folder: fine


# ------------------------------------------------------------------------------------------------------ nti serve

@pytest.mark.parametrize("option, message", [
    (["--port", "99999"], "must be a TCP port in 0..65535"),  # served on 99999 % 65536 = 34463 without a word
    (["--port", "-1"], "must be at least 0"),  # uvicorn's exit 3 after a 30 s drain
    (["--drain", "nan"], "--drain: must be a finite number >= 0"),  # exit 1: int(nan) at uvicorn's start
    (["--max-delay-ms", "-5"], "--max-delay-ms: must be a finite number >= 0"),
    (["--request-timeout", "nan"], "--request-timeout: must be a finite number > 0"),
    (["--inner-steps", "-1"], "--inner-steps: must be at least 0"),  # served, never ready: the model never 'loaded'
    (["--steps", "500"], "--steps 500 is over --max-steps 100"),  # requests that name no steps ran past the limit
])
def test_nti_serve_refuses_flags_it_would_serve_wrongly(capsys, option, message):
    pytest.importorskip("fastapi")
    code, _, err = run_cli(["serve", "--device", "cpu", *option], capsys)
    assert code == EXIT_BAD_INPUT and message in error_line(err)


def test_nti_serve_on_a_port_in_use_is_one_error_line(tmp_path, capsys):
    """uvicorn logged '[Errno 98] address already in use' as JSON and exited 3, after loading the model."""
    import socket
    pytest.importorskip("fastapi")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_cli(["serve", "--device", "cpu", "--port", port, "--data", tmp_path / "data"], capsys)
    assert code == EXIT_BAD_INPUT and f"cannot listen on 127.0.0.1:{port}" in error_line(err)


def test_the_python_api_says_when_an_edit_is_not_finite(tiny_pipe, monkeypatch, caplog):
    """nti.edit returns what it made (nti eval scores a diverged sample as it is), but a non-finite edit, which
    decodes to no real image, used to come back without a word."""
    import logging

    import torch

    import nti
    import nti.api

    pipe = tiny_pipe
    config = nti.NTIConfig(steps=2, inner_steps=1, method="ddim")
    invs = nti.invert(pipe, [Image.new("RGB", (32, 32), (200, 40, 40))] * 2, ["a photo"] * 2, config, progress=False)
    real = nti.api.edit_latents

    def second_diverges(*args, **kwargs):
        latents = real(*args, **kwargs)
        latents[1] = float("nan")
        return latents
    monkeypatch.setattr(nti.api, "edit_latents", second_diverges)
    with caplog.at_level(logging.WARNING, logger="nti"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # numpy's "invalid value encountered in cast" of NaN pixels
        images = nti.edit(pipe, invs, ["a dog"] * 2, config, progress=False)
    assert len(images) == 2 and not np.asarray(images[1]).any()  # black, as the warning says: no real image
    assert [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()] == [
        "edit 1 is not finite (NaN or inf: diverged), so no real image comes of it; lower guidance"]
    caplog.clear()
    monkeypatch.setattr(nti.api, "edit_latents", real)
    nti.edit(pipe, invs, ["a dog"] * 2, config, progress=False)
    assert not [r for r in caplog.records if "not finite" in r.getMessage()]
    assert torch.isfinite(invs[0].z_T).all()

"""A batch is written chunk by chunk, and the same command again keeps what an earlier run of that request finished
(the request key each output records: engine/outputs.py request_key), so an interrupted batch goes on where it
stopped; any change to the inputs, prompts or settings, or --no-resume, makes the outputs again."""
from pathlib import Path

import pytest
from PIL import Image

from nti.cli import EXIT_INTERRUPTED, EXIT_OK
from nti.outputs import REQUEST_TAG, recorded_request

from tests.test_bad_input import TINY, run_cli

PHOTOS = ["skimage:chelsea", "skimage:astronaut", "skimage:coffee"]
EDIT = ["edit", *PHOTOS, "--prompt", "a photo", "--target", "a painting", "--method", "ddim", *TINY]


def edit_calls(monkeypatch, fail_on: int | None = None) -> list:
    """Count the batches batch.edit_and_save gets (each is one image here: the reference backend); Ctrl-C at the
    `fail_on`-th."""
    import nti.batch

    real, calls = nti.batch.edit_and_save, []

    def counted(pipe, jobs, *args, **kwargs):
        calls.append([j.name for j in jobs])
        if len(calls) == fail_on:
            raise KeyboardInterrupt
        return real(pipe, jobs, *args, **kwargs)
    monkeypatch.setattr(nti.batch, "edit_and_save", counted)
    return calls


def contents(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_an_interrupted_batch_keeps_what_it_wrote_and_the_same_command_does_only_the_rest(tmp_path, capsys,
                                                                                          monkeypatch):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        calls = edit_calls(m, fail_on=2)
        code, _, err = run_cli([*EDIT, "--out", out], capsys)
    assert code == EXIT_INTERRUPTED and "Traceback" not in err
    assert "1 of 3 outputs were written before the interruption" in err
    assert [p.name for p in out.iterdir()] == ["chelsea.png"] and calls == [["chelsea"], ["astronaut"]]
    first = contents(out)

    with monkeypatch.context() as m:
        calls = edit_calls(m)
        code, _, err = run_cli([*EDIT, "--out", out], capsys)
    assert code == EXIT_OK and calls == [["astronaut"], ["coffee"]]  # chelsea kept, not made again
    assert contents(out)["chelsea.png"] == first["chelsea.png"]
    done = contents(out)
    assert sorted(done) == ["astronaut.png", "chelsea.png", "coffee.png"]

    with monkeypatch.context() as m:  # all finished: no edit runs at all, nothing is rewritten, all are listed
        calls = edit_calls(m)
        code, stdout, _ = run_cli([*EDIT, "--out", out], capsys)
    assert code == EXIT_OK and calls == [] and contents(out) == done
    assert sorted(stdout.split()) == sorted(str(out / name) for name in done)


def test_a_run_without_interruption_equals_the_resumed_one(tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as m:
        edit_calls(m, fail_on=3)
        run_cli([*EDIT, "--out", tmp_path / "resumed"], capsys)
    assert run_cli([*EDIT, "--out", tmp_path / "resumed"], capsys)[0] == EXIT_OK
    assert run_cli([*EDIT, "--out", tmp_path / "whole"], capsys)[0] == EXIT_OK
    assert contents(tmp_path / "resumed") == contents(tmp_path / "whole")


@pytest.mark.parametrize("change", ["target", "setting", "no-resume", "image bytes"])
def test_any_change_to_the_request_makes_the_output_again(tmp_path, capsys, monkeypatch, change):
    image = tmp_path / "in" / "photo.png"
    image.parent.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    argv = ["edit", image, "--prompt", "a photo", "--target", "a painting", "--method", "ddim", *TINY, "--out",
            tmp_path / "out"]
    assert run_cli(argv, capsys)[0] == EXIT_OK
    before = recorded_request(tmp_path / "out" / "photo.png")
    assert before is not None and len(before) == 32
    if change == "target":
        argv[argv.index("a painting")] = "a drawing"
    elif change == "setting":
        argv += ["--guidance", "5"]
    elif change == "no-resume":
        argv += ["--no-resume"]
    else:  # the same file name, other pixels
        Image.new("RGB", (40, 40), (30, 200, 30)).save(image)
    with monkeypatch.context() as m:
        calls = edit_calls(m)
        assert run_cli(argv, capsys)[0] == EXIT_OK
    assert calls == [["photo"]]
    after = recorded_request(tmp_path / "out" / "photo.png")
    assert (after == before) == (change == "no-resume")


def test_invert_resumes_only_from_whole_inversions(tmp_path, capsys, monkeypatch):
    import nti.batch

    argv = ["invert", *PHOTOS[:2], "--prompt", "a photo", "--method", "ddim", *TINY, "--out", tmp_path / "inv"]
    assert run_cli(argv, capsys)[0] == EXIT_OK
    (tmp_path / "inv" / "astronaut.json").unlink()  # half of an inversion: not a finished output
    inverted = []
    real = nti.batch.invert_jobs
    monkeypatch.setattr(nti.batch, "invert_jobs", lambda pipe, jobs, *a: (inverted.extend(j.name for j in jobs),
                                                                           real(pipe, jobs, *a)))
    code, out, _ = run_cli(argv, capsys)
    assert code == EXIT_OK and inverted == ["astronaut"]
    assert sorted(p.name for p in (tmp_path / "inv").iterdir()) == ["astronaut.json", "astronaut.safetensors",
                                                                   "chelsea.json", "chelsea.safetensors"]


def test_an_output_without_a_request_is_replaced_not_kept(tmp_path, capsys, monkeypatch):
    """An nti PNG written before outputs recorded requests (or by nti serve) carries no key: made again."""
    from nti.images import save_png
    out = tmp_path / "out"
    save_png(Image.new("RGB", (8, 8)), out / "chelsea.png")
    with monkeypatch.context() as m:
        calls = edit_calls(m)
        assert run_cli([*EDIT[:2], *EDIT[4:], "--out", out], capsys)[0] == EXIT_OK
    assert calls == [["chelsea"]]
    with Image.open(out / "chelsea.png") as img:
        assert img.size != (8, 8) and REQUEST_TAG in img.info

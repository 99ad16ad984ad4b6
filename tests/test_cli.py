"""The `nti` command: outputs, reuse of saved inversions, and one readable line with exit 2 on bad input."""
import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nti.cli import EXIT_BAD_INPUT, main

FAST = ["--steps", "3", "--inner-steps", "2", "--quiet", "--device", "cpu", "--model", "tiny"]  # photo prompts


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_edit_writes_a_png(tmp_path, capsys):
    out = tmp_path / "tiger.png"
    code, stdout, _ = run_cli(["edit", "skimage:chelsea", "--prompt", "a cat", "--target", "a tiger", "--out",
                               str(out), *FAST], capsys)
    assert code == 0 and out.is_file() and str(out) in stdout
    assert Image.open(out).size == (32, 32)


def test_invert_then_edit_from_the_saved_inversion(tmp_path, capsys):
    art = tmp_path / "cat.safetensors"
    assert run_cli(["invert", "skimage:chelsea", "--prompt", "a cat", "--out", str(art), *FAST], capsys)[0] == 0
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert run_cli(["edit", "--inversion", str(art), "--target", "a tiger", "--out", str(a), *FAST], capsys)[0] == 0
    assert run_cli(["edit", "skimage:chelsea", "--prompt", "a cat", "--target", "a tiger", "--out", str(b), *FAST],
                   capsys)[0] == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_many_images_from_jsonl_and_cache_resume(tmp_path, capsys):
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "grey.png")
    lines = [{"image": "grey.png", "source_prompt": "a gray room", "target_prompt": "a red room"},
             {"image": "skimage:chelsea", "id": "cat", "source_prompt": "a cat", "target_prompt": "a dog"}]
    jsonl = tmp_path / "jobs.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines))
    cache = tmp_path / "cache"
    code, stdout, _ = run_cli(["edit", str(jsonl), "--out", str(tmp_path / "out"), "--cache", str(cache), *FAST],
                              capsys)
    assert code == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["cat.png", "grey.png"]
    saved = sorted(cache.glob("*.safetensors"))
    assert len(saved) == 2
    stamps = [p.stat().st_mtime_ns for p in saved]
    assert run_cli(["edit", str(jsonl), "--out", str(tmp_path / "out2"), "--cache", str(cache), *FAST],
                   capsys)[0] == 0
    assert [p.stat().st_mtime_ns for p in sorted(cache.glob("*.safetensors"))] == stamps  # reused, not redone


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("corrupt", "not a readable image"),
    ("folder-as-image", "no images"),
    ("steps", "--steps: must be at least 1"),
    ("model", "model folder"),
    ("no-prompt", "no source prompt"),
    ("out-suffix", "expected a .png file or a folder"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, case, message):
    corrupt = tmp_path / "bad.png"
    corrupt.write_bytes(b"\x89PNG not really")
    (tmp_path / "empty").mkdir()
    base = ["edit", "--prompt", "a", "--target", "b", "--out", str(tmp_path / "o.png"), *FAST]
    argv = {
        "missing": base + [str(tmp_path / "nope.png")],
        "corrupt": base + [str(corrupt)],
        "folder-as-image": base + [str(tmp_path / "empty")],
        "steps": base + ["skimage:chelsea", "--steps", "0"],
        "model": base + ["skimage:chelsea", "--model", str(tmp_path / "no-model")],
        "no-prompt": ["reconstruct", "skimage:chelsea", "--out", str(tmp_path / "o.png"), *FAST],
        "out-suffix": ["edit", "skimage:chelsea", "--prompt", "a", "--target", "b", "--out",
                       str(tmp_path / "o.jpg"), *FAST],
    }[case]
    with pytest.raises(SystemExit) if case == "steps" else contextlib.nullcontext() as exc:
        code = main(argv)
    code = exc.value.code if case == "steps" else code
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT
    error_lines = [line for line in err.splitlines() if line.startswith("nti: error")]
    assert len(error_lines) == 1 and message in error_lines[0] and "Traceback" not in err


def test_console_script_runs_in_a_fresh_process(tmp_path):
    out = tmp_path / "r.png"
    proc = subprocess.run([sys.executable, "-m", "nti.cli", "reconstruct", "skimage:chelsea", "--prompt",
                           "a cat", "--out", str(out), "--method", "ddim", *FAST],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    proc = subprocess.run([sys.executable, "-m", "nti.cli", "edit", "nope.png", "--prompt", "a", "--target",
                           "b", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_BAD_INPUT and proc.stderr.strip().endswith("nope.png does not exist")


def test_edit_reads_a_prompts_jsonl_as_eval_does(tmp_path, capsys):
    """`nti edit FILE.jsonl` and `nti eval --data FILE.jsonl` share one reader: the bundled photo prompts (which name
    their photos as {"skimage": NAME}) edit as written, one output per record id."""
    from nti.data import SAMPLE_PROMPTS, load_dataset

    code, stdout, err = run_cli(["edit", str(SAMPLE_PROMPTS), "--out", str(tmp_path / "out"), "--steps", "2",
                                 "--method", "ddim", "--quiet", "--device", "cpu", "--model", "tiny"], capsys)
    assert code == 0, err
    ids = sorted(s.id for s in load_dataset("sample"))
    assert sorted(p.stem for p in (tmp_path / "out").iterdir()) == ids and len(ids) >= 5


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("nti-engine ")


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   MemoryError()])
def test_running_out_of_memory_says_what_to_lower(tmp_path, capsys, monkeypatch, error):
    """An out-of-memory error (batch 16 on a 24 GB card) was 'nti: internal error: OutOfMemoryError ... (rerun with
    --debug)', exit 1, as if it were a bug. It is the machine's limit: one line saying what to lower, exit 2."""
    import nti.api

    def no_room(*args, **kwargs):
        raise error

    monkeypatch.setattr(nti.api, "invert", no_room)
    code = main(["edit", "skimage:chelsea", "--prompt", "a cat", "--target", "a dog", "--model", "tiny", "--steps",
                 "2", "--backend", "fast", "--batch-size", "16", "--out", str(tmp_path / "out.png"), "--quiet"])
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # (after the tiny model's warning that its weights are random)
    assert code == EXIT_BAD_INPUT and "internal error" not in err and "Traceback" not in err
    assert last.startswith("nti: error: out of ") and "a smaller --batch-size (this run's: 16)" in last
    assert "--gradient-checkpointing (fast backend) or --precision bf16" in last and "same command resumes" in last

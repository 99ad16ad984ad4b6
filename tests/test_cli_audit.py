"""The `nti` command over long runs: interrupted (Ctrl-C, SIGTERM) and resumed, a full disk, a rerun under other
settings; never a lost, half-written or silently reused file. Runs the built-in shapes model on its bundled scenes
(3 steps), in a child process where a real signal is sent."""
import csv
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from nti.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK
from nti.outputs import recorded_request

from tests.test_bad_input import error_line, run_cli

SCENES = Path(__file__).resolve().parents[1] / "engine" / "assets" / "scenes"
FAST = ["--steps", "3", "--inner-steps", "2", "--device", "cpu"]


@pytest.fixture
def jobs(tmp_path) -> Path:
    """A JSONL of three scene edits (the bundled prompts), its images named by absolute path."""
    records = [json.loads(line) for line in (SCENES / "prompts.jsonl").read_text().splitlines()[0:6:2]]
    records = [{"id": r["id"], "image": str(SCENES / r["image"]), "source_prompt": r["source_prompt"],
                "target_prompt": r["target_prompt"]} for r in records]
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def contents(folder: Path) -> dict:
    """Every file under folder (hidden ones, such as a left-over temp file, included), by name."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def child(argv, prelude: str = "", env: dict | None = None) -> subprocess.Popen:
    """`nti ARGV` in a fresh Python process, after `prelude` (a patch) has run."""
    code = prelude + "\nimport sys\nfrom nti.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"})


# ------------------------------------------------------------------------------------------------------ SIGTERM

@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_sigterm_while_an_output_is_written_leaves_no_temp_file_and_the_same_command_finishes(jobs, tmp_path,
                                                                                              capsys, sig):
    """SIGTERM (`kill`, a scheduler's or a container's stop) and SIGHUP (the terminal closed) killed nti on the spot
    (exit -15 / -1, no message): the `.NAME.xxxx.part` file being written stayed in --out for good. Each is an
    interruption as Ctrl-C is."""
    out = tmp_path / "out"
    argv = ["edit", jobs, *FAST, "--out", out]
    # the second output's temp file is half-written when the signal arrives
    prelude = f"SIG = '{sig}'" + textwrap.dedent("""
        import os, signal
        from PIL import Image
        real, temps = Image.Image.save, []
        def save(self, fp, *args, **kwargs):
            if str(fp).endswith(".part"):
                temps.append(fp)
                if len(temps) == 2:
                    open(fp, "wb").write(b"half a png")
                    os.kill(os.getpid(), getattr(signal, SIG))
            return real(self, fp, *args, **kwargs)
        Image.Image.save = save
    """)
    proc = child(argv, prelude)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr and stderr.rstrip().endswith("nti: interrupted")
    assert "1 of 3 outputs were written before the interruption" in stderr
    assert list(contents(out)) == ["scene0-colour.png"] and stdout.split() == [str(out / "scene0-colour.png")]

    code, stdout, err = run_cli([*argv, "--quiet"], capsys)  # the same command: the other two only
    assert code == EXIT_OK, err
    assert run_cli(["edit", jobs, *FAST, "--quiet", "--out", tmp_path / "whole"], capsys)[0] == EXIT_OK
    assert contents(out) == contents(tmp_path / "whole")


def test_an_interruption_inside_a_progress_bars_constructor_prints_no_traceback(jobs, tmp_path):
    """A SIGTERM or Ctrl-C that lands while tqdm builds a bar leaves a half-made bar, whose __del__ then failed as
    the interrupted frames were freed: 'Exception ignored in tqdm.__del__ ... Traceback' under 'nti: interrupted'
    (seen once in CI). The CLI frees them before its last line, with Python's report of it silenced."""
    prelude = textwrap.dedent("""
        from tqdm import std
        real = std.tqdm.__init__
        def init(self, *args, **kwargs):
            if str(kwargs.get("desc", "")).startswith("null-text"):
                self.disable = False
                raise KeyboardInterrupt  # before tqdm sets self.pos, as a signal there does
            return real(self, *args, **kwargs)
        std.tqdm.__init__ = init
    """)
    proc = child(["edit", jobs, *FAST, "--out", tmp_path / "out"], prelude)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert stderr.rstrip().endswith("nti: interrupted")


def test_an_ignored_sighup_stays_ignored(jobs, tmp_path):
    """`nohup nti ...` (SIGHUP ignored before nti starts): a closed terminal must not stop the run it was meant to
    outlive; nti only turns a SIGHUP that would have killed it into an interruption."""
    out = tmp_path / "out"
    prelude = textwrap.dedent("""
        import os, signal
        from PIL import Image
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        real, temps = Image.Image.save, []
        def save(self, fp, *args, **kwargs):
            temps.append(fp)
            if len(temps) == 1:
                os.kill(os.getpid(), signal.SIGHUP)
            return real(self, fp, *args, **kwargs)
        Image.Image.save = save
    """)
    proc = child(["edit", jobs, *FAST, "--quiet", "--out", out], prelude)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_OK, stderr
    assert sorted(contents(out)) == ["scene0-colour.png", "scene1-colour.png", "scene2-colour.png"]


def test_sigterm_from_outside_mid_batch_exits_130_and_keeps_only_whole_outputs(jobs, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["edit", jobs, "--steps", "6", "--inner-steps", "3", "--device", "cpu", "--out", out]
    prelude = textwrap.dedent("""
        import time
        from PIL import Image
        temps = []
        def save(self, fp, *args, **kwargs):  # the batch cannot end before the signal: it comes in the work, or here
            temps.append(fp)
            time.sleep(60 if len(temps) == 3 else 0)
            return real(self, fp, *args, **kwargs)
        real, Image.Image.save = Image.Image.save, save
    """)
    proc = child(argv, prelude)
    deadline = time.monotonic() + 240
    while not (out.is_dir() and any(p.suffix == ".png" for p in out.iterdir())) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_INTERRUPTED and "Traceback" not in stderr, stderr
    assert stderr.rstrip().endswith("nti: interrupted")
    made = contents(out)
    assert 1 <= len(made) < 3 and all(not name.startswith(".") for name in made)
    for path in out.iterdir():  # whole, and recorded as this request's
        with Image.open(path) as img:
            img.load()
        assert recorded_request(path) is not None
    code, _, err = run_cli([*argv, "--quiet"], capsys)
    assert code == EXIT_OK and sorted(contents(out)) == ["scene0-colour.png", "scene1-colour.png",
                                                         "scene2-colour.png"]
    assert all(contents(out)[name] == data for name, data in made.items())  # kept, not made again



# ------------------------------------------------------------------------------------------ stdout, the output list

def buffered_env() -> dict:
    """The child's environment with Python's stdout block-buffered, as it is in a pipe unless PYTHONUNBUFFERED."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def test_each_output_is_listed_on_stdout_when_it_is_written(jobs, tmp_path):
    """stdout lists the outputs for a script to read, but in a pipe it was block-buffered: a reader saw no path
    until the batch ended, and a killed run (SIGKILL, out of memory) never listed the outputs it had finished."""
    out = tmp_path / "out"
    prelude = textwrap.dedent("""
        import os, signal
        from PIL import Image
        temps = []
        def save(self, fp, *args, **kwargs):
            temps.append(fp)
            os.kill(os.getpid(), signal.SIGKILL) if len(temps) == 2 else real(self, fp, *args, **kwargs)
        real, Image.Image.save = Image.Image.save, save
    """)
    proc = child(["edit", jobs, *FAST, "--quiet", "--out", out], prelude, buffered_env())
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert stdout.split() == [str(out / "scene0-colour.png")] and (out / "scene0-colour.png").is_file()



def test_a_reader_that_closes_stdout_interrupts_the_batch_not_a_bug(jobs, tmp_path, capsys):
    """`nti edit ... | head -1`: the next path written to the closed pipe ended the run as an 'internal error:
    BrokenPipeError (rerun with --debug)', exit 1, the code README keeps for bugs."""
    out = tmp_path / "out"
    argv = ["edit", jobs, *FAST, "--quiet", "--out", out]
    prelude = textwrap.dedent("""
        import select, sys, time
        from PIL import Image
        temps = []
        def save(self, fp, *args, **kwargs):  # the second output waits for the reader to go: no race with it
            temps.append(fp)
            poller = select.poll()
            poller.register(sys.stdout.fileno(), select.POLLOUT)
            deadline = time.monotonic() + 60
            while len(temps) == 2 and time.monotonic() < deadline:
                if any(events & select.POLLERR for _, events in poller.poll(0)):
                    break
                time.sleep(0.01)
            return real(self, fp, *args, **kwargs)
        real, Image.Image.save = Image.Image.save, save
    """)
    proc = child(argv, prelude)
    assert proc.stdout.readline().strip() == str(out / "scene0-colour.png")
    proc.stdout.close()  # what `head -1` does after its line
    stderr = proc.stderr.read()
    proc.wait(timeout=300)
    assert proc.returncode == EXIT_INTERRUPTED and "internal error" not in stderr and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("nti: interrupted: standard output was closed")
    assert all(not p.name.startswith(".") for p in out.iterdir())
    code, stdout, _ = run_cli(argv, capsys)  # the same command finishes the batch, listing every output
    assert code == EXIT_OK and len(stdout.split()) == 3


# ------------------------------------------------------------------------------------------------------ nti eval

def eval_argv(data: Path, out: Path) -> list:
    return ["eval", "--data", data, "--methods", "ddim", "--steps", "2", "--device", "cpu", "--quiet", "--out", out]


def rows(out: Path) -> list[dict]:
    """samples.csv's rows without the timing columns (seconds differ from run to run)."""
    with open(out / "samples.csv", newline="") as f:
        return [{k: v for k, v in row.items() if not k.endswith("_s")} for row in csv.DictReader(f)]


def test_eval_refuses_to_resume_rows_of_a_sample_whose_prompts_changed(jobs, tmp_path, capsys):
    """run.json records the data set by its path: after the JSONL's target prompt was edited in place, a rerun kept
    the row (and edit image) made under the old prompt and reported it as the new one's, exit 0."""
    out = tmp_path / "eval"
    argv = eval_argv(jobs, out)
    code, _, err = run_cli(argv, capsys)
    assert code == EXIT_OK, err
    before = {name: (out / name).read_bytes() for name in ("samples.csv", "run.json")}
    records = [json.loads(line) for line in jobs.read_text().splitlines()]
    records[1]["target_prompt"] = "a red square and a blue triangle on a black background"
    jobs.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, _, err = run_cli(argv, capsys)
    line = error_line(err)
    assert code == EXIT_BAD_INPUT and records[1]["id"] in line and "--overwrite" in line
    assert {name: (out / name).read_bytes() for name in before} == before
    assert run_cli([*argv, "--overwrite"], capsys)[0] == EXIT_OK
    assert [row["target_prompt"] for row in rows(out)] == [r["target_prompt"] for r in records]


def test_eval_on_a_full_disk_exits_2_and_the_same_command_completes_the_rows(jobs, tmp_path, capsys, monkeypatch):
    """A full disk while samples.csv was appended to was an internal error (exit 1, 'rerun with --debug')."""
    import builtins
    import nti.evaluate

    real_open = builtins.open

    class Full:  # samples.csv on a disk that fills up in the middle of the second sample's row
        def __init__(self, f):
            self.f = f

        def write(self, text):
            if "scene1" in text:
                self.f.write(text[:len(text) // 2])
                self.f.flush()
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    def full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if Path(path).name == "samples.csv" and "a" in mode else f

    out = tmp_path / "eval"
    with monkeypatch.context() as m:
        m.setattr(nti.evaluate, "open", full_disk, raising=False)
        code, _, err = run_cli(eval_argv(jobs, out), capsys)
    line = error_line(err)
    assert code == EXIT_BAD_INPUT and "No space left on device" in line and "samples.csv" in line
    assert [row["id"] for row in rows(out) if None not in row.values()] == ["scene0-colour"]
    assert run_cli(eval_argv(jobs, out), capsys)[0] == EXIT_OK
    assert run_cli(eval_argv(jobs, tmp_path / "whole"), capsys)[0] == EXIT_OK
    assert rows(out) == rows(tmp_path / "whole")  # none lost, none twice, in the same order


def test_eval_refuses_to_add_rows_of_a_sample_whose_image_was_replaced(tmp_path, capsys):
    """A data set's image replaced in place (same path, same prompts): a rerun adding null-text to the ddim rows
    scored null-text on the new image beside ddim's rows of the old one (null-text 5.8 dB against DDIM's 25 dB),
    under one sample id, exit 0."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "s.png").write_bytes((SCENES / "scene0.png").read_bytes())
    (data / "prompts.jsonl").write_text(json.dumps({"id": "s0", "image": "s.png", "source_prompt": "a yellow "
                                                    "triangle on a gray background", "target_prompt": "a blue "
                                                    "triangle on a gray background"}) + "\n")
    out = tmp_path / "eval"
    argv = ["eval", "--data", data / "prompts.jsonl", "--steps", "2", "--inner-steps", "1", "--device", "cpu",
            "--quiet", "--out", out, "--methods"]
    assert run_cli([*argv, "ddim"], capsys)[0] == EXIT_OK
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (data / "s.png").write_bytes((SCENES / "scene3.png").read_bytes())
    code, _, err = run_cli([*argv, "ddim,null-text"], capsys)
    line = error_line(err)
    assert code == EXIT_BAD_INPUT and "'s0'" in line and "--overwrite" in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    (data / "s.png").write_bytes((SCENES / "scene0.png").read_bytes())  # the image its rows were made from
    assert run_cli([*argv, "ddim,null-text"], capsys)[0] == EXIT_OK
    assert [row["method"] for row in rows(out)] == ["ddim", "null-text"]


# ---------------------------------------------------------------------------------------------- nti invert's twin

def test_a_twin_left_by_a_failed_inversion_write_is_not_kept_beside_another_inversion(tmp_path, capsys,
                                                                                      monkeypatch):
    """save_inversion writes the readable .json twin first: a full disk at the .safetensors left the new twin beside
    the previous run's inversion, and a rerun of that previous request kept the pair as finished, its .json
    describing settings (here 3 steps) that the inversion (2 steps) was not made with."""
    import nti.artifact
    from nti.artifact import load_inversion

    out = tmp_path / "inv" / "scene0.safetensors"
    argv = ["invert", SCENES / "scene0.png", "--prompt", "a yellow triangle on a gray background", "--device", "cpu",
            "--inner-steps", "1", "--quiet", "--out", out]
    assert run_cli([*argv, "--steps", "2"], capsys)[0] == EXIT_OK
    real = nti.artifact.write_atomic

    def full_disk(path, data):
        if path.suffix == ".safetensors":
            raise nti.artifact.NTIError(f"could not write {path}: No space left on device")
        real(path, data)
    with monkeypatch.context() as m:
        m.setattr(nti.artifact, "write_atomic", full_disk)
        code, _, err = run_cli([*argv, "--steps", "3"], capsys)
    assert code == EXIT_BAD_INPUT and "No space left on device" in error_line(err)

    assert run_cli([*argv, "--steps", "2"], capsys)[0] == EXIT_OK
    twin = json.loads(out.with_suffix(".json").read_text())
    assert twin == load_inversion(out).metadata() and twin["settings"]["steps"] == 2

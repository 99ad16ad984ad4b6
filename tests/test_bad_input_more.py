"""More bad input (issue 18), found by running `nti` on inputs tests/test_bad_input.py does not cover: odd files
(a pipe, over-long names), unusual pixel formats, JSONL edge cases and prompts. Each test failed before its fix."""
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nti.cli import EXIT_BAD_INPUT, EXIT_OK, main

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


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is loaded: the problem must be found before any model work."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although the input was already known to be bad")
    monkeypatch.setattr("nti.models.load_pipeline", refuse)


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

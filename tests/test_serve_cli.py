"""`nti serve` is one subcommand of the core CLI, which must parse without the serve extra installed."""
import sys

import pytest

from nti.cli import build_parser, main


def test_serve_parses_without_fastapi_and_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the serve extra were absent
    monkeypatch.delitem(sys.modules, "nti.serve", raising=False)
    args = build_parser().parse_args(["serve", "--port", "0", "--batch-size", "4"])
    assert (args.host, args.batch_size, args.max_delay_ms) == ("127.0.0.1", 4, 50.0)  # loopback unless told
    assert main(["serve", "--port", "0"]) == 2
    assert "pip install -e '.[serve]'" in capsys.readouterr().err


def test_serve_rejects_bad_flags_like_the_other_commands():
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--batch-size", "0"])
    assert exit_info.value.code == 2


def test_serve_ray_flags_need_ray_and_say_what_to_install(monkeypatch, capsys):
    assert main(["serve", "--port", "0", "--max-replicas", "4"]) == 2  # a Ray flag without --ray: refused, not ignored
    assert "--max-replicas only apply with --ray" in capsys.readouterr().err
    pytest.importorskip("fastapi")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.delitem(sys.modules, "nti.serve_ray", raising=False)
    assert main(["serve", "--port", "0", "--ray"]) == 2
    assert "nti serve --ray needs Ray Serve (ray is missing): pip install -e '.[ray]'" in capsys.readouterr().err


@pytest.fixture
def dead_address():
    """HOST:PORT where nothing listens (a port just freed), with a 60 s alarm: ray.init used to retry it for minutes."""
    import signal
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def hung(*_):
        raise TimeoutError("still waiting on a dead Ray address after 60 s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield f"127.0.0.1:{port}"
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("command", ["edit", "serve"])
def test_a_ray_address_where_nothing_answers_is_refused_at_once(command, dead_address, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve" if command == "serve" else "ray.data")
    if ray.is_initialized():  # a cluster this process already joined would be used as it is
        ray.shutdown()
    scene = "engine/assets/scenes/scene0.png"
    argv = {"edit": ["edit", scene, "--prompt", "a red circle", "--target", "a blue circle", "--out",
                     str(tmp_path / "o.png"), "--device", "cpu"],
            "serve": ["serve", "--port", "0", "--data", str(tmp_path / "data")]}[command]
    assert main([*argv, "--ray", dead_address]) == 2
    err = capsys.readouterr().err
    assert f"nothing answers at the Ray cluster address '{dead_address}'" in err and "ray start --head" in err
    assert "Traceback" not in err and not ray.is_initialized() and not list(tmp_path.iterdir())

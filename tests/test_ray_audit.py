"""`--ray` against the single-process run where they parted: a job's bad prompts, a --cache that is not a folder, a
--model folder given relative to the driver, and an actor whose node holds another model. One local 2-CPU Ray
cluster for the module (started and stopped here), shapes model, 2 steps."""
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from nti.cli import EXIT_BAD_INPUT, EXIT_OK, main

SCENES = Path(__file__).resolve().parents[1] / "engine" / "assets" / "scenes"
FAST = ["--steps", "2", "--inner-steps", "1", "--quiet", "--device", "cpu"]  # the shapes model, reference backend
SCENE0 = ["a yellow triangle on a gray background", "a blue triangle on a gray background"]


def single_process(argv: list[str]) -> int:
    """The same command without Ray (as if it were not installed), one torch thread as each actor has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sys.modules, "ray", None)
            return main(argv)
    finally:
        torch.set_num_threads(threads)


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_job_with_bad_prompts_fails_alone_as_in_the_single_process_run(cluster, tmp_path, capsys):
    """A p2p-replace pair of different lengths and an over-long prompt: the single-process run names each bad job,
    writes the good one and exits 2. On Ray the actor raised them, Ray aborted the dataset, and the run ended with a
    multi-line `internal error` (exit 1) and no output at all."""
    records = [
        {"id": "good", "image": str(SCENES / "scene0.png"), "source_prompt": SCENE0[0], "target_prompt": SCENE0[1]},
        {"id": "unequal", "image": str(SCENES / "scene1.png"),
         "source_prompt": "a red square and a red triangle on a black background",
         "target_prompt": "a red square on a black background"},
        {"id": "long", "image": str(SCENES / "scene2.png"), "source_prompt": "a " * 20 + "red circle",
         "target_prompt": "a blue circle"},
    ]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["edit", str(jobs), "--edit", "p2p-replace", *FAST]
    assert single_process([*argv, "--out", str(tmp_path / "single")]) == EXIT_BAD_INPUT
    single_err = capsys.readouterr().err
    assert "p2p-replace swaps words one for one" in single_err and "tokens long" in single_err
    code = main([*argv, "--out", str(tmp_path / "ray"), "--ray", "--num-workers", "1"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert "internal error" not in err and "Traceback" not in err
    assert "skipped unequal" in err and "p2p-replace swaps words one for one" in err
    assert "skipped long" in err and "tokens long" in err
    assert "2 of 3 inputs failed" in err
    assert files(tmp_path / "ray") == files(tmp_path / "single") and list(files(tmp_path / "ray")) == ["good.png"]


def test_fail_fast_stops_at_the_first_unreadable_image(cluster, tmp_path, capsys):
    """`--fail-fast` stops at the first bad input (README). On Ray an unreadable image found by the loading tasks was
    skipped and the run went on to the end, as without the flag."""
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really an image")
    records = [{"id": "broken", "image": str(bad), "source_prompt": SCENE0[0], "target_prompt": SCENE0[1]},
               {"id": "good", "image": str(SCENES / "scene0.png"), "source_prompt": SCENE0[0],
                "target_prompt": SCENE0[1]}]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(r) + "\n" for r in records))
    code = main(["edit", str(jobs), "--out", str(tmp_path / "out"), *FAST, "--fail-fast", "--ray", "--num-workers",
                 "1"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    lines = [line for line in err.splitlines() if line.startswith("nti:")]
    assert len(lines) == 1 and lines[0].startswith("nti: error: broken: ") and str(bad) in lines[0], err
    assert "not a readable image" in lines[0]


def test_a_cache_that_is_a_file_is_refused_before_the_cluster_works(cluster, tmp_path, monkeypatch, capsys):
    """The single-process run refuses it up front (exit 2); on Ray every actor's first save raised it: exit 1, an
    `internal error` with Ray's traceback, after the model loads and the first inversion."""
    import nti.distributed

    def no_work(*args, **kwargs):
        raise AssertionError("the cluster was given work")
    monkeypatch.setattr(nti.distributed, "_pipeline", no_work)
    cache = tmp_path / "cache"
    cache.write_text("not a folder")
    code = main(["edit", str(SCENES / "scene0.png"), "--prompt", SCENE0[0], "--target", SCENE0[1], "--out",
                 str(tmp_path / "out.png"), "--cache", str(cache), *FAST, "--ray"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    assert err.startswith("nti: error: --cache ") and str(cache) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out.png").exists()


def test_the_actors_get_a_relative_export_cache_as_the_drivers_folder(cluster, tmp_path, monkeypatch, capsys):
    """`--export-cache exports` (the exported UNets `nti export` built) went to the actors as typed: each looked in, and
    built into, an `exports` folder of its own working folder. What the actors' config says, caught at the hand-over
    to the cluster."""
    import nti.distributed

    given = {}

    def caught(ray, args, batches, card, device, config, *rest):
        given["config"] = config
        raise KeyboardInterrupt  # no work: the hand-over is what is checked
    monkeypatch.setattr(nti.distributed, "_pipeline", caught)
    monkeypatch.chdir(tmp_path)
    code = main(["edit", str(SCENES / "scene0.png"), "--prompt", SCENE0[0], "--target", SCENE0[1], "--out", "o.png",
                 "--export-cache", "exports", *FAST, "--ray"])
    assert code == 130, capsys.readouterr().err
    assert given["config"].export_cache == str(tmp_path / "exports")


def test_an_interrupted_ray_run_says_what_is_written_and_that_a_rerun_resumes(cluster, tmp_path, monkeypatch,
                                                                             capsys):
    """Ctrl-C in a long single-process run says how many outputs are written and that the same command again does
    the rest; on Ray it said only `nti: interrupted`. The cluster's answer is played here: the first output, then
    the interruption."""
    import nti.distributed

    class Interrupted:
        def __init__(self, batches):
            self.job = batches[0].jobs[0]

        def iter_rows(self):
            yield {"name": self.job["name"], "image": self.job["image"], "out": self.job["out"], "json": "",
                   "data": (SCENES / "scene0.png").read_bytes(), "error": "", "seconds": 1.0, "gave_up": False,
                   "actor": "node:1", "load_s": 1.0}
            raise KeyboardInterrupt
    monkeypatch.setattr(nti.distributed, "_pipeline", lambda ray, args, batches, *rest: Interrupted(batches))
    out = tmp_path / "out"
    code = main(["edit", str(SCENES / "scene0.png"), str(SCENES / "scene1.png"), "--prompt", SCENE0[0], "--target",
                 SCENE0[1], "--out", str(out), *FAST, "--ray"])
    err = capsys.readouterr().err
    assert code == 130, err
    assert "1 of 2 outputs were written before the interruption; the same command again keeps them and does the " \
           "rest" in err
    assert [p.name for p in out.iterdir()] == ["scene0.png"]


def test_a_model_folder_relative_to_the_driver_reaches_the_actors(cluster, tmp_path, monkeypatch, capsys):
    """`--model models/mine` worked on the driver (it read the configs) but the actors of a cluster started elsewhere
    (the module's, before the chdir; as `ray start` starts one, in its own folder) found no such folder: an `internal
    error` (exit 1). Now they get the absolute path, and the inversion still records the model under the name the
    single-process run gives it."""
    from nti.artifact import load_inversion
    from nti.models import SHAPES_FOLDER

    monkeypatch.chdir(tmp_path)
    shutil.copytree(SHAPES_FOLDER, tmp_path / "models" / "mine")
    argv = ["invert", str(SCENES / "scene0.png"), "--prompt", SCENE0[0], "--model", "models/mine", *FAST]
    assert single_process([*argv, "--out", "single.safetensors"]) == EXIT_OK
    code = main([*argv, "--out", "ray.safetensors", "--ray"])
    assert code == EXIT_OK, capsys.readouterr().err
    single, ray = load_inversion(tmp_path / "single.safetensors"), load_inversion(tmp_path / "ray.safetensors")
    assert ray.model_name == single.model_name == "models/mine"
    assert torch.equal(ray.z_T, single.z_T) and torch.equal(ray.null_embeddings, single.null_embeddings)


def test_an_actor_whose_node_holds_another_model_stops_the_run_with_one_line(cluster, tmp_path, monkeypatch, capsys):
    """Every node needs the same model folder. A batch run's actors never compared their model with the driver's, so
    another copy on a node made images recorded under the driver's fingerprint (a rerun kept them as finished). The
    driver's card says another fingerprint here, as a node with another copy would."""
    import nti.distributed

    real_card = nti.distributed.model_card

    def other_copy(model):
        card = real_card(model)
        card.fingerprint = "0" * 16
        return card
    monkeypatch.setattr(nti.distributed, "model_card", other_copy)
    out = tmp_path / "out"
    code = main(["edit", str(SCENES / "scene0.png"), str(SCENES / "scene1.png"), "--prompt", SCENE0[0], "--target",
                 SCENE0[1], "--out", str(out), *FAST, "--ray", "--num-workers", "1"])
    err = capsys.readouterr().err
    assert code == EXIT_BAD_INPUT, err
    lines = [line for line in err.splitlines() if line.startswith("nti:")]
    assert len(lines) == 1 and lines[0].startswith("nti: error: a Ray worker stopped the run: the model on this node "
                                                   "has fingerprint ") and "0" * 16 in lines[0], err
    assert "internal error" not in err
    assert not out.exists() or not list(out.iterdir())


def test_a_ray_worker_refusing_one_edit_of_a_batch_fails_that_job_alone(shapes_pipe, monkeypatch):
    """The single-process run retries a batch whose edit raised NTIError image by image (batch.edit_and_save), so one
    refused edit costs only its own output. The Ray worker let it out of the batch: Ray aborted the whole run. The
    actor's batch method runs here in-process (no cluster)."""
    import numpy as np
    from PIL import Image

    import nti.api
    from nti import NTIConfig
    from nti.config import NTIError
    from nti.distributed import EngineWorker

    side = shapes_pipe.resolution
    pixels = b"".join(np.asarray(Image.open(SCENES / f"scene{k}.png").convert("RGB").resize((side, side))).tobytes()
                      for k in (1, 2))
    targets = {1: "a red square and a blue triangle on a black background",
               2: "a green square and a red triangle on a black background"}
    jobs = [{"name": f"scene{k}", "image": str(SCENES / f"scene{k}.png"), "out": "unused.png", "request": None,
             "source_prompt": "a red square and a red triangle on a black background", "target_prompt": targets[k]}
            for k in (1, 2)]
    worker = object.__new__(EngineWorker)  # the actor's state without Ray's constructor
    worker.pipe, worker.command, worker.cache, worker.resolution = shapes_pipe, "edit", None, side
    worker.config, worker.calls = NTIConfig(backend="fast", steps=2, inner_steps=1, batch_size=2), 0
    real_edit = nti.api.edit_latents

    def refuses_green(pipe, inversions, prompts, *args, **kwargs):
        if any("green" in p for p in prompts):
            raise NTIError("the engine refused this edit")
        return real_edit(pipe, inversions, prompts, *args, **kwargs)
    monkeypatch.setattr(nti.api, "edit_latents", refuses_green)
    good, bad = worker.run_batch(jobs, pixels)
    assert good["error"] == "" and Image.open(io.BytesIO(good["data"])).size == (side, side)
    assert bad["error"] == "the engine refused this edit" and not bad["data"]


def test_serve_on_a_joined_cluster_loads_a_model_folder_relative_to_the_command(cluster, tmp_path):
    """`nti serve --ray HEAD:PORT --model models/mine`: the replicas of a cluster started elsewhere (as `ray start`
    starts one, in its own folder) looked for models/mine in their own folder and never started. Now they get the
    absolute folder, and name the model as plain `nti serve` does (its error messages and artifacts say models/mine)."""
    import signal
    import subprocess
    import time

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("ray.serve")
    pytest.importorskip("fastapi")
    from nti.benchmarks.bench_serve import free_port
    from nti.models import SHAPES_FOLDER

    shutil.copytree(SHAPES_FOLDER, tmp_path / "models" / "mine")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    address = cluster.get_runtime_context().gcs_address  # joined, as HEAD_IP:6379

    # a folder the command reads (configs, tokenizer) but the replicas cannot load: `internal error: RuntimeError:
    # Deploying application nti failed` said nothing of why; now the replica's own reason, one line, exit 2
    shutil.copytree(SHAPES_FOLDER, tmp_path / "models" / "cut")
    weights = tmp_path / "models" / "cut" / "unet" / "diffusion_pytorch_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    failed = subprocess.run([sys.executable, "-m", "nti.cli", "serve", "--ray", address, "--port", str(port), "--data",
                             "data", "--model", "models/cut", *FAST], cwd=tmp_path, capture_output=True, text=True,
                            env=env, timeout=240)
    assert failed.returncode == EXIT_BAD_INPUT, failed.stderr[-3000:]
    lines = [line for line in failed.stderr.splitlines() if line.startswith("nti:")]
    assert len(lines) == 1 and lines[0].startswith(f"nti: error: the engine replicas could not start: could not "
                                                   f"load the model in {tmp_path / 'models' / 'cut'}: "), failed.stderr

    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "nti.cli", "serve", "--ray", address, "--port", str(port),
                             "--data", "data", "--model", "models/mine", *FAST],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline, ready = time.time() + 120, None
        while proc.poll() is None and time.time() < deadline:
            try:
                ready = httpx.get(url + "/readyz", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert ready is not None and ready.status_code == 200, (tmp_path / "serve.log").read_text()[-3000:]
        image = {"image": ("s.png", (SCENES / "scene0.png").read_bytes(), "image/png")}
        r = httpx.post(url + "/v1/inversions", files=image, data={"source_prompt": "a yellow giraffe"}, timeout=60)
        assert r.status_code == 400 and "the models/mine model does not know the word(s) 'giraffe'" in r.text, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, (tmp_path / "serve.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:  # a failed start or a hung stop: everything this test started, by its group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()  # the app was deleted on SIGTERM; Serve's controller goes with the module's cluster

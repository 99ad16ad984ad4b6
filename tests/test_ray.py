"""`--ray` batch runs (issue 20) on a local 2-CPU Ray cluster this file starts: the same files as the single-process
run, an actor killed mid-run, a corrupt input among good ones, and no Ray needed without --ray."""
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from nti.cli import EXIT_BAD_INPUT, EXIT_OK, main

SCENES = Path(__file__).resolve().parents[1] / "engine" / "assets" / "scenes"
FAST = ["--steps", "3", "--inner-steps", "1", "--quiet", "--device", "cpu"]  # the shapes model, reference backend


def scene_records(n_images: int) -> list[dict]:
    """The first n_images bundled scenes, both edits of each, with absolute image (and edit mask) paths."""
    records = [json.loads(line) for line in (SCENES / "prompts.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if int(r["id"][5]) < n_images]
    return [{**r, **{k: str(SCENES / r[k]) for k in ("image", "mask") if k in r}} for r in records]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("jobs") / "scenes.jsonl", scene_records(2))


@pytest.fixture(scope="module")
def single(tmp_path_factory, jobs):
    """The single-process run: 4 edits of 2 scenes. One torch thread, as each of the two actors gets one of the 2
    CPUs (the reference path runs one image at a time, so batch composition cannot change its rounding)."""
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sys.modules, "ray", None)  # the single-process path runs as if Ray were not installed
            assert main(["edit", str(jobs), "--out", str(out), *FAST]) == EXIT_OK
    finally:
        torch.set_num_threads(threads)
    return files(out)


def test_ray_edit_writes_the_single_process_files_and_skips_a_corrupt_input(cluster, jobs, single, tmp_path,
                                                                             capsys):
    """One run for two claims (a Ray run costs ~20 s of worker start-up here): the bundled scenes' edits come out
    byte for byte as the single-process run writes them, and a corrupt file among them is reported, not fatal."""
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really an image")
    records = [json.loads(line) for line in jobs.read_text().splitlines()]
    records.insert(1, {"id": "broken", "image": str(bad), "source_prompt": "a red circle on a white background",
                       "target_prompt": "a blue circle on a white background"})
    strip = tmp_path / "strip.png"  # 20:1: the driver warns (workers decode it, far from the user's terminal)
    Image.new("RGB", (400, 20), (200, 30, 30)).save(strip)
    records.append({"id": "strip", "image": str(strip), "source_prompt": "a red square on a white background",
                    "target_prompt": "a blue square on a white background"})
    out, cache = tmp_path / "out", tmp_path / "cache"
    code = main(["edit", str(write_jsonl(tmp_path / "jobs.jsonl", records)), "--out", str(out), "--cache",
                 str(cache), *FAST, "--ray", "--num-workers", "2"])
    stdout, err = capsys.readouterr()
    assert code == EXIT_BAD_INPUT
    assert "skipped broken" in err and str(bad) in err and "not a readable image" in err
    assert "1 of 6 inputs failed" in err
    assert err.count("is 400x20: the model sees only its centre 20x20 square") == 1 and str(strip) in err
    assert (out / "strip.png").is_file() and {k: v for k, v in files(out).items() if k != "strip.png"} == single
    assert sorted(stdout.split()) == sorted(str(out / name) for name in [*single, "strip.png"])
    assert len(list(cache.glob("*.safetensors"))) == 3  # one inversion per image, shared by a scene's two edits


def test_an_actor_killed_mid_run_loses_nothing_and_writes_nothing_twice(cluster, jobs, single, tmp_path,
                                                                          monkeypatch, capsys):
    from nti.artifact import load_inversion
    from nti.distributed import CRASH_HOOK

    out, cache, flag = tmp_path / "out", tmp_path / "cache", tmp_path / "crashed"
    # the first actor to reach its first batch exits hard after that batch's inversion is in the cache
    monkeypatch.setenv(CRASH_HOOK, f"1:{flag}")
    assert main(["edit", str(jobs), "--out", str(out), "--cache", str(cache), *FAST, "--ray", "--num-workers",
                 "2"]) == EXIT_OK
    assert flag.is_file()  # an actor did die
    assert files(out) == single  # every output, once, exactly the single-process file; no temporary files
    entries = sorted(cache.iterdir())
    assert [p.suffix for p in entries].count(".safetensors") == 2 and len(entries) == 4  # + the .json twins
    for path in cache.glob("*.safetensors"):
        assert load_inversion(path).key == path.stem  # whole, readable, under its content key
    # the dead actor's inversion was saved before it died and reused by the retry, not redone
    assert any(p.stat().st_mtime_ns <= flag.stat().st_mtime_ns for p in cache.glob("*.safetensors"))
    # the same command again: every output is kept (their request keys are the single-process run's), none
    # rewritten, each listed on stdout
    monkeypatch.delenv(CRASH_HOOK)
    capsys.readouterr()
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["edit", str(jobs), "--out", str(out), "--cache", str(cache), *FAST, "--ray",
                 "--num-workers", "2"]) == EXIT_OK
    stdout, err = capsys.readouterr()
    assert sorted(stdout.split()) == sorted(str(out / name) for name in single) and files(out) == single
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written


def test_a_batch_that_kills_every_worker_is_given_up_after_max_retries(cluster, jobs, single, tmp_path, monkeypatch,
                                                                        capsys):
    """Ray Data would restart the actor and resend the batch forever: the ledger stops it after --max-retries, names
    the batch's inputs, keeps every other output and exits 1."""
    from nti.cli import EXIT_INTERNAL
    from nti.distributed import CRASH_HOOK

    out = tmp_path / "out"
    monkeypatch.setenv(CRASH_HOOK, "input:scene1-colour")  # any actor that gets scene1's batch dies, every time
    code = main(["edit", str(jobs), "--out", str(out), *FAST, "--ray", "--num-workers", "1", "--max-retries", "0"])
    err = capsys.readouterr().err
    assert code == EXIT_INTERNAL, err
    # scene1's batch holds both of its edits (they share one inversion): both named, once, with the reason
    assert "gave up on scene1-colour, scene1-shape: its batch killed the Ray worker running it 1 time(s)" in err
    assert "--max-retries 0" in err and "2 of 4 inputs failed; the other 2 outputs are written" in err
    assert files(out) == {name: data for name, data in single.items() if name.startswith("scene0")}


def test_eval_on_ray_writes_the_single_process_rows_and_images(cluster, tmp_path):
    """`nti eval --ray`: the model's work on engine actors, the scores on the driver; every score, row order and image
    is the single-process run's (only the measured seconds differ)."""
    import csv

    argv = ["eval", "--n", "2", "--methods", "null-text", *FAST]
    threads = torch.get_num_threads()
    # the threads of the one actor (--num-workers 1): it gets both CPUs, so two torch threads; with one here the
    # second sample's reconstruction differed in a pixel (transformers 5.25, 2026-12-06)
    torch.set_num_threads(2)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(sys.modules, "ray", None)
            assert main([*argv, "--out", str(tmp_path / "single")]) == EXIT_OK
    finally:
        torch.set_num_threads(threads)
    assert main([*argv, "--out", str(tmp_path / "ray"), "--ray", "--num-workers", "1"]) == EXIT_OK

    def rows(run):
        return list(csv.DictReader(open(tmp_path / run / "samples.csv")))

    timed = ("invert_s", "recon_s", "edit_s")
    single, ray = rows("single"), rows("ray")
    assert [(r["id"], r["method"]) for r in single] == [("scene0-colour", "null-text"), ("scene1-colour", "null-text")]
    assert [{k: v for k, v in r.items() if k not in timed} for r in ray] == \
        [{k: v for k, v in r.items() if k not in timed} for r in single]
    assert all(float(r["edit_s"]) > 0 for r in ray)
    images = sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single" / "images").rglob("*.png"))
    assert len(images) == 6  # a source, a reconstruction and an edit for each sample
    for image in images:
        assert (tmp_path / "ray" / image).read_bytes() == (tmp_path / "single" / image).read_bytes(), image
    manifest = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert manifest["ray"]["engine_device"] == "cpu"
    assert manifest["settings"] == json.loads((tmp_path / "single" / "run.json").read_text())["settings"]


def test_ray_without_ray_installed_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed (the single-process run without
    # Ray is the `single` fixture)
    code = main(["edit", str(SCENES / "scene0.png"), "--prompt", "a", "--target", "b", "--out",
                 str(tmp_path / "o.png"), *FAST, "--ray"])
    assert code == EXIT_BAD_INPUT and "pip install -e '.[ray]'" in capsys.readouterr().err


def test_batches_group_the_edits_of_one_inversion():
    from nti.distributed import make_batches

    jobs = [{"name": n, "image": img, "source_prompt": p} for n, img, p in
            [("a1", "a.png", "x"), ("b", "b.png", "x"), ("a2", "a.png", "x"), ("a3", "a.png", "y"), ("c", "c.png", "x")]]
    batches = make_batches(jobs, 2)
    assert [[j["name"] for j in b.jobs] for b in batches] == [["a1", "a2", "b"], ["a3", "c"]]


def test_a_ray_worker_reconstructs_without_the_edit_settings(shapes_pipe):
    """`reconstruct` regenerates each image under its own prompt, so no prompt-to-prompt setting applies to it
    (batch.edit_config_for): a Ray worker given --edit p2p-reweight makes the same image as one given none, as the
    single-process run does. The actor's batch method runs here in-process (no cluster: no Ray needed)."""
    import numpy as np

    from nti import NTIConfig
    from nti.distributed import EngineWorker

    side = shapes_pipe.resolution
    pixels = np.asarray(Image.open(SCENES / "scene1.png").convert("RGB").resize((side, side))).tobytes()
    job = {"name": "scene1", "image": str(SCENES / "scene1.png"), "out": "unused.png", "request": None,
           "source_prompt": "a red square and a red triangle on a black background", "target_prompt": None}
    plain = NTIConfig(steps=3, inner_steps=1)
    made = {}
    for name, config in {"plain": plain, "reweight": plain.replace(edit="p2p-reweight", reweight={"red": 4.0})}.items():
        worker = object.__new__(EngineWorker)  # the actor's state without Ray's constructor
        worker.pipe, worker.command, worker.cache, worker.resolution = shapes_pipe, "reconstruct", None, side
        worker.config, worker.calls = config, 0
        made[name] = worker.run_batch([job], pixels)[0]["data"]
    assert made["plain"] and made["reweight"] == made["plain"]


def test_a_ray_worker_reports_a_diverged_job_and_writes_nothing_for_it(shapes_pipe, monkeypatch):
    """The single-process run refuses a non-finite inversion or edit (bad input, nothing written); the Ray worker
    shipped them as outputs. Now each is that job's error, and its batch mate still gets its image."""
    import io

    import numpy as np

    import nti.api
    from nti import NTIConfig
    from nti.distributed import EngineWorker

    side = shapes_pipe.resolution
    pixels = b"".join(np.asarray(Image.open(SCENES / f"scene{k}.png").convert("RGB").resize((side, side))).tobytes()
                      for k in (1, 2))
    jobs = [{"name": f"scene{k}", "image": str(SCENES / f"scene{k}.png"), "out": "unused.png", "request": None,
             "source_prompt": "a red square and a red triangle on a black background",
             "target_prompt": "a red square and a blue triangle on a black background"} for k in (1, 2)]
    worker = object.__new__(EngineWorker)  # the actor's state without Ray's constructor
    worker.pipe, worker.command, worker.cache, worker.resolution = shapes_pipe, "edit", None, side
    worker.config, worker.calls = NTIConfig(backend="fast", steps=3, inner_steps=1, batch_size=2), 0
    real_invert, real_edit = nti.api.invert_cached, nti.api.edit_latents

    def second_diverges(*args, **kwargs):
        invs = real_invert(*args, **kwargs)
        invs[1].z_T[(0,) * invs[1].z_T.dim()] = float("nan")
        return invs
    monkeypatch.setattr(nti.api, "invert_cached", second_diverges)
    good, bad = worker.run_batch(jobs, pixels)
    assert good["error"] == "" and good["data"] and not bad["data"]
    assert bad["error"].startswith("the inversion diverged (z_T holds non-finite values")
    assert bad["error"].endswith("lower --guidance")

    def first_edit_diverges(*args, **kwargs):
        latents = real_edit(*args, **kwargs)
        latents[0] = float("inf")
        return latents
    monkeypatch.setattr(nti.api, "invert_cached", real_invert)
    monkeypatch.setattr(nti.api, "edit_latents", first_edit_diverges)
    bad, good = worker.run_batch(jobs, pixels)
    assert bad["error"].startswith("scene1: the result is not finite") and not bad["data"]
    assert good["error"] == "" and Image.open(io.BytesIO(good["data"])).size == (side, side)

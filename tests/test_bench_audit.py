"""Audit of the benchmark scripts (benchmarks/, export/bench_forward.py): timing windows, the reference each speed
and quality column is measured against, where results are written, and bad arguments refused before any work."""
import argparse
import json
from pathlib import Path

import pytest
import torch

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def waterfall(tmp_path_factory):
    """bench_nti's waterfall on the tiny model, CPU, 2 steps x 1 inner iteration, batch 2, no compile."""
    from nti.benchmarks.bench_nti import main

    out = tmp_path_factory.mktemp("bench_nti") / "bench.json"
    assert main(["--device", "cpu", "--no-compile", "--steps", "2", "--inner-steps", "1", "--batch-sizes", "2",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "error" not in str(result["rows"])
    return result


def test_waterfall_speedup_is_against_the_reference_of_the_same_method(waterfall):
    """A DDIM row's speedup is over the DDIM reference (it was over null-text's: the DDIM reference itself read as a
    5-10x 'speedup' on CPU)."""
    rows = waterfall["rows"]
    # keyed by early stop too: the early-stop row is measured against the reference that stops early
    ref = {(r["method"], r["early_stop"]): r["s_per_image"] for r in rows if r["backend"] == "reference"}
    assert set(ref) == {("null-text", False), ("null-text", True), ("ddim", False)}
    for r in rows:
        assert r["speedup_vs_reference"] == pytest.approx(ref[r["method"], r["early_stop"]] / r["s_per_image"],
                                                          rel=1e-12), r["variant"]
    ddim_ref = next(r for r in rows if r["variant"] == "DDIM invert+edit reference fp32 b1")
    assert ddim_ref["speedup_vs_reference"] == 1.0


def test_waterfall_warms_up_every_row_the_reference_too(waterfall):
    """The reference rows' first calls (lazy init, cuDNN plans, the VAE's first encode) were inside their timed
    window, which inflated every speedup; now each row's warm-up is timed apart."""
    for r in waterfall["rows"]:
        assert isinstance(r["warmup_s"], float) and r["warmup_s"] > 0, r["variant"]


def test_waterfall_seconds_and_tflops_follow_from_the_pass_counts(waterfall):
    """s/image divides by the row's images; TFLOP/s counts per image and step 5 forwards on the fast path (DDIM
    inversion, cond, move-on, CFG edit x2) and 6 on the reference, plus one fwd+bwd per inner iteration
    (docs/benchmarks.md), and DDIM rows 3 forwards per step."""
    gflop, steps = waterfall["unet_gflop"], waterfall["settings"]["steps"]
    for r in waterfall["rows"]:
        n = r["batch"]
        assert r["s_per_image"] == pytest.approx(r["invert_s_per_image"] + r["edit_s_per_image"], rel=1e-12)
        assert (r["latency_s"] is None) == (n > 1)
        forwards = 3 if r["method"] == "ddim" else (6 if r["backend"] == "reference" else 5)
        flops = n * (steps * forwards * gflop["fwd_b1"] + r["inner_iterations_per_image"] * gflop["fwd_bwd_b1"]) * 1e9
        assert r["tflops"] == pytest.approx(flops / (r["s_per_image"] * n) / 1e12, rel=1e-9), r["variant"]
        assert r["inner_iterations_per_image"] == (0 if r["method"] == "ddim" else steps * 1)  # early stop off


def test_waterfall_rows_add_one_technique_each():
    """Each fast null-text row of the plan differs from the row above by one setting (precision, batch, compile,
    graphs, fused step, early stop); the DDIM rows are the reference and the top batch."""
    from nti.benchmarks.bench_nti import waterfall as plan

    args = argparse.Namespace(steps=50, inner_steps=10, guidance=7.5, batch_sizes="4,8,16", no_compile=False,
                              device_obj=torch.device("cuda"))
    rows = plan(args)
    names = [name for name, _, _ in rows]
    assert names[:3] == ["reference fp32 b1", "fast fp32 b1", "+ bf16 autocast b1"]
    null_text = [(name, c, n) for name, c, n in rows if c.method == "null-text" and c.backend == "fast"]
    for (_, above, _), (name, config, n) in zip(null_text, null_text[1:]):
        changed = {k for k in ("backend", "precision", "batch_size", "compile", "cuda_graphs", "fused_step",
                               "early_stop") if getattr(above, k) != getattr(config, k)}
        assert len(changed) == 1, (name, changed)
        assert config.batch_size == n
    assert [n for _, _, n in rows][-2:] == [1, 16]


def test_quick_run_writes_its_own_file_not_the_full_runs():
    """`bench_nti --quick` wrote nti_tiny_cpu.json, the full CPU run's file (docs/benchmarks.md names its smoke
    output nti_tiny_cpu_quick.json); a model folder put its whole path into the file name."""
    from nti.benchmarks.bench_nti import default_out

    def out(model, quick):
        return default_out(argparse.Namespace(model=model, quick=quick, device_obj=torch.device("cpu")))

    assert out("tiny", True) == RESULTS / "nti_tiny_cpu_quick.json" and out("tiny", True).exists()
    assert out("tiny", False) == RESULTS / "nti_tiny_cpu.json"
    assert out("/models/sd-v1-4/", False) == RESULTS / "nti_sd-v1-4_cpu.json"


def _refused(main, argv, capsys, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err.strip().splitlines()[-1], err


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "a"], "--batch-sizes takes positive integers"),
    (["--batch-sizes", "4,0"], "--batch-sizes takes positive integers"),
    (["--device", "foo"], "unknown device 'foo'"),
    (["--steps", "0"], "steps must be a positive integer"),
    (["--model", "/no/such/model"], "does not exist"),
])
def test_bench_nti_refuses_bad_arguments(argv, message, capsys, tmp_path):
    from nti.benchmarks.bench_nti import main

    out = tmp_path / "bench.json"
    _refused(main, [*argv, "--out", str(out)], capsys, message)
    assert not out.exists()


@pytest.mark.parametrize("module, argv, message", [
    ("nti.benchmarks.bench_precision", ["--scenes", "0"], "--scenes must be at least 1"),
    ("nti.benchmarks.bench_precision", ["--batch", "0"], "batch_size must be a positive integer"),
    ("nti.benchmarks.bench_precision", ["--device", "foo"], "unknown device 'foo'"),
    ("nti.benchmarks.bench_testbed", ["--steps", "0"], "steps must be a positive integer"),
    ("nti.benchmarks.bench_testbed", ["--device", "cuda"], "CUDA is not available"),
    ("nti.benchmarks.inductor_layout", ["--device", "foo"], "unknown device 'foo'"),
    ("nti.benchmarks.sdxl_memory", ["--models", "sdxl,sd15"], "unknown model(s) 'sd15' in --models"),
    ("nti.benchmarks.bench_ray", ["--images", "7"], "--images must be 1 to 6"),
    ("nti.benchmarks.bench_ray", ["--images", "2", "--workers", "0"], "--workers must be at least 1"),
    ("nti.benchmarks.bench_ray", ["--steps", "0"], "steps must be a positive integer"),
    ("nti.benchmarks.bench_serve", ["--n", "0"], "--n and --repeats must be at least 1"),
    ("nti.benchmarks.bench_serve", ["--batch-size", "0"], "batch_size must be a positive integer"),
    ("nti.export.bench_forward", ["--batches", "a"], "--batches takes positive integers"),
    ("nti.export.bench_forward", ["--backends", "eager,onnxx"], "--backends takes a comma list"),
    ("nti.export.bench_forward", ["--iters", "0"], "--iters must be at least 1"),
])
def test_benchmarks_refuse_bad_arguments_with_one_line(module, argv, message, capsys, tmp_path):
    """Exit 2 and the reason, before any model loads or file is written (these raised tracebacks: ValueError,
    KeyError, NTIError, or an AssertionError after a Ray cluster had started)."""
    import importlib

    out = tmp_path / "out.json"
    has_out = module.rsplit(".", 1)[1] not in ("inductor_layout",)
    _refused(importlib.import_module(module).main, [*argv, *(["--out", str(out)] if has_out else [])], capsys,
             message)
    assert not out.exists()


def test_bench_testbed_records_the_command_that_ran(tmp_path, monkeypatch):
    """The JSON's command named only --quick: a run with other --steps, --seed or --batch claimed the defaults'."""
    from PIL import Image

    from nti.benchmarks import bench_testbed as bench

    image = Image.new("RGB", (32, 32))
    monkeypatch.setattr(bench, "text_to_image", lambda pipe, n, seed: {})  # the minutes of work, not under test
    monkeypatch.setattr(bench, "reconstruction", lambda pipe, scene_list, steps, batch: (
        {"steps": steps, "batch": batch}, {}, {"ddim_w7.5": [image] * 6, "nti_w7.5": [image] * 6}))
    monkeypatch.setattr(bench, "edits", lambda *args: ({}, {row: [] for row in bench.SHEET_ROWS}, []))
    out = tmp_path / "testbed.json"
    result = bench.main(["--quick", "--steps", "10", "--seed", "3", "--batch", "4", "--out", str(out)])
    assert result["reconstruction_psnr"] == {"steps": 10, "batch": 4}
    assert json.loads(out.read_text())["command"] == ("python -m nti.benchmarks.bench_testbed --quick --steps 10 "
                                                      "--seed 3 --batch 4")
    assert bench.main(["--quick", "--out", str(tmp_path / "defaults.json")])["command"] == \
        "python -m nti.benchmarks.bench_testbed --quick"

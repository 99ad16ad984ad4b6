"""benchmarks/gpu_run.py, the prepared GPU command, run as CI runs it: --quick on CPU with the tiny model. It checks
that every stage runs and writes what the README table is made from, so the command does not rot between the
sessions that get a GPU; the numbers it asserts are the ones that hold on any device."""
import subprocess
import sys
from pathlib import Path

import pytest

from nti.benchmarks.gpu_run import STAGES, load_rows

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_run_quick_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nti.benchmarks.gpu_run", "--quick", "--out", str(tmp_path),
                           "--budget", "1500"], capture_output=True, text=True, timeout=1600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = load_rows(tmp_path)
    status = {r["stage"]: r["status"] for r in rows if r.get("driver")}
    assert status == dict.fromkeys(STAGES, "ok"), proc.stderr[-3000:]
    measured = [r for r in rows if not r.get("driver")]
    assert not [r for r in measured if "error" in r]

    env = next(r for r in measured if r["stage"] == "env")
    assert env["tf32_used"] is False and env["torch"] and env["device"] == "cpu"

    parity = {r["variant"]: r for r in measured if r["stage"] == "parity"}
    fp32 = parity["fast fp32 b1"]
    assert fp32["iterations_equal"] and fp32["embeddings_rel"] < 1e-4 and fp32["zT_rel"] < 1e-4
    assert parity["fast bf16 half weights b1"]["vs_autocast_embeddings_rel"] == 0  # bit for bit on CPU

    timing = [r for r in measured if "s_per_image" in r]
    assert {r["stage"] for r in timing} == {"nti_b1", "nti_b16", "ddim_b16", "sdxl"}
    for r in timing:
        assert r["s_per_image"] > 0 and r["s_per_image_50_steps"] == r["s_per_image"] * 50 / r["steps"]
        if r["backend"] == "fast":  # every inner iteration of every image ran forward + backward, nothing padded
            its = r["steps"] * r["inner_steps"] if r["method"] == "null-text" else 0
            assert r["unet_backward_rows"] == r["batch"] * its
            assert r["unet_forward_rows"] == r["batch"] * (its + r["steps"] * (5 if its else 3))

    ops = {r["half_weights"]: r for r in measured if r["stage"] == "ops"}
    assert ops[True]["forward_casts"] < ops[False]["forward_casts"] and ops[True]["forward_ops"] < ops[False][
        "forward_ops"]

    passes = {(r["backend"], r["early_stop"]): r for r in measured if r["stage"] == "passes"}
    for (backend, _), r in passes.items():  # DDIM inversion, cond pass, inner, move-on (reference: batch 2), edit
        steps, its = r["steps"], r["inner_iterations_per_image"]
        assert r["unet_backward_per_image"] == its
        assert r["unet_forward_per_image"] == its + steps * (6 if backend == "reference" else 5)
    assert passes[("fast", False)]["inner_iterations_per_image"] == 10 * passes[("fast", False)]["steps"]
    # early stop: the fast fp32 path stops on exactly the reference's iterations (same image, same threshold)
    on, reference = passes[("fast", True)], passes[("reference", True)]
    assert on["first_image_iterations"] == reference["first_image_iterations"]
    assert on["inner_iterations_per_image"] < passes[("fast", False)]["inner_iterations_per_image"]

    sdxl = next(r for r in measured if r["stage"] == "sdxl" and "unet_fwd_gflop" in r)
    assert sdxl["model"] == "tiny-xl" and sdxl["unet_fwd_bwd_gflop"] > sdxl["unet_fwd_gflop"] > 0

    summary = (tmp_path / "summary.md").read_text()
    assert "| nti_b16 |" in summary and "parity vs eager fp32 reference" in summary and "UNet passes" in summary


@pytest.mark.parametrize("launch", ["spawn_stage", "fork_stage"])
def test_each_launcher_reports_ok_failed_and_timeout(launch, tmp_path):
    """The GPU run starts each stage in a fresh interpreter (spawn_stage), --quick forks it (fork_stage, what the
    test above runs); both must tell a finished stage from a failed one (with its traceback) and a hung one."""
    import nti.benchmarks.gpu_run as gpu_run
    run = getattr(gpu_run, launch)
    cmd = [sys.executable, "-m", "nti.benchmarks.gpu_run", "--quick", "--out", str(tmp_path), "--stage"]
    assert run([*cmd, "env"], 300) == ("ok", "")
    assert [r["stage"] for r in load_rows(tmp_path)] == ["env"]
    status, tail = run([*cmd, "no_such_stage"], 300)
    assert status == "failed" and "stage_no_such_stage" in tail and "Traceback" in tail
    assert run([*cmd, "parity"], 0.5) == ("timeout", "")

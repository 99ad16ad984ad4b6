"""benchmarks/gpu_run.py, the prepared GPU command, run as CI runs it: --quick on CPU with the tiny model. It checks
that every stage runs and writes what the README table is made from, so the command does not rot between the
sessions that get a GPU; the numbers it asserts are the ones that hold on any device."""
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from nti.benchmarks.gpu_run import (STAGES, TOP_OTHER, device_events, follow_up, kernel_class, kernel_table, load_rows,
                                    short_kernel_name, summarize)

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
    checkpointed = parity["fast fp32 b1, gradient checkpointing"]  # recompute: the same arithmetic
    assert checkpointed["vs_no_checkpointing_embeddings_rel"] == 0 and checkpointed["vs_no_checkpointing_edit_rel"] == 0

    timing = [r for r in measured if "s_per_image" in r]
    assert {r["stage"] for r in timing} == {"nti_b1", "nti_b16", "ddim_b16", "sdxl"}
    for r in timing:
        assert r["s_per_image"] > 0 and r["s_per_image_50_steps"] == r["s_per_image"] * 50 / r["steps"]
        if r["backend"] == "fast":  # every inner iteration of every image ran forward + backward, nothing padded
            its = r["steps"] * r["inner_steps"] if r["method"] == "null-text" else 0
            assert r["unet_backward_rows"] == r["batch"] * its
            assert r["unet_forward_rows"] == r["batch"] * (its + r["steps"] * (5 if its else 3))

    ops = {r["variant"]: r for r in measured if r["stage"] == "ops"}
    autocast, half, norms = ops["autocast over fp32 weights"], ops["half weights"], ops["half norms"]
    assert half["forward_casts"] < autocast["forward_casts"] and half["forward_ops"] < autocast["forward_ops"]
    # regional compile's share: the transformer blocks run some of the forward's ops, not all (ResNets, norms)
    assert 0 < half["forward_ops_in_blocks"] < half["forward_ops"]
    # no autocast: only the entry casts of z and the context (and the timestep embedding's), none per layer
    assert norms["forward_casts"] <= 4 and norms["forward_ops"] < half["forward_ops"]
    assert norms["nongemm_gib"] < half["nongemm_gib"] < autocast["nongemm_gib"]
    assert parity["fast bf16 half norms b1"]["vs_autocast_embeddings_rel"] < 0.05

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
    rows = {r["variant"]: r for r in measured if r["stage"] == "sdxl" and "variant" in r}
    assert set(rows) == {"SDXL bf16 half weights", "SDXL + gradient checkpointing"}
    assert rows["SDXL + gradient checkpointing"]["gradient_checkpointing"] is True
    assert rows["SDXL + gradient checkpointing"]["unet_backward_rows"] == rows["SDXL bf16 half weights"][
        "unet_backward_rows"] > 0  # the same work, recomputed activations aside

    # profile: on CPU the same code tables CPU ops (nested, so "busy" exceeds the wall; the figures check the code)
    profile = {r["batch"]: r for r in measured if r["stage"] == "profile"}
    assert set(profile) == {1, 2}
    for r in profile.values():
        assert r["inner_steps"] == 3 and r["unprofiled_wall_s"] > 0 and r["wall_s"] > 0
        assert sum(r["by_class_ms"].values()) == pytest.approx(r["gpu_busy_s"] * 1e3)
        assert list(r["by_class_ms"]) == list(r["by_class_calls"]) and r["by_class_calls"]["convolution"] > 0
        top = r["top_kernels"]
        assert [k["ms"] for k in top] == sorted((k["ms"] for k in top), reverse=True) and len(top) >= 20
        assert all(k["class"] == kernel_class(k["name"]) and k["calls"] >= 1 for k in top)
        assert sum(k["class"] == "elementwise/other" for k in top) >= TOP_OTHER
        assert {"aten::conv2d", "aten::convolution"} <= {k["name"] for k in top}

    summary = (tmp_path / "summary.md").read_text()
    assert "| nti_b16 |" in summary and "parity vs eager fp32 reference" in summary and "UNet passes" in summary
    assert "- fast fp32 b1, gradient checkpointing vs the same without checkpointing: embeddings 0.0e+00" in summary
    assert "- profile b2, 3 inner: wall" in summary and "  - top kernels: " in summary


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


def test_a_short_budget_skips_a_stage_and_prints_the_next_command(tmp_path):
    """sdxl (130 s allowed) does not start with under 65 s left; the driver prints the command that runs it."""
    proc = subprocess.run([sys.executable, "-m", "nti.benchmarks.gpu_run", "--quick", "--out", str(tmp_path),
                           "--budget", "60", "--stages", "env,sdxl"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    driver = {r["stage"]: r for r in load_rows(tmp_path) if r.get("driver")}
    assert driver["env"]["status"] == "ok" and driver["sdxl"]["status"] == "skipped"
    assert "65 s needed to start" in driver["sdxl"]["reason"]
    assert "--stages env,sdxl --budget 175 --quick" in proc.stderr
    assert follow_up(["passes", "sdxl", "env"]).endswith("--stages env,sdxl,passes --budget 235")


def test_an_unknown_stage_is_refused_before_any_runs(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nti.benchmarks.gpu_run", "--quick", "--out", str(tmp_path),
                           "--stages", "env,profil"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "unknown stage(s) profil" in proc.stderr
    assert not (tmp_path / "gpu_run.jsonl").exists()


# ------------------------------------------------------------------- the profile stage's pieces, without CUDA

ADD_BF16 = ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, "
            "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)")
COPY_BF16 = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
             "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#10}::"
             "operator()() const::{lambda(c10::BFloat16)#1}>(at::TensorIteratorBase&, at::native::"
             "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#10}::"
             "operator()() const::{lambda(c10::BFloat16)#1} const&)::{lambda(int)#1}>(int, at::native::"
             "gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::"
             "operator()() const::{lambda()#10}::operator()() const::{lambda(c10::BFloat16)#1}>(at::"
             "TensorIteratorBase&, at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::"
             "operator()() const::{lambda()#10}::operator()() const::{lambda(c10::BFloat16)#1} const&)::"
             "{lambda(int)#1})")
MOMENTS = ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::BFloat16, float>(long, "
           "c10::BFloat16, c10::BFloat16 const*, c10::BFloat16*, c10::BFloat16*, float*, float*)")


def test_short_kernel_name_keeps_what_tells_kernels_apart():
    assert short_kernel_name(ADD_BF16) == ("vectorized_elementwise_kernel<4, CUDAFunctor_add<BFloat16>, "
                                           "array<char*, 3ul> >")
    copy = short_kernel_name(COPY_BF16)
    assert copy.startswith("elementwise_kernel<128, 4, gpu_kernel_impl_nocast<direct_copy_kernel_cuda::"
                           "{lambda(BFloat16)#1}>") and len(copy) == 120 and copy.endswith("...")
    assert short_kernel_name(MOMENTS) == "RowwiseMomentsCUDAKernel<BFloat16, float>"
    assert short_kernel_name("Memcpy DtoD (Device -> Device)") == "Memcpy DtoD (Device -> Device)"
    assert short_kernel_name("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT"
    assert short_kernel_name("x" * 300, chars=40) == "x" * 37 + "..."


def test_kernel_class_names_groupnorm_reductions_and_cublaslt():
    assert kernel_class(MOMENTS) == "norm"
    assert kernel_class("void at::native::(anonymous namespace)::ComputeFusedParamsCUDAKernel<c10::BFloat16>") == "norm"
    assert kernel_class("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert kernel_class("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert kernel_class("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16>") == "layout"
    assert kernel_class("Memset (Device)") == "memcpy/memset"
    assert kernel_class(ADD_BF16) == kernel_class(COPY_BF16) == "elementwise/other"


def test_kernel_table_totals_classes_and_top_kernels():
    events = [(ADD_BF16, 10.0)] * 3 + [(COPY_BF16, 50.0)] * 2 + [(MOMENTS, 7.0)] + [("nvjet_a", 200.0)]
    events += [(f"void other_kernel_{i}<float>(float*)", 1.0 + i) for i in range(12)]
    table = kernel_table(events, top=2, other=3)
    assert table["busy_us"] == pytest.approx(30 + 100 + 7 + 200 + sum(1.0 + i for i in range(12)))
    assert table["by_class_ms"] == pytest.approx({"gemm": 0.2, "elementwise/other": (30 + 100 + 78) / 1e3,
                                                  "norm": 0.007})
    assert list(table["by_class_ms"]) == ["elementwise/other", "gemm", "norm"]  # most time first
    assert table["by_class_calls"] == {"elementwise/other": 3 + 2 + 12, "gemm": 1, "norm": 1}
    assert table["kernel_names"] == 2 + 1 + 1 + 12
    # the top 2 (nvjet, the copy), then elementwise/other ones until 3 of that class: the add and other_kernel_11
    assert [(k["name"], k["class"], k["ms"], k["calls"]) for k in table["top_kernels"]] == [
        ("nvjet_a", "gemm", 0.2, 1), (short_kernel_name(COPY_BF16), "elementwise/other", 0.1, 2),
        (short_kernel_name(ADD_BF16), "elementwise/other", 0.03, 3), ("other_kernel_11<float>", "elementwise/other",
                                                                      0.012, 1)]
    assert table["top_kernels_share"] == pytest.approx((200 + 100 + 30 + 12) / table["busy_us"])
    assert kernel_table([])["top_kernels"] == [] and kernel_table([])["top_kernels_share"] is None


def test_device_events_reads_the_profilers_raw_events():
    """A CPU profile stands in for CUDA's: same raw results, another device type; record_function ranges left out."""
    from torch.profiler import ProfilerActivity, profile, record_function

    a = torch.randn(32, 32)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("a range that spans the ops"):
            for _ in range(3):
                torch.mm(a, a)
            for _ in range(2):
                torch.add(a, a)
    events = device_events(prof, torch.autograd.DeviceType.CPU)
    names = [name for name, _ in events]
    assert names.count("aten::mm") == 3 and names.count("aten::add") == 2
    assert "a range that spans the ops" not in names and all(us > 0 for _, us in events)
    assert device_events(prof) == []  # no CUDA events on a CPU profile
    prof.events()  # parsed (and cached) now, then the raw results hidden: a torch whose raw events differ
    prof.profiler.kineto_results = types.SimpleNamespace()
    fallback = device_events(prof, torch.autograd.DeviceType.CPU)
    assert sorted(name for name, _ in fallback) == sorted(names)
    assert [us for _, us in sorted(fallback)] == pytest.approx([us for _, us in sorted(events)], abs=1)
    table = kernel_table(events)
    mm = next(k for k in table["top_kernels"] if k["name"] == "aten::mm")
    assert mm["calls"] == 3
    assert mm["ms"] == pytest.approx(sum(us for name, us in events if name == "aten::mm") / 1e3, abs=1e-3)


def test_summary_renders_profile_rows_with_top_kernels(tmp_path):
    old = {"stage": "profile", "batch": 16, "cuda_graphs": True, "wall_s": 2.36, "gpu_busy_s": 2.03,
           "busy_fraction": 0.86, "by_class_ms": {"elementwise/other": 792.6, "convolution": 730.2}}
    new = {**old, "channels_last": True, "inner_steps": 3, "unprofiled_wall_s": 0.7, "wall_s": 0.75,
           "gpu_busy_s": 0.61, "busy_fraction": 0.81, "by_class_ms": {"convolution": 219.0, "elementwise/other": 180.5},
           "by_class_calls": {"convolution": 1200, "elementwise/other": 9000},
           "top_kernels": [{"name": f"kernel_{i}", "class": "convolution", "ms": 50.0 - i, "calls": 10 + i}
                           for i in range(7)]}
    lines = [old, new, {"stage": "profile", "batch": 1, "cuda_graphs": True, "channels_last": True, "inner_steps": 3,
                        "error": "OutOfMemoryError: CUDA out of memory"},
             {"driver": True, "stage": "sdxl", "status": "skipped", "reason": "budget: 40 s left, 65 s needed"},
             {"driver": True, "stage": "passes", "status": "skipped", "reason": "budget: 10 s left, 30 s needed"},
             {"stage": "env", "gpu": "NVIDIA H100"}, {"driver": True, "stage": "sdxl", "status": "ok"}]
    (tmp_path / "gpu_run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    text = summarize(tmp_path).splitlines()
    assert text[0].startswith("Device: NVIDIA H100;")
    # a row from before top kernels renders as it did (benchmarks/results/gpu_run_h200.md)
    assert ("- profile b16 + CUDA graphs: wall 2.36 s, GPU busy 2.03 s (86%); elementwise/other 793 ms, "
            "convolution 730 ms") in text
    at = text.index("- profile b16 + CUDA graphs, channels_last, 3 inner: wall 0.75 s (0.70 s unprofiled), GPU busy "
                    "0.61 s (81%); convolution 219 ms (1200 calls), elementwise/other 180 ms (9000 calls)")
    assert text[at + 1] == ("  - top kernels: kernel_0 50.0 ms x10; kernel_1 49.0 ms x11; kernel_2 48.0 ms x12; "
                            "kernel_3 47.0 ms x13; kernel_4 46.0 ms x14")
    assert "- profile b1 + CUDA graphs, channels_last, 3 inner: failed: OutOfMemoryError: CUDA out of memory" in text
    # sdxl's skip is dropped: a later line (a second command joined in) ran it; passes' stays
    assert not [line for line in text if "stage sdxl" in line]
    assert "- stage passes: skipped budget: 10 s left, 30 s needed" in text


def test_summary_of_the_h200_run_is_unchanged(tmp_path):
    """The table committed from the H200's JSON lines is what --summarize still makes of them (the file was saved
    from its printout, which ends in one more newline)."""
    results = ROOT / "benchmarks" / "results"
    shutil.copy(results / "gpu_run_h200.jsonl", tmp_path / "gpu_run.jsonl")
    assert summarize(tmp_path) + "\n" == (results / "gpu_run_h200.md").read_text()


# ------------------------------------------------------------------------------------- the compile stages' check

def test_compiled_grad_rel_compares_compiled_with_eager(tiny_pipe, monkeypatch):
    """The compile rows' gradient check runs the compiled UNet and eager on one input: traced by dynamo only (the
    same arithmetic) it is ~0 for both scopes; a compiled UNet that drops a gradient path reads ~1."""
    import nti.runner as runner
    from nti import NTIConfig
    from nti.benchmarks.gpu_run import compiled_grad_rel

    monkeypatch.setattr(runner, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    st = types.SimpleNamespace(model=lambda: tiny_pipe, device=tiny_pipe.device)
    config = NTIConfig(backend="fast", compile=True)
    for scope in ("unet", "blocks"):
        assert compiled_grad_rel(st, config.replace(compile_scope=scope), 2) < 1e-6

    def dropped_path(gm, example_inputs):  # a compiled UNet as inductor's layout bug made it: no gradient path
        return lambda *args: type(out := gm(*args))(o.detach() + 0 * o if o.is_floating_point() else o for o in out)
    monkeypatch.setattr(runner, "COMPILE_BACKEND", dropped_path)
    torch._dynamo.reset()
    tiny_pipe.fast_unets.clear()  # a new UNet copy, compiled with that backend
    assert compiled_grad_rel(st, config.replace(compile_scope="unet"), 2) == pytest.approx(1.0)
    tiny_pipe.fast_unets.clear()  # later tests must not get that broken compile


def test_summary_lists_each_compiled_rows_gradient_check(tmp_path):
    timing = {"stage": "compile_b1", "variant": "whole-UNet compile + CUDA graphs", "batch": 1,
              "s_per_image_50_steps": 5.0, "warmup_s": 90.0, "peak_gib": 6.0, "tflops": 150.0,
              "inner_iterations_per_image": 500, "s_per_image": 0.3}
    rows = [timing, {**timing, "variant": "regional compile + CUDA graphs",
                     "compile_failed": "the compiled UNet's gradient differs from eager's by 0.25"},
            {"stage": "compile_b1", "variant": "whole-UNet compile + CUDA graphs", "batch": 1,
             "grad_vs_eager_rel": 0.0123},
            {"stage": "compile_b1", "layout_optimization_grad_rel": {"on": 1.0, "off": 3.1e-7}}]
    (tmp_path / "gpu_run.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = summarize(tmp_path)
    assert ("- compile_b1 whole-UNet compile + CUDA graphs (batch 1): one inner iteration's gradient vs eager 1.2e-02"
            in summary)
    assert "| compile_b1 | whole-UNet compile + CUDA graphs | 1 | 5 |" in summary
    assert "- inductor layout optimization (benchmarks/inductor_layout.py, an SD up block's input gradient vs eager): " \
           "on 1.0e+00, off 3.1e-07" in summary
    assert ("| compile_b1 | regional compile + CUDA graphs (compile failed, ran eager: the compiled UNet's gradient "
            "differs from eager's by 0.25) | 1 |") in summary

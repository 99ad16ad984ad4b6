"""The prepared GPU run: every figure of the README's GPU table in one command, each stage in its own process.

    python -m nti.benchmarks.gpu_run --out runs/gpu            # H100/H200: SD v1.4-shaped random weights, 512 px
    python -m nti.benchmarks.gpu_run --out runs/cpu --quick    # the same stages on CPU with the tiny model (CI test)
    python -m nti.benchmarks.gpu_run --summarize runs/gpu      # remake summary.md from the JSON lines

The lent GPU machines have no network and no diffusers, and run the tree without installing it. Build the wheels
here (the project's and diffusers'; .whl/ is git-ignored, so carry it):

    .venv/bin/pip wheel -q --no-deps -w .whl . && .venv/bin/pip download -q --no-deps --only-binary=:all: \
        --python-version 3.12 -d .whl diffusers==0.42.1

and there, from the tree:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
        PYTHONPATH=/tmp/site python3 -m nti.benchmarks.gpu_run --out $OUT/run

--quick forks each stage from a parent that imported torch, diffusers and the engine once (about 6 s saved per
stage on a 2-core CPU); the GPU run starts each from a fresh interpreter, as on the H200.

Each stage appends JSON lines to OUT/gpu_run.jsonl as it measures, so a killed run keeps what it finished; the
driver gives every stage a time limit and skips what no longer fits the overall budget (default 480 s: the issue's 8
minutes), and writes OUT/summary.md (the README table). Timing rows run null-text inversion + edit with early stop
off at `steps` DDIM steps and scale to 50 (every step then costs the same); warm-up (compile, graph capture) is
timed apart. Every stage runs with TF32 off (the engine's fp32 is strict fp32, nti.models.strict_fp32) and says so.

Budget. All stages take about 670 s on an H200, more than one command's 480 s (measured at 3683908: env 15, parity
65, nti_b1 53, nti_b16 67, ddim_b16 49, kernels 12, ops 23, compile 148; estimated: the channels_last rows +7 and
+10, profile 50, sdxl 100-130, passes 40; the half-norms rows, which replace the autocast-over-fp32-weights rows
measured then: +7 b1, +12 b16, +5 ddim, +10 parity; the gradient-checkpointing parity rows +10). STAGES therefore
runs the figures the issue asks for first (parity; s/image and peak memory at b1, b16 and DDIM; compile time), then
the profile (where the GPU time goes), then compile at batch 1 and the whole-UNet compile (added after the H200
run; their compile times are unknown, so their allowances, 360 s each, are guesses), then the cheap kernels and
ops (about 540 s before the compile stages). A stage starts only with half its allowance left (at least 30 s, or
all of it if less): sdxl then is skipped instead of timing out, and passes uses the rest. The driver ends by
printing the command for what it skipped or lost to a timeout, with env again so that file names its device, e.g.

    PYTHONPATH=/tmp/site python3 -m nti.benchmarks.gpu_run --out "$OUT/run2" --stages env,sdxl --budget 175

Run it, after the same pip install line, on the same warm machine (a session's 15 device minutes: start ~1.5,
first command 8, so give the second a --budget of what is left, about 240 s; its stages run in STAGES order, the
compile stages first), then join the two folders here and summarize them together:

    mkdir both && cat run/gpu_run.jsonl run2/gpu_run.jsonl > both/gpu_run.jsonl && \
        python -m nti.benchmarks.gpu_run --summarize both

The summary names each device and drops a "skipped" line for a stage that a later line shows done.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from nti.benchmarks.bench_nti import PHOTOS, fused_step_ran, rel, sync, unet_flops  # the waterfall's helpers
from nti.provenance import git_commit

STAGES = {  # name -> (seconds allowed on a GPU, what it measures); run in this order (module docstring: budget)
    "env": (45, "versions, GPU, Triton, matmul rate and copy bandwidth"),
    "parity": (95, "fast paths vs the eager fp32 reference (strict fp32)"),
    "nti_b1": (100, "null-text inversion + edit, one image"),
    "nti_b16": (110, "null-text inversion + edit, batch 16"),
    "ddim_b16": (60, "DDIM inversion + edit, batch 16"),
    "compile": (180, "regional torch.compile + CUDA graphs, batch 16"),  # took 148 s on the H200
    "profile": (75, "GPU-busy vs wall time of one outer step, by kernel class, and the top kernels"),
    # batch 1 is bound by its ~40k kernels per outer step even under CUDA graphs (H200 profile): fusion is what is
    # left, and regional compile leaves the ResNet blocks and the norms around the transformer blocks eager
    "compile_b1": (360, "torch.compile + CUDA graphs, one image: the whole UNet (also channels_last), the blocks; "
                        "first, whether inductor's layout optimization breaks gradients on this build"),
    "compile_unet": (360, "whole-UNet torch.compile + CUDA graphs, batch 16: null-text, then DDIM"),
    "kernels": (40, "fused Triton DDIM ops vs torch"),
    "ops": (40, "aten ops and bytes saved for backward per inner iteration (device-independent)"),
    "sdxl": (130, "SDXL-shaped null-text inversion + edit at 1024 px, the largest batch that fits"),
    "passes": (60, "UNet passes per image (shapes model, device-independent: last, as CPU runs measure it too)"),
}
GOALS = {"nti_b1": 6.0, "nti_b16": 2.0, "ddim_b16": 0.25,  # s/image at 50 steps (issue 13)
         "compile": 2.0, "compile_b1": 6.0, "compile_unet": 2.0}  # DDIM rows: ddim_b16's goal, whatever the stage
SDXL_BATCH = 8  # first try of the sdxl stage, halved on out-of-memory (docs/sdxl-memory.md: the 80 GB plan)


# ------------------------------------------------------------------------------------------------------ plumbing

class Stage:
    """What a stage needs: the output file, the device, the model and the run's sizes."""

    def __init__(self, args):
        self.out = Path(args.out)
        self.quick = args.quick
        self.device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
        self.cuda = self.device.type == "cuda"
        self.steps = 2 if self.quick else 3  # timing rows: scaled to 50 steps
        self.inner = 2 if self.quick else 10
        self.big = 2 if self.quick else 16  # "b16"
        self.pipe = None
        self.tf32_defaults = {"matmul": torch.backends.cuda.matmul.allow_tf32,
                              "cudnn": torch.backends.cudnn.allow_tf32}
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # strict fp32 throughout

    def emit(self, stage: str, **row) -> None:
        row = {"stage": stage, **row}
        with open(self.out / "gpu_run.jsonl", "a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
        print(json.dumps(row, default=str), flush=True)

    def model(self):
        if self.pipe is None:
            from nti.models import build_sd14_shaped_pipeline, build_tiny_pipeline
            self.pipe = build_sd14_shaped_pipeline(device=self.device) if self.cuda else build_tiny_pipeline()
        return self.pipe


def jobs(n: int):
    return [PHOTOS[k % len(PHOTOS)] for k in range(n)]


def timed_run(st: Stage, config, n: int, warmup: bool = True) -> dict:
    """Invert + edit n photos: warm-up (1 step: compile, capture, cuDNN plans) apart, then the timed run."""
    import nti

    pipe = st.model()
    images, sources, targets = zip(*jobs(n))
    warm_s = None
    if warmup:
        start = time.perf_counter()
        invs = nti.invert(pipe, list(images), list(sources), config.replace(steps=1), progress=False)
        nti.edit_latents(pipe, invs, list(targets), config.replace(steps=1), progress=False)
        sync(st.device)
        warm_s = time.perf_counter() - start
    if st.cuda:
        torch.cuda.reset_peak_memory_stats()
    stats = pipe.fast_stats
    before = (stats.forward_rows, stats.backward_rows, stats.captures, stats.capture_s)
    start = time.perf_counter()
    invs = nti.invert(pipe, list(images), list(sources), config, progress=False)
    sync(st.device)
    invert_s = time.perf_counter() - start
    start = time.perf_counter()
    edited = nti.edit_latents(pipe, invs, list(targets), config, progress=False)
    sync(st.device)
    edit_s = time.perf_counter() - start
    return {"invs": invs, "edited": edited, "invert_s": invert_s, "edit_s": edit_s, "warmup_s": warm_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if st.cuda else None,
            "forward_rows": stats.forward_rows - before[0], "backward_rows": stats.backward_rows - before[1],
            "captures_in_timed_run": stats.captures - before[2], "capture_s_in_timed_run": stats.capture_s - before[3]}


def timing_row(st: Stage, stage: str, variant: str, config, n: int, flops: tuple, reference=None) -> dict:
    """One waterfall row: s/image measured and scaled to 50 steps, TFLOP/s, memory, parity with `reference`."""
    res = timed_run(st, config, n)
    total = res["invert_s"] + res["edit_s"]
    scale = 50 / config.steps
    iters = sum(sum(inv.iterations) for inv in res["invs"])
    fwd, fwd_bwd = flops
    steps = config.steps
    move_on = 2 if config.backend == "reference" else 1  # the fast path reuses the step's cond pass
    per_image = steps * fwd * 3  # DDIM inversion + CFG edit (uncond and cond)
    if config.method == "null-text":
        per_image += steps * (1 + move_on) * fwd
    spent = n * per_image + iters * fwd_bwd
    row = {"variant": variant, "method": config.method, "batch": n, "precision": config.precision,
           "backend": config.backend, "half_weights": config.half_weights, "half_norms": config.half_norms,
           "cuda_graphs": config.cuda_graphs, "channels_last": config.channels_last,
           "compile": config.compile and config.compile_scope, "gradient_checkpointing": config.gradient_checkpointing,
           # what ran: fused_step's default turns the Triton step on wherever it runs (every fast row on a GPU)
           "fused_step": fused_step_ran(config, st.device), "early_stop": config.early_stop, "steps": steps,
           "inner_steps": config.inner_steps,
           "s_per_image": total / n, "s_per_image_50_steps": total / n * scale,
           "latency_50_steps_s": total * scale if n == 1 else None,
           "invert_s_per_image": res["invert_s"] / n, "edit_s_per_image": res["edit_s"] / n,
           "warmup_s": res["warmup_s"], "peak_gib": res["peak_gib"], "tflops": spent / total / 1e12,
           "inner_iterations_per_image": iters / n, "unet_forward_rows": res["forward_rows"],
           "unet_backward_rows": res["backward_rows"], "captures_in_timed_run": res["captures_in_timed_run"],
           "fp32_retries": sum(len(i.fp32_retries) for i in res["invs"])}
    if config.compile and config.backend == "fast":  # a compile that failed (or was unlike eager) ran eager: say so
        from nti.runner import prepared_unet
        row["compile_failed"] = prepared_unet(st.model(), config).compile_failed
    if reference is not None:
        ref_invs, ref_edit = reference
        inv0 = res["invs"][0]
        row.update(parity_zT_rel=rel(inv0.z_T, ref_invs[0].z_T),
                   parity_embeddings_rel=rel(inv0.null_embeddings, ref_invs[0].null_embeddings),
                   parity_edit_rel=rel(res["edited"][0], ref_edit[0]))
    if stage in GOALS and config.backend == "fast":
        row["goal_s_per_image"] = GOALS["ddim_b16" if config.method == "ddim" else stage]
    st.emit(stage, **row)
    return res


# -------------------------------------------------------------------------------------------------------- stages

def stage_env(st: Stage) -> None:
    import diffusers
    import transformers
    info = {"torch": torch.__version__, "python": platform.python_version(), "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "device": str(st.device), "commit": git_commit(),
            "tf32_defaults": st.tf32_defaults, "tf32_used": False}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if st.cuda:
        props = torch.cuda.get_device_properties(st.device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
        a = torch.randn(8192, 8192, device=st.device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=st.device, dtype=torch.bfloat16)
        info["bf16_matmul_tflops"] = 2 * 8192**3 / cuda_time(lambda: a @ b) / 1e12
        x = torch.empty(2**30, dtype=torch.uint8, device=st.device)
        y = torch.empty_like(x)
        info["copy_tb_s"] = 2 * x.numel() / cuda_time(lambda: y.copy_(x)) / 1e12
        del a, b, x, y
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    try:
        import nti.kernels.ddim as ops
        probe = torch.randn(4, 4, 8, 8, device=st.device)
        info["triton_runs"] = bool(ops.triton_enabled(probe))
        if info["triton_runs"]:
            out = ops.ddim_step(probe, probe, 0.5, 0.6)
            info["triton_probe_rel"] = rel(out, ops.ddim_step_ref(probe, probe, torch.full((4,), 0.5, device=st.device),
                                                                  torch.full((4,), 0.6, device=st.device)))
    except Exception as err:
        info["triton_runs"] = False
        info["triton_error"] = f"{type(err).__name__}: {err}"
    st.emit("env", **info)


def cuda_time(fn, repeat: int = 10) -> float:
    """Median seconds of fn() by CUDA events, after 3 warm-ups."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def stage_parity(st: Stage) -> None:
    import nti
    from nti import NTIConfig

    pipe = st.model()
    base = NTIConfig(steps=3, inner_steps=3, early_stop=False)
    images, sources, targets = zip(*jobs(2))
    ref = nti.invert(pipe, list(images), list(sources), base, progress=False)
    ref_edit = nti.edit_latents(pipe, ref, list(targets), base, progress=False)
    fast = base.replace(backend="fast", batch_size=1)
    rows = {"fast fp32 b1": fast, "fast fp32 b2": fast.replace(batch_size=2),
            "fast bf16 autocast over fp32 weights b1": fast.replace(precision="bf16", half_weights=False),
            "fast bf16 half weights b1": fast.replace(precision="bf16"),
            "fast bf16 half norms b1": fast.replace(precision="bf16", half_norms=True),
            # recomputing activations in backward is the same fp32 arithmetic: expected bit for bit
            "fast fp32 b1, gradient checkpointing": fast.replace(gradient_checkpointing=True)}
    if st.cuda:
        rows["fast fp32 b1 + CUDA graphs"] = fast.replace(cuda_graphs=True)
        rows["fast bf16 half weights b1 + CUDA graphs"] = fast.replace(precision="bf16", cuda_graphs=True)
        rows["fast bf16 half weights b2 + CUDA graphs"] = fast.replace(precision="bf16", cuda_graphs=True,
                                                                       batch_size=2)
        # checkpoint recompute inside a captured inner iteration: not yet run on a GPU
        rows["fast fp32 b1 + CUDA graphs, gradient checkpointing"] = fast.replace(cuda_graphs=True,
                                                                                 gradient_checkpointing=True)
    done = {}
    for name, config in rows.items():
        n = config.batch_size
        try:
            invs = nti.invert(pipe, list(images[:n]), list(sources[:n]), config, progress=False)
            edit = nti.edit_latents(pipe, invs, list(targets[:n]), config, progress=False)
        except Exception as err:
            st.emit("parity", variant=name, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-1500:])
            continue
        done[name] = (invs, edit)
        row = {"variant": name, "fused_step": fused_step_ran(config, st.device), "tf32": False,
               "zT_rel": rel(invs[0].z_T, ref[0].z_T), "embeddings_rel": rel(invs[0].null_embeddings,
                                                                             ref[0].null_embeddings),
               "edit_rel": rel(edit[0], ref_edit[0]), "iterations_equal": invs[0].iterations == ref[0].iterations}
        eager = name.replace(" + CUDA graphs", "")
        if eager != name and eager in done:
            row["vs_eager_embeddings_rel"] = rel(invs[0].null_embeddings, done[eager][0][0].null_embeddings)
            row["vs_eager_edit_rel"] = rel(edit[0], done[eager][1][0])
        kept = name.replace(", gradient checkpointing", "")
        if kept != name and kept in done:
            row["vs_no_checkpointing_embeddings_rel"] = rel(invs[0].null_embeddings, done[kept][0][0].null_embeddings)
            row["vs_no_checkpointing_edit_rel"] = rel(edit[0], done[kept][1][0])
        before = {"fast bf16 half weights b1": "fast bf16 autocast over fp32 weights b1",  # what it changes
                  "fast bf16 half norms b1": "fast bf16 half weights b1"}.get(name)
        if before in done:
            other = done[before]
            row["vs_autocast_embeddings_rel"] = rel(invs[0].null_embeddings, other[0][0].null_embeddings)
            row["vs_autocast_edit_rel"] = rel(edit[0], other[1][0])
        st.emit("parity", **row)


def _waterfall(st: Stage, stage: str, rows: list, n: int, method: str = "null-text", reference: bool = False,
               after=None):
    """Timing rows, one per (name, config changes), each emitted as it is measured; `reference`: first the eager
    fp32 reference at batch 1, for the rows' parity; `after(name, config)` runs after each row."""
    from nti import NTIConfig

    pipe = st.model()
    flops = unet_flops(pipe)
    base = NTIConfig(method=method, steps=st.steps, inner_steps=st.inner, early_stop=False)
    ref = None
    if reference:
        res = timing_row(st, stage, "reference fp32 (eager, batch 1)", base, 1, flops)
        ref = (res["invs"], res["edited"])
    for name, changes in rows:
        config = base.replace(backend="fast", batch_size=n, precision="bf16", **changes)
        try:
            timing_row(st, stage, name, config, n, flops, ref if n == 1 else None)
            if after is not None:
                after(name, config)
        except Exception as err:
            st.emit(stage, variant=name, error=f"{type(err).__name__}: {err}", trace=traceback.format_exc()[-1500:])


def _graph_rows(st: Stage) -> list:
    # autocast over fp32 weights (the "before" of half weights) was measured at 3683908 (gpu_run_h200.jsonl)
    rows = [("bf16 half weights", {})]
    if st.cuda:
        graphs = {"cuda_graphs": True}
        rows += [("+ CUDA graphs (whole inner iteration)", graphs),
                 ("+ CUDA graphs, early stop on", {**graphs, "early_stop": True}),
                 # autocast's fp32 norms: ~285 casts per forward and half the non-GEMM bytes (stage ops)
                 ("+ CUDA graphs, half norms", {**graphs, "half_norms": True}),
                 # the H200 profile put NCHW<->NHWC layout kernels at 26% of batch 1's GPU time
                 ("+ CUDA graphs, channels_last", {**graphs, "channels_last": True}),
                 ("+ CUDA graphs, half norms, channels_last", {**graphs, "half_norms": True, "channels_last": True})]
    else:
        rows.append(("+ half norms", {"half_norms": True}))
    return rows


def stage_nti_b1(st: Stage) -> None:
    _waterfall(st, "nti_b1", _graph_rows(st), 1, reference=True)


def stage_nti_b16(st: Stage) -> None:
    _waterfall(st, "nti_b16", _graph_rows(st), st.big)


def stage_ddim_b16(st: Stage) -> None:
    rows = [("DDIM bf16 half weights", {})]
    if st.cuda:
        rows += [("DDIM + CUDA graphs", {"cuda_graphs": True}),
                 ("DDIM + CUDA graphs, half norms", {"cuda_graphs": True, "half_norms": True})]
    st.steps = 50 if st.cuda else st.steps  # forward-only: cheap enough to run all 50 steps
    _waterfall(st, "ddim_b16", rows, st.big, method="ddim")


def stage_sdxl(st: Stage) -> None:
    """SDXL base-shaped random weights at 1024 px (tiny-xl on CPU): bf16 half weights, eager and with CUDA graphs,
    at SDXL_BATCH images, halving the batch after an out-of-memory error, then eager with gradient checkpointing at
    twice the batch that ran; the rows record their batch."""
    from nti import NTIConfig
    from nti.models import build_sdxl_shaped_pipeline, build_tiny_xl_pipeline

    st.pipe = build_sdxl_shaped_pipeline(device=st.device) if st.cuda else build_tiny_xl_pipeline()
    flops = unet_flops(st.pipe)
    st.emit("sdxl", model=st.pipe.name, resolution=st.pipe.resolution, unet_fwd_gflop=flops[0] / 1e9,
            unet_fwd_bwd_gflop=flops[1] / 1e9, unet_params=sum(p.numel() for p in st.pipe.unet.parameters()))
    base = NTIConfig(steps=st.steps, inner_steps=st.inner, early_stop=False, backend="fast", precision="bf16")
    n = SDXL_BATCH if st.cuda else 2
    while n >= 1:  # eager first: the largest batch that fits, halving after an out-of-memory error
        try:
            timing_row(st, "sdxl", "SDXL bf16 half weights", base.replace(batch_size=n), n, flops)
            break
        except torch.OutOfMemoryError:
            st.emit("sdxl", variant="SDXL bf16 half weights", batch=n, oom=f"out of memory at batch {n}; halving")
            st.pipe.fast_unets.clear()
            torch.cuda.empty_cache()
            n //= 2
    if st.cuda and n >= 1:  # then graphs at that batch, once: a capture that runs out of memory ends the stage
        try:
            timing_row(st, "sdxl", "SDXL + CUDA graphs", base.replace(batch_size=n, cuda_graphs=True), n, flops)
        except Exception as err:
            st.emit("sdxl", variant="SDXL + CUDA graphs", batch=n, error=f"{type(err).__name__}: {err}"[:500])
    if n >= 1:  # gradient checkpointing at twice that batch (the same on CPU): its recompute cost and memory
        m = 2 * n if st.cuda else n
        st.pipe.fast_unets.clear()  # the graphs' pools and the other copy give their memory back first
        if st.cuda:
            torch.cuda.empty_cache()
        try:
            timing_row(st, "sdxl", "SDXL + gradient checkpointing", base.replace(batch_size=m,
                                                                               gradient_checkpointing=True), m, flops)
        except Exception as err:
            st.emit("sdxl", variant="SDXL + gradient checkpointing", batch=m,
                    error=f"{type(err).__name__}: {err}"[:500])


def _compiled_waterfall(st: Stage, stage: str, rows: list, n: int, method: str = "null-text") -> None:
    """Compile rows on a GPU, each null-text row followed by its gradient check (compiled_grad_rel); at batch 1 with
    the fp32 reference's parity too. On CPU (--quick) each row's settings are only checked: inductor takes minutes
    here, and tests/test_fast.py runs both compile scopes on CPU (traced by dynamo) instead."""
    if not st.cuda:
        from nti import NTIConfig
        for _, changes in rows:
            NTIConfig(backend="fast", **changes)
        st.emit(stage, skipped="CPU: tests/test_fast.py compiles on CPU instead (inductor here takes minutes)")
        return

    def grad_check(name, config):
        st.emit(stage, variant=name, batch=n, grad_vs_eager_rel=compiled_grad_rel(st, config, n))
    null_text = method == "null-text"  # DDIM is forward-only: no gradient graph to check (or to compile for it)
    _waterfall(st, stage, rows, n, method=method, reference=null_text and n == 1,
               after=grad_check if null_text else None)


def compiled_grad_rel(st: Stage, config, n: int) -> float:
    """Relative difference of one inner iteration's gradient w.r.t. the null embedding, compiled as `config` says vs
    eager: same UNet copy, inputs and precision (UNetRunner.compiled_vs_eager, the engine's own first-call check).
    bf16 rounding alone gives about 1e-2; a compiler that drops a path gives ~1 (benchmarks/inductor_layout.py:
    zero gradients through an SD up block on torch 2.13, CPU)."""
    from nti.api import null_embedding
    from nti.runner import UNetRunner

    pipe = st.model()
    side = pipe.unet.config.sample_size
    torch.manual_seed(0)
    z = torch.randn(n, pipe.unet.config.in_channels, side, side, device=st.device)
    runner = UNetRunner(pipe, config.replace(compile=True, cuda_graphs=False))
    # contiguous, as the engine's workspace passes it: an expanded (stride 0) context fails dynamo's stride guard, so
    # the check would compile (minutes on a GPU) and compare another graph than the row ran
    context = null_embedding(pipe).expand(n, -1, -1).contiguous()
    return runner.compiled_vs_eager(z, 981, context)["gradient"]


def stage_compile(st: Stage) -> None:
    _compiled_waterfall(st, "compile", [("regional compile + CUDA graphs", {"compile": True, "cuda_graphs": True})],
                        st.big)


def stage_compile_b1(st: Stage) -> None:
    if st.cuda:  # whether this build's inductor has the layout bug that keeps layout optimization off (runner.py):
        # seconds, and the answer says whether --compile-scope unet may let inductor choose conv layouts here
        from nti.benchmarks.inductor_layout import layout_grad_errors
        errors = layout_grad_errors(st.device)
        st.emit("compile_b1", layout_optimization_grad_rel={"on": errors[True], "off": errors[False]})
    graphs = {"compile": True, "cuda_graphs": True}
    whole = {**graphs, "compile_scope": "unet"}
    _compiled_waterfall(st, "compile_b1", [("whole-UNet compile + CUDA graphs", whole),
                                           ("whole-UNet compile + CUDA graphs, channels_last",
                                            {**whole, "channels_last": True}),
                                           ("regional compile + CUDA graphs", graphs)], 1)


def stage_compile_unet(st: Stage) -> None:
    whole = {"compile": True, "cuda_graphs": True, "compile_scope": "unet"}
    _compiled_waterfall(st, "compile_unet", [("whole-UNet compile + CUDA graphs", whole)], st.big)
    st.steps = 50 if st.cuda else st.steps  # forward-only: all 50 steps, as stage ddim_b16
    _compiled_waterfall(st, "compile_unet", [("DDIM + whole-UNet compile + CUDA graphs", whole)], st.big,
                        method="ddim")


def stage_kernels(st: Stage) -> None:
    import nti.kernels.ddim as ops

    if not ops.triton_enabled(torch.empty(0, device=st.device)):
        st.emit("kernels", skipped="Triton kernels run only on CUDA here (the CPU op is the torch reference itself)")
        return
    gen = torch.Generator(device=st.device).manual_seed(0)
    n = 16
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        def rnd(*shape, dt=dtype):
            return torch.randn(*shape, generator=gen, device=st.device).to(dt)
        x, eu = rnd(n, 4, 64, 64, dt=torch.float32), rnd(n, 4, 64, 64)  # drawn in the H200 run's order
        ec, tgt = rnd(n, 4, 64, 64), rnd(n, 4, 64, 64, dt=torch.float32)
        w = torch.rand(n, generator=gen, device=st.device) * 7
        at = torch.rand(n, generator=gen, device=st.device) * 0.9 + 0.05
        ap = torch.rand(n, generator=gen, device=st.device) * 0.9 + 0.05
        eu.requires_grad_(True)
        loss = ops.guided_ddim_step_mse(x, eu, ec, w, at, ap, tgt)
        (g,) = torch.autograd.grad(loss.sum(), eu)
        eu_ref = eu.detach().clone().requires_grad_(True)
        loss_ref = ops.guided_ddim_step_mse_ref(x, eu_ref, ec, w, at, ap, tgt)
        (g_ref,) = torch.autograd.grad(loss_ref.sum(), eu_ref)
        step = ops.guided_ddim_step(x, eu.detach(), ec, w, at, ap)
        row = {"dtype": str(dtype).replace("torch.", ""), "shape": [n, 4, 64, 64],
               "step_rel": rel(step, ops.guided_ddim_step_ref(x, eu.detach(), ec, w, at, ap)),
               "mse_rel": rel(loss, loss_ref), "mse_grad_rel": rel(g, g_ref)}
        row["fused_step_us"] = cuda_time(lambda: ops.guided_ddim_step(x, eu.detach(), ec, w, at, ap)) * 1e6
        row["torch_step_us"] = cuda_time(lambda: ops.guided_ddim_step_ref(x, eu.detach(), ec, w, at, ap)) * 1e6
        st.emit("kernels", **row)


def stage_profile(st: Stage) -> None:
    """One outer null-text step per config under the profiler: GPU kernel time by class and the top kernels, GPU-busy
    vs wall; each config's row as soon as it is measured. On CPU (--quick) the same code profiles CPU ops instead."""
    from nti import NTIConfig

    # graphs first: their kernels are eager's without the launch gaps, and an eager step's trace costs the most
    # (batch, CUDA graphs, channels_last, half norms)
    configs = [(st.big, True, False, False), (st.big, True, False, True), (st.big, True, True, False),
               (1, True, False, False), (1, True, True, False), (1, False, False, False),
               (st.big, False, False, False)] if st.cuda else [(1, False, False, False), (st.big, False, False, False)]
    for n, graphs, nhwc, half_norms in configs:
        label = {"batch": n, "cuda_graphs": graphs, "channels_last": nhwc, "half_norms": half_norms,
                 "inner_steps": PROFILE_INNER}
        config = NTIConfig(steps=1, inner_steps=PROFILE_INNER, early_stop=False, backend="fast", precision="bf16",
                           batch_size=n, cuda_graphs=graphs, channels_last=nhwc, half_norms=half_norms)
        try:
            unprofiled, wall, table = profiled_step(st, config)
        except Exception as err:
            st.emit("profile", **label, error=f"{type(err).__name__}: {err}"[:500],
                    trace=traceback.format_exc()[-1500:])
            continue
        note = {} if st.cuda else {"note": "CPU ops, nested (an op's time includes its children's): checks the stage"}
        st.emit("profile", **label, wall_s=wall, unprofiled_wall_s=unprofiled, gpu_busy_s=table["busy_us"] / 1e6,
                busy_fraction=table["busy_us"] / 1e6 / wall, **{k: v for k, v in table.items() if k != "busy_us"},
                **note)


def profiled_step(st: Stage, config) -> tuple[float, float, dict]:
    """Invert config.batch_size photos three times: warm-up (capture), timed, then timed under the profiler. Returns
    both walls and the kernel table of the profiled run (CPU ops on CPU)."""
    import nti
    from torch.profiler import ProfilerActivity, profile

    pipe = st.model()
    images, sources, _ = zip(*jobs(config.batch_size))

    def invert():
        nti.invert(pipe, list(images), list(sources), config, progress=False)
        sync(st.device)
    invert()
    start = time.perf_counter()
    invert()
    unprofiled = time.perf_counter() - start  # the profiler's CPU-side recording slows eager steps
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if st.cuda else [])) as prof:
        start = time.perf_counter()
        invert()
        wall = time.perf_counter() - start
    device = torch.autograd.DeviceType.CUDA if st.cuda else torch.autograd.DeviceType.CPU
    return unprofiled, wall, kernel_table(device_events(prof, device))


PROFILE_INNER = 3  # inner iterations in a profiled step: enough for class shares, a third of the trace of 10
TOP_KERNELS, TOP_OTHER = 20, 10  # kernels listed per profile row; elementwise/other ones listed at least


def device_events(prof, device=torch.autograd.DeviceType.CUDA) -> list[tuple[str, float]]:
    """(name, us) of each event the profiler recorded on `device` (CUDA: kernels, memcpy, memset), from its raw
    results: prof.events() first builds an event tree (26x slower on a CPU trace of 20k events), and an eager step's
    trace on the GPU is several times that. record_function ranges are left out: they span events counted already."""
    try:
        return [(evt.name(), (evt.end_ns() - evt.start_ns()) / 1e3) for evt in prof.profiler.kineto_results.events()
                if evt.device_type() == device and not getattr(evt, "is_user_annotation", lambda: False)()]
    except (AttributeError, TypeError):  # another torch's private API (the GPU machine runs 2.11): the slow, public way
        return [(evt.name, evt.time_range.elapsed_us()) for evt in prof.events() if evt.device_type == device
                and not getattr(evt, "is_user_annotation", False)]


def kernel_table(events, top: int = TOP_KERNELS, other: int = TOP_OTHER, chars: int = 120) -> dict:
    """Busy time, ms and calls per kernel class, and the kernels with the most time from (name, us) pairs: the top
    `top`, then more of the elementwise/other class until `other` of it are listed (the class the H200 run could
    not explain), each with its class, ms and calls; names shortened to `chars` (short_kernel_name)."""
    by_name: dict = {}
    for name, us in events:
        total, calls = by_name.get(name, (0.0, 0))
        by_name[name] = (total + us, calls + 1)
    class_us: dict = {}
    class_calls: dict = {}
    for name, (us, calls) in by_name.items():
        key = kernel_class(name)
        class_us[key] = class_us.get(key, 0.0) + us
        class_calls[key] = class_calls.get(key, 0) + calls
    busy = sum(class_us.values())
    order = sorted(class_us, key=lambda k: -class_us[k])
    listed, others = [], 0
    for rank, (name, (us, calls)) in enumerate(sorted(by_name.items(), key=lambda kv: -kv[1][0])):
        key = kernel_class(name)
        if rank >= top and (key != "elementwise/other" or others >= other):
            continue
        others += key == "elementwise/other"
        listed.append({"name": short_kernel_name(name, chars), "class": key, "ms": round(us / 1e3, 3), "calls": calls})
    return {"busy_us": busy, "by_class_ms": {k: class_us[k] / 1e3 for k in order},
            "by_class_calls": {k: class_calls[k] for k in order}, "kernel_names": len(by_name),
            "top_kernels": listed, "top_kernels_share": sum(k["ms"] for k in listed) * 1e3 / busy if busy else None}


def short_kernel_name(name: str, chars: int = 120) -> str:
    """A demangled kernel name without what says nothing about the work (void, the argument list, namespaces,
    lambda wrappers), so that a cast and a SiLU stay apart within `chars`; longer ones end in '...'."""
    name = name.removeprefix("void ")
    if name.endswith(")"):  # the argument list repeats the template's types; "Memcpy DtoD (Device -> Device)" stays
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                break
        if i > 0 and (name[i - 1] == ">" or name[i - 1].isalnum() or name[i - 1] == "_"):
            name = name[:i]
    name = re.sub(r"\{lambda\(\)#\d+\}::operator\(\)\(\) const::", "", name)
    name = name.replace("(at::TensorIteratorBase&)", "")
    for noise in ("(anonymous namespace)::", "at::native::", "at::cuda::", "at::", "c10::", "std::"):
        name = name.replace(noise, "")
    return name if len(name) <= chars else name[:chars - 3] + "..."


def kernel_class(name: str) -> str:
    low = name.lower()
    for key, words in (("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_sdp")),
                       ("convolution", ("conv", "implicit", "wgrad", "dgrad", "xmma_fprop", "winograd")),
                       ("gemm", ("gemm", "cutlass", "sm90_xmma", "cublas", "matmul", "nvjet")),  # nvjet: cuBLAS
                       # GroupNorm's / LayerNorm's reduction kernels do not say norm (group_norm_kernel.cu)
                       ("norm", ("norm", "rowwisemoments", "fusedparams", "gammabeta", "computeinternalgradients")),
                       ("memcpy/memset", ("memcpy", "memset")),
                       ("layout", ("nchwtonhwc", "nhwctonchw", "transpose"))):
        if any(w in low for w in words):
            return key
    return "elementwise/other"


def stage_passes(st: Stage) -> None:
    """UNet rows per image that null-text inversion + edit costs on the shapes model, early stop off and on."""
    import nti
    from nti import NTIConfig

    pipe = nti.load_pipeline(None, st.device)
    scenes = Path(nti.__file__).parent / "assets" / "scenes"
    records = [json.loads(line) for line in (scenes / "prompts.jsonl").read_text().splitlines() if line.strip()]
    records = list({r["image"]: r for r in records}.values())[:2 if st.quick else 6]
    images = [str(scenes / r["image"]) for r in records]
    sources, targets = [r["source_prompt"] for r in records], [r["target_prompt"] for r in records]
    rows = {"forward": 0, "backward": 0}

    def count(module, args, kwargs, output):
        rows["backward" if torch.is_grad_enabled() else "forward"] += args[0].shape[0]
    for early_stop, backend in ((False, "fast"), (True, "fast"), (True, "reference")):
        if backend == "reference":  # batch 1 and launch-bound: one image shows the reference's extra move-on rows
            images, sources, targets = images[:1], sources[:1], targets[:1]
        # --quick's 5 steps never get under the notebook's 1e-5 threshold; a larger one makes early stop fire there
        config = NTIConfig(early_stop=early_stop, backend=backend, batch_size=len(images), steps=5 if st.quick else 50,
                           early_stop_eps=2e-2 if st.quick else 1e-5)
        rows.update(forward=0, backward=0)
        stats = pipe.fast_stats
        before = (stats.forward_rows, stats.backward_rows)
        hook = pipe.unet.register_forward_hook(count, with_kwargs=True)  # the reference calls pipe.unet
        try:
            invs = nti.invert(pipe, images, sources, config, progress=False)
            nti.edit_latents(pipe, invs, targets, config, progress=False)
        finally:
            hook.remove()
        n = len(images)
        fwd = rows["forward"] + rows["backward"] + stats.forward_rows - before[0]
        bwd = rows["backward"] + stats.backward_rows - before[1]
        st.emit("passes", backend=backend, early_stop=early_stop, early_stop_eps=config.early_stop_eps, images=n,
                steps=config.steps,
                unet_forward_per_image=fwd / n, unet_backward_per_image=bwd / n,
                inner_iterations_per_image=sum(sum(i.iterations) for i in invs) / n,
                first_image_iterations=list(invs[0].iterations))


GEMM_OPS = ("convolution", "mm", "bmm", "addmm", "baddbmm", "scaled_dot_product", "_flash_attention",
            "_efficient_attention", "_cudnn_attention")  # aten op names whose cost is compute, not memory traffic


class OpCount(TorchDispatchMode):
    """Aten ops run, dtype casts among them, and the bytes the others read and write (inputs + outputs; views
    excluded): the memory traffic of the non-GEMM ops, which is what precision choices change besides the GEMMs."""

    def __init__(self):
        super().__init__()
        self.ops, self.casts, self.nongemm_bytes = 0, 0, 0
        self.in_blocks, self.ops_in_blocks = 0, 0  # depth inside the repeated blocks (count_blocks), ops run there

    def count_blocks(self, module: torch.nn.Module) -> list:
        """Hooks that count the ops run inside the module's repeated transformer blocks (what regional compile
        compiles); returns their handles."""
        def enter(*_):
            self.in_blocks += 1

        def leave(*_):
            self.in_blocks -= 1
        blocks = [m for m in module.modules() if type(m).__name__ in getattr(module, "_repeated_blocks", ())]
        return [h for m in blocks for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self.ops_in_blocks += self.in_blocks > 0
        self.casts += func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype)
        name = func.overloadpacket.__name__
        if not func.is_view and not any(g in name for g in GEMM_OPS):
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.nongemm_bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


class CudaAutocastPolicy(TorchFunctionMode):
    """CUDA autocast's casts for the ops an SD UNet runs, on any device: norms, softmax and exp in fp32, GEMMs and
    attention in bf16 (torch's autocast_mode.cpp lists). CPU autocast keeps GroupNorm/LayerNorm in the input's
    dtype, so on CPU this is what stands in for a GPU's casts and bytes."""

    FP32 = {F.group_norm, F.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, torch.exp, torch.Tensor.exp}
    LOW = {F.linear, F.conv2d, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.baddbmm,
           F.scaled_dot_product_attention}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.float32 if func in self.FP32 else torch.bfloat16 if func in self.LOW else None
        if dtype is not None:
            def cast(t):
                return t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
        return func(*args, **kwargs)


def stage_ops(st: Stage) -> None:
    """Aten ops, casts, non-GEMM bytes and bytes saved for backward in one inner iteration's UNet forward +
    backward, bf16, batch 1: autocast over fp32 weights, the half-weight copy under autocast, and half norms (the
    whole copy in bf16, no autocast). SD v1.4 layers; on CPU an 8x8 latent, as the op counts do not depend on the
    resolution (bytes do; the non-quick CPU run takes a 32x32 latent). CPU autocast keeps GroupNorm/LayerNorm in
    bf16 where CUDA's runs them in fp32, so off CUDA the autocast rows run under CudaAutocastPolicy as well."""
    from nti import NTIConfig
    from nti.api import null_embedding
    from nti.models import build_sd14_shaped_pipeline
    from nti.runner import UNetRunner

    pipe = build_sd14_shaped_pipeline(device=st.device) if not st.quick else st.model()
    side = pipe.unet.config.sample_size if st.cuda else 8 if st.quick else 32
    z = torch.randn(1, 4, side, side, device=st.device)
    base = NTIConfig(backend="fast", precision="bf16")
    for variant, config in (("autocast over fp32 weights", base.replace(half_weights=False)),
                            ("half weights", base), ("half norms", base.replace(half_norms=True))):
        runner = UNetRunner(pipe, config)
        ctx = null_embedding(pipe).clone().requires_grad_(True)
        weights = {p.untyped_storage().data_ptr() for p in runner.module.parameters()}
        saved = {}

        def pack(t):  # activations and per-call weight casts; the weights themselves cost no extra memory
            if t.untyped_storage().data_ptr() not in weights:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        emulate = not st.cuda and not config.half_norms
        fwd_count = OpCount()
        hooks = fwd_count.count_blocks(runner.module)
        with (fwd_count, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
              CudaAutocastPolicy() if emulate else contextlib.nullcontext()):
            out = runner.eps(z, 981, ctx)
        for hook in hooks:
            hook.remove()
        with OpCount() as bwd_count:
            torch.autograd.grad(out.float().square().mean(), ctx)
        st.emit("ops", variant=variant, half_weights=config.half_weights, half_norms=config.half_norms,
                cuda_autocast_policy="emulated" if emulate else "none" if config.half_norms else "native",
                latent_side=side, forward_ops=fwd_count.ops, forward_casts=fwd_count.casts,
                forward_ops_in_blocks=fwd_count.ops_in_blocks,
                backward_ops=bwd_count.ops, backward_casts=bwd_count.casts,
                nongemm_gib=(fwd_count.nongemm_bytes + bwd_count.nongemm_bytes) / 2**30,
                saved_for_backward_gib=sum(saved.values()) / 2**30,
                weight_gib=sum(p.numel() * p.element_size() for p in runner.module.parameters()) / 2**30)


# -------------------------------------------------------------------------------------------------------- driver

def run_stage(args) -> int:
    st = Stage(args)
    torch.manual_seed(0)
    globals()[f"stage_{args.stage}"](st)
    return 0


def drive(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget
    start = time.perf_counter()
    names = args.stages.split(",") if args.stages else list(STAGES)
    if args.quick:  # imported once here, shared by the forked stages (fork_stage)
        for module in ("diffusers.models", "transformers.models.clip", "nti.fast", "nti.models", "nti.reference"):
            importlib.import_module(module)
    unfinished = []
    for name in names:
        allowed, what = STAGES[name]
        left = budget - (time.perf_counter() - start)
        needs = min(allowed, max(30, allowed / 2))  # with less, its first row would rarely come back
        if left < needs:
            record(out, {"stage": name, "status": "skipped",
                         "reason": f"budget: {left:.0f} s left, {needs:.0f} s needed to start"})
            unfinished.append(name)
            continue
        limit = min(allowed * (5 if args.quick else 1), left)  # quick: a slow shared CPU
        cmd = [sys.executable, "-m", "nti.benchmarks.gpu_run", "--stage", name, "--out", str(out)]
        if args.quick:
            cmd.append("--quick")
        t0 = time.perf_counter()
        print(f"--- {name}: {what} (limit {limit:.0f} s)", file=sys.stderr, flush=True)
        status, tail = (fork_stage if args.quick else spawn_stage)(cmd, limit)
        record(out, {"stage": name, "status": status, "seconds": time.perf_counter() - t0, "error_tail": tail})
        print(f"    {status} in {time.perf_counter() - t0:.0f} s" + (f"\n{tail}" if tail else ""), file=sys.stderr,
              flush=True)
        if status == "timeout":
            unfinished.append(name)
    if unfinished:
        print(f"--- not finished: {', '.join(unfinished)}. Next command:\n    {follow_up(unfinished, args.quick, out)}",
              file=sys.stderr, flush=True)
    summary = summarize(out)
    print(summary)
    return 0


def follow_up(stages: list[str], quick: bool = False, out: Path | None = None) -> str:
    """The command that runs what a budget skipped or cut: env again (its file then names its device), the stages
    in STAGES order, a budget of their allowances; as this run was started: its PYTHONPATH (the GPU machine imports
    nti from /tmp/site), and an out folder beside `out`, named under $OUT when `out` is (only $OUT comes back)."""
    names = ["env"] + [s for s in STAGES if s in stages and s != "env"]
    budget = min(540, sum(STAGES[s][0] for s in names))
    second = "OUT2" if out is None else str(Path(out).with_name(Path(out).name + "2"))
    root = os.environ.get("OUT")
    if out is not None and root and Path(second).is_relative_to(root):
        second = '"$OUT/' + Path(second).relative_to(root).as_posix() + '"'
    path = os.environ.get("PYTHONPATH")
    return ((f"PYTHONPATH={shlex.quote(path)} " if path else "") + f"python3 -m nti.benchmarks.gpu_run --out {second} "
            f"--stages {','.join(names)} --budget {budget:.0f}" + (" --quick" if quick else ""))


def spawn_stage(cmd: list[str], limit: float) -> tuple[str, str]:
    """Run one stage in a fresh interpreter (the GPU run, as measured on the H200: no CUDA state is inherited)."""
    try:
        proc = subprocess.run(cmd, timeout=limit, capture_output=True, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return "timeout", ""
    return ("ok", "") if proc.returncode == 0 else ("failed", (proc.stderr or "")[-3000:])


def fork_stage(cmd: list[str], limit: float) -> tuple[str, str]:
    """Run one stage in a process forked from this one (--quick, CPU only): still a process per stage, without the
    ~6 s of imports each fresh interpreter pays on a 2-core CI machine. This process has run no torch op, so the
    child inherits no thread pool (OpenMP) or device state."""
    import multiprocessing
    import tempfile
    argv = cmd[cmd.index("nti.benchmarks.gpu_run") + 1:]
    with tempfile.TemporaryFile() as err:
        proc = multiprocessing.get_context("fork").Process(target=forked_stage, args=(argv, err.fileno()))
        proc.start()
        proc.join(limit)
        if proc.is_alive():
            proc.kill()
            proc.join()
            return "timeout", ""
        if proc.exitcode == 0:
            return "ok", ""
        err.seek(0)
        return "failed", err.read()[-3000:].decode(errors="replace")


def forked_stage(argv: list[str], err_fd: int) -> None:
    """Child side of fork_stage: stderr to the parent's file, stdout dropped (as spawn_stage captures them)."""
    os.dup2(err_fd, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", buffering=1, closefd=False)  # the
    # parent's sys.stdout / sys.stderr may be wrappers (pytest's capture) that do not write to fds 1 and 2
    code = 1
    try:
        code = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def record(out: Path, row: dict) -> None:
    with open(out / "gpu_run.jsonl", "a") as fh:
        fh.write(json.dumps({"driver": True, **row}) + "\n")


def load_rows(out: Path) -> list[dict]:
    path = out / "gpu_run.jsonl" if out.is_dir() else out
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(out: Path) -> str:
    """The README's GPU table (markdown) from the JSON lines; also written to OUT/summary.md."""
    rows = load_rows(out)

    def f(v, spec=".3g"):
        return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"
    lines = []
    for env in [r for r in rows if r["stage"] == "env" and not r.get("driver")] or [{}]:  # one per joined command
        lines.append(f"Device: {env.get('gpu') or env.get('cpu', '?')}; torch {env.get('torch', '?')}, diffusers "
                     f"{env.get('diffusers', '?')}, Triton {env.get('triton')} (runs: {env.get('triton_runs')}); "
                     f"bf16 matmul {f(env.get('bf16_matmul_tflops'), '.0f')} TFLOP/s, copy "
                     f"{f(env.get('copy_tb_s'), '.2f')} TB/s; commit {env.get('commit')}; TF32 off.")
    lines.append("")
    ran = {r["stage"] for r in rows if r.get("driver") and r.get("status") == "ok"}
    timing = [r for r in rows if r.get("variant") and "s_per_image" in r or (r.get("variant") and "error" in r
                                                                            and r["stage"] != "parity")]
    if timing:
        lines += ["| stage | variant | batch | s/image (50 steps) | goal | warm-up s | peak GiB | TFLOP/s | "
                  "inner it./image | parity emb / edit |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in timing:
            if "error" in r:
                lines.append(f"| {r['stage']} | {r['variant']} | failed: {r['error'][:80]} |||||||")
                continue
            parity = (f"{f(r.get('parity_embeddings_rel'), '.1e')} / {f(r.get('parity_edit_rel'), '.1e')}"
                      if "parity_edit_rel" in r else "-")
            variant = r["variant"] + (f" (compile failed, ran eager: {r['compile_failed'][:60]})"
                                      if r.get("compile_failed") else "")
            variant += f" (fused step: {r['fused_step']})" if r.get("fused_step", "off") != "off" else ""
            lines.append(f"| {r['stage']} | {variant} | {r['batch']} | {f(r['s_per_image_50_steps'])} | "
                         f"{f(r.get('goal_s_per_image'))} | {f(r['warmup_s'])} | {f(r['peak_gib'])} | "
                         f"{f(r['tflops'])} | {f(r['inner_iterations_per_image'])} | {parity} |")
        lines.append("")
    parity = [r for r in rows if r["stage"] == "parity" and not r.get("driver")]
    if parity:
        lines += ["| parity vs eager fp32 reference (3 steps, 3 inner, strict fp32) | z_T rel | embeddings rel | "
                  "edit rel | same iterations | vs eager / autocast (emb) |", "|---|---|---|---|---|---|"]
        for r in parity:
            if "error" in r:
                lines.append(f"| {r['variant']} | failed: {r['error'][:80]} |||||")
                continue
            other = r.get("vs_eager_embeddings_rel", r.get("vs_autocast_embeddings_rel"))
            fused = f" (fused step: {r['fused_step']})" if r.get("fused_step") not in (None, "off") else ""
            lines.append(f"| {r['variant']}{fused} | {f(r['zT_rel'], '.1e')} | {f(r['embeddings_rel'], '.1e')} | "
                         f"{f(r['edit_rel'], '.1e')} | {r['iterations_equal']} | {f(other, '.1e')} |")
        lines.append("")
        lines += [f"- {r['variant']} vs the same without checkpointing: embeddings "
                  f"{f(r['vs_no_checkpointing_embeddings_rel'], '.1e')}, edit "
                  f"{f(r['vs_no_checkpointing_edit_rel'], '.1e')}" for r in parity
                  if "vs_no_checkpointing_embeddings_rel" in r]
    for r in rows:
        if r["stage"] == "profile" and ("wall_s" in r or "error" in r):
            lines += profile_lines(r)
        if r["stage"] == "kernels" and "step_rel" in r:
            lines.append(f"- fused kernels {r['dtype']}: step rel {r['step_rel']:.1e}, loss {r['mse_rel']:.1e}, "
                         f"grad {r['mse_grad_rel']:.1e}; {r['fused_step_us']:.0f} us fused vs "
                         f"{r['torch_step_us']:.0f} us torch")
        if r["stage"] == "ops" and "forward_ops" in r:
            variant = r.get("variant") or ("half weights" if r["half_weights"] else "autocast over fp32")
            moved = f", non-GEMM ops move {r['nongemm_gib']:.3g} GiB" if "nongemm_gib" in r else ""
            blocks = (f", {r['forward_ops_in_blocks']} in the transformer blocks regional compile covers"
                      if "forward_ops_in_blocks" in r else "")
            lines.append(f"- one inner iteration's UNet, {variant}: {r['forward_ops']} forward aten ops "
                         f"({r['forward_casts']} casts{blocks}), {r['backward_ops']} "
                         f"backward, {r['saved_for_backward_gib']:.2f} GiB saved for backward besides the weights"
                         f"{moved} ({r['latent_side']}x{r['latent_side']} latent)")
        if "grad_vs_eager_rel" in r:
            lines.append(f"- {r['stage']} {r['variant']} (batch {r['batch']}): one inner iteration's gradient vs "
                         f"eager {r['grad_vs_eager_rel']:.1e}")
        if "layout_optimization_grad_rel" in r:
            on, off = r["layout_optimization_grad_rel"]["on"], r["layout_optimization_grad_rel"]["off"]
            lines.append(f"- inductor layout optimization (benchmarks/inductor_layout.py, an SD up block's input "
                         f"gradient vs eager): on {on:.1e}, off {off:.1e}")
        if r["stage"] == "passes" and "unet_forward_per_image" in r:
            lines.append(f"- UNet passes per image, {r['backend']}, early stop {'on' if r['early_stop'] else 'off'}: "
                         f"{r['unet_forward_per_image']:.0f} forward, {r['unet_backward_per_image']:.0f} backward "
                         f"({r['inner_iterations_per_image']:.0f} inner iterations; shapes model)")
        if r.get("driver") and r.get("status") != "ok" and not (r["status"] == "skipped" and r["stage"] in ran):
            lines.append(f"- stage {r['stage']}: {r['status']} {r.get('reason', '')} {r.get('note', '')}".rstrip())
    text = "\n".join(lines) + "\n"
    if out.is_dir():
        (out / "summary.md").write_text(text)
    return text


def profile_lines(r: dict) -> list[str]:
    """A profile row in the summary: wall vs GPU busy and the top classes; the top 5 kernels under it."""
    label = f"profile b{r['batch']}" + (" + CUDA graphs" if r["cuda_graphs"] else "")
    label += (", channels_last" if r.get("channels_last") else "") + (", half norms" if r.get("half_norms") else "")
    label += f", {r['inner_steps']} inner" if "inner_steps" in r else ""
    if "error" in r:
        return [f"- {label}: failed: {r['error'][:80]}"]
    calls = r.get("by_class_calls", {})
    top = ", ".join(f"{k} {v:.0f} ms" + (f" ({calls[k]} calls)" if k in calls else "")
                    for k, v in list(r["by_class_ms"].items())[:4])
    unprofiled = f" ({r['unprofiled_wall_s']:.2f} s unprofiled)" if "unprofiled_wall_s" in r else ""
    lines = [f"- {label}: wall {r['wall_s']:.2f} s{unprofiled}, GPU busy {r['gpu_busy_s']:.2f} s "
             f"({100 * r['busy_fraction']:.0f}%); {top}"]
    if r.get("top_kernels"):
        lines.append("  - top kernels: " + "; ".join(f"{k['name'][:80]} {k['ms']:.1f} ms x{k['calls']}"
                                                     for k in r["top_kernels"][:5]))
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/gpu", help="folder for gpu_run.jsonl and summary.md")
    p.add_argument("--quick", action="store_true", help="CPU, tiny model, 2 steps: checks the script, not speed")
    p.add_argument("--budget", type=float, default=480, help="seconds for all stages (default 480: 8 minutes)")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--stage", default=None, metavar="NAME", help="one stage in this process (what --stages runs each "
                   "stage as; docs/benchmarks.md runs --stage ops alone on CPU)")
    p.add_argument("--summarize", default=None, metavar="OUT", help="only remake OUT/summary.md")
    args = p.parse_args(argv)
    unknown = set(args.stages.split(",")) - set(STAGES) if args.stages else set()
    if unknown:  # before any stage runs, not when the loop reaches the name
        p.error(f"unknown stage(s) {', '.join(sorted(unknown))}; known: {','.join(STAGES)}")
    if args.summarize:
        print(summarize(Path(args.summarize)))
        return 0
    if args.stage:
        return run_stage(args)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())

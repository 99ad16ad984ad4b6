"""The branches of the prepared GPU run (benchmarks/gpu_run.py) and of the engine that only a CUDA device takes, run
here on CPU: torch.cuda's calls faked, the models small or on the meta device. A crash in such a branch would only
show on a lent GPU machine, whose minutes are few; these tests find it first."""
import types

import pytest
import torch

import nti.benchmarks.gpu_run as gpu_run


def test_compile_gradient_check_reuses_the_graphs_the_row_compiled(tiny_pipe, monkeypatch):
    """The compile rows' gradient check (compiled_grad_rel) calls the UNet the timing row compiled with inputs laid
    out as the engine's: no recompile. A stride-0 context (expand) failed dynamo's stride guard: on a GPU a second
    whole-UNet inductor compile (minutes of the stage's allowance), checking another graph than the row ran."""
    import nti
    import nti.runner as runner
    from nti import NTIConfig

    compiles = []

    def counting(gm, example_inputs):
        compiles.append(len(example_inputs))
        return gm
    monkeypatch.setattr(runner, "COMPILE_BACKEND", counting)
    st = types.SimpleNamespace(model=lambda: tiny_pipe, device=tiny_pipe.device)
    images, sources, _ = zip(*gpu_run.jobs(2))
    try:
        for scope in ("unet", "blocks"):
            torch._dynamo.reset()
            tiny_pipe.fast_unets.clear()
            config = NTIConfig(backend="fast", compile=True, compile_scope=scope, batch_size=2, steps=1,
                               inner_steps=1, early_stop=False)
            nti.invert(tiny_pipe, list(images), list(sources), config, progress=False)
            before = len(compiles)
            assert before > 0
            assert gpu_run.compiled_grad_rel(st, config, 2) < 1e-6
            assert len(compiles) == before, scope
    finally:
        torch._dynamo.reset()
        tiny_pipe.fast_unets.clear()  # later tests must not get this counting compile


# ------------------------------------------------------------------------------ gpu_run's stages, CUDA branches

@pytest.fixture
def cuda_stage(tiny_pipe, monkeypatch, tmp_path):
    """A gpu_run Stage that takes its CUDA branches on this CPU: cuda True, the tiny model, one step and one inner
    iteration, torch.cuda's memory stats, synchronize and timers faked; rows collected from gpu_run.jsonl."""
    st = gpu_run.Stage(types.SimpleNamespace(out=tmp_path, quick=False))
    st.cuda, st.pipe, st.steps, st.inner, st.big = True, tiny_pipe, 1, 1, 2
    for name, value in (("reset_peak_memory_stats", None), ("max_memory_allocated", 0), ("synchronize", None),
                        ("empty_cache", None)):
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=value, **kwargs: value)
    monkeypatch.setattr(gpu_run, "cuda_time", lambda fn, repeat=10: 1e-3)  # CUDA events: not on a CPU build
    st.rows = lambda: gpu_run.load_rows(tmp_path)
    yield st
    torch.backends.cuda.matmul.allow_tf32 = st.tf32_defaults["matmul"]
    torch.backends.cudnn.allow_tf32 = st.tf32_defaults["cudnn"]
    tiny_pipe.fast_unets.clear()


def fake_timing_row(calls: list, oom_above: int | None = None):
    """gpu_run.timing_row that records (stage, variant, batch, config) and emits a short row; with oom_above, batches
    above it raise CUDA's out-of-memory error as the caching allocator does."""
    def timing_row(st, stage, variant, config, n, flops, reference=None):
        if oom_above is not None and n > oom_above:
            raise torch.OutOfMemoryError(f"CUDA out of memory (batch {n})")
        calls.append((stage, variant, n, config))
        st.emit(stage, variant=variant, batch=n, s_per_image=1.0)
        return {"invs": None, "edited": None}
    return timing_row


def test_env_stage_on_cuda(cuda_stage, monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, multi_processor_count=132,
                                  total_memory=80 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: torch.zeros(8, dtype=torch.uint8))  # not 1 GiB here
    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: torch.zeros(8, 8))
    gpu_run.stage_env(cuda_stage)
    (env,) = cuda_stage.rows()
    assert env["gpu"] == props.name and env["capability"] == "9.0" and env["sms"] == 132
    assert env["bf16_matmul_tflops"] > 0 and env["copy_tb_s"] > 0 and env["tf32_used"] is False


def test_timing_stages_on_cuda_build_valid_configs(cuda_stage, monkeypatch):
    """Every CUDA-only row of the waterfalls (graphs, half norms, channels_last, compile scopes, DDIM at 50 steps) is a
    valid NTIConfig that reaches timing_row, and each compile row is followed by its gradient check."""
    calls = []
    monkeypatch.setattr(gpu_run, "timing_row", fake_timing_row(calls))
    monkeypatch.setattr(gpu_run, "compiled_grad_rel", lambda st, config, n: 0.01)
    import nti.benchmarks.inductor_layout as layout
    monkeypatch.setattr(layout, "layout_grad_errors", lambda device: {True: 1.0, False: 3e-7})  # inductor: minutes
    for stage in ("nti_b1", "nti_b16", "ddim_b16", "compile", "compile_b1", "compile_unet"):
        cuda_stage.steps = 1
        getattr(gpu_run, f"stage_{stage}")(cuda_stage)
    rows = cuda_stage.rows()
    assert not [r for r in rows if "error" in r]
    variants = {(stage, variant) for stage, variant, _, _ in calls}
    assert ("nti_b1", "+ CUDA graphs, half norms, channels_last") in variants
    assert ("compile_unet", "DDIM + whole-UNet compile + CUDA graphs") in variants
    configs = {(stage, variant): config for stage, variant, _, config in calls}
    assert configs["nti_b16", "+ CUDA graphs, channels_last"].channels_last
    assert configs["ddim_b16", "DDIM + CUDA graphs"].steps == 50 and configs["ddim_b16", "DDIM + CUDA graphs"].cuda_graphs
    assert configs["compile_b1", "whole-UNet compile + CUDA graphs"].compile_scope == "unet"
    assert [r["layout_optimization_grad_rel"] for r in rows if "layout_optimization_grad_rel" in r] == [
        {"on": 1.0, "off": 3e-7}]  # compile_b1 says first whether this build's inductor has the layout bug
    grads = [(r["stage"], r["variant"]) for r in rows if "grad_vs_eager_rel" in r]
    assert grads == [(s, v) for s, v, _, c in calls if c.compile and c.method == "null-text"]


def test_sdxl_stage_halves_its_batch_on_out_of_memory(cuda_stage, monkeypatch):
    """SDXL at batch 8 does not fit: 4, then 2 runs; CUDA graphs at 2, gradient checkpointing at 4."""
    from nti.models import build_tiny_xl_pipeline

    calls = []
    monkeypatch.setattr(gpu_run, "timing_row", fake_timing_row(calls, oom_above=2))
    monkeypatch.setattr("nti.models.build_sdxl_shaped_pipeline", lambda device: build_tiny_xl_pipeline())
    gpu_run.stage_sdxl(cuda_stage)
    rows = cuda_stage.rows()
    assert [r["oom"] for r in rows if "oom" in r] == ["out of memory at batch 8; halving",
                                                      "out of memory at batch 4; halving"]
    assert [(v, n) for _, v, n, _ in calls] == [("SDXL bf16 half weights", 2), ("SDXL + CUDA graphs", 2)]
    (error,) = [r for r in rows if "error" in r]  # twice the batch that ran: over the limit here too
    assert error["variant"] == "SDXL + gradient checkpointing" and error["batch"] == 4


def test_kernels_stage_on_cuda(cuda_stage, monkeypatch):
    """The Triton comparison's code (here the ops run their torch reference: the figures are ~0, the rows whole)."""
    import nti.kernels.ddim as ops

    monkeypatch.setattr(ops, "triton_enabled", lambda t: True)
    monkeypatch.setattr(ops, "_use_triton", lambda *ts: False)  # no GPU to launch on: the ops' torch path
    gpu_run.stage_kernels(cuda_stage)
    rows = cuda_stage.rows()
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16", "float16"]
    assert all(r["step_rel"] < 1e-6 and r["mse_grad_rel"] < 1e-4 and r["fused_step_us"] > 0 for r in rows)


def test_profile_stage_on_cuda_runs_every_config(cuda_stage, monkeypatch):
    """Seven configs (graphs first), each row with its kernel table; one that fails is a row, not the end."""
    configs = []

    def profiled_step(st, config):
        configs.append(config)
        if len(configs) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        table = gpu_run.kernel_table([("sm90_xmma_gemm_bf16", 30.0), ("elementwise_kernel", 10.0)])
        return 0.1, 0.2, table
    monkeypatch.setattr(gpu_run, "profiled_step", profiled_step)
    gpu_run.stage_profile(cuda_stage)
    rows = cuda_stage.rows()
    assert len(rows) == 7 and [c.cuda_graphs for c in configs] == [True] * 5 + [False] * 2
    assert rows[1]["error"].startswith("OutOfMemoryError") and rows[1]["half_norms"] is True
    ok = [r for r in rows if "error" not in r]
    assert all(r["gpu_busy_s"] == pytest.approx(40e-6) and "note" not in r for r in ok)
    assert "- profile b2 + CUDA graphs, 3 inner: wall 0.20 s" in gpu_run.summarize(cuda_stage.out)


def test_parity_and_ops_stages_on_cuda(cuda_stage, tiny_pipe, monkeypatch):
    """The parity rows only a GPU adds (CUDA graphs, with gradient checkpointing too) are configs the engine takes
    (here it runs them eager: graphs need CUDA) and compare with the rows they name; stage ops on the SD v1.4 layers
    it builds (here the tiny model) with CUDA's own autocast."""
    monkeypatch.setattr("nti.models.build_sd14_shaped_pipeline", lambda device: tiny_pipe)
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device"):
        gpu_run.stage_parity(cuda_stage)
    gpu_run.stage_ops(cuda_stage)
    rows = cuda_stage.rows()
    assert not [r for r in rows if "error" in r]
    parity = {r["variant"]: r for r in rows if r["stage"] == "parity"}
    both = parity["fast fp32 b1 + CUDA graphs, gradient checkpointing"]
    assert both["vs_eager_embeddings_rel"] == 0 and both["vs_no_checkpointing_embeddings_rel"] == 0
    assert parity["fast bf16 half weights b2 + CUDA graphs"]["iterations_equal"]
    ops = [r for r in rows if r["stage"] == "ops"]
    assert [r["cuda_autocast_policy"] for r in ops] == ["native", "native", "none"]
    assert all(r["latent_side"] == tiny_pipe.unet.config.sample_size for r in ops)


# ----------------------------------------------------- the fast path's CUDA graphs, emulated: replay = the recorded call

class RecordedCall:
    """What a captured CUDA graph keeps of fn: the call as recorded. Replaying it reruns the closure captured then
    (its runner, workspace and ops), never the caller's current ones; the emulation cannot see buffers replaced
    rather than copied into, which tests on a GPU must."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        self.fn()


@pytest.fixture
def emulated_graphs(monkeypatch):
    """cuda_graphs=True takes the engine's graph path on CPU: capture_graph's warm-ups, then a RecordedCall."""
    import warnings

    import nti.fast as fast
    import nti.runner as runner

    def capture_graph(fn):
        for _ in range(runner.GRAPH_WARMUP + 1):  # the warm-ups, then the capture's own run
            fn()
        return RecordedCall(fn)

    class GraphedRunner(runner.UNetRunner):
        def __init__(self, pipe, config):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "CUDA graphs need a CUDA device"
                super().__init__(pipe, config)
            self.graphs = config.cuda_graphs

    monkeypatch.setattr(fast, "UNetRunner", GraphedRunner)
    monkeypatch.setattr(fast, "capture_graph", capture_graph)
    monkeypatch.setattr(runner, "capture_graph", capture_graph)


def test_emulated_graphs_match_eager_as_early_stop_shrinks_the_buckets(tiny_pipe, emulated_graphs):
    """3 images in a bucket of 4, early stop moving the rows left into buckets of 2 and 1 (captured mid-step, reused
    in later steps and runs): the same iterations and embeddings as the eager run."""
    import nti
    from nti import NTIConfig

    images, sources, _ = zip(*gpu_run.jobs(3))
    config = NTIConfig(backend="fast", batch_size=3, steps=3, inner_steps=5, early_stop=True, early_stop_eps=0.5)
    eager = nti.invert(tiny_pipe, list(images), list(sources), config, progress=False)
    captures = tiny_pipe.fast_stats.captures
    for _ in range(2):
        graphed = nti.invert(tiny_pipe, list(images), list(sources), config.replace(cuda_graphs=True), progress=False)
        assert [g.iterations for g in graphed] == [e.iterations for e in eager]
        assert len({n for e in eager for n in e.iterations}) > 1  # the buckets did shrink
        for g, e in zip(graphed, eager):
            assert torch.equal(g.null_embeddings, e.null_embeddings)
    assert tiny_pipe.fast_stats.captures > captures
    tiny_pipe.fast_unets.clear()


def test_a_captured_inner_iteration_is_not_replayed_for_other_pooled_settings(emulated_graphs):
    """SDXL: optimize_pooled=False masks the pooled row's gradient inside the captured iteration. A later run with
    optimize_pooled=True must not replay that graph (the pooled row stayed as it began, silently)."""
    import nti
    from nti import NTIConfig
    from nti.models import build_tiny_xl_pipeline

    pipe = build_tiny_xl_pipeline()
    images, sources, _ = zip(*gpu_run.jobs(2))
    config = NTIConfig(backend="fast", batch_size=2, steps=2, inner_steps=2, early_stop=False)
    for pooled in (False, True, False):
        run = config.replace(optimize_pooled=pooled)
        eager = nti.invert(pipe, list(images), list(sources), run, progress=False)
        graphed = nti.invert(pipe, list(images), list(sources), run.replace(cuda_graphs=True), progress=False)
        for g, e in zip(graphed, eager):
            assert torch.equal(g.null_embeddings, e.null_embeddings), pooled


def test_the_printed_follow_up_runs_where_the_first_command_ran(monkeypatch, tmp_path):
    """On the GPU machine nti is importable only through PYTHONPATH=/tmp/site (README), and only what is written
    under $OUT comes back: the printed second command keeps both, as the first command had them."""
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_run.follow_up(["sdxl"], out=tmp_path / "run") == (
        'PYTHONPATH=/tmp/site python3 -m nti.benchmarks.gpu_run --out "$OUT/run2" --stages env,sdxl --budget 175')
    monkeypatch.delenv("PYTHONPATH")
    monkeypatch.delenv("OUT")
    assert gpu_run.follow_up(["sdxl"], out=tmp_path / "run") == (
        f"python3 -m nti.benchmarks.gpu_run --out {tmp_path / 'run2'} --stages env,sdxl --budget 175")


def test_the_gpu_stages_full_size_models_build_and_run_on_meta():
    """build_sdxl_shaped_pipeline has never run on a GPU, and neither builder runs in CI at full size: on the meta
    device (no memory) both build with the published parameter counts, and SDXL's UNet takes the packed context
    (pooled row, time ids) through forward + backward, as unet_flops runs it first in stage sdxl."""
    from nti.benchmarks.bench_nti import unet_flops
    from nti.benchmarks.sdxl_memory import PARAMETERS
    from nti.models import build_sd14_shaped_pipeline, build_sdxl_shaped_pipeline

    sd14 = build_sd14_shaped_pipeline(device="meta")
    assert sum(p.numel() for p in sd14.unet.parameters()) == PARAMETERS["sd14"] and sd14.resolution == 512
    sdxl = build_sdxl_shaped_pipeline(device="meta")
    assert sum(p.numel() for p in sdxl.unet.parameters()) == PARAMETERS["sdxl"] and sdxl.resolution == 1024
    assert sdxl.context_shape == (78, 2048) and sdxl.pooled.pooled_dim == 1280
    forward, both = unet_flops(sdxl)
    assert 6e12 < forward < both

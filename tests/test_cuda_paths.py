"""The branches of the prepared GPU run (benchmarks/gpu_run.py) and of the engine that only a CUDA device takes, run
here on CPU: torch.cuda's calls faked, the models small or on the meta device. A crash in such a branch would only
show on a lent GPU machine, whose minutes are few; these tests find it first."""
import types

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

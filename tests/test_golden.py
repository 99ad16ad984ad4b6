"""The official code's numbers, reproduced: google/prompt-to-prompt's NullInversion (null_text_w_ptp.ipynb) on the
shipped shapes model, scene 0 (tests/golden/README.md says exactly how the files were made).

These are the only tests whose truth comes from outside this project: a constant that the reference and the fast
path get wrong together (the Adam lr decay, the early-stop threshold, the timesteps) passes every fast-vs-reference
comparison but changes the inner iterations per step here. At epsilon 5e-3 they vary from 1 to 10 per step, so both
the step-dependent threshold (epsilon + i * 2e-5) and the lr decay (1e-2 * (1 - i / 100)) decide the list.

Tolerances: measured on this project's CPU machine (Xeon, AVX-512, torch 2.13.0 CPU build) with 1 thread, with 2
threads (the reference at epsilon 1e-5, and the early-stop losses at 5e-3), and with 1 thread under
ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 (other CPU kernels); the largest of those, then a margin of 5-9x; the
inner iterations were identical in every run. z_0 is already 2.3e-7 away (the VAE encoder in fp32: 229 of 256
elements differ by <= 1.4e-6, i.e. 1-2 ulp; not the thread count, which leaves it bit-identical here, but the CPU
kernels' summation order: turning oneDNN off moves our z_0 by 1.6e-7, and a float64 encode is 1.7e-7 from the
golden, 2.1e-7 from ours, so both are fp32 roundings of one value). The optimization amplifies such differences
(README: on the tiny model a 1e-7 input perturbation moves the reference's own embeddings by 5.4e-5), more with 10
inner steps per step (epsilon 1e-5) than with the early stop cutting them (epsilon 5e-3). The early-stop decisions
are robust to it: the closest inner loss is 0.11% from its threshold (step 45 at epsilon 5e-3), while 2 threads or
the AVX2 kernels move the losses by at most 8.4e-6 relative.
"""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

import nti
from nti import NTIConfig
from nti.data import SCENE_PROMPTS
from nti.ddim import make_schedule
from tests.conftest import rel_err

GOLDEN = Path(__file__).parent / "golden"
SCENE0 = SCENE_PROMPTS.parent / "scene0.png"

# name -> (the config's changes from NTIConfig(), tolerances as relative L2 errors)
CASES = {
    # measured: z_0 2.3e-7, z_T 1.1e-5; null embeddings up to 4.4e-4 (reference, 2 threads) / 5.2e-4 (fast), worst
    # single step 9.5e-4 / 1.1e-3; reconstruction latent 2.6e-5 / 3.2e-5
    "notebook_scene0": ({}, {"z_0": 2e-6, "z_T": 1e-4, "nulls": 3e-3, "nulls_step": 6e-3, "z_rec": 2e-4}),
    # measured: null embeddings up to 4.3e-5 (reference) / 4.0e-5 (fast), worst step 7.5e-5 / 6.7e-5; reconstruction
    # latent 4.1e-6 / 3.6e-6 (all under the AVX2 kernels; 3.9e-5, 3.4e-5, 6.4e-5, 5.7e-5, 2.9e-6, 2.8e-6 by default)
    "notebook_scene0_eps5e-3": ({"early_stop_eps": 5e-3},
                                {"z_0": 2e-6, "z_T": 1e-4, "nulls": 4e-4, "nulls_step": 6e-4, "z_rec": 3e-5}),
}


@pytest.fixture(scope="module", params=list(CASES))
def golden(request):
    meta = json.loads((GOLDEN / f"{request.param}.json").read_text())
    changes, tolerances = CASES[request.param]
    config = NTIConfig(**changes)
    assert meta["eps"] == config.early_stop_eps  # the golden run's epsilon is what the config runs
    return {**load_file(str(GOLDEN / f"{request.param}.safetensors")), **meta, "config": config, "tol": tolerances}


def test_golden_prompt_and_timesteps_are_what_the_engine_runs(shapes_pipe, golden):
    first = json.loads(SCENE_PROMPTS.read_text().splitlines()[0])
    assert first["image"] == SCENE0.name and first["source_prompt"] == golden["prompt"]
    config = golden["config"]
    schedule = make_schedule(shapes_pipe.scheduler_config, config.steps, config.timestep_offset(
        shapes_pipe.scheduler_config))
    assert schedule.timesteps == golden["timesteps"]  # 981, 961, ..., 1


def assert_reproduces(pipe, golden, backend: str) -> None:
    config = golden["config"].replace(backend=backend, batch_size=1)
    inv = nti.invert(pipe, SCENE0, golden["prompt"], config, progress=False)[0]
    # exact: one inner iteration more or less at any step is a different algorithm
    assert inv.iterations == golden["iters"]
    tol = golden["tol"]
    assert rel_err(inv.z_0, golden["z0"][0]) < tol["z_0"]
    assert rel_err(inv.z_T, golden["zT"][0]) < tol["z_T"]
    nulls = golden["nulls"][:, 0]
    assert inv.null_embeddings.shape == nulls.shape == (50, 16, 64)
    assert rel_err(inv.null_embeddings, nulls) < tol["nulls"]
    worst = max(rel_err(inv.null_embeddings[i], nulls[i]) for i in range(50))
    assert worst < tol["nulls_step"], worst
    # the reconstruction: regenerated from z_T with the nulls under the source prompt (notebook's text2image_ldm)
    z_rec = nti.edit_latents(pipe, [inv], golden["prompt"], config, progress=False)
    assert rel_err(z_rec, golden["z_rec"]) < tol["z_rec"]


def test_reference_reproduces_the_notebook(shapes_pipe, golden):
    """The reference with NTIConfig's defaults (and the golden run's epsilon): the notebook's algorithm."""
    assert_reproduces(shapes_pipe, golden, "reference")


def test_fast_fp32_reproduces_the_notebook(shapes_pipe, golden):
    """The fast path in fp32, through the public API: the same algorithm, so the same numbers."""
    assert_reproduces(shapes_pipe, golden, "fast")


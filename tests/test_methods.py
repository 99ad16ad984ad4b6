"""Inversion methods on the tiny model: negative-prompt and direct inversion beside DDIM and null-text, and every
method x edit mode reconstructing, under the source prompt, as its inversion does."""
import dataclasses
import json

import pytest
import torch

import nti
from nti import NTIConfig, NTIError, load_inversion, p2p, reference, save_inversion
from nti.models import encode_prompts
from tests.conftest import rel_err

PROMPT = "a cat sitting on a mat"
METHODS = ("ddim", "null-text", "negative-prompt", "direct")
MODES = {"regenerate": {}, "p2p-replace": {}, "p2p-refine": {}, "p2p-reweight": {"reweight": {"cat": 1.0}}}
BASE = NTIConfig(steps=5, inner_steps=2)


@pytest.fixture(scope="module")
def invs(tiny_pipe):
    return {m: nti.invert(tiny_pipe, "skimage:chelsea", PROMPT, BASE.replace(method=m), progress=False)[0]
            for m in METHODS}


def recon_mse(pipe, inv, config=BASE) -> float:
    z = nti.edit_latents(pipe, [inv], inv.source_prompt, config, progress=False)[0]
    return float(((z - inv.z_0) ** 2).mean())


def test_negative_prompt_inversion_does_no_optimization(tiny_pipe, invs):
    inv = invs["negative-prompt"]
    assert inv.iterations == [0] * 5 and inv.losses == [] and "null_text_s" not in inv.timings
    assert torch.equal(inv.null_embeddings, encode_prompts(tiny_pipe, [PROMPT]))  # the null text IS the prompt
    assert torch.equal(inv.z_T, invs["ddim"].z_T)  # nothing but DDIM inversion ran
    fast = nti.invert(tiny_pipe, "skimage:chelsea", PROMPT, BASE.replace(method="negative-prompt", backend="fast"),
                         progress=False)[0]
    assert torch.equal(fast.null_embeddings, inv.null_embeddings) and fast.iterations == inv.iterations


def test_negative_prompt_reconstructs_as_ddim_without_guidance(tiny_pipe, invs):
    # null = prompt makes eps_u = eps_c: CFG at w=7.5 collapses to the conditional prediction, i.e. DDIM at w=1
    npi = nti.edit_latents(tiny_pipe, [invs["negative-prompt"]], PROMPT, BASE, progress=False)
    ddim_w1 = nti.invert(tiny_pipe, "skimage:chelsea", PROMPT, BASE.replace(method="ddim", guidance=1.0),
                            progress=False)
    assert rel_err(npi, nti.edit_latents(tiny_pipe, ddim_w1, PROMPT, BASE, progress=False)) < 1e-5  # 4e-7


def test_direct_inversion_reconstructs_exactly(tiny_pipe, invs):
    inv = invs["direct"]
    assert inv.pivots.shape == (6, 4, 16, 16) and inv.null_embeddings is None
    assert torch.equal(inv.pivots[0], inv.z_0) and torch.equal(inv.pivots[-1], inv.z_T)
    for backend in ("reference", "fast"):
        z = nti.edit_latents(tiny_pipe, [inv], PROMPT, BASE.replace(backend=backend), progress=False)[0]
        assert rel_err(z, inv.z_0) < 1e-6  # measured 0: z~ + (z* - z~) rounds to z* here
    fast = nti.invert(tiny_pipe, "skimage:chelsea", PROMPT, BASE.replace(method="direct", backend="fast"),
                         progress=False)[0]
    assert rel_err(fast.pivots, inv.pivots) < 1e-4  # measured 3.9e-6 (batched DDIM inversion)


def test_direct_source_branch_stays_on_the_pivots_while_editing(tiny_pipe, invs):
    inv, pipe = invs["direct"], tiny_pipe
    config = BASE.replace(edit="p2p-replace")
    job = nti.api.edit_job(pipe, inv, "a tiger sitting on a mat", config)
    assert job.two_branch and job.plan is not None and job.pivots is not None
    runs = {}
    for share in (False, True):
        controller = p2p.P2PController([job.plan], config, 5, pipe.device)
        runs[share] = reference.p2p_sample(pipe, dataclasses.replace(job, offset_target=share), controller)
        assert rel_err(runs[share][0][0], inv.z_0) < 1e-6  # the source branch ends on z*_0 = z_0
    # the paper leaves the target alone; the 'add-source' variant pulls it towards the source
    assert rel_err(runs[True][1], runs[False][1]) > 1e-2
    assert rel_err(runs[True][1], inv.z_0[None]) < rel_err(runs[False][1], inv.z_0[None])
    edited = nti.edit_latents(pipe, [inv], "a tiger sitting on a mat", config, progress=False)
    assert rel_err(edited, runs[False][1]) < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_every_edit_mode_reconstructs_as_the_inversion(tiny_pipe, invs, method):
    inv = invs[method]
    regen = nti.edit_latents(tiny_pipe, [inv], PROMPT, BASE, progress=False)
    assert torch.equal(regen, nti.edit_latents(tiny_pipe, [inv], PROMPT, BASE, progress=False))
    for mode, extra in MODES.items():
        for backend in ("reference", "fast"):
            config = BASE.replace(edit=mode, backend=backend, **extra)
            z = nti.edit_latents(tiny_pipe, [inv], PROMPT, config, progress=False)
            # measured <= 7.3e-6 (two branches in one batch, SDPA vs explicit maps: other rounding, which the random
            # model at w=7.5 amplifies); direct inversion: exactly z_0 (measured 0)
            assert rel_err(z, regen) < (1e-6 if method == "direct" else 1e-4), (mode, backend)
    if method == "direct":
        assert rel_err(regen[0], inv.z_0) < 1e-6


def test_reconstruction_order_on_the_tiny_model(tiny_pipe, invs):
    mse = {m: recon_mse(tiny_pipe, invs[m]) for m in METHODS}
    assert mse["direct"] < 1e-12  # exact
    assert mse["null-text"] < mse["ddim"] and mse["negative-prompt"] < mse["ddim"]


def test_direct_artifact_keeps_the_pivots(tiny_pipe, invs, tmp_path):
    inv = invs["direct"]
    path = save_inversion(inv, tmp_path / "direct.safetensors")
    assert json.loads(path.with_suffix(".json").read_text())["format_version"] == 2
    loaded = load_inversion(path)
    assert torch.equal(loaded.pivots, inv.pivots)
    config = BASE.replace(edit="p2p-refine")
    a = nti.edit_latents(tiny_pipe, [inv], "a red cat sitting on a mat", config, progress=False)
    b = nti.edit_latents(tiny_pipe, [loaded], "a red cat sitting on a mat", config, progress=False)
    assert torch.equal(a, b)
    other = save_inversion(invs["null-text"], tmp_path / "nti.safetensors")  # older readers still read these
    assert json.loads(other.with_suffix(".json").read_text())["format_version"] == 1
    assert load_inversion(other).pivots is None
    broken = nti.Inversion(**{**inv.__dict__, "pivots": None})
    path = tmp_path / "broken.safetensors"  # save_inversion refuses it (test_methods_audit.py): written by hand
    path.write_bytes(nti.artifact.inversion_bytes(broken)[0])
    with pytest.raises(NTIError, match="without its pivots"):
        load_inversion(path)
    with pytest.raises(NTIError, match="no pivots"):
        nti.edit_latents(tiny_pipe, [broken], PROMPT, BASE, progress=False)

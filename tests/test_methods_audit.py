"""Audit of the four inversion methods against the official code's formulas, re-implemented here in plain torch on
the tiny model: null-text (Mokady et al. 2023, the notebook null_text_w_ptp.ipynb), negative-prompt (Miyake et al.
2023, as PnPInversion's NegativePromptInversion edits), direct inversion (Ju et al. 2023, PnPInversion's
DirectInversion.offset_calculate and direct_inversion_p2p_guidance_forward) and DDIM; the fast path against the
reference for each, in batches mixing methods and prompts; and bad input around methods.

The re-implementation computes its own alphas, timesteps, DDIM steps and guidance, and calls the UNet itself; only
the text encoder and prompt-to-prompt's attention control (audited in test_p2p_audit.py) are the engine's.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import nti
from nti import NTIConfig, NTIError, p2p
from nti.cli import main as cli_main
from nti.models import encode_prompts
from tests.conftest import rel_err

SOURCE = "a cat sitting on a mat"
TARGET = "a tiger sitting on a mat"
STEPS = 5
# the engine's reference computes what the official formulas do to the last bit here (measured 0); the fast path
# batches other rows together, which rounds differently (measured <= 2.4e-5 after the random model amplifies it)
TOL = {"reference": 1e-6, "fast": 1e-4}
BASE = NTIConfig(steps=STEPS, inner_steps=3, early_stop=False)
METHODS = ("ddim", "null-text", "negative-prompt", "direct")


# --------------------------------------------------------------------- the official formulas, written out again

def official_alphas() -> torch.Tensor:
    """SD's scaled_linear betas (0.00085 .. 0.012 over 1000 steps) as alpha_bar, in fp32 as diffusers makes them."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


ALPHAS = official_alphas()
RATIO = 1000 // STEPS
TIMESTEPS = [(STEPS - 1 - k) * RATIO + 1 for k in range(STEPS)]  # 'leading' spacing, steps_offset 1: 801 .. 1


def alpha(t: int) -> torch.Tensor:
    return ALPHAS[t] if t >= 0 else ALPHAS[0]  # set_alpha_to_one False: final alpha = alpha_bar_0


def prev_step(eps, t, x):
    """The notebook's prev_step: x_t -> x_{t - 1000 // steps}."""
    a_t, a_prev = alpha(t), alpha(t - RATIO)
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps


def next_step(eps, t, x):
    """The notebook's next_step: x_{t - 1000 // steps} -> x_t."""
    a_from, a_to = alpha(min(t - RATIO, 999)), alpha(t)
    x0 = (x - (1 - a_from) ** 0.5 * eps) / a_from ** 0.5
    return a_to ** 0.5 * x0 + (1 - a_to) ** 0.5 * eps


def unet(pipe, x, t, context):
    return pipe.unet(x, t, encoder_hidden_states=context).sample


def cfg(eps_u, eps_c, w):
    return eps_u + w * (eps_c - eps_u)


@torch.no_grad()
def official_ddim_inversion(pipe, z0, cond):
    latents, z = [z0], z0.clone()
    for i in range(STEPS):
        t = TIMESTEPS[STEPS - i - 1]
        z = next_step(unet(pipe, z, t, cond), t, z)
        latents.append(z)
    return latents


def official_null_text(pipe, latents, cond, uncond, w, inner_steps, epsilon=None):
    """The notebook's null_optimization: per step a new Adam at lr 1e-2 * (1 - i/100), MSE of the guided step to
    the pivot, early stop at epsilon + i * 2e-5 (None: off), then one guided step with the result."""
    out, z = [], latents[-1]
    for i, t in enumerate(TIMESTEPS):
        uncond = uncond.clone().detach().requires_grad_(True)
        optimizer = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
        target = latents[len(latents) - i - 2]
        with torch.no_grad():
            eps_c = unet(pipe, z, t, cond)
        for _ in range(inner_steps):
            loss = F.mse_loss(prev_step(cfg(unet(pipe, z, t, uncond), eps_c, w), t, z), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if epsilon is not None and loss.item() < epsilon + i * 2e-5:
                break
        uncond = uncond.detach()
        out.append(uncond)
        with torch.no_grad():
            eps_u, eps_c = unet(pipe, torch.cat([z, z]), t, torch.cat([uncond, cond])).chunk(2)
            z = prev_step(cfg(eps_u, eps_c, w), t, z)
    return torch.cat(out)


@torch.no_grad()
def official_offsets(pipe, latents, null, conds, w):
    """PnPInversion's DirectInversion.offset_calculate: at every step, from the pivot, the CFG step of each prompt
    (rows [source, target], uncond '') and its difference to the next pivot; the walk goes on from the pivot."""
    offsets, z = [], torch.cat([latents[-1]] * len(conds))
    for i, t in enumerate(TIMESTEPS):
        target = torch.cat([latents[len(latents) - i - 2]] * len(conds))
        eps_u, eps_c = unet(pipe, torch.cat([z, z]), t, torch.cat([null.expand_as(conds), conds])).chunk(2)
        rec = prev_step(cfg(eps_u, eps_c, w), t, z)
        offsets.append(target - rec)
        z = rec + offsets[-1]
    return offsets


@torch.no_grad()
def official_edit(pipe, z_T, nulls, conds, w, controller=None, offsets=None, offset_rows=(0,)):
    """Sampling as the official code's p2p_guidance_forward / direct_inversion_p2p_guidance_forward: one batch
    [uncond (each branch), cond (each branch)], CFG, DDIM step; direct inversion adds the precomputed offsets to
    `offset_rows` after the step and before the controller's step callback (local blend)."""
    z = torch.cat([z_T] * len(conds))
    control = p2p.attention_control(pipe.unet, controller, z_T.shape[-1]) if controller else None
    if control:
        control.__enter__()
    try:
        for i, t in enumerate(TIMESTEPS):
            if controller:
                controller.step = i
            null = nulls[i] if nulls.shape[0] == STEPS else nulls[0]
            eps_u, eps_c = unet(pipe, torch.cat([z, z]), t,
                                torch.cat([null.expand_as(conds), conds])).chunk(2)
            z = prev_step(cfg(eps_u, eps_c, w), t, z)
            if offsets is not None:
                add = torch.zeros_like(z)
                add[list(offset_rows)] = offsets[i][:1]  # the source prompt's offset
                z = z + add
            if controller:
                z = controller.blend_latents(z)
    finally:
        if control:
            control.__exit__(None, None, None)
    return z


# ----------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def invs(tiny_pipe):
    return {m: nti.invert(tiny_pipe, "skimage:chelsea", SOURCE, BASE.replace(method=m), progress=False)[0]
            for m in METHODS}


@pytest.fixture(scope="module")
def official(tiny_pipe, invs):
    pipe = tiny_pipe
    z0 = invs["ddim"].z_0[None]
    cond, tgt = encode_prompts(pipe, [SOURCE]), encode_prompts(pipe, [TARGET])
    empty = encode_prompts(pipe, [""])
    latents = official_ddim_inversion(pipe, z0, cond)
    return {"latents": latents, "cond": cond, "target": tgt, "empty": empty,
            "nulls": official_null_text(pipe, latents, cond, empty, 7.5, inner_steps=3)}


def controller_for(pipe, config, source=SOURCE, target=TARGET):
    plan = p2p.make_plan(pipe.tokenizer, source, target, config)
    return p2p.P2PController([plan], config, STEPS, pipe.device, explicit=True)


# ------------------------------------------------------------------------------------------------ the algorithms

def test_ddim_inversion_is_the_notebooks_ddim_loop(invs, official):
    for method in METHODS:
        assert rel_err(invs[method].z_T, official["latents"][-1][0]) < 1e-5, method
    assert torch.allclose(invs["direct"].pivots, torch.cat(official["latents"]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_null_text_optimization_is_the_notebooks(tiny_pipe, invs, official, backend):
    inv = invs["null-text"] if backend == "reference" else nti.invert(
        tiny_pipe, "skimage:chelsea", SOURCE, BASE.replace(backend="fast"), progress=False)[0]
    assert inv.iterations == [3] * STEPS
    assert rel_err(inv.null_embeddings, official["nulls"]) < TOL[backend]  # measured 0 and 7.1e-7


def test_null_text_early_stop_is_the_notebooks(tiny_pipe, invs, official):
    # a threshold every loss is under: each step stops after its first iteration, whose update is kept
    mine = official_null_text(tiny_pipe, official["latents"], official["cond"], official["empty"], 7.5, 3, 1e9)
    config = BASE.replace(early_stop=True, early_stop_eps=1e9)
    for backend in ("reference", "fast"):
        inv = nti.invert(tiny_pipe, "skimage:chelsea", SOURCE, config.replace(backend=backend), progress=False)[0]
        assert inv.iterations == [1] * STEPS and rel_err(inv.null_embeddings, mine) < TOL[backend]


@pytest.mark.parametrize("mode", ["regenerate", "p2p-replace"])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_null_text_edit_uses_each_steps_null_on_both_branches(tiny_pipe, invs, official, mode, backend):
    config = BASE.replace(edit=mode, backend=backend)
    engine = nti.edit_latents(tiny_pipe, [invs["null-text"]], TARGET, config, progress=False)
    nulls = invs["null-text"].null_embeddings  # the engine's own nulls: this checks the sampler, not the fit
    if mode == "regenerate":
        mine = official_edit(tiny_pipe, invs["null-text"].z_T[None], nulls, official["target"], 7.5)
    else:
        mine = official_edit(tiny_pipe, invs["null-text"].z_T[None], nulls,
                             torch.cat([official["cond"], official["target"]]), 7.5,
                             controller_for(tiny_pipe, config))[1:]
    assert rel_err(engine, mine) < TOL[backend]


@pytest.mark.parametrize("mode", ["regenerate", "p2p-replace"])
@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_negative_prompt_edit_puts_the_source_prompt_in_every_uncond(tiny_pipe, invs, official, mode, backend):
    """NegativePromptInversion.invert returns [source embedding] * steps as the nulls; the edit expands each over
    both branches (source and target)."""
    inv = invs["negative-prompt"]
    assert torch.equal(inv.null_embeddings, official["cond"])
    config = BASE.replace(edit=mode, backend=backend)
    engine = nti.edit_latents(tiny_pipe, [inv], TARGET, config, progress=False)
    nulls = official["cond"].expand(STEPS, -1, -1)
    if mode == "regenerate":
        mine = official_edit(tiny_pipe, inv.z_T[None], nulls, official["target"], 7.5)
    else:
        mine = official_edit(tiny_pipe, inv.z_T[None], nulls, torch.cat([official["cond"], official["target"]]),
                             7.5, controller_for(tiny_pipe, config))[1:]
    assert rel_err(engine, mine) < TOL[backend]


@pytest.mark.parametrize("target_offset, rows", [("none", (0,)), ("source", (0, 1))])
@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("extra", [{}, {"blend_words": ("cat", "tiger"), "blend_threshold": 0.94}])
def test_direct_edit_adds_the_sources_offset_every_step_before_the_blend(tiny_pipe, invs, official, target_offset,
                                                                         rows, backend, extra):
    """Official: offsets precomputed at inversion (uncond '', the edit's guidance), the source row's added after
    every step, before controller.step_callback; 'add-source' adds it to the target row too. w = 3 keeps the
    random model's amplification of rounding (w = 7.5) from hiding the comparison."""
    config = BASE.replace(edit="p2p-replace", backend=backend, direct_target_offset=target_offset, guidance=3.0,
                          **extra)
    inv = invs["direct"]
    inv = dataclasses.replace(inv, settings={**inv.settings, "guidance": 3.0})  # pivots do not depend on w
    conds = torch.cat([official["cond"], official["target"]])
    offsets = official_offsets(tiny_pipe, official["latents"], official["empty"], conds, 3.0)
    mine = official_edit(tiny_pipe, inv.z_T[None], official["empty"], conds, 3.0, controller_for(tiny_pipe, config),
                         offsets, rows)
    assert rel_err(mine[0], inv.z_0) < 1e-5  # the source branch lands on z*_0
    engine = nti.edit_latents(tiny_pipe, [inv], TARGET, config, progress=False)
    assert rel_err(engine, mine[1:]) < TOL[backend]


def test_direct_regenerate_gives_the_target_the_sources_offset(tiny_pipe, invs, official):
    """No attention is shared under 'regenerate': the target alone gets the source branch's offset each step."""
    inv = invs["direct"]
    conds = torch.cat([official["cond"], official["target"]])
    offsets = official_offsets(tiny_pipe, official["latents"], official["empty"], conds, 7.5)
    mine = official_edit(tiny_pipe, inv.z_T[None], official["empty"], conds, 7.5, None, offsets, (0, 1))
    for backend in ("reference", "fast"):
        engine = nti.edit_latents(tiny_pipe, [inv], TARGET, BASE.replace(backend=backend), progress=False)
        assert rel_err(engine, mine[1:]) < TOL[backend]


def test_ddim_edit_is_plain_cfg_from_z_T(tiny_pipe, invs, official):
    mine = official_edit(tiny_pipe, invs["ddim"].z_T[None], official["empty"], official["target"], 7.5)
    for backend in ("reference", "fast"):
        engine = nti.edit_latents(tiny_pipe, [invs["ddim"]], TARGET, BASE.replace(backend=backend), progress=False)
        assert rel_err(engine, mine) < TOL[backend]


@pytest.mark.parametrize("mode", ["regenerate", "p2p-replace"])
def test_fast_batch_mixing_methods_and_prompts_equals_reference_one_at_a_time(tiny_pipe, invs, mode):
    order = ["direct", "null-text", "ddim", "negative-prompt", "direct", "null-text"]
    targets = [TARGET, "a dog sitting on a mat", TARGET, "a cat sitting on a rug", SOURCE, "a cat lying on a mat"]
    batch = [invs[m] for m in order]
    config = BASE.replace(edit=mode)
    fast = nti.edit_latents(tiny_pipe, batch, targets, config.replace(backend="fast", batch_size=4), progress=False)
    for k, (inv, target) in enumerate(zip(batch, targets)):
        alone = nti.edit_latents(tiny_pipe, [inv], target, config, progress=False)
        assert rel_err(fast[k:k + 1], alone) < 1e-4, (order[k], target)


# ---------------------------------------------------------------------------------------------------- bad input

def test_unknown_method_is_refused(tiny_pipe, invs, tmp_path, capsys):
    with pytest.raises(NTIError, match="method must be one of"):
        NTIConfig(method="nti")
    inv = invs["ddim"]
    broken = dataclasses.replace(inv, settings={**inv.settings, "method": "pnp"})
    with pytest.raises(NTIError, match="method must be one of"):
        nti.edit_latents(tiny_pipe, [broken], TARGET, BASE, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["edit", "skimage:chelsea", "--model", "tiny", "--prompt", SOURCE, "--target", TARGET,
                  "--method", "pnp", "--out", str(tmp_path / "x.png")])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_null_text_past_100_steps_is_refused_not_ascended(tmp_path, capsys):
    """The notebook's lr 1e-2 * (1 - i/100) is 0 at step 100 and negative after: torch's Adam raised a ValueError
    traceback on the reference, and the fast path's Adam climbed the loss instead of descending it."""
    for steps in (101, 200):
        with pytest.raises(NTIError, match="1 - i/100"):
            NTIConfig(method="null-text", steps=steps)
    NTIConfig(method="null-text", steps=100)
    for method in ("ddim", "negative-prompt", "direct"):
        NTIConfig(method=method, steps=200)
    code = cli_main(["invert", "skimage:chelsea", "--model", "tiny", "--prompt", SOURCE, "--steps", "150",
                     "--quiet", "--out", str(tmp_path / "x.safetensors")])
    assert code == 2 and "Traceback" not in capsys.readouterr().err


def _relabel(inv, method, **tensors):
    return dataclasses.replace(inv, settings={**inv.settings, "method": method}, **tensors)


MISLABELED = {  # an artifact whose tensors belong to another method than its settings say (a direct inversion
    # relabeled ddim is not here: its z_T is DDIM's, and a ddim edit ignores the pivots, so it edits as it says)
    "ddim as negative-prompt": ("ddim", "negative-prompt", {}),
    "negative-prompt as ddim": ("negative-prompt", "ddim", {}),
    "negative-prompt as direct": ("negative-prompt", "direct", {"pivots": "direct"}),
    "direct as negative-prompt": ("direct", "negative-prompt", {}),
    "null-text as ddim": ("null-text", "ddim", {}),
    "null-text as negative-prompt": ("null-text", "negative-prompt", {}),
}


@pytest.mark.parametrize("case", MISLABELED)
def test_an_artifact_of_one_method_is_not_edited_as_another(tiny_pipe, invs, tmp_path, case):
    """Each of these edited silently with whatever the tensors held, under the other method's name."""
    made_by, label, tensors = MISLABELED[case]
    inv = _relabel(invs[made_by], label, **{k: getattr(invs[v], k) for k, v in tensors.items()})
    with pytest.raises(NTIError, match=label):
        nti.edit_latents(tiny_pipe, [inv], TARGET, BASE, progress=False)
    with pytest.raises(NTIError, match="not saved"):
        nti.save_inversion(inv, tmp_path / "x.safetensors")


def test_negative_prompt_with_per_step_nulls_and_direct_with_a_foreign_z_T_are_refused(tiny_pipe, invs):
    npi = invs["negative-prompt"]
    per_step = dataclasses.replace(npi, null_embeddings=npi.null_embeddings.expand(STEPS, -1, -1).clone())
    with pytest.raises(NTIError, match="negative-prompt"):
        nti.edit_latents(tiny_pipe, [per_step], TARGET, BASE, progress=False)
    direct = invs["direct"]
    moved = dataclasses.replace(direct, z_T=direct.z_T + 1)  # the edit would start off the trajectory it is put on
    with pytest.raises(NTIError, match="z_T"):
        nti.edit_latents(tiny_pipe, [moved], TARGET, BASE, progress=False)


def test_every_method_as_made_still_saves_loads_and_edits(tiny_pipe, invs, tmp_path):
    for method, inv in invs.items():
        loaded = nti.load_inversion(nti.save_inversion(inv, tmp_path / f"{method}.safetensors"))
        a = nti.edit_latents(tiny_pipe, [inv], TARGET, BASE, progress=False)
        assert torch.equal(a, nti.edit_latents(tiny_pipe, [loaded], TARGET, BASE, progress=False)), method


def test_a_direct_inversion_without_pivots_is_not_saved(tiny_pipe, invs, tmp_path):
    """save_inversion wrote it, and load_inversion then refused the file save_inversion had promised it would read."""
    broken = dataclasses.replace(invs["direct"], pivots=None)
    with pytest.raises(NTIError, match="not saved.*without its pivots"):
        nti.save_inversion(broken, tmp_path / "direct.safetensors")
    assert not list(tmp_path.iterdir())
    with pytest.raises(NTIError, match="no pivots"):
        nti.edit_latents(tiny_pipe, [broken], TARGET, BASE, progress=False)

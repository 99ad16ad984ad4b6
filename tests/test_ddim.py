"""Own DDIM math against diffusers' schedulers, and the guidance schedules."""
import math

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from nti import NTIError
from nti.ddim import ddim_step, guidance_weights, guided_eps, make_schedule
from tests.conftest import rel_err

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "steps_offset": 1, "skip_prk_steps": True}


def test_schedule_is_the_notebooks():
    """The notebook's pipeline sets steps_offset=1 (SD v1.4's scheduler config says so too): t = 981, 961, ..., 1."""
    sched = make_schedule(SD_SCHEDULER, 50)
    assert sched.timesteps == list(range(981, 0, -20))
    assert make_schedule(SD_SCHEDULER, 50, steps_offset=0).timesteps == list(range(980, -1, -20))  # explicit override
    assert make_schedule({k: v for k, v in SD_SCHEDULER.items() if k != "steps_offset"}, 50).timesteps[0] == 980
    assert sched.final_alpha == pytest.approx(float(sched.alphas_cumprod[0]))  # set_alpha_to_one=False
    # scaled_linear betas: sqrt-space linspace, squared
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    assert torch.allclose(sched.alphas_cumprod, torch.cumprod(1 - betas, 0))


@pytest.mark.parametrize("steps", [50, 10])
def test_ddim_step_matches_diffusers(steps):
    ours = make_schedule(SD_SCHEDULER, steps)
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)
    ref.set_timesteps(steps)
    assert [int(t) for t in ref.timesteps] == ours.timesteps
    gen = torch.Generator().manual_seed(0)
    for i, t in enumerate(ours.timesteps):
        x, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        expected = ref.step(eps, t, x, eta=0.0).prev_sample
        assert rel_err(ddim_step(x, eps, *ours.denoise_alphas(i)), expected) < 1e-5, f"step {i} (t={t})"


def test_inversion_step_matches_diffusers_inverse_scheduler():
    ours = make_schedule(SD_SCHEDULER, 50)
    inv = DDIMInverseScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                               set_alpha_to_one=False, steps_offset=1)
    inv.set_timesteps(50)
    gen = torch.Generator().manual_seed(1)
    for i, t in enumerate(inv.timesteps):
        t_ours, a_from, a_to = ours.invert_alphas(i)
        assert t_ours == int(t)
        x, eps = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
        assert rel_err(ddim_step(x, eps, a_from, a_to), inv.step(eps, int(t), x).prev_sample) < 1e-5, f"step {i}"


def test_first_inversion_step_moves_only_with_offset_one():
    """With SD's offset 1 the first inversion step goes from alpha_final = alphas[0] to alphas[1] (t=1), a real
    step; with offset 0 it would go from alphas[0] to alphas[0] (t=0): an identity, and so a wasted last
    null-text step."""
    x, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t, a_from, a_to = make_schedule(SD_SCHEDULER, 50).invert_alphas(0)
    assert t == 1 and rel_err(ddim_step(x, eps, a_from, a_to), x) > 1e-3
    t, a_from, a_to = make_schedule(SD_SCHEDULER, 50, steps_offset=0).invert_alphas(0)
    assert t == 0 and torch.allclose(ddim_step(x, eps, a_from, a_to), x, atol=1e-6)


def test_per_image_coefficients_equal_scalar_calls():
    x, eps = torch.randn(3, 4, 5, 7), torch.randn(3, 4, 5, 7)
    a_from, a_to = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.6, 0.95])
    batched = ddim_step(x, eps, a_from, a_to)
    for k in range(3):
        assert torch.allclose(batched[k], ddim_step(x[k:k + 1], eps[k:k + 1], float(a_from[k]), float(a_to[k]))[0])
    w = torch.tensor([1.0, 7.5, 3.0])
    g = guided_eps(eps, x, w)
    assert torch.allclose(g[1], eps[1] + 7.5 * (x[1] - eps[1]))


def test_guidance_schedules():
    assert guidance_weights(7.5, 50, "constant") == [7.5] * 50
    lin = guidance_weights(7.5, 50, "linear")
    cos = guidance_weights(7.5, 50, "cosine")
    for ws in (lin, cos):
        assert ws[0] == pytest.approx(7.5) and ws[-1] == pytest.approx(1.0)
        assert all(a >= b for a, b in zip(ws, ws[1:]))  # decays monotonically
    assert lin[25] == pytest.approx(1 + 6.5 * (1 - 25 / 49))
    assert cos[25] == pytest.approx(1 + 6.5 * 0.5 * (1 + math.cos(math.pi * 25 / 49)))
    assert cos[10] > lin[10]  # cosine keeps strong guidance longer early on
    with pytest.raises(ValueError):
        guidance_weights(7.5, 10, "exponential")


def _assert_steps_equal_diffusers(config: dict, steps: int, inversion: bool = True) -> None:
    """Every denoising step equals DDIMScheduler.step and every inversion step DDIMInverseScheduler.step."""
    ours = make_schedule(config, steps)
    forward, inverse = DDIMScheduler.from_config(config), DDIMInverseScheduler.from_config(config)
    forward.set_timesteps(steps)
    if inversion:  # DDIMInverseScheduler has no 'linspace'
        inverse.set_timesteps(steps)
    assert ours.timesteps == [int(t) for t in forward.timesteps]
    gen = torch.Generator().manual_seed(2)
    for i, t in enumerate(ours.timesteps):
        x, eps = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
        assert rel_err(ddim_step(x, eps, *ours.denoise_alphas(i)), forward.step(eps, t, x).prev_sample) < 1e-5, i
        if inversion:
            t_inv, a_from, a_to = ours.invert_alphas(i)
            assert t_inv == int(inverse.timesteps[i])
            assert rel_err(ddim_step(x, eps, a_from, a_to), inverse.step(eps, t_inv, x).prev_sample) < 1e-5, i


def test_timesteps_past_the_models_last_are_refused():
    """Leading spacing with offset 1 reaches t = 1000 at 1000 steps (alphas_cumprod has 0..999): an NTIError, not an
    IndexError deep in a step. Offset 0 runs 999..0 as diffusers does."""
    with pytest.raises(NTIError, match="reaches timestep 1000"):
        make_schedule(SD_SCHEDULER, 1000)
    with pytest.raises(NTIError, match="reaches timestep 1000"):
        make_schedule(SD_SCHEDULER, 50, steps_offset=20)
    assert make_schedule(SD_SCHEDULER, 50, steps_offset=19).timesteps[0] == 999
    with pytest.raises(NTIError, match="500 training timesteps"):  # diffusers: a ValueError in set_timesteps
        make_schedule({**SD_SCHEDULER, "num_train_timesteps": 500}, 600)
    _assert_steps_equal_diffusers({**SD_SCHEDULER, "steps_offset": 0, "clip_sample": False,
                                   "set_alpha_to_one": False}, 1000)


@pytest.mark.parametrize("steps", [1, 3, 7, 50, 999])
def test_trailing_spacing_in_the_config_is_honoured(steps):
    """'trailing' (Lin et al. 2023, Table 2): t = 999 first, steps_offset unused, as both diffusers schedulers."""
    config = {**SD_SCHEDULER, "timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False}
    assert make_schedule(config, steps).timesteps[0] == 999
    _assert_steps_equal_diffusers(config, steps)


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_linspace_spacing_in_the_config_is_honoured(steps):
    """'linspace' denoises as DDIMScheduler does (DDIMInverseScheduler has no 'linspace'; the inversion is each
    denoising step run backwards, which the parity tests of the whole path check)."""
    config = {**SD_SCHEDULER, "timestep_spacing": "linspace", "clip_sample": False, "set_alpha_to_one": False}
    _assert_steps_equal_diffusers(config, steps, inversion=False)
    ours = make_schedule(config, steps)
    for i in range(steps):  # inversion step i undoes denoising step steps - 1 - i
        t, a_from, a_to = ours.invert_alphas(i)
        assert (t, a_to, a_from) == (ours.timesteps[steps - 1 - i], *ours.denoise_alphas(steps - 1 - i))


def test_unknown_spacing_and_an_offset_spacing_ignores_are_refused():
    with pytest.raises(NTIError, match="timestep_spacing 'uniform'"):
        make_schedule({**SD_SCHEDULER, "timestep_spacing": "uniform"}, 10)
    trailing = {**SD_SCHEDULER, "timestep_spacing": "trailing"}
    assert make_schedule(trailing, 10, steps_offset=1).timesteps == make_schedule(trailing, 10).timesteps
    with pytest.raises(NTIError, match="steps_offset"):  # an explicit offset 'trailing' would silently drop
        make_schedule(trailing, 10, steps_offset=0)


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_set_alpha_to_one_in_the_config_is_honoured(steps):
    """set_alpha_to_one=True: the last denoising step lands on alpha_bar = 1 and the first inversion step leaves it,
    as diffusers' schedulers do; absent, the notebook's False (alphas_cumprod[0])."""
    config = {**SD_SCHEDULER, "set_alpha_to_one": True, "clip_sample": False}
    assert make_schedule(config, steps).final_alpha == 1.0
    _assert_steps_equal_diffusers(config, steps)
    assert make_schedule(SD_SCHEDULER, steps).final_alpha == pytest.approx(0.99915, abs=1e-5)


@pytest.mark.parametrize("changes, match", [
    ({"thresholding": True}, "thresholding"),
    ({"rescale_betas_zero_snr": True}, "zero terminal SNR"),
    ({"prediction_type": "sample", "set_alpha_to_one": True}, "set_alpha_to_one"),
])
def test_scheduler_settings_the_step_cannot_follow_are_refused(changes, match):
    """diffusers' DDIMScheduler would threshold x0, or divide by alpha_bar_T = 0, or by 1 - alpha_bar = 0 at the
    first inversion step of an x0 model: refused rather than silently stepped without them (or into NaN)."""
    with pytest.raises(NTIError, match=match):
        make_schedule({**SD_SCHEDULER, **changes}, 10)

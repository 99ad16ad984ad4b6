"""The nti:: custom ops (kernels/ddim.py) against an independent float64 truth (tests/ddim_truth.py), per input
dtype x shape.

In this process CPU tensors take the torch path, so the ops run their own `*_ref` functions: comparing them with
those would compare a function with itself. Every parity test therefore compares with the float64 truth (another
implementation, in another algebraic form, with autograd for the gradients), and with the `*_ref` functions only
where the Triton kernels really ran. `test_triton_interpreter_subprocess` reruns the `parity` and `interp` tests in
a child process with TRITON_INTERPRET=1 (it must be set before triton is imported), where the same tests run the
Triton kernels on CPU and assert that they did.
"""
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from nti import ddim as engine_ddim
from nti.kernels import (
    ddim_step,
    ddim_step_ref,
    guided_ddim_step,
    guided_ddim_step_mse,
    guided_ddim_step_mse_ref,
    guided_ddim_step_ref,
    triton_enabled,
)
from nti.kernels import ddim as K
from tests import ddim_truth as truth

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
REPO = Path(__file__).resolve().parents[1]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# odd sizes so numel is not a multiple of the 1024 block and images straddle blocks; batch 16 with distinct
# per-image coefficients; one SD-sized latent at batch 1 (several blocks per image, split loss reduction)
SHAPES = [(1, 4, 7, 9), (16, 4, 7, 9), (1, 4, 64, 64)]
SHAPE_IDS = ["1x4x7x9", "16x4x7x9", "1x4x64x64"]

# Tolerances. The ops do fp32 math on the (already rounded) inputs and the truth does float64 math on the same
# rounded values, so the input dtype does not widen forward tolerances: only fp32 rounding, amplified up to ~15x by
# 1/sqrt(a_t) at t=999 -> rtol=atol=1e-5 on outputs scaled O(1..20). The loss is a positive mean (no cancellation),
# only fp32 summation differs -> rtol 1e-5. Gradients are stored in the input dtype: rounding the fp32 gradient
# (or the interpreter's bf16 conversion) costs up to one ulp -> 2 ulp of the dtype: bf16 2^-6, fp16 2^-9; fp32 as
# the forward.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6, torch.float16: 2 ** -9}

interp_only = pytest.mark.skipif(
    not INTERPRET, reason="runs in the TRITON_INTERPRET=1 subprocess (test_triton_interpreter_subprocess)")


def _schedule_alphas() -> torch.Tensor:
    """alphas_cumprod of SD v1 (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def make_inputs(shape, dtype, seed=0):
    """Latents fp32, eps in `dtype`, per-image distinct w / a_t / a_prev / a_next spanning the whole schedule."""
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    ac = _schedule_alphas()
    t = torch.linspace(999, 1, b).round().long()  # distinct timesteps, t=999 included (a_t ~ 0.005)
    t = t[torch.randperm(b, generator=g)]
    return dict(
        x=torch.randn(shape, generator=g),
        eps_u=torch.randn(shape, generator=g).to(dtype),
        eps_c=torch.randn(shape, generator=g).to(dtype),
        w=torch.linspace(1.0, 7.5, b)[torch.randperm(b, generator=g)],
        a_t=ac[t],
        a_prev=torch.where(t - 20 >= 0, ac[(t - 20).clamp(min=0)], ac[0]),
        a_next=ac[(t + 20).clamp(max=999)],
        target=torch.randn(shape, generator=g),
    )


def assert_close(actual, expected, rtol, atol_scale=None):
    """assert_close with atol relative to the reference's magnitude (grads scale with 2/N)."""
    atol = rtol * (float(expected.detach().abs().max()) if atol_scale is None else atol_scale)
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=atol)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts launches of the Triton wrappers, so each test can assert which path really ran."""
    calls = Counter()
    for name in ("_triton_step", "_triton_mse", "_triton_bwd"):
        fn = getattr(K, name)

        def counted(*args, _fn=fn, _name=name, **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(K, name, counted)
    return calls


def expect_path(calls, x, names):
    if triton_enabled(x):
        assert all(calls[n] > 0 for n in names), f"Triton kernels not launched: {dict(calls)}"
    else:
        assert not calls, f"Triton wrappers ran on the torch path: {dict(calls)}"


# ---------------------------------------------------------------------------------------------------------------
# parity: torch path here, Triton kernels in the interpreter subprocess
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", ["denoise", "invert"])
def test_parity_ddim_step(kernel_calls, dtype, shape, direction):
    d = make_inputs(shape, dtype)
    a_from, a_to = (d["a_t"], d["a_prev"]) if direction == "denoise" else (d["a_prev"], d["a_t"])
    out = ddim_step(d["x"], d["eps_u"], a_from, a_to)
    assert out.dtype == torch.float32 and out.shape == d["x"].shape
    assert_close(out, truth.ddim(d["x"], d["eps_u"], a_from, a_to), 1e-5, atol_scale=1.0)
    # and the engine's own eager DDIM (engine/ddim.py), which the inversion reference uses
    assert_close(out, engine_ddim.ddim_step(d["x"], d["eps_u"], a_from, a_to), 1e-5, atol_scale=1.0)
    if triton_enabled(d["x"]):  # the kernel against the torch path (on the torch path this would be itself)
        assert_close(out, ddim_step_ref(d["x"], d["eps_u"], a_from, a_to), 1e-5, atol_scale=1.0)
    expect_path(kernel_calls, d["x"], ["_triton_step"])


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_guided_ddim_step(kernel_calls, dtype, shape):
    d = make_inputs(shape, dtype)
    args = (d["x"], d["eps_u"], d["eps_c"], d["w"], d["a_t"], d["a_prev"])
    out = guided_ddim_step(*args)
    assert out.dtype == torch.float32
    assert_close(out, truth.guided_ddim(*args), 1e-5, atol_scale=1.0)
    eps = engine_ddim.guided_eps(d["eps_u"], d["eps_c"], d["w"])
    assert_close(out, engine_ddim.ddim_step(d["x"], eps, d["a_t"], d["a_prev"]), 1e-5, atol_scale=1.0)
    if triton_enabled(d["x"]):
        assert_close(out, guided_ddim_step_ref(*args), 1e-5, atol_scale=1.0)
    expect_path(kernel_calls, d["x"], ["_triton_step"])


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_mse_and_grad(kernel_calls, dtype, shape):
    d = make_inputs(shape, dtype)
    x = d["x"].clone().requires_grad_()
    eps_u = d["eps_u"].clone().requires_grad_()
    eps_c = d["eps_c"].clone().requires_grad_()
    coefficients = (d["w"], d["a_t"], d["a_prev"], d["target"])
    loss = guided_ddim_step_mse(x, eps_u, eps_c, *coefficients)
    x64, eps_u64, eps_c64 = truth.leaves64(x, eps_u, eps_c)
    want_loss = truth.null_text_loss(x64, eps_u64, eps_c64, *coefficients)
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    assert_close(loss, want_loss, 1e-5, atol_scale=0.0)
    # distinct per-image upstream grads, so a kernel indexing g by the wrong image fails
    gw = torch.linspace(0.5, 2.0, shape[0])
    got = torch.autograd.grad((loss * gw).sum(), [eps_u, x, eps_c])
    want = torch.autograd.grad((want_loss * gw.double()).sum(), [eps_u64, x64, eps_c64])
    for g, r, leaf, name in zip(got, want, [eps_u, x, eps_c], ["eps_u", "x", "eps_c"]):
        assert g.dtype == leaf.dtype, name  # each gradient in its input's dtype
        assert_close(g, r, GRAD_RTOL[g.dtype])
    if triton_enabled(x):  # the kernels against the torch path
        ref = guided_ddim_step_mse_ref(x, eps_u, eps_c, *coefficients)
        assert_close(loss, ref, 1e-5, atol_scale=0.0)
        for g, r in zip(got, torch.autograd.grad((ref * gw).sum(), [eps_u, x, eps_c])):
            assert_close(g, r, GRAD_RTOL[g.dtype])
    expect_path(kernel_calls, x, ["_triton_mse", "_triton_bwd"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_mse_grad_eps_u_only(kernel_calls, dtype):
    """The engine's case: only eps_u (the null embedding's UNet output) requires grad."""
    d = make_inputs((16, 4, 7, 9), dtype, seed=1)
    eps_u = d["eps_u"].clone().requires_grad_()
    args = (d["x"], eps_u, d["eps_c"], d["w"], d["a_t"], d["a_prev"], d["target"])
    (g,) = torch.autograd.grad(guided_ddim_step_mse(*args).sum(), eps_u)
    (eps_u64,) = truth.leaves64(eps_u)
    (r,) = torch.autograd.grad(truth.null_text_loss(d["x"], eps_u64, *args[2:]).sum(), eps_u64)
    assert g.dtype == dtype
    assert_close(g, r, GRAD_RTOL[dtype])
    # the closed form of the brief: g_b * 2/N * (x_prev - target) * c2 * (1 - w), in float64
    a_t, a_p, w = (v.double().view(-1, 1, 1, 1) for v in (d["a_t"], d["a_prev"], d["w"]))
    c2 = (1 - a_p).sqrt() - a_p.sqrt() * (1 - a_t).sqrt() / a_t.sqrt()
    x_prev = truth.guided_ddim(*args[:6]).detach()
    closed = 2 / d["x"][0].numel() * (x_prev - d["target"].double()) * c2 * (1 - w)
    assert_close(g, closed, GRAD_RTOL[dtype])
    expect_path(kernel_calls, d["x"], ["_triton_bwd"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_step_grads(kernel_calls, dtype):
    d = make_inputs((16, 4, 7, 9), dtype, seed=2)
    x = d["x"].clone().requires_grad_()
    eps_u = d["eps_u"].clone().requires_grad_()
    eps_c = d["eps_c"].clone().requires_grad_()
    up = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    x64, eps_u64, eps_c64 = truth.leaves64(x, eps_u, eps_c)
    for op, ref, want_fn, ins, ins64 in [
        (guided_ddim_step, guided_ddim_step_ref, truth.guided_ddim, (x, eps_u, eps_c, d["w"], d["a_t"], d["a_prev"]),
         (x64, eps_u64, eps_c64, d["w"], d["a_t"], d["a_prev"])),
        (ddim_step, ddim_step_ref, truth.ddim, (x, eps_u, d["a_t"], d["a_next"]),
         (x64, eps_u64, d["a_t"], d["a_next"])),
    ]:
        leaves = [t for t in ins if t.requires_grad]
        got = torch.autograd.grad((op(*ins) * up).sum(), leaves)
        want = torch.autograd.grad((want_fn(*ins64) * up.double()).sum(), [t for t in ins64 if t.requires_grad])
        for g, r, leaf in zip(got, want, leaves):
            assert g.dtype == leaf.dtype
            assert_close(g, r, GRAD_RTOL[g.dtype])
        if triton_enabled(x):
            for g, r in zip(got, torch.autograd.grad((ref(*ins) * up).sum(), leaves)):
                assert_close(g, r, GRAD_RTOL[g.dtype])
    expect_path(kernel_calls, x, ["_triton_step", "_triton_bwd"])


def test_parity_noncontiguous_and_scalar_coefficients(kernel_calls):
    d = make_inputs((4, 4, 7, 9), torch.bfloat16)
    x = d["x"].to(memory_format=torch.channels_last)
    eps_u = d["eps_u"].transpose(2, 3).contiguous().transpose(2, 3)  # same values, non-contiguous strides
    w = torch.stack([d["w"], d["w"]], 1)[:, 0]  # stride-2 coefficient vector
    assert not x.is_contiguous() and not eps_u.is_contiguous() and not w.is_contiguous()
    args = (x, eps_u, d["eps_c"], w, d["a_t"], d["a_prev"])
    assert_close(guided_ddim_step(*args), truth.guided_ddim(*args), 1e-5, atol_scale=1.0)
    assert_close(guided_ddim_step_mse(*args, d["target"]), truth.null_text_loss(*args, d["target"]), 1e-5, 0.0)
    # python floats and 0-d tensors broadcast to every image
    full = lambda v: torch.full((4,), v)  # noqa: E731
    assert_close(ddim_step(x, eps_u, 0.3, torch.tensor(0.5)), truth.ddim(x, eps_u, full(0.3), full(0.5)), 1e-5, 1.0)
    expect_path(kernel_calls, d["x"], ["_triton_step", "_triton_mse"])


def test_parity_disable_env_forces_torch(kernel_calls, monkeypatch):
    d = make_inputs((2, 4, 7, 9), torch.float16)
    monkeypatch.setenv("NTI_DISABLE_TRITON", "1")
    assert not triton_enabled(d["x"]) and not triton_enabled(d["x"].cuda() if torch.cuda.is_available() else d["x"])
    eps_u = d["eps_u"].clone().requires_grad_()
    args = (d["x"], eps_u, d["eps_c"], d["w"], d["a_t"], d["a_prev"], d["target"])
    loss = guided_ddim_step_mse(*args)
    loss.sum().backward()
    assert_close(loss, truth.null_text_loss(*args), 1e-5, 0.0)
    assert not kernel_calls, "NTI_DISABLE_TRITON=1 must keep every op on the torch path"


def test_triton_enabled_rules():
    x = torch.zeros(2, 4, 3, 3)
    assert not triton_enabled(x.double())  # fp64 (gradcheck) always takes the torch path
    if K.triton is None:
        assert not triton_enabled(x)
    elif not INTERPRET:
        assert not triton_enabled(x), "CPU tensors take Triton only under TRITON_INTERPRET=1"


# ---------------------------------------------------------------------------------------------------------------
# interpreter-only checks (run inside the subprocess)
# ---------------------------------------------------------------------------------------------------------------

@interp_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interp_triton_path_is_taken(dtype):
    assert K.triton is not None
    assert triton_enabled(torch.zeros(1, dtype=dtype))


@interp_only
def test_interp_loss_split_over_programs():
    """An SD-sized image at batch 1 is reduced by several programs; the partial sums must add up per image."""
    b, n = 1, 4 * 64 * 64
    blocks = -(-n // K._BLOCK)
    assert min(blocks, K._MSE_PROGRAMS // b) > 1
    d = make_inputs((2, 4, 64, 64), torch.float32, seed=5)  # batch 2: both images split, the sums kept apart
    args = (d["x"], d["eps_u"], d["eps_c"], d["w"], d["a_t"], d["a_prev"], d["target"])
    assert_close(K._triton_mse(*args), truth.null_text_loss(*args), 1e-5, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# torch-path checks: gradcheck, op registration, compile
# ---------------------------------------------------------------------------------------------------------------

def _f64_inputs(shape=(3, 2, 3, 5)):
    d = make_inputs(shape, torch.float64, seed=4)
    d = {k: v.double() for k, v in d.items()}
    for k in ("x", "eps_u", "eps_c"):
        d[k].requires_grad_()
    return d


def test_gradcheck_float64():
    d = _f64_inputs()
    x, eu, ec, w, at, ap, tg = (d[k] for k in ("x", "eps_u", "eps_c", "w", "a_t", "a_prev", "target"))
    assert torch.autograd.gradcheck(lambda x, eu, ec: guided_ddim_step_mse(x, eu, ec, w, at, ap, tg), (x, eu, ec))
    assert torch.autograd.gradcheck(lambda x, eu, ec: guided_ddim_step(x, eu, ec, w, at, ap), (x, eu, ec))
    assert torch.autograd.gradcheck(lambda x, e: ddim_step(x, e, at, d["a_next"]), (x, eu))


def test_non_differentiable_inputs_get_none():
    d = make_inputs((2, 4, 3, 5), torch.float32)
    eps_u = d["eps_u"].requires_grad_()
    target, w = d["target"].requires_grad_(), d["w"].requires_grad_()
    loss = guided_ddim_step_mse(d["x"], eps_u, d["eps_c"], w, d["a_t"], d["a_prev"], target)
    g_eu, g_t, g_w = torch.autograd.grad(loss.sum(), [eps_u, target, w], allow_unused=True)
    assert g_eu is not None and g_t is None and g_w is None


def test_shape_checks():
    d = make_inputs((2, 4, 3, 5), torch.float32)
    with pytest.raises(RuntimeError, match="coefficients"):
        guided_ddim_step(d["x"], d["eps_u"], d["eps_c"], d["w"][:1].repeat(3), d["a_t"], d["a_prev"])
    with pytest.raises(RuntimeError, match="expected shape"):
        ddim_step(d["x"], d["eps_u"][:, :2], d["a_t"], d["a_prev"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype):
    """Schema, fake (meta) impls, autograd registration and aot_dispatch of every nti:: op."""
    d = make_inputs((2, 4, 3, 5), dtype)
    x = d["x"].requires_grad_()
    eu, ec = d["eps_u"].requires_grad_(), d["eps_c"].requires_grad_()
    w, at, ap, tg = d["w"], d["a_t"], d["a_prev"], d["target"]
    ops = torch.ops.nti
    cases = [
        (ops.ddim_step, (x, eu, at, ap)),
        (ops.guided_ddim_step, (x, eu, ec, w, at, ap)),
        (ops.guided_ddim_step_mse, (x, eu, ec, w, at, ap, tg)),
        (ops.ddim_step_backward, (torch.randn(x.shape), w, at, ap, torch.float32, dtype, dtype, True, True, False)),
        (ops.guided_ddim_step_mse_backward,
         (torch.rand(2), x.detach(), eu.detach(), ec.detach(), w, at, ap, tg, False, True, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def _inner_step(x, eps_u, eps_c, w, a_t, a_prev, target):
    """One inner-loop iteration as the engine compiles it: loss (backward traced by aot_autograd) and the step."""
    loss = guided_ddim_step_mse(x, eps_u, eps_c, w, a_t, a_prev, target)
    return loss, guided_ddim_step(x, eps_u.detach(), eps_c, w, a_t, a_prev)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    d = make_inputs((2, 4, 7, 9), torch.bfloat16)
    args = [d[k] for k in ("x", "eps_u", "eps_c", "w", "a_t", "a_prev", "target")]
    upstream = torch.tensor([1.0, 3.0])
    (eps_u64,) = truth.leaves64(args[1])
    want_loss = truth.null_text_loss(args[0], eps_u64, *args[2:])
    (want_grad,) = torch.autograd.grad((want_loss * upstream.double()).sum(), eps_u64)
    want_step = truth.guided_ddim(*args[:6])
    for fn in (torch.compile(_inner_step, backend=backend, fullgraph=True), _inner_step):
        eps_u = args[1].clone().requires_grad_()
        loss, x_prev = fn(args[0], eps_u, *args[2:])
        (loss * upstream).sum().backward()  # through the compiled backward graph
        assert loss.dtype == x_prev.dtype == torch.float32 and eps_u.grad.dtype == torch.bfloat16
        assert_close(loss.detach(), want_loss, 1e-5, atol_scale=0.0)
        assert_close(x_prev, want_step, 1e-5, atol_scale=1.0)
        assert_close(eps_u.grad, want_grad, GRAD_RTOL[torch.bfloat16])
    # inversion direction, forward only, through the other op
    inv = torch.compile(lambda x, e, a, b: ddim_step(x, e, a, b) * 2, backend=backend, fullgraph=True)
    assert_close(inv(d["x"], d["eps_c"], d["a_prev"], d["a_t"]),
                 2 * truth.ddim(d["x"], d["eps_c"], d["a_prev"], d["a_t"]), 1e-5, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# the Triton kernels themselves, on CPU, in the interpreter
# ---------------------------------------------------------------------------------------------------------------

def run_in_triton_interpreter(test_file: str, select: str, at_least: int, skips: bool = False) -> None:
    """The tests of test_file matching `select` in a pytest subprocess with TRITON_INTERPRET=1 (the Triton kernels
    run on CPU there): all pass, at least `at_least` of them, none skipped unless `skips`."""
    if K.triton is None:
        pytest.skip("triton is not installed: the Triton kernels cannot run, the torch path is tested above")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("NTI_DISABLE_TRITON", None)  # the kill switches would send every op to its torch reference
    env.pop("NTI_FUSED_STEP", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(test_file).resolve()), "-q", "-p", "no:cacheprovider",
         "-k", select, "-x"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed and int(passed.group(1)) >= at_least, out[-3000:]
    assert "failed" not in out and (skips or "skipped" not in out), out[-3000:]


@pytest.mark.skipif(INTERPRET, reason="already inside the interpreter subprocess")
def test_triton_interpreter_subprocess():
    run_in_triton_interpreter(__file__, "parity or interp_", 30)

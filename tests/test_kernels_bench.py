"""pytest-benchmark rows: DDIM step and the inner-loop loss + grad, eager torch vs the nti:: op, small CPU sizes.

The suite runs these with --benchmark-disable (each body once, as a smoke test). To time them:
  OMP_NUM_THREADS=1 python -m pytest tests/test_kernels_bench.py --benchmark-enable
On CPU the op takes its torch path, so this measures dispatch overhead, not the Triton kernels (CUDA is unmeasured).
Each row's result is checked against the float64 truth of tests/ddim_truth.py, never against the function the row
times (on CPU the op runs the `*_ref` functions, so op-vs-ref would compare a function with itself).
"""
import pytest
import torch

from nti import ddim as engine_ddim
from nti.kernels import ddim_step, guided_ddim_step, guided_ddim_step_mse, triton_enabled
from tests import ddim_truth as truth

SHAPE = (4, 4, 32, 32)


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    b = SHAPE[0]
    return dict(
        x=torch.randn(SHAPE, generator=g),
        eps_u=torch.randn(SHAPE, generator=g).to(dtype),
        eps_c=torch.randn(SHAPE, generator=g).to(dtype),
        w=torch.linspace(1.0, 7.5, b),
        a_t=torch.linspace(0.05, 0.9, b),
        a_prev=torch.linspace(0.1, 0.95, b),
        target=torch.randn(SHAPE, generator=g),
    )


def _torch_guided(x, eps_u, eps_c, w, a_t, a_prev):
    return engine_ddim.ddim_step(x, engine_ddim.guided_eps(eps_u, eps_c, w), a_t, a_prev)


def _torch_loss(x, eps_u, eps_c, w, a_t, a_prev, target):
    """The eager engine's inner-loop loss, per image: the reference's F.mse_loss of the guided step, batched."""
    return (_torch_guided(x, eps_u, eps_c, w, a_t, a_prev) - target).square().flatten(1).mean(1)


@pytest.mark.parametrize("impl", ["torch", "op"])
def test_bench_ddim_step(benchmark, impl):
    d = _inputs()
    fn = engine_ddim.ddim_step if impl == "torch" else ddim_step
    benchmark.group = f"ddim_step {SHAPE}"
    benchmark.extra_info["triton"] = impl == "op" and triton_enabled(d["x"])
    out = benchmark(fn, d["x"], d["eps_u"], d["a_t"], d["a_prev"])
    # quality beside speed: each row must compute the step (fp32 rounding amplified by 1/sqrt(a_t) <= 4.5 here)
    torch.testing.assert_close(out, truth.ddim(d["x"], d["eps_u"], d["a_t"], d["a_prev"]).float(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "op"])
def test_bench_guided_ddim_step(benchmark, impl):
    d = _inputs(torch.bfloat16)
    fn = _torch_guided if impl == "torch" else guided_ddim_step
    args = [d[k] for k in ("x", "eps_u", "eps_c", "w", "a_t", "a_prev")]
    benchmark.group = f"guided_ddim_step bf16 eps {SHAPE}"
    out = benchmark(fn, *args)
    torch.testing.assert_close(out, truth.guided_ddim(*args).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "op"])
def test_bench_inner_loss_fwd_bwd(benchmark, impl):
    d = _inputs(torch.bfloat16)
    loss_fn = _torch_loss if impl == "torch" else guided_ddim_step_mse
    eps_u = d["eps_u"].clone().requires_grad_()
    rest = [d[k] for k in ("eps_c", "w", "a_t", "a_prev", "target")]

    def step():
        loss = loss_fn(d["x"], eps_u, *rest)
        return loss.detach(), torch.autograd.grad(loss.sum(), eps_u)[0]

    benchmark.group = f"inner loss fwd+bwd bf16 eps {SHAPE}"
    loss, grad = benchmark(step)
    (eps_u64,) = truth.leaves64(eps_u)
    want_loss = truth.null_text_loss(d["x"], eps_u64, *rest)
    (want_grad,) = torch.autograd.grad(want_loss.sum(), eps_u64)
    torch.testing.assert_close(loss, want_loss.detach().float(), rtol=1e-5, atol=0.0)
    # both rows' gradients come back in eps_u's dtype, bf16: 2 ulp (2^-6) of the float64 truth
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), want_grad.float(), rtol=2 ** -6,
                               atol=2 ** -6 * float(want_grad.abs().max()))

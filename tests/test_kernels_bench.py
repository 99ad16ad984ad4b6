"""pytest-benchmark rows: DDIM step and the inner-loop loss + grad, eager torch vs the nti:: op, small CPU sizes.

The suite runs these with --benchmark-disable (each body once, as a smoke test). To time them:
  OMP_NUM_THREADS=1 python -m pytest tests/test_kernels_bench.py --benchmark-enable
On CPU the op takes its torch path, so this measures dispatch overhead, not the Triton kernels (CUDA is unmeasured).
"""
import pytest
import torch

from engine import ddim as engine_ddim
from kernels import ddim_step, guided_ddim_step, guided_ddim_step_mse, guided_ddim_step_mse_ref, triton_enabled

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


@pytest.mark.parametrize("impl", ["torch", "op"])
def test_bench_ddim_step(benchmark, impl):
    d = _inputs()
    fn = engine_ddim.ddim_step if impl == "torch" else ddim_step
    benchmark.group = f"ddim_step {SHAPE}"
    benchmark.extra_info["triton"] = impl == "op" and triton_enabled(d["x"])
    out = benchmark(fn, d["x"], d["eps_u"], d["a_t"], d["a_prev"])
    # quality beside speed: both rows must compute the same step
    torch.testing.assert_close(out, engine_ddim.ddim_step(d["x"], d["eps_u"], d["a_t"], d["a_prev"]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "op"])
def test_bench_guided_ddim_step(benchmark, impl):
    d = _inputs(torch.bfloat16)
    fn = _torch_guided if impl == "torch" else guided_ddim_step
    args = [d[k] for k in ("x", "eps_u", "eps_c", "w", "a_t", "a_prev")]
    benchmark.group = f"guided_ddim_step bf16 eps {SHAPE}"
    out = benchmark(fn, *args)
    torch.testing.assert_close(out, _torch_guided(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "op"])
def test_bench_inner_loss_fwd_bwd(benchmark, impl):
    d = _inputs(torch.bfloat16)
    loss_fn = guided_ddim_step_mse_ref if impl == "torch" else guided_ddim_step_mse
    eps_u = d["eps_u"].clone().requires_grad_()
    rest = [d[k] for k in ("eps_c", "w", "a_t", "a_prev", "target")]

    def step():
        loss = loss_fn(d["x"], eps_u, *rest)
        return loss.detach(), torch.autograd.grad(loss.sum(), eps_u)[0]

    benchmark.group = f"inner loss fwd+bwd bf16 eps {SHAPE}"
    loss, grad = benchmark(step)
    ref = guided_ddim_step_mse_ref(d["x"], eps_u, *rest)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0.0)
    assert grad.dtype == torch.bfloat16

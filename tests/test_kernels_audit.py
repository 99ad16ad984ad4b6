"""Audit of the nti:: custom ops (kernels/ddim.py) beyond tests/test_kernels.py: opcheck for every dtype the engine
uses x memory layout x batch size, coefficient broadcasting as engine/ddim.py does it, half-precision coefficient
tensors, and the engine's message when it was asked for the fused step but the Triton kernels cannot run.

As in test_kernels.py, the `parity` tests run the torch path here and the Triton kernels in a TRITON_INTERPRET=1
subprocess (`test_audit_triton_interpreter_subprocess`), where they assert that the kernels were launched.
"""
import os
import warnings

import pytest
import torch

from nti import NTIConfig
from nti import ddim as engine_ddim
from nti import fast
from nti.kernels import ddim as K
from nti.kernels import ddim_step, guided_ddim_step, guided_ddim_step_mse
from tests import ddim_truth as truth
from tests import test_kernels
from tests.test_kernels import GRAD_RTOL, assert_close, expect_path, make_inputs, run_in_triton_interpreter

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
kernel_calls = test_kernels.kernel_calls  # the fixture counting Triton launches


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":  # strides of a (.., W, H) tensor seen as (.., H, W)
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    return t


# ---------------------------------------------------------------------------------------------------------------
# opcheck: schema, fake impl, autograd registration, aot_dispatch
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, batch", [("contiguous", 1), ("channels_last", 1), ("transposed", 1),
                                           ("channels_last", 3), ("transposed", 3)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_opcheck_every_dtype_layout_and_batch(dtype, layout, batch):
    """test_kernels.py opchecks fp32/bf16 contiguous batch 2; the engine also feeds fp16 eps, batch 1 and
    channels_last UNet outputs. Odd H, W so no size is a multiple of anything. In the interpreter subprocess the
    real impl is the Triton kernel, so its outputs' dtypes and strides are checked against the fake impl too."""
    d = make_inputs((batch, 4, 5, 7), dtype, seed=batch)
    x = _layout(d["x"], layout).requires_grad_()
    eu, ec = (_layout(d[k], layout).requires_grad_() for k in ("eps_u", "eps_c"))
    w, at, ap, tg = d["w"], d["a_t"], d["a_prev"], _layout(d["target"], layout)
    assert layout == "contiguous" or not eu.is_contiguous()
    ops = torch.ops.nti
    cases = [
        (ops.ddim_step, (x, eu, at, ap)),
        (ops.guided_ddim_step, (x, eu, ec, w, at, ap)),
        (ops.guided_ddim_step_mse, (x, eu, ec, w, at, ap, tg)),
        (ops.ddim_step_backward, (_layout(torch.randn(x.shape), layout), w, at, ap, torch.float32, dtype, dtype,
                                  True, True, True)),
        (ops.ddim_step_backward, (torch.randn(x.shape), None, at, ap, torch.float32, dtype, dtype,
                                  False, True, False)),
        (ops.guided_ddim_step_mse_backward,
         (torch.rand(batch), x.detach(), eu.detach(), ec.detach(), w, at, ap, tg, True, True, False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---------------------------------------------------------------------------------------------------------------
# coefficients: what the public functions broadcast, and coefficient dtypes
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["float", "0-d", "(1,)", "(B,)"])
def test_parity_coefficients_broadcast_as_engine_ddim_does(kernel_calls, form):
    """The ops take every coefficient form engine/ddim.py's step (the plain torch they replace) takes. A (1,) tensor
    (schedule.alphas[t:t+1], say) was refused: 'coefficients must have shape (3,), got (1,)'."""
    d = make_inputs((3, 4, 5, 7), torch.float32, seed=7)
    values = {"w": 7.5, "a_t": 0.3, "a_prev": 0.6}
    if form == "float":
        c = values
    elif form == "0-d":
        c = {k: torch.tensor(v) for k, v in values.items()}
    elif form == "(1,)":
        c = {k: torch.tensor([v]) for k, v in values.items()}
    else:
        c = {k: torch.full((3,), v) for k, v in values.items()}
    x, eu, ec, tg = d["x"], d["eps_u"], d["eps_c"], d["target"]
    want_step = engine_ddim.ddim_step(x, eu, c["a_t"], c["a_prev"])
    assert_close(ddim_step(x, eu, c["a_t"], c["a_prev"]), want_step, 1e-5, atol_scale=1.0)
    want_guided = engine_ddim.ddim_step(x, engine_ddim.guided_eps(eu, ec, c["w"]), c["a_t"], c["a_prev"])
    assert_close(guided_ddim_step(x, eu, ec, c["w"], c["a_t"], c["a_prev"]), want_guided, 1e-5, atol_scale=1.0)
    want_loss = (want_guided - tg).square().mean(dim=(1, 2, 3))
    assert_close(guided_ddim_step_mse(x, eu, ec, c["w"], c["a_t"], c["a_prev"], tg), want_loss, 1e-5, 0.0)
    expect_path(kernel_calls, x, ["_triton_step", "_triton_mse"])


def test_coefficients_of_another_length_are_still_refused():
    d = make_inputs((3, 4, 5, 7), torch.float32)
    with pytest.raises(RuntimeError, match=r"coefficients must have shape \(3,\), got \(2,\)"):
        ddim_step(d["x"], d["eps_u"], d["a_t"][:2], d["a_prev"][:2])


@pytest.mark.parametrize("coef_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_parity_half_coefficient_tensors_through_the_ops(kernel_calls, coef_dtype):
    """torch.ops.nti.* take coefficient tensors of any float dtype (the schema says Tensor). The torch path casts
    them to fp32; the Triton kernels did fp32 math on half loads and failed to compile ("Expected dtype ['fp32'] but
    got bf16" from sqrt_rn) in the interpreter."""
    d = make_inputs((3, 4, 5, 7), torch.bfloat16, seed=8)
    half = {k: d[k].to(coef_dtype) for k in ("w", "a_t", "a_prev")}
    exact = {k: v.float() for k, v in half.items()}  # the same (rounded) values in fp32
    eps_u = d["eps_u"].clone().requires_grad_()
    args = (d["x"], eps_u, d["eps_c"])
    got = torch.ops.nti.guided_ddim_step(*args, half["w"], half["a_t"], half["a_prev"])
    assert got.dtype == torch.float32
    assert_close(got, truth.guided_ddim(*args, exact["w"], exact["a_t"], exact["a_prev"]), 1e-5, atol_scale=1.0)
    assert_close(torch.ops.nti.ddim_step(d["x"], d["eps_c"], half["a_t"], half["a_prev"]),
                 truth.ddim(d["x"], d["eps_c"], exact["a_t"], exact["a_prev"]), 1e-5, atol_scale=1.0)
    loss = torch.ops.nti.guided_ddim_step_mse(*args, half["w"], half["a_t"], half["a_prev"], d["target"])
    (eps_u64,) = truth.leaves64(eps_u)
    want = truth.null_text_loss(d["x"], eps_u64, d["eps_c"], exact["w"], exact["a_t"], exact["a_prev"], d["target"])
    assert_close(loss, want, 1e-5, atol_scale=0.0)
    (g,) = torch.autograd.grad(loss.sum(), eps_u)
    (r,) = torch.autograd.grad(want.sum(), eps_u64)
    assert_close(g, r, GRAD_RTOL[torch.bfloat16])
    expect_path(kernel_calls, d["x"], ["_triton_step", "_triton_mse", "_triton_bwd"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_batch1_channels_last_grads(kernel_calls, dtype):
    """Batch 1, channels_last latents and eps, odd size: loss, step and all three gradients against the truth."""
    d = make_inputs((1, 4, 9, 11), dtype, seed=9)
    x, eu, ec = (d[k].contiguous(memory_format=torch.channels_last).requires_grad_() for k in ("x", "eps_u", "eps_c"))
    rest = (d["w"], d["a_t"], d["a_prev"])
    loss = guided_ddim_step_mse(x, eu, ec, *rest, d["target"])
    step = guided_ddim_step(x, eu, ec, *rest)
    leaves64 = truth.leaves64(x, eu, ec)
    want_loss = truth.null_text_loss(*leaves64, *rest, d["target"])
    want_step = truth.guided_ddim(*leaves64, *rest)
    assert_close(loss, want_loss, 1e-5, atol_scale=0.0)
    assert_close(step, want_step, 1e-5, atol_scale=1.0)
    up = torch.randn(step.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(loss.sum() + (step * up).sum(), [x, eu, ec])
    want = torch.autograd.grad(want_loss.sum() + (want_step * up.double()).sum(), leaves64)
    for g, r, leaf in zip(got, want, (x, eu, ec)):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert_close(g, r, GRAD_RTOL[dtype])
    expect_path(kernel_calls, d["x"], ["_triton_step", "_triton_mse", "_triton_bwd"])


# ---------------------------------------------------------------------------------------------------------------
# the engine's choice of the fused step: a message whenever an explicit request is not honoured
# ---------------------------------------------------------------------------------------------------------------

def _fused_ops(fused_step, device="cpu"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops = fast.fused_ops(NTIConfig(fused_step=fused_step), torch.device(device))
    return ops, [str(w.message) for w in caught]


@pytest.mark.skipif(INTERPRET, reason="CPU tensors take the Triton path inside the interpreter")
def test_fused_step_requested_where_triton_cannot_run_says_so(monkeypatch):
    """fused_step=True on a device or install where the kernels cannot run used the ops' torch reference without a
    word; the user asked for the fused kernels, so say that they are not running and why."""
    monkeypatch.delenv("NTI_DISABLE_TRITON", raising=False)
    monkeypatch.delenv("NTI_FUSED_STEP", raising=False)
    ops, said = _fused_ops(True)  # CPU, no interpreter
    assert ops is K and len(said) == 1 and "torch reference" in said[0] and "cpu" in said[0], said
    monkeypatch.setattr(K, "triton", None)  # Triton missing
    ops, said = _fused_ops(True)
    assert ops is K and len(said) == 1 and "triton is not installed" in said[0], said
    monkeypatch.undo()
    monkeypatch.setenv("NTI_DISABLE_TRITON", "1")  # the kernels' kill switch
    ops, said = _fused_ops(True)
    assert ops is K and len(said) == 1 and "NTI_DISABLE_TRITON=1" in said[0], said


def test_fused_step_kill_switch_and_default_choice(monkeypatch):
    monkeypatch.setenv("NTI_FUSED_STEP", "0")  # the engine's kill switch over an explicit request
    ops, said = _fused_ops(True)
    assert ops is None and len(said) == 1 and "NTI_FUSED_STEP=0" in said[0], said
    ops, said = _fused_ops(None)  # nothing asked for: nothing to say
    assert ops is None and not said
    monkeypatch.delenv("NTI_FUSED_STEP")
    ops, said = _fused_ops(False)
    assert ops is None and not said
    if not INTERPRET:
        ops, said = _fused_ops(None)  # default on CPU: plain torch, quietly
        assert ops is None and not said


# ---------------------------------------------------------------------------------------------------------------
# the Triton kernels themselves, on CPU, in the interpreter
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.skipif(INTERPRET, reason="already inside the interpreter subprocess")
def test_audit_triton_interpreter_subprocess():
    run_in_triton_interpreter(__file__, "parity or fused_step", 25, skips=True)

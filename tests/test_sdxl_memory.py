"""The SDXL memory plan's counting method (benchmarks/sdxl_memory.py) on tiny UNets, and its committed JSON."""
import json
import math
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from nti.benchmarks import sdxl_memory as M

# SDXL's block layout and text_time conditioning, tiny: fast to run for real and under fake tensors
TINY = {**M.TINY_SDXL_UNET, "sample_size": 8, "layers_per_block": 1, "transformer_layers_per_block": (1, 1, 1)}
JSON = Path(__file__).parents[1] / "benchmarks" / "results" / "sdxl_memory_cpu.json"


@pytest.fixture(scope="module")
def real_unet():
    return M.build_unet(TINY)


@pytest.fixture(scope="module")
def fake():
    mode = FakeTensorMode()
    return mode, M.build_unet(TINY, mode)


def test_fake_count_equals_real_count(real_unet, fake):
    mode, fake_unet = fake
    real = M.count_pass(real_unet, 2, flops=False)
    faked = M.count_pass(fake_unet, 2, mode, flops=False)
    assert real.saved_bytes > 0 and real.saved_weight_bytes > 0
    assert (faked.saved_bytes, faked.saved_storages, faked.peak_bytes) == (
        real.saved_bytes, real.saved_storages, real.peak_bytes)
    assert faked.saved_bytes_by_unit == real.saved_bytes_by_unit
    # the memory-efficient attention path is what got counted (O(tokens) saved, like CUDA's flash/cuDNN)
    assert "_scaled_dot_product_flash_attention_for_cpu" in faked.attention_ops
    assert faked.autocast_ops["group_norm"] > 0 and faked.autocast_ops["linear"] > 0


def test_saved_bytes_are_what_the_allocator_keeps(real_unet):
    """What a grad-enabled forward leaves allocated beyond a no-grad one (the CPU allocator's records) is what the
    hooks count as saved for backward."""
    kwargs, _ = M.unet_call(real_unet, 2)
    outputs = {}

    def forward(grad):
        with M.EmulatedAutocast("cuda"), torch.set_grad_enabled(grad):
            outputs[grad] = real_unet(**kwargs).sample

    _, kept_without = M.allocator_timeline(lambda: forward(False))
    _, kept_with = M.allocator_timeline(lambda: forward(True))
    counted = M.count_pass(real_unet, 2, flops=False).saved_bytes
    # a few scalars (timestep arithmetic) are the only difference
    assert abs((kept_with - kept_without) - counted) < 4096, (kept_with - kept_without, counted)


def test_emulated_autocast_is_torch_autocast(real_unet):
    """The emulation with CPU's op lists reproduces torch.autocast('cpu') exactly, in output and saved bytes; with
    CUDA's lists (norms in fp32) it saves more, so the policy is what decides the count."""
    kwargs, _ = M.unet_call(real_unet, 2)
    with torch.no_grad():
        with M.EmulatedAutocast("cpu"):
            emulated = real_unet(**kwargs).sample
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            native = real_unet(**kwargs).sample
    assert torch.equal(emulated, native)
    cpu = M.count_pass(real_unet, 2, policy="cpu", flops=False).saved_bytes
    assert cpu == M.count_pass(real_unet, 2, policy="torch-cpu", flops=False).saved_bytes
    assert M.count_pass(real_unet, 2, policy="cuda", flops=False).saved_bytes > cpu


def test_checkpointing_lowers_saved_bytes_in_eval_mode(real_unet):
    """diffusers checkpoints whenever grad is enabled, also in eval mode (the engine's setting): fewer bytes saved,
    the recompute shows in the FLOPs, and the gradient to the conditioning is unchanged."""
    assert not real_unet.training
    kwargs, leaves = M.unet_call(real_unet, 2)

    def grads():
        with M.EmulatedAutocast("cuda"):
            out = real_unet(**kwargs).sample
        return torch.autograd.grad(out.float().square().sum(), leaves)

    try:
        plain, plain_grads = M.count_pass(real_unet, 2), grads()
        assert M.set_checkpointing(real_unet, "all") > 0
        ckpt, ckpt_grads = M.count_pass(real_unet, 2), grads()
    finally:
        M.set_checkpointing(real_unet, "none")
    assert ckpt.checkpointed_modules > 0
    assert ckpt.saved_bytes < 0.5 * plain.saved_bytes
    assert ckpt.peak_bytes < plain.peak_bytes
    assert ckpt.forward_flops == plain.forward_flops
    assert ckpt.forward_backward_flops > plain.forward_backward_flops
    # the recompute, attributed to the checkpointed resnets and transformer blocks, is all the extra work
    assert plain.recompute_flops_by_unit == {}
    assert sum(ckpt.recompute_flops_by_unit.values()) == ckpt.forward_backward_flops - plain.forward_backward_flops
    assert all(".resnets." in u or ".transformer_blocks." in u for u in ckpt.recompute_flops_by_unit)
    for a, b in zip(plain_grads, ckpt_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_counts_scale_with_the_batch(real_unet):
    """Per-image figures are slopes between two batch sizes, FLOPs are counted at one: both need linearity."""
    one, two = M.count_pass(real_unet, 1), M.count_pass(real_unet, 2)
    assert two.saved_bytes == 2 * one.saved_bytes
    assert two.forward_backward_flops == 2 * one.forward_backward_flops


@pytest.fixture(scope="module")
def result():
    if not JSON.exists():
        pytest.skip(f"{JSON} not written yet")
    return json.loads(JSON.read_text())


def _row(result, model, configuration):
    return next(r for r in result["configurations"] if r["model"] == model and r["configuration"] == configuration)


def test_json_largest_batch_follows_from_its_numbers(result):
    assert result["plan"]
    for entry in result["plan"]:
        row = _row(result, entry["model"], entry["configuration"])
        # per-image figures are the slope of the two counted batches
        a, b = row["counts"][:2]
        slope = (b["peak_bytes"] - a["peak_bytes"]) * row["rows_per_image"] / (b["batch_rows"] - a["batch_rows"])
        assert math.isclose(row["peak_bytes_per_image"], slope, rel_tol=1e-9)
        budget = M.usable_bytes(entry["gpu_total_bytes"])
        assert math.isclose(entry["budget_bytes"], budget, rel_tol=1e-12)

        def need(n):
            return entry["resident_weight_bytes"] + row["peak_bytes_fixed"] + n * row["peak_bytes_per_image"]
        n = entry["largest_batch"]
        assert need(n) <= budget < need(n + 1), entry
        assert math.isclose(entry["counted_bytes_at_largest_batch"], need(n), rel_tol=1e-12)


def test_json_headline_figures_hold(result):
    sdxl, sd14 = _row(result, "sdxl", "no checkpointing"), _row(result, "sd14", "no checkpointing")
    assert sdxl["grad_to"] == ["encoder_hidden_states", "text_embeds"] and sdxl["resolution_px"] == 1024
    assert sdxl["saved_bytes_per_image"] > 4 * sd14["saved_bytes_per_image"]
    ckpt = _row(result, "sdxl", "diffusers checkpointing (all flags)")
    assert ckpt["saved_bytes_per_image"] < sdxl["saved_bytes_per_image"] and ckpt["recompute_flops_per_image"] > 0
    # the count at the largest batch agrees with the per-image slope it was planned from
    for v in result["verification_at_largest_batch"]:
        assert math.isclose(v["counted_peak_bytes"], v["predicted_peak_bytes"], rel_tol=1e-3), v
    # SD v1.4: the same count reproduces what real CUDA autocast + SDPA saved on the H200
    anchor = result["validation_h200_sd14"]
    assert math.isclose(anchor["counted_saved_bytes_b1"], anchor["measured_saved_bytes_b1"], rel_tol=1e-5)
    small = result["validation_small_real_unet"]
    for which in ("none", "all"):
        v = small[f"checkpointing_{which}"]
        assert v["fake_saved_bytes"] == v["real_saved_bytes"] and v["fake_peak_bytes"] == v["real_peak_bytes"]

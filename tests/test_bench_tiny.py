"""CPU-sized regression benchmarks (pytest-benchmark). The suite runs them once with --benchmark-disable;
`pytest tests/test_bench_tiny.py --benchmark-enable` times them."""
import pytest

import nti
from nti import NTIConfig

IMAGES = ["skimage:chelsea", "skimage:coffee"]
PROMPTS = ["a cat", "a cup of coffee"]


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_bench_null_text_invert_and_edit(benchmark, tiny_pipe, backend):
    config = NTIConfig(steps=4, inner_steps=3, early_stop=False, backend=backend, batch_size=2)

    def invert_and_edit():
        invs = nti.invert(tiny_pipe, IMAGES, PROMPTS, config, progress=False)
        return invs, nti.edit_latents(tiny_pipe, invs, ["a dog", "a cup of tea"], config, progress=False)

    invs, edited = benchmark(invert_and_edit)
    assert edited.shape == (2, 4, 16, 16)
    assert all(inv.iterations == [3, 3, 3, 3] for inv in invs)  # fixed cost: early stop off


def test_bench_benchmark_script_quick(tmp_path):
    """The waterfall script runs end to end on CPU and writes its JSON (rows, parity, flops)."""
    import json

    from nti.benchmarks.bench_nti import main
    out = tmp_path / "bench.json"
    assert main(["--device", "cpu", "--no-compile", "--steps", "2", "--inner-steps", "1", "--batch-sizes", "2",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert "error" not in str(result["rows"])
    # the parity column measures something: fp32 agrees with the reference to float noise, bf16 autocast does not
    # (the reference row's own parity, 0 by construction, is no check and is not asserted)
    fp32, bf16 = rows["fast fp32 b1"]["parity_embeddings_rel"], rows["+ bf16 autocast b1"]["parity_embeddings_rel"]
    assert fp32 < 1e-4 and bf16 > 10 * fp32, (fp32, bf16)
    assert result["unet_gflop"]["fwd_bwd_b1"] > result["unet_gflop"]["fwd_b1"] > 0


def test_bench_precision_script_runs_and_compares_with_fp32(tmp_path):
    """benchmarks/bench_precision.py on one scene: fp32 first, each other row's PSNR difference from it, and the
    command that reproduces the JSON."""
    import json

    from nti.benchmarks.bench_precision import main
    out = tmp_path / "precision.json"
    main(["--scenes", "1", "--batch", "2", "--steps", "10", "--variants", "bf16 half norms (no autocast)",
          "--out", str(out)])
    result = json.loads(out.read_text())
    fp32, norms = result["rows"]
    assert fp32["variant"] == "fp32" and norms["half_norms"] is True and len(norms["psnr"]) == 1
    assert norms["mean_delta_db"] == pytest.approx(norms["psnr"][0] - fp32["psnr"][0], abs=2e-3)  # 3 decimals
    assert norms["max_abs_delta_db"] < 1.0 and fp32["mean_psnr"] > 30  # null-text on the shapes model
    assert result["steps"] == 10
    assert result["command"].endswith("--scenes '1' --batch '2' --steps '10' --variants 'bf16 half norms (no "
                                      "autocast)'")  # every setting that changes the figures, not --out
    with pytest.raises(SystemExit):
        main(["--variants", "bf17", "--out", str(tmp_path / "x.json")])

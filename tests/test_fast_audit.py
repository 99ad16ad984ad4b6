"""Audit of the batched fast path against the eager fp32 batch-1 reference: every combination a user can reach
(early stop, bucket padding, guidance, steps, methods, SDXL), and what it says when something goes wrong."""

import pytest
import torch

import nti
from nti import NTIConfig
from nti.models import encode_prompts
from nti.runner import UNetRunner
from tests.conftest import rel_err

IMAGES = ["skimage:chelsea", "skimage:astronaut", "skimage:coffee", "skimage:rocket"]
PROMPTS = ["a cat", "an astronaut sitting on a long red chair in space", "a cup of coffee", "a rocket"]
BASE = NTIConfig(steps=3, inner_steps=3)


def _said(records) -> str:
    return "\n".join(r.getMessage() for r in records)


def _poison_prompt(monkeypatch, pipe, prompt: str, calls, t_bad: int | None = None, precisions=("fp32",)):
    """NaN in the UNet's output for the rows conditioned on `prompt` (forward-only calls: DDIM inversion, then the
    null-text step's cached cond pass and any fp32 redo of it), in the n-th such call per precision at timestep
    t_bad (None: any) for which calls(n) holds: at t_bad, call 1 is DDIM inversion's and the later ones
    optimization's."""
    cond = encode_prompts(pipe, [prompt])
    real = UNetRunner.eps
    seen = {}

    def corrupted(self, z, t, context):
        out = real(self, z, t, context)
        hit = (context.float() == cond).flatten(1).all(1)
        if torch.is_grad_enabled() or (t_bad is not None and int(t) != t_bad) or not hit.any():
            return out
        precision = self.config.precision
        seen[precision] = seen.get(precision, 0) + 1
        if precision in precisions and calls(seen[precision]):
            out = out.clone()
            out[hit] = float("nan")
        return out

    monkeypatch.setattr(UNetRunner, "eps", corrupted)


# ------------------------------------------------------------------------------------------- divergence reports

@pytest.mark.parametrize("phase", ["ddim", "optimize"])
def test_an_image_that_diverges_in_fp32_spares_its_batch_mates_and_is_named(tiny_pipe, monkeypatch, nti_warnings,
                                                                           phase):
    """One image of a batch whose values stay non-finite (fp32: nothing to retry) used to raise an NTIError for its
    whole chunk: its batch mates' results were lost, the CLI stopped at that chunk (later chunks never ran) and named
    the image by its row in the chunk. Now, as the reference does, its diverged result comes back beside the others'
    (which stay bit for bit), said in a warning naming the image by its index in the call."""
    # chunks [0, 1] and [2, 3]: image 3 is row 1 of chunk 2. Early stop off keeps the batch's shape when the
    # broken row leaves (with it on, image 2 alone in a smaller batch rounds differently: 1e-7, not NaN)
    config = BASE.replace(backend="fast", batch_size=2, early_stop=False)
    clean = nti.invert(tiny_pipe, IMAGES, PROMPTS, config, progress=False)
    schedule = nti.ddim.make_schedule(tiny_pipe.scheduler_config, config.steps)
    _poison_prompt(monkeypatch, tiny_pipe, PROMPTS[3], (lambda n: n == 1) if phase == "ddim" else (lambda n: n > 1),
                   schedule.timesteps[1])
    hurt = nti.invert(tiny_pipe, IMAGES, PROMPTS, config, progress=False)
    said = _said(nti_warnings)
    if phase == "ddim":
        assert "DDIM inversion produced non-finite values for image(s) [3]" in said
        assert not torch.isfinite(hurt[3].z_T).all()
    else:
        assert "non-finite values for image(s) [3] at step 1 even in fp32" in said and "lower --guidance" in said
        assert torch.equal(hurt[3].null_embeddings[:1], clean[3].null_embeddings[:1])  # step 0 ran as before
        assert not torch.isfinite(hurt[3].null_embeddings[1]).all()
    assert "inversion 3 is not finite" in said  # the API's word on the result, as for a reference inversion
    for k in (0, 1, 2):  # the batch mate (2) and the other chunk: untouched
        assert hurt[k].iterations == clean[k].iterations and torch.equal(hurt[k].null_embeddings,
                                                                         clean[k].null_embeddings)
        assert torch.equal(hurt[k].z_T, clean[k].z_T) and hurt[k].fp32_retries == []


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_a_diverged_null_text_inversion_is_said_on_either_backend(tiny_pipe, nti_warnings, backend):
    """lr 1e30 makes every null embedding NaN while z_T (DDIM inversion's) stays finite: the reference returned the
    inversions without a word (the API's check read z_T only) and the fast path raised for the whole batch."""
    config = BASE.replace(backend=backend, steps=2, inner_steps=2, lr=1e30)
    invs = nti.invert(tiny_pipe, IMAGES[:2], PROMPTS[:2], config, progress=False)
    assert all(torch.isfinite(inv.z_T).all() and not torch.isfinite(inv.null_embeddings).all() for inv in invs)
    assert "inversions [0, 1] are not finite (NaN or inf: diverged)" in _said(nti_warnings)
    assert "lower lr" in _said(nti_warnings)


def test_an_image_retried_in_fp32_at_every_step_equals_the_reference(tiny_pipe, monkeypatch, nti_warnings):
    """bf16 gives NaN for image 1 in every pass conditioned on its prompt: its DDIM inversion and every null-text
    step are redone in fp32 at batch 1, so its whole inversion is the reference's (to rounding: measured z_T 5.8e-6,
    embeddings 2.9e-6), each retry recorded and said, while its batch mates keep their bf16 results."""
    config = BASE.replace(backend="fast", precision="bf16", batch_size=3)
    clean = nti.invert(tiny_pipe, IMAGES[:3], PROMPTS[:3], config, progress=False)
    ref = nti.invert(tiny_pipe, IMAGES[1], PROMPTS[1], BASE, progress=False)[0]
    _poison_prompt(monkeypatch, tiny_pipe, PROMPTS[1], lambda n: True, precisions=("bf16",))
    hurt = nti.invert(tiny_pipe, IMAGES[:3], PROMPTS[:3], config, progress=False)
    assert hurt[1].fp32_retries == [-1, 0, 1, 2] and hurt[1].iterations == ref.iterations
    # z_0 itself differs by 5e-7: the VAE encoded the three images as one batch (the reference: one at a time)
    assert rel_err(hurt[1].z_T, ref.z_T) < 1e-5 and rel_err(hurt[1].null_embeddings, ref.null_embeddings) < 1e-4
    said = _said(nti_warnings)
    assert "DDIM inversion: non-finite values for image(s) [1] under bf16; redoing in fp32" in said
    assert all(f"step {i}: non-finite values for image(s) [1] under bf16" in said for i in range(3))
    for k in (0, 2):
        assert hurt[k].fp32_retries == [] and torch.equal(hurt[k].null_embeddings, clean[k].null_embeddings)


# ---------------------------------------------------------------------------------------- buckets and early stop

SEVEN = IMAGES + ["skimage:camera", "skimage:cat", "skimage:immunohistochemistry"]
SEVEN_PROMPTS = PROMPTS + ["a man holding an old camera on a field", "a cat", "cells"]  # 3 to 12 tokens
STOPS = BASE.replace(inner_steps=4, early_stop_eps=0.62)  # step 0: images stop after 1, 2 or 4 iterations


@pytest.fixture(scope="module")
def seven_reference(tiny_pipe):
    """The reference's inversions of the seven images, one at a time."""
    return [nti.invert(tiny_pipe, image, prompt, STOPS, progress=False)[0]
            for image, prompt in zip(SEVEN, SEVEN_PROMPTS)]


@pytest.fixture
def static_buckets(monkeypatch):
    """The fast path with the power-of-two buckets that compile and CUDA graphs run (padding rows, compaction into
    smaller buckets), in eager numerics: CPU has no CUDA graphs and a dynamo compile per test costs minutes."""
    import nti.fast as fast

    class StaticRunner(UNetRunner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.compiled = True  # what null_text_step keys its bucket sizes on; the module stays eager

        def check_compiled(self, *args):
            pass
    monkeypatch.setattr(fast, "UNetRunner", StaticRunner)


def _bucket_rows(chunk_iterations: list[list[int]], cap: int) -> int:
    """UNet rows forward + backward that the inner loops of one chunk run in buckets: per step and iteration k, the
    bucket of the images still optimizing."""
    from nti.fast import bucket_size

    b, rows = len(chunk_iterations), 0
    for step in zip(*chunk_iterations):
        for k in range(1, max(step) + 1):
            rows += bucket_size(sum(n >= k for n in step), bucket_size(b, max(b, cap)))
    return rows


@pytest.mark.parametrize("n, batch_size", [(1, 4), (3, 4), (5, 4), (7, 4), (3, 8), (5, 8), (7, 8)])
def test_padded_buckets_stop_each_image_where_the_reference_does(tiny_pipe, seven_reference, static_buckets, n,
                                                                  batch_size):
    """Images stopping at different inner iterations, in padded power-of-two buckets that shrink as they stop: each
    image's iteration counts are the reference's exactly, its embeddings the reference's to rounding, and the UNet
    rows run are the buckets' (padding included), no more."""
    config = STOPS.replace(backend="fast", batch_size=batch_size)
    before = tiny_pipe.fast_stats.backward_rows
    invs = nti.invert(tiny_pipe, SEVEN[:n], SEVEN_PROMPTS[:n], config, progress=False)
    for inv, ref in zip(invs, seven_reference):
        assert inv.iterations == ref.iterations
        assert rel_err(inv.z_T, ref.z_T) < 1e-4 and rel_err(inv.null_embeddings, ref.null_embeddings) < 5e-4
    counts = [inv.iterations for inv in invs]
    expected = sum(_bucket_rows(counts[k:k + batch_size], batch_size) for k in range(0, n, batch_size))
    assert tiny_pipe.fast_stats.backward_rows - before == expected
    if n == 7:  # the stops really differ, within a step too
        assert len({c[0] for c in counts}) == 3


@pytest.mark.parametrize("chosen", [
    [1, 4, 6],  # step 0 stops after 4, 4, 2 iterations: a padding row beside three real ones for two iterations
    [1, 4, 6, 0],  # 4, 4, 2, 1: image 0 stopped, still in the bucket of 4 (3 left) at iteration 2
])
def test_padding_and_stopped_rows_cannot_change_the_real_ones(tiny_pipe, static_buckets, monkeypatch, chosen):
    """Every row that is not optimizing (bucket padding, images that stopped) computes on NaN inputs here: the
    others' results are bit for bit those of the same buckets without it (masked loss, masked Adam, row-local UNet)."""
    import nti.fast as fast

    images, prompts = [SEVEN[k] for k in chosen], [SEVEN_PROMPTS[k] for k in chosen]
    config = STOPS.replace(backend="fast", batch_size=4)
    clean = nti.invert(tiny_pipe, images, prompts, config, progress=False)
    real = fast.inner_iteration

    def poisoned(runner, ws, ops):
        idle = ws.active == 0  # their z, eps_c and target are never read back (only uncond, iterations, loss)
        for name in ("z", "eps_c", "target"):
            getattr(ws, name)[idle] = float("nan")
        real(runner, ws, ops)
    monkeypatch.setattr(fast, "inner_iteration", poisoned)
    hurt = nti.invert(tiny_pipe, images, prompts, config, progress=False)
    for a, b in zip(clean, hurt):
        assert a.iterations == b.iterations and a.losses == b.losses
        assert torch.equal(a.null_embeddings, b.null_embeddings) and torch.equal(a.z_T, b.z_T)
    assert sorted(c.iterations[0] for c in clean) == sorted([1, 2, 4, 4][4 - len(chosen):])


def test_unet_rows_per_image_are_what_the_docs_count(tiny_pipe):
    """docs/benchmarks.md: the eager fast path runs each inner iteration as one forward + one backward row and
    nothing padded, plus per step one row each of DDIM inversion, the cond pass and the move-on step; an edit two
    rows per step (uncond + cond), prompt-to-prompt four (both branches); DDIM inversion alone one."""
    stats = tiny_pipe.fast_stats
    config = STOPS.replace(backend="fast", batch_size=3)
    steps, b = config.steps, 3

    def rows(run):
        before = (stats.forward_rows, stats.backward_rows)
        out = run()
        return out, stats.forward_rows - before[0], stats.backward_rows - before[1]
    invs, fwd, bwd = rows(lambda: nti.invert(tiny_pipe, SEVEN[:b], SEVEN_PROMPTS[:b], config, progress=False))
    its = sum(sum(inv.iterations) for inv in invs)
    assert its < b * steps * config.inner_steps  # early stop saved iterations, and no row ran for them
    assert (fwd, bwd) == (its + 3 * steps * b, its)
    _, fwd, bwd = rows(lambda: nti.edit_latents(tiny_pipe, invs, SEVEN_PROMPTS[:b], config, progress=False))
    assert (fwd, bwd) == (2 * steps * b, 0)
    _, fwd, bwd = rows(lambda: nti.edit_latents(tiny_pipe, invs, SEVEN_PROMPTS[:b], config.replace(edit="p2p-replace"),
                                                progress=False))
    assert (fwd, bwd) == (4 * steps * b, 0)
    _, fwd, bwd = rows(lambda: nti.invert(tiny_pipe, SEVEN[:b], SEVEN_PROMPTS[:b], config.replace(method="ddim"),
                                          progress=False))
    assert (fwd, bwd) == (steps * b, 0)


# --------------------------------------------------------------------------------------------- settings' edges

@pytest.mark.parametrize("changes", [
    dict(guidance=0.0), dict(guidance=1.0), dict(guidance=100.0),
    dict(guidance_schedule="cosine", guidance_min=0.0), dict(guidance_schedule="linear", guidance_min=3.0),
    dict(steps=1), dict(inner_steps=0), dict(early_stop_eps=0.5), dict(early_stop_eps=1e3), dict(steps_offset=0),
], ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()))
def test_fast_equals_reference_at_the_settings_edges(tiny_pipe, changes):
    """Two images of different prompt lengths in one batch, at each edge a user can reach: the reference's iteration
    counts and losses, its z_T, embeddings and edit to rounding."""
    config = BASE.replace(**{"steps": 2, **changes})
    ref = [nti.invert(tiny_pipe, image, prompt, config, progress=False)[0] for image, prompt in zip(IMAGES[:2],
                                                                                                  PROMPTS[:2])]
    fast = nti.invert(tiny_pipe, IMAGES[:2], PROMPTS[:2], config.replace(backend="fast"), progress=False)
    for f, r in zip(fast, ref):
        assert f.iterations == r.iterations and rel_err(f.z_T, r.z_T) < 1e-4
        assert rel_err(f.null_embeddings, r.null_embeddings) < 5e-4
        assert f.losses == pytest.approx(r.losses, rel=1e-4, nan_ok=True)
    if config.guidance == 1.0 or config.inner_steps == 0:  # no gradient reaches the null text, or no iteration
        start = nti.api.null_embedding(tiny_pipe).cpu()
        assert all(torch.equal(inv.null_embeddings, start.expand_as(inv.null_embeddings)) for inv in fast + ref)
    edit_ref = nti.edit_latents(tiny_pipe, ref, ["a dog"] * 2, config, progress=False)
    edit_fast = nti.edit_latents(tiny_pipe, fast, ["a dog"] * 2, config.replace(backend="fast"), progress=False)
    assert rel_err(edit_fast, edit_ref) < 1e-4


# ------------------------------------------------------------------------------------------------------ SDXL

@pytest.fixture(scope="module")
def xl_pipe():
    return nti.models.build_tiny_xl_pipeline(seed=0)


@pytest.mark.parametrize("optimize_pooled", [True, False])
def test_sdxl_batch_with_early_stop_equals_the_reference(xl_pipe, optimize_pooled):
    """tiny-xl (pooled null and time ids packed in the context), four prompts of different lengths in chunks of 3
    and 1, stopping after 1 or 3 iterations at step 1: the reference's counts, its embeddings to rounding, and the
    pooled row moved only when it is optimized."""
    config = NTIConfig(steps=3, inner_steps=3, early_stop_eps=1.8, optimize_pooled=optimize_pooled)
    ref = [nti.invert(xl_pipe, image, prompt, config, progress=False)[0] for image, prompt in zip(IMAGES, PROMPTS)]
    fast = nti.invert(xl_pipe, IMAGES, PROMPTS, config.replace(backend="fast", batch_size=3), progress=False)
    assert len({inv.iterations[1] for inv in ref}) == 2  # the stops differ within a step
    for f, r in zip(fast, ref):
        assert f.iterations == r.iterations and rel_err(f.z_T, r.z_T) < 1e-4
        assert rel_err(f.null_embeddings, r.null_embeddings) < 5e-4
        assert bool(f.null_embeddings[:, 77].any()) == optimize_pooled == bool(r.null_embeddings[:, 77].any())


# ------------------------------------------------------------------------------------------ what it cannot do

@pytest.mark.parametrize("switch, said", [
    (dict(channels_last=True), "channels_last only helps CUDA convolutions; ignored on this device"),
    (dict(cuda_graphs=True), "CUDA graphs need a CUDA device; running without them"),
    (dict(half_norms=True), "half_norms only applies to bf16/fp16; the fp32 UNet runs as it is"),
])
def test_a_switch_the_cpu_cannot_honour_is_said_and_changes_nothing(tiny_pipe, switch, said):
    """A speed switch that does not apply here warns by name, and the run is the plain fast path's, bit for bit."""
    config = BASE.replace(backend="fast", steps=2, inner_steps=2)
    plain = nti.invert(tiny_pipe, IMAGES[:2], PROMPTS[:2], config, progress=False)
    with pytest.warns(UserWarning, match=said):
        switched = nti.invert(tiny_pipe, IMAGES[:2], PROMPTS[:2], config.replace(**switch), progress=False)
    for a, b in zip(plain, switched):
        assert a.iterations == b.iterations and torch.equal(a.null_embeddings, b.null_embeddings)


def test_a_diverged_row_does_not_keep_the_compile_check_pending(tiny_pipe, monkeypatch):
    """The first compiled call of each kind is checked against eager; a diverged image (carried along in its batch)
    made every later call skip the check and try again, three UNet passes for one, for the rest of the run. The
    finite rows are compared instead."""
    runner = UNetRunner(tiny_pipe, BASE.replace(backend="fast"))
    runner.compiled = True
    monkeypatch.setattr(runner.prepared, "set_compiled", lambda *args, **kwargs: None)  # "compiled" = eager here
    monkeypatch.setattr(runner.prepared, "checked", set())
    z = torch.randn(2, *tiny_pipe.latent_shape)
    z[1] = float("nan")
    context = nti.api.null_embedding(tiny_pipe).expand(2, -1, -1)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            runner.eps(z, 981, context.clone().requires_grad_(grad))
    assert runner.prepared.checked == {("blocks", False), ("blocks", True)}
    assert runner.compiled_vs_eager(z, 981, context) == {"output": 0.0, "gradient": 0.0}
    z[0] = float("nan")
    assert runner.compiled_vs_eager(z, 981, context) is None  # nothing finite to compare


def test_compiled_bf16_in_padded_buckets_is_the_eager_bf16_run(monkeypatch):
    """--compile --compile-scope unet in bf16 (dynamo traces the autocast region; backend 'eager' as tests/test_fast.py,
    inductor's codegen takes minutes here): three images in padded buckets of 4, then 2 and 1 as they stop, give the
    eager bf16 run's iterations and embeddings bit for bit, with no fallback said or taken."""
    import warnings

    import nti.runner as runner
    monkeypatch.setattr(runner, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    pipe = nti.build_tiny_pipeline()
    config = STOPS.replace(backend="fast", batch_size=4, precision="bf16", inner_steps=3)
    eager = nti.invert(pipe, IMAGES[:3], PROMPTS[:3], config, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = nti.invert(pipe, IMAGES[:3], PROMPTS[:3], config.replace(compile=True, compile_scope="unet"),
                              progress=False)
    assert not caught
    prepared = pipe.fast_unets[("bf16", torch.bfloat16, False, False, False)]
    assert prepared.compile_failed is None and prepared.checked == {("unet", False), ("unet", True)}
    for a, b in zip(compiled, eager):
        assert a.iterations == b.iterations and torch.equal(a.null_embeddings, b.null_embeddings)
    assert len({inv.iterations[0] for inv in eager}) > 1

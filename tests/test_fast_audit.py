"""Audit of the batched fast path against the eager fp32 batch-1 reference: every combination a user can reach
(early stop, bucket padding, guidance, steps, methods, SDXL), and what it says when something goes wrong."""
import logging

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


@pytest.fixture
def nti_warnings():
    """The 'nti' logger's warnings during the test (the CLI's handler, once set up, keeps them from caplog)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("nti")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _said(records) -> str:
    return "\n".join(r.getMessage() for r in records)


def _poison_prompt(monkeypatch, pipe, prompt: str, t_bad: int, phase: str, precisions=("fp32",)):
    """NaN in the UNet's output for the rows conditioned on `prompt` at timestep t_bad: in DDIM inversion (its first
    cond call there) or in null-text optimization (every later one: the cached cond pass, and any fp32 redo of it)."""
    cond = encode_prompts(pipe, [prompt])
    real = UNetRunner.eps
    seen = {}

    def corrupted(self, z, t, context):
        out = real(self, z, t, context)
        hit = (context.float() == cond).flatten(1).all(1)
        if torch.is_grad_enabled() or int(t) != t_bad or not hit.any():
            return out
        seen[self.config.precision] = seen.get(self.config.precision, 0) + 1
        first = seen[self.config.precision] == 1
        if self.config.precision in precisions and first == (phase == "ddim"):
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
    _poison_prompt(monkeypatch, tiny_pipe, PROMPTS[3], schedule.timesteps[1], phase)
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

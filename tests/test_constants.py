"""The algorithm's constants against the official code's formulas, through the engine's public functions.

Fast-vs-reference agreement cannot catch a constant that both paths get wrong, so each constant here is compared
with the formula of google/prompt-to-prompt (ptp_utils.py, null_text_w_ptp.ipynb), restated in this file, at step
counts where the plausible wrong formulas give a different number.
"""
import pytest
import torch
import torch.nn.functional as F

import nti
from nti import NTIConfig
from nti.p2p import Layer, P2PController, make_plan

SOURCE, TARGET = "a cat sitting on a mat", "a dog sitting on a mat"


# ------------------------------------------------------------------------------ the official formulas, restated

def official_cross_alpha(num_steps: int, cross_replace_steps: float) -> list[int]:
    """ptp_utils.get_time_words_attention_alpha + update_alpha_time_word: a (num_steps + 1)-row table, rows
    [0, int(bounds * (num_steps + 1))) set to 1; AttentionControlEdit reads row cur_step."""
    rows = num_steps + 1
    end = int(cross_replace_steps * rows)
    return [1 if i < end else 0 for i in range(rows)][:num_steps]


def official_self_window(num_steps: int, self_replace_steps: float) -> list[int]:
    """AttentionControlEdit: num_self_replace = (int(num_steps * 0), int(num_steps * self_replace_steps)),
    replaced while num_self_replace[0] <= cur_step < num_self_replace[1]."""
    start, end = int(num_steps * 0.0), int(num_steps * self_replace_steps)
    return [1 if start <= i < end else 0 for i in range(num_steps)]


def official_blend_steps(num_steps: int, start_blend: float) -> list[int]:
    """LocalBlend.__call__ runs after each step: counter += 1, then blends if counter > int(start_blend * steps)."""
    start = int(start_blend * num_steps)
    return [1 if counter > start else 0 for counter in range(1, num_steps + 1)]


# ------------------------------------------------------------------------------------------- the controller

def qkv(b: int, queries: int, keys: int, seed: int = 0):
    """Random q, k, v for the editing batch [u_src, u_tgt, c_src, c_tgt] (each b rows), 2 heads of width 8:
    source and target rows differ, so taking the source's attention changes the target's output."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4 * b, 2, n, 8, generator=g) for n in (queries, keys, keys)]


def edited_steps(controller: P2PController, is_cross: bool, steps: int, queries: int, keys: int) -> list[int]:
    """1 at each step where the controller changes the conditional target rows' attention output."""
    q, k, v = qkv(controller.b, queries, keys)
    plain = F.scaled_dot_product_attention(q, k, v, scale=0.5)
    layer = Layer("probe", side=int(queries ** 0.5), place="down")
    out = []
    for i in range(steps):
        controller.step = i
        got = controller.attend(layer, is_cross, q, k, v, 0.5)
        torch.testing.assert_close(got[:3 * controller.b], plain[:3 * controller.b])  # other rows untouched
        out.append(int(not torch.allclose(got[3 * controller.b:], plain[3 * controller.b:], atol=1e-4)))
    return out


# 4, 9 and 49 steps: int(0.8 * (steps + 1)) = 4, 8, 40 where int(0.8 * steps) = 3, 7, 39; 10 and 50 steps: equal
@pytest.mark.parametrize("steps", [4, 9, 10, 49, 50])
@pytest.mark.parametrize("explicit", [True, False], ids=["reference", "fast"])
def test_cross_attention_window_is_the_official_one(tiny_pipe, steps, explicit):
    config = NTIConfig(edit="p2p-replace")
    plan = make_plan(tiny_pipe.tokenizer, SOURCE, TARGET, config)
    controller = P2PController([plan], config, steps, "cpu", explicit=explicit)
    want = official_cross_alpha(steps, config.cross_replace)
    assert edited_steps(controller, True, steps, queries=16, keys=77) == want
    assert sum(want) == int(0.8 * (steps + 1))


# 5 steps at 0.5: int(2.5) = 2 (a wrong int(0.5 * 6) = 3, round(2.5) = 2, ceil = 3); 9 steps: int(4.5) = 4
@pytest.mark.parametrize("steps", [5, 9])
@pytest.mark.parametrize("explicit", [True, False], ids=["reference", "fast"])
def test_self_attention_window_is_the_official_one(tiny_pipe, steps, explicit):
    config = NTIConfig(edit="p2p-replace")
    plan = make_plan(tiny_pipe.tokenizer, SOURCE, TARGET, config)
    controller = P2PController([plan], config, steps, "cpu", explicit=explicit)
    assert edited_steps(controller, False, steps, queries=16, keys=16) == official_self_window(steps, 0.5)
    # a layer with more queries than self_replace_max_tokens is never replaced
    small = P2PController([plan], config.replace(self_replace_max_tokens=8), steps, "cpu", explicit=explicit)
    assert edited_steps(small, False, steps, queries=16, keys=16) == [0] * steps


# 7 steps at 0.2: int(1.4) = 1, blending from the second step (counter 2 > 1); 12 steps: int(2.4) = 2
@pytest.mark.parametrize("steps", [7, 12])
def test_local_blend_starts_where_the_official_one_does(tiny_pipe, steps):
    config = NTIConfig(edit="p2p-replace", blend_words=("cat", "dog"))
    plan = make_plan(tiny_pipe.tokenizer, SOURCE, TARGET, config)
    controller = P2PController([plan], config, steps, "cpu", explicit=True)
    q, k, v = qkv(1, 16, 77, seed=1)
    controller.attend(Layer("probe", side=4, place="down", blend=True), True, q, k, v, 0.5)  # records the maps
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    blended = []
    for i in range(steps):
        controller.step = i
        out = controller.blend_latents(z)
        assert torch.equal(out[:1], z[:1])  # the source branch is never touched
        blended.append(int(not torch.equal(out[1:], z[1:])))
    assert blended == official_blend_steps(steps, config.blend_start)


# ------------------------------------------------------------------------------------- null-text optimization

@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_adam_learning_rate_decays_per_step_as_the_notebook(tiny_pipe, cat_image, backend):
    """Notebook: Adam(lr=1e-2 * (1 - i / 100)) at DDIM step i, the embedding carried over from step to step.

    With an epsilon no loss reaches, every step stops after its first Adam update, and a first Adam update moves
    every coordinate with a non-zero gradient by exactly lr (bias-corrected m / sqrt(v) = sign(g)): the largest move
    of step i is lr_i, up to Adam's eps 1e-8 against the largest |g| (measured: within 3.3e-4 relative, at step 3,
    both backends). A decay-free lr is 1%, 2%, 3% off at steps 1-3, a per-fraction decay (1 - i / steps) 25%.
    """
    config = NTIConfig(steps=4, inner_steps=10, early_stop_eps=1e9, backend=backend, batch_size=1)
    inv = nti.invert(tiny_pipe, cat_image, SOURCE, config, progress=False)[0]
    assert inv.iterations == [1, 1, 1, 1]
    start = torch.cat([nti.api.null_embedding(tiny_pipe).cpu(), inv.null_embeddings[:-1]])
    moves = [float((inv.null_embeddings[i] - start[i]).abs().max()) for i in range(4)]
    assert moves == pytest.approx([1e-2 * (1 - i / 100) for i in range(4)], rel=2e-3)

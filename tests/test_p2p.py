"""Prompt-to-prompt: token alignment on real tokenizer output, the SDPA forms of the attention edits, and edits on
the tiny model (reference and batched fast path)."""
import numpy as np
import pytest
import torch
from PIL import Image

import engine
from engine import NTIConfig, NTIError, p2p
from engine.cli import main as cli_main
from engine.models import build_word_tokenizer
from tests.conftest import rel_err

IMAGES = ["skimage:chelsea", "skimage:coffee"]
SOURCES = ["a cat sitting on a mat", "a cup of coffee on a table"]
TARGETS = ["a tiger sitting on a mat", "a cup of tea on a table"]
BASE = NTIConfig(steps=5, inner_steps=2)


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer()  # the tiny model's tokenizer: a real transformers CLIPTokenizer


@pytest.fixture(scope="module")
def invs(tiny_pipe):
    return engine.invert(tiny_pipe, IMAGES, SOURCES, BASE, progress=False)


# ------------------------------------------------------------------------------------------------ token alignment

def test_word_positions_come_from_the_tokenizer(tok):
    prompt = "a cat sitting on a mat."
    assert tok.tokenize(prompt) == ["a</w>", "cat</w>", "sitting</w>", "on</w>", "a</w>", "ma", "t</w>", ".</w>"]
    assert p2p.word_positions(tok, prompt, "cat") == [2]
    assert p2p.word_positions(tok, prompt, "a") == [1, 5]  # every occurrence
    assert p2p.word_positions(tok, prompt, "Mat") == [6, 7]  # two tokens; case and the full stop ignored
    assert p2p.word_positions(tok, prompt, "dog") == []


def test_replace_maps_word_to_word(tok):
    src, tgt = "a cat sitting on a mat", "a tiger sitting on a mat"
    mapper = p2p.replace_mapper(tok, src, tgt)
    # same token count everywhere: position i of the source feeds position i of the target, cat (2) -> tiger (2)
    assert torch.equal(mapper, torch.eye(77))
    assert tok.convert_ids_to_tokens(tok(tgt).input_ids)[2] == "tiger</w>"


def test_replace_spreads_a_word_over_more_tokens(tok):
    src, tgt = "a cat on a mat", "a zebra on a mat"  # 'zebra' is not in the tiny vocabulary: 4 byte-level tokens
    assert p2p.word_positions(tok, tgt, "zebra") == [2, 3, 4, 5]
    mapper = p2p.replace_mapper(tok, src, tgt)
    assert torch.allclose(mapper[2, 2:6], torch.full((4,), 0.25)) and float(mapper[2].sum()) == 1.0
    # the words after it shift by 3 positions: on 3 -> 6, mat (6, 7) -> (9, 10), end token 7 -> 8 -> 11
    assert mapper[3, 6] == mapper[6, 9] == mapper[7, 10] == mapper[8, 11] == 1
    assert mapper[9, 12] == 1 and mapper[73, 76] == 1  # padding to padding
    assert torch.equal(mapper[:70].sum(1), torch.ones(70))  # each source token's attention goes somewhere once


def test_replace_needs_the_same_word_count(tok):
    with pytest.raises(NTIError, match="one for one"):
        p2p.replace_mapper(tok, "a cat on a mat", "a red cat on a mat")


def test_refine_aligns_tokens_and_leaves_new_words_unmapped(tok):
    mapper, alpha = p2p.refine_mapper(tok, "a cat on a mat", "a red cat on a mat")
    source_of = {j: int(mapper[:, j].argmax()) for j in range(12) if alpha[j]}
    # start, a, [red], cat, on, a, ma, t, end, then padding to padding
    assert source_of == {0: 0, 1: 1, 3: 2, 4: 3, 5: 4, 6: 5, 7: 6, 8: 7, 9: 8, 10: 9, 11: 10}
    assert alpha[2] == 0 and float(mapper[:, 2].sum()) == 0  # 'red' keeps its own attention
    assert torch.equal(mapper.sum(0), alpha)
    same, same_alpha = p2p.refine_mapper(tok, "a cat on a mat", "a cat on a mat")
    assert torch.equal(same, torch.eye(77)) and bool(same_alpha.all())


def test_plan_reweight_and_blend_positions(tok):
    config = NTIConfig(edit="p2p-refine", reweight={"red": 2.0, "dog": 3.0}, blend_words=("cat",))
    plan = p2p.make_plan(tok, "a cat on a mat", "a red cat on a mat", config)
    assert plan.equalizer[2] == 2.0 and float(plan.equalizer.sum()) == 77 + 1  # 'dog' is in neither: no effect
    assert plan.blend_source.nonzero().flatten().tolist() == [2]
    assert plan.blend_target.nonzero().flatten().tolist() == [3]
    with pytest.raises(NTIError, match="none of the words 'dog'"):
        p2p.make_plan(tok, "a cat on a mat", "a red cat on a mat", NTIConfig(edit="p2p-reweight", reweight={"dog": 2}))
    with pytest.raises(NTIError, match="blend words"):
        p2p.make_plan(tok, "a cat", "a red cat", NTIConfig(edit="p2p-refine", blend_words=("dog",)))
    with pytest.raises(NTIError, match="p2p-reweight needs words"):
        NTIConfig(edit="p2p-reweight")
    with pytest.raises(NTIError, match="choose a p2p edit mode"):
        NTIConfig(reweight={"cat": 2.0})


# ---------------------------------------------------------------------------------------- attention in SDPA form

def test_folded_sdpa_edits_equal_the_explicit_maps(tok):
    """Refine + reweight on B=2 images: SDPA(Q_s, K_s, A V_t) + SDPA(Q_t, K_t, b V_t) = the official map edit."""
    config = NTIConfig(edit="p2p-reweight", reweight={"red": 2.0, "tea": 0.5})
    plans = [p2p.make_plan(tok, "a cat on a mat", "a red cat on a mat", config),
             p2p.make_plan(tok, "a cup of coffee", "a cup of tea", config)]
    torch.manual_seed(0)
    q, k, v = torch.randn(8, 2, 16, 4), torch.randn(8, 2, 77, 4), torch.randn(8, 2, 77, 4)
    layer = p2p.Layer("down_blocks.0.attentions.0.transformer_blocks.0.attn2", 4, "down")
    explicit = p2p.P2PController(plans, config, 10, "cpu", explicit=True).attend(layer, True, q, k, v, 0.5)
    folded = p2p.P2PController(plans, config, 10, "cpu", explicit=False).attend(layer, True, q, k, v, 0.5)
    torch.testing.assert_close(folded, explicit, rtol=1e-5, atol=1e-6)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.5)
    assert torch.equal(explicit[:6], plain[:6])  # only the conditional target rows change
    assert not torch.allclose(explicit[6:], plain[6:])
    # self-attention replace: the target's output is the source's map applied to the target's values
    out = p2p.P2PController(plans, config, 10, "cpu").attend(layer, False, q, q, v[:, :, :16], 0.5)
    maps = torch.softmax(q[4:6] @ q[4:6].transpose(-1, -2) * 0.5, dim=-1)
    torch.testing.assert_close(out[6:], maps @ v[6:, :, :16], rtol=1e-5, atol=1e-6)


def test_windows_follow_the_official_step_counts(tok):
    plan = p2p.make_plan(tok, "a cat", "a dog", NTIConfig(edit="p2p-replace"))
    c = p2p.P2PController([plan], NTIConfig(edit="p2p-replace"), 50, "cpu")
    assert (c.cross_steps, c.self_steps, c.blend_from) == (40, 25, 10)  # int(0.8 * 51), int(0.5 * 50), int(0.2 * 50)


# ---------------------------------------------------------------------------------------------- on the tiny model

def test_p2p_edit_changes_the_image_and_is_not_plain_regeneration(tiny_pipe, invs):
    config = BASE.replace(edit="p2p-replace")
    edited = engine.edit_latents(tiny_pipe, invs[:1], TARGETS[:1], config, progress=False)
    recon = engine.edit_latents(tiny_pipe, invs[:1], SOURCES[:1], BASE, progress=False)
    regen = engine.edit_latents(tiny_pipe, invs[:1], TARGETS[:1], BASE, progress=False)
    assert rel_err(edited, recon) > 0.05 and rel_err(edited, regen) > 0.01  # measured 0.31 and 0.06
    before = {k: type(v).__name__ for k, v in tiny_pipe.unet.attn_processors.items()}
    images = engine.edit(tiny_pipe, invs[:1], TARGETS[:1], config.replace(reweight={"tiger": 2.0}), progress=False)
    assert images[0].size == (32, 32)
    assert {k: type(v).__name__ for k, v in tiny_pipe.unet.attn_processors.items()} == before  # restored


@pytest.mark.parametrize("extra", [
    {"edit": "p2p-replace", "reweight": {"tiger": 2.0, "tea": 2.0}, "blend_words": ("cat", "tiger", "cup")},
    {"edit": "p2p-refine", "blend_words": ("cat", "cup")},
    {"edit": "p2p-reweight", "reweight": {"mat": 2.0, "table": 0.5}},
])
def test_fast_batch_equals_reference_one_at_a_time(tiny_pipe, invs, extra):
    targets = TARGETS if extra["edit"] == "p2p-replace" else (
        ["a red cat sitting on a mat", "a big cup of coffee on a table"] if extra["edit"] == "p2p-refine" else SOURCES)
    config = BASE.replace(**extra)
    ref = torch.cat([engine.edit_latents(tiny_pipe, [inv], [t], config, progress=False)
                     for inv, t in zip(invs, targets)])
    fast = engine.edit_latents(tiny_pipe, invs, targets, config.replace(backend="fast", batch_size=2), progress=False)
    assert rel_err(fast, ref) < 1e-4  # measured 3.5e-6 .. 4.6e-6 (explicit maps vs SDPA with folded values)
    assert rel_err(ref, engine.edit_latents(tiny_pipe, invs, SOURCES, BASE, progress=False)) > 1e-3


def test_local_blend_extremes(tiny_pipe, invs):
    config = BASE.replace(edit="p2p-replace", blend_words=("cat",), blend_start=0.0)
    plain = engine.edit_latents(tiny_pipe, invs[:1], TARGETS[:1], config.replace(blend_words=()), progress=False)
    # a threshold below every value: the mask covers everything, the edit is as without blending
    everywhere = engine.edit_latents(tiny_pipe, invs[:1], TARGETS[:1], config.replace(blend_threshold=-1.0),
                                     progress=False)
    assert rel_err(everywhere, plain) < 1e-5  # measured 1.8e-6: z_s + 1 * (z_t - z_s) rounds, then grows
    # above the max-normalized maximum: an empty mask resets the target to the source branch after every step
    nowhere = engine.edit_latents(tiny_pipe, invs[:1], TARGETS[:1], config.replace(blend_threshold=1.0),
                                  progress=False)
    recon = engine.edit_latents(tiny_pipe, invs[:1], SOURCES[:1], BASE, progress=False)
    assert rel_err(nowhere, recon) < 1e-4
    # the random model's attention is nearly uniform (normalized maps span 0.86..1), so only a high threshold
    # gives a partial mask here; it keeps part of the edit
    partial = engine.edit_latents(tiny_pipe, invs[:1], TARGETS[:1], config.replace(blend_threshold=0.94),
                                  progress=False)
    assert rel_err(partial, plain) > 1e-3 and rel_err(partial, recon) > 1e-3


def test_cli_edit_modes(tmp_path):
    out = tmp_path / "tiger.png"
    common = ["edit", "skimage:chelsea", "--prompt", "a cat sitting on a mat", "--steps", "3", "--method", "ddim",
              "--quiet", "--model", "tiny", "--out", str(out)]
    assert cli_main(common + ["--target", "a tiger sitting on a mat", "--edit", "p2p-replace", "--reweight",
                              "tiger=2", "--blend-word", "cat", "--blend-word", "tiger"]) == 0
    assert out.is_file() and np.asarray(Image.open(out)).shape == (32, 32, 3)
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage and one error line
        cli_main(common + ["--target", "a tiger", "--reweight", "tiger"])
    assert exit_info.value.code == 2
    assert cli_main(common + ["--target", "a big tiger sitting on a mat", "--edit", "p2p-replace"]) == 2

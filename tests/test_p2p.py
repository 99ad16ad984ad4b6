"""Prompt-to-prompt: token alignment on real tokenizer output, the SDPA forms of the attention edits, and edits on
the tiny model (reference and batched fast path)."""

import numpy as np
import pytest
import torch
from PIL import Image

import nti
from nti import NTIConfig, NTIError, p2p
from nti.cli import main as cli_main
from nti.models import build_word_tokenizer
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
    return nti.invert(tiny_pipe, IMAGES, SOURCES, BASE, progress=False)


# ------------------------------------------------------------------------------------------------ token alignment

def test_word_positions_come_from_the_tokenizer(tok):
    prompt = "a cat sitting on a mat."
    assert tok.tokenize(prompt) == ["a</w>", "cat</w>", "sitting</w>", "on</w>", "a</w>", "ma", "t</w>", ".</w>"]
    assert p2p.word_positions(tok, prompt, "cat") == [2]
    assert p2p.word_positions(tok, prompt, "a") == [1, 5]  # every occurrence
    assert p2p.word_positions(tok, prompt, "Mat") == [6, 7]  # two tokens; case and the full stop ignored
    assert p2p.word_positions(tok, prompt, "dog") == []


def sparse(size: int, entries, diagonal=range(0)) -> torch.Tensor:
    """(size, size) zeros with M[i, j] = value for each (i, j, value) and M[j, j] = 1 for j in `diagonal`."""
    m = torch.zeros(size, size)
    for i, j, value in entries:
        m[i, j] = value
    m[list(diagonal), list(diagonal)] = 1.0
    return m


def refinement(size: int, pairs, target_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official refinement mapper as (M, alpha): target token j takes source token i for each aligned (i, j);
    every position j from the target's length on takes source position j."""
    m, alpha = sparse(size, [(i, j, 1.0) for i, j in pairs], range(target_len, size)), torch.zeros(size)
    alpha[[j for _, j in pairs] + list(range(target_len, size))] = 1.0
    return m, alpha


@pytest.fixture(scope="module")
def shapes_tok():
    """The built-in shapes model's own tokenizer (16 positions, one token per word)."""
    from transformers import CLIPTokenizer
    from nti.models import SHAPES_FOLDER
    return CLIPTokenizer.from_pretrained(SHAPES_FOLDER, subfolder="tokenizer")


@pytest.fixture(scope="module")
def sd_tok():
    """SD v1.4's tokenizer: CLIP's BPE (49408 tokens), which the project builds offline (engine/assets/clip)."""
    from nti.models import build_clip_tokenizer
    tok = build_clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # SD v1.4's token ids
    return tok


def test_replace_equal_token_counts_is_the_identity(tok):
    src, tgt = "a cat sitting on a mat", "a tiger sitting on a mat"
    # same token count everywhere: position i of the source feeds position i of the target, cat (2) -> tiger (2)
    assert torch.equal(p2p.replace_mapper(tok, src, tgt), torch.eye(77))
    assert tok.convert_ids_to_tokens(tok(tgt).input_ids)[2] == "tiger</w>"


def test_replace_word_count_changes_as_the_official_mapper(tok):
    """The tiny vocabulary spells unknown words in byte-level pieces: 'zebra' is 4 tokens, 'mat' 2 ('ma', 't')."""
    assert p2p.word_positions(tok, "a zebra on a mat", "zebra") == [2, 3, 4, 5]
    # one token to four: cat's attention spread over them; after the last swapped word the official mapper goes
    # on with target j <- source j, so 'on' (6) takes source position 6 ('t' of 'mat'), not 'on' (3)
    expected = sparse(77, [(0, 0, 1), (1, 1, 1)] + [(2, j, 0.25) for j in (2, 3, 4, 5)], range(6, 77))
    assert torch.equal(p2p.replace_mapper(tok, "a cat on a mat", "a zebra on a mat"), expected)
    # four tokens to one: each gives cat its whole attention; then j <- j from 3, and the walk stops when the
    # source side reaches 77, so the last three target positions (74..76) take nothing
    expected = sparse(77, [(0, 0, 1), (1, 1, 1)] + [(i, 2, 1) for i in (2, 3, 4, 5)], range(3, 74))
    assert torch.equal(p2p.replace_mapper(tok, "a zebra on a mat", "a cat on a mat"), expected)
    # two swaps: until the last one, source i feeds target j (on 3 -> 6, a 4 -> 7); mat (5, 6) -> bed (8), both
    # source tokens whole; after it j <- j from the end token (9)
    expected = sparse(77, [(0, 0, 1), (1, 1, 1)] + [(2, j, 0.25) for j in (2, 3, 4, 5)]
                      + [(3, 6, 1), (4, 7, 1), (5, 8, 1), (6, 8, 1)], range(9, 77))
    assert torch.equal(p2p.replace_mapper(tok, "a cat on a mat", "a zebra on a bed"), expected)


def test_replace_multi_token_swaps_on_the_sd_vocabulary(sd_tok):
    # hippo, potam, us -> tyran, no, saurus: three tokens for three, one to one
    src, tgt = "a hippopotamus on a mat", "a tyrannosaurus on a mat"
    assert [p2p.word_positions(sd_tok, p, w) for p, w in ((src, "hippopotamus"), (tgt, "tyrannosaurus"))] == [
        [2, 3, 4], [2, 3, 4]]
    assert torch.equal(p2p.replace_mapper(sd_tok, src, tgt), torch.eye(77))
    # cat (2) -> hippo, potam, us (2, 3, 4); then j <- j: sitting (5) <- source 5 ('a'), end (9) <- source 9
    expected = sparse(77, [(0, 0, 1), (1, 1, 1)] + [(2, j, 1 / 3) for j in (2, 3, 4)], range(5, 77))
    assert torch.equal(p2p.replace_mapper(sd_tok, "a cat sitting on a mat", "a hippopotamus sitting on a mat"),
                       expected)
    # and back: all three give cat their whole attention; j <- j from 3 until the source side reaches 77
    expected = sparse(77, [(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 2, 1), (4, 2, 1)], range(3, 75))
    assert torch.equal(p2p.replace_mapper(sd_tok, "a hippopotamus sitting on a mat", "a cat sitting on a mat"),
                       expected)
    # then mat -> rug as well: sitting 3 -> 5, on 4 -> 6, a 5 -> 7, mat 6 -> rug 8, then j <- j from 9
    expected = sparse(77, [(0, 0, 1), (1, 1, 1)] + [(2, j, 1 / 3) for j in (2, 3, 4)]
                      + [(3, 5, 1), (4, 6, 1), (5, 7, 1), (6, 8, 1)], range(9, 77))
    assert torch.equal(p2p.replace_mapper(sd_tok, "a cat sitting on a mat", "a hippopotamus sitting on a rug"),
                       expected)


def test_replace_needs_the_same_word_count(tok):
    with pytest.raises(NTIError, match="one for one"):
        p2p.replace_mapper(tok, "a cat on a mat", "a red cat on a mat")


def test_refine_addition_as_the_official_mapper(tok, shapes_tok):
    mapper, alpha = p2p.refine_mapper(tok, "a cat on a mat", "a red cat on a mat")
    # start, a, [red], cat, on, a, ma, t, end (9 target tokens); then padding j <- j
    expected = refinement(77, [(0, 0), (1, 1), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8)], 9)
    assert torch.equal(mapper, expected[0]) and torch.equal(alpha, expected[1])
    assert alpha[2] == 0 and float(mapper[:, 2].sum()) == 0  # 'red' keeps its own attention
    same, same_alpha = p2p.refine_mapper(tok, "a cat on a mat", "a cat on a mat")
    assert torch.equal(same, torch.eye(77)) and bool(same_alpha.all())
    # issue 16's edit on the shapes model (16 positions): 'and a red circle' (4..7) is new; on a gray background
    # and the end token (4..8) move to 8..12; target padding 13..15 <- source 13..15 (the former rule took 9..11)
    mapper, alpha = p2p.refine_mapper(shapes_tok, "a yellow triangle on a gray background",
                                      "a yellow triangle and a red circle on a gray background")
    expected = refinement(16, [(0, 0), (1, 1), (2, 2), (3, 3), (4, 8), (5, 9), (6, 10), (7, 11), (8, 12)], 13)
    assert torch.equal(mapper, expected[0]) and torch.equal(alpha, expected[1])


def test_refine_removal_as_the_official_mapper(shapes_tok):
    # 13 source tokens, 9 target tokens: the target's first 'a' (1) pairs with the source's first 'a' (walking back
    # from the ends, the official traceback drops a source token before it takes a tied match), so 'red circle and
    # a' (2..5) is dropped. Target padding 9..15 <- source 9..15: its last words 'a gray background', its end token
    # (9..12), then padding
    mapper, alpha = p2p.refine_mapper(shapes_tok, "a red circle and a blue square on a gray background",
                                      "a blue square on a gray background")
    expected = refinement(16, [(0, 0), (1, 1), (6, 2), (7, 3), (8, 4), (9, 5), (10, 6), (11, 7), (12, 8)], 9)
    assert torch.equal(mapper, expected[0]) and torch.equal(alpha, expected[1])
    assert bool(alpha.all())  # nothing new in a removal


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
    edited = nti.edit_latents(tiny_pipe, invs[:1], TARGETS[:1], config, progress=False)
    recon = nti.edit_latents(tiny_pipe, invs[:1], SOURCES[:1], BASE, progress=False)
    regen = nti.edit_latents(tiny_pipe, invs[:1], TARGETS[:1], BASE, progress=False)
    assert rel_err(edited, recon) > 0.05 and rel_err(edited, regen) > 0.01  # measured 0.31 and 0.06
    before = {k: type(v).__name__ for k, v in tiny_pipe.unet.attn_processors.items()}
    images = nti.edit(tiny_pipe, invs[:1], TARGETS[:1], config.replace(reweight={"tiger": 2.0}), progress=False)
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
    ref = torch.cat([nti.edit_latents(tiny_pipe, [inv], [t], config, progress=False)
                     for inv, t in zip(invs, targets)])
    fast = nti.edit_latents(tiny_pipe, invs, targets, config.replace(backend="fast", batch_size=2), progress=False)
    assert rel_err(fast, ref) < 1e-4  # measured 3.5e-6 .. 4.6e-6 (explicit maps vs SDPA with folded values)
    assert rel_err(ref, nti.edit_latents(tiny_pipe, invs, SOURCES, BASE, progress=False)) > 1e-3


def test_local_blend_extremes(tiny_pipe, invs):
    config = BASE.replace(edit="p2p-replace", blend_words=("cat",), blend_start=0.0)
    plain = nti.edit_latents(tiny_pipe, invs[:1], TARGETS[:1], config.replace(blend_words=()), progress=False)
    # a threshold below every value: the mask covers everything, the edit is as without blending
    everywhere = nti.edit_latents(tiny_pipe, invs[:1], TARGETS[:1], config.replace(blend_threshold=-1.0),
                                     progress=False)
    assert rel_err(everywhere, plain) < 1e-5  # measured 1.8e-6: z_s + 1 * (z_t - z_s) rounds, then grows
    # above the max-normalized maximum: an empty mask resets the target to the source branch after every step
    nowhere = nti.edit_latents(tiny_pipe, invs[:1], TARGETS[:1], config.replace(blend_threshold=1.0),
                                  progress=False)
    recon = nti.edit_latents(tiny_pipe, invs[:1], SOURCES[:1], BASE, progress=False)
    assert rel_err(nowhere, recon) < 1e-4
    # the random model's attention is nearly uniform (normalized maps span 0.86..1), so only a high threshold
    # gives a partial mask here; it keeps part of the edit
    partial = nti.edit_latents(tiny_pipe, invs[:1], TARGETS[:1], config.replace(blend_threshold=0.94),
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

"""Audit of prompt-to-prompt (engine/p2p.py) against the official google/prompt-to-prompt code.

Each official formula is re-implemented here in plain torch, independently of engine/p2p.py, as the official code
computes it (seq_aligner.get_replacement_mapper_ / get_refinement_mapper, ptp_utils.get_word_inds, the notebooks'
get_equalizer, AttentionControlEdit.forward with AttentionReplace / AttentionRefine / AttentionReweight,
AttentionStore and LocalBlend), and compared with the project's outputs on tiny explicit attention maps."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nti import NTIConfig, NTIError, p2p
from nti.cli import main as cli_main

N = 77  # SD v1.x token positions


@pytest.fixture(scope="module")
def sd_tok():
    from nti.models import build_clip_tokenizer
    return build_clip_tokenizer()


# ------------------------------------------------------------------ the official token bookkeeping, re-implemented

def official_word_inds(tok, text: str, word) -> list[int]:
    """ptp_utils.get_word_inds: words split on single spaces, matched exactly (str) or by index (int); token i
    belongs to the word whose decoded length it completes."""
    split = text.split(" ")
    places = [i for i, w in enumerate(split) if w == word] if isinstance(word, str) else [word]
    out = []
    if places:
        decoded = [tok.decode([t]).strip("#") for t in tok.encode(text)][1:-1]
        length, ptr = 0, 0
        for i, piece in enumerate(decoded):
            length += len(piece)
            if ptr in places:
                out.append(i + 1)
            if length >= len(split[ptr]):
                ptr, length = ptr + 1, 0
    return out


def official_replacement(tok, x: str, y: str) -> torch.Tensor:
    """seq_aligner.get_replacement_mapper_ for one pair."""
    wx, wy = x.split(" "), y.split(" ")
    changed = [i for i in range(len(wy)) if wy[i] != wx[i]]
    src = [official_word_inds(tok, x, i) for i in changed]
    tgt = [official_word_inds(tok, y, i) for i in changed]
    m = np.zeros((N, N))
    i = j = cur = 0
    while i < N and j < N:
        if cur < len(src) and src[cur][0] == i:
            if len(src[cur]) == len(tgt[cur]):
                m[src[cur], tgt[cur]] = 1
            else:
                for t in tgt[cur]:
                    m[src[cur], t] = 1 / len(tgt[cur])
            i, j, cur = i + len(src[cur]), j + len(tgt[cur]), cur + 1
        elif cur < len(src):
            m[i, j] = 1
            i, j = i + 1, j + 1
        else:
            m[j, j] = 1
            i, j = i + 1, j + 1
    return torch.from_numpy(m).float()


def official_refinement(tok, x: str, y: str) -> tuple[torch.Tensor, torch.Tensor]:
    """seq_aligner.get_refinement_mapper for one pair, in its own form: an index vector (target j reads source
    mapper[j]) and alphas; global alignment with gap 0, match 1, mismatch -1, traceback preferring left, up, diag."""
    xs, ys = tok.encode(x), tok.encode(y)
    score = np.zeros((len(xs) + 1, len(ys) + 1))
    trace = np.zeros((len(xs) + 1, len(ys) + 1))
    trace[0, 1:], trace[1:, 0], trace[0, 0] = 1, 2, 4
    for i in range(1, len(xs) + 1):
        for j in range(1, len(ys) + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            diag = score[i - 1, j - 1] + (1 if xs[i - 1] == ys[j - 1] else -1)
            score[i, j] = max(left, up, diag)
            trace[i, j] = 1 if score[i, j] == left else 2 if score[i, j] == up else 3
    pairs, i, j = [], len(xs), len(ys)
    while i > 0 or j > 0:
        if trace[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif trace[i, j] == 1:
            j -= 1
            pairs.append((j, -1))
        elif trace[i, j] == 2:
            i -= 1
        else:
            break
    base = torch.tensor(pairs[::-1])
    alphas = torch.ones(N)
    alphas[:len(base)] = base[:, 1].ne(-1).float()
    mapper = torch.zeros(N, dtype=torch.int64)
    mapper[:len(base)] = base[:, 1]
    mapper[len(base):] = len(ys) + torch.arange(N - len(ys))
    return mapper, alphas


def official_equalizer(tok, text: str, words, values) -> torch.Tensor:
    eq = torch.ones(N)
    for word, value in zip(words, values):
        eq[official_word_inds(tok, text, word)] = value
    return eq


def as_matrix(index: torch.Tensor) -> torch.Tensor:
    """The official refinement index vector as our (source i, target j) matrix; -1 (new words) reads position 76
    there, with alpha 0: no share."""
    m = torch.zeros(N, N)
    m[index % N, torch.arange(N)] = 1.0
    return m


# ------------------------------------------------------------------------------------------------------ mappers

REPLACE_PAIRS = [
    ("a cat sitting on a mat", "a tiger sitting on a mat"),
    ("a cat sitting on a mat", "a hippopotamus sitting on a mat"),  # 1 -> 3 tokens
    ("a hippopotamus sitting on a mat", "a cat sitting on a rug"),  # 3 -> 1, then a second swap
    ("a cat, sitting on a mat.", "a dog, sitting on a rug."),  # punctuation inside the swapped words
    ("a photo of a cat", "a sketch of a hippopotamus"),
]
REFINE_PAIRS = [
    ("a cat sitting on a mat", "a red cat sitting on a mat"),
    ("a cat sitting on a mat", "a hippopotamus wearing a hat sitting on a mat"),
    ("a cat, sitting on a mat.", "a fluffy cat, sitting on a mat."),
    ("a big red cat sitting on a mat", "a cat on a mat"),  # removal
    ("a cat and a dog", "a dog and a cat"),
]


@pytest.mark.parametrize("source, target", REPLACE_PAIRS)
def test_replace_mapper_as_official(sd_tok, source, target):
    assert torch.equal(p2p.replace_mapper(sd_tok, source, target), official_replacement(sd_tok, source, target))


@pytest.mark.parametrize("source, target", REFINE_PAIRS)
def test_refine_mapper_as_official(sd_tok, source, target):
    index, alphas = official_refinement(sd_tok, source, target)
    mapper, alpha = p2p.refine_mapper(sd_tok, source, target)
    assert torch.equal(alpha, alphas)
    assert torch.equal(mapper * alpha, as_matrix(index) * alphas)  # where alpha is 0 neither reads anything


def test_words_past_truncation_lose_their_positions():
    from transformers import CLIPTokenizer
    from nti.models import SHAPES_FOLDER
    tok = CLIPTokenizer.from_pretrained(SHAPES_FOLDER, subfolder="tokenizer")  # 16 positions
    words = " ".join(["a"] * 13)
    src, tgt = words + " red circle on gray", words + " blue circle on gray"  # 'red'/'blue' at 14, the rest cut
    m = p2p.replace_mapper(tok, src, tgt)
    assert m.shape == (16, 16) and m[14, 14] == 1.0
    assert p2p.word_positions(tok, tgt, "circle") == [] and p2p.word_positions(tok, tgt, "blue") == [14]


def test_word_positions_skip_punctuation_before_the_word(sd_tok):
    """ptp_utils.get_word_inds takes a word's own tokens; the project ignores surrounding punctuation, which must
    mean the word's tokens, not the quote or bracket in front of it (before: '"cat"' gave the quote's position)."""
    for prompt in ['a "cat" on a mat', "a (cat) on a mat", "a ...cat on a mat"]:
        tokens = sd_tok.tokenize(prompt)
        positions = p2p.word_positions(sd_tok, prompt, "cat")
        assert [tokens[p - 1] for p in positions] == ["cat</w>"], prompt
    plan = p2p.make_plan(sd_tok, 'a "cat" on a mat', 'a "tiger" on a mat',
                         NTIConfig(edit="p2p-replace", reweight={"tiger": 2.0}, blend_words=("cat", "tiger")))
    assert plan.equalizer.nonzero().numel() == N and plan.equalizer[3] == 2.0 and float(plan.equalizer.sum()) == N + 1
    assert plan.blend_source.nonzero().flatten().tolist() == [3] == plan.blend_target.nonzero().flatten().tolist()


def test_a_single_quoted_word_cut_like_a_contraction_takes_all_its_letter_tokens(sd_tok):
    """CLIP reads "'tiger'" as "'t", "iger", "'" (its pattern takes 't as a contraction): the word's attention sits
    on both letter tokens. Before, the lookup fell back to the first token only ("'t"), so reweighting 'tiger'
    scaled a third of the word and the blend mask missed most of it."""
    prompt = "a 'tiger' on a mat"
    tokens = sd_tok.tokenize(prompt)
    assert [tokens[p - 1] for p in p2p.word_positions(sd_tok, prompt, "tiger")] == ["'t</w>", "iger</w>"]
    tokens = sd_tok.tokenize("a 'cat' on a mat")
    assert [tokens[p - 1] for p in p2p.word_positions(sd_tok, "a 'cat' on a mat", "cat")] == ["cat</w>"]


def test_equalizer_as_official(sd_tok):
    target = "a red cat sitting on a red mat"
    config = NTIConfig(edit="p2p-reweight", reweight={"red": 2.0, "mat": 0.5, "hippopotamus": 3.0})
    plan = p2p.make_plan(sd_tok, "a cat sitting on a mat", target, config)
    assert torch.equal(plan.equalizer, official_equalizer(sd_tok, target, ["red", "mat", "hippopotamus"],
                                                          [2.0, 0.5, 3.0]))


# -------------------------------------------------------------------------------------- the controllers' edits

def official_alpha_words(cross_replace: float, steps: int) -> torch.Tensor:
    """ptp_utils.get_time_words_attention_alpha for a float (start 0, end cross_replace): (steps + 1,) 0/1."""
    alpha = torch.zeros(steps + 1)
    alpha[:int(cross_replace * (steps + 1))] = 1.0
    return alpha


def official_time_words_alpha(tok, target: str, cross: dict, steps: int) -> torch.Tensor:
    """ptp_utils.get_time_words_attention_alpha for one target prompt and a dict of end fractions ('default_' for
    every token, then each word's tokens in the target, by get_word_inds): (steps + 1, 77) 0/1."""
    alpha = torch.zeros(steps + 1, N)
    alpha[:int(cross["default_"] * (steps + 1))] = 1.0
    for word, end in cross.items():
        inds = official_word_inds(tok, target, word) if word != "default_" else []
        if inds:
            alpha[:, inds] = 0.0
            alpha[:int(end * (steps + 1)), inds] = 1.0
    return alpha


def official_cross(p_src, p_tgt, kind: str, official, eq, alpha_word):
    """AttentionControlEdit.forward for cross-attention of one target: replace_cross_attention (replace: einsum
    with the mapper; refine: gather + alphas; reweight: its previous controller's result times the equalizer),
    then the per-step word alpha against the target's own map."""
    if kind == "replace":
        new = torch.einsum("hpw,wn->hpn", p_src, official)
    else:
        index, alphas = official
        new = p_src[:, :, index] * alphas + p_tgt * (1 - alphas)
    if eq is not None:
        new = new * eq
    return new * alpha_word + (1 - alpha_word) * p_tgt


def softmax_maps(q, k, scale):
    return torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)


CASES = [  # (edit, target, reweight)
    ("p2p-replace", "a hippopotamus sitting on a mat", {}),
    ("p2p-replace", "a hippopotamus sitting on a mat", {"hippopotamus": 2.0, "mat": 0.5}),
    ("p2p-refine", "a red cat sitting on a big mat", {}),
    ("p2p-reweight", "a red cat sitting on a big mat", {"red": 3.0, "cat": 0.5, "big": 0.0}),
]
SOURCE = "a cat sitting on a mat"


def official_for(tok, edit, target, reweight):
    kind = "replace" if edit == "p2p-replace" else "refine"
    official = (official_replacement(tok, SOURCE, target) if kind == "replace"
                else official_refinement(tok, SOURCE, target))
    eq = official_equalizer(tok, target, list(reweight), list(reweight.values())) if reweight else None
    return kind, official, eq


@pytest.mark.parametrize("edit, target, reweight", CASES)
def test_cross_attention_edit_as_official_over_the_steps(sd_tok, edit, target, reweight):
    steps, cross = 10, 0.5  # edited steps: i < int(0.5 * 11) = 5
    config = NTIConfig(edit=edit, reweight=reweight, cross_replace=cross)
    plan = p2p.make_plan(sd_tok, SOURCE, target, config)
    kind, official, eq = official_for(sd_tok, edit, target, reweight)
    alpha_words = official_alpha_words(cross, steps)
    torch.manual_seed(1)
    q, k, v = torch.randn(4, 2, 16, 8), torch.randn(4, 2, N, 8), torch.randn(4, 2, N, 8)
    layer = p2p.Layer("up_blocks.1.attentions.0.transformer_blocks.0.attn2", 4, "up")
    plain = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    for step in (0, 4, 5, 9):
        p_new = official_cross(softmax_maps(q[2], k[2], 0.3), softmax_maps(q[3], k[3], 0.3), kind, official, eq,
                               alpha_words[step])
        for explicit in (True, False):
            c = p2p.P2PController([plan], config, steps, "cpu", explicit=explicit)
            c.step = step
            out = c.attend(layer, True, q, k, v, 0.3)
            assert torch.equal(out[:3], plain[:3])  # unconditional rows and the source untouched
            torch.testing.assert_close(out[3], p_new @ v[3], rtol=1e-5, atol=1e-5)


WORD_CASES = [  # (edit, target, reweight, per-word cross-replace ends beside 'default_')
    ("p2p-replace", "a hippopotamus sitting on a mat", {}, {"hippopotamus": 0.9, "mat": 0.2}),
    ("p2p-replace", "a hippopotamus sitting on a mat", {"hippopotamus": 2.0}, {"hippopotamus": 0.0}),
    ("p2p-refine", "a red cat sitting on a big mat", {}, {"red": 1.0, "cat": 0.1}),
    ("p2p-reweight", "a red cat sitting on a big mat", {"red": 3.0, "big": 0.0}, {"big": 0.8, "mat": 0.3}),
]


@pytest.mark.parametrize("edit, target, reweight, words", WORD_CASES)
def test_per_word_cross_replace_as_official_over_the_steps(sd_tok, edit, target, reweight, words):
    """The notebooks' cross_replace_steps dict ({'default_': 0.5, word: end, ...}): each word's tokens of the
    target take the source's map for their own window, every other token for the default's; steps past the default
    where a word still is edited, and words whose window ends first, both as get_time_words_attention_alpha."""
    steps = 10
    cross = {"default_": 0.5, **words}
    config = NTIConfig(edit=edit, reweight=reweight, cross_replace=cross)
    assert config.cross_replace == 0.5 and dict(config.cross_replace_words) == words
    assert NTIConfig(edit=edit, reweight=reweight, cross_replace=0.5, cross_replace_words=words) == config
    plan = p2p.make_plan(sd_tok, SOURCE, target, config)
    kind, official, eq = official_for(sd_tok, edit, target, reweight)
    alpha_words = official_time_words_alpha(sd_tok, target, cross, steps)
    torch.manual_seed(2)
    q, k, v = torch.randn(4, 2, 16, 8), torch.randn(4, 2, N, 8), torch.randn(4, 2, N, 8)
    layer = p2p.Layer("up_blocks.1.attentions.0.transformer_blocks.0.attn2", 4, "up")
    plain = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    controllers = [p2p.P2PController([plan], config, steps, "cpu", explicit=e) for e in (True, False)]
    for step in range(steps):
        p_new = official_cross(softmax_maps(q[2], k[2], 0.3), softmax_maps(q[3], k[3], 0.3), kind, official, eq,
                               alpha_words[step])
        for c in controllers:
            c.step = step
            out = c.attend(layer, True, q, k, v, 0.3)
            assert torch.equal(out[:3], plain[:3])
            torch.testing.assert_close(out[3], p_new @ v[3], rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert alpha_words[5:].any() or max(words.values()) < 0.6  # a word's window past the default's was exercised


def test_cross_replace_words_missing_from_every_target_are_refused(sd_tok):
    config = NTIConfig(edit="p2p-replace", cross_replace_words={"zebra": 0.3})
    with pytest.raises(NTIError, match="cross-replace words: none of 'zebra'"):
        p2p.make_plan(sd_tok, SOURCE, "a tiger sitting on a mat", config)
    with pytest.raises(NTIError, match="p2p edit mode"):
        NTIConfig(cross_replace_words={"tiger": 0.3})
    with pytest.raises(NTIError, match="fraction of 'tiger'"):
        NTIConfig(edit="p2p-replace", cross_replace_words={"tiger": 1.5})


def test_self_attention_replace_as_official():
    """AttentionControlEdit.replace_self_attention: the target takes the source's map for steps
    int(0 * steps) <= i < int(self_replace * steps), in layers of at most 32 ** 2 queries (NTI notebook)."""
    steps = 10
    config = NTIConfig(edit="p2p-refine", self_replace=0.45)  # int(4.5) = 4 steps
    plan = p2p.EditPlan(torch.eye(N), torch.ones(N), torch.ones(N), torch.zeros(N), torch.zeros(N))
    torch.manual_seed(2)
    layer = p2p.Layer("up_blocks.3.attentions.0.transformer_blocks.0.attn1", 8, "up")
    for queries in (16, 1024, 1025):
        q, k, v = torch.randn(4, 1, queries, 4), torch.randn(4, 1, queries, 4), torch.randn(4, 1, queries, 4)
        plain = F.scaled_dot_product_attention(q, k, v)
        for step in (0, 3, 4, 9):
            c = p2p.P2PController([plan], config, steps, "cpu")
            c.step = step
            out = c.attend(layer, False, q, k, v, q.shape[-1] ** -0.5)
            assert torch.equal(out[:3], plain[:3])
            replaced = step < int(0.45 * steps) and queries <= 32 ** 2
            want = softmax_maps(q[2], k[2], 0.5) @ v[3] if replaced else plain[3]
            torch.testing.assert_close(out[3], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ attention store and local blend

def official_local_blend(x_t, store, alpha_layers, th, counter, start_blend):
    """LocalBlend.__call__ (NTI notebook) for one image: x_t (2, 4, h, w) = [source, target]; store: the summed
    edited maps of the blend layers, each (2, heads, 16, 77) -> (2, heads, 1, 4, 4, 77) as the notebook reshapes
    its 16x16 maps; alpha_layers (2, 77)."""
    if counter <= start_blend:
        return x_t
    maps = torch.cat([m.reshape(2, -1, 1, 4, 4, N) for m in store], dim=1)
    maps = (maps * alpha_layers[:, None, None, None, None, :]).sum(-1).mean(1)
    maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
    mask = F.interpolate(maps, size=x_t.shape[2:])
    mask = mask / mask.max(2, keepdim=True)[0].max(3, keepdim=True)[0]
    mask = mask.gt(th)
    mask = (mask[:1] + mask).float()
    return x_t[:1] + mask * (x_t - x_t[:1])


@pytest.mark.parametrize("edit, target, reweight", [
    ("p2p-replace", "a tiger sitting on a mat", {}),
    ("p2p-reweight", "a red tiger sitting on a mat", {"tiger": 3.0, "red": 0.5}),
])
def test_local_blend_as_official_on_the_stored_edited_maps(sd_tok, edit, target, reweight):
    """Maps are stored after the edit (the official store holds the edited tensor: AttentionControlEdit.forward
    writes attn[1:] in place after AttentionStore.forward appended it), summed over steps from step 0, pooled and
    thresholded per image; blending starts once counter > int(start_blend * steps)."""
    steps = 6
    config = NTIConfig(edit=edit, reweight=reweight, cross_replace=0.5, blend_words=("cat", "tiger"),
                       blend_start=0.4, blend_threshold=0.45)
    plan = p2p.make_plan(sd_tok, SOURCE, target, config)
    kind, official, eq = official_for(sd_tok, edit, target, reweight)
    alpha_layers = torch.zeros(2, N)
    alpha_layers[0, official_word_inds(sd_tok, SOURCE, "cat")] = 1
    alpha_layers[1, official_word_inds(sd_tok, target, "tiger")] = 1
    alpha_words = official_alpha_words(0.5, steps)
    blend_layers = [p2p.Layer(f"up_blocks.1.attentions.{n}.transformer_blocks.0.attn2", 4, "up", blend=True)
                    for n in range(2)]
    other = p2p.Layer("up_blocks.2.attentions.0.transformer_blocks.0.attn2", 8, "up")
    torch.manual_seed(3)
    for explicit in (True, False):
        c = p2p.P2PController([plan], config, steps, "cpu", explicit=explicit)
        gen = torch.Generator().manual_seed(4)
        z = ours = torch.randn(2, 4, 8, 8, generator=gen)
        store = None
        for step in range(steps):
            c.step = step
            step_maps = []
            for layer in blend_layers:
                q = torch.randn(4, 2, 16, 8, generator=gen) * 3
                k, v = torch.randn(4, 2, N, 8, generator=gen), torch.randn(4, 2, N, 8, generator=gen)
                c.attend(layer, True, q, k, v, 0.35)
                p_src, p_tgt = softmax_maps(q[2], k[2], 0.35), softmax_maps(q[3], k[3], 0.35)
                step_maps.append(torch.stack([p_src, official_cross(p_src, p_tgt, kind, official, eq,
                                                                    alpha_words[step])]))
            c.attend(other, True, torch.randn(4, 2, 64, 8, generator=gen), k, v, 0.35)  # not a blend layer
            store = step_maps if store is None else [a + b for a, b in zip(store, step_maps)]
            z = z + torch.randn(2, 4, 8, 8, generator=gen)  # a stand-in for the DDIM step
            want = official_local_blend(z, store, alpha_layers, 0.45, step + 1, int(0.4 * steps))
            ours = c.blend_latents(z)
            torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)
            z = want
        assert not torch.equal(z[1], ours[0])  # the mask kept part of the edit (a real test of the blend)


def test_local_blend_batched_per_image(sd_tok):
    """B = 2 images in one controller: each image blends with its own source and its own maps."""
    config = NTIConfig(edit="p2p-refine", reweight={"red": 2.0, "big": 0.5}, blend_words=("cat", "dog"), blend_start=0.0,
                       blend_threshold=0.5)
    plans = [p2p.make_plan(sd_tok, SOURCE, "a red cat sitting on a mat", config),
             p2p.make_plan(sd_tok, "a dog on a rug", "a big dog on a rug", config)]
    layer = p2p.Layer("up_blocks.1.attentions.0.transformer_blocks.0.attn2", 4, "up", blend=True)
    torch.manual_seed(5)
    q, k, v = torch.randn(8, 2, 16, 8) * 3, torch.randn(8, 2, N, 8), torch.randn(8, 2, N, 8)
    z = torch.randn(4, 4, 8, 8)  # [source 0, source 1, target 0, target 1]
    both = p2p.P2PController(plans, config, 4, "cpu", explicit=False)
    both.attend(layer, True, q, k, v, 0.35)
    batched = both.blend_latents(z)
    for n, plan in enumerate(plans):
        rows = [n, 2 + n, 4 + n, 6 + n]
        one = p2p.P2PController([plan], config, 4, "cpu")
        one.attend(layer, True, q[rows], k[rows], v[rows], 0.35)
        torch.testing.assert_close(batched[[n, 2 + n]], one.blend_latents(z[[n, 2 + n]]), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------- folded SDPA vs explicit

@pytest.mark.parametrize("extra", [
    {"edit": "p2p-replace"},
    {"edit": "p2p-replace", "reweight": {"tiger": 2.0, "cup": 0.0}, "blend_words": ("cat", "tiger", "cup")},
    {"edit": "p2p-refine"},
    {"edit": "p2p-refine", "reweight": {"red": 3.0, "tea": 0.5}, "blend_words": ("cat", "cup")},
    {"edit": "p2p-reweight", "reweight": {"red": 0.0, "table": 2.0}, "blend_words": ("cat", "tea")},
])
def test_fast_equals_explicit_for_every_mode(sd_tok, extra):
    config = NTIConfig(**extra, cross_replace=0.4, self_replace=0.3)
    replace = extra["edit"] == "p2p-replace"
    pairs = [(SOURCE, "a tiger sitting on a mat" if replace else "a red cat sitting on a mat"),
             ("a cup of coffee on a table", "a cup of tea on a table" if replace else "a red cup of tea on a table")]
    plans = [p2p.make_plan(sd_tok, s, t, config) for s, t in pairs]
    torch.manual_seed(6)
    cross = [p2p.Layer("up_blocks.1.attentions.0.transformer_blocks.0.attn2", 4, "up", blend=True),
             p2p.Layer("down_blocks.1.attentions.0.transformer_blocks.0.attn2", 8, "down")]
    self_layer = p2p.Layer("down_blocks.1.attentions.0.transformer_blocks.0.attn1", 8, "down")
    ref, fast = (p2p.P2PController(plans, config, 10, "cpu", explicit=e) for e in (True, False))
    for step in range(10):
        ref.step = fast.step = step
        for layer in cross:
            q = torch.randn(8, 2, layer.side ** 2, 8) * 2
            k, v = torch.randn(8, 2, N, 8), torch.randn(8, 2, N, 8)
            torch.testing.assert_close(fast.attend(layer, True, q, k, v, 0.35), ref.attend(layer, True, q, k, v, 0.35),
                                       rtol=1e-5, atol=1e-5)
        q = torch.randn(8, 2, 64, 8)
        torch.testing.assert_close(fast.attend(self_layer, False, q, q, q, 0.35),
                                   ref.attend(self_layer, False, q, q, q, 0.35), rtol=1e-5, atol=1e-5)
        z = torch.randn(4, 4, 8, 8)
        torch.testing.assert_close(fast.blend_latents(z), ref.blend_latents(z), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ bad settings

@pytest.mark.parametrize("value", [(0.2, 0.8), {"tiger": 0.4}, {"default_": 0.8, "tiger": (0.2, 0.4)},
                                   {"default_": (0.2, 0.8)}, 1.5, float("nan")])
def test_cross_replace_forms_the_project_does_not_take_are_refused(value):
    """The official get_time_words_attention_alpha also takes (start, end) pairs; the project takes end fractions
    only (one, or the notebooks' per-word dict with its 'default_') and refuses the rest by name, rather than
    misreading them."""
    with pytest.raises(NTIError, match="cross_replace"):
        NTIConfig(edit="p2p-replace", cross_replace=value)


def test_cli_refuses_bad_p2p_settings_with_exit_2(tmp_path, capsys):
    common = ["edit", "skimage:chelsea", "--prompt", "a cat sitting on a mat", "--steps", "2", "--method", "ddim",
              "--quiet", "--model", "tiny", "--out", str(tmp_path / "x.png")]
    for extra in (["--target", "a tiger sitting on a mat", "--edit", "p2p-replace", "--cross-replace", "1.5"],
                  ["--target", "a tiger sitting on a mat", "--blend-word", "cat"],  # regenerate has no attention
                  ["--target", "a red cat sitting on a mat", "--edit", "p2p-reweight"],  # no words to reweight
                  ["--target", "a red cat sitting on a mat", "--edit", "p2p-refine", "--blend-word", "dog"],
                  ["--target", "a tiger sitting on a mat", "--edit", "p2p-replace", "--cross-replace-word", "tiger"],
                  ["--target", "a tiger sitting on a mat", "--edit", "p2p-replace", "--cross-replace-word", "dog=0.3"],
                  ["--target", "a tiger sitting on a mat", "--cross-replace-word", "tiger=0.3"]):
        try:
            code = cli_main(common + extra)
        except SystemExit as exit_info:
            code = exit_info.code
        assert code == 2, extra
        assert "error" in capsys.readouterr().err
    # the flag as the config's field: per-word windows beside --cross-replace
    ok = ["--target", "a tiger sitting on a mat", "--edit", "p2p-replace", "--cross-replace", "0.6",
          "--cross-replace-word", "tiger=0.2", "--cross-replace-word", "mat=1"]
    assert cli_main(common + ok) == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ layers and pipeline

def test_layers_as_the_official_store_and_blend_on_the_sd_layout():
    """SD v1.4's UNet names (a stand-in object): the official AttentionStore keeps maps of at most 32 ** 2 queries,
    LocalBlend reads down_cross[2:4] + up_cross[:3] of those (the five 16 x 16 layers); self-attention replace acts
    on layers of at most 32 ** 2 queries (NTI notebook)."""
    from types import SimpleNamespace
    names = []
    for block in range(3):
        names += [f"down_blocks.{block}.attentions.{a}.transformer_blocks.0.attn{n}.processor"
                  for a in range(2) for n in (1, 2)]
    names += [f"mid_block.attentions.0.transformer_blocks.0.attn{n}.processor" for n in (1, 2)]
    for block in range(1, 4):
        names += [f"up_blocks.{block}.attentions.{a}.transformer_blocks.0.attn{n}.processor"
                  for a in range(3) for n in (1, 2)]
    unet = SimpleNamespace(down_blocks=[None] * 4, up_blocks=[None] * 4, attn_processors={n: None for n in names})
    layers = p2p.unet_layers(unet, 64)
    side = {"down_blocks.0": 64, "down_blocks.1": 32, "down_blocks.2": 16, "mid_block": 8,
            "up_blocks.1": 16, "up_blocks.2": 32, "up_blocks.3": 64}
    for name, layer in layers.items():
        assert layer.side == side[name.split(".attentions")[0]], name
    stored_down = [n for n in names if n.startswith("down") and ".attn2." in n and layers[n].side ** 2 <= 32 ** 2]
    stored_up = [n for n in names if n.startswith("up") and ".attn2." in n and layers[n].side ** 2 <= 32 ** 2]
    assert sorted(n for n, layer in layers.items() if layer.blend) == sorted(stored_down[2:4] + stored_up[:3])


def test_fast_batch_equals_reference_for_refine_reweight_blend(tiny_pipe):
    """The combination the existing tests leave out: refine + reweight + local blend, 2 images batched on the fast
    path against the reference one at a time."""
    import nti
    from tests.conftest import rel_err
    base = NTIConfig(steps=4, method="ddim")
    invs = nti.invert(tiny_pipe, ["skimage:chelsea", "skimage:coffee"],
                      ["a cat sitting on a mat", "a cup of coffee on a table"], base, progress=False)
    targets = ["a red cat sitting on a mat", "a big cup of coffee on a red table"]
    config = base.replace(edit="p2p-refine", reweight={"red": 2.5, "big": 0.5}, blend_words=("cat", "cup"),
                          blend_start=0.0, blend_threshold=0.9)
    ref = torch.cat([nti.edit_latents(tiny_pipe, [inv], [t], config, progress=False) for inv, t in zip(invs, targets)])
    fast = nti.edit_latents(tiny_pipe, invs, targets, config.replace(backend="fast", batch_size=2), progress=False)
    assert rel_err(fast, ref) < 1e-4  # measured 2.8e-6
    unblended = torch.cat([nti.edit_latents(tiny_pipe, [inv], [t], config.replace(blend_words=()), progress=False)
                           for inv, t in zip(invs, targets)])
    assert rel_err(ref, unblended) > 1e-2  # the blend took part (measured 0.11)
    # per-word cross-replace windows on the batched fast path (one image's word missing from the other's prompt)
    words = config.replace(cross_replace={"default_": 0.5, "red": 1.0, "cat": 0.2})
    ref = torch.cat([nti.edit_latents(tiny_pipe, [inv], [t], words, progress=False) for inv, t in zip(invs, targets)])
    fast = nti.edit_latents(tiny_pipe, invs, targets, words.replace(backend="fast", batch_size=2), progress=False)
    assert rel_err(fast, ref) < 1e-4
    default = torch.cat([nti.edit_latents(tiny_pipe, [inv], [t], words.replace(cross_replace_words=()),
                                          progress=False) for inv, t in zip(invs, targets)])
    assert rel_err(ref, default) > 1e-4  # the words' own windows took part


def test_each_images_own_words_as_pie_benchs_p2p_runs(sd_tok, tiny_pipe):
    """PnPInversion's PIE-Bench P2P runs blend each sample's blended_word "SRC TGT" as ((SRC,), (TGT,)) (SRC's mask
    from the source prompt only, TGT's from the target only) and reweight TGT x2: an image's own words
    (nti.SampleWords) beside the config's. A batch of two images with different words on the fast path equals the
    reference one image at a time, and each image's words act on it alone."""
    import nti
    from tests.conftest import rel_err

    source, target = "a cat sitting on a cat mat", "a tiger sitting on a cat mat"
    words = nti.SampleWords(blend_source=("cat",), blend_target=("tiger",), reweight=(("tiger", 2.0),))
    plan = p2p.make_plan(sd_tok, source, target, NTIConfig(edit="p2p-refine"), words)
    tokens = sd_tok.tokenize(source), sd_tok.tokenize(target)
    assert [tokens[0][i - 1] for i in plan.blend_source.nonzero().flatten()] == ["cat</w>", "cat</w>"]
    assert [tokens[1][i - 1] for i in plan.blend_target.nonzero().flatten()] == ["tiger</w>"]  # not its 'cat'
    assert torch.equal(plan.equalizer, official_equalizer(sd_tok, target, ["tiger"], [2.0]).flatten())
    with pytest.raises(NTIError, match="blend words: none of 'dog'"):
        p2p.make_plan(sd_tok, source, target, NTIConfig(edit="p2p-refine"), nti.SampleWords(blend_source=("dog",)))

    base = NTIConfig(steps=4, method="ddim")
    invs = nti.invert(tiny_pipe, ["skimage:chelsea", "skimage:coffee"],
                      ["a cat sitting on a mat", "a cup of coffee on a table"], base, progress=False)
    targets = ["a tiger sitting on a mat", "a cup of tea on a table"]
    own = [nti.SampleWords(("cat",), ("tiger",), (("tiger", 2.0),)),
           nti.SampleWords(("coffee",), ("tea",), (("tea", 2.0),))]
    config = base.replace(edit="p2p-refine", blend_start=0.0, blend_threshold=0.9)
    ref = torch.cat([nti.edit_latents(tiny_pipe, [inv], [t], config, progress=False, words=[w])
                     for inv, t, w in zip(invs, targets, own)])
    fast = nti.edit_latents(tiny_pipe, invs, targets, config.replace(backend="fast", batch_size=2), progress=False,
                            words=own)
    assert rel_err(fast, ref) < 1e-4
    alone = nti.edit_latents(tiny_pipe, invs, targets, config.replace(backend="fast", batch_size=2), progress=False,
                             words=[own[0], None])
    assert rel_err(alone[:1], fast[:1]) < 1e-5  # image 1's words leave image 0 alone
    assert rel_err(alone[1:], fast[1:]) > 1e-3  # and act on image 1
    with pytest.raises(NTIError, match="choose a p2p edit mode"):
        nti.edit_latents(tiny_pipe, invs, targets, base, progress=False, words=own)


VOCAB = ["a", "cat", "dog", "hippopotamus", "sitting", "on", "mat", "rug", "red", "photo", "of", "the", "tiger",
         "armadillo", "wearing", "hat", "big", "and", "with", "sunglasses", "cat,", "mat.", "watercolor", "painting"]


def test_mappers_and_word_lookup_as_official_on_random_prompts(sd_tok):
    """Seeded random pairs on SD's vocabulary (multi-token words, punctuation glued to words): swaps of one or two
    words for replace, insertions and removals for refine, and the word lookup of each punctuation-free word."""
    rng = np.random.default_rng(7)
    for _ in range(150):
        words = list(rng.choice(VOCAB, size=rng.integers(3, 9)))
        source = " ".join(words)
        swapped = list(words)
        for k in rng.choice(len(words), size=rng.integers(1, 3), replace=False):
            swapped[k] = rng.choice(VOCAB)
        target = " ".join(swapped)
        assert torch.equal(p2p.replace_mapper(sd_tok, source, target), official_replacement(sd_tok, source, target)), (
            source, target)
        edited = list(words)
        for _ in range(rng.integers(1, 3)):
            if rng.random() < 0.5 and len(edited) > 1:
                del edited[rng.integers(len(edited))]
            else:
                edited.insert(rng.integers(len(edited) + 1), rng.choice(VOCAB))
        refined = " ".join(edited)
        index, alphas = official_refinement(sd_tok, source, refined)
        mapper, alpha = p2p.refine_mapper(sd_tok, source, refined)
        assert torch.equal(alpha, alphas) and torch.equal(mapper * alpha, as_matrix(index) * alphas), (source, refined)
        for word in set(words):  # where the official exact match and the project's (punctuation dropped) agree
            if p2p._normal(word) == word and all(w == word for w in words if p2p._normal(w) == word):
                assert p2p.word_positions(sd_tok, source, word) == official_word_inds(sd_tok, source, word), (
                    source, word)


def test_a_word_of_punctuation_only_is_found_as_written(sd_tok):
    """get_word_inds finds a space-separated ',' or '!' as it is written; the project's lookup stripped it to
    nothing, so such a reweight word was dropped without a word (beside other words) or refused as missing from a
    prompt that has it."""
    config = NTIConfig(edit="p2p-refine", reweight={"tiger": 2.0, ",": 0.5, "!": 3.0})
    target = "a tiger , sitting on a mat !"
    plan = p2p.make_plan(sd_tok, "a cat , sitting on a mat !", target, config)
    assert torch.equal(plan.equalizer, official_equalizer(sd_tok, target, ["tiger", ",", "!"], [2.0, 0.5, 3.0]))
    assert plan.equalizer[3] == 0.5 and plan.equalizer[8] == 3.0
    assert p2p.word_positions(sd_tok, "a cat, sitting", ",") == []  # glued to a word: not a word of its own

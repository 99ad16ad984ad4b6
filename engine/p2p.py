"""Prompt-to-prompt attention control (Hertz et al. 2022) through diffusers attention processors, on SDPA.

An editing UNet call holds, for B images, the rows [uncond source (B), uncond target (B), cond source (B),
cond target (B)]. Only the conditional target rows are edited, from the conditional source rows, as the official
code does (LOW_RESOURCE = False). No layer falls back to explicit 4096 x 4096 attention maps:
- self-attention replace (the target uses the source's map): softmax(Q_s K_s^T) V_t is SDPA(Q_s, K_s, V_t);
- every cross-attention edit is linear in the map along the token axis,
  P' = w ((P_s M) alpha + P_t (1 - alpha)) eq + (1 - w) P_t (w: 1 for the target tokens inside their cross-replace
  window at this step), so P' V_t = SDPA(Q_s, K_s, A V_t) + SDPA(Q_t, K_t, b V_t) with A = M diag(w alpha eq) and
  b = w (1 - alpha) eq + 1 - w (the fast path); the reference path forms the small (queries x 77) maps P_s, P_t
  explicitly instead;
- local blending needs the blend words' maps at one resolution only: those are computed explicitly there.
Token alignment (replace_mapper, refine_mapper) gives exactly the official seq_aligner's matrices, including
where they map a token to another word's position, so results compare with published P2P numbers
(docs/p2p.md: the rules, and why the project's former alignment was dropped).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import NTIConfig, NTIError

# ---------------------------------------------------------------------------------------------- token alignment


def word_tokens(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """(word, token positions) of each whitespace-separated word; position 0 is the start token.

    Computed from the tokenizer's own output: each word is tokenized alone and checked against the whole prompt's
    tokens (CLIP splits words on whitespace and punctuation only, so the pieces must add up)."""
    max_len = tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=True, max_length=max_len).input_ids
    body = ids[1:-1]  # without start and end tokens
    pieces, words = [], []
    for word in prompt.split():
        tokens = tokenizer.encode(word, add_special_tokens=False)
        words.append((word, list(range(1 + len(pieces), 1 + len(pieces) + len(tokens)))))
        pieces += tokens
    truncated = len(ids) == max_len and len(pieces) > len(body)
    if pieces[:len(body)] != body or (len(pieces) != len(body) and not truncated):
        raise NTIError(f"cannot align words to tokens for prompt {prompt!r}: the tokenizer splits it differently "
                       f"word by word than as a whole")
    last = len(body)  # words past the tokenizer's truncation lose their positions
    return [(word, [p for p in positions if p <= last]) for word, positions in words]


def _normal(word: str) -> str:
    # a word of punctuation only (',' or '!' standing alone) is itself, as the official get_word_inds finds it;
    # stripped to nothing it would match nothing and its reweight factor would be dropped without a word
    return word.lower().strip(".,;:!?\"'()[]") or word.lower()


def word_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Token positions of every occurrence of `word` (case and surrounding punctuation ignored) in `prompt`."""
    target = _normal(word)
    pieces = tokenizer.encode(target, add_special_tokens=False)
    out = []
    for w, positions in word_tokens(tokenizer, prompt):
        if _normal(w) == target:
            # the word's own tokens among the punctuation's: 'mat.' -> 'mat', '"cat"' -> 'cat', not the quote
            # (CLIP splits punctuation from letters, so they are a run of the whole word's tokens)
            tokens = tokenizer.encode(w, add_special_tokens=False)
            start = next((k for k in range(len(tokens)) if tokens[k:k + len(pieces)] == pieces), None)
            if start is not None:
                out += positions[start:start + len(pieces)]
            else:  # CLIP cut the word otherwise ("'tiger'" -> "'t", "iger", "'": a contraction's pattern): every
                # token of it that holds a letter or digit, not the first token only
                out += [p for p, t in zip(positions, tokens) if any(c.isalnum() for c in tokenizer.decode([t]))]
    return out


def replace_mapper(tokenizer, source: str, target: str) -> torch.Tensor:
    """P2P word swap as the official seq_aligner's get_replacement_mapper: (n, n) M over the tokenizer's n
    positions, M[i, j] = share of source token i's attention that target token j takes.

    The prompts must have the same number of words; a word whose text differs from the source's is swapped.
    Source position i and target position j walk together from the start token. At a swapped word, its source
    tokens give their attention to its target tokens: one to one when the token counts agree, else every source
    token 1 / (target count) to each target token. Before the last swapped word, other positions map i -> j;
    after it, j -> j (the official rule: where a swap changed the token count, the rest of the target prompt takes
    the source tokens at its own positions, not the shifted words). The walk stops when either side runs out."""
    src, tgt = word_tokens(tokenizer, source), word_tokens(tokenizer, target)
    if len(src) != len(tgt):
        raise NTIError(f"p2p-replace swaps words one for one, but {source!r} has {len(src)} words and {target!r} "
                       f"has {len(tgt)}; use p2p-refine for prompts that add or remove words")
    # swapped words by their first source position; a word truncated away on the source side takes no part
    swaps = {s[0]: (s, t) for (ws, s), (wt, t) in zip(src, tgt) if ws != wt and s}
    size = tokenizer.model_max_length
    mapper = torch.zeros(size, size)
    i = j = 0
    while i < size and j < size:
        if i in swaps:
            s, t = swaps.pop(i)
            if len(s) == len(t):
                mapper[s, t] = 1.0
            elif t:
                for k in s:
                    mapper[k, t] = 1.0 / len(t)
            i, j = i + len(s), j + len(t)
        else:
            mapper[i if swaps else j, j] = 1.0  # i -> j while a swapped word is ahead, j -> j after the last
            i, j = i + 1, j + 1
    return mapper


def _align(x: list[int], y: list[int]) -> list[tuple[int, int]]:
    """Global alignment of two token sequences (gap 0, match 1, mismatch -1, as P2P's seq_aligner): the matched
    (i, j) pairs. With a free gap a mismatch never pays, so this is a longest common subsequence; ties prefer a gap
    in the source, as the official traceback does."""
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            score[i][j] = max(score[i][j - 1], score[i - 1][j], diag)
    pairs, i, j = [], n, m
    while i > 0 and j > 0:
        if score[i][j] == score[i][j - 1]:
            j -= 1  # target token j-1 is unmatched (a new word)
        elif score[i][j] == score[i - 1][j]:
            i -= 1  # source token i-1 is dropped
        else:
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
    return pairs[::-1]


def refine_mapper(tokenizer, source: str, target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """P2P refinement as the official seq_aligner's get_refinement_mapper: (M (n, n), alpha (n,)). Target token j
    takes source token i's attention where the token sequences align (M[i, j] = 1, alpha[j] = 1); new target
    tokens keep their own attention (alpha[j] = 0). Past the target's end token, position j takes source
    position j (the official rule; after a removal these are the source's last tokens, not its padding)."""
    size = tokenizer.model_max_length
    x = tokenizer(source, truncation=True, max_length=size).input_ids
    y = tokenizer(target, truncation=True, max_length=size).input_ids
    mapper, alpha = torch.zeros(size, size), torch.zeros(size)
    for i, j in _align(x, y):
        mapper[i, j], alpha[j] = 1.0, 1.0
    rest = torch.arange(len(y), size)
    mapper[rest, rest], alpha[rest] = 1.0, 1.0
    return mapper, alpha


def equalizer(tokenizer, prompt: str, reweight) -> torch.Tensor:
    """(77,) attention factors over the prompt's tokens: the reweighted words' tokens get their factor.

    One config serves a batch of images with different prompts, so a word may be missing from a prompt; but at
    least one of the words must be in it."""
    eq = torch.ones(tokenizer.model_max_length)
    found = False
    for word, factor in reweight:
        positions = word_positions(tokenizer, prompt, word)
        eq[positions] = float(factor)
        found |= bool(positions)
    if reweight and not found:
        words = ", ".join(repr(w) for w, _ in reweight)
        raise NTIError(f"reweight: none of the words {words} is in the target prompt {prompt!r}")
    return eq


@dataclass
class EditPlan:
    """One image's prompt-to-prompt edit as tensors over the 77 token positions (source i, target j)."""

    mapper: torch.Tensor  # (77, 77) M[i, j]: share of source token i's attention that target token j takes
    alpha: torch.Tensor  # (77,) 1: target token j takes the mapped source attention; 0: keeps its own (refine)
    equalizer: torch.Tensor  # (77,) reweight factors of the target tokens
    blend_source: torch.Tensor  # (77,) 1 at the blend words' tokens in the source prompt
    blend_target: torch.Tensor  # (77,) the same in the target prompt
    cross_replace: torch.Tensor | None = None  # (77,) float64: fraction of the steps each target token takes the
    # source's map (None: the config's cross_replace for every token)

    @property
    def blends(self) -> bool:
        return bool(self.blend_source.any() or self.blend_target.any())


@dataclass(frozen=True)
class SampleWords:
    """One image's own prompt-to-prompt words, beside the config's (which serve a whole batch): blend words looked
    up in its source or its target prompt only, and reweight factors. PIE-Bench's P2P runs take them from each
    sample's `blended_word` "SRC TGT": blend ((SRC,), (TGT,)) and TGT's attention x2 (PnPInversion's
    run_editing_p2p.py)."""

    blend_source: tuple = ()
    blend_target: tuple = ()
    reweight: tuple = ()  # ((word, factor), ...), after the config's: a word in both takes this factor

    @property
    def any(self) -> bool:
        return bool(self.blend_source or self.blend_target or self.reweight)


def make_plan(tokenizer, source: str, target: str, config: NTIConfig, words: SampleWords | None = None) -> EditPlan:
    """The edit of config.edit from `source` to `target` (with this image's own `words`, if any); errors name the
    word or prompt that does not fit."""
    words = words or SampleWords()
    if config.edit == "p2p-replace":
        mapper, alpha = replace_mapper(tokenizer, source, target), torch.ones(tokenizer.model_max_length)
    elif config.edit in ("p2p-refine", "p2p-reweight"):
        mapper, alpha = refine_mapper(tokenizer, source, target)
    else:
        raise NTIError(f"edit mode {config.edit!r} is not a prompt-to-prompt mode")
    size = tokenizer.model_max_length
    blend_source, blend_target = torch.zeros(size), torch.zeros(size)
    # as reweight: a word may miss, but not all of them (the official LocalBlend, given a word that is in neither
    # prompt, makes an empty mask and undoes the whole edit without a word)
    for word in config.blend_words + words.blend_source:
        blend_source[word_positions(tokenizer, source, word)] = 1.0
    for word in config.blend_words + words.blend_target:
        blend_target[word_positions(tokenizer, target, word)] = 1.0
    blend_words = (*config.blend_words, *words.blend_source, *words.blend_target)
    if blend_words and not (blend_source.any() or blend_target.any()):
        raise NTIError(f"blend words: none of {', '.join(repr(w) for w in blend_words)} is in {source!r} or "
                       f"{target!r}")
    # float64: the window is int(fraction * (steps + 1)) in Python floats (doubles), as the official code counts it
    cross = torch.full((size,), float(config.cross_replace), dtype=torch.float64)
    found = False
    for word, fraction in config.cross_replace_words:  # P2P's get_time_words_attention_alpha: the target's tokens
        positions = word_positions(tokenizer, target, word)
        cross[positions], found = fraction, found or bool(positions)
    if config.cross_replace_words and not found:
        missing = ", ".join(repr(w) for w, _ in config.cross_replace_words)
        raise NTIError(f"cross-replace words: none of {missing} is in the target prompt {target!r}")
    return EditPlan(mapper, alpha, equalizer(tokenizer, target, config.reweight + words.reweight), blend_source,
                    blend_target, cross)


def is_identity(tokenizer, source: str, target: str, config: NTIConfig, words: SampleWords | None = None) -> bool:
    """True when the edit changes nothing: same tokens and no factor other than 1."""
    same = tokenizer(source).input_ids == tokenizer(target).input_ids
    return same and all(factor == 1.0 for _, factor in config.reweight + (words.reweight if words else ()))


# ------------------------------------------------------------------------------------------------- the controller


@dataclass
class Layer:
    """Where an attention layer sits: its name, its latent side (pixels of its square map) and its UNet part."""

    name: str
    side: int
    place: str  # 'down', 'mid' or 'up'
    blend: bool = False  # a cross-attention layer whose maps feed the local blend mask


class P2PController:
    """The state of one prompt-to-prompt run over B images: plans, the current step, the local blend maps.

    `explicit=True` (the reference) forms the cross-attention maps of the conditional rows and edits them as the
    official code; `explicit=False` (the fast path) folds the edit into SDPA's values. Set `step` before each UNet
    call; call `blend_latents` after each DDIM step."""

    def __init__(self, plans: list[EditPlan], config: NTIConfig, steps: int, device, explicit: bool = True):
        self.b = len(plans)
        stack = lambda name: torch.stack([getattr(p, name) for p in plans]).to(device)  # noqa: E731
        self.mapper, self.alpha, self.eq = stack("mapper"), stack("alpha"), stack("equalizer")
        self.blend_source, self.blend_target = stack("blend_source"), stack("blend_target")
        # P2P's get_time_words_attention_alpha: target token j takes the source's map while step < its end
        fractions = [torch.full_like(p.alpha, config.cross_replace, dtype=torch.float64, device="cpu")
                     if p.cross_replace is None else p.cross_replace.cpu() for p in plans]
        self.cross_end = torch.stack(fractions).mul(steps + 1).floor()  # (B, 77), on the CPU
        self.cross_steps = int(self.cross_end.max())  # no cross-attention edit from this step on
        self.words = None  # (B, 77) fp32 on the device: 1 where the target token takes the source's map this step
        self._words_key = None
        self.self_steps = int(config.self_replace * steps)
        self.self_max_tokens = config.self_replace_max_tokens
        self.blend = any(p.blends for p in plans)
        self.blend_from = int(config.blend_start * steps)
        self.blend_threshold = config.blend_threshold
        self.explicit = explicit
        self.step = 0
        self.maps: torch.Tensor | None = None  # (2B, side * side) blend words' attention, summed over layers, steps

    # rows of the editing batch [u_src, u_tgt, c_src, c_tgt]
    def _rows(self, n: int) -> tuple[slice, slice]:
        if n != 4 * self.b:
            raise NTIError(f"prompt-to-prompt expects a UNet batch of 4 x {self.b} rows, got {n}")
        return slice(2 * self.b, 3 * self.b), slice(3 * self.b, 4 * self.b)

    def attend(self, layer: Layer, is_cross: bool, q, k, v, scale: float) -> torch.Tensor:
        """Attention output (N, heads, queries, head_dim) of one layer with the target rows edited."""
        src, tgt = self._rows(q.shape[0])
        keep = 3 * self.b  # rows before the conditional target rows
        if not is_cross:
            if self.step < self.self_steps and q.shape[2] <= self.self_max_tokens:
                # the target's self-attention map := the source's: softmax(Q_s K_s^T) V_t = SDPA(Q_s, K_s, V_t)
                q, k = torch.cat([q[:keep], q[src]]), torch.cat([k[:keep], k[src]])
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        edit = self._cross_words()
        record = self.blend and layer.blend
        if self.explicit or record:
            return self._cross_explicit(q, k, v, scale, src, tgt, edit, record)
        if not edit:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        folded = torch.einsum("bij,bhjd->bhid", self.fold_source.to(v.dtype), v[tgt])
        out = F.scaled_dot_product_attention(torch.cat([q[:keep], q[src]]), torch.cat([k[:keep], k[src]]),
                                             torch.cat([v[:keep], folded]), scale=scale)
        if self.has_own:  # refine: new words keep (a reweighted share of) their own attention
            own = self.fold_own.to(v.dtype)[:, None, :, None] * v[tgt]
            out[tgt] += F.scaled_dot_product_attention(q[tgt], k[tgt], own, scale=scale)
        return out

    def _cross_words(self) -> bool:
        """Whether any target token takes the source's cross-attention at this step; sets `words` (w) and the
        folded form of P' = w ((P_s M) alpha + P_t (1 - alpha)) eq + (1 - w) P_t, P' V_t = P_s (A V_t) + P_t (b V_t)
        with A = M diag(w alpha eq), b = w (1 - alpha) eq + 1 - w (kept while w stays the same: no host sync)."""
        words = self.cross_end > self.step
        key = words.numpy().tobytes()
        if key != self._words_key:
            self._words_key, self.editing = key, bool(words.any())
            w = words.to(self.alpha)
            self.words = w
            self.fold_source = self.mapper * (w * self.alpha * self.eq)[:, None, :]
            self.fold_own = w * (1 - self.alpha) * self.eq + (1 - w)
            self.has_own = bool(((1 - self.alpha) * self.eq).any() or not words.all())
        return self.editing

    def _cross_explicit(self, q, k, v, scale, src, tgt, edit: bool, record: bool) -> torch.Tensor:
        """The official formulation on explicit (queries x 77) maps of the conditional rows."""
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)  # every row as usual; target rows redone below
        p_src = torch.softmax(q[src].float() @ k[src].float().transpose(-1, -2) * scale, dim=-1)
        p_tgt = torch.softmax(q[tgt].float() @ k[tgt].float().transpose(-1, -2) * scale, dim=-1)
        if edit:
            alpha, eq, w = self.alpha[:, None, None, :], self.eq[:, None, None, :], self.words[:, None, None, :]
            p_new = w * ((p_src @ self.mapper[:, None]) * alpha + p_tgt * (1 - alpha)) * eq + (1 - w) * p_tgt
            out[tgt] = (p_new @ v[tgt].float()).to(out.dtype)
        else:
            p_new = p_tgt
        if record:
            self._record(p_src, p_new)
        return out

    def _record(self, p_src: torch.Tensor, p_tgt: torch.Tensor) -> None:
        """Add the blend words' maps (summed over their tokens, averaged over heads) to the running sum."""
        src = (p_src * self.blend_source[:, None, None, :]).sum(-1).mean(1)
        tgt = (p_tgt * self.blend_target[:, None, None, :]).sum(-1).mean(1)
        maps = torch.cat([src, tgt])
        self.maps = maps if self.maps is None else self.maps + maps

    def blend_latents(self, z: torch.Tensor) -> torch.Tensor:
        """P2P local blend on z = [source (B), target (B)]: outside the union of the source's and the target's
        word masks the target latent is set to the source's."""
        if not self.blend or self.maps is None or self.step < self.blend_from:
            return z
        side = int(round(self.maps.shape[1] ** 0.5))
        maps = self.maps.view(2 * self.b, 1, side, side)
        maps = F.max_pool2d(maps, 3, stride=1, padding=1)
        maps = F.interpolate(maps, size=z.shape[2:])
        maps = maps / maps.amax(dim=(2, 3), keepdim=True).clamp_min(1e-30)
        mask = maps > self.blend_threshold
        mask = (mask[:self.b] | mask[self.b:]).to(z.dtype)
        z_src, z_tgt = z[:self.b], z[self.b:]
        return torch.cat([z_src, z_src + mask * (z_tgt - z_src)])


# ---------------------------------------------------------------------------------------------- the processors


class P2PAttnProcessor:
    """diffusers attention processor: projections as AttnProcessor2_0, the attention itself by the controller."""

    def __init__(self, controller: P2PController, layer: Layer):
        self.controller, self.layer = controller, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if attention_mask is not None:
            raise NTIError(f"prompt-to-prompt does not support attention masks (layer {self.layer.name})")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_like = hidden_states.ndim == 4
        if image_like:
            n, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(n, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        context = hidden_states if not is_cross else encoder_hidden_states
        if is_cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        n, heads = q.shape[0], attn.heads
        q, k, v = (x.view(n, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self.controller.attend(self.layer, is_cross, q, k, v, attn.scale)
        out = out.transpose(1, 2).reshape(n, -1, out.shape[1] * out.shape[3]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_like:
            out = out.transpose(-1, -2).reshape(n, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def unet_layers(unet, latent_side: int) -> dict[str, Layer]:
    """Every attention processor slot of a UNet2DConditionModel with its resolution; the local blend reads the
    down/up cross-attention layers whose side is nearest latent_side / 4 (SD v1.4: the five 16x16 layers of the
    official LocalBlend, `down_cross[2:4] + up_cross[:3]`)."""
    layers = {}
    n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
    for name in unet.attn_processors:
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level, place = int(parts[1]), "down"
        elif parts[0] == "up_blocks":
            level, place = n_up - 1 - int(parts[1]), "up"
        else:
            level, place = n_down - 1, "mid"
        layers[name] = Layer(name, max(latent_side >> level, 1), place)
    cross = [layer for name, layer in layers.items() if ".attn2." in name and layer.place != "mid"]
    if cross:
        want = latent_side / 4
        side = min((layer.side for layer in cross), key=lambda s: (abs(s - want), -s))
        for layer in cross:
            layer.blend = layer.side == side
    return layers


@contextlib.contextmanager
def attention_control(unet, controller: P2PController, latent_side: int):
    """Install P2P processors on every attention layer of the UNet for the duration; restore the previous ones."""
    before = unet.attn_processors
    layers = unet_layers(unet, latent_side)
    unet.set_attn_processor({name: P2PAttnProcessor(controller, layers[name]) for name in before})
    try:
        yield controller
    finally:
        unet.set_attn_processor(before)

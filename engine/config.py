"""One config for the whole engine: the algorithm's settings, the edit's, and the fast path's switches.

Each field says its group (algorithm, editing, speed) and whether it changes an inversion's result; its docstring
is the documentation. The command line (engine/options.py) and the saved-inversion cache key
(NTIConfig.result_settings) are derived from these fields, so a new setting is added in one place.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import math
import os
import textwrap
from dataclasses import dataclass, field

METHODS = ("ddim", "null-text", "negative-prompt", "direct")
EDIT_MODES = ("regenerate", "p2p-replace", "p2p-refine", "p2p-reweight")
DIRECT_TARGET_OFFSETS = ("none", "source")
GUIDANCE_SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16", "fp16")
BACKENDS = ("reference", "fast")
ATTENTION = ("sdpa", "xformers", "plain")
FORWARD_BACKENDS = ("torch", "onnx", "aoti", "tensorrt")
COMPILE_SCOPES = ("blocks", "unet")


ALGORITHM, EDITING, SPEED = "algorithm", "editing", "speed"
GROUPS = {ALGORITHM: "inversion algorithm", EDITING: "editing (prompt-to-prompt)", SPEED: "speed (fast backend)"}
GUIDANCE_MAX = 100.0  # SD images saturate past w ~ 20; past 100 the guided step is numerical garbage, not an edit
SEED_RANGE = (0, 2 ** 63 - 1)  # what torch.Generator.manual_seed takes without wrapping
REWEIGHT_MAX = 3.4028234663852886e38  # float32's largest: the attention equalizer holds the factors in fp32


def _word_pairs(value, name: str) -> tuple:
    """((word, number), ...) from pairs or a {word: number} dict; NTIError naming the field otherwise."""
    try:
        pairs = value.items() if isinstance(value, dict) else value
        return tuple((str(word), float(number)) for word, number in pairs)
    except (TypeError, ValueError):
        raise NTIError(f"{name} must be (word, number) pairs or a {{word: number}} dict; got {value!r}") from None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not a step count


class NTIError(Exception):
    """A user-facing error: bad input or a missing resource; the message says what to do."""


def setting(default, group: str, *, changes_inversion: bool = False, keyed_at_default: bool = True,
            choices: tuple | None = None, minimum: int | None = None, flag: str | None = None,
            metavar: str | None = None):
    """A config field. `changes_inversion`: part of an inversion's result settings (its cache key and its record);
    `keyed_at_default=False`: only when set to something else than its default, so a setting added later leaves
    every existing cache key valid; `choices`, `minimum`, `flag` (default --field-name) and `metavar` shape its
    command-line flag."""
    return field(default=default, metadata={"group": group, "changes_inversion": changes_inversion,
                                            "keyed_at_default": keyed_at_default, "choices": choices,
                                            "minimum": minimum, "flag": flag, "metavar": metavar})


@dataclass
class NTIConfig:
    """Settings of one inversion/edit. Defaults are the official null-text notebook (Mokady et al. 2023)."""

    method: str = setting("null-text", ALGORITHM, changes_inversion=True, choices=METHODS)
    """Inversion method: 'ddim' (DDIM inversion only), 'null-text' (per-step null embeddings optimized, Mokady et al.
    2023), 'negative-prompt' (null embedding := the source prompt's embedding, no optimization, Miyake et al. 2023;
    the source branch's CFG then collapses to the conditional prediction, so it reconstructs as DDIM at w=1), or
    'direct' (Direct/PnP inversion, Ju et al. 2023: keeps the DDIM pivots; while editing, the source branch runs
    beside the target and after each step the offset from its guided step to the pivot z*_{t-1} is added back, so
    it stays on the inversion trajectory; no optimization, one extra branch per edit step)."""
    steps: int = setting(50, ALGORITHM, changes_inversion=True, minimum=1)
    """DDIM steps for inversion, optimization and editing."""
    guidance: float = setting(7.5, ALGORITHM, changes_inversion=True)
    """Classifier-free guidance weight w (at the first denoising step when a schedule decays it)."""
    guidance_schedule: str = setting("constant", ALGORITHM, changes_inversion=True, choices=GUIDANCE_SCHEDULES)
    """'constant', 'linear' or 'cosine' decay of w from `guidance` at t=T to `guidance_min` at the last step."""
    guidance_min: float = setting(1.0, ALGORITHM, changes_inversion=True)
    """End point of a decaying guidance schedule (1.0 = conditional prediction only, no extrapolation)."""
    inner_steps: int = setting(10, ALGORITHM, changes_inversion=True, minimum=0)
    """Adam iterations per DDIM step in null-text optimization (upper bound when early stop is on)."""
    lr: float = setting(1e-2, ALGORITHM, changes_inversion=True)
    """Adam learning rate at step 0; step i uses lr * (1 - i/100), as the notebook (so null-text takes at most 100
    steps)."""
    early_stop: bool = setting(True, ALGORITHM, changes_inversion=True)
    """Stop an image's inner loop once its loss < early_stop_eps + i * 2e-5 (notebook). Off for fixed-cost timing."""
    early_stop_eps: float = setting(1e-5, ALGORITHM, changes_inversion=True)
    """Base threshold of the early stop."""
    steps_offset: int | None = setting(None, ALGORITHM, changes_inversion=True, minimum=0)
    """DDIM timestep offset; None = the model's scheduler_config.json (1 for SD v1.4 and the shapes model, so
    t = 981, 961, ..., 1). That is what the notebook really runs: StableDiffusionPipeline.from_pretrained sets
    steps_offset=1 on the DDIMScheduler it is handed. Risk of 0 (t = 980..0): the first inversion step and the last
    denoising step become identities, and the last null-text step has zero gradient (10 wasted passes). Only the
    'leading' timestep spacing takes an offset: a model whose scheduler says 'trailing' or 'linspace' refuses one."""
    optimize_pooled: bool = setting(True, ALGORITHM, changes_inversion=True, keyed_at_default=False)
    """SDXL only: null-text optimization fits the pooled null embedding (the second encoder's, fed to every ResNet
    block through the time embedding) together with the 77 null token embeddings, as both form SDXL's
    unconditional input. False = tokens only; the pooled null stays what the pipeline feeds (zeros for SDXL base).
    Ignored by models without a pooled embedding (SD v1.x, 2.x)."""
    clip_skip: int = setting(0, ALGORITHM, changes_inversion=True, keyed_at_default=False, minimum=0)
    """Text-encoder layers skipped from the end for every prompt embedding, the empty prompt's (the null) included:
    diffusers' clip_skip (1 = the penultimate layer's output through CLIP's final layer norm; SDXL: the layer
    before its usual penultimate one). Community SD 1.x models trained on it ask for 1 (AUTOMATIC1111's "Clip skip 2").
    0 = the last layer, as the notebook. diffusers' encode_prompt skips for the prompt only; here the null is encoded
    the same way, so guidance takes the difference of embeddings from one layer (as AUTOMATIC1111 does)."""
    seed: int = setting(0, ALGORITHM)
    """Seed for anything random (baseline generation from noise). Inversion itself is deterministic."""

    # --- editing. Not part of an inversion's result: one saved inversion serves every edit mode.
    edit: str = setting("regenerate", EDITING, choices=EDIT_MODES)
    """'regenerate': sample the target prompt alone from z_T. 'p2p-replace' / 'p2p-refine' / 'p2p-reweight':
    prompt-to-prompt (Hertz et al. 2022) as the NTI notebook runs it: the source branch (source prompt) and the
    target branch sample together from z_T with the inversion's per-step nulls, and the target's attention is taken
    from the source: replace maps word to word (same word count), refine aligns the token sequences (new words keep
    their own attention), reweight scales the cross-attention of `reweight` words. Costs one extra branch (2x UNet
    batch) plus a little attention work."""
    cross_replace: float = setting(0.8, EDITING)
    """Fraction of denoising steps whose cross-attention the target takes from the source: steps
    i < int(cross_replace * (steps + 1)), as P2P's `cross_replace_steps` (0.8 in the P2P and NTI notebooks)."""
    cross_replace_words: tuple = setting((), EDITING, flag="--cross-replace-word", metavar="WORD=FRACTION")
    """((word, fraction), ...): a cross-replace fraction of its own for these words of the target prompt (their
    tokens take the source's attention for steps i < int(fraction * (steps + 1))), the rest keeping
    `cross_replace`: P2P's per-word `cross_replace_steps` dict ({"default_": 0.8, "tiger": 0.4}; a dict in that
    form given as `cross_replace` is split into the two). A dict is accepted here too."""
    self_replace: float = setting(0.5, EDITING)
    """Fraction of denoising steps whose self-attention map the target takes from the source: steps
    i < int(self_replace * steps). 0.5 is the NTI notebook's cat->tiger edit; the P2P notebook uses 0.4 and
    PIE-Bench's P2P runs 0.6. Higher keeps more of the source layout, lower lets the edit change shape."""
    self_replace_max_tokens: int = setting(1024, EDITING, minimum=0)
    """Self-attention is only replaced in layers with at most this many queries: 32*32 as the NTI notebook (every
    SD v1.4 layer but the 64x64 ones); the P2P notebook used 16*16."""
    reweight: tuple = setting((), EDITING, flag="--reweight", metavar="WORD=FACTOR")
    """((word, factor), ...): scale the target's cross-attention to these words of the target prompt during the
    cross-replace steps (P2P attention re-weighting; the NTI notebook uses 2.0). A dict is accepted. Composes with
    replace/refine; 'p2p-reweight' = refine alignment + these factors. Risk: large factors oversaturate."""
    blend_words: tuple = setting((), EDITING, flag="--blend-word", metavar="WORD")
    """Words whose cross-attention mask confines the edit (P2P local blend): the target latent is reset to the
    source's outside the union of the words' masks in source and target prompt, after every step from
    `blend_start`. Words are looked up in both prompts; one config serves a batch, so a word may be missing from
    an image's prompts, but not all of them. The same tolerance holds for `reweight` words."""
    blend_threshold: float = setting(0.3, EDITING)
    """Local blend mask threshold on the max-normalized, 3x3-max-pooled attention map (NTI notebook: 0.3)."""
    blend_start: float = setting(0.2, EDITING)
    """Local blending starts after int(blend_start * steps) steps (NTI notebook: 0.2; the P2P notebook: 0)."""
    direct_target_offset: str = setting("none", EDITING, choices=DIRECT_TARGET_OFFSETS)
    """Direct inversion, P2P edits: which offset the *target* branch gets. 'none' = the paper and its official code
    (offset on the source branch only; the target follows through the shared attention). 'source' = the official
    code's 'add-source' ablation (the source branch's offset added to both: more faithful, weaker edits). With
    'regenerate' there is no shared attention, so there the target always gets the source branch's offset."""

    # --- speed (the fast backend). None of these change the math in fp32; precision does, slightly.
    backend: str = setting("reference", SPEED, choices=BACKENDS)
    """'reference' = eager fp32 batch-1 loop (the truth); 'fast' = batched engine with the switches below. The
    command line picks 'fast' on CUDA and 'reference' elsewhere unless told."""
    batch_size: int = setting(8, SPEED, minimum=1)
    """Images optimized together in the fast path. Memory grows linearly; numerics are batch-independent in fp32."""
    precision: str = setting("fp32", SPEED, changes_inversion=True, choices=PRECISIONS)
    """UNet compute precision in the fast path. bf16/fp16 autocast the UNet only; embeddings, Adam state, latents
    and the DDIM update stay fp32. Risk: fp16 overflow gives non-finite steps (retried in fp32 and recorded). The
    command line picks bf16 for the fast backend on CUDA and fp32 elsewhere unless told."""
    half_weights: bool = setting(True, SPEED)
    """bf16/fp16: run a copy of the UNet whose Linear/Conv weights are pre-cast to that dtype, under autocast. Gives
    autocast's own results (it casts each weight to exactly that tensor) without re-casting every weight on every
    call and saving the casts for backward. Costs a half-size copy of those weights. False = autocast over the
    fp32 weights (the kill switch)."""
    half_norms: bool = setting(False, SPEED, changes_inversion=True, keyed_at_default=False)
    """bf16/fp16: run the whole UNet copy in that dtype without autocast, GroupNorm/LayerNorm included (PyTorch's
    norm kernels keep their statistics in fp32; only their outputs are rounded). Autocast runs the norms in fp32,
    which costs a cast to fp32 and one back per norm: SD v1.4 with CUDA's autocast policy makes ~285 casts per
    forward, and 44% of its non-GEMM memory traffic goes with them (benchmarks/gpu_run.py, stage ops). Risk: one more
    rounding per norm output; results differ from autocast's by about as much as autocast's differ from fp32, so it
    is keyed apart (24-scene fidelity: docs/benchmarks.md). No effect in fp32; the embeddings, Adam state, latents
    and DDIM update stay fp32 either way."""
    attention: str = setting("sdpa", SPEED, choices=ATTENTION)
    """Attention kernel: torch SDPA (default), xformers where it imports, or plain matmul-softmax."""
    compile: bool = setting(False, SPEED)
    """torch.compile (fullgraph, static shapes) of the UNet, as much of it as compile_scope says. The first call
    of each shape pays the compile time. A compile failure (graph break, dynamo's recompile limit) is reported with
    a warning and that UNet runs eager from then on, as is a compiled UNet whose first forward, or forward +
    backward, differs from eager's on the same inputs by more than ten times rounding (a compiler bug: one cost
    a 25% wrong gradient on CPU). NTI_DISABLE_COMPILE=1 turns it off."""
    compile_scope: str = setting("blocks", SPEED, choices=COMPILE_SCOPES)
    """What compile compiles. 'blocks': each repeated transformer block (regional; SD v1.4 has 4 block shapes, so
    it compiles in about two minutes on an H200 at batch 16), which leaves the ResNet blocks, the norms and
    projections around the blocks eager: a third of a forward's aten ops (gpu_run stage ops: 638 of 1902), one
    kernel each. 'unet': the whole UNet as one graph per batch size and grad mode, so inductor fuses those as well;
    costs a longer first call (a whole SD v1.4 UNet's forward + backward took 216 s to compile on an H100). Same
    arithmetic either way: parity as eager's (tests/test_fast.py). 'unet' compiles with inductor's layout
    optimization off: on torch 2.13 it zeroed the gradient through SD's up blocks
    (benchmarks/inductor_layout.py); NTI_INDUCTOR_LAYOUT_OPT=1 turns it back on (--channels-last gives the
    convolutions NHWC either way). Ignored without compile."""
    cuda_graphs: bool = setting(False, SPEED)
    """Capture whole calls as CUDA graphs (CUDA only; ignored with a warning elsewhere): each forward-only UNet call
    per batch size, and each inner iteration (UNet forward + backward, loss, Adam) per bucket size. Captured once
    per process and model, after two warm-up runs; memory: one private pool per captured shape.
    NTI_DISABLE_CUDA_GRAPHS=1 turns it off."""
    channels_last: bool = setting(False, SPEED)
    """Run the UNet in channels_last memory format (CUDA convolution layout)."""
    gradient_checkpointing: bool = setting(False, SPEED)
    """Recompute the UNet's activations during the inner iterations' backward instead of keeping them (diffusers'
    gradient checkpointing, on the fast path's UNet copy only): per image, SD v1.4 at 512 px keeps 0.24 GiB instead
    of 0.93 and SDXL at 1024 px 0.73 instead of 6.2 (docs/sdxl-memory.md), so a larger batch fits, for about 75%
    more forward work per inner iteration. Same results: the recompute is the same arithmetic."""
    fused_step: bool | None = setting(None, SPEED)
    """Use the fused DDIM-step/loss custom ops from kernels/. None = on where Triton runs (CUDA)."""
    forward_backend: str = setting("torch", SPEED, changes_inversion=True, keyed_at_default=False,
                                   choices=FORWARD_BACKENDS)
    """UNet for the forward-only passes (DDIM inversion, cached cond pass, move-on step, editing): 'torch', or an
    exported 'onnx' / 'aoti' / 'tensorrt' UNet built once and cached (export/). The optimized uncond pass needs
    gradients and always runs in torch. Risk: fp16 engines differ from torch by more than fp32 rounding, so in
    bf16/fp16 it is keyed apart (as half_norms)."""
    export_cache: str | None = setting(None, SPEED)
    """Folder for exported UNets (default: ~/.cache/nti/export)."""

    def __post_init__(self) -> None:
        if isinstance(self.cross_replace, dict):  # the P2P notebooks' {"default_": 0.8, word: fraction, ...}
            words = {k: v for k, v in self.cross_replace.items() if k != "default_"}
            if "default_" not in self.cross_replace:
                raise NTIError(f"cross_replace as a dict needs the fraction of every other word as 'default_' (the "
                               f"P2P notebooks' form, e.g. {{'default_': 0.8, 'tiger': 0.4}}); "
                               f"got {self.cross_replace!r}")
            self.cross_replace = self.cross_replace["default_"]
            self.cross_replace_words = (*_word_pairs(words, "cross_replace"), *_word_pairs(self.cross_replace_words,
                                                                                        "cross_replace_words"))
        self.reweight = _word_pairs(self.reweight, "reweight")
        self.cross_replace_words = _word_pairs(self.cross_replace_words, "cross_replace_words")
        if isinstance(self.blend_words, str):
            self.blend_words = (self.blend_words,)
        try:
            words = tuple(self.blend_words)
        except TypeError:
            words = None
        if words is None or not all(isinstance(word, str) for word in words):  # str(None) would be the word 'None'
            raise NTIError(f"blend_words must be a word or a list of words (strings); got {self.blend_words!r}")
        self.blend_words = words
        self.validate()

    def validate(self) -> None:
        """Reject settings that would crash deep inside torch or give silently wrong results."""
        def choice(name: str, options: tuple) -> None:
            if getattr(self, name) not in options:
                raise NTIError(f"{name} must be one of {', '.join(options)}; got {getattr(self, name)!r}")

        choice("method", METHODS)
        choice("guidance_schedule", GUIDANCE_SCHEDULES)
        choice("precision", PRECISIONS)
        choice("backend", BACKENDS)
        choice("attention", ATTENTION)
        choice("forward_backend", FORWARD_BACKENDS)
        choice("edit", EDIT_MODES)
        choice("direct_target_offset", DIRECT_TARGET_OFFSETS)
        for name in ("cross_replace", "self_replace", "blend_start"):
            if not _is_number(getattr(self, name)) or not 0.0 <= getattr(self, name) <= 1.0:
                raise NTIError(f"{name} must be a fraction of the steps in [0, 1]; got {getattr(self, name)!r}")
        # compared with every attention value: nan gives an empty mask (the edit silently undone), a string a crash
        if not _is_number(self.blend_threshold) or not math.isfinite(self.blend_threshold):
            raise NTIError(f"blend_threshold must be a finite number; got {self.blend_threshold!r}")
        for f in dataclasses.fields(self):  # "no" or 0 for a switch would be read by truthiness, not refused
            value, optional = getattr(self, f.name), "None" in str(f.type)
            if str(f.type).startswith("bool") and not (isinstance(value, bool) or (optional and value is None)):
                raise NTIError(f"{f.name} must be True or False{' or None' if optional else ''}; got {value!r}")
        if not _is_int(self.self_replace_max_tokens) or self.self_replace_max_tokens < 0:
            raise NTIError(f"self_replace_max_tokens must be a non-negative integer; "
                           f"got {self.self_replace_max_tokens!r}")
        for word in [w for w, _ in self.reweight + self.cross_replace_words] + list(self.blend_words):
            if not word.strip() or len(word.split()) != 1:
                raise NTIError(f"reweight, cross-replace and blend words must be single words; got {word!r}")
        for word, fraction in self.cross_replace_words:
            if not 0.0 <= fraction <= 1.0:
                raise NTIError(f"cross_replace_words: the fraction of {word!r} must be a fraction of the steps in "
                               f"[0, 1]; got {fraction!r}")
        for word, factor in self.reweight:
            if not 0 <= factor <= REWEIGHT_MAX:
                raise NTIError(f"reweight: factor of {word!r} must be finite and >= 0 (at most {REWEIGHT_MAX:.3g}, "
                               f"float32's largest); got {factor!r}")
        if self.edit == "p2p-reweight" and not self.reweight:
            raise NTIError("edit mode p2p-reweight needs words to reweight, e.g. reweight={'tiger': 2.0} "
                           "(--reweight tiger=2)")
        if self.edit == "regenerate" and (self.reweight or self.blend_words or self.cross_replace_words):
            raise NTIError("reweight, cross-replace and blend words act on prompt-to-prompt attention; choose a p2p "
                           "edit mode (--edit p2p-replace|p2p-refine|p2p-reweight)")
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise NTIError(f"{name} must be a positive integer; got {value!r}")
        if self.steps > 1000:
            raise NTIError(f"steps must be at most 1000 (the model's training timesteps); got {self.steps}")
        if self.method == "null-text" and self.steps > 100:  # step i >= 100 would fit nothing, or climb the loss
            raise NTIError(f"null-text inversion takes at most 100 steps: its Adam lr decays as lr * (1 - i/100) "
                           f"(notebook), 0 at step 100 and negative after; got steps {self.steps}. For more steps "
                           f"use method 'direct', 'negative-prompt' or 'ddim'")
        for name in ("inner_steps", "clip_skip"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise NTIError(f"{name} must be a non-negative integer; got {value!r}")
        for name in ("guidance", "guidance_min"):  # inf or 1e30 would pass ">= 0" and write an all-black image
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value <= GUIDANCE_MAX:
                raise NTIError(f"{name} must be a number in [0, {GUIDANCE_MAX:g}]; got {value!r}")
        if not _is_number(self.early_stop_eps) or not 0 <= self.early_stop_eps < float("inf"):
            raise NTIError(f"early_stop_eps must be finite and >= 0; got {self.early_stop_eps!r}")
        if not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise NTIError(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]; got {self.seed!r}")
        if self.steps_offset is not None and (not _is_int(self.steps_offset) or self.steps_offset < 0):
            raise NTIError(f"steps_offset must be a non-negative integer or None (the model's); "
                           f"got {self.steps_offset!r}")
        if not _is_number(self.lr) or not 0 < self.lr < float("inf"):
            raise NTIError(f"lr must be finite and > 0; got {self.lr!r}")
        if self.export_cache is not None and not isinstance(self.export_cache, (str, os.PathLike)):
            raise NTIError(f"export_cache must be a folder path or None; got {self.export_cache!r}")

    def timestep_offset(self, scheduler_config: dict) -> int:
        """The DDIM steps_offset this config runs with a model's scheduler config (diffusers' default: 0)."""
        if self.steps_offset is not None:
            return self.steps_offset
        return int(scheduler_config.get("steps_offset", 0))

    def result_settings(self, scheduler_config: dict) -> dict:
        """The settings that change an inversion's result (its cache key and the artifact's record): the fields
        marked changes_inversion, with the timestep offset resolved against the model's scheduler config."""
        settings = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["changes_inversion"] and (f.metadata["keyed_at_default"] or value != f.default):
                # a whole number as its float (guidance=7 runs as 7.0): json writes 7 and 7.0 apart, two keys
                settings[f.name] = float(value) if f.type == "float" and _is_number(value) else value
        if self.backend == "reference":  # it computes in fp32 whatever precision says: record what really ran
            settings["precision"] = "fp32"
        if settings["precision"] == "fp32":  # in fp32 these agree to rounding: the same inversion, the same key
            settings.pop("half_norms", None)
            settings.pop("forward_backend", None)
        return {**settings, "steps_offset": self.timestep_offset(scheduler_config)}

    @property
    def model_batch(self) -> int:
        """Images one model call takes (UNet and VAE): batch_size on the fast backend, 1 on the reference (batch 1 by
        design, as the notebook)."""
        return self.batch_size if self.backend == "fast" else 1

    def divergence_advice(self) -> str:
        """What to lower when a result diverged (NaN or inf): the flags among --guidance and --lr raised above their
        defaults, else --guidance."""
        raised = [f"--{name}" for name in ("guidance", "lr") if getattr(self, name) > getattr(NTIConfig, name)]
        return "lower " + (" or ".join(raised) or "--guidance")

    def replace(self, **changes) -> "NTIConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


@functools.cache
def field_docs() -> dict[str, str]:
    """Each NTIConfig field's docstring (the string literal under it), whitespace-normalized: the CLI's help."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(NTIConfig)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs

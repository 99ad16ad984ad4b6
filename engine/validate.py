"""Checks that turn would-be silently wrong results into one clear error: prompts the model would cut or could not
read, flags an inversion file overrides, and results that are not finite. Each raises NTIError (exit 2)."""
from __future__ import annotations

import argparse
import re
from typing import Callable, Sequence

from .config import NTIError

LATENT_LIMIT = 1e4  # SD latents live within about +-5 (after the 0.18215 scale); 1e4 is a diverged run, not an image
WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")  # words; punctuation (",", ".", "!", ...) is a separator, as CLIP's BPE
# splits it off as a token of its own


def prompt_words(prompt: str) -> list[str]:
    """The lower-case words of a prompt, punctuation dropped: "A red circle." -> ["a", "red", "circle"]."""
    return WORD.findall(prompt.lower())


def is_blank(text: str) -> bool:
    """No visible character: empty, whitespace, or only format characters (a zero-width space, a BOM) that strip()
    keeps but a reader cannot see: such a prompt is a missing one, not a request for an unconditional image."""
    return not any(ch.isprintable() and not ch.isspace() for ch in text)


def check_prompt_length(tokenizer, prompts: Sequence[str]) -> None:
    """Refuse prompts longer than the text encoder reads (CLIP: 77 tokens with start and end): the tokenizer would
    drop the words past it without a word, and an edit there would equal the reconstruction."""
    limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit > 100_000:  # a tokenizer without a limit ("very large" sentinel)
        return
    for prompt in dict.fromkeys(prompts):
        count = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
        if count > limit:
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            raise NTIError(f"prompt {shown!r} is {count} tokens long, but the model reads only {limit} (start and "
                           f"end tokens included); the words past that would be silently dropped: shorten it")


def check_finite_latents(latents, label: str) -> None:
    """A result is written only when it is finite and in a sane range: NaN/inf or a diverged latent would decode to
    an all-black (or noise) image that looks like a result."""
    import torch

    if not torch.isfinite(latents).all():
        raise NTIError(f"{label}: the result is not finite (NaN or inf), nothing written; lower --guidance or check "
                       f"the inversion")
    peak = float(latents.abs().max()) if latents.numel() else 0.0
    if peak > LATENT_LIMIT:
        raise NTIError(f"{label}: the result diverged (latent magnitude {peak:.3g} > {LATENT_LIMIT:g}), nothing "
                       f"written; lower --guidance")


# ---------------------------------------------------------------------------------------- options given explicitly

class _NotGiven:
    def __repr__(self) -> str:
        return "<not given>"


NOT_GIVEN = _NotGiven()


def explicit_options(build_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str]) -> set[str]:
    """Destinations of the options the user typed (not those left at their defaults): argv parsed again with every
    default replaced by a marker. Works for any parser layout, abbreviations and `--opt=value` forms included."""
    parser = build_parser()
    for action in _all_actions(parser):
        if action.option_strings and not isinstance(action, (argparse._AppendAction, argparse._HelpAction)) \
                and action.dest != argparse.SUPPRESS:
            action.default = NOT_GIVEN
    args = parser.parse_args(list(argv))
    return {dest for dest, value in vars(args).items() if value is not NOT_GIVEN}


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_actions(sub)


# flag destination -> (inversion setting, how the flag's value reads as that setting)
FILE_SETTINGS = {
    "steps": ("steps", int),
    "guidance": ("guidance", float),
    "guidance_schedule": ("guidance_schedule", str),
    "steps_offset": ("steps_offset", int),
    "method": ("method", str),
    "inner_steps": ("inner_steps", int),
    "no_early_stop": ("early_stop", lambda flag: not flag),
}


def check_flags_against_inversion(args, explicit: set[str], settings: dict, path) -> None:
    """An inversion is edited with the settings it was made with. Flags the user typed that say otherwise would be
    silently ignored: refuse them, naming the file's values."""
    conflicts = []
    for dest, (key, convert) in FILE_SETTINGS.items():
        if dest in explicit and key in settings and getattr(args, dest, None) is not None:
            if convert(getattr(args, dest)) != settings[key]:
                conflicts.append(("--" + dest.replace("_", "-"), getattr(args, dest), key, settings[key]))
    if conflicts:
        given = ", ".join(f"{flag} {value}" if not isinstance(value, bool) else flag
                          for flag, value, _, _ in conflicts)
        made = ", ".join(f"{key}={recorded!r}" for _, _, key, recorded in conflicts)
        raise NTIError(f"{given} conflict(s) with inversion {path}, made with {made}: a saved inversion is edited "
                       f"with its own settings; drop {' and '.join(c[0] for c in conflicts)} or invert again with them")

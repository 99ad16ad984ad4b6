"""The Python API used as an outside tool would, adversarially: wrong types and values for every public function's
arguments get an nti.NTIError naming the argument and what to pass, never a bare TypeError/AttributeError from deep
inside torch, a silently wrong result, or a user's file overwritten."""
import dataclasses

import pytest
import torch
from PIL import Image

import nti
from nti.config import NTIError

FEW = dict(steps=2, inner_steps=1)


@pytest.mark.parametrize("field, value, message", [
    # bool is an int to Python: steps=True ran one step, batch_size=True a batch of one, without a word
    ("steps", True, "steps must be a positive integer; got True"),
    ("batch_size", True, "batch_size must be a positive integer; got True"),
    ("inner_steps", True, "inner_steps must be a non-negative integer; got True"),
    ("seed", True, "seed must be an integer"),
    ("steps_offset", True, "steps_offset must be a non-negative integer or None"),
    ("self_replace_max_tokens", True, "self_replace_max_tokens must be a non-negative integer"),
    # switches were read by truthiness: early_stop="no" kept early stop on, and was recorded as "no"
    ("early_stop", "no", "early_stop must be True or False; got 'no'"),
    ("half_norms", 1, "half_norms must be True or False; got 1"),
    ("compile", "yes", "compile must be True or False; got 'yes'"),
    ("fused_step", 0, "fused_step must be True or False or None; got 0"),
    # TypeError: '<=' not supported between instances of 'float' and 'str'
    ("cross_replace", "0.5", r"cross_replace must be a fraction of the steps in \[0, 1\]; got '0.5'"),
    ("self_replace", None, r"self_replace must be a fraction of the steps in \[0, 1\]; got None"),
    ("blend_start", [0.2], r"blend_start must be a fraction"),
    # never checked: nan made an empty blend mask (the edit silently undone), a string crashed inside torch
    ("blend_threshold", float("nan"), "blend_threshold must be a finite number; got nan"),
    ("blend_threshold", "0.3", "blend_threshold must be a finite number; got '0.3'"),
    # TypeError: 'NoneType' object is not iterable; [None] became the word 'None'
    ("blend_words", None, "blend_words must be a word or a list of words"),
    ("blend_words", 5, "blend_words must be a word or a list of words"),
    ("blend_words", [None], "blend_words must be a word or a list of words"),
    ("export_cache", 5, "export_cache must be a folder path or None; got 5"),
])
def test_config_fields_of_the_wrong_type_are_refused(field, value, message):
    extra = {"edit": "p2p-refine"} if field in ("blend_words", "blend_threshold") else {}
    with pytest.raises(NTIError, match=message):
        nti.NTIConfig(**{field: value}, **extra)
    with pytest.raises(NTIError, match=message):  # replace() goes through the same checks
        nti.NTIConfig(**extra).replace(**{field: value})


def test_config_values_that_stay_accepted():
    """What the tightened checks must still take: the CLI's and JSON's types, extremes tests rely on."""
    config = nti.NTIConfig(edit="p2p-refine", blend_words={"cat"}, blend_threshold=-1.0, fused_step=None,
                           early_stop=False, steps_offset=None, export_cache=None, reweight={"cat": 2})
    assert config.blend_words == ("cat",) and config.reweight == (("cat", 2.0),)
    assert nti.NTIConfig(blend_threshold=1, cross_replace=1, self_replace=0).blend_threshold == 1

"""A model's scheduler config at unusual but legal settings, end to end on the tiny model: the engine's sampling and
inversion against diffusers' StableDiffusionPipeline and DDIMInverseScheduler, or a clear NTIError."""
import pytest

import nti
from nti import NTIConfig, NTIError


def test_timesteps_past_the_models_last_are_an_ntierror(tiny_pipe, cat_image):
    """1000 steps with SD's steps_offset 1 asks for t = 1000 of a 0..999 model: refused before any UNet call."""
    for config in (NTIConfig(steps=1000), NTIConfig(steps=50, steps_offset=25)):
        with pytest.raises(NTIError, match="reaches timestep"):
            nti.invert(tiny_pipe, cat_image, "a cat", config, progress=False)

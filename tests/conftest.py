import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub


@pytest.fixture(scope="session")
def tiny_pipe():
    from nti.models import build_tiny_pipeline
    return build_tiny_pipeline(seed=0, device="cpu")


@pytest.fixture(scope="session")
def shapes_pipe():
    """The default model (the trained shapes model), through the diffusers folder loader; shared by every file."""
    from nti.models import load_pipeline
    return load_pipeline(None, device="cpu")


@pytest.fixture(scope="session")
def cat_image():
    from nti.images import load_image
    return load_image("skimage:chelsea")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ||a - b|| / ||b||."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))

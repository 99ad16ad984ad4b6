import logging
import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a hub
# the model fingerprint's memo of file hashes (models.hash_memo_path) in a temp folder, not the user's ~/.cache
os.environ.setdefault("NTI_HASH_MEMO", os.path.join(tempfile.mkdtemp(prefix="nti-hash-memo-"), "file-sha256.json"))


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


def assert_fast_equals_reference(pipe, image, prompt, target, config, edit_config=None, z_tol=1e-4, emb_tol=3e-4,
                                 edit_tol=1e-4):
    """Null-text inversion batched on the fast path (2 images) equals the batch-1 reference: same inner iterations,
    z_T and null embeddings within the tolerances, and so do their edits. Returns (reference inversion, its edit)."""
    import nti

    ref = nti.invert(pipe, image, prompt, config, progress=False)[0]
    fast = nti.invert(pipe, [image] * 2, prompt, config.replace(backend="fast", batch_size=2), progress=False)
    for inv in fast:
        assert inv.iterations == ref.iterations and rel_err(inv.z_T, ref.z_T) < z_tol
        assert rel_err(inv.null_embeddings, ref.null_embeddings) < emb_tol
    edit_config = edit_config or config
    edit_ref = nti.edit_latents(pipe, [ref], target, edit_config, progress=False)
    edit_fast = nti.edit_latents(pipe, fast[:1], target, edit_config.replace(backend="fast"), progress=False)
    assert rel_err(edit_fast, edit_ref) < edit_tol
    return ref, edit_ref


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for one test module (test_ray.py, test_ray_audit.py), stopped after it."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    # Ray starts workers at nice 15: on a busy shared machine the actors would crawl behind everything else
    niceness = os.environ.get("RAY_worker_niceness")
    os.environ["RAY_worker_niceness"] = "0"
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    finally:
        if niceness is None:
            os.environ.pop("RAY_worker_niceness")
        else:
            os.environ["RAY_worker_niceness"] = niceness
    yield ray
    ray.shutdown()


@pytest.fixture
def nti_warnings():
    """The 'nti' logger's warnings during the test (the CLI's handler, once set up, keeps them from caplog)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("nti")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)

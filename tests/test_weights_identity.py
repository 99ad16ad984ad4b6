"""A pipeline whose weights change in memory after load (a LoRA fused in Python: PEFT's merge adds the delta to
`weight.data` in place, which moves neither the tensor's identity nor its version counter) is another model: it gets
a fingerprint of its own, and nothing made from the loaded weights (cached inversions, the fast path's half-weight
UNet copy, the null embedding) serves it."""
import logging

import pytest
import torch
from PIL import Image

import nti
from nti.config import NTIError
from nti.models import build_tiny_pipeline

FEW = nti.NTIConfig(steps=3, inner_steps=2)
IMAGE = Image.new("RGB", (32, 32), (200, 40, 40))


def fuse_delta(module: torch.nn.Module, name: str, seed: int = 1, scale: float = 0.05) -> None:
    """What PEFT's merge does to a LoRA's base layer: weight.data += B @ A (rank 2 here)."""
    weight = dict(module.named_parameters())[name]
    g = torch.Generator().manual_seed(seed)
    b, a = torch.randn(weight.shape[0], 2, generator=g), torch.randn(2, weight.shape[1], generator=g)
    weight.data += scale * b @ a


def to_k_name(pipe) -> str:
    return next(n for n, _ in pipe.unet.named_parameters() if n.endswith("attn2.to_k.weight"))


def test_an_unchanged_pipeline_keeps_its_fingerprint_through_every_path(caplog):
    """The witness reads the same after reference and fast runs, edits and generation: no spurious new identity."""
    pipe = build_tiny_pipeline(seed=0)
    before = pipe.fingerprint
    with caplog.at_level(logging.INFO, logger="nti"):
        inv = nti.invert(pipe, IMAGE, "a cat", FEW, progress=False)[0]
        nti.invert(pipe, IMAGE, "a cat", FEW.replace(backend="fast", precision="bf16"), progress=False)
        nti.edit(pipe, [inv], "a dog", FEW.replace(edit="p2p-replace"), progress=False)
        nti.generate(pipe, "a dog", FEW, progress=False)
    assert pipe.fingerprint == before
    assert "changed in memory" not in caplog.text


def test_a_fused_lora_is_another_model_for_the_cache(tmp_path, caplog):
    """invert_cached handed back the base model's cached inversion for the fused model (same fingerprint)."""
    pipe = build_tiny_pipeline(seed=0)
    base = pipe.fingerprint
    first = nti.api.invert_cached(pipe, [IMAGE], ["a cat"], FEW, cache=tmp_path, progress=False)[0]
    fuse_delta(pipe.unet, to_k_name(pipe))
    with caplog.at_level(logging.INFO, logger="nti"):
        second = nti.api.invert_cached(pipe, [IMAGE], ["a cat"], FEW, cache=tmp_path, progress=False)[0]
    assert pipe.fingerprint != base and second.model_fingerprint == pipe.fingerprint
    assert "changed in memory" in caplog.text
    # what the fused weights give without any cache: a fresh pipeline with the same delta fused in
    fresh = build_tiny_pipeline(seed=0)
    fuse_delta(fresh.unet, to_k_name(fresh))
    truth = nti.invert(fresh, IMAGE, "a cat", FEW, progress=False)[0]
    assert not torch.equal(second.z_T, first.z_T) or not torch.equal(second.null_embeddings, first.null_embeddings)
    assert torch.equal(second.null_embeddings, truth.null_embeddings) and torch.equal(second.z_T, truth.z_T)
    assert fresh.fingerprint == pipe.fingerprint  # the same weights in memory: the same identity, cache shared
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_the_base_models_inversion_is_refused_by_the_fused_model():
    pipe = build_tiny_pipeline(seed=0)
    inv = nti.invert(pipe, IMAGE, "a cat", FEW, progress=False)[0]
    fuse_delta(pipe.unet, to_k_name(pipe))
    with pytest.raises(NTIError, match="this inversion was made with model"):
        nti.edit_latents(pipe, [inv], "a dog", FEW, progress=False)


def test_the_fast_paths_half_weight_copy_follows_the_weights():
    """The bf16 UNet copy made on the first fast call kept serving the old weights after a fused LoRA."""
    config = FEW.replace(backend="fast", precision="bf16", half_weights=True)
    pipe = build_tiny_pipeline(seed=0)
    nti.invert(pipe, IMAGE, "a cat", config, progress=False)  # makes and keeps the half-weight copy
    fuse_delta(pipe.unet, to_k_name(pipe))
    after = nti.invert(pipe, IMAGE, "a cat", config, progress=False)[0]
    fresh = build_tiny_pipeline(seed=0)
    fuse_delta(fresh.unet, to_k_name(fresh))
    truth = nti.invert(fresh, IMAGE, "a cat", config, progress=False)[0]
    assert torch.equal(after.z_T, truth.z_T) and torch.equal(after.null_embeddings, truth.null_embeddings)


def test_a_changed_text_encoder_gets_a_new_null_embedding():
    """The null embedding is cached on the pipeline: it must be made again from the changed text encoder."""
    pipe = build_tiny_pipeline(seed=0)
    old = nti.api.null_embedding(pipe).clone()
    token_embedding = next(n for n, _ in pipe.text_encoder.named_parameters() if "token_embedding" in n)
    with torch.no_grad():
        dict(pipe.text_encoder.named_parameters())[token_embedding].data.mul_(1.5)
    nti.generate(pipe, "a dog", FEW, progress=False)  # any API call notices
    new = nti.api.null_embedding(pipe)
    assert not torch.equal(new, old)
    assert torch.equal(new, nti.models.encode_prompts(pipe, [""]))

"""How a UNet takes its text conditioning: SD v1.x/2.x one token-embedding tensor; SDXL (Podell et al. 2023) also a
pooled text embedding and size/crop time ids, carried inside the one context tensor the engine passes around."""
from __future__ import annotations

from dataclasses import dataclass

import torch

TIME_IDS = 6  # SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)


@dataclass
class PooledConditioning:
    """SDXL's extra UNet inputs (Podell et al. 2023, Sec. 2.2): the second text encoder's pooled embedding and the
    size/crop micro-conditioning `time_ids`, as StableDiffusionXLPipeline builds them at the native resolution.

    The engine passes the text conditioning around as one tensor, the *context*: for SDXL it is packed as
    (B, 77 + 1, 2048), the 77 token embeddings of both encoders (concatenated features) and one more row holding
    the pooled embedding in its first `pooled_dim` entries (zeros after). So the null-text optimization, the
    CFG/P2P batches, the saved artifacts and the CUDA graphs' static buffers handle SDXL's unconditional input
    (tokens and pooled) as one tensor, and `unet_inputs` unpacks it at the UNet call."""

    pooled_dim: int  # text_encoder_2's projection_dim (1280 for SDXL base)
    time_ids: torch.Tensor  # (1, 6) fp32 on the device: (h, w, 0, 0, h, w) at the native resolution
    zero_null: bool  # model_index force_zeros_for_empty_prompt: the unconditional input is all zeros, not ""


def conditioning_record(pooled: PooledConditioning | None) -> dict:
    """What an inversion records of the model's extra conditioning, to refuse an edit under other time ids."""
    if pooled is None:
        return {}
    return {"pooled_dim": pooled.pooled_dim, "time_ids": [float(x) for x in pooled.time_ids.flatten().tolist()]}


def pack_pooled(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """SDXL context (B, 77 + 1, D) from token embeddings (B, 77, D) and pooled embeddings (B, P), P <= D."""
    row = tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])
    row[:, 0, :pooled.shape[1]] = pooled
    return torch.cat([tokens, row], dim=1)


def unet_inputs(pooled: PooledConditioning | None, context: torch.Tensor) -> dict:
    """The UNet's conditioning keyword arguments for a context tensor: encoder_hidden_states, and for SDXL the
    pooled text_embeds and time_ids unpacked from it (views: no copy, no host sync, CUDA-graph safe)."""
    if pooled is None:
        return {"encoder_hidden_states": context}
    extra = {"text_embeds": context[:, -1, :pooled.pooled_dim],
             "time_ids": pooled.time_ids.expand(context.shape[0], -1)}
    return {"encoder_hidden_states": context[:, :-1], "added_cond_kwargs": extra}


def null_grad_mask(pipe, optimize_pooled: bool) -> torch.Tensor | None:
    """Multiplier of the null embedding's gradient: None (all of it optimized), or for SDXL without
    optimize_pooled ones with the pooled row zeroed, so Adam (zero gradient -> zero update) leaves it as it began."""
    if pipe.pooled is None or optimize_pooled:
        return None
    mask = torch.ones(1, *pipe.context_shape, device=pipe.device)
    mask[:, -1] = 0
    return mask

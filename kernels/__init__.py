"""Fused DDIM / guidance / inner-loss kernels as `nti::` custom ops; Triton when available, torch otherwise."""
from nti.kernels.ddim import (
    ddim_step,
    ddim_step_ref,
    guided_ddim_step,
    guided_ddim_step_mse,
    guided_ddim_step_mse_ref,
    guided_ddim_step_ref,
    guided_eps_ref,
    triton_enabled,
)

__all__ = [
    "ddim_step",
    "guided_ddim_step",
    "guided_ddim_step_mse",
    "triton_enabled",
    "ddim_step_ref",
    "guided_eps_ref",
    "guided_ddim_step_ref",
    "guided_ddim_step_mse_ref",
]

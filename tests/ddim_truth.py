"""An independent float64 truth for the DDIM step, CFG and the null-text loss, for the kernel tests.

Written here from the papers, in a different algebraic form from both engine/ddim.py and kernels/ddim.py (which
predict x0 first), so a test comparing either with it compares two implementations, not one with itself:
  DDIM, Song et al. 2021 Eq. 12 (eta = 0):
      x_to = sqrt(a_to / a_from) x + (sqrt(1 - a_to) - sqrt(a_to (1 - a_from) / a_from)) eps
  CFG, Ho & Salimans 2022:               eps = eps_u + w (eps_c - eps_u)
  null-text loss, Mokady et al. 2023:    mean over the image of (x_prev - target)^2
Gradients come from autograd through these float64 formulas.
"""
import torch


def _coefficient(c, like: torch.Tensor) -> torch.Tensor:
    """A per-image coefficient (B,), a 0-d tensor or a float, as float64 broadcasting over (B, ...)."""
    c = torch.as_tensor(c, dtype=torch.float64)
    return c.reshape(-1, *([1] * (like.ndim - 1)))


def ddim(x, eps, a_from, a_to) -> torch.Tensor:
    x, eps = x.double(), eps.double()
    af, at = _coefficient(a_from, x), _coefficient(a_to, x)
    return (at / af).sqrt() * x + ((1 - at).sqrt() - (at * (1 - af) / af).sqrt()) * eps


def guided_ddim(x, eps_u, eps_c, w, a_t, a_prev) -> torch.Tensor:
    eps_u, eps_c = eps_u.double(), eps_c.double()
    return ddim(x, eps_u + _coefficient(w, eps_u) * (eps_c - eps_u), a_t, a_prev)


def null_text_loss(x, eps_u, eps_c, w, a_t, a_prev, target) -> torch.Tensor:
    """(B,) per-image mean squared error of the guided step against the target."""
    diff = guided_ddim(x, eps_u, eps_c, w, a_t, a_prev) - target.double()
    return diff.square().flatten(1).mean(1)


def leaves64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """float64 copies of the inputs, each a leaf requiring grad (the truth's autograd inputs)."""
    return [t.detach().double().requires_grad_() for t in tensors]

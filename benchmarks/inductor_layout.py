"""Why --compile-scope unet compiles with inductor's layout optimization off (engine/runner.py INDUCTOR_OPTIONS).

One Stable Diffusion up-block pattern, in plain torch: a ResNet block whose output is divided by its
output_scale_factor (1.0 in SD), then Upsample2D's nearest interpolation and conv. Compiled with inductor, the
gradient with respect to the input should equal eager's; on torch 2.13 (CPU) it is all zeros while inductor's
layout optimization is on, and right with it off. Run it on any torch/device to see whether that build has the bug:

    python -m nti.benchmarks.inductor_layout [--device cuda]

Found through the whole tiny UNet: the null-text gradient came out 25% off (inductor, CPU) while every block
compiled alone was right to 1e-6; compiling SD's first UpBlock2D alone gave a zero gradient.
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn


class ResnetThenUpsample(nn.Module):
    """GroupNorm-SiLU-conv twice plus a 1x1 shortcut, `/ 1.0`, then nearest upsampling and a conv."""

    def __init__(self, cin: int = 128, c: int = 64, groups: int = 32):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin), nn.Conv2d(cin, c, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c), nn.Conv2d(c, c, 3, padding=1)
        self.shortcut, self.up_conv = nn.Conv2d(cin, c, 1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor, output_scale_factor: float = 1.0) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        out = (self.shortcut(x) + h) / output_scale_factor
        return self.up_conv(F.interpolate(out, scale_factor=2.0, mode="nearest"))


def input_grad(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    return torch.autograd.grad(fn(x).square().mean(), x)[0]


def layout_grad_errors(device: str | torch.device) -> dict[bool, float]:
    """Relative error of the compiled input gradient vs eager's, with inductor's layout optimization on and off."""
    torch.manual_seed(0)
    model = ResnetThenUpsample().to(device).requires_grad_(False)  # frozen weights, as null-text inversion's UNet
    x = torch.randn(2, 128, 8, 8, device=device)
    eager = input_grad(model, x)
    errors = {}
    for layout_optimization in (True, False):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, dynamic=False,
                                 options={"layout_optimization": layout_optimization})
        errors[layout_optimization] = ((input_grad(compiled, x) - eager).norm() / eager.norm()).item()
    torch._dynamo.reset()
    return errors


def main(argv=None) -> None:
    from nti.config import NTIError
    from nti.models import parse_device

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    try:
        device = parse_device(parser.parse_args(argv).device)
    except NTIError as err:
        parser.error(str(err))
    print(f"torch {torch.__version__} on {device}")
    for layout_optimization, err in layout_grad_errors(device).items():
        print(f"layout_optimization={layout_optimization}: input gradient relative error {err:.1e} "
              f"({'WRONG' if err > 1e-3 else 'right'})")


if __name__ == "__main__":
    main()

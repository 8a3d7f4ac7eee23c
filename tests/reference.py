"""Builders of tiny diffusers 0.42.1 reference models (the numerical oracle, tests only) and weight helpers.

Each section belongs to one project module; add to your section, keep the others as they are.
"""
import math

import torch


def randomize_(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Re-randomise every parameter and floating buffer (dit.md §13.1), so no path is silently zero.

    `A_log = log(U(0,1)*2 + 0.1)`, `dt_bias = 0.5*randn`, `*norm*.weight = 1 + 0.1*randn`,
    other tensors with dim > 1: `randn * 0.5/sqrt(fan_in)`, 1-D tensors: `0.1*randn`.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point() or p.numel() == 0:
                continue
            r = lambda: torch.randn(p.shape, generator=g, dtype=torch.float64)  # noqa: E731
            if name.endswith("A_log"):
                v = torch.log(torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 + 0.1)
            elif name.endswith("dt_bias"):
                v = 0.5 * r()
            elif "norm" in name and name.endswith("weight"):
                v = 1 + 0.1 * r()
            elif p.dim() > 1:
                v = r() * 0.5 / math.sqrt(p[0].numel())
            else:
                v = 0.1 * r()
            p.copy_(v.to(p.dtype))
    return module


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|: the relative error the project's tolerances speak of."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

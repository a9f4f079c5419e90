"""Small deterministic problems shared by the fuse_optim tests."""

from __future__ import annotations

import torch


def spd_matrix(dim: int, condition_number: float, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random symmetric positive definite matrix with eigenvalues log-spaced in [1, condition_number]."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
    eigenvalues = torch.logspace(0, torch.log10(torch.tensor(condition_number)).item(), dim, dtype=torch.float64)
    return ((q * eigenvalues) @ q.T).to(dtype)


def step_iterates(opt: torch.optim.Optimizer, x: torch.Tensor, steps: int, fn) -> list[torch.Tensor]:
    """``steps`` calls of ``opt.step`` with a closure of ``fn(x)``; the iterate after each step."""

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss

    iterates = []
    for _ in range(steps):
        opt.step(closure)
        iterates.append(x.detach().clone())
    return iterates

"""Shared fixtures for the fuse_optim tests: small deterministic problems and closure builders."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from .problems import spd_matrix


class ClosureFactory:
    """Builds ``closure()`` functions that zero the gradients, evaluate ``fn(*params)``, call
    ``backward()`` and count their calls in ``self.calls``."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
                 fn: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            self.calls += 1
            optimizer.zero_grad()
            loss = fn(*params)
            loss.backward()
            return loss

        return closure


@pytest.fixture(scope="package", autouse=True)
def single_intra_op_thread():
    """Run these tests on one intra-op thread (restored afterwards).

    Every problem here is tiny, so extra threads only add synchronisation, and on a busy 2-core
    machine each OpenMP barrier can wait for a descheduled thread: measured 20x slower per step.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_closure() -> ClosureFactory:
    return ClosureFactory()


@pytest.fixture(scope="session")
def quadratic_problem() -> dict[str, torch.Tensor]:
    """f(x) = 1/2 x'Ax - b'x in 8-D (condition number 100), its minimiser and a start."""
    a = spd_matrix(8, 100.0, seed=0)
    generator = torch.Generator().manual_seed(1)
    b = torch.randn(8, generator=generator, dtype=torch.float64)
    return {"A": a, "b": b, "x_star": torch.linalg.solve(a, b),
            "x0": torch.randn(8, generator=generator, dtype=torch.float64)}


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits (1,797 x 64, inputs scaled to [0, 1]) as float64 tensors."""
    from sklearn.datasets import load_digits

    inputs, targets = load_digits(return_X_y=True)
    return torch.tensor(inputs / 16.0, dtype=torch.float64), torch.tensor(targets)

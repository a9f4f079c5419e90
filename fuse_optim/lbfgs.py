"""Limited-memory BFGS memory and search direction for minibatch training.

The memory holds the last ``m`` curvature pairs ``s_i = x_{i+1} - x_i`` and
``y_i = g(x_{i+1}; B_i) - g(x_i; B_i)`` in preallocated ``(m, d)`` ring buffers. Both gradients of
a pair come from the *same* minibatch ``B_i`` (torch.optim.LBFGS differences gradients of
different batches across ``step()`` calls, which mixes sampling noise into ``y``).

Direction: ``d = -H_k g_k`` by the two-loop recursion (paper Algorithm 2; Nocedal & Wright
Algorithm 7.4). The initial inverse Hessian ``H_k^0`` is either the classical scalar
``gamma_k I`` with ``gamma_k = s'y / y'y`` of the newest pair (Eq. 7.20), or, new here,
``gamma_k D`` with ``D = diag(1 / (sqrt(v_hat) + eps))`` from Adam's bias-corrected second
moment and ``gamma_k = s'y / y'Dy`` (the scalar that best fits the secant equation in the
``D``-metric).

Low-curvature pairs: with ``curvature="skip"`` a pair is dropped unless
``s'y > curvature_eps * ||s|| ||y||`` (a cosine test: invariant to scaling ``f`` or ``x``); with
``curvature="damp"`` Powell's damping replaces ``y`` by ``theta y + (1 - theta) B0 s`` with
``B0 = I / gamma`` so that ``s'y >= 0.2 s'B0 s`` (Nocedal & Wright Procedure 18.2).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["LBFGSMemory"]


class LBFGSMemory:
    """Ring buffer of curvature pairs plus the two-loop recursion.

    The buffers have ``m + 1`` rows: a new pair is written straight into the free row and only
    then tested, so a skipped pair never overwrites the oldest stored one and no temporary
    ``(s, y)`` copies are made.
    """

    def __init__(self, history_size: int, dimension: int, *, dtype: torch.dtype, device: torch.device,
                 curvature: str = "skip", curvature_eps: float = 1e-8) -> None:
        if curvature not in ("skip", "damp"):
            raise ValueError(f"curvature must be 'skip' or 'damp', got {curvature!r}")
        self.history_size = history_size
        self.curvature = curvature
        self.curvature_eps = curvature_eps
        # One (2, m + 1, d) buffer: s and y are views of it, and its (2(m + 1), d) flat view serves the
        # compact representation's matrix-vector products.
        self._pairs = torch.zeros(2, history_size + 1, dimension, dtype=dtype, device=device)
        self.s, self.y = self._pairs[0], self._pairs[1]
        self._stacked = self._pairs.view(2 * (history_size + 1), dimension)
        # Gram matrices by physical row, float64: s_i'y_j (upper triangle in age order is R) and y_i'y_j.
        self._sty = torch.zeros(history_size + 1, history_size + 1, dtype=torch.float64, device=device)
        self._yty = torch.zeros(history_size + 1, history_size + 1, dtype=torch.float64, device=device)
        self.rho = torch.zeros(history_size + 1, dtype=dtype, device=device)
        self._alpha = torch.zeros(history_size + 1, dtype=dtype, device=device)
        self.gamma = 1.0
        self.rows: list[int] = []  # physical rows of the stored pairs, oldest first
        self._gram_pending: int | None = None  # row whose Gram column the next direction computes
        self.accepted = 0
        self.skipped = 0
        self.damped = 0

    @property
    def count(self) -> int:
        """Pairs stored, at most ``history_size``."""
        return len(self.rows)

    def reset(self) -> None:
        """Forget every pair (after a failure); counters are kept."""
        self.rows, self.gamma, self._gram_pending = [], 1.0, None

    def free_row(self) -> int:
        """The physical row the next pair is written into."""
        used = set(self.rows)
        return next(r for r in range(self.history_size + 1) if r not in used)

    def push(self, s: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
        """Store the pair ``(s, y)`` if it has enough curvature; returns whether it was stored.

        ``s`` and ``y`` may already be the free row's views (``self.s[free_row()]``), which
        saves a copy. ``scale`` is the diagonal ``D`` of the initial inverse Hessian (``None``:
        identity); it enters ``gamma`` and the damping's ``B0``.
        """
        row = self.free_row()
        s_row, y_row = self.s[row], self.y[row]
        if s.data_ptr() != s_row.data_ptr():
            s_row.copy_(s)
        if y.data_ptr() != y_row.data_ptr():
            y_row.copy_(y)
        sy, y_norm = float(torch.dot(s_row, y_row)), float(y_row.norm())
        s_norm = float(s_row.norm())
        if not (s_norm > 0 and y_norm > 0) or not all(map(_is_finite, (sy, s_norm, y_norm))):
            self.skipped += 1
            return False
        damped = sy <= self.curvature_eps * s_norm * y_norm
        if damped:
            if self.curvature == "skip":
                self.skipped += 1
                return False
            # Powell damping with B0 = D^{-1} / gamma; gamma from the memory, or from ||s|| / ||y||.
            gamma = self.gamma if self.rows else s_norm / y_norm
            b0_s = s_row / (gamma * scale) if scale is not None else s_row / gamma
            s_b0_s = float(torch.dot(s_row, b0_s))
            theta = 0.8 * s_b0_s / (s_b0_s - sy)
            y_row.mul_(theta).add_(b0_s, alpha=1 - theta)
            sy = float(torch.dot(s_row, y_row))
            self.damped += 1
        self.rho[row] = 1.0 / sy
        # The Gram column of the new pair ([S'y_new; Y'y_new]) is computed with the next direction's
        # products in one matrix-matrix product: one pass over the stacked history instead of two.
        if self._gram_pending is not None:  # two pairs without a direction in between: settle the first
            self._settle_gram(self._gram_pending, torch.mv(self._stacked, self.y[self._gram_pending]))
        self._gram_pending = row if self._use_compact() else None
        self.rows.append(row)
        if len(self.rows) > self.history_size:
            self.rows.pop(0)
        if scale is not None:
            y_dy = float(torch.dot(y_row, y_row * scale))
        elif damped:
            y_dy = float(torch.dot(y_row, y_row))
        else:
            y_dy = y_norm * y_norm
        self.gamma = sy / y_dy
        self.accepted += 1
        return True

    def direction(self, grad: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``d = -H g`` by the two-loop recursion (paper Algorithm 2); ``-g`` (or ``-D g``) when empty.

        On the CPU the 2m scalars go through Python floats (a read-back costs nothing there and
        ``add_(alpha=float)`` is the fastest kernel); on accelerators they stay on the device
        (``addcmul_`` with 0-dim tensors) so that the recursion never waits for the host.
        """
        if scale is None and self.rows and self._use_compact():
            return self._direction_compact(grad)
        if grad.device.type == "cpu":
            return self._direction_host_scalars(grad, scale)
        q = grad.neg()
        alpha = self._alpha
        for row in reversed(self.rows):
            alpha[row] = self.rho[row] * torch.dot(self.s[row], q)
            q.addcmul_(self.y[row], alpha[row], value=-1)
        if scale is not None:
            q.mul_(scale)
        if self.rows:
            q.mul_(self.gamma)
        for row in self.rows:
            beta = self.rho[row] * torch.dot(self.y[row], q)
            q.addcmul_(self.s[row], alpha[row] - beta)
        return q

    #: from this many parameters on, the compact representation measured faster than the two-loop
    #: recursion (three large matrix-vector products instead of 4m vector operations; BENCHMARKS.md)
    COMPACT_MIN_DIMENSION = 1 << 16

    def _use_compact(self) -> bool:
        return self.s.shape[1] >= self.COMPACT_MIN_DIMENSION

    def _settle_gram(self, row: int, products: torch.Tensor) -> None:
        """Store ``[S'y_row; Y'y_row]`` as the Gram column (and row) of ``row``."""
        m1 = self.history_size + 1
        products = products.to(torch.float64)
        self._sty[:, row] = products[:m1]
        self._yty[:, row] = products[m1:]
        self._yty[row, :] = products[m1:]
        self._gram_pending = None

    def _direction_compact(self, grad: torch.Tensor) -> torch.Tensor:
        """``d = -H g`` by the compact representation (Byrd, Nocedal & Schnabel 1994, Eq. 3.13):

        ``H = gamma I + [S  gamma Y] M [S'; gamma Y']`` gives, with ``a = S'g``, ``b = Y'g``, ``R`` the
        upper triangle of ``S'Y`` (age order) and ``D`` its diagonal,
        ``p = R^{-1} a``, ``w = R^{-T}((D + gamma Y'Y) p - gamma b)`` and
        ``H g = gamma g + S w - gamma Y p``: two passes over the stacked history plus small solves.
        """
        m1 = self.history_size + 1
        index = torch.tensor(self.rows, device=grad.device)
        pending = self._gram_pending
        if pending is not None:
            both = torch.mm(self._stacked, torch.stack([self.y[pending], grad]).t()).to(torch.float64)
            self._settle_gram(pending, both[:, 0])
            products = both[:, 1]
        else:
            products = torch.mv(self._stacked, grad).to(torch.float64)
        a, b = products[:m1][index], products[m1:][index]
        r = torch.triu(self._sty[index][:, index])
        yty = self._yty[index][:, index]
        gamma = self.gamma
        p = torch.linalg.solve_triangular(r, a.unsqueeze(1), upper=True).squeeze(1)
        rhs = torch.diagonal(r) * p + gamma * (yty @ p) - gamma * b
        w = torch.linalg.solve_triangular(r.t(), rhs.unsqueeze(1), upper=False).squeeze(1)
        coefficients = torch.zeros(2 * m1, dtype=torch.float64, device=grad.device)
        coefficients[index] = w
        coefficients[m1 + index] = -gamma * p
        direction = torch.mv(self._stacked.t(), coefficients.to(grad.dtype))
        return direction.add_(grad, alpha=gamma).neg_()

    def _direction_host_scalars(self, grad: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        q = grad.neg()
        rho = self.rho.tolist()
        alpha = [0.0] * len(rho)
        for row in reversed(self.rows):
            alpha[row] = rho[row] * float(torch.dot(self.s[row], q))
            q.add_(self.y[row], alpha=-alpha[row])
        if scale is not None:
            q.mul_(scale)
        if self.rows:
            q.mul_(self.gamma)
        for row in self.rows:
            beta = rho[row] * float(torch.dot(self.y[row], q))
            q.add_(self.s[row], alpha=alpha[row] - beta)
        return q

    def state_dict(self) -> dict[str, Any]:
        return {
            "s": self.s.clone(), "y": self.y.clone(), "rho": self.rho.clone(), "gamma": self.gamma,
            "sty": self._sty.clone(), "yty": self._yty.clone(), "gram_pending": self._gram_pending,
            "rows": list(self.rows), "accepted": self.accepted, "skipped": self.skipped, "damped": self.damped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["s"].shape) != tuple(self.s.shape):
            raise ValueError(
                f"L-BFGS memory of shape {tuple(state['s'].shape)} does not fit (history_size + 1) x dimension "
                f"{tuple(self.s.shape)}"
            )
        for name in ("s", "y", "rho"):
            getattr(self, name).copy_(state[name])
        if "sty" in state:
            self._sty.copy_(state["sty"].to(torch.float64))
            self._yty.copy_(state["yty"].to(torch.float64))
            self._gram_pending = state.get("gram_pending")
        else:  # a state saved before the compact representation existed
            self._sty.copy_(self.s.to(torch.float64) @ self.y.to(torch.float64).t())
            self._yty.copy_(self.y.to(torch.float64) @ self.y.to(torch.float64).t())
        self.gamma, self.rows = float(state["gamma"]), [int(r) for r in state["rows"]]
        self.accepted, self.skipped, self.damped = int(state["accepted"]), int(state["skipped"]), int(state["damped"])


def _is_finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))

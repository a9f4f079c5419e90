"""Limited-memory BFGS memory and search direction for minibatch training.

The memory holds the last ``m`` curvature pairs ``s_i = x_{i+1} - x_i`` and
``y_i = g(x_{i+1}; B_i) - g(x_i; B_i)`` in one preallocated buffer of ``m + 1`` slots. Both
gradients of a pair come from the *same* minibatch ``B_i`` (torch.optim.LBFGS differences gradients
of different batches across ``step()`` calls, which mixes sampling noise into ``y``).

Direction ``d = -H_k g_k`` (paper arXiv 2503.04204 Algorithm 2). The initial inverse Hessian
``H_k^0`` is either the classical scalar ``gamma_k I`` with ``gamma_k = s'y / y'y`` of the newest
pair (Nocedal & Wright Eq. 7.20), or, new here, ``gamma_k D`` with
``D = diag(1 / (sqrt(v_hat) + eps))`` from Adam's bias-corrected second moment and
``gamma_k = s'y / y'Dy`` (the scalar that best fits the secant equation in the ``D``-metric).

Two representations of the same ``H_k g`` (they differ by rounding only):

* ``"two_loop"``: the two-loop recursion (Nocedal & Wright Algorithm 7.4): ``4m`` vector
  operations (dot products and axpys), each streaming one history vector and the work vector
  ``q``; torch's own kernels, which use every intra-op thread.
* ``"compact"`` (scalar ``H_0`` only): Byrd, Nocedal & Schnabel (1994), Eq. 3.1,
  ``H = gamma I + [S  gamma Y] M [S'; gamma Y']`` with the Gram matrices ``S'Y`` and ``Y'Y`` kept
  up to date one column per new pair. A direction is two passes over the stored pairs, both BLAS
  matrix-vector products: ``[S Y]'g`` (fused, block by block, with the new pair's Gram column
  ``[S Y]'y_new``, so that the history comes from memory once for both), small ``m x m``
  triangular solves, and ``d = -(gamma g + [S Y] c)``. It streams the history from memory about
  as often as the recursion does, but touches ``q`` twice instead of ``6m`` times and makes a
  handful of kernel calls instead of ``4m``. No matrix-matrix product with ``k = d``: measured 2x
  to 3.3x the time of a matrix-vector product over the same data (MKL on AMD EPYC).

Which form is faster depends on the CPU, its BLAS and the thread count. Measured on an AMD EPYC
(Zen 3, AVX2; m = 10, push plus direction, shared machine): at d = 1M, float32, one thread the
compact form took 0.88x to 0.97x the recursion's time; with two threads 1.47x (MKL ran these
matrix-vector products on one thread, torch's vector kernels used both); at d = 65,536 the
recursion won on one thread too (compact 1.16x to 1.2x in float32). Hence
``representation="auto"`` (the default): the recursion below
:attr:`LBFGSMemory.COMPACT_MIN_DIMENSION` parameters unless the history holds
:attr:`LBFGSMemory.COMPACT_MIN_HISTORY` pairs or more (a PINN's ``m = 100``: there the compact form took
0.40x the recursion's time at d = 7,851), the compact form up to
:attr:`LBFGSMemory.MEASURE_MIN_DIMENSION`, and from there on, on the CPU, whichever of the two
measured faster when the memory was created (timed once per process for a dimension, ``m``,
dtype and thread count: 0.2 to 0.5 s at d = 1M, m = 10, float32). The two forms round
differently, so where they are close in speed the choice, and the iterates' last bits, can
differ from one run to the next (never within a process). The form is saved in the state and a
loaded ``"auto"`` memory continues in it; under ``torch.use_deterministic_algorithms(True)``
nothing is timed (compact). ``"two_loop"`` and ``"compact"`` force a form.

Low-curvature pairs: with ``curvature="skip"`` a pair is dropped unless
``s'y > curvature_eps * ||s|| ||y||`` (a cosine test: invariant to scaling ``f`` or ``x``). With
``curvature="damp"``, Powell's damping (Nocedal & Wright Procedure 18.2) with
``B0 = D^{-1} / gamma`` (``D = I`` without Adam's scale; ``gamma`` of the memory, or
``||s|| / ||y||`` when it is empty): if ``s'y < 0.2 s'B0 s``, then ``y`` is replaced by
``theta y + (1 - theta) B0 s`` with ``theta = 0.8 s'B0 s / (s'B0 s - s'y)``, which gives
``s'y = 0.2 s'B0 s``; pairs with ``s'y >= 0.2 s'B0 s`` are stored as they are. Every stored pair
then has ``s'y >= 0.2 s'B0 s > 0``.

Rejected pairs leave nothing behind. A pair is written into the free slot before it is tested;
no product reads a slot that holds no stored pair (the compact form's products run over the
ranges of slots in use), and a rejected pair is zeroed in its slot all the same, so that neither
a later product, a Gram matrix rebuilt from the buffers nor a saved state can meet it. (Before,
the compact form read every slot with coefficient 0 for unused ones: one NaN left by a rejected
pair made every later direction NaN, ``0 * NaN``, and the L-BFGS phase recovered at every step
for the rest of the run.)
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

__all__ = ["LBFGSMemory", "REPRESENTATIONS"]

#: accepted values of ``representation``
REPRESENTATIONS = ("auto", "two_loop", "compact")


class LBFGSMemory:
    """Curvature pairs in ``m + 1`` preallocated slots, and the direction ``-H g``.

    Layout: one ``(m + 1, 2, d)`` buffer; ``s`` and ``y`` are its ``(m + 1, d)`` views
    (``s[i]``, ``y[i]`` contiguous) and ``_stacked`` its ``(2(m + 1), d)`` view with rows
    ``s_0, y_0, s_1, y_1, ...``, so that the slots in use form one range of rows (two once the
    ring wrapped around: the free slot sits between the newest and the oldest pair). A new pair
    is written straight into the free slot and only then tested, so a skipped pair never
    overwrites the oldest stored one and no temporary ``(s, y)`` copies are made.

    Args:
        history_size: ``m``, the pairs kept.
        dimension: ``d``, the length of the parameter vector.
        dtype, device: of the buffers (those of the parameters).
        curvature: ``"skip"`` or ``"damp"`` (see the module docstring).
        curvature_eps: the cosine threshold of ``"skip"``.
        representation: ``"auto"`` (by dimension, and measured on large CPU problems: see the
            module docstring), ``"two_loop"`` or ``"compact"``; ``None`` takes the class attribute
            :attr:`representation` (so benchmarks can force a form for every memory). The form in
            use is :attr:`form`.
    """

    #: the representation memories created without one take ("auto", "two_loop" or "compact")
    representation: str = "auto"
    #: below this many parameters "auto" takes the two-loop recursion (fewer small operations), unless the
    #: history is long (:attr:`COMPACT_MIN_HISTORY`)
    COMPACT_MIN_DIMENSION = 1 << 16
    #: from this history size on, "auto" takes the compact form below :attr:`COMPACT_MIN_DIMENSION` too: the
    #: recursion's 4m small kernels (and 2m host reads) then cost more than the compact form's fixed handful;
    #: measured (``benchmarks/bench_lbfgs_forms.py``, BENCHMARKS.md; AMD EPYC Zen 3, one thread) at d = 2,000 to
    #: 65,000 the compact form took 0.40-0.89x the recursion's time at m = 50 and 100, 0.81-1.13x at m = 20
    COMPACT_MIN_HISTORY = 32
    #: from this many parameters on, "auto" on the CPU times both forms once per process and
    #: (dimension, m, dtype, threads) and keeps the faster; between the two thresholds it takes
    #: the compact form without timing (either way the difference is a fraction of a millisecond,
    #: not worth a choice that could differ between runs)
    MEASURE_MIN_DIMENSION = 1 << 18
    #: columns per block of the fused product ``[S Y]'[y_new, g]`` on the CPU: one block of the
    #: history (``2(m + 1)`` rows) stays in cache between its two matrix-vector products
    PRODUCT_BLOCK_COLUMNS = 1 << 15
    #: timed directions per form when "auto" measures (the minimum of each is compared)
    MEASURE_REPEATS = 5
    #: forms chosen by measurement in this process, by (dimension, m, dtype, device type, threads)
    _measured: dict[tuple[int, int, torch.dtype, str, int], str] = {}

    def __init__(self, history_size: int, dimension: int, *, dtype: torch.dtype, device: torch.device,
                 curvature: str = "skip", curvature_eps: float = 1e-8, representation: str | None = None) -> None:
        if curvature not in ("skip", "damp"):
            raise ValueError(f"curvature must be 'skip' or 'damp', got {curvature!r}")
        requested = type(self).representation if representation is None else representation
        if requested not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {requested!r}")
        self.history_size = history_size
        self.curvature = curvature
        self.curvature_eps = curvature_eps
        #: what was asked for: "auto", "two_loop" or "compact"
        self.requested_representation = requested
        self._pairs = torch.zeros(history_size + 1, 2, dimension, dtype=dtype, device=device)
        self.s, self.y = self._pairs[:, 0], self._pairs[:, 1]
        self._stacked = self._pairs.view(2 * (history_size + 1), dimension)
        # Gram matrices by slot, float64: s_i'y_j (its upper triangle in age order is R) and y_i'y_j.
        # Only entries between stored pairs are ever read.
        self._sty = torch.zeros(history_size + 1, history_size + 1, dtype=torch.float64, device=device)
        self._yty = torch.zeros(history_size + 1, history_size + 1, dtype=torch.float64, device=device)
        self.rho = torch.zeros(history_size + 1, dtype=dtype, device=device)
        self._alpha = torch.zeros(history_size + 1, dtype=dtype, device=device)
        self._clear()
        #: the form this memory uses, "compact" or "two_loop": fixed at creation (and by a loaded state)
        self.form = "compact" if requested == "compact" else "two_loop"
        if requested == "auto" and history_size >= self.COMPACT_MIN_HISTORY:
            self.form = "compact"
        if requested == "auto" and dimension >= self.COMPACT_MIN_DIMENSION:
            self.form = "compact"
            if (self._pairs.device.type == "cpu" and dimension >= self.MEASURE_MIN_DIMENSION
                    and not torch.are_deterministic_algorithms_enabled()):
                key = (dimension, history_size, dtype, "cpu", torch.get_num_threads())
                if key not in LBFGSMemory._measured:
                    LBFGSMemory._measured[key] = self._measure_forms()
                self.form = LBFGSMemory._measured[key]

    def _clear(self) -> None:
        """An empty memory with zeroed buffers and counters."""
        self._pairs.zero_()
        self._sty.zero_()
        self._yty.zero_()
        self.rho.zero_()
        self.gamma = 1.0
        self.rows: list[int] = []  # slots of the stored pairs, oldest first
        self._gram_pending: int | None = None  # slot whose Gram column the next direction computes
        self._gram_complete = True  # Gram entries of every stored pair but the pending one are current
        self.accepted = 0
        self.skipped = 0
        self.damped = 0

    def _measure_forms(self) -> str:
        """Time one direction of each form in the steady state (memory full, a new pair pushed before
        each, so the compact form pays its Gram column) on this memory's own buffers; the faster form.

        Which is faster depends on the CPU, its BLAS and the thread count (see the module docstring:
        the compact form's matrix-vector products ran on one thread in MKL while the recursion's
        vector operations used both). Costs ``2 (MEASURE_REPEATS + 1)`` directions and
        ``m + MEASURE_REPEATS + 1`` pushes (0.2 to 0.5 s at d = 1M, m = 10, float32), once per
        process and shape (the first pair of timings, before the ring wraps around, is a warm-up
        that counts like the others); the memory is emptied afterwards.
        """
        m1 = self.history_size + 1
        self.form = "compact"  # pushes keep the Gram matrices, so both forms can run
        grad = torch.ones_like(self.s[0])
        times: dict[str, float] = {"compact": math.inf, "two_loop": math.inf}
        for i in range(self.history_size + 1 + self.MEASURE_REPEATS):
            row = self.free_row()
            # orthogonal steps with curvature 2: a well-posed memory, any values time the same
            self.s[row].zero_()
            self.s[row][i % m1::m1] = 1.0
            torch.mul(self.s[row], 2.0, out=self.y[row])
            self.push(self.s[row], self.y[row])
            if i < self.history_size:
                continue
            order = ("compact", "two_loop") if i % 2 else ("two_loop", "compact")
            for form in order:
                start = time.perf_counter()
                if form == "compact":
                    self._direction_compact(grad)
                else:
                    self._direction_host_scalars(grad, None)
                times[form] = min(times[form], time.perf_counter() - start)
        self._clear()
        return min(times, key=times.__getitem__)

    @property
    def count(self) -> int:
        """Pairs stored, at most ``history_size``."""
        return len(self.rows)

    def reset(self) -> None:
        """Forget every pair (after a failure); counters are kept.

        The slots keep their contents (finite: they passed the tests), which no later product reads:
        products run over the slots in use, and the Gram entries of new pairs are computed afresh.
        """
        self.rows, self.gamma, self._gram_pending, self._gram_complete = [], 1.0, None, True

    def free_row(self) -> int:
        """The slot the next pair is written into (``s[free_row()]``, ``y[free_row()]``)."""
        used = set(self.rows)
        return next(r for r in range(self.history_size + 1) if r not in used)

    def _use_compact(self) -> bool:
        return self.form == "compact"

    # ------------------------------------------------------------------ storing pairs
    def push(self, s: torch.Tensor, y: torch.Tensor, scale: torch.Tensor | None = None) -> bool:
        """Store the pair ``(s, y)`` if it passes the curvature test; returns whether it was stored.

        ``s`` and ``y`` may already be the free slot's views (``self.s[free_row()]``), which
        saves a copy. ``scale`` is the diagonal ``D`` of the initial inverse Hessian (``None``:
        identity); it enters ``gamma`` and the damping's ``B0``. A rejected pair is zeroed in its
        slot.
        """
        row = self.free_row()
        s_row, y_row = self.s[row], self.y[row]
        if s.data_ptr() != s_row.data_ptr():
            s_row.copy_(s)
        if y.data_ptr() != y_row.data_ptr():
            y_row.copy_(y)
        # three dot products (measured faster than dot + two norms): a finite s's (y'y) implies finite
        # entries of s (y); overflow of any of them is refused too
        sy, ss, yy = float(torch.dot(s_row, y_row)), float(torch.dot(s_row, s_row)), float(torch.dot(y_row, y_row))
        if not (math.isfinite(sy) and math.isfinite(ss) and math.isfinite(yy) and ss > 0 and yy > 0):
            return self._reject(row)
        s_norm, y_norm = math.sqrt(ss), math.sqrt(yy)
        damped = False
        if self.curvature == "skip":
            if sy <= self.curvature_eps * s_norm * y_norm:
                return self._reject(row)
        else:
            sy, damped = self._damp(s_row, y_row, sy, s_norm, y_norm, scale)
            if not (math.isfinite(sy) and sy > 0):
                return self._reject(row)
        self.rho[row] = 1.0 / sy
        if self._gram_pending is not None:  # two pairs without a direction in between: settle the first
            self._settle_gram(self._gram_pending, self._history_products(self.y[self._gram_pending], self._runs()))
        if self._use_compact() and scale is None:
            # The new pair's Gram column ([S'y_new; Y'y_new]) is computed with the next direction's
            # products, in the same pass over the history.
            self._gram_pending = row
        else:  # the compact form serves the scalar H0 only: no Gram upkeep for a diagonal one
            self._gram_complete = False
        self.rows.append(row)
        if len(self.rows) > self.history_size:
            self.rows.pop(0)
        if scale is not None:
            y_dy = float(torch.dot(y_row, y_row * scale))
        elif damped:
            y_dy = float(torch.dot(y_row, y_row))
        else:
            y_dy = yy
        self.gamma = sy / y_dy
        self.accepted += 1
        self.damped += damped
        return True

    def _damp(self, s_row: torch.Tensor, y_row: torch.Tensor, sy: float, s_norm: float, y_norm: float,
              scale: torch.Tensor | None) -> tuple[float, bool]:
        """Powell's damping in place (Nocedal & Wright Procedure 18.2); returns the new ``s'y`` and
        whether ``y`` changed.

        ``B0 = D^{-1} / gamma``; if ``s'y < 0.2 s'B0 s``, ``y <- theta y + (1 - theta) B0 s`` with
        ``theta = 0.8 s'B0 s / (s'B0 s - s'y)``, so that ``s'y = 0.2 s'B0 s``.
        """
        gamma = self.gamma if self.rows else s_norm / y_norm
        if scale is None:
            b0_s, s_b0_s = None, s_norm * s_norm / gamma
        else:
            b0_s = s_row / (gamma * scale)
            s_b0_s = float(torch.dot(s_row, b0_s))
        if not (math.isfinite(s_b0_s) and s_b0_s > 0):
            return math.nan, False
        if sy >= 0.2 * s_b0_s:
            return sy, False
        theta = 0.8 * s_b0_s / (s_b0_s - sy)
        if b0_s is None:
            y_row.mul_(theta).add_(s_row, alpha=(1 - theta) / gamma)
        else:
            y_row.mul_(theta).add_(b0_s, alpha=1 - theta)
        return float(torch.dot(s_row, y_row)), True

    def _reject(self, row: int) -> bool:
        """Zero the free slot a rejected pair was written into; count it."""
        self._pairs[row].zero_()
        self.skipped += 1
        return False

    # ------------------------------------------------------------------ the direction
    def direction(self, grad: torch.Tensor, scale: torch.Tensor | None = None, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """``d = -H g`` (paper Algorithm 2); ``-g`` (or ``-D g``) when the memory is empty.

        The compact representation when this memory uses it and ``H0`` is scalar, else the
        two-loop recursion. On the CPU the recursion's 2m scalars go through Python floats (a
        read-back costs nothing there and ``add_(alpha=float)`` is the fastest kernel); on
        accelerators they stay on the device (``addcmul_`` with 0-dim tensors) so that the
        recursion never waits for the host. ``out`` (shaped like ``grad``, not ``grad`` itself)
        receives ``d`` instead of a new tensor: a caller that reuses one buffer saves a ``d``-sized
        allocation per direction, and its page faults.
        """
        if out is not None and out.data_ptr() == grad.data_ptr():
            raise ValueError("out must not be grad's storage")
        if scale is None and self.rows and self._use_compact():
            return self._direction_compact(grad, out)
        if grad.device.type == "cpu":
            return self._direction_host_scalars(grad, scale, out)
        q = torch.neg(grad, out=out) if out is not None else grad.neg()
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

    def _runs(self) -> list[tuple[int, int]]:
        """Slot ranges ``[lo, hi)`` of the stored pairs: one before the ring wraps around, then at most
        two (the free slot sits between the newest and the oldest pair). No product reads a slot outside."""
        used = sorted(self.rows)
        runs, lo = [], used[0]
        for previous, slot in zip(used, used[1:], strict=False):
            if slot != previous + 1:
                runs.append((lo, previous + 1))
                lo = slot
        runs.append((lo, used[-1] + 1))
        return runs

    def _history_products(self, vector: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
        """``[[s_0'v, y_0'v], [s_1'v, y_1'v], ...]`` by slot, float64 (zero for slots not in ``runs``)."""
        products = torch.zeros(self.history_size + 1, 2, dtype=torch.float64, device=vector.device)
        for lo, hi in runs:
            products[lo:hi] = torch.mv(self._stacked[2 * lo:2 * hi], vector).view(-1, 2)
        return products

    def _history_products_two(self, first: torch.Tensor, second: torch.Tensor, runs: list[tuple[int, int]]
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_history_products` of two vectors, reading the history from memory once.

        On the CPU block by block (:attr:`PRODUCT_BLOCK_COLUMNS` columns): two matrix-vector products
        per block while it is in cache, partial sums added in float64. Elsewhere one matrix-matrix
        product per run (cuBLAS and the like handle ``k = d`` well, and kernel launches cost more).
        """
        both = torch.zeros(2, self.history_size + 1, 2, dtype=torch.float64, device=first.device)
        if first.device.type != "cpu":
            pair = torch.stack([first, second], dim=1)
            for lo, hi in runs:
                both[:, lo:hi] = torch.mm(self._stacked[2 * lo:2 * hi], pair).t().reshape(2, hi - lo, 2)
            return both[0], both[1]
        block = self.PRODUCT_BLOCK_COLUMNS
        firsts, seconds = first.split(block), second.split(block)
        for lo, hi in runs:
            parts = self._stacked[2 * lo:2 * hi].split(block, dim=1)
            out = torch.empty(2, len(parts), 2 * (hi - lo), dtype=first.dtype, device=first.device)
            out_first, out_second = out[0].unbind(0), out[1].unbind(0)
            for i, part in enumerate(parts):
                torch.mv(part, firsts[i], out=out_first[i])
                torch.mv(part, seconds[i], out=out_second[i])
            both[:, lo:hi] = out.sum(dim=1, dtype=torch.float64).view(2, hi - lo, 2)
        return both[0], both[1]

    def _settle_gram(self, row: int, products: torch.Tensor) -> None:
        """Store ``products`` (by slot: ``[s_i'y_row, y_i'y_row]``) as the Gram column (and row) of ``row``."""
        self._sty[:, row] = products[:, 0]
        self._yty[:, row] = products[:, 1]
        self._yty[row] = products[:, 1]
        self._gram_pending = None

    def _rebuild_gram(self) -> None:
        """All Gram entries of the stored pairs from the buffers (after loading a state without them, or
        after pairs were stored without their upkeep): one matrix product, a one-off."""
        if self.rows:
            k = max(self.rows) + 1
            view = self._stacked[:2 * k]
            gram = torch.mm(view, view.t()).to(torch.float64)
            self._sty[:k, :k] = gram[0::2, 1::2]
            self._yty[:k, :k] = gram[1::2, 1::2]
        self._gram_pending, self._gram_complete = None, True

    def _direction_compact(self, grad: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``d = -H g`` by the compact representation (Byrd, Nocedal & Schnabel 1994, Eq. 3.1):

        ``H = gamma I + [S  gamma Y] M [S'; gamma Y']`` gives, with ``a = S'g``, ``b = Y'g``, ``R`` the
        upper triangle of ``S'Y`` (age order) and ``D`` its diagonal,
        ``p = R^{-1} a``, ``w = R^{-T}((D + gamma Y'Y) p - gamma b)`` and
        ``H g = gamma g + S w - gamma Y p``: two passes over the slots in use plus small solves.
        """
        if not self._gram_complete:
            self._rebuild_gram()
        runs = self._runs()
        pending = self._gram_pending
        if pending is not None:
            gram_column, products = self._history_products_two(self.y[pending], grad, runs)
            self._settle_gram(pending, gram_column)
        else:
            products = self._history_products(grad, runs)
        index = torch.tensor(self.rows, device=grad.device)
        ab = products[index]  # (k, 2): a = S'g, b = Y'g in age order
        square = (index.unsqueeze(1), index)
        r = self._sty[square].triu_()
        gamma = self.gamma
        p = torch.linalg.solve_triangular(r, ab[:, :1], upper=True)
        rhs = torch.addmm(r.diagonal().unsqueeze(1) * p - gamma * ab[:, 1:], self._yty[square], p, alpha=gamma)
        w = torch.linalg.solve_triangular(r.t(), rhs, upper=False)
        coefficients = torch.zeros(self.history_size + 1, 2, dtype=grad.dtype, device=grad.device)
        coefficients[index] = torch.cat((w, p.mul_(-gamma)), dim=1).to(grad.dtype)
        # d = -(gamma g + [S Y] c), run by run: beta * g + alpha * view' c, then accumulated
        direction = None
        for lo, hi in runs:
            view, c = self._stacked[2 * lo:2 * hi].t(), coefficients[lo:hi].view(-1)
            if direction is None:
                direction = (torch.addmv(grad, view, c, beta=-gamma, alpha=-1.0) if out is None
                             else torch.addmv(grad, view, c, beta=-gamma, alpha=-1.0, out=out))
            else:
                direction.addmv_(view, c, alpha=-1.0)
        return direction

    def _direction_host_scalars(self, grad: torch.Tensor, scale: torch.Tensor | None,
                                out: torch.Tensor | None = None) -> torch.Tensor:
        """The two-loop recursion (Nocedal & Wright Algorithm 7.4) with its scalars on the host."""
        q = torch.neg(grad, out=out) if out is not None else grad.neg()
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

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "s": self.s.clone(), "y": self.y.clone(), "rho": self.rho.clone(), "gamma": self.gamma,
            "sty": self._sty.clone(), "yty": self._yty.clone(), "gram_pending": self._gram_pending,
            "gram_complete": self._gram_complete, "form": self.form,
            "rows": list(self.rows), "accepted": self.accepted, "skipped": self.skipped, "damped": self.damped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if tuple(state["s"].shape) != tuple(self.s.shape):
            raise ValueError(
                f"L-BFGS memory of shape {tuple(state['s'].shape)} does not fit (history_size + 1) x dimension "
                f"{tuple(self.s.shape)}"
            )
        # Everything is restored as saved, so that state_dict() right after loading equals what was
        # loaded. A slot without a stored pair may hold anything (a state saved before rejected pairs
        # were zeroed may hold a NaN there): no product reads it.
        for name in ("s", "y", "rho"):
            getattr(self, name).copy_(state[name])
        self.gamma, self.rows = float(state["gamma"]), [int(r) for r in state["rows"]]
        self.accepted, self.skipped, self.damped = int(state["accepted"]), int(state["skipped"]), int(state["damped"])
        # A state saved before "form" existed kept Gram matrices exactly when d >= COMPACT_MIN_DIMENSION.
        saved_form = state.get("form", "compact" if self.s.shape[1] >= self.COMPACT_MIN_DIMENSION else "two_loop")
        if self.requested_representation == "auto":
            # continue in the saved form: a resumed run then repeats the original bit for bit even where
            # this process's measurement would have chosen the other form
            self.form = saved_form
        has_gram = "sty" in state
        if has_gram:
            self._sty.copy_(state["sty"].to(torch.float64))
            self._yty.copy_(state["yty"].to(torch.float64))
        pending = state.get("gram_pending")
        self._gram_pending = None if pending is None else int(pending)
        self._gram_complete = bool(state.get("gram_complete", has_gram and saved_form == "compact"))
        if not has_gram or self.form != saved_form:
            # no Gram matrices kept for these pairs: the compact form rebuilds them at its next direction
            self._gram_pending, self._gram_complete = None, not self.rows

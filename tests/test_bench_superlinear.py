"""The 1e-3 -> 1e-8 evaluation counting of ``benchmarks.bench_test_functions --superlinear``."""

from __future__ import annotations

import torch

from benchmarks.bench_test_functions import (
    FUSE_BUDGET,
    evaluations_between,
    first_reaching,
    local_limit,
    per_decade,
    record,
)


def test_counts_on_a_synthetic_gap_sequence():
    gaps = [1.0, 1e-2, 5e-4, 1e-6, 1e-9]
    assert evaluations_between(gaps) == (3, 5, 2)
    assert per_decade(gaps) == [1, 0, 0, 1, 0]  # 1e-3 at eval 3; 1e-4, 1e-5, 1e-6 at 4; 1e-7, 1e-8 at 5


def test_counts_use_the_best_gap_so_far_and_none_when_not_reached():
    # a worse value after reaching 1e-3 does not move n3; never reaching 1e-8 gives None
    assert evaluations_between([1.0, 1e-4, 0.5, 1e-7]) == (2, None, None)
    assert first_reaching([], 1e-3) is None
    assert per_decade([1.0, 1e-4]) is None


def test_local_limit_and_convergence():
    values = [5.0, 3.0] + [2.0] * 60
    assert local_limit(values) == (2.0, 3, True)
    still_improving = [5.0 - 1e-3 * k for k in range(100)]
    f_limit, attained, converged = local_limit(still_improving)
    assert (attained, converged) == (100, False)
    assert f_limit == still_improving[-1]


def test_fuse_pv_on_rosenbrock_reaches_1e_8_after_the_switch():
    torch.set_num_threads(1)
    args = {"lr": 1e-2, "switch": {"criterion": "step", "step": 100}, "line_search": "strong_wolfe"}
    trace = record("rosenbrock", "fuse_pv", args, FUSE_BUDGET)
    assert len(trace.values) == FUSE_BUDGET
    assert trace.switch_step == 100
    assert trace.switch_eval == 100  # one evaluation per Adam step
    n3, n8, needed = evaluations_between(trace.gaps)
    assert n3 is not None and n8 is not None
    assert trace.switch_eval < n3 < n8 <= FUSE_BUDGET
    assert needed == n8 - n3
    assert min(trace.gaps) <= 1e-8

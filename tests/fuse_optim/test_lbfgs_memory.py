"""LBFGSMemory's invariants: a rejected pair leaves no trace, Powell damping as Nocedal & Wright
Procedure 18.2 states it, and both representations (two-loop, compact) give one direction."""

from __future__ import annotations

import math

import pytest
import torch

from fuse_optim import FusePV, LBFGSMemory

CPU = torch.device("cpu")
#: large enough for the compact representation under "auto"
LARGE = LBFGSMemory.COMPACT_MIN_DIMENSION


def make_memory(history_size: int, dim: int, representation: str = "auto", **options) -> LBFGSMemory:
    """A float64 CPU memory; ``representation`` is passed only when it is not the default."""
    if representation != "auto":
        options["representation"] = representation
    return LBFGSMemory(history_size, dim, dtype=torch.float64, device=CPU, **options)


def good_pairs(count: int, dim: int, seed: int, dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs (s, A s) of a diagonal SPD A with eigenvalues in [0.5, 10]: every s'y > 0."""
    generator = torch.Generator().manual_seed(seed)
    curvature = torch.rand(dim, generator=generator, dtype=dtype) * 9.5 + 0.5
    pairs = []
    for _ in range(count):
        s = torch.randn(dim, generator=generator, dtype=dtype)
        pairs.append((s, curvature * s))
    return pairs


def textbook_direction(grad: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]],
                       scale: torch.Tensor | None = None) -> torch.Tensor:
    """-H g by the two-loop recursion (Nocedal & Wright Algorithm 7.4), H0 = gamma D, gamma = s'y / y'Dy."""
    q = -grad.clone()
    alphas = []
    for s, y in reversed(pairs):
        alpha = torch.dot(s, q) / torch.dot(s, y)
        q -= alpha * y
        alphas.append(alpha)
    diagonal = torch.ones_like(grad) if scale is None else scale
    if pairs:
        s, y = pairs[-1]
        q *= diagonal * (torch.dot(s, y) / torch.dot(y, diagonal * y))
    else:
        q *= diagonal
    for (s, y), alpha in zip(pairs, reversed(alphas), strict=True):
        q += (alpha - torch.dot(y, q) / torch.dot(s, y)) * s
    return q


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-9) -> None:
    assert torch.isfinite(actual).all()
    assert float((actual - expected).norm()) <= rtol * float(expected.norm())


# --------------------------------------------------------------------------- a rejected pair leaves no trace
@pytest.mark.parametrize("representation", ["auto", "two_loop"])
@pytest.mark.parametrize("bad_entry", [float("nan"), float("inf")])
def test_rejected_non_finite_pair_leaves_no_trace(representation: str, bad_entry: float) -> None:
    """Push good pairs, one pair whose y has a NaN (or inf), more good pairs (wrapping around the ring):
    after every push the direction is finite and equals that of a memory that never saw the bad pair."""
    dim, history_size = LARGE, 4
    pairs = good_pairs(9, dim, seed=1)
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    memory = make_memory(history_size, dim, representation)
    clean = make_memory(history_size, dim, representation)
    assert memory._use_compact() == (representation == "auto")
    stored: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, (s, y) in enumerate(pairs):
        if i == 3:
            bad_y = y.clone()
            bad_y[dim // 2] = bad_entry
            row = memory.free_row()
            assert not memory.push(s, bad_y)
            assert memory.skipped == 1 and memory.count == 3
            assert_close(memory.direction(grad), clean.direction(grad), rtol=1e-12)
            assert_close(memory.direction(grad), textbook_direction(grad, stored))
            # nothing of it is left where a later product reads
            assert not memory.s[row].any() and not memory.y[row].any()
        assert memory.push(s, y) and clean.push(s, y)
        stored = (stored + [(s, y)])[-history_size:]
        assert_close(memory.direction(grad), clean.direction(grad), rtol=1e-12)
        assert_close(memory.direction(grad), textbook_direction(grad, stored))


def test_rejected_pair_then_reset_keeps_the_compact_direction_finite() -> None:
    """The failure FusePV saw: a NaN pair rejected, then a non-descent reset; new pairs fill the slots
    below the rejected one while the compact products read every slot up to the highest in use."""
    dim, history_size = LARGE, 6
    pairs = good_pairs(10, dim, seed=3)
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    memory = LBFGSMemory(history_size, dim, dtype=torch.float64, device=CPU)
    assert memory._use_compact()
    for s, y in pairs[:4]:
        assert memory.push(s, y)
    s, y = pairs[4]
    assert not memory.push(s, torch.full_like(y, float("nan")))
    memory.reset()
    assert torch.equal(memory.direction(grad), -grad)
    for k, (s, y) in enumerate(pairs[5:], start=1):
        assert memory.push(s, y)
        assert_close(memory.direction(grad), textbook_direction(grad, pairs[5:5 + k]))


def test_a_loaded_state_with_a_non_finite_free_slot_is_harmless() -> None:
    """A state saved before rejected pairs were zeroed may hold NaN in a free slot: no product reads it."""
    dim = LARGE
    pairs = good_pairs(3, dim, seed=5)
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    memory = LBFGSMemory(4, dim, dtype=torch.float64, device=CPU)
    for s, y in pairs:
        memory.push(s, y)
    state = memory.state_dict()
    state["y"][memory.free_row()] = float("nan")
    state["s"][4] = float("inf")
    loaded = LBFGSMemory(4, dim, dtype=torch.float64, device=CPU)
    loaded.load_state_dict(state)
    assert torch.equal(loaded.direction(grad), memory.direction(grad))
    loaded.push(*good_pairs(1, dim, seed=6)[0])
    memory.push(*good_pairs(1, dim, seed=6)[0])
    assert torch.equal(loaded.direction(grad), memory.direction(grad))


@pytest.mark.parametrize("representation", ["two_loop", "compact"])
def test_state_dict_round_trips_exactly(representation: str) -> None:
    """state_dict() right after load_state_dict() equals what was loaded (torch's optimizer contract), with
    a pending Gram column, leftovers of a reset and a rejected pair in the slots."""
    dim = 500
    pairs = good_pairs(7, dim, seed=16)
    memory = make_memory(3, dim, representation)
    for s, y in pairs[:4]:
        memory.push(s, y)
    memory.reset()
    for s, y in pairs[4:]:
        memory.push(s, y)
    memory.push(pairs[0][0], -pairs[0][1])  # rejected
    saved = memory.state_dict()
    copy = make_memory(3, dim, representation)
    copy.load_state_dict(saved)
    again = copy.state_dict()
    assert set(again) == set(saved)
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(again[key], value), key
        else:
            assert again[key] == value, key


def test_fuse_pv_keeps_converging_after_one_non_finite_gradient() -> None:
    """One NaN in the gradient at an accepted trial point (fixed step) must not end the L-BFGS phase."""
    dim = 70_000
    generator = torch.Generator().manual_seed(7)
    curvature = torch.rand(dim, generator=generator, dtype=torch.float64) * 9.0 + 1.0
    start = torch.randn(dim, generator=generator, dtype=torch.float64)

    def run(poison_call: int | None, steps: int) -> tuple[FusePV, torch.Tensor, list[float]]:
        x = start.clone().requires_grad_()
        opt = FusePV([x], switch={"criterion": "step", "step": 0}, line_search="fixed", lbfgs_lr=1.0,
                     tolerance_grad=0.0)
        calls = 0

        def closure() -> torch.Tensor:
            nonlocal calls
            calls += 1
            opt.zero_grad()
            loss = 0.5 * (curvature * x * x).sum()
            loss.backward()
            if calls == poison_call:
                x.grad[12_345] = float("nan")
            return loss

        losses = []
        for _ in range(steps):
            opt.step(closure)
            losses.append(float(0.5 * (curvature * x.detach() ** 2).sum()))
        return opt, x.detach(), losses

    f0 = float(0.5 * (curvature * start**2).sum())
    _, _, clean_losses = run(None, 40)
    assert clean_losses[-1] < 1e-10 * f0  # the reference run converges in these steps
    # call 16 is the trial point of step 8 (two closure calls per step: x_k, then x_k + t d)
    opt, x, losses = run(16, 60)
    assert torch.isfinite(x).all()
    assert opt.pairs_skipped >= 1  # the pair with the NaN was refused
    assert opt.recoveries <= 1
    assert losses[-1] < 1e-10 * f0
    assert opt._memory.count == opt.param_groups[0]["history_size"]  # the memory refilled and stays full


# --------------------------------------------------------------------------- Powell damping
def powell_textbook(s: torch.Tensor, y: torch.Tensor, gamma: float,
                    scale: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """Nocedal & Wright Procedure 18.2 with B0 = D^{-1} / gamma: y unchanged if s'y >= 0.2 s'B0 s, else
    theta y + (1 - theta) B0 s with theta = 0.8 s'B0 s / (s'B0 s - s'y)."""
    b0_s = s / gamma if scale is None else s / (gamma * scale)
    s_b0_s, sy = float(s @ b0_s), float(s @ y)
    if sy >= 0.2 * s_b0_s:
        return y, False
    theta = 0.8 * s_b0_s / (s_b0_s - sy)
    return theta * y + (1 - theta) * b0_s, True


def curvature_mix(count: int, dim: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs with s'y negative, zero-ish, small positive (0 < s'y < 0.2 s'B0 s) and comfortably positive."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(count):
        s = torch.randn(dim, generator=generator, dtype=torch.float64)
        noise = torch.randn(dim, generator=generator, dtype=torch.float64)
        kind = i % 4
        if kind == 0:
            y = 2.0 * s + 0.1 * noise  # well conditioned, s'y >> 0
        elif kind == 1:
            y = -0.5 * s + noise  # negative curvature
        elif kind == 2:
            y = 0.02 * s + noise - (noise @ s) / (s @ s) * s  # 0 < s'y, far below 0.2 s'B0 s
        else:
            y = 0.15 * s + 0.5 * noise  # small positive curvature, typically below the threshold
        pairs.append((s, y))
    return pairs


@pytest.mark.parametrize("dim, representation", [(6, "auto"), (LARGE, "auto"), (LARGE, "two_loop")])
@pytest.mark.parametrize("with_scale", [False, True], ids=["scalar_B0", "diagonal_B0"])
def test_damped_pairs_satisfy_powells_condition(dim: int, representation: str, with_scale: bool) -> None:
    """After every push in damp mode, s'y_stored >= 0.2 s'B0 s; the stored y and the direction equal a
    textbook implementation of Procedure 18.2."""
    history_size = 3
    pairs = curvature_mix(12, dim, seed=dim)
    generator = torch.Generator().manual_seed(11)
    scale = torch.rand(dim, generator=generator, dtype=torch.float64) + 0.5 if with_scale else None
    grad = torch.randn(dim, generator=generator, dtype=torch.float64)
    memory = make_memory(history_size, dim, representation, curvature="damp")
    stored: list[tuple[torch.Tensor, torch.Tensor]] = []
    gamma: float | None = None  # the textbook memory's H0 scale (None while empty)
    damped_small_positive = expected_damped = 0
    for s, y in pairs:
        b0_gamma = gamma if gamma is not None else float(s.norm() / y.norm())
        y_expected, damped = powell_textbook(s, y, b0_gamma, scale)
        damped_small_positive += damped and float(s @ y) > 0
        expected_damped += damped
        row = memory.free_row()
        assert memory.push(s, y, scale)
        stored = (stored + [(s, y_expected)])[-history_size:]
        y_stored = memory.y[row]
        torch.testing.assert_close(y_stored, y_expected, rtol=1e-12, atol=1e-12)
        b0_s = s / b0_gamma if scale is None else s / (b0_gamma * scale)
        assert float(s @ y_stored) >= 0.2 * float(s @ b0_s) * (1 - 1e-12)
        diagonal = torch.ones(dim, dtype=torch.float64) if scale is None else scale
        gamma = float(s @ y_expected) / float(y_expected @ (diagonal * y_expected))
        assert memory.gamma == pytest.approx(gamma, rel=1e-12)
        assert_close(memory.direction(grad, scale), textbook_direction(grad, stored, scale))
    assert memory.accepted == len(pairs) and memory.skipped == 0
    assert damped_small_positive > 0  # the case the cosine test let through undamped
    assert memory.damped == expected_damped


def test_skip_mode_is_unchanged_by_the_damping_rule() -> None:
    """curvature="skip" keeps exactly the pairs with s'y > eps ||s|| ||y||, as they are."""
    dim = 6
    pairs = curvature_mix(12, dim, seed=4)
    memory = LBFGSMemory(20, dim, dtype=torch.float64, device=CPU, curvature="skip", curvature_eps=1e-8)
    kept = []
    for s, y in pairs:
        expected = float(s @ y) > 1e-8 * float(s.norm() * y.norm())
        row = memory.free_row()
        assert memory.push(s, y) == expected
        if expected:
            assert torch.equal(memory.y[row], y)
            kept.append((s, y))
    assert memory.damped == 0 and memory.count == len(kept)
    grad = torch.arange(dim, dtype=torch.float64) - 2.5
    assert_close(memory.direction(grad), textbook_direction(grad, kept))


# --------------------------------------------------------------------------- representations
def test_representation_choice() -> None:
    assert LBFGSMemory(3, LARGE - 1, dtype=torch.float64, device=CPU).form == "two_loop"
    assert LBFGSMemory(3, LARGE, dtype=torch.float64, device=CPU).form == "compact"
    long = LBFGSMemory.COMPACT_MIN_HISTORY  # a long history: the recursion's 4m small operations lose
    assert LBFGSMemory(long - 1, 100, dtype=torch.float64, device=CPU).form == "two_loop"
    assert LBFGSMemory(long, 100, dtype=torch.float64, device=CPU).form == "compact"
    assert LBFGSMemory(long, 100, dtype=torch.float64, device=CPU, representation="two_loop").form == "two_loop"
    assert LBFGSMemory(3, 8, dtype=torch.float64, device=CPU, representation="compact").form == "compact"
    assert LBFGSMemory(3, LARGE, dtype=torch.float64, device=CPU, representation="two_loop").form == "two_loop"
    with pytest.raises(ValueError, match="representation"):
        LBFGSMemory(3, 8, dtype=torch.float64, device=CPU, representation="dense")
    from fuse_optim.lbfgs import REPRESENTATIONS

    assert set(REPRESENTATIONS) == {"auto", "two_loop", "compact"}


def test_class_attribute_forces_the_representation(monkeypatch) -> None:
    monkeypatch.setattr(LBFGSMemory, "representation", "two_loop")
    assert LBFGSMemory(3, LARGE, dtype=torch.float64, device=CPU).form == "two_loop"
    monkeypatch.setattr(LBFGSMemory, "representation", "compact")
    assert LBFGSMemory(3, 8, dtype=torch.float64, device=CPU).form == "compact"


@pytest.mark.parametrize("dim", [7, 1000, 100_003])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-11), (torch.float32, 1e-4)])
def test_both_representations_give_one_direction(dim: int, dtype: torch.dtype, rtol: float, monkeypatch) -> None:
    """Filling, wrap-around, two pushes without a direction in between, and a reset; the fused product
    is blocked (a small block size here, so several blocks and a ragged last one are exercised)."""
    monkeypatch.setattr(LBFGSMemory, "PRODUCT_BLOCK_COLUMNS", 4096)
    history_size = 4
    pairs = good_pairs(11, dim, seed=dim, dtype=dtype)
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(0), dtype=dtype)
    memories = {form: LBFGSMemory(history_size, dim, dtype=dtype, device=CPU, representation=form)
                for form in ("two_loop", "compact")}
    for i, (s, y) in enumerate(pairs):
        if i == 7:
            for memory in memories.values():
                memory.reset()
        for memory in memories.values():
            assert memory.push(s, y)
        if i in (2, 5):  # two pairs in a row without a direction
            continue
        two_loop, compact = (memories[form].direction(grad) for form in ("two_loop", "compact"))
        assert_close(compact, two_loop, rtol)


def test_compact_memory_with_a_diagonal_h0_stays_correct() -> None:
    """With Adam's diagonal H0 the two-loop recursion serves; the Gram matrices are rebuilt if the scalar
    H0 is asked for later."""
    dim = 50
    pairs = good_pairs(5, dim, seed=9)
    scale = torch.rand(dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    memory = LBFGSMemory(3, dim, dtype=torch.float64, device=CPU, representation="compact")
    for s, y in pairs:
        memory.push(s, y, scale)
    assert_close(memory.direction(grad, scale), textbook_direction(grad, pairs[-3:], scale))
    # gamma stays the diagonal one's (s'y / y'Dy): compare against the two-loop with that gamma
    reference = LBFGSMemory(3, dim, dtype=torch.float64, device=CPU, representation="two_loop")
    for s, y in pairs:
        reference.push(s, y, scale)
    assert_close(memory.direction(grad), reference.direction(grad))


@pytest.mark.parametrize("saved, loaded", [("two_loop", "compact"), ("compact", "two_loop"), ("compact", "compact")])
def test_state_dict_across_representations(saved: str, loaded: str) -> None:
    dim = 300
    pairs = good_pairs(6, dim, seed=12)
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    memory = LBFGSMemory(4, dim, dtype=torch.float64, device=CPU, representation=saved)
    for s, y in pairs:
        memory.push(s, y)
    copy = LBFGSMemory(4, dim, dtype=torch.float64, device=CPU, representation=loaded)
    copy.load_state_dict(memory.state_dict())
    assert_close(copy.direction(grad), textbook_direction(grad, pairs[-4:]))
    if saved == loaded:
        assert torch.equal(copy.direction(grad), memory.direction(grad))


def test_state_without_form_from_before_the_representation_option() -> None:
    """A state saved by the previous version (no "form", no "gram_complete") loads as before."""
    dim = LARGE
    pairs = good_pairs(3, dim, seed=13)
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    memory = LBFGSMemory(4, dim, dtype=torch.float64, device=CPU)
    for s, y in pairs:
        memory.push(s, y)
    memory.direction(grad)  # settles the pending Gram column
    state = memory.state_dict()
    del state["form"], state["gram_complete"]
    copy = LBFGSMemory(4, dim, dtype=torch.float64, device=CPU)
    copy.load_state_dict(state)
    assert torch.equal(copy.direction(grad), memory.direction(grad))
    assert math.isfinite(copy.gamma)


# --------------------------------------------------------------------------- "auto" measures on large problems
@pytest.fixture
def small_thresholds(monkeypatch):
    """Thresholds low enough for "auto" to measure at a test's size, and a fresh per-process cache."""
    monkeypatch.setattr(LBFGSMemory, "COMPACT_MIN_DIMENSION", 100)
    monkeypatch.setattr(LBFGSMemory, "MEASURE_MIN_DIMENSION", 1000)
    monkeypatch.setattr(LBFGSMemory, "_measured", {})


def test_auto_measures_once_and_leaves_the_memory_empty(small_thresholds, monkeypatch) -> None:
    dim = 5000
    memory = make_memory(4, dim)
    assert memory.form in ("compact", "two_loop")
    assert list(LBFGSMemory._measured.values()) == [memory.form]
    assert memory.count == 0 and (memory.accepted, memory.skipped, memory.damped) == (0, 0, 0)
    assert not memory._pairs.any() and not memory._sty.any() and not memory._yty.any() and memory.gamma == 1.0
    # it then works as any memory
    pairs = good_pairs(6, dim, seed=14)
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for k, (s, y) in enumerate(pairs, start=1):
        assert memory.push(s, y)
        assert_close(memory.direction(grad), textbook_direction(grad, pairs[max(0, k - 4):k]))
    # the same shape is not measured again in this process; another shape is
    calls = []
    monkeypatch.setattr(LBFGSMemory, "_measure_forms", lambda self: calls.append(1) or "two_loop")
    assert make_memory(4, dim).form == memory.form and not calls
    assert make_memory(4, dim + 1).form == "two_loop" and calls == [1]


def test_auto_measurement_rules(small_thresholds, monkeypatch) -> None:
    monkeypatch.setattr(LBFGSMemory, "_measure_forms", lambda self: "two_loop")
    assert make_memory(4, 99).form == "two_loop"  # below COMPACT_MIN_DIMENSION: never measured
    assert make_memory(4, 500).form == "compact"  # between the thresholds: compact without timing
    assert make_memory(4, 5000).form == "two_loop"  # measured
    assert make_memory(4, 5000, representation="compact").form == "compact"  # forced: not measured
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert make_memory(4, 6000).form == "compact"  # no run-to-run variation when asked for determinism
    finally:
        torch.use_deterministic_algorithms(deterministic)


@pytest.mark.parametrize("saved_form", ["compact", "two_loop"])
def test_auto_memory_continues_in_the_saved_form(small_thresholds, monkeypatch, saved_form: str) -> None:
    """A resumed run repeats the original exactly, whatever the new process would measure."""
    dim = 5000
    monkeypatch.setattr(LBFGSMemory, "_measure_forms", lambda self: saved_form)
    memory = make_memory(4, dim)
    pairs = good_pairs(6, dim, seed=15)
    grad = torch.randn(dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for s, y in pairs[:5]:
        memory.push(s, y)
    other = "two_loop" if saved_form == "compact" else "compact"
    monkeypatch.setattr(LBFGSMemory, "_measured", {})
    monkeypatch.setattr(LBFGSMemory, "_measure_forms", lambda self: other)
    copy = make_memory(4, dim)
    assert copy.form == other
    copy.load_state_dict(memory.state_dict())
    assert copy.form == saved_form
    for mem in (memory, copy):
        mem.push(*pairs[5])
    assert torch.equal(copy.direction(grad), memory.direction(grad))


@pytest.mark.parametrize("representation", ["two_loop", "compact"])
@pytest.mark.parametrize("with_scale", [False, True])
def test_direction_into_a_caller_buffer(representation: str, with_scale: bool) -> None:
    dim = 300
    pairs = good_pairs(6, dim, seed=17)
    generator = torch.Generator().manual_seed(8)
    scale = torch.rand(dim, generator=generator, dtype=torch.float64) + 0.5 if with_scale else None
    grad = torch.randn(dim, generator=generator, dtype=torch.float64)
    memory = make_memory(3, dim, representation)
    buffer = torch.full((dim,), float("nan"), dtype=torch.float64)
    assert memory.direction(grad, scale, out=buffer) is buffer
    assert torch.equal(buffer, memory.direction(grad, scale))  # empty memory: -g (or -D g)
    for s, y in pairs:
        memory.push(s, y, scale)
        buffer.fill_(float("nan"))
        assert memory.direction(grad, scale, out=buffer) is buffer
        assert torch.equal(buffer, memory.direction(grad, scale))
    with pytest.raises(ValueError, match="out"):
        memory.direction(grad, scale, out=grad)

"""Second phase on minibatches: which step-length policy and initial inverse Hessian serve best.

Problem A (convex): logistic regression with L2 (lambda 1e-3) on scikit-learn digits (all 1,797
samples, inputs/16), batch 64. Adam (lr 1e-2) for 3 epochs, then 7 epochs' worth of closure calls
(gradient evaluations) of each second phase; reported: gap to f* of the full training loss (f* by
scipy L-BFGS-B), mean and std over 5 seeds.

Problem B (non-convex): MLP 64-64-10 (tanh) on digits (75/25 stratified split), batch 64, Adam
(lr 1e-2) for 10 epochs then 10 epochs' worth of closure calls of each second phase; reported:
full training loss and test accuracy, mean and std over 5 seeds.

Every variant gets the same budget of gradient evaluations (every closure call counts) and the
same seeds (same initial weights and batch order).

Run: ``.venv/bin/python -m benchmarks.bench_minibatch [--seeds 5]``
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch
from scipy.optimize import minimize
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fuse_optim import FusePV

VARIANTS: dict[str, dict | None] = {
    "adam (continued)": None,
    "torch.optim.LBFGS (strong Wolfe, max_eval 25)": {"torch": True},
    "fuse_pv defaults (armijo from 0.1)": {},
    "fuse_pv armijo from 0.3": {"lbfgs_lr": 0.3},
    "fuse_pv armijo from 1.0": {"lbfgs_lr": 1.0},
    "fuse_pv fixed 0.1": {"line_search": "fixed", "lbfgs_lr": 0.1},
    "fuse_pv strong_wolfe": {"line_search": "strong_wolfe"},
    "fuse_pv armijo 0.1, damped pairs": {"curvature": "damp"},
    "fuse_pv armijo 0.1, Adam-diagonal H0": {"initial_inverse_hessian": "adam"},
    "fuse_pv armijo 1.0, Adam-diagonal H0": {"initial_inverse_hessian": "adam", "lbfgs_lr": 1.0},
}


def closure_for(opt, loss_fn, counter):
    def closure():
        counter[0] += 1
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


def run_phases(params, batch_loss, n, seed, first_epochs, budget_epochs, variant, lr=1e-2, batch=64):
    """Adam for ``first_epochs`` epochs, then the variant until ``budget_epochs`` epochs of calls."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = (n + batch - 1) // batch
    switch_step = first_epochs * per_epoch
    if variant is not None and not variant.get("torch"):
        first = last = FusePV(params, lr=lr, switch={"criterion": "step", "step": switch_step}, **variant)
    else:
        first = torch.optim.Adam(params, lr=lr)
        last = first if variant is None else torch.optim.LBFGS(
            params, lr=1, history_size=10, max_iter=1, max_eval=25, line_search_fn="strong_wolfe",
            tolerance_grad=0, tolerance_change=0)
    calls, step, budget = [0], 0, budget_epochs * per_epoch
    while calls[0] < budget:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            if calls[0] >= budget:
                break
            opt = first if step < switch_step else last
            idx = perm[i:i + batch]
            opt.step(closure_for(opt, lambda idx=idx: batch_loss(idx), calls))
            step += 1
    return calls[0]


def logreg_problem():
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0), torch.tensor(y)

    def loss(w, idx=None):
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])
        weights = w[:640].view(64, 10)
        return torch.nn.functional.cross_entropy(xb @ weights + w[640:], yb) + 0.5 * 1e-3 * (weights**2).sum()

    def numpy_loss(w):
        wt = torch.tensor(w, requires_grad=True)
        value = loss(wt)
        value.backward()
        return value.item(), wt.grad.numpy()

    f_star = minimize(numpy_loss, np.zeros(650), jac=True, method="L-BFGS-B",
                      options=dict(maxiter=10000, gtol=1e-12, ftol=1e-16)).fun
    return x, y, loss, f_star


def bench_logreg(seeds: int) -> None:
    torch.set_default_dtype(torch.float64)
    x, y, loss, f_star = logreg_problem()
    print(f"\n## A. digits logistic regression + L2, batch 64, Adam lr 1e-2 3 epochs + 7 epochs of calls"
          f" (f* = {f_star:.6f})")
    print("| second phase | gradient evaluations | gap to f* (mean +- std) |\n|---|---|---|")
    for name, variant in VARIANTS.items():
        gaps, calls = [], 0
        for seed in range(seeds):
            w = torch.zeros(650, requires_grad=True)
            calls = run_phases([w], lambda idx, w=w: loss(w, idx), len(y), seed, 3, 10, variant)
            with torch.no_grad():
                gaps.append(loss(w).item() - f_star)
        print(f"| {name} | {calls} | {statistics.mean(gaps):.4f} +- {statistics.stdev(gaps):.4f} |")
    torch.set_default_dtype(torch.float32)


def bench_mlp(seeds: int) -> None:
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x / 16.0, y, test_size=0.25, stratify=y, random_state=0)
    xtr, xte = torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte, dtype=torch.float32)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    print("\n## B. digits MLP 64-64-10 (tanh), batch 64, Adam lr 1e-2 10 epochs + 10 epochs of calls")
    print("| second phase | gradient evaluations | final train loss | test accuracy |\n|---|---|---|---|")
    for name, variant in VARIANTS.items():
        losses, accs, calls = [], [], 0
        for seed in range(seeds):
            torch.manual_seed(seed)
            model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10))
            ce = torch.nn.functional.cross_entropy
            calls = run_phases(list(model.parameters()), lambda idx: ce(model(xtr[idx]), ytr[idx]), len(ytr),
                               seed, 10, 20, variant)
            with torch.no_grad():
                losses.append(ce(model(xtr), ytr).item())
                accs.append((model(xte).argmax(1) == yte).double().mean().item())
        print(f"| {name} | {calls} | {statistics.mean(losses):.4f} +- {statistics.stdev(losses):.4f} "
              f"| {statistics.mean(accs):.4f} +- {statistics.stdev(accs):.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--only", choices=["logreg", "mlp"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.only in (None, "logreg"):
        bench_logreg(args.seeds)
    if args.only in (None, "mlp"):
        bench_mlp(args.seeds)


if __name__ == "__main__":
    main()

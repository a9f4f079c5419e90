"""Run every benchmark whose figures appear in BENCHMARKS.md, one after the other.

Run: ``make bench`` (or ``.venv/bin/python -m benchmarks.run_all``). Timing figures want an
otherwise idle machine; every ratio compares peers measured side by side in the same run.
"""

from __future__ import annotations

import runpy
import sys

MODULES = ("benchmarks.bench_step_cost", "benchmarks.bench_rosenbrock", "benchmarks.bench_minibatch",
           "benchmarks.bench_test_functions")


def main() -> None:
    for module in MODULES:
        print(f"\n# python -m {module}", flush=True)
        sys.argv = [module]
        runpy.run_module(module, run_name="__main__")


if __name__ == "__main__":
    main()

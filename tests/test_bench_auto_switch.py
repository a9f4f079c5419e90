"""``benchmarks.bench_auto_switch``: the study that finds the switch, the paired table, and the run cache that lets a
rerun train only what it has not trained yet (on Rosenbrock, where a run takes a fraction of a second)."""

from __future__ import annotations

import concurrent.futures
import json

from benchmarks import bench_auto_switch as bench


class CountingPool(concurrent.futures.ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(2)
        self.submitted = 0

    def submit(self, *args, **kwargs):  # type: ignore[override]
        self.submitted += 1
        return super().submit(*args, **kwargs)


def test_the_table_pairs_rules_by_seed_and_a_rerun_trains_nothing_new(tmp_path):
    cache_path = str(tmp_path / "runs.jsonl")
    with CountingPool() as pool:
        lines = bench.measure("rosenbrock", [100, 101], [0], pool, None, ("tuned", "auto", "never", "middle"),
                              trials=4, jobs=2, cache=bench.RunCache(cache_path))
    trained = pool.submitted
    # the never run that sizes the search, 4 trials (a repeated step is one run), 4 rules x 2 seeds
    assert 1 + 1 <= trained <= 1 + 4 + 4 * 2
    with open(cache_path) as saved:
        assert len([json.loads(line) for line in saved]) == trained
    header = next(line for line in lines if line.startswith("\n### rosenbrock"))
    assert "4-trial TPE study of switch.step on tuning seeds [0] (4 runs" in header
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"rule", "tuned", "auto", "never", "middle"}
    assert rows["tuned"].split(" | ")[1] == "4 + 1" and rows["auto"].split(" | ")[1] == "0 + 1"
    assert "+0 (0, nan)" in rows["tuned"]  # tuned against itself
    with CountingPool() as again:
        rerun = bench.measure("rosenbrock", [100, 101], [0], again, None, ("tuned", "auto", "never", "middle"),
                              trials=4, jobs=2, cache=bench.RunCache(cache_path))
    assert again.submitted == 0 and rerun == lines


def test_rule_names_build_their_switches():
    assert bench._switch("plateau@0.3", 10) == {"criterion": "plateau", "ratio": 0.3}
    assert bench._switch("probe|plateau", 10) == {"criterion": "any", "of": [{"criterion": "probe"},
                                                                             {"criterion": "plateau"}]}
    assert bench._switch("middle", 30) == {"criterion": "epoch", "epoch": 15}
    assert bench._rules(["plateau@0.3"]) == ("tuned", "auto", "plateau", "probe", "plateau@0.3", "absolute_rules",
                                             "never", "middle")

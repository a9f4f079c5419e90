"""fuse_tune.records: the one vocabulary of what runs record, written by the trackers and read by the dashboards.

Properties checked: importing it (and the dashboards) stays free of torch and of anything outside the standard
library; the switch-epoch text round-trips, "never switched" included, and the dashboards read what the trackers
write; passwords in storage URLs are redacted; and no other module of fuse_tune/ or dashboards/ spells a tag
name as a literal (so a re-introduced ``"fuse.state"`` fails here).
"""

from __future__ import annotations

import ast
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fuse_tune import records
from fuse_tune.records import (
    NEVER_SWITCHED,
    OptunaAttrs,
    Tags,
    decode_switch_epochs,
    encode_switch_epochs,
    parse_per_seed_key,
    per_seed_key,
    redact,
)

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fuse_tune", "dashboards")


def _imported_after(statement: str) -> dict[str, list[str]]:
    """Run ``statement`` in a fresh interpreter; the modules it imported, and those among them not in the
    standard library (top-level names other than fuse_tune / dashboards)."""
    script = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        f"{statement}\n"
        "new = sorted(set(sys.modules) - before)\n"
        "ours = {'fuse_tune', 'dashboards'}\n"
        "foreign = sorted({m.split('.')[0] for m in new} - set(sys.stdlib_module_names) - ours)\n"
        "print(json.dumps({'all': sorted(sys.modules), 'new': new, 'foreign': foreign}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_dashboards_and_records_import_without_torch():
    found = _imported_after("import dashboards, dashboards.data, dashboards.tables, dashboards.plots, "
                            "dashboards.report, fuse_tune.records")
    heavy = {"torch", "torchvision", "fuse_optim", "ray", "fuse_tune.train", "fuse_tune.trial",
             "fuse_tune.workloads", "fuse_tune.optimizers", "fuse_tune.optuna_backend", "fuse_tune.ray_backend",
             "fuse_tune.trajectories"}
    assert not heavy & set(found["all"]), sorted(heavy & set(found["all"]))


def test_records_imports_the_standard_library_only():
    found = _imported_after("import fuse_tune.records")
    assert found["foreign"] == [], found["foreign"]
    assert {m for m in found["new"] if m.startswith("fuse_tune")} == {"fuse_tune", "fuse_tune.records"}


# ------------------------------------------------------------------ the switch epoch


@pytest.mark.parametrize("epochs", [[], [3], [None], [2, None], [None, None, None], [0, 10, None, 1]])
def test_switch_epochs_round_trip(epochs):
    assert decode_switch_epochs(encode_switch_epochs(epochs)) == epochs


def test_switch_epoch_text_is_one_entry_per_seed_and_none_for_never():
    assert encode_switch_epochs([2, None]) == f"2,{NEVER_SWITCHED}" == "2,none"
    assert encode_switch_epochs([]) == ""
    assert decode_switch_epochs(None) == []
    assert decode_switch_epochs(" 3,-,") == [3, None, None]  # the CLI's "-" and an empty entry: never switched


def test_dashboards_read_the_switch_epochs_the_trackers_write():
    from dashboards.data import TrialRun

    tags = {Tags.SEEDS: "0,1,2", Tags.SWITCH_EPOCH: encode_switch_epochs([3, None, 0])}
    trial = TrialRun(run_id="r", trial=0, status="FINISHED", tags=tags, params={}, summary={}, history={})
    found = trial.switch_epochs()
    assert found[0] == 3.0 and math.isnan(found[1]) and found[2] == 0.0


def test_per_seed_keys_round_trip():
    key = per_seed_key(records.Metrics.SWITCH_EPOCH, 12)
    assert key == "switch_epoch/seed_12" and parse_per_seed_key(key) == ("switch_epoch", 12)
    assert parse_per_seed_key("objective.val_accuracy") is None


def test_directions():
    assert records.direction(records.Metrics.TEST_ACCURACY) == records.MAXIMIZE
    for metric in (records.Metrics.TRAIN_LOSS, records.Metrics.TIME_TO_TARGET, *records.COST_METRICS, None):
        assert records.direction(metric) == records.MINIMIZE
    assert set(records.OBJECTIVE_METRICS) <= set(records.DIRECTIONS)


# ------------------------------------------------------------------ redaction


def test_redact_hides_passwords_in_postgresql_urls():
    assert redact("postgresql://u:secret@db.example/studies") == "postgresql://u:***@db.example/studies"
    assert redact("postgresql+psycopg2://fuse:p%40ss:w@h:5432/db") == "postgresql+psycopg2://fuse:***@h:5432/db"
    text = "could not connect to postgresql://a:secret@h1/db, then to postgresql://b:pw@h2:5432/db"
    assert redact(text) == "could not connect to postgresql://a:***@h1/db, then to postgresql://b:***@h2:5432/db"


def test_redact_leaves_urls_without_a_password_alone():
    for text in ("sqlite:////tmp/x.db", "postgresql://u@h/db", "journal:/tmp/fuse-studies.log", ""):
        assert redact(text) == text
    assert redact(None) is None


def test_tracking_reexports_the_same_redact():
    from fuse_tune import tracking

    assert tracking.redact is records.redact


# ------------------------------------------------------------------ no tag name spelled twice


def _sources() -> list[Path]:
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert files, "no sources found"
    return [p for p in files if p != ROOT / "fuse_tune" / "records.py"]


def _tag_names() -> set[str]:
    names = {value for cls in (Tags, OptunaAttrs) for key, value in vars(cls).items()
             if key.isupper() and isinstance(value, str) and value.startswith("fuse.")}
    return names | {Tags.MLFLOW_PARENT_RUN_ID}


def _quoted_tag_name() -> re.Pattern[str]:
    """A tag name in quotes, or back-quoted after ``tags.`` as in an MLflow filter (a name in a docstring's
    double back-quotes is documentation, not a record)."""
    names = [re.escape(name) for name in sorted(_tag_names())]
    return re.compile("|".join(f"[\"']{name}[\"']|tags\\.`{name}`" for name in names))


def test_the_tag_names_are_the_ones_runs_already_carry():
    names = _tag_names()
    assert {"fuse.state", "fuse.role", "fuse.study", "fuse.trial", "fuse.switch_epoch", "fuse.seeds"} <= names
    assert Tags.STATE == "fuse.state" and Tags.SWITCH_EPOCH == "fuse.switch_epoch"


def test_no_module_but_records_spells_a_tag_name():
    """Grep: no quoted tag name (``"fuse.state"``, ``'fuse.state'`` or MLflow's filter form ``tags.`fuse.state```)."""
    pattern = _quoted_tag_name()
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in _sources() for number, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line)]
    assert not found, "spell these through fuse_tune.records:\n" + "\n".join(found)


def _code_strings(tree: ast.AST) -> list[ast.Constant]:
    """String constants of the code: every one but docstrings (a string standing alone as a statement)."""
    documentation = {id(node.value) for node in ast.walk(tree)
                     if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in documentation]


def test_no_module_but_records_writes_a_record_name_into_a_string():
    """Parse: no string in code (f-string parts included) holds ``fuse.<name>`` or the per-seed key's ``/seed_``."""
    record_name = re.compile(r"\bfuse\.[A-Za-z_]|/seed_")
    found = []
    for path in _sources():
        for node in _code_strings(ast.parse(path.read_text(), filename=str(path))):
            if record_name.search(node.value):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "spell these through fuse_tune.records:\n" + "\n".join(found)


def test_the_literal_checks_catch_a_reintroduced_literal():
    code = 'run.set_tags({"fuse.state": "failed"})\nquery = f"tags.`fuse.role` = \'{role}\'"\n'
    assert len([n for n in _code_strings(ast.parse(code)) if re.search(r"\bfuse\.[A-Za-z_]", n.value)]) == 2
    pattern = _quoted_tag_name()
    assert all(pattern.search(line) for line in code.splitlines())


# ------------------------------------------------------------------ std over seeds, shown values


def test_seed_std_is_the_sample_std_with_ddof_1():
    np = pytest.importorskip("numpy")
    values = [0.91, 0.87, 0.95, 0.9]
    assert records.SEED_STD_DDOF == 1
    assert records.seed_std(values) == pytest.approx(float(np.std(values, ddof=1)), rel=1e-12)
    assert records.seed_std([2.0, 2.0, 2.0]) == 0.0


@pytest.mark.parametrize("values", [[], [0.9], [0.9, math.inf], [0.9, math.nan], [-math.inf, 1.0, 2.0]])
def test_seed_std_is_nan_where_undefined(values):
    assert math.isnan(records.seed_std(values))


def test_trials_tables_and_comparisons_share_the_seed_std():
    """The trial's recorded std, the comparison table's and the paired differences' are one definition."""
    import pandas as pd

    from dashboards import tables

    assert tables.seed_std is records.seed_std
    rows = [{"study": "c", "workload": "w", "optimizer": method, "trial": 0, "run_id": method, "variant": method,
             "criterion": "", "state": "complete", "seed": seed, "switch_epoch": math.nan, "metric": "val_accuracy",
             "epoch": 0, "value": value, "objective": "val_accuracy"}
            for method, values in (("fuse_pv", [0.9, 0.8, 0.95]), ("adam", [0.85, 0.8, 0.9]))
            for seed, value in enumerate(values)]
    table = tables.comparison_table(pd.DataFrame(rows)).set_index("method")
    assert table.loc["fuse_pv", "val_accuracy.std"] == records.seed_std([0.9, 0.8, 0.95])


@pytest.mark.parametrize(("value", "shown"), [(256.0, "256"), (0.00123456, "0.001235"), (3, "3"), ("tpe", "tpe"),
                                              (True, "True"), (12345.0, "12345"), (1e20, "1e+20")])
def test_short_value(value, shown):
    assert records.short_value(value) == shown

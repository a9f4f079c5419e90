"""Study files: parsing, the shipped studies, fingerprints, ``nest``, conditional parameters and ``suggest``."""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from pathlib import Path

import optuna
import pytest
import yaml

from fuse_tune.spec import Param, SpecError, mapping, nest, parse_spec, read_spec, seed_list
from fuse_tune.trial import check_spec, load_spec, split_settings, suggest

STUDIES = Path(__file__).resolve().parents[2] / "studies"
SHIPPED = sorted(STUDIES.glob("*.yaml"))
DATA_DIR = Path(os.environ.get("FUSE_TEST_DATA_DIR", "/work/shared/data"))

optuna.logging.set_verbosity(optuna.logging.WARNING)

RAW = {
    "name": "unit",
    "workload": "digits-logreg",
    "optimizer": "fuse_pv",
    "epochs": 2,
    "seeds": [0, 1],
    "fixed": {"batch_size": 64, "lr": 0.01},
    "search": {
        "switch.criterion": {"type": "categorical", "choices": ["epoch", "grad_norm", "loss_change"]},
        "switch.epoch": {"type": "int", "low": 1, "high": 3, "when": {"switch.criterion": "epoch"}},
        "switch.zeta": {"type": "float", "low": 1e-3, "high": 1.0, "log": True,
                        "when": {"switch.criterion": "grad_norm"}},
        "switch.sigma": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True,
                         "when": {"switch.criterion": "loss_change"}},
        "history_size": {"type": "int", "low": 3, "high": 20},
    },
    "budget": {"trials": 5},
}
CONDITIONAL = {"epoch": "switch.epoch", "grad_norm": "switch.zeta", "loss_change": "switch.sigma"}


def raw(**changes):
    result = copy.deepcopy(RAW)
    result.update(changes)
    return result


# ------------------------------------------------------------------ the shipped study files


def test_the_shipped_studies_are_there():
    names = {path.stem for path in SHIPPED}
    assert {"quickstart", "criterion_ablation", "theta_schedules", "history_batch", "test_functions",
            "paper_table2"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_study_loads_and_is_checked(path):
    spec = load_spec(path)  # parse + dry run of every range end and choice (data-dependent parts skip)
    assert spec.name == path.stem
    assert spec.path == str(path.resolve()) and spec.source == path.read_text()
    assert spec.description and spec.search
    assert "data_dir: /" not in spec.source  # no machine's data folder is baked into a shipped study
    searched = {p.name for p in spec.search}
    for param in spec.search:  # every conditional can be active: its condition is a value the parent takes
        for other, allowed in param.when:
            parent = next(p for p in spec.search if p.name == other)
            assert other in searched and set(allowed) <= set(parent.choices), (param.name, other)
    if spec.sampler["name"] == "grid":  # a grid study's budget is its grid: every cell once
        assert spec.trials == math.prod(len(p.choices) for p in spec.search)
        assert spec.pruner["name"] == "none"
    if spec.sampler["name"] == "random":
        assert "seed" in spec.sampler  # reproducible draws


def test_the_criterion_ablation_searches_each_criterion_with_its_own_threshold():
    spec = load_spec(STUDIES / "criterion_ablation.yaml")
    by_name = {p.name: p for p in spec.search}
    assert set(by_name["switch.criterion"].choices) == set(CONDITIONAL)
    for criterion, name in CONDITIONAL.items():
        assert by_name[name].when == (("switch.criterion", (criterion,)),)
    assert by_name["switch.epoch"].type == "int"
    assert by_name["switch.zeta"].log and by_name["switch.sigma"].log
    assert spec.sampler == {"name": "random", "seed": spec.sampler["seed"]} and spec.pruner["name"] == "median"
    assert spec.objective.metric == "val_accuracy" and spec.objective.direction == "maximize"
    assert 25 <= spec.trials <= 40
    assert spec.workload in ("digits-mlp", "digits-logreg") and spec.optimizer == "fuse_pv"


def test_theta_schedules_give_each_kind_its_own_parameters():
    spec = load_spec(STUDIES / "theta_schedules.yaml")
    assert spec.optimizer == "fuse"
    by_name = {p.name: p for p in spec.search}
    kinds = set(by_name["theta.schedule"].choices)
    assert kinds == {"linear", "cosine", "exponential", "constant"}
    conditions = {name: set(p.when[0][1]) for name, p in by_name.items() if p.when}
    assert conditions == {"theta.steps": {"linear", "cosine"}, "theta.rate": {"exponential"},
                          "theta.theta": {"constant"}}
    for kind in kinds:  # every kind, with its own parameters, builds a Fuse optimizer
        trial = optuna.trial.FixedTrial({"lr": 0.01, "theta.schedule": kind, "theta.steps": 50, "theta.rate": 0.99,
                                         "theta.theta": 0.5})
        settings = spec.configuration(suggest(trial, spec.search))
        assert settings["theta"]["schedule"] == kind and len(settings["theta"]) == 2


def test_test_functions_route_steps_per_epoch_to_the_trainer():
    spec = load_spec(STUDIES / "test_functions.yaml")
    assert spec.objective.metric == "train_loss"
    trainer, workload, optimizer = split_settings(spec.workload, dict(spec.fixed))
    assert trainer == {"steps_per_epoch": 50} and workload == {"noise": 0.0} and "lr" in optimizer
    assert {"switch.criterion", "line_search"} <= {p.name for p in spec.search}


def test_paper_table2_is_the_usps_cnn_setting_and_takes_its_data_dir_from_the_file():
    spec = load_spec(STUDIES / "paper_table2.yaml")
    assert spec.workload == "usps-cnn" and spec.optimizer == "fuse_pv"
    assert spec.fixed["lr"] == pytest.approx(1e-3) and spec.fixed["switch"] == {"criterion": "epoch"}
    assert [p.name for p in spec.search] == ["switch.epoch"]
    assert spec.data_dir and not Path(spec.data_dir).is_absolute()
    assert "data_dir" in spec.source.split("name:")[0]  # the comment on where the data must be
    from fuse_tune.trial import train_config

    assert train_config(spec, spec.configuration({"switch.epoch": 3}), 0).data_dir == spec.data_dir


def test_paper_table2_checks_against_the_real_usps_data_when_present():
    if not (DATA_DIR / "USPS" / "usps.bz2").is_file():
        pytest.skip(f"USPS not found in {DATA_DIR} (set FUSE_TEST_DATA_DIR)")
    spec = dataclasses.replace(load_spec(STUDIES / "paper_table2.yaml"), data_dir=str(DATA_DIR))
    check_spec(spec)  # with the data present, the batch sizes are checked against its 7,291 samples too


# ------------------------------------------------------------------ parsing details


def test_parse_types_defaults_and_yaml_1_1_numbers(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw(), sort_keys=False).replace("0.01", "1e-2"))  # YAML 1.1 reads 1e-2 as text
    spec = load_spec(path)
    assert spec.fixed == {"batch_size": 64, "lr": 0.01} and isinstance(spec.fixed["lr"], float)
    assert spec.seeds == (0, 1) and spec.trials == 5 and spec.timeout is None
    assert spec.sampler["name"] == "tpe" and spec.pruner["name"] == "median"
    assert spec.objective.direction == "maximize" and spec.objective.directions == ["maximize"]
    history = next(p for p in spec.search if p.name == "history_size")
    assert (history.type, history.low, history.high) == ("int", 3, 20) and isinstance(history.low, int)
    assert parse_spec(raw(seeds=4)).seeds == (4,)
    cost = parse_spec(raw(objective={"metric": "train_loss", "cost": "grad_evals"}, pruner={"name": "none"}))
    assert cost.objective.directions == ["minimize", "minimize"]


def test_a_fixed_switch_criterion_completed_by_a_searched_threshold_is_valid():
    spec = parse_spec(raw(fixed={"lr": 0.01, "switch.criterion": "epoch"},
                          search={"switch.epoch": {"type": "int", "low": 1, "high": 3}}))
    check_spec(spec)  # the fixed settings alone lack switch.epoch; the searched one completes them
    assert spec.configuration({"switch.epoch": 2})["switch"] == {"criterion": "epoch", "epoch": 2}


def test_a_condition_on_a_value_the_parent_never_takes_is_refused():
    search = dict(RAW["search"], **{"switch.zeta": {"type": "float", "low": 1e-3, "high": 1.0,
                                                    "when": {"switch.criterion": "grad_nrom"}}})
    with pytest.raises(SpecError, match=r"search\.switch\.zeta\.when: 'switch\.criterion' never takes"):
        parse_spec(raw(search=search))


# ------------------------------------------------------------------ fingerprint


def test_fingerprint_is_stable_and_tracks_the_search_space(tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump(raw(), sort_keys=False))
    reordered = dict(reversed(list(raw().items())))
    second.write_text("# a comment; the top-level keys reordered\n" + yaml.safe_dump(reordered, sort_keys=False))
    fingerprint = load_spec(first).fingerprint()
    assert len(fingerprint) == 16 and fingerprint == load_spec(first).fingerprint()
    assert load_spec(second).fingerprint() == fingerprint
    assert check_spec(parse_spec(raw())).fingerprint() == fingerprint  # the objective resolved as load_spec does
    # the budget, the sampler, the pruner, the storage and the description do not define the search
    same = raw(budget={"trials": 99}, sampler={"name": "random", "seed": 3}, pruner={"name": "none"},
               storage="sqlite:///x.db", description="other words")
    assert check_spec(parse_spec(same)).fingerprint() == fingerprint
    changed = [
        raw(search=dict(RAW["search"], history_size={"type": "int", "low": 3, "high": 21})),
        raw(search=dict(RAW["search"], history_size={"type": "int", "low": 3, "high": 20, "log": True})),
        raw(search={k: v for k, v in RAW["search"].items() if k != "history_size"}),
        raw(fixed={"batch_size": 32, "lr": 0.01}),
        raw(epochs=3), raw(seeds=[0]), raw(optimizer="fuse"), raw(workload="digits-mlp"),
        raw(objective={"metric": "train_loss"}),
    ]
    prints = [parse_spec(r).fingerprint() for r in changed]
    assert fingerprint not in prints and len(set(prints)) == len(prints)


# ------------------------------------------------------------------ nest


def test_nest():
    assert nest({}) == {}
    assert nest({"lr": 0.1}) == {"lr": 0.1}
    assert nest({"switch.criterion": "epoch", "switch.epoch": 3, "lr": 1e-3}) == {
        "switch": {"criterion": "epoch", "epoch": 3}, "lr": 1e-3}
    assert nest({"a.b.c": 1, "a.b.d": 2, "a.e": 3}) == {"a": {"b": {"c": 1, "d": 2}, "e": 3}}
    assert nest({"hidden_sizes": [64, 64]}) == {"hidden_sizes": [64, 64]}
    with pytest.raises(SpecError, match="'switch' is both a value and a group"):
        nest({"switch": "never", "switch.epoch": 3})
    spec = parse_spec(raw(fixed={"batch_size": 64, "theta": {"schedule": "linear"}, "theta.steps": 9}))
    assert spec.fixed == {"batch_size": 64, "theta": {"schedule": "linear", "steps": 9}}


# ------------------------------------------------------------------ Param.active


def test_param_active():
    free = Param("history_size", "int", low=3, high=20)
    assert free.active({}) and free.active({"anything": 1})
    zeta = Param("switch.zeta", "float", low=1e-3, high=1.0, when=(("switch.criterion", ("grad_norm",)),))
    assert zeta.active({"switch.criterion": "grad_norm"})
    assert not zeta.active({"switch.criterion": "epoch"})
    assert not zeta.active({})  # the parent was not sampled (itself inactive)
    steps = Param("theta.steps", "int", low=10, high=300, when=(("theta.schedule", ("linear", "cosine")),))
    assert steps.active({"theta.schedule": "cosine"}) and not steps.active({"theta.schedule": "constant"})
    both = Param("x", "float", low=0, high=1, when=(("a", (1,)), ("b", ("u",))))
    assert both.active({"a": 1, "b": "u"}) and not both.active({"a": 1, "b": "v"})
    assert parse_spec(raw()).search[1].when == (("switch.criterion", ("epoch",)),)
    assert Param("c", "categorical", choices=("a", "b")).extremes() == ["a", "b"]
    assert free.extremes() == [3, 20]


# ------------------------------------------------------------------ suggest


@pytest.mark.parametrize("criterion", sorted(CONDITIONAL))
def test_suggest_with_a_fixed_trial_asks_only_for_active_parameters(criterion):
    params = parse_spec(raw()).search
    given = {"switch.criterion": criterion, CONDITIONAL[criterion]: 2 if criterion == "epoch" else 0.01,
             "history_size": 5}
    # FixedTrial raises for a parameter it was not given: asking for an inactive one would fail here
    values = suggest(optuna.trial.FixedTrial(given), params)
    assert values == given


def test_suggest_in_a_real_study_samples_only_active_conditionals():
    spec = parse_spec(raw())
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        values = suggest(trial, spec.search)
        criterion = values["switch.criterion"]
        seen.add(criterion)
        assert set(trial.params) == set(values) == {"switch.criterion", CONDITIONAL[criterion], "history_size"}
        assert isinstance(values["history_size"], int) and 3 <= values["history_size"] <= 20
        if criterion == "epoch":
            assert values["switch.epoch"] in (1, 2, 3)
        else:
            threshold = values[CONDITIONAL[criterion]]
            assert isinstance(threshold, float) and threshold > 0
        settings = spec.configuration(values)
        assert set(settings["switch"]) == {"criterion", CONDITIONAL[criterion].split(".")[1]}
        study.tell(trial, 0.5)
    assert seen == set(CONDITIONAL)
    distributions = study.trials[0].distributions
    assert isinstance(distributions["history_size"], optuna.distributions.IntDistribution)


def test_suggest_honours_log_and_step():
    params = (Param("lr", "float", low=1e-4, high=1e-1, log=True), Param("m", "int", low=2, high=10, step=4),
              Param("f", "float", low=0.0, high=1.0, step=0.25))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    values = suggest(trial, params)
    assert trial.distributions["lr"].log and values["m"] in (2, 6, 10) and values["f"] in (0, 0.25, 0.5, 0.75, 1)


# ------------------------------------------------------------------ parsing apart from checking


def test_reading_parses_without_the_dry_run_and_loading_checks_too(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw(fixed={"batch_size": 64, "lr": 0.01, "not_a_setting": 1})))
    assert read_spec(path).fixed["not_a_setting"] == 1  # parsing knows no optimizer: it takes the name
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: fixed\.not_a_setting: not a setting"):
        load_spec(path)  # the dry run through the real constructors refuses it, naming the file and field
    path.write_text(yaml.safe_dump(raw(epochs=0)))
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}: epochs: expected an integer"):
        read_spec(path)


def test_one_field_reader_for_study_and_comparison_files():
    assert mapping(None, "budget", {"trials"}) == {} and mapping({"a": 1}, "fixed") == {"a": 1}
    with pytest.raises(SpecError, match=r"^budget: unknown key\(s\) \['x'\]; accepted: \['timeout', 'trials'\]$"):
        mapping({"x": 1}, "budget", ("trials", "timeout"))
    with pytest.raises(SpecError, match=r"^tuning\.x: unknown field; accepted: \['trials', 'seeds'\]$"):
        mapping({"x": 1}, "tuning", ("trials", "seeds"), name_unknown=True)
    with pytest.raises(SpecError, match=r"^x: unknown field"):
        mapping({"x": 1}, "", ("name",), name_unknown=True)
    with pytest.raises(SpecError, match=r"^fixed: expected a mapping, got 3$"):
        mapping(3, "fixed")
    assert seed_list(3, "seeds") == (3,) and seed_list([0, 2], "seeds", one_message=True) == (0, 2)
    with pytest.raises(SpecError, match=r"^seeds: seeds must be distinct, got \[1, 1\]$"):
        seed_list([1, 1], "seeds")
    with pytest.raises(SpecError, match=r"^seeds: expected a non-empty list of integers >= 0, got \[-1\]$"):
        seed_list([-1], "seeds")
    for bad in ([1, 1], [-1], [], "a"):
        with pytest.raises(SpecError, match=r"^rerun\.seeds: expected a non-empty list of distinct integers >= 0"):
            seed_list(bad, "rerun.seeds", one_message=True)

"""What a study and its trials record, named once: tags, params, metrics, directions, encodings, redaction.

The trackers (:mod:`fuse_tune.tracking`, :mod:`fuse_tune.trial`, the Optuna and Ray backends,
:mod:`fuse_tune.compare`) write through these names and :mod:`dashboards` reads through them, so what one side
writes the other reads by construction. Standard library only: importing this module imports neither torch nor
mlflow, optuna or pandas, and the dashboards import it to read runs without torch.

A study in MLflow (the experiment is named after the study):

* one *parent* run, tagged ``Tags.ROLE = ROLE_STUDY``, with the study's settings as params (:class:`StudyParams`)
  and the study file as an artifact; the report is logged under :data:`REPORT_ARTIFACT_DIR` on it;
* one *child* run per trial, tagged ``Tags.ROLE = ROLE_TRIAL`` and ``Tags.MLFLOW_PARENT_RUN_ID``, with the
  trial's flattened settings as params (:func:`flatten_params`: ``lr``, ``switch.criterion``, ...);
* per-epoch metrics per seed under :func:`per_seed_key` (``train_loss/seed_0``) with MLflow ``step`` = the
  0-based epoch whose end the value measures (:data:`PER_SEED_METRICS`); when a trial completes, the means over
  seeds of :data:`EPOCH_MEAN_METRICS` under their plain names (same steps) and its summary metrics
  (:func:`objective_key`, :func:`objective_std_key`, :func:`cost_key`, ``Metrics.EPOCHS_RUN``,
  ``Metrics.SWITCH_EPOCH_MEAN``) at step 0.

An Optuna study (the Optuna backend) records :class:`OptunaAttrs` on the study and its trials.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Tags", "OptunaAttrs", "StudyParams", "Metrics", "EXPERIMENT_KIND_MODEL_TRAINING", "ROLE_STUDY",
           "ROLE_TRIAL", "STATE_COMPLETE",
           "STATE_PRUNED", "STATE_FAILED", "STATES", "SWITCH_PARAM_PREFIX", "THETA_PARAM_PREFIX",
           "PER_SEED_METRICS", "EPOCH_MEAN_METRICS", "OBJECTIVE_METRICS", "COST_METRICS", "MAXIMIZE", "MINIMIZE",
           "DIRECTIONS", "NEVER_SWITCHED", "FIRST_PHASE", "REPORT_ARTIFACT_DIR", "direction", "second_phase_name",
           "per_seed_key", "parse_per_seed_key", "objective_key", "objective_std_key", "cost_key",
           "encode_switch_epochs", "decode_switch_epochs", "flatten_params", "tag_equals", "redact", "SEED_STD_DDOF",
           "seed_std", "short_value"]


# ------------------------------------------------------------------ MLflow tags


class Tags:
    """Names of the MLflow run tags fuse-tune writes (values are text, at most 5,000 characters; redacted)."""

    #: ``study`` on a study's parent run, ``trial`` on each trial's child run (:data:`ROLE_STUDY`,
    #: :data:`ROLE_TRIAL`); how the dashboards find the runs
    ROLE = "fuse.role"
    #: the study name (parent and child runs); a study's parent run is found again on resume by it
    STUDY = "fuse.study"
    #: the trial number: Optuna's trial number (both backends), the method's index in a comparison's reruns
    TRIAL = "fuse.trial"
    #: the workload name (``digits-logreg``, ``rosenbrock``, ...)
    WORKLOAD = "fuse.workload"
    #: the optimizer name (``fuse_pv``, ``adam``, ...)
    OPTIMIZER = "fuse.optimizer"
    #: the training seeds of the trial, comma-separated (``0,1``): the order of :data:`SWITCH_EPOCH`'s entries
    SEEDS = "fuse.seeds"
    #: the switch criterion (``epoch``, ``grad_norm``, ...); empty for optimizers without one
    CRITERION = "fuse.criterion"
    #: ``optuna``, ``ray`` or ``compare``: what ran the trial or study
    BACKEND = "fuse.backend"
    #: parent run: where the study's state lives (the Optuna storage URL, or the Ray results folder), redacted
    STORAGE = "fuse.storage"
    #: parent run: the study file's fingerprint (a hash of its search space and settings)
    FINGERPRINT = "fuse.fingerprint"
    #: how a trial ended: :data:`STATE_COMPLETE`, :data:`STATE_PRUNED` or :data:`STATE_FAILED`; absent while it runs
    STATE = "fuse.state"
    #: a failed trial's exception, ``Type: message``
    ERROR = "fuse.error"
    #: a complete trial's switch epoch per seed of :data:`SEEDS` (:func:`encode_switch_epochs`: ``2,none``)
    SWITCH_EPOCH = "fuse.switch_epoch"
    #: a complete trial's switch reason (the first seed's that switched), :data:`NEVER_SWITCHED` when none did
    SWITCH_REASON = "fuse.switch_reason"
    #: MLflow's own tag nesting a child run under its parent run (the parent's run id)
    MLFLOW_PARENT_RUN_ID = "mlflow.parentRunId"
    #: MLflow 3's *experiment* tag for what an experiment holds; :data:`EXPERIMENT_KIND_MODEL_TRAINING` makes its
    #: UI open a study's experiment on the runs table instead of the GenAI traces page
    MLFLOW_EXPERIMENT_KIND = "mlflow.experimentKind"
    #: prefix of the package-version tags (``version.torch``, ``version.optuna``, ...)
    VERSION_PREFIX = "version."
    #: the git commit of the fuse checkout that ran (``unknown`` outside a checkout)
    GIT_COMMIT = "git.commit"

    # Ray backend (child runs, except RAY_SCHEDULER on the parent)
    #: Ray Tune's trial id
    RAY_TRIAL_ID = "fuse.ray_trial_id"
    #: the id of the Ray experiment (kept across restores): a lost attempt's run is found again by it
    RAY_EXPERIMENT = "fuse.ray_experiment"
    #: the Ray node the trial ran on
    NODE_ID = "fuse.node_id"
    #: the host name the trial ran on (also an Optuna trial system attribute, :attr:`OptunaAttrs.HOST`)
    HOST = "fuse.host"
    #: the run a trial cloned by PBT continues from
    CLONED_FROM = "fuse.cloned_from"
    #: ``1`` once a Ray trial's outcome is logged (a restored trial must not log it twice)
    RAY_OUTCOME_LOGGED = "fuse.ray_outcome_logged"
    #: parent run: Tune's scheduler, ``asha`` or ``fifo``
    RAY_SCHEDULER = "fuse.ray_scheduler"

    # comparisons (fuse-tune compare): the reruns' parent and child runs
    #: the comparison's name, on its parent run and on every rerun
    COMPARISON = "fuse.comparison"
    #: the tuning study a rerun's configuration comes from (``none (fixed settings)`` for an untuned method)
    TUNING_STUDY = "fuse.tuning_study"
    #: the tuning study's best trial number, the configuration rerun
    TUNING_BEST_TRIAL = "fuse.tuning_best_trial"
    #: that trial's objective value on the tuning seeds
    TUNING_VALUE = "fuse.tuning_value"


#: :attr:`Tags.MLFLOW_EXPERIMENT_KIND` of every experiment fuse-tune writes (MLflow 3's "machine learning" kind)
EXPERIMENT_KIND_MODEL_TRAINING = "custom_model_development"

#: :attr:`Tags.ROLE` of a study's parent run
ROLE_STUDY = "study"
#: :attr:`Tags.ROLE` of a trial's child run
ROLE_TRIAL = "trial"

#: :attr:`Tags.STATE`: the trial trained every epoch on every seed and logged its outcome
STATE_COMPLETE = "complete"
#: :attr:`Tags.STATE`: stopped early by the pruner (Optuna) or scheduler (Ray ASHA)
STATE_PRUNED = "pruned"
#: :attr:`Tags.STATE`: ended by an exception (:attr:`Tags.ERROR` says which) or a dead worker
STATE_FAILED = "failed"
#: every value :attr:`Tags.STATE` takes
STATES = (STATE_COMPLETE, STATE_PRUNED, STATE_FAILED)


def tag_equals(tag: str, value: Any) -> str:
    """An MLflow ``search_runs`` filter: runs whose ``tag`` is ``value`` (``tags.`fuse.role` = 'study'``)."""
    return f"tags.`{tag}` = '{value}'"


# ------------------------------------------------------------------ Optuna attributes


class OptunaAttrs:
    """Names of the attributes the Optuna backend sets on a study and its trials."""

    #: study user attribute: the study file's fingerprint; a run with a different one is refused
    FINGERPRINT = Tags.FINGERPRINT
    #: study user attribute: the package versions (:attr:`Tags.VERSION_PREFIX` tags) at creation
    VERSIONS = "fuse.versions"
    #: study user attribute: the objective metric's name (:data:`OBJECTIVE_METRICS`)
    OBJECTIVE = "fuse.objective"
    #: trial system attribute: the worker's process id
    PID = "fuse.pid"
    #: trial system attribute: the worker's host name
    HOST = Tags.HOST
    #: trial system attribute: the trial's MLflow child run id
    MLFLOW_RUN_ID = "fuse.mlflow_run_id"
    #: trial system attribute: why the trial was failed from outside (``worker pid 123 died``)
    FAIL_REASON = "fuse.fail_reason"
    #: trial user attribute: the number of the trial whose parameters this one retries (set once, no chains)
    RETRY_OF = "fuse.retry_of"
    #: trial user attribute: ``True`` on a trial that lost the race for the budget's last slot (failed unrun)
    SURPLUS = "fuse.surplus"
    #: trial user attribute: std over seeds (:func:`seed_std`, ddof 1; NaN for one seed) of the objective
    VALUE_STD = "value_std"
    #: trial user attribute: the objective on each seed, in the study's seed order
    PER_SEED = "per_seed"
    #: trial user attribute: epochs completed at the switch on each seed (a list; ``None``: never switched)
    SWITCH_EPOCHS = "switch_epochs"
    #: trial user attribute: seed-epochs trained, summed over seeds
    EPOCHS_RUN = "epochs_run"
    #: trial user attribute: the mean over seeds of the cost (``objective.cost``: gradient evaluations or seconds)
    COST = "cost"


# ------------------------------------------------------------------ MLflow params


class StudyParams:
    """Names of the params of a study's parent run (a trial's params are its flattened settings)."""

    #: the workload name
    WORKLOAD = "workload"
    #: the optimizer name (studies only; a comparison has :attr:`METHODS`)
    OPTIMIZER = "optimizer"
    #: epochs per training run
    EPOCHS = "epochs"
    #: the training seeds, comma-separated (a comparison: its rerun seeds)
    SEEDS = "seeds"
    #: the objective metric's name (:data:`OBJECTIVE_METRICS` or ``val_<the workload's metric>``)
    OBJECTIVE = "objective"
    #: the objective's direction (``maximize``/``minimize``: the workload's metric's, which :func:`direction` can
    #: only guess from the name)
    OBJECTIVE_DIRECTION = "objective_direction"
    #: the sampler's name (``tpe``, ``random``, ...)
    SAMPLER = "sampler"
    #: the pruner's name (``median``, ``none``, ...)
    PRUNER = "pruner"
    #: the trial budget (finished trials)
    TRIALS = "trials"
    #: prefix of the fixed settings, flattened (``fixed.batch_size``)
    FIXED = "fixed"
    #: a comparison's methods (optimizer names), comma-separated
    METHODS = "methods"
    #: a comparison's tuning seeds, comma-separated
    TUNING_SEEDS = "tuning_seeds"


#: prefix of a trial's switch-criterion params (``switch.criterion``, ``switch.zeta``, ...)
SWITCH_PARAM_PREFIX = "switch."
#: prefix of a trial's theta-schedule params (FUSE: ``theta.schedule``, ...)
THETA_PARAM_PREFIX = "theta."


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings -> ``{"switch.criterion": "epoch", ...}`` as MLflow param strings (at most 6,000
    characters each); an empty mapping is one param, ``"{}"``."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name + "."))
        else:
            flat[name] = str(value)[:6000]
    return flat


# ------------------------------------------------------------------ metrics


class Metrics:
    """Names of the metrics a trial logs. Per-epoch ones are logged per seed (:func:`per_seed_key`); counts and
    times are cumulative from the start of training; :func:`direction` says which way is better."""

    #: the full training objective at the end of the epoch (test functions: f(x)); minimize
    TRAIN_LOSS = "train_loss"
    #: the mean minibatch loss over the epoch's steps; minimize
    BATCH_LOSS = "batch_loss"
    #: the objective (loss plus penalty) on the validation split at the end of the epoch (data sets only); minimize
    VAL_LOSS = "val_loss"
    #: the fraction of the validation split classified right (workloads whose metric is accuracy); maximize
    VAL_ACCURACY = "val_accuracy"
    #: the objective on the test split (``fuse-tune train`` and compare's reruns; never a study's trials); minimize
    TEST_LOSS = "test_loss"
    #: the fraction of the test split classified right (as ``test_loss``: never measured in a study's trials)
    TEST_ACCURACY = "test_accuracy"
    #: the mean over the epoch's steps of the squared minibatch gradient norm ``||g(x_k; B_k)||^2``
    GRAD_SQ_NORM = "grad_sq_norm"
    #: seconds spent training since the start, evaluation excluded; minimize
    WALL_TIME = "wall_time"
    #: gradient evaluations (closure calls) since the start; minimize
    GRAD_EVALS = "grad_evals"
    #: training samples drawn since the start
    SAMPLES = "samples"
    #: the minibatch size of the epoch's last step (larger after the switch when ``batch_size_after_switch``)
    BATCH_SIZE = "batch_size"
    #: ``f(x) - f*`` at the end of the epoch (test functions only); minimize
    GAP = "gap"
    #: the optimizer's phase at the epoch's last step: 0 in the first (:data:`FIRST_PHASE`), 1 after the switch
    PHASE_SECOND = "phase_second"
    #: epochs completed when the seed switched; logged from the epoch of the switch on
    SWITCH_EPOCH = "switch_epoch"
    #: seconds of training until ``train_loss <= target_loss`` (an objective, not logged per epoch); minimize
    TIME_TO_TARGET = "time_to_target"
    #: summary: seed-epochs trained, summed over seeds (the pruners' unit)
    EPOCHS_RUN = "epochs_run"
    #: summary: the mean switch epoch over the seeds that switched (absent when none did)
    SWITCH_EPOCH_MEAN = "switch_epoch.mean"


#: the per-epoch metrics logged per seed (``gap`` on test functions only, ``val_loss``/``test_loss`` on data sets
#: only, ``switch_epoch`` from the epoch the switch happened in on); the workload's metric on each split
#: evaluated (``val_accuracy``, ``test_mse``, ...) is logged beside them
PER_SEED_METRICS = (Metrics.TRAIN_LOSS, Metrics.BATCH_LOSS, Metrics.VAL_LOSS, Metrics.TEST_LOSS,
                    Metrics.GRAD_SQ_NORM, Metrics.WALL_TIME, Metrics.GRAD_EVALS, Metrics.SAMPLES, Metrics.BATCH_SIZE,
                    Metrics.GAP, Metrics.PHASE_SECOND, Metrics.SWITCH_EPOCH)
#: the per-epoch means over seeds logged under the plain metric names when a trial completes (with the
#: workload's metric on each split evaluated)
EPOCH_MEAN_METRICS = (Metrics.TRAIN_LOSS, Metrics.VAL_LOSS, Metrics.TEST_LOSS, Metrics.GRAD_SQ_NORM,
                      Metrics.WALL_TIME, Metrics.GRAD_EVALS)
#: the metrics a study may optimize besides ``val_<metric>`` of the workload's metric (``objective.metric``)
OBJECTIVE_METRICS = (Metrics.VAL_LOSS, Metrics.TRAIN_LOSS, Metrics.TIME_TO_TARGET)
#: the prefix of the split selection happens on: a study's objective is ``val_loss`` or ``val_<metric>``
VALIDATION_PREFIX = "val_"
#: the prefix of the held-out split: reported, never selected on
TEST_PREFIX = "test_"
#: the costs a study may minimize as a second objective (``objective.cost``)
COST_METRICS = (Metrics.GRAD_EVALS, Metrics.WALL_TIME)

_PER_SEED_KEY = re.compile(r"^(?P<metric>.+)/seed_(?P<seed>\d+)$")


def per_seed_key(metric: str, seed: int) -> str:
    """The MLflow key of ``metric`` on one seed: ``train_loss/seed_0``."""
    return f"{metric}/seed_{seed}"


def parse_per_seed_key(key: str) -> tuple[str, int] | None:
    """``train_loss/seed_0`` -> ``("train_loss", 0)``; ``None`` for a key that is not per seed."""
    match = _PER_SEED_KEY.match(key)
    return (match["metric"], int(match["seed"])) if match else None


def objective_key(metric: str) -> str:
    """Summary metric: the mean over seeds of the objective ``metric`` (``objective.test_accuracy``)."""
    return f"objective.{metric}"


def objective_std_key(metric: str) -> str:
    """Summary metric: the std over seeds (:func:`seed_std`) of the objective (``objective.test_accuracy.std``);
    not logged where it is undefined (one seed, a diverged seed)."""
    return f"{objective_key(metric)}.std"


def cost_key(cost: str) -> str:
    """Summary metric: the mean over seeds of the cost (``cost.grad_evals``, ``cost.wall_time``)."""
    return f"cost.{cost}"


# ------------------------------------------------------------------ directions

#: a larger value is better
MAXIMIZE = "maximize"
#: a smaller value is better
MINIMIZE = "minimize"
#: the direction of each objective and cost metric (others: :func:`direction`)
DIRECTIONS = {Metrics.VAL_ACCURACY: MAXIMIZE, Metrics.TEST_ACCURACY: MAXIMIZE, Metrics.TRAIN_LOSS: MINIMIZE,
              Metrics.VAL_LOSS: MINIMIZE, Metrics.TEST_LOSS: MINIMIZE, Metrics.TIME_TO_TARGET: MINIMIZE,
              Metrics.GRAD_EVALS: MINIMIZE, Metrics.WALL_TIME: MINIMIZE}


#: words in a metric's name that mark a larger-is-better score (a user's ``val_r2``, ``test_f1``, ...)
_SCORE_WORDS = ("accuracy", "r2", "auc", "f1", "precision", "recall", "score")


def direction(metric: str | None) -> str:
    """:data:`MAXIMIZE` for accuracies and other scores (:data:`_SCORE_WORDS`), :data:`MINIMIZE` for losses, errors,
    gaps, times and counts (and for ``None``). A study records its objective's true direction too
    (:attr:`StudyParams.OBJECTIVE_DIRECTION`)."""
    if metric in DIRECTIONS:
        return DIRECTIONS[metric]
    words = (metric or "").lower().replace(".", "_").split("_")
    return MAXIMIZE if any(word in _SCORE_WORDS for word in words) else MINIMIZE


# ------------------------------------------------------------------ phases and the switch

#: the name of every optimizer's first phase (``Metrics.PHASE_SECOND`` = 0)
FIRST_PHASE = "adam"
_SECOND_PHASE = {"fuse_pv": "lbfgs", "adam_sgd": "sgd", "adam_lbfgs": "lbfgs"}

#: a seed that never switched, in :attr:`Tags.SWITCH_EPOCH`; also :attr:`Tags.SWITCH_REASON` when none did
NEVER_SWITCHED = "none"
_NEVER = (NEVER_SWITCHED, "-", "")  # "-" is how the CLI prints it


def second_phase_name(optimizer: str | None) -> str:
    """The name of an optimizer's phase after the switch (``Metrics.PHASE_SECOND`` = 1): ``lbfgs`` for fuse_pv,
    ``sgd`` for adam_sgd, ``second`` otherwise."""
    return _SECOND_PHASE.get(optimizer or "", "second")


def encode_switch_epochs(epochs: Iterable[int | None]) -> str:
    """Epochs completed at the switch, one per seed (``None``: never switched) -> ``2,none`` (the text of
    :attr:`Tags.SWITCH_EPOCH`)."""
    return ",".join(NEVER_SWITCHED if epoch is None else str(epoch) for epoch in epochs)


def decode_switch_epochs(text: str | None) -> list[int | float | None]:
    """The inverse of :func:`encode_switch_epochs`: ``2,none`` -> ``[2, None]``; ``""`` or ``None`` -> ``[]``.
    An entry ``none``, ``-`` or empty is ``None`` (never switched); a non-integer number is read as a float."""
    if not text:
        return []
    epochs: list[int | float | None] = []
    for entry in text.split(","):
        entry = entry.strip()
        if entry in _NEVER:
            epochs.append(None)
            continue
        try:
            epochs.append(int(entry))
        except ValueError:
            epochs.append(float(entry))
    return epochs


# ------------------------------------------------------------------ statistics over seeds

#: the ddof of every "std over seeds" fuse records or reports (:func:`seed_std`)
SEED_STD_DDOF = 1


def seed_std(values: Iterable[float]) -> float:
    """The standard deviation over seeds of one quantity: the *sample* std, ``ddof = 1``,
    ``sqrt(sum((x_i - mean)^2) / (n - 1))``, in the unit of the values.

    The seeds are a sample of the seeds one could have run, and the spread is what a reader compares between
    methods, so the unbiased variance estimate is the one used: the same number in a trial's record
    (:func:`objective_std_key`, :attr:`OptunaAttrs.VALUE_STD`), the dashboards' tables and the comparison
    report, and the one a paired t statistic needs. NaN where it is undefined: fewer than two values, or any
    value not finite (a diverged seed)."""
    samples = [float(v) for v in values]
    if len(samples) < 2 or not all(math.isfinite(v) for v in samples):
        return math.nan
    mean = math.fsum(samples) / len(samples)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in samples) / (len(samples) - SEED_STD_DDOF))


# ------------------------------------------------------------------ showing a value

def short_value(value: Any) -> str:
    """A parameter value as the CLI, the tables and the plots show it: a float that is a whole number as an
    integer (``256.0`` -> ``256``; a number read back from MLflow's text params is a float), another float to
    4 significant digits (``0.00123456`` -> ``0.001235``), anything else as ``str``."""
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        number = float(value)
        if number.is_integer() and abs(number) < 1e15:
            return str(int(number))
        return f"{number:.4g}"
    return str(value)


# ------------------------------------------------------------------ artifacts

#: the artifact folder of a study's parent run that ``fuse-tune report`` logs its plots and HTML page into
REPORT_ARTIFACT_DIR = "report"


# ------------------------------------------------------------------ redaction

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<password>[^@\s]*)@")


def redact(text: str | None) -> str | None:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db`` (every URL in ``text``).

    Storage and tracking URLs are redacted before anything is printed, tagged or logged; a URL without a
    password, and ``None``, come back as they are."""
    if text is None:
        return None
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", str(text))

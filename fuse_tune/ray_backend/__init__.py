"""Ray Tune backend: a study file -> a ``ray.tune.Tuner`` over the same trial logic as the Optuna backend.

    fuse-tune run STUDY.yaml --backend ray [--address HOST:PORT] [--n-trials N] [--n-jobs J] [--mlflow-uri URI]
    fuse-tune resume STUDY.yaml --backend ray

* Search: Optuna's sampler of the study file (:func:`fuse_tune.optuna_backend.make_sampler`) inside Tune's
  ``OptunaSearch``, with :func:`fuse_tune.trial.suggest` as its define-by-run space, so both backends draw from
  the same space with the same sampler; at most ``--n-jobs`` trials run at once (default: as many as the
  cluster's CPUs/GPUs fit). Each configuration runs on every seed of the study, the seeds advancing together
  (:class:`fuse_tune.trial.SeedRuns`, as under the Optuna backend).
* Early stopping: Optuna pruners do not apply under Ray; a study with ``pruner: median | hyperband`` gets Tune's
  ASHA scheduler instead (``pruner: none`` or a cost objective: none). Each epoch reports once, the mean over
  seeds of the objective at ``step = epoch``, as the Optuna backend reports to its pruner; ASHA compares trials
  at equal steps.
* Resources: ``resources: {cpu, gpu}`` of the study file are each trial's request (fractions allowed); torch
  uses ``max(1, floor(cpu))`` threads per trial. A request no node of the cluster can meet (``gpu: 1`` with no
  GPU, more CPUs than the largest node has) is refused before anything runs, in one line (exit status 2),
  instead of leaving trials pending forever.
* Cluster: ``--address`` (or ``RAY_ADDRESS``) joins a running cluster (``ray start --head``); otherwise a local
  Ray starts with this machine's cores. Every path is made absolute on the driver (study file, ``data_dir``,
  the MLflow store, the Ray results folder ``./ray_results/<study>``) because trials run in their own working
  directories, possibly on other machines (there the paths must be shared).
* Checkpoints: after every epoch a trial reports a checkpoint with the whole
  :meth:`fuse_tune.train.Trainer.state_dict` (model, optimizer with its phase, Adam moments, L-BFGS memory and
  criterion state, generators, counters, history) of every seed, and the MLflow
  child run id, so a restored trial (or one cloned by PBT) continues exactly where it stopped.
  ``fuse-tune resume STUDY.yaml --backend ray`` (or the same ``run`` command again) restores an interrupted
  experiment with ``Tuner.restore``: finished trials stay finished, unfinished and errored ones continue from
  their last checkpoint, and the searcher continues from its saved state.
* MLflow: the study's parent run (found again by its tags) and one child run per trial with the same params,
  per-epoch metrics, summary metrics and tags as the Optuna backend (:func:`fuse_tune.trial.trial_tags`,
  :func:`fuse_tune.trial.log_outcome`), with the :class:`fuse_tune.records.Tags` ``BACKEND`` = ``ray``, plus
  ``NODE_ID``, ``HOST`` and ``RAY_TRIAL_ID``. A restored trial logs into its run again and never logs an epoch
  twice.

The package is split by where the code runs:

* :mod:`~fuse_tune.ray_backend.resources`: on the driver, before anything starts: paths made absolute, resource
  requests checked against the nodes;
* :mod:`~fuse_tune.ray_backend.worker`: inside a Ray worker: the trainable and its trial loop (checkpoints, the
  MLflow child run);
* :mod:`~fuse_tune.ray_backend.driver`: the searcher, the scheduler, the Tuner (new or restored), the callback
  that records how Tune ended a trial, and :func:`run_ray_study`.
"""

from __future__ import annotations

from fuse_tune.ray_backend.driver import CHECKPOINTS_TO_KEEP, STUDY_RECORD, RaySummary, run_ray_study, start_local_ray
from fuse_tune.ray_backend.resources import (
    DEFAULT_RAY_STORAGE,
    ResourceError,
    check_resources,
    resolve_storage_path,
    resolve_tracking_uri,
)
from fuse_tune.ray_backend.resources import absolute_spec as _absolute_spec
from fuse_tune.ray_backend.worker import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    TRIAL_KEY,
    RayContext,
    TrialLoop,
    fuse_trainable,
    load_checkpoint,
)

__all__ = ["RayContext", "ResourceError", "RaySummary", "TrialLoop", "check_resources", "fuse_trainable",
           "load_checkpoint", "run_ray_study", "start_local_ray", "resolve_storage_path", "resolve_tracking_uri",
           "DEFAULT_RAY_STORAGE", "CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "CHECKPOINTS_TO_KEEP", "STUDY_RECORD",
           "TRIAL_KEY", "_absolute_spec"]

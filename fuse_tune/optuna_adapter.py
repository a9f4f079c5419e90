"""Every use fuse makes of Optuna's private API, in one place, each with why and for which Optuna version.

Written against Optuna 5.0.0 (the installed version; ``optuna.__version__``). Optuna does not promise these
names across releases: when Optuna is upgraded, this module is the one to read again, and
``tests/fuse_tune/test_optuna_backend.py`` (reproducible samplers across workers and resumes, dead workers'
trials failed and retried) is what shows a break. Nothing else in fuse touches a name with a leading
underscore on an Optuna object.

* :func:`trial_seeded`: a sampler class whose random streams restart in every trial from (study seed, trial
  number). Optuna 5.0 has no public way to reseed a sampler per trial; the streams are the private
  ``_rng`` (a ``LazyRandomState``, whose ``.rng`` is a ``numpy.random.RandomState``) of the sampler and of
  the samplers it delegates to, ``_random_sampler`` (TPE's startup trials) and ``_independent_sampler``
  (QMC's and CMA-ES's parameters outside their joint space).
* :func:`set_trial_system_attr` and :func:`fail_trial`: Optuna 5.0's ``Trial.set_system_attr`` is gone and
  ``Study.tell`` cannot fail a trial that another (dead) process started without also asking the sampler;
  both go through the study's storage, ``study._storage``, and the trial's storage id, ``trial._trial_id``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["trial_seeded", "set_trial_system_attr", "fail_trial"]

#: sampler class -> its trial-seeded subclass (one per class, so that pickles name the same class)
_TRIAL_SEEDED: dict[type, type] = {}


def trial_seeded(cls: type) -> type:
    """``cls`` whose random streams restart in every trial from (study seed, trial number).

    A seeded sampler that keeps one stream per process replays the same configurations in every process that
    shares the study (separate ``fuse-tune run`` workers, a resumed run). Trial numbers are unique in a study,
    so seeding by them gives distinct draws across processes and resumes, and a fresh one-process run is still
    reproducible. The subclass is made at run time (one per sampler class) and pickles by its base class.
    """
    if cls in _TRIAL_SEEDED:
        return _TRIAL_SEEDED[cls]

    class TrialSeeded(cls):
        def __init__(self, *args: Any, seed: int | None = None, **kwargs: Any) -> None:
            super().__init__(*args, seed=seed, **kwargs)
            self._fuse_seed = seed

        def before_trial(self, study: Any, trial: Any) -> None:
            if self._fuse_seed is not None:
                _reseed(self, self._fuse_seed, trial.number)
            super().before_trial(study, trial)

        def __reduce__(self) -> tuple:  # picklable although the class is made at run time
            return _unpickle_trial_seeded, (cls, self.__dict__)

    TrialSeeded.__name__ = TrialSeeded.__qualname__ = cls.__name__
    _TRIAL_SEEDED[cls] = TrialSeeded
    return TrialSeeded


def _reseed(sampler: Any, seed: int, trial_number: int) -> None:
    """Optuna 5.0 private: ``sampler._rng.rng`` and those of ``_random_sampler`` / ``_independent_sampler``."""
    import numpy as np

    streams = np.random.SeedSequence([seed, trial_number]).generate_state(3)
    owners = (sampler, getattr(sampler, "_random_sampler", None), getattr(sampler, "_independent_sampler", None))
    for owner, stream in zip(owners, streams, strict=True):
        rng = getattr(owner, "_rng", None)
        if rng is not None:
            rng.rng.seed(int(stream))


def _unpickle_trial_seeded(cls: type, state: dict[str, Any]) -> Any:
    seeded = trial_seeded(cls)
    sampler = seeded.__new__(seeded)
    sampler.__dict__.update(state)
    return sampler


def set_trial_system_attr(study: Any, trial: Any, key: str, value: Any) -> None:
    """A system attribute on a running or frozen trial of ``study`` (Optuna 5.0 private: ``study._storage``,
    ``trial._trial_id``; ``Trial.set_system_attr`` was removed)."""
    study._storage.set_trial_system_attr(trial._trial_id, key, value)


def fail_trial(study: Any, trial: Any, reason_key: str, reason: str) -> None:
    """Mark another process's RUNNING trial FAIL, its reason first (a finished trial cannot be updated).

    Optuna 5.0 private: ``study._storage.set_trial_state_values``; ``Study.tell`` would also run the sampler's
    ``after_trial`` for a trial this process never sampled. Raises when another worker got there first."""
    from optuna.trial import TrialState

    set_trial_system_attr(study, trial, reason_key, reason)
    study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)

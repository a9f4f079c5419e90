"""dashboards: plots and reports from tidy tables of MLflow runs (no torch imports here).

Three layers, each usable alone (Optuna's visualization habit: compute the data, then draw it thinly):

* :mod:`dashboards.data`: MLflow runs of a study -> one tidy long table (``read_experiment`` then ``tidy``;
  one row per trial x seed x epoch x metric) and a one-row-per-trial table (``trial_table``);
* :mod:`dashboards.tables`: pure functions from the tidy table to the small table one plot draws
  (``sensitivity_table``, ``learning_curve_table``, ``switch_ecdf_table``, ...); an empty result carries its
  one-line reason in ``attrs["reason"]``;
* :mod:`dashboards.plots`: seaborn renderers returning a ``Plot`` (a figure, or ``None`` and the reason);
* :mod:`dashboards.report`: every plot as PNG + SVG, one self-contained HTML page, logged on the study's parent
  MLflow run (``fuse-tune report --experiment NAME``).

Test-function landscapes need optimizer paths, which need torch: ``fuse_tune.trajectories`` computes them as
plain lists and :func:`dashboards.plots.plot_landscape` draws those.
"""

"""dashboards: plots and reports from tidy tables of MLflow runs (no torch imports here)."""

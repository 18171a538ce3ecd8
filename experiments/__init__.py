"""Experiment scripts: one folder per study, run from the repository root."""

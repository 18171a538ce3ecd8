"""The harness every study builds on: the training loop, results, checkpoints, plots.

Studies import from here and from :mod:`experiments.problems`; this package imports
only from :mod:`experiments.problems`, never from a study (see ``docs/studies.rst``,
"Experiments: how a study is built").
"""

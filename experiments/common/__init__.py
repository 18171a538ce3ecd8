"""Machinery shared by the studies: data, training, checkpoints, results, plots."""

"""Noisy quadratic of the ViViT paper (Fig. 3): SGD, constant and bootstrap damping."""

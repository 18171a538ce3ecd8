"""Study 1: gradient, curvature and their noise during training (ViViT, Figure 2)."""

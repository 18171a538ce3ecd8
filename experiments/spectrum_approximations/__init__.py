"""Study 2: the GGN spectrum under approximations (ViViT, Figure 1a)."""

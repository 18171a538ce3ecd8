"""Study 3: the largest batch size within a memory budget (ViViT, Figure 1b/c)."""

"""Study 4: Papyan's hierarchical structure of the GGN, on a batch and on the data."""

"""Study 5: the GGN diagonal vs its spectrum (Deep Curvature suite)."""

"""Side-by-side benchmark of data-parallel curvature (issue 14)."""

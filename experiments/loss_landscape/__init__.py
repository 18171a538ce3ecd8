"""Study 6: loss landscape along the GGN's top eigenvectors vs random directions."""

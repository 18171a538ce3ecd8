"""Study 7: gradient and curvature variance over the data during training."""

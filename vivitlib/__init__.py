"""vivitlib: exact, fast access to GGN curvature and its mini-batch noise."""

__version__ = "0.1.0"

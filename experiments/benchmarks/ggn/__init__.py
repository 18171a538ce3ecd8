"""Side-by-side benchmark of vivitlib and vivit-for-pytorch (issue 7)."""

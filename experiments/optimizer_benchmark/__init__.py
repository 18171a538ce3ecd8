"""Damped Newton against tuned first- and second-order peers (issue 12)."""

"""Benchmarks comparing vivitlib with its peers."""

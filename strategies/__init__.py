"""Partitioning and caching strategies: pure functions of frozen specs (no I/O, no clock, no mlx)."""

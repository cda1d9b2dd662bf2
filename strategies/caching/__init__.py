"""Prefix-KV caching policies, one file each, named as their --cache value (DESIGN §6).

A policy only decides: which prefix blocks are hits (and in which tier), what to evict or demote, what to
promote. The backend carries the decisions out: the simulator charges load time for lower-tier hits and
skips the prefill of cached tokens; the MLX backend would move real KV. Shared types are in _base.py.
"""

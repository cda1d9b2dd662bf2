"""Partitioning strategies, one file each, named as their --strategy value.

Each module defines `plan(cluster, model, options) -> PartitionPlan` registered with @partitioner(NAME).
Shared arithmetic (memory per stage, predicted times, building and checking plans) is in _plans.py.
"""

"""SimPy model of an Apple Silicon cluster serving an LLM (DESIGN §2, §7).

`simulate()` runs a whole workload and returns records; `Engine` is the incremental engine a real-time
adapter drives (submit / advance / on_tokens). sim never prints or plots.
"""
from sim.engine import Engine, EngineConfig
from sim.run import SimResult, simulate

__all__ = ["Engine", "EngineConfig", "SimResult", "simulate"]

"""Simulation-first harness for distributed LLM inference on Apple Silicon clusters."""

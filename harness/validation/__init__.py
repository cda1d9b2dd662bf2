"""Simulator fidelity: the same workload on real MLX ranks and in the simulator, and the error between them."""

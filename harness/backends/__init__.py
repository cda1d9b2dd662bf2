"""Backends: the one `Backend` protocol (`base`) and its adapters, the SimPy cluster paced in real time
(`sim`), real MLX ranks (`mlx`) and a zero-cost one that measures the server itself (`instant`)."""

"""The HTTP faces: the embedded OpenAI-compatible server (`server`) and the load generator (`loadgen`)."""

"""Column names of the run-folder tables, shared by every backend and by reports (DESIGN §9).

requests.parquet: one row a request. Times are seconds relative to the run's start (t=0).
steps.parquet: one row per engine step and stage.
Every row says where its numbers come from: source = "measured" | "simulated".
"""
REQUEST_COLUMNS = {
    "request_id": "str",
    "source": "str",              # measured | simulated
    "scheduled_s": "float",       # when the workload wanted it sent
    "start_s": "float",           # when it was sent (dispatch delay = start_s - scheduled_s)
    "first_token_s": "float",     # first content chunk; NaN if none
    "end_s": "float",             # last content chunk (or the failure)
    "prompt_tokens": "int",
    "output_tokens": "int",       # usage.completion_tokens
    "cached_tokens": "int",
    "chunk_times_s": "list[float]",  # every content chunk's arrival time, for ITL
    "success": "bool",
    "error": "str",
}

STEP_COLUMNS = {
    "step": "int",
    "stage": "int",               # pipeline stage index in layer order
    "node": "str",
    "kind": "str",                # prefill | decode | mixed | send | recv | load
    "start_s": "float",
    "end_s": "float",
    "batch_size": "int",
    "tokens": "int",
    "kv_bytes": "int",            # KV cache in use on this node after the step
    "source": "str",
}

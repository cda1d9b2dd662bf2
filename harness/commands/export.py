"""`python -m harness export RUN_DIR ... --format csv|jsonl|vllm`: a run folder's requests for other tools."""
from __future__ import annotations

HELP = "export a run folder's per-request rows as CSV, JSON lines or a vLLM bench result file"
DESCRIPTION = """\
Export the requests of saved run folders for the tools people already have (nothing is re-run).

  csv, jsonl  one row a request: run_id, the requests.parquet columns with their raw timestamps (seconds from
              the run's t=0; chunk_times_s as a JSON list in CSV), ttft_ms, tpot_ms, e2el_ms, and
              run_created_utc (environment.json's wall-clock stamp, taken just before t=0; for simulated rows t
              is virtual time, so that sum is nominal)
  vllm        the result JSON of `vllm bench serve --save-result --save-detailed`: headline figures with vLLM's
              field names plus the per-request arrays (input_lens, output_lens, ttfts, itls, ...)

Default output: next to the run folder's requests.parquet (RUN_DIR/requests.csv, requests.jsonl, vllm.json).
With --out FILE all runs go to that one file (rows tell runs apart by run_id; vllm results one a line, as
`vllm bench serve --append-result` writes them); `--out -` writes to stdout. A run cut short without
requests.parquet is exported from its journal of finished requests, and the command says so.

examples:
  python -m harness export runs/out/<run-id>
  python -m harness export runs/out/a runs/out/b --format jsonl --out all.jsonl
  python -m harness export runs/out/<run-id> --format vllm --out - | jq .mean_ttft_ms"""

FORMATS = {"csv": "requests.csv", "jsonl": "requests.jsonl", "vllm": "vllm.json"}


def add_arguments(parser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="saved run folder(s), e.g. runs/out/<run-id>")
    parser.add_argument("--format", choices=tuple(FORMATS), default="csv", help="output format (default %(default)s)")
    parser.add_argument("--out", metavar="FILE",
                        help="one file for every run, or - for stdout (default: a file in each run folder)")


def run(args) -> int:
    import sys

    from harness.export import load_export, render, write_atomic

    # every folder is read before anything is written: a bad third folder leaves no partial export behind
    runs = [load_export(path) for path in args.run_dirs]
    for exported in runs:
        if exported.note:
            print(f"note: {exported.note}", file=sys.stderr)
    targets = [(args.out, runs)] if args.out else [(r.path / FORMATS[args.format], [r]) for r in runs]
    for target, group in targets:
        where = write_atomic(target, render(group, args.format))
        if where is not None:
            print(f"export: {where} ({sum(len(r.requests) for r in group)} requests, {args.format})")
    return 0

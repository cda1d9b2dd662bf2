"""`python -m harness serve`: the OpenAI-compatible server in front of the sim, mlx or instant backend."""
from __future__ import annotations

import argparse

HELP = "serve a backend (sim, mlx, instant) over an OpenAI-compatible HTTP API"
DESCRIPTION = """Serve a backend over an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions,
streaming or not; /health; /metrics in Prometheus text).

backends:
  sim      the simulated cluster, answering in real time: a client sees its TTFT and token cadence
           (simulated figures, paced on the wall clock); pick it with the plan options below
  mlx      real mlx-lm ranks over MLX's ring (measured); --model-path is an mlx-lm model folder, else
           the plan runs on a small local twin of --model (same layers, smaller width)
  instant  zero model cost: every token is ready at once; measures the server's own overhead

examples:
  python -m harness serve --backend sim --cluster mixed --model llama-3.1-70b --strategy hybrid_optimal
  python -m harness serve --backend mlx --model-path "$(python -m harness model build --size tiny)" --split 2,2
  python -m harness serve --backend instant --port 8001 --api-key secret"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from harness.backends import BACKEND_NAMES
    p.add_argument("--backend", choices=BACKEND_NAMES, default="sim", help="what answers requests (default %(default)s)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    g.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health")
    g.add_argument("--metrics-open", action="store_true",
                   help="with --api-key, leave /metrics open too (for a Prometheus scraper)")
    g.add_argument("--access-log", action="store_true",
                   help="log one line per request (off by default: a synchronous write per request on the event loop)")
    add_limit_arguments(g)
    add_backend_arguments(p)


def add_limit_arguments(g) -> None:
    g.add_argument("--max-tokens-limit", type=int, default=32768, help="largest max_tokens accepted (default %(default)s)")
    g.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="largest request body accepted (default %(default)s)")


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """Options of every backend; shared with `bench --target embedded`."""
    from harness.planning import add_plan_arguments
    add_plan_arguments(p, strategy_default="hybrid_optimal")
    s = p.add_argument_group("sim backend")
    s.add_argument("--speed", type=float, default=1.0,
                   help="virtual seconds per wall second (default %(default)s = real time)")
    s.add_argument("--max-waiting", type=int, default=None,
                   help="answer 429 when this many requests wait for admission (default: unbounded)")
    m = p.add_argument_group("mlx backend")
    m.add_argument("--model-path", default=None,
                   help="mlx-lm model folder (python -m harness model build); default: a twin of --model, "
                        "built here, running the --strategy plan")
    m.add_argument("--split", default=None, help="layers per rank in layer order, e.g. 12,12 (default: one rank)")
    m.add_argument("--max-running", type=int, default=16, help="largest decode batch (default %(default)s)")
    m.add_argument("--hostfile", default=None,
                   help="mlx.launch hosts.json: start the ranks on those Macs over ssh, plan nodes matched to "
                        "hosts by name (README: a real Mac cluster); default: every rank on this machine")
    i = p.add_argument_group("instant backend")
    i.add_argument("--token-interval-ms", type=float, default=0.0,
                   help="pace tokens at this interval instead of at once (default 0)")


def build_backend(args):
    """The backend the arguments describe (not loaded yet)."""
    from harness.backends import make_backend
    return make_backend(args.backend, backend_options(args))


def backend_options(args):
    """harness.backends.BackendOptions from the backend arguments; the plan is made only if the backend needs it."""
    from functools import partial
    from harness.backends import BackendOptions
    return BackendOptions(planned=partial(planned_from_args, args), speed=args.speed, max_waiting=args.max_waiting,
                          model_path=args.model_path, split=_split(args.split), max_running=args.max_running,
                          hostfile=args.hostfile,
                          token_interval_s=args.token_interval_ms / 1000)


def planned_from_args(args):
    """The plan the plan arguments describe (harness.planning), with the profile it was made with."""
    from harness.backends import Planned
    from harness.costmodel import load_profile
    from harness.planning import make_plan
    cluster, model, plan = make_plan(args)
    return Planned(cluster, model, plan, load_profile(args.profile), model_source=args.model)


def _split(text: str | None) -> tuple[int, ...] | None:
    from harness.specs import UserError
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--split {text!r}: give layer counts like 12,12") from None


def limits_from_args(args):
    from harness.serving.server import ServerLimits
    from harness.specs import UserError
    if args.max_tokens_limit < 1 or args.max_body_bytes < 1024:
        raise UserError("--max-tokens-limit must be >= 1 and --max-body-bytes >= 1024")
    return ServerLimits(max_tokens=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                        default_max_tokens=min(ServerLimits.default_max_tokens, args.max_tokens_limit))


def run(args) -> int:
    from harness.serving.server import serve_forever
    backend = build_backend(args)
    print(f"serving {backend.name} backend, model {backend.model_id!r}, on http://{args.host}:{args.port}/v1 "
          f"({backend.source} timings); Ctrl-C stops", flush=True)
    serve_forever(backend, host=args.host, port=args.port, api_key=args.api_key, limits=limits_from_args(args),
                  metrics_open=args.metrics_open, access_log=args.access_log)
    return 0

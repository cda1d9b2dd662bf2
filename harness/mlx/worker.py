"""One ring rank: loads its layers, then runs generation steps in lockstep with the other ranks.

Started by `harness.mlx.launcher` as `python -m harness.mlx.worker --model DIR --split 2,4 ...` with
MLX_RANK / MLX_HOSTFILE in the environment (ring backend) or alone (one process, no ring).

Protocol (JSON lines): the driving process writes the SAME command to every rank's stdin, in the same
order, and reads one reply per command from each rank's stdout. Because every rank applies identical
inserts/removes before identical steps, all ranks build identical batches; the pipeline's all_gather
gives every rank the full logits, so all ranks sample identical tokens (the random key advances the
same way everywhere). Nothing needs to be broadcast between ranks beyond what mlx-lm already sends.

  -> {"op": "step", "insert": [{"key": str, "prompt": [int], "max_tokens": int, "temperature": float,
                                 "seed": int | null, "reuse": [entry, tokens] | absent, "save_as": entry | absent}],
      "remove": [uid, ...], "drop": [entry, ...], "move": [[entry, "L1" | "L2" | "L3"], ...]}
  <- {"op": "step", "rank": r, "uids": {key: uid}, "tokens": [[uid, token, finish], ...],
      "t0": epoch, "t1": epoch, "net": [[kind, start, end], ...], "forwards": [[tokens, batch], ...],
      "kv_bytes": int, "active": int, "saved": [[entry, tokens], ...], "stored_bytes": int,
      "tiers": {"L1": entries, "L2": entries, "L3": entries}}
  -> {"op": "stop"}
  <- {"op": "beat", "rank": r, "rss_bytes": int}   every second, from a thread, between replies: a rank that
                                                   stops beating is stalled (SIGSTOP, a hung collective, swap)

Prefix caching: the driver's cache policy decides, the ranks keep the KV. `save_as` asks every rank to keep its
layers' part of the request's prompt KV once the prompt is prefilled (reported in `saved`); `reuse` starts a
request from a kept entry cut to `tokens` tokens, so only the rest of the prompt is prefilled (the prompt sent
is already that rest); `drop` frees an entry the policy no longer holds; `move` puts an entry where the policy's
tier says (L1: as computed; L2: 8-bit quantized in memory; L3: on this host's disk, mlx-lm's
`save_prompt_cache`), and a reuse brings it back first (dequantized, or `load_prompt_cache`: the rank pays the
load). Every rank applies the same decisions at the same step, so all ranks hold and free the same entries.

Layer order vs rank order: `--split` is given in LAYER order (first entry = first layers), as a
PartitionPlan states it. mlx-lm gives rank 0 the LAST layers, so rank r runs layer-order stage
size-1-r; the translation happens here and nowhere else.

Tensor parallelism (`--tp K`, one stage): the K ranks of the ring are the stage's K members; mlx-lm's own
`model.shard(group)` splits every layer's attention heads and MLP columns across them and all-sums the
partial outputs, so every rank ends each forward with the same full hidden state and samples the same
tokens.

Pipelined tensor-parallel stages (HARNESS_HOPS set by the launcher): the ring
backend cannot split a group, so each TP stage is its own ring (its all-sums) and the hidden state
crosses between stages over `harness.mlx.hops` (plain TCP); see that module.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from harness.mlx.hops import Hops

def rank_split(layer_counts: list[int]) -> list[int]:
    """mlx-lm's split (indexed by rank) from counts in layer order: rank 0 holds the last layers."""
    return list(reversed(layer_counts))


def stage_of_rank(rank: int, size: int) -> int:
    return size - 1 - rank


def layer_range(layer_counts: list[int], stage: int) -> tuple[int, int]:
    start = sum(layer_counts[:stage])
    return start, start + layer_counts[stage]


def pin_core() -> None:
    # Must run before mlx is imported: MLX's worker threads inherit the affinity of the thread that
    # creates them, and one rank per core avoids ranks stealing each other's cores.
    core = os.environ.get("HARNESS_CPU_CORE")
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(core)})


def _exit_with_parent() -> None:
    """Exit when the launching process goes away, even while blocked in a ring recv."""
    import threading
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class StageTimer:
    """Wraps the qwen2 inner model so each forward records how long it waited on the network.

    The forward is the same as mlx-lm's Qwen2Model.__call__ (embed, recv, local layers, send,
    all_gather, norm), with an eval after each network operation so waits can be timed apart
    from compute. Evaluating earlier does not change any value, only when it is computed.
    """

    def __init__(self, inner, hops=None):
        self.hops = hops                 # harness.mlx.hops.Hops when stages talk over TCP, else None
        self.net: list[list] = []        # [kind, start, end] per network wait
        self.forwards: list[list] = []   # [tokens, batch] per forward call
        timer = self
        base = type(inner)

        class Timed(base):
            def __call__(self, inputs, cache=None, input_embeddings=None):
                return timer.forward(self, inputs, cache, input_embeddings)

        inner.__class__ = Timed

    def forward(self, m, inputs, cache, input_embeddings):
        import mlx.core as mx
        from mlx_lm.models.base import create_attention_mask

        if self.hops is not None:
            return self.forward_hops(m, inputs, cache, input_embeddings)
        h = input_embeddings if input_embeddings is not None else m.embed_tokens(inputs)
        rank, size = m.pipeline_rank, m.pipeline_size
        if cache is None:
            cache = [None] * len(m.pipeline_layers)
        mask = create_attention_mask(h, cache[0])
        self.forwards.append([int(h.shape[0] * h.shape[1]), int(h.shape[0])])
        if rank < size - 1:
            mx.eval(h)                   # previous step's work first, so it is not counted as waiting
            h = self._timed("recv", mx.distributed.recv_like(h, rank + 1))
        for layer, c in zip(m.pipeline_layers, cache):
            h = layer(h, mask, c)
        if rank != 0:
            mx.eval(h)
            h = self._timed("send", mx.distributed.send(h, (rank - 1) % size))
            if cache[-1] is not None:
                cache[-1].keys = mx.depends(cache[-1].keys, h)
        if size > 1:
            if rank == 0:
                mx.eval(h)
            h = self._timed("gather", mx.distributed.all_gather(h))[: h.shape[0]]
        return m.norm(h)

    def forward_hops(self, m, inputs, cache, input_embeddings):
        """The same forward with the stage-to-stage transfers of `harness.mlx.hops` in place of MLX's
        pipeline send/recv/all_gather. A later stage embeds too: only for the shape and dtype it receives."""
        import mlx.core as mx
        from mlx_lm.models.base import create_attention_mask

        hops = self.hops
        h = input_embeddings if input_embeddings is not None else m.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(m.pipeline_layers)
        mask = create_attention_mask(h, cache[0])
        self.forwards.append([int(h.shape[0] * h.shape[1]), int(h.shape[0])])
        mx.eval(h)
        if hops.stage > 0:
            h = self._waited("recv", lambda: hops.recv(hops.leader(hops.stage - 1), h))
        for layer, c in zip(m.pipeline_layers, cache):
            h = layer(h, mask, c)
        mx.eval(h)
        if hops.targets():
            self._waited("send", lambda: hops.send(h))
        if hops.stage < hops.last:
            h = self._waited("gather", lambda: hops.recv(hops.leader(hops.last), h))
        return m.norm(h)

    def _waited(self, kind, fn):
        t = time.time()
        out = fn()
        self.net.append([kind, t, time.time()])
        return out

    def _timed(self, kind, arr):
        import mlx.core as mx
        t = time.time()
        mx.eval(arr)
        self.net.append([kind, t, time.time()])
        return arr

    def take(self):
        net, fw = self.net, self.forwards
        self.net, self.forwards = [], []
        return net, fw


class _Position:
    """pipeline()'s view of a group: this stage's mlx-lm rank among the stages (rank 0 = last stage)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def _shard_local_layers(model, group) -> None:
    """mlx-lm's shard() over this stage's layers only (the others are None after pipeline())."""
    inner = model.model
    full = inner.layers
    inner.layers = inner.pipeline_layers
    try:
        model.shard(group)
    finally:
        inner.layers = full


def load(model_path: str, layer_counts: list[int] | None, group, tp: int = 1, hops=None):
    """Load only this rank's part: lazy load, cut with pipeline() and/or shard(), then materialise."""
    from pathlib import Path
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    model, config = load_model(Path(model_path), lazy=True, strict=False)
    if hops is not None:
        if not (hasattr(model.model, "pipeline") and hasattr(model, "shard")):
            raise SystemExit(f"model_type {config.get('model_type')!r} lacks pipeline() or shard() in this mlx-lm")
        model.model.pipeline(_Position(hops.last - hops.stage, hops.last + 1), split=rank_split(layer_counts))
        if group.size() > 1:
            _shard_local_layers(model, group)
    elif tp > 1:
        if not hasattr(model, "shard"):
            raise SystemExit(f"model_type {config.get('model_type')!r} has no shard() in this mlx-lm")
        model.shard(group)
    elif group.size() > 1:
        if not hasattr(model.model, "pipeline"):
            raise SystemExit(f"model_type {config.get('model_type')!r} has no pipeline() in this mlx-lm")
        model.model.pipeline(group, split=rank_split(layer_counts))
    mx.eval(model.parameters())
    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if group.size() > 1:
        # barrier: every rank has its weights before anyone reports ready
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return model, config, nbytes


def seeded_sampler(temperature: float, seed: int):
    """Temperature sampling from a key derived from (seed, position): the same request gives the same
    tokens whatever else shares its batch. Every rank draws the same key, so ranks stay identical."""
    import mlx.core as mx
    position = [0]

    def sample(logprobs):
        key = mx.random.key((seed * 1_000_003 + position[0]) % (1 << 63))
        position[0] += 1
        return mx.random.categorical(logprobs * (1.0 / temperature), key=key)

    return sample


class Engine:
    """mlx-lm's BatchGenerator (continuous batching), driven one `next()` per command."""

    def __init__(self, model, prefill_step_size: int, completion_batch_size: int):
        from mlx_lm.generate import BatchGenerator
        self.gen = BatchGenerator(model, max_tokens=1 << 30, prefill_step_size=prefill_step_size,
                                  completion_batch_size=completion_batch_size,
                                  prefill_batch_size=min(8, completion_batch_size))
        self.samplers: dict[float, object] = {}
        self.live: set[int] = set()
        self.stored: dict[str, list] = {}      # entry -> this rank's per-layer KV caches of a prompt prefix
        self.kept = KeptTiers()                # where each entry's KV is: memory, quantized memory or disk
        self.save_as: dict[int, str] = {}      # uid -> entry to keep once its prompt is prefilled

    def sampler(self, temperature: float, seed: int | None = None):
        # one sampler object per temperature, so a batch sharing it samples in one call
        from mlx_lm.sample_utils import make_sampler
        if temperature > 0 and seed is not None:
            return seeded_sampler(temperature, seed)
        if temperature not in self.samplers:
            self.samplers[temperature] = make_sampler(temp=temperature)
        return self.samplers[temperature]

    def apply(self, cmd: dict) -> dict[str, int]:
        remove = [u for u in cmd.get("remove", []) if u in self.live]
        if remove:
            self.gen.remove(remove)
            self.live.difference_update(remove)
        for entry in cmd.get("drop", []):
            self.stored.pop(entry, None)
            self.kept.forget(entry)
        for entry, tier in cmd.get("move", []):
            if entry in self.stored:
                self.stored[entry] = self.kept.move(entry, self.stored[entry], tier)
        uids = {}
        inserts = cmd.get("insert", [])
        if inserts:
            new = self.gen.insert([r["prompt"] for r in inserts], max_tokens=[r["max_tokens"] for r in inserts],
                                  caches=[self.reused(r.get("reuse")) for r in inserts],
                                  samplers=[self.sampler(float(r.get("temperature", 0.0)), r.get("seed"))
                                            for r in inserts])
            uids = {r["key"]: u for r, u in zip(inserts, new)}
            self.live.update(new)
            self.save_as.update({u: r["save_as"] for r, u in zip(inserts, new) if r.get("save_as")})
        return uids

    def reused(self, reuse):
        """A fresh cache holding the first `tokens` tokens of a kept entry (None: start empty). A copy: the
        request's own tokens must not grow the kept entry."""
        if not reuse:
            return None
        entry, tokens = reuse
        out = []
        for c in self.kept.materialize(entry, self.stored[entry]):
            fresh = type(c)()
            if getattr(c, "keys", None) is not None:    # a pipeline rank's cache list has unused, empty entries
                fresh.keys, fresh.values = c.keys[..., :tokens, :], c.values[..., :tokens, :]
                fresh.offset = tokens
            out.append(fresh)
        return out

    def keep_prefilled(self, prompt_responses) -> list[list]:
        """Keep the KV of every prompt that finished prefilling and was asked to be kept."""
        done = [r.uid for r in prompt_responses if r.end_of_prompt and r.uid in self.save_as]
        saved = []
        for uid, (cache, _) in self.gen.extract_cache(done).items():
            entry = self.save_as.pop(uid)
            self.stored[entry] = cache
            saved.append([entry, int(cache[0].offset) if cache else 0])
        return saved

    def stored_bytes(self) -> int:
        """KV bytes kept in this rank's memory (L1 and L2; L3 is on disk)."""
        return sum(self.kept.nbytes(caches) for caches in self.stored.values())

    def step(self) -> tuple[list[list], list[list]]:
        """One BatchGenerator iteration: (tokens [[uid, token, finish]], saved [[entry, tokens]])."""
        if not self.live:
            return [], []
        prompts, responses = self.gen.next()
        saved = self.keep_prefilled(prompts)
        out = []
        for r in responses:
            out.append([r.uid, int(r.token), r.finish_reason])
            if r.finish_reason is not None:
                self.live.discard(r.uid)
                self.save_as.pop(r.uid, None)
        return out, saved


class KeptTiers:
    """A kept entry's KV in the tier the driver's policy puts it: L1 the per-layer caches as computed, L2 each
    layer's keys and values 8-bit quantized in memory, L3 a safetensors file on this host's disk, L4 one in the
    folder HARNESS_L4_DIR names (a mount standing for network storage), else a temporary folder of its own."""
    GROUP = 64      # quantization group over the flattened tensor: twins' head_dim (8, 16) is below mlx's minimum

    def __init__(self):
        self.tier: dict[str, str] = {}
        self._dirs: dict[str, str] = {}

    def move(self, entry: str, kept, tier: str):
        caches = self.materialize(entry, kept)
        self.forget(entry)
        if tier == "L2":
            kept = [_quantized(c, self.GROUP) for c in caches]
        elif tier in ("L3", "L4"):
            kept = self._spill(entry, caches, tier)
        else:
            kept, tier = caches, "L1"
        self.tier[entry] = tier
        return kept

    def materialize(self, entry: str, kept) -> list:
        """The entry as per-layer KV caches, whatever tier holds it."""
        tier = self.tier.get(entry, "L1")
        if tier == "L2":
            return [_dequantized(c) for c in kept]
        if tier in ("L3", "L4"):
            return _unspill(kept)
        return kept

    def forget(self, entry: str) -> None:
        tier = self.tier.pop(entry, "L1")
        if tier in ("L3", "L4"):
            path = os.path.join(self.dir(tier), f"{entry}.safetensors")
            if os.path.exists(path):
                os.remove(path)

    def counts(self) -> dict[str, int]:
        out = {"L1": 0, "L2": 0, "L3": 0}
        for tier in self.tier.values():
            out[tier] = out.get(tier, 0) + 1
        return out

    def nbytes(self, kept) -> int:
        if isinstance(kept, str):
            return 0
        return sum(sum(a.nbytes for a in c["parts"]) if isinstance(c, dict) else getattr(c, "nbytes", 0) for c in kept)

    def dir(self, tier: str) -> str:
        """This rank's own folder for a spilled tier, made on first use and removed with the rank."""
        if tier not in self._dirs:
            import atexit
            import shutil
            import tempfile
            base = os.environ.get("HARNESS_L4_DIR") if tier == "L4" else None
            if base and not os.path.isdir(base):
                raise SystemExit(f"HARNESS_L4_DIR={base}: not a folder on this host (mount the shared storage "
                                 "there, or unset it for a temporary folder)")
            # one folder per rank even in a shared mount: ranks of a pipeline keep different layers
            self._dirs[tier] = tempfile.mkdtemp(prefix=f"harness-{tier.lower()}-", dir=base or None)
            atexit.register(shutil.rmtree, self._dirs[tier], True)
        return self._dirs[tier]

    def _spill(self, entry: str, caches: list, tier: str) -> str:
        from mlx_lm.models.cache import save_prompt_cache
        used = [i for i, c in enumerate(caches) if getattr(c, "keys", None) is not None]
        path = os.path.join(self.dir(tier), f"{entry}.safetensors")
        # a pipeline rank's list has empty caches for the layers it does not run: only the used ones are saved
        save_prompt_cache(path, [caches[i] for i in used], {"layers": ",".join(map(str, used)),
                                                             "count": str(len(caches))})
        return path


def _unspill(path: str) -> list:
    from mlx_lm.models.cache import KVCache, load_prompt_cache
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    out = [KVCache() for _ in range(int(meta["count"]))]
    for i, c in zip((int(x) for x in meta["layers"].split(",") if x), loaded):
        out[i] = c
    return out


def _quantized(c, group: int):
    if getattr(c, "keys", None) is None:
        return c
    import mlx.core as mx
    off = c.offset
    parts, shapes = [], []
    for a in (c.keys[..., :off, :], c.values[..., :off, :]):
        flat = a.reshape(-1)
        pad = -flat.size % group
        if pad:
            flat = mx.concatenate([flat, mx.zeros((pad,), dtype=flat.dtype)])
        parts += list(mx.quantize(flat.reshape(-1, group), group_size=group, bits=8))
        shapes.append((a.shape, a.dtype))
    mx.eval(parts)
    return {"parts": parts, "shapes": shapes, "offset": off, "group": group}


def _dequantized(q):
    if not isinstance(q, dict):
        return q
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache
    c = KVCache()
    arrays = []
    for i, (shape, dtype) in enumerate(q["shapes"]):
        w, scales, biases = q["parts"][3 * i: 3 * i + 3]
        flat = mx.dequantize(w, scales, biases, group_size=q["group"], bits=8).reshape(-1)
        size = 1
        for d in shape:
            size *= d
        arrays.append(flat[:size].reshape(shape).astype(dtype))
    c.keys, c.values = arrays
    c.offset = q["offset"]
    return c


class Replies:
    """The rank's stdout: command replies and heartbeats, one whole JSON line at a time."""

    def __init__(self, out):
        import threading
        self.out, self.lock = out, threading.Lock()

    def write(self, msg: dict) -> None:
        line = json.dumps(msg) + "\n"
        with self.lock:
            self.out.write(line)
            self.out.flush()

    def start_heartbeat(self, rank: int, every_s: float = 1.0) -> None:
        import threading

        def beat():
            while True:
                time.sleep(every_s)
                self.write({"op": "beat", "rank": rank, "rss_bytes": rss_bytes()})
        threading.Thread(target=beat, name="heartbeat", daemon=True).start()


def rss_bytes() -> int:
    """This process's resident memory now (Linux), else its peak."""
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)   # bytes on macOS


def serve(engine: Engine, timer: StageTimer | None, rank: int, inp, out: Replies) -> None:
    for line in inp:
        cmd = json.loads(line)
        if cmd["op"] == "stop":
            return
        if cmd["op"] != "step":
            raise SystemExit(f"rank {rank}: unknown command {cmd['op']!r}")
        t0 = time.time()
        uids = engine.apply(cmd)
        tokens, saved = engine.step()
        t1 = time.time()
        net, fw = timer.take() if timer else ([], [])
        out.write({"op": "step", "rank": rank, "uids": uids, "tokens": tokens, "t0": t0, "t1": t1,
                   "net": net, "forwards": fw, "kv_bytes": engine.gen.prompt_cache_nbytes,
                   "active": len(engine.live), "saved": saved, "stored_bytes": engine.stored_bytes(),
                   "tiers": engine.kept.counts()})


def distributed_group(mx):
    """The ring (MLX_HOSTFILE), JACCL (HARNESS_MLX_BACKEND, from a hostfile's backend) or a group of one."""
    backend = os.environ.get("HARNESS_MLX_BACKEND") or ("ring" if "MLX_HOSTFILE" in os.environ else None)
    if backend is None:
        return mx.distributed.init()
    name = "jaccl" if backend.startswith("jaccl") else backend    # jaccl-ring: JACCL with MLX_JACCL_RING=1
    if not mx.distributed.is_available(backend=name):
        needs = ("JACCL needs macOS 26.2 or later with RDMA over Thunderbolt 5 enabled; use backend \"ring\" "
                 "otherwise" if name == "jaccl" else "reinstall mlx with its distributed backends")
        raise SystemExit(f"MLX's {name} backend is not available on this host (mlx {mx.__version__}): {needs}")
    return mx.distributed.init(backend=name, strict=True)


def main(argv: list[str] | None = None) -> int:
    pin_core()
    _exit_with_parent()
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1)   # `kill -USR1 PID` writes every thread's stack to the rank log
    p = argparse.ArgumentParser(prog="python -m harness.mlx.worker")
    p.add_argument("--model", required=True)
    p.add_argument("--split", default="", help="layer counts in layer order, comma separated")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: the ranks are one stage's members")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefill-step-size", type=int, default=512)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--no-stage-timing", action="store_true")
    args = p.parse_args(argv)
    # replies own the real stdout; anything else that prints (libraries) goes to stderr
    out = Replies(os.fdopen(os.dup(sys.stdout.fileno()), "w"))
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    import mlx.core as mx
    t_start = time.time()
    hops = Hops.from_env()
    if hops is not None:
        hops.listen()                # before loading: peers may connect while this rank loads
    group = distributed_group(mx)
    rank, size = (hops.rank, hops.size) if hops else (group.rank(), group.size())
    counts = [int(x) for x in args.split.split(",") if x] or None
    if args.tp > 1 and (args.tp != size or len(counts or [0]) != 1):
        raise SystemExit(f"--tp {args.tp} needs one stage and {args.tp} ranks (got split {counts}, {size} ranks)")
    model, config, nbytes = load(args.model, counts, group, args.tp, hops)
    if hops is not None:
        hops.connect()
    mx.random.seed(args.seed)        # same seed on every rank: identical sampling everywhere
    # the hop forward is how stages talk, so it is installed even without stage timing
    timer = None if args.no_stage_timing and hops is None else StageTimer(model.model, hops)
    engine = Engine(model, args.prefill_step_size, args.max_batch)
    if hops is not None:
        stage, member = hops.stage, hops.member
    else:
        stage = 0 if args.tp > 1 else stage_of_rank(rank, size)
        member = rank if args.tp > 1 else 0
    layers = layer_range(counts, stage) if counts else (0, config["num_hidden_layers"])
    out.write({"op": "ready", "rank": rank, "size": size, "stage": stage, "member": member,
                          "layers": layers,
                          "load_s": time.time() - t_start, "param_bytes": nbytes, "pid": os.getpid()})
    out.start_heartbeat(rank)
    serve(engine, timer, rank, sys.stdin, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

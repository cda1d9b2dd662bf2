"""Run folders (DESIGN §9): `runs/out/<run-id>/` with config.json, environment.json, plan.json,
requests.parquet, steps.parquet and summary.json.

Atomicity: every file is written to a temporary name in the same folder and moved into place with
`os.replace`, so a file is either absent or complete. A folder is created with an `INCOMPLETE` marker that
is removed only after summary.json (status "complete") is in place; a run that dies or is interrupted keeps
the marker (with the reason, when known), and `read_run` reports it as incomplete.

Nothing finished is lost: each request row is appended to `requests.journal.jsonl` (one JSON line, flushed)
as it completes; writing requests.parquet compacts the journal away. A run stopped by Ctrl-C, SIGTERM or an
exception still writes requests.parquet from the journal and a summary.json whose status says why it stopped
(`RunWriter.stop`), and keeps the marker, so readers never take it for a complete run.

A writer killed outright (SIGKILL, power loss) cannot say so: its marker still reads "running". The marker's
second line names the writer (pid, host, process start time), so `read_run`, the one reader every command
opens a folder with, notices a writer that is gone, marks the folder interrupted and removes its temporary
files; the journal keeps the requests that finished.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from harness.metrics import REQUEST_COLUMNS, STEP_COLUMNS, arrow_schema
from harness.specs import UserError

# A summary body carries its own schema_version (harness/summary.py builds version 2); a bare dict written
# without one is taken as version 1, which readers migrate.
UNVERSIONED_SCHEMA = 1
MARKER = "INCOMPLETE"
FILES = ("config.json", "environment.json", "plan.json", "requests.parquet", "steps.parquet", "summary.json")
JOURNAL = "requests.journal.jsonl"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so every interrupt path handles both."""


def stop_reason(exc: BaseException | None) -> tuple[str, str]:
    """(status, reason) of a run stopped by `exc`: interrupted (Ctrl-C, SIGTERM) or failed (an exception)."""
    if isinstance(exc, Terminated):
        return "interrupted", "terminated (SIGTERM)"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", "interrupted (Ctrl-C)"
    if exc is None:
        return "failed", "failed: not finished"
    return "failed", f"failed: {type(exc).__name__}: {exc}"


def new_run_id(label: str = "run") -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in label)[:40]
    return f"{stamp}-{safe}-{secrets.token_hex(2)}"


def _json_default(obj):
    if hasattr(obj, "tolist"):      # numpy arrays and scalars (an array's .item() fails for size > 1)
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json_atomic(path: str | Path, obj) -> Path:
    """A JSON file written through a temporary name (NaN/inf as null), so a half-written file never appears."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(_clean(obj), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _clean(obj):
    """NaN/inf are not JSON; store them as null so other tools can read the file."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


class RunWriter:
    """Writes one run folder. Use as a context manager; call `finish(summary)` last."""

    def __init__(self, out_root: str | Path, label: str = "run", run_id: str | None = None):
        self.run_id = run_id or new_run_id(label)
        self.path = Path(out_root) / self.run_id
        try:
            self.path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise UserError(f"run folder {self.path} already exists") from None
        except OSError as exc:
            raise UserError(f"cannot create run folder {self.path}: {exc}") from None
        self._write_bytes(MARKER, f"running\n{json.dumps(writer_identity())}\n".encode())
        self.finished = False
        self.stopped: tuple[str, str] | None = None   # (status, reason) once the run was cut short
        self.journal = RequestJournal(self.path / JOURNAL)

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if self.stopped is None and not self.finished:
                self.stop(*stop_reason(exc))
            self.journal.close()
        finally:   # a signal in the middle of a write leaves its temporary file; none may outlive the writer
            remove_temporary_files(self.path, os.getpid())
        return False

    def stop(self, status: str, reason: str) -> None:
        """The run was cut short: the marker says why, and a later `finish` records `status` instead of
        complete, so the folder keeps what finished without claiming to be whole."""
        self.stopped = (status, reason)
        self._write_bytes(MARKER, (reason + "\n").encode())

    def _tmp(self, name: str) -> Path:
        return self.path / f".{name}.tmp-{os.getpid()}"

    def _write_bytes(self, name: str, data: bytes) -> Path:
        tmp, final = self._tmp(name), self.path / name
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        return final

    def write_json(self, name: str, obj) -> Path:
        text = json.dumps(_clean(obj), indent=2, sort_keys=False, default=_json_default)
        return self._write_bytes(name, (text + "\n").encode())

    def write_table(self, name: str, table, columns: dict) -> Path:
        """Write a pyarrow Table (or pandas DataFrame) with exactly the record columns, atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq
        schema = arrow_schema(columns)
        if not isinstance(table, pa.Table):
            table = pa.Table.from_pandas(table, preserve_index=False)
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise ValueError(f"{name}: missing columns {missing}")
        table = table.select(list(columns)).cast(schema)
        tmp = self._tmp(name)
        pq.write_table(table, tmp)
        os.replace(tmp, self.path / name)
        return self.path / name

    def table_stream(self, name: str, columns: dict) -> "TableStream":
        """A parquet file written in pieces (for records too large to hold in memory); it appears under its
        name only when closed after the last piece."""
        return TableStream(self._tmp(name), self.path / name, arrow_schema(columns))

    def write_requests(self, table) -> Path:
        """requests.parquet; it holds every journaled row, so the journal goes once it is in place."""
        path = self.write_table("requests.parquet", table, REQUEST_COLUMNS)
        self.journal.remove()
        return path

    def write_steps(self, table) -> Path:
        return self.write_table("steps.parquet", table, STEP_COLUMNS)

    def finish(self, summary: dict) -> Path:
        """Write summary.json and, for a complete run, drop the INCOMPLETE marker: the run now counts. After
        `stop` the summary says "interrupted"/"failed" with the reason, and the marker stays."""
        status, reason = self.stopped or ("complete", None)
        body = {"schema_version": UNVERSIONED_SCHEMA, "status": status, "run_id": self.run_id, **summary}
        if reason is not None:
            body["stop_reason"] = reason
        self.write_json("summary.json", body)
        if self.stopped is None:
            (self.path / MARKER).unlink(missing_ok=True)
        self.finished = True
        return self.path


def parquet_writer(path, schema):
    """A parquet writer for record tables: dictionary encoding only on the string columns (node, kind, source
    repeat a few values), as tried on every column it is abandoned on the float and id ones after costing half
    the time of writing step records."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    return pq.ParquetWriter(path, schema, use_dictionary=[f.name for f in schema if pa.types.is_string(f.type)])


class TableStream:
    """Appends pyarrow tables (or DataFrames) with the record columns to one parquet file, atomically."""

    def __init__(self, tmp: Path, final: Path, schema):
        self.tmp, self.final, self.schema = tmp, final, schema
        self._writer = parquet_writer(tmp, schema)

    def write(self, table) -> None:
        import pyarrow as pa
        if not isinstance(table, pa.Table):
            table = pa.Table.from_pandas(table, preserve_index=False)
        self._writer.write_table(table.select(self.schema.names).cast(self.schema))

    def close(self) -> Path:
        self._writer.close()
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        self._writer.close()
        self.tmp.unlink(missing_ok=True)


class RequestJournal:
    """Finished request rows, one JSON line each, appended and flushed as they complete, so a process that
    dies mid-run (even SIGKILL) leaves every finished request on disk. Opened on the first row."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None

    def append(self, row: dict) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps(_clean(row), default=_json_default) + "\n")
        self._fh.flush()   # in the OS now: survives the process, which is what an interrupt threatens

    def rows(self) -> list[dict]:
        """The journaled rows; a last line cut off mid-write (the process died there) is skipped."""
        if not self.path.exists():
            return []
        return [row for line in self.path.read_text(encoding="utf-8").splitlines() if (row := _row_or_none(line))]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _row_or_none(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return {k: (math.nan if v is None and k.endswith("_s") else v) for k, v in row.items()}


def environment(extra: dict | None = None) -> dict:
    """Versions, machine and commit: what a reader needs to judge whether two runs are comparable."""
    from importlib import metadata
    pkgs = {}
    for name in ("numpy", "pandas", "pyarrow", "simpy", "mlx", "mlx-lm"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
           "processor": platform.processor(), "cpu_count": os.cpu_count(), "packages": pkgs, **_git()}
    env["created_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return env | (extra or {})


def _git() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit or None, "git_dirty": dirty if commit else None}


def remove_temporary_files(folder: Path, pid: int) -> None:
    """The `.<name>.tmp-<pid>` files that process `pid` left in `folder` (its writes are atomic, so none holds
    anything a reader needs)."""
    for tmp in folder.glob(f".*.tmp-{pid}"):
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ writer liveness

def writer_identity() -> dict:
    """What tells this process from any other, later or elsewhere: pid, host and the process's start time
    (a pid alone is reused)."""
    pid = os.getpid()
    return {"pid": pid, "host": platform.node(), "started": process_start(pid)}


def process_start(pid: int) -> str | None:
    """An opaque stamp of when process `pid` started, or None when no such (live) process exists here."""
    if Path("/proc/self/stat").exists():   # Linux: field 22 of /proc/PID/stat, clock ticks since boot
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return None if fields[0] in ("Z", "X") else fields[19]   # a zombie has already exited
    try:                                   # macOS and other systems without /proc
        out = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"                   # cannot look: never take a live writer for a dead one
    return out.stdout.strip() or None


def writer_gone(identity: dict) -> bool:
    """True only when the writer surely no longer runs: same host, and its pid is free or now another
    process. A writer on another host (a shared disk) cannot be checked from here."""
    if identity.get("host") != platform.node() or not isinstance(identity.get("pid"), int):
        return False
    now, then = process_start(identity["pid"]), identity.get("started")
    if now is None:
        return True
    known = "unknown" not in (now, then) and then is not None   # else only a free pid proves it gone
    return known and now != then


def _marker_status(folder: Path) -> str:
    """The marker's first line; a "running" folder whose writer is gone is marked interrupted on the way."""
    lines = (folder / MARKER).read_text(encoding="utf-8", errors="replace").splitlines() or [""]
    status = lines[0].strip()
    if status != "running" or len(lines) < 2:
        return status
    try:
        identity = json.loads(lines[1])
    except ValueError:
        return status
    if not isinstance(identity, dict) or not writer_gone(identity):
        return status
    return mark_abandoned(folder, identity)


def mark_abandoned(folder: Path, identity: dict) -> str:
    """A folder whose writer died without a word: the marker says interrupted, its temporary files go, and the
    journal (the requests that finished) stays. Returns the new status; a folder that cannot be written to
    (read-only disk) is only reported."""
    status = f"interrupted (writer pid {identity['pid']} on {identity['host']} is gone: killed before it finished)"
    try:
        remove_temporary_files(folder, identity["pid"])
        tmp = folder / f".{MARKER}.tmp-{os.getpid()}"
        tmp.write_text(status + "\n")
        os.replace(tmp, folder / MARKER)
    except OSError as exc:
        return f"{status}; could not mark the folder: {exc.strerror or exc}"
    return status


# ------------------------------------------------------------------------------------------ reading

@dataclass(frozen=True)
class RunFolder:
    path: Path
    complete: bool
    status: str            # "complete" or the INCOMPLETE marker's reason

    def json(self, name: str) -> dict:
        p = self.path / name
        if not p.exists():
            raise UserError(f"{p} is missing")
        return json.loads(p.read_text())

    @property
    def config(self) -> dict:
        return self.json("config.json")

    @property
    def summary(self) -> dict:
        return self.json("summary.json")

    @property
    def plan(self) -> dict:
        return self.json("plan.json")

    @property
    def environment(self) -> dict:
        return self.json("environment.json")

    def requests(self):
        return self._table("requests.parquet")

    def steps(self):
        return self._table("steps.parquet")

    def _table(self, name: str):
        import pandas as pd
        p = self.path / name
        if not p.exists():
            raise UserError(f"{p} is missing")
        return pd.read_parquet(p)


def read_run(path: str | Path, require_complete: bool = True) -> RunFolder:
    """Open a run folder; an incomplete one raises UserError unless require_complete is False. A folder left
    "running" by a writer that is gone is marked interrupted here (`_marker_status`)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run folder {path} does not exist")
    marker = path / MARKER
    summary = path / "summary.json"
    if marker.exists() or not summary.exists():
        reason = _marker_status(path) if marker.exists() else "no summary.json"
        if require_complete:
            raise UserError(f"run {path} is incomplete ({reason})")
        return RunFolder(path, False, reason)
    return RunFolder(path, True, "complete")

"""Read what an offline W&B run wrote (`<dir>/wandb/offline-run-*/run-*.wandb`), for tests.

The run file is a LevelDB-style log (32 KiB blocks, 7-byte chunk headers) of `wandb` protobuf
`Record`s after a 7-byte W&B header; wandb >= 0.2x no longer ships a Python reader for it.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32768
HEADER = 7  # ":W&B" + magic (2 bytes) + version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """The parts of one offline run the tests look at."""

    folder: Path
    name: str = ""
    group: str = ""
    job_type: str = ""
    config: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    artifacts: list[dict] = field(default_factory=list)  # {"name", "type", "files", "aliases"}
    used: list[str] = field(default_factory=list)  # artifacts the run declared it used
    made: list[str] = field(default_factory=list)  # artifacts the run logged as its outputs


def _chunks(raw: bytes):
    pos, buf = HEADER, b""
    while pos + 7 <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if len(data) < length:  # the service is still writing it
            return
        if kind == FULL:
            yield data
        elif kind == FIRST:
            buf = data
        elif kind == MIDDLE:
            buf += data
        elif kind == LAST:
            yield buf + data


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _records(folder: Path, timeout: float) -> list:
    """The records of the run file, once W&B has written all of them (its last is `exit`).

    `run.finish()` returns when the W&B service has the run's last record, not when it has
    written it: on a busy machine the file can still be empty or partly written then (this
    read back empty names, groups and job types). Waiting for the `exit` record makes the
    read independent of how fast the service writes; `timeout` only bounds a run that never
    finished (then the records there are, for the test's assertion to show). A record the
    service is still writing does not parse: the records before it are read, and the file
    again until it ends with `exit` (a busy CI machine read one half-written)."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        records = []
        for path in folder.glob("run-*.wandb"):
            for data in _chunks(path.read_bytes()):
                rec = pb.Record()
                try:
                    rec.ParseFromString(data)
                except DecodeError:  # being written: read again
                    break
                records.append(rec)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def read_offline_run(folder: str | Path, timeout: float = 120.0) -> OfflineRun:
    """Parse one `offline-run-*` folder (a run that finished: see `_records`)."""
    folder = Path(folder)
    run = OfflineRun(folder)
    for rec in _records(folder, timeout):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            # a run record is an update: a later one (how many, and when, depends on how fast
            # the W&B service writes) may leave the fields it does not change empty
            run.name = rec.run.display_name or run.name
            run.group = rec.run.run_group or run.group
            run.job_type = rec.run.job_type or run.job_type
            run.config.update({_key(u): json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            run.config.update({_key(u): json.loads(u.value_json) for u in rec.config.update})
        elif kind == "summary":
            run.summary.update({_key(u): json.loads(u.value_json) for u in rec.summary.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "files":
            run.files += [f.path for f in rec.files.files]
        elif kind == "artifact":
            a = rec.artifact
            entries = [m.path for m in a.manifest.contents]
            refs = [m.path for m in a.manifest.contents if m.ref]
            run.artifacts.append(
                {
                    "name": a.name,
                    "type": a.type,
                    "files": entries,
                    "references": refs,
                    "aliases": list(a.aliases),
                    "digest": a.digest,
                    "metadata": json.loads(a.metadata or "{}"),
                    "use_after_commit": a.use_after_commit,
                }
            )
            # an input logged offline (what `use_artifact` does with a new artifact online)
            (run.used if a.use_after_commit else run.made).append(a.name)
        elif kind == "use_artifact":
            run.used.append(rec.use_artifact.name or rec.use_artifact.id)
    return run


def offline_runs(root: str | Path) -> list[OfflineRun]:
    """Every offline run under `root` (any depth), oldest first."""
    return [read_offline_run(p) for p in sorted(Path(root).rglob("offline-run-*")) if p.is_dir()]

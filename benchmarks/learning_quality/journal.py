"""The journal of a learning-quality run (``--journal PATH``): a long suite run in pieces.

The journal is a JSON Lines file. Each finished run appends one line, ``{"key": KEY, "record":
RECORD}``, flushed and ``os.fsync``-ed at once, so an interrupted run keeps every run it finished.
``RECORD`` is what :func:`~benchmarks.learning_quality.run.run_job` returned; ``KEY``
(:func:`job_key`) is what the run depends on: task, seed, steps, optimizer kind, lr, weight decay,
and for the learned kinds the roles, the backend and the artifact (the SHA-256 of its
``manifest.json``, which lists the SHA-256 of every file of the artifact), plus the torch and
Python versions (the language-model texts come from the Python installation).

A later run with the same journal reuses the record of every planned job whose key equals a line's
key (:func:`read`) and runs only the others. Lines that do not parse (a line cut short by a killed
run) or whose key matches no planned job are ignored and counted. Numbers are written as Python's
``json`` writes them (``NaN`` and ``Infinity`` included), so a reused record equals the one that
was written. The journal does not know the benchmark's code: start a new one after changing it.
One run at a time may append to a journal.
"""

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import IO, Any, Dict, Iterable, Mapping, Optional, Tuple

import torch

from benchmarks.learning_quality import optimizers

#: The kinds that run an artifact (their roles, backend and artifact are part of the key).
ARTIFACT_KINDS = ("learned", "old")
#: The fields of a key that its record repeats (checked on reading).
_REPEATED = ("task", "seed", "steps", "optimizer", "lr", "weight_decay")


def artifact_identity(path: str) -> str:
    """``sha256:`` and the SHA-256 of the artifact folder's ``manifest.json``."""
    digest = hashlib.sha256((Path(path) / "manifest.json").read_bytes()).hexdigest()
    return f"sha256:{digest}"


def job_key(job: Mapping[str, Any], artifacts: Mapping[str, str]) -> Dict[str, Any]:
    """The key of ``job`` (a job of :func:`~benchmarks.learning_quality.runner.make_jobs`);
    ``artifacts``: kind -> :func:`artifact_identity` of each learned kind's artifact. AdamW and
    SGD run no artifact and ignore the roles: their roles, backend and artifact are ``None``."""
    kind = job["optimizer"]
    learned = kind in ARTIFACT_KINDS
    key = {
        "task": job["task"],
        "seed": job["seed"],
        "steps": job["steps"],
        "optimizer": kind,
        "lr": job["lr"],
        "weight_decay": job.get("weight_decay", 0.0),
        "roles": job.get("roles", optimizers.DEFAULT_ROLES) if learned else None,
        "backend": job["backends"][kind] if learned else None,
        "artifact": artifacts[kind] if learned else None,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }
    scale = job.get("matrix_scale", "none")
    if learned and scale != "none":  # absent otherwise: the keys of earlier journals still match
        key["matrix_scale"] = scale
    return key


def canonical(key: Mapping[str, Any]) -> str:
    """``key`` as one string: equal keys give equal strings."""
    return json.dumps(key, sort_keys=True)


def _entry(line: str) -> Optional[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """A line's key and record, or ``None`` where it is not a journal entry."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    key, record = entry.get("key"), entry.get("record")
    if not isinstance(key, dict) or not isinstance(record, dict):
        return None
    if any(field not in key or record.get(field) != key[field] for field in _REPEATED):
        return None
    return key, record


def read(path: str, wanted: Iterable[str]) -> Tuple[Dict[str, Dict[str, Any]], int, int]:
    """The records in the journal at ``path`` whose key is in ``wanted`` (:func:`canonical`
    keys), by key (the last line of a key wins); and how many lines did not parse and how many
    had a key not wanted. A missing file has none."""
    wanted = set(wanted)
    found: Dict[str, Dict[str, Any]] = {}
    unreadable = unmatched = 0
    if not Path(path).exists():
        return found, unreadable, unmatched
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            entry = _entry(line)
            if entry is None:
                unreadable += 1
                continue
            key = canonical(entry[0])
            if key in wanted:
                found[key] = entry[1]
            else:
                unmatched += 1
    return found, unreadable, unmatched


class Writer:
    """Appends entries to the journal at ``path``, each flushed and synced to disk at once."""

    def __init__(self, path: str) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        ends_open = False
        if target.exists() and target.stat().st_size > 0:
            with open(target, "rb") as handle:
                handle.seek(-1, os.SEEK_END)
                ends_open = handle.read(1) != b"\n"
        self.handle: IO[str] = open(target, "a", encoding="utf-8")
        if ends_open:  # a line cut short by a killed run: the next entry starts a line of its own
            self._write("\n")

    def _write(self, text: str) -> None:
        self.handle.write(text)
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def append(self, key: Mapping[str, Any], record: Mapping[str, Any]) -> None:
        self._write(json.dumps({"key": key, "record": record}) + "\n")

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

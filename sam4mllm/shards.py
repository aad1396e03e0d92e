"""Incremental, resumable, sharded JSONL outputs (label generation, evaluation).

A job splits its ordered work items over ``n`` shards (item ``k`` goes to shard
``k % n``); shard ``i`` appends one JSON line per finished item to
``shard-<i>-of-<n>.jsonl`` after a header line. A killed process (even ``kill -9``
in the middle of a line) resumes: the file is cut back to its last complete line and
finished items are skipped. When every shard is complete, the records are merged in
item order into one file whose content does not depend on ``n``, so ``n`` shards give
exactly what one process gives.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sam4mllm.atomic import write_atomic

log = logging.getLogger(__name__)


def shard_from_env(index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """``(index, count)``: explicit values, else the launcher's ``RANK``/``WORLD_SIZE``, else ``(0, 1)``."""
    count = int(count if count is not None else os.environ.get("WORLD_SIZE", 1))
    index = int(index if index is not None else os.environ.get("RANK", 0))
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    return index, count


def shard_path(out_dir: Path, index: int, count: int) -> Path:
    """File of shard ``index`` of ``count``."""
    return Path(out_dir) / f"shard-{index:05d}-of-{count:05d}.jsonl"


def _read_lines(path: Path, partial: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Complete JSON lines of ``path`` and the byte length they span.

    A torn last line (a shard's process killed mid-write) is excluded when ``partial``;
    a file written whole (``partial=False``) never has one. A broken line with more lines
    after it is damage that no kill makes: either raises rather than losing records.
    """
    records, good = [], 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("no line end")
                records.append(json.loads(raw))
            except ValueError:  # json.JSONDecodeError included
                if f.read().strip():
                    raise ValueError(f"{path}, line {n}, is not a complete JSON record but more lines follow it: "
                                     "the file is damaged; regenerate it or remove that line") from None
                if not partial:
                    raise ValueError(f"{path} ends in a torn line ({n}), which a file written whole never has: "
                                     "it is damaged; regenerate it") from None
                break
            good += len(raw)
    return records, good


class ShardWriter:
    """Appends records to one shard; reopening it resumes after the last complete line.

    ``header`` must match the header already in the file (same config hash, shard and
    shard count); otherwise the file belongs to another run and ``FileExistsError`` is
    raised rather than mixing outputs. A file with no finished record yet is started
    afresh under ``header``: a run that stopped before its first item (a checkpoint path
    mistyped, say) left nothing to protect, and its fix changes the configuration.

    A record with an ``error`` key is an item that failed on bad data (an unreadable
    image, say). Reopening drops such records, counted in ``retried``, so the job tries
    those items again: data repaired since is then used, and data still bad fails again
    and is recorded again.

    ``keys``: the keys of this shard's items. Those finished in the shards of another shard count
    in the same folder (a killed job resumed on fewer or more processes), under the same header
    but for the shard fields, are copied in as finished, counted in ``adopted``; the merge
    (:func:`merge_shards`) removes those files once every shard of this count is complete.
    """

    def __init__(self, path: str | Path, header: dict[str, Any], keys: Iterable[str] = ()) -> None:
        self.path, self.header = Path(path), header
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            lines, good = _read_lines(self.path)
            self.records = lines[1:]
            if self.records and lines[0].get("header") != header:
                raise FileExistsError(
                    f"{self.path} was written by another configuration ({lines[0].get('header')}); "
                    "delete it or choose another output directory"
                )
        kept = [r for r in self.records if "error" not in r]
        self.retried = len(self.records) - len(kept)
        adopted = _finished_elsewhere(self.path, header, set(keys) - {r["key"] for r in kept})
        self.adopted = len(adopted)
        if self.retried or adopted:
            self.records = kept + adopted
            write_records(self.path, header, self.records)  # atomic: a kill now loses no finished item
        elif self.records:
            with open(self.path, "r+b") as f:  # drop a line torn by a kill
                f.truncate(good)
        else:
            self.path.write_text(json.dumps({"header": header}) + "\n")
        self.done = {r["key"] for r in self.records}
        self._f = open(self.path, "a")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        """Append one finished item (it must carry ``key`` and ``index``) and flush it."""
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        self.records.append(record)
        self.done.add(record["key"])

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SHARD_FIELDS = ("shard", "num_shards")


def _other_counts(path: Path, header: dict[str, Any]) -> Iterator[Path]:
    """The shards beside shard ``path`` of another shard count whose header equals ``header`` but
    for the shard fields: the same job, run on another number of processes. Only their header
    lines are read (the merge removes them unread)."""
    job = {k: v for k, v in header.items() if k not in _SHARD_FIELDS}
    count = path.name[path.name.index("-of-"):]  # this count's shards hold other items than this one's
    for other in sorted(path.parent.glob("shard-*-of-*.jsonl")):
        if other.name.endswith(count):
            continue
        try:
            with open(other, "rb") as f:
                first = f.readline()
        except FileNotFoundError:  # removed meanwhile by another rank's merge (below)
            continue
        try:
            theirs = json.loads(first)["header"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{other} has no header line") from None
        if {k: v for k, v in theirs.items() if k not in _SHARD_FIELDS} == job:
            yield other


def _finished_elsewhere(path: Path, header: dict[str, Any], wanted: set[str]) -> list[dict[str, Any]]:
    """The finished records of keys ``wanted`` in the shards of another count beside ``path``."""
    if not wanted:
        return []
    found: dict[str, dict[str, Any]] = {}
    for other in _other_counts(path, header):
        records = read_shard(other, partial=True)[1]
        found.update((r["key"], r) for r in records if r["key"] in wanted and "error" not in r)
    return list(found.values())


def read_shard(path: Path, partial: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(header, records)`` of a merged file, or with ``partial`` of a shard (a torn last line left out)."""
    lines, _ = _read_lines(path, partial)
    if not lines or "header" not in lines[0]:
        raise ValueError(f"{path} has no header line")
    return lines[0]["header"], lines[1:]


def merge_shards(out_dir: Path, count: int, expected: int, header: dict[str, Any], name: str) -> Path | None:
    """Merge complete shards into ``out_dir/name`` (atomically); ``None`` while any is unfinished.

    The same job's shard files of another count, whose items this count's shards took over, are
    then removed.

    ``expected`` is the total number of items; ``header`` is the merged file's header
    (it must not mention the shard count, so any ``count`` gives the same bytes).
    """
    records: list[dict[str, Any]] = []
    for i in range(count):
        p = shard_path(out_dir, i, count)
        if not p.exists():
            return None
        shard_header, mine = read_shard(p, partial=True)
        records += mine
    if len(records) < expected:
        return None
    records.sort(key=lambda r: r["index"])
    if [r["index"] for r in records] != list(range(expected)):
        raise ValueError(f"shards in {out_dir} hold duplicate or foreign items; delete them and rerun")
    merged = write_records(Path(out_dir) / name, header, records)
    # The same job's shards of another count (a killed run resumed on another number of processes)
    # are superseded: their finished items were taken over, their failed ones retried.
    superseded = list(_other_counts(p, shard_header))
    for old in superseded:
        old.unlink(missing_ok=True)  # another rank merging at the same time may have removed it
    if superseded:
        log.info("removed %d shard files of another shard count, superseded by %s", len(superseded), merged)
    return merged


def write_records(path: Path, header: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    """Write a complete (merged-format) file atomically: a header line, then one record per line."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            f.write(json.dumps({"header": header}) + "\n")
            for r in records:
                f.write(json.dumps(r) + "\n")

    return write_atomic(path, write)


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a merged file, header skipped."""
    yield from read_shard(path)[1]


def assign(items: Iterable[Any], index: int, count: int) -> list[tuple[int, Any]]:
    """``(global index, item)`` pairs of shard ``index`` of ``count``."""
    return [(k, it) for k, it in enumerate(items) if k % count == index]

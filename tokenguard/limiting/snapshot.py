"""The registry snapshot: a node's last view of the key registry, kept in a file, so that
a node that starts while the store is unreachable enforces what the registry last
said (a key revoked through the admin API stays refused), not the config file alone.

The node writes it (:class:`tokenguard.limiting.keyring.Keyring`, given ``--registry-snapshot
PATH``; the supervisor gives every node ``STATE_DIR/registry.json``) whenever its view
of the registry changes, and reads it once, at start.

Format (JSON)::

    {"format": 1, "marker": "<the registry's marker record>", "version": 12,
     "written_at": 1733550000,
     "records": [{"kind": "key", "name": "alice", "record": "<the record's JSON>"}, ...]}

Guarantees:

* Written atomically: a temporary file in the same directory is written, fsync'ed and
  renamed over the snapshot, then the directory is fsync'ed. A reader (or a crash)
  finds the old snapshot or the new one, never a mix. Several nodes may write the same
  file: each write is whole, and the last one wins (they all hold the same registry
  within a second).
* Mode 0600, whatever the umask. It holds what the registry holds: names, SHA-256
  digests, limits, tiers and revocation tombstones; never a plaintext key.
* :func:`read_snapshot` refuses a file that another user owns or that others may write
  (whoever can write it can add keys), and one that does not parse.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from tokenguard.store.window_store import Registry

FORMAT = 1


class SnapshotError(ValueError):
    """The snapshot file exists but cannot be used; the message says why."""


@attrs.frozen
class Snapshot:
    """A view of the registry: its records, and the marker and version it was read at
    (``None``: not read from the store)."""

    records: Registry
    marker: str | None = None
    version: int | None = None


def write_snapshot(path: Path, snapshot: Snapshot) -> None:
    """Replace the file at ``path`` with ``snapshot``, atomically, mode 0600 (see the
    module docstring). Blocking (call it from a worker thread). Raises ``OSError``; on
    failure the previous snapshot, if any, is left as it was."""
    data: dict[str, Any] = {
        "format": FORMAT,
        "marker": snapshot.marker,
        "version": snapshot.version,
        "written_at": int(time.time()),
        "records": [
            {"kind": kind, "name": name, "record": record}
            for (kind, name), record in sorted(snapshot.records.items())
        ],
    }
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    directory = path.parent
    # mkstemp creates the file 0600, in the snapshot's own directory (same filesystem:
    # the rename is atomic).
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)  # the rename itself survives a crash
    finally:
        os.close(directory_fd)


def read_snapshot(path: Path) -> Snapshot | None:
    """The snapshot at ``path``; ``None`` if there is no such file. Raises
    :class:`SnapshotError` for a file owned by another user or writable by others, or
    one that does not parse; ``OSError`` if it cannot be read."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    if info.st_uid != os.geteuid():
        raise SnapshotError(f"{path} is owned by uid {info.st_uid}, not this user")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise SnapshotError(f"{path} may be written by others (mode {info.st_mode & 0o777:o})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise SnapshotError(f"{path}: unknown format {data.get('format')!r}")
        records: Registry = {}
        for entry in data["records"]:
            kind, name, record = entry["kind"], entry["name"], entry["record"]
            if not all(isinstance(v, str) for v in (kind, name, record)):
                raise SnapshotError(f"{path}: a record is not kind, name and text")
            records[(kind, name)] = record
        marker, version = data.get("marker"), data.get("version")
    except SnapshotError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SnapshotError(f"{path} does not parse: {exc!r}") from None
    return Snapshot(
        records=records,
        marker=marker if isinstance(marker, str) else None,
        version=version if isinstance(version, int) else None,
    )

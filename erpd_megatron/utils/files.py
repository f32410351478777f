"""Atomic file writes and content fingerprints, shared by every on-disk artefact."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename,
    so that a reader never sees a partial file and a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(
            tmp, 0o666 & ~_umask()
        )  # mkstemp creates 0600; shared clusters need group/other read
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
    )


SELF_DIGEST_KEY = "self_sha256"
"""Key of a manifest's digest of its own content (every other key, canonical JSON)."""


def _content_digest(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != SELF_DIGEST_KEY}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


def with_self_digest(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` plus its self digest, to write as a manifest (see :func:`self_digest_error`).

    A manifest's fields are facts later steps trust (fingerprints, plan fields, shard names);
    most are not re-derived by a reader, so a changed digit would pass silently without this.
    """
    return {**obj, SELF_DIGEST_KEY: _content_digest(obj)}


def self_digest_error(path: str | os.PathLike, obj: Any) -> str | None:
    """Why the manifest ``obj`` read from ``path`` fails its self digest, or None when it holds.

    A manifest without the key (written before the digest existed, or with the key damaged)
    fails too: nothing would then catch a changed field.
    """
    if not isinstance(obj, dict) or not isinstance(obj.get(SELF_DIGEST_KEY), str):
        return f"{path}: has no {SELF_DIGEST_KEY} (written by an older version, or damaged)"
    if obj[SELF_DIGEST_KEY] != _content_digest(obj):
        return f"{path}: content differs from its {SELF_DIGEST_KEY} (edited or damaged)"
    return None


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error when it is missing or malformed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a damaged byte may not be UTF-8
        raise ValueError(
            f"{path}: not valid JSON ({e}); delete it and rerun the step that writes it"
        ) from e


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_fingerprint(
    path: str | os.PathLike, *, full_hash_below: int = 64 << 20, edge_bytes: int = 4 << 20
) -> str:
    """A quick content fingerprint of a directory (a checkpoint): hex SHA-256.

    Over every file's relative path and size (hidden files excluded), the full bytes of files
    up to ``full_hash_below`` (configs, tokenizer, small weights) and the first and last
    ``edge_bytes`` of larger ones, so a 70B checkpoint is fingerprinted in seconds. The one
    fingerprint of model weights in the project (rollout manifests, the teacher cache and
    the checks against them).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory, cannot fingerprint it")
    h = hashlib.sha256()
    for f in sorted(x for x in root.rglob("*") if x.is_file() and not x.name.startswith(".")):
        size = f.stat().st_size
        h.update(f"{f.relative_to(root)}:{size}\n".encode())
        with open(f, "rb") as fh:
            if size <= full_hash_below:
                h.update(fh.read())
            else:
                h.update(fh.read(edge_bytes))
                fh.seek(size - edge_bytes)
                h.update(fh.read(edge_bytes))
    return h.hexdigest()

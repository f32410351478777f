"""The rollout data of a round: sharded Parquet + ``manifest.json``, writer and reader.

The schema is documented in ``docs/rollout_schema.md``. In short: one row per sample, shards
``shard-00000.parquet, ...`` each holding whole groups (``prompts_per_shard`` prompts x G
samples, sorted by ``sample_id``), written atomically (temporary file + rename) so a shard
either exists complete or not at all. Each shard carries its own JSON metadata (key
``erpd`` of the Parquet footer). The manifest, written once every shard exists, lists the
shards with their SHA-256 and derives the set's ``fingerprint`` from them; later steps
(Stage 1/2, the teacher cache) record that fingerprint and compare it.

Readers use :class:`RolloutSet`::

    rs = RolloutSet.open("runs/x/rollouts")      # checks manifest, shards, hashes
    cols = rs.load(["sample_id", "group_index", "prompt_token_ids", "response_token_ids", "reward"])
    for rec in rs: ...                           # RolloutRecord, shard by shard
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from erpd_megatron.utils.files import (
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    self_digest_error,
    sha256_file,
    with_self_digest,
)

FORMAT = "erpd-rollouts"
VERSION = 1
MANIFEST = "manifest.json"
META_KEY = b"erpd"
FINISH_REASONS = ("stop", "length")

SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("prompt_id", pa.int64(), nullable=False),
        pa.field("group_index", pa.int64(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response_token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=False),
        pa.field("engine_logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("prompt_text", pa.string(), nullable=False),
        pa.field("response_text", pa.string(), nullable=False),
        pa.field("reference", pa.string(), nullable=False),
    ]
)
COLUMNS = tuple(SCHEMA.names)
LIST_COLUMNS = ("prompt_token_ids", "response_token_ids", "engine_logprobs")
_NP_DTYPES = {
    "prompt_token_ids": np.int32,
    "response_token_ids": np.int32,
    "engine_logprobs": np.float32,
}


class RolloutDataError(ValueError):
    """A rollout directory or shard is unusable; the message names the file and the remedy."""


@dataclass
class RolloutRecord:
    """One sample (one row of the Parquet schema)."""

    sample_id: int
    """Stable id, unique in the set: ``group_index * G + sample_index`` for generated sets."""
    prompt_id: int
    """Row of the prompt in the source split."""
    group_index: int
    """Index of the prompt within the set (the GRPO group)."""
    sample_index: int
    """Index of the sample within its group (0..G-1)."""
    prompt_token_ids: list[int]
    """Prompt token ids."""
    response_token_ids: list[int]
    """Sampled response token ids (EOS included when the sample stopped on it)."""
    reward: float
    """Verifier reward."""
    finish_reason: str
    """"stop" (EOS) or "length" (max_new_tokens reached)."""
    engine_logprobs: list[float]
    """Engine log-prob of each sampled response token (same length as response_token_ids)."""
    prompt_text: str = ""
    """Rendered prompt text."""
    response_text: str = ""
    """Decoded response (special tokens skipped)."""
    reference: str = ""
    """Normalised reference answer."""


def shard_name(index: int) -> str:
    """File name of shard ``index``."""
    return f"shard-{index:05d}.parquet"


def _check_record(r: RolloutRecord) -> None:
    if len(r.response_token_ids) != len(r.engine_logprobs):
        raise RolloutDataError(
            f"sample {r.sample_id}: {len(r.response_token_ids)} response tokens but "
            f"{len(r.engine_logprobs)} engine log-probs"
        )
    if r.finish_reason not in FINISH_REASONS:
        raise RolloutDataError(
            f"sample {r.sample_id}: finish_reason {r.finish_reason!r} not in {FINISH_REASONS}"
        )


def _list_array(rows: Sequence[Sequence[Any]], dtype: Any, pa_type: pa.DataType) -> pa.Array:
    lengths = np.fromiter((len(x) for x in rows), np.int64, len(rows))
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(x, dtype) for x in rows]) if len(rows) else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(flat.astype(dtype, copy=False), pa_type)
    )


def records_to_table(
    records: Sequence[RolloutRecord], metadata: dict[str, Any] | None = None
) -> pa.Table:
    """Records (sorted by sample_id) as an Arrow table of :data:`SCHEMA`, with the shard
    metadata."""
    for r in records:
        _check_record(r)
    arrays = []
    for f in SCHEMA:
        vals = [getattr(r, f.name) for r in records]
        if f.name in LIST_COLUMNS:
            arrays.append(_list_array(vals, _NP_DTYPES[f.name], f.type.value_type))
        else:
            arrays.append(pa.array(vals, f.type))
    schema = SCHEMA.with_metadata({META_KEY: json.dumps(metadata or {}, sort_keys=True).encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def write_shard(
    path: str | os.PathLike, records: Sequence[RolloutRecord], metadata: dict[str, Any]
) -> None:
    """Write one shard atomically (a reader or a resumed run never sees a partial file)."""
    records = sorted(records, key=lambda r: r.sample_id)
    meta = {"format": FORMAT, "version": VERSION, "num_rows": len(records), **metadata}
    table = records_to_table(records, meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    atomic_write_bytes(path, buf.getvalue())


def read_shard_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``erpd`` metadata of a shard (footer only), with ``num_rows`` from the footer.

    Raises :class:`RolloutDataError` naming the file when it is truncated, corrupt, not one
    of our shards, or lacks columns of the schema.
    """
    path = Path(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise RolloutDataError(
            f"{path}: not a readable Parquet file ({type(e).__name__}: {e}); the shard is "
            "truncated or corrupt: delete it and rerun generation (complete shards are kept)"
        ) from e
    names = set(pf.schema_arrow.names)
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise RolloutDataError(
            f"{path}: missing columns {missing} of the rollout schema (docs/rollout_schema.md)"
        )
    raw = (pf.schema_arrow.metadata or {}).get(META_KEY)
    meta: dict[str, Any] = {}
    if raw is not None:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RolloutDataError(f"{path}: shard metadata is not valid JSON ({e})") from e
    if meta.get("format", FORMAT) != FORMAT:
        raise RolloutDataError(f"{path}: format {meta.get('format')!r} is not {FORMAT}")
    meta["num_rows"] = pf.metadata.num_rows
    return meta


def shard_is_complete(path: str | os.PathLike, plan_hash: str | None = None) -> bool:
    """True when ``path`` is a readable shard (of plan ``plan_hash`` when given).

    A shard of another plan is an error, not "incomplete": mixing two configurations in one
    directory would corrupt the set silently.
    """
    path = Path(path)
    if not path.exists():
        return False
    meta = read_shard_metadata(path)
    if plan_hash is not None and meta.get("plan_hash") != plan_hash:
        raise RolloutDataError(
            f"{path}: written for another generation plan ({meta.get('plan_hash', '?')[:12]} != "
            f"{plan_hash[:12]}): the config changed since; use a new rollout.output_dir or delete "
            "the old shards"
        )
    return True


def data_fingerprint(shards: Sequence[dict[str, Any]]) -> str:
    """SHA-256 over the shard list (``file:sha256`` lines in shard order)."""
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s['file']}:{s['sha256']}\n".encode())
    return h.hexdigest()


def finalize_manifest(
    directory: str | os.PathLike, num_shards: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``manifest.json`` for shards ``0..num_shards-1`` of ``directory`` and return it.

    Hashes every shard, sums counts, reward and finish-reason statistics from the shard
    columns; ``extra`` (engine, model, sampling, prompt counts...) is merged in. The write is
    atomic and the content deterministic, so concurrent finalizers agree.
    """
    directory = Path(directory)
    shards, rewards, reasons, groups = [], [], {}, 0
    shard_meta_sums: dict[str, float] = {}
    sizes: set[int] = set()
    for i in range(num_shards):
        path = directory / shard_name(i)
        if not path.exists():
            raise RolloutDataError(
                f"{path}: missing; {num_shards} shards are expected before the manifest is written"
            )
        meta = read_shard_metadata(path)
        t = pq.read_table(path, columns=["reward", "finish_reason", "group_index"])
        rewards.append(t.column("reward").to_numpy())
        for k, v in zip(
            *np.unique(t.column("finish_reason").to_numpy(zero_copy_only=False), return_counts=True)
        ):
            reasons[str(k)] = reasons.get(str(k), 0) + int(v)
        g = t.column("group_index").to_numpy()
        if len(g):
            _, counts = np.unique(g, return_counts=True)
            sizes.update(int(c) for c in counts)
            groups += len(counts)
        for k, v in (meta.get("stats") or {}).items():
            if isinstance(v, (int, float)):
                shard_meta_sums[k] = shard_meta_sums.get(k, 0) + v
        shards.append(
            {
                "file": path.name,
                "num_rows": int(meta["num_rows"]),
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
                "first_group": meta.get("first_group"),
                "num_groups": meta.get("num_groups"),
            }
        )
    r = np.concatenate(rewards) if rewards else np.zeros(0, np.float32)
    manifest = {
        **(extra or {}),
        "format": FORMAT,
        "version": VERSION,
        "num_shards": num_shards,
        "num_samples": int(sum(s["num_rows"] for s in shards)),
        "num_prompts": groups,
        "samples_per_prompt": sizes.pop() if len(sizes) == 1 else None,
        "reward_mean": float(r.mean()) if len(r) else None,
        "finish_reasons": dict(sorted(reasons.items())),
        "shard_stats": {k: shard_meta_sums[k] for k in sorted(shard_meta_sums)},
        "shards": shards,
        "fingerprint": data_fingerprint(shards),
    }
    manifest = with_self_digest(manifest)
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest


def write_rollout_set(
    directory: str | os.PathLike,
    records: Iterable[RolloutRecord],
    *,
    prompts_per_shard: int = 64,
    manifest_extra: dict[str, Any] | None = None,
) -> RolloutSet:
    """Write a rollout set from records (tests, the demo, tools): shards of
    ``prompts_per_shard`` consecutive groups plus the manifest. Sample ids must be unique."""
    directory = Path(directory)
    if (directory / MANIFEST).exists() or any(directory.glob("shard-*.parquet")):
        raise RolloutDataError(
            f"{directory}: already holds a rollout set; write to an empty directory"
        )
    by_group: dict[int, list[RolloutRecord]] = {}
    seen: set[int] = set()
    for r in records:
        if r.sample_id in seen:
            raise RolloutDataError(f"sample_id {r.sample_id} appears twice")
        seen.add(r.sample_id)
        by_group.setdefault(int(r.group_index), []).append(r)
    if not by_group:
        raise RolloutDataError("no records to write")
    order = sorted(by_group)
    num_shards = math.ceil(len(order) / prompts_per_shard)
    for s in range(num_shards):
        gs = order[s * prompts_per_shard : (s + 1) * prompts_per_shard]
        write_shard(
            directory / shard_name(s),
            [r for g in gs for r in by_group[g]],
            {"shard_index": s, "first_group": gs[0], "num_groups": len(gs)},
        )
    finalize_manifest(directory, num_shards, manifest_extra)
    return RolloutSet.open(directory)


class RolloutSet:
    """A finished rollout directory, checked on open (see :meth:`open`)."""

    def __init__(self, directory: Path, manifest: dict[str, Any]) -> None:
        self.directory = directory
        self.manifest = manifest

    @classmethod
    def open(cls, directory: str | os.PathLike, *, verify: bool = True) -> RolloutSet:
        """Open and check a rollout directory.

        Checks that ``manifest.json`` exists and is ours, that every listed shard exists with
        the recorded size, row count and columns, and (``verify=True``) that each shard's
        SHA-256 matches, so a truncated, corrupt or swapped shard is an error naming the file.
        """
        directory = Path(directory)
        mpath = directory / MANIFEST
        if not mpath.exists():
            n = len(list(directory.glob("shard-*.parquet"))) if directory.is_dir() else 0
            what = (
                "does not exist"
                if not directory.exists()
                else f"has no {MANIFEST} ({n} shards present)"
            )
            raise RolloutDataError(
                f"{directory}: {what}; generation is unfinished: rerun `erpd rollout` (complete "
                "shards are kept) or `erpd rollout --finalize` once all shards exist"
            )
        try:
            manifest = read_json(mpath)
        except ValueError as e:
            raise RolloutDataError(str(e)) from e
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise RolloutDataError(f"{mpath}: not an {FORMAT} v{VERSION} manifest")
        if why := self_digest_error(mpath, manifest):
            raise RolloutDataError(
                f"{why}; rewrite it from the shards with `erpd rollout --finalize` (same config)"
            )
        for s in manifest["shards"]:
            path = directory / s["file"]
            if not path.exists():
                raise RolloutDataError(f"{path}: listed in the manifest but missing")
            if path.stat().st_size != s["bytes"]:
                raise RolloutDataError(
                    f"{path}: {path.stat().st_size} bytes, the manifest says {s['bytes']}: "
                    "truncated or rewritten; delete it and the manifest and rerun generation"
                )
            meta = read_shard_metadata(path)
            if meta["num_rows"] != s["num_rows"]:
                raise RolloutDataError(
                    f"{path}: {meta['num_rows']} rows, the manifest says {s['num_rows']}"
                )
            if verify and sha256_file(path) != s["sha256"]:
                raise RolloutDataError(
                    f"{path}: content hash differs from the manifest (corrupt or replaced shard)"
                )
        return cls(directory, manifest)

    @property
    def fingerprint(self) -> str:
        """Hash over the shard contents; later steps store and compare it."""
        return str(self.manifest["fingerprint"])

    @property
    def num_samples(self) -> int:
        """Number of samples (rows)."""
        return int(self.manifest["num_samples"])

    @property
    def num_prompts(self) -> int:
        """Number of groups (prompts)."""
        return int(self.manifest["num_prompts"])

    @property
    def samples_per_prompt(self) -> int | None:
        """G when every group has the same size, else None."""
        g = self.manifest.get("samples_per_prompt")
        return None if g is None else int(g)

    @property
    def shard_paths(self) -> list[Path]:
        """The shard files, in order."""
        return [self.directory / s["file"] for s in self.manifest["shards"]]

    def __len__(self) -> int:
        return self.num_samples

    def _read(self, path: Path, columns: Sequence[str] | None) -> pa.Table:
        try:
            return pq.read_table(path, columns=list(columns) if columns is not None else None)
        except Exception as e:
            raise RolloutDataError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e

    def iter_tables(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """The shards as Arrow tables, one at a time (streaming)."""
        self._check_columns(columns)
        for path in self.shard_paths:
            yield self._read(path, columns)

    def _check_columns(self, columns: Sequence[str] | None) -> None:
        unknown = [c for c in (columns or ()) if c not in COLUMNS]
        if unknown:
            raise RolloutDataError(f"unknown columns {unknown}; the schema has {list(COLUMNS)}")

    def load(self, columns: Sequence[str] | None = None) -> dict[str, Any]:
        """All rows (in sample_id order within shard order) as columns.

        Scalar columns are numpy arrays (int64 / int32 / float32; strings as object arrays);
        list columns are lists of numpy arrays (int32 token ids, float32 log-probs) that are
        views into one buffer per shard.
        """
        columns = list(columns or COLUMNS)
        self._check_columns(columns)
        tables = [self._read(p, columns) for p in self.shard_paths]
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table().select(columns)
        out: dict[str, Any] = {}
        for name in columns:
            col = table.column(name)
            if name in LIST_COLUMNS:
                out[name] = [
                    a for chunk in col.chunks for a in _split_list(chunk, _NP_DTYPES[name])
                ]
            else:
                out[name] = col.to_numpy()
        return out

    def load_packed(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """A list column as ``(values, offsets)``: row ``i`` is
        ``values[offsets[i]:offsets[i+1]]``."""
        if column not in LIST_COLUMNS:
            raise RolloutDataError(f"{column} is not a list column ({', '.join(LIST_COLUMNS)})")
        values, lengths = [], []
        for t in self.iter_tables([column]):
            for chunk in t.column(column).chunks:
                values.append(
                    chunk.flatten()
                    .to_numpy(zero_copy_only=False)
                    .astype(_NP_DTYPES[column], copy=False)
                )
                lengths.append(chunk.value_lengths().to_numpy(zero_copy_only=False))
        lens = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        return (np.concatenate(values) if values else np.zeros(0, _NP_DTYPES[column])), offsets

    def records(self) -> Iterator[RolloutRecord]:
        """Every sample as a :class:`RolloutRecord`, shard by shard."""
        for t in self.iter_tables():
            for row in t.to_pylist():
                yield RolloutRecord(**row)

    def __iter__(self) -> Iterator[RolloutRecord]:
        return self.records()


def _split_list(chunk: pa.ListArray, dtype: Any) -> list[np.ndarray]:
    values = chunk.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    lens = chunk.value_lengths().to_numpy(zero_copy_only=False)
    return np.split(values, np.cumsum(lens)[:-1]) if len(lens) else []


# ---------------------------------------------------------------------------- inspect


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: ``1 - C(n-c, k) / C(n, k)``."""
    if k > n:
        raise ValueError(f"k={k} > n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _quantiles(x: np.ndarray) -> str:
    if len(x) == 0:
        return "n/a"
    return (
        f"mean {x.mean():.1f}  p50 {np.percentile(x, 50):.0f}  p90 {np.percentile(x, 90):.0f}  "
        f"min {x.min()}  max {x.max()}"
    )


def inspect_rollouts(directory: str | os.PathLike, *, correct_threshold: float = 0.5) -> str:
    """A human-readable summary of a rollout set (``erpd data inspect DIR``).

    Accuracy (mean reward and fraction correct, a sample counting as correct when its reward
    exceeds ``correct_threshold``), pass@k per prompt (unbiased estimator, k = 1, 2, 4, ... up
    to the smallest group), groups that are all-correct / all-wrong / mixed, prompt and
    response length statistics, finish reasons and the mean engine log-prob per token.
    """
    rs = RolloutSet.open(directory, verify=False)
    m = rs.manifest
    cols = rs.load(["group_index", "reward", "finish_reason"])
    _, plens = rs.load_packed("prompt_token_ids")
    lp_vals, rlens = rs.load_packed("engine_logprobs")
    plen, rlen = np.diff(plens), np.diff(rlens)
    reward = cols["reward"].astype(np.float64)
    correct = reward > correct_threshold
    groups, inv = np.unique(cols["group_index"], return_inverse=True)
    n_per = np.bincount(inv)
    c_per = np.bincount(inv, weights=correct).astype(int)
    lines = [f"rollouts {rs.directory}"]
    g = rs.samples_per_prompt
    lines.append(
        f"  samples {rs.num_samples} = {rs.num_prompts} prompts x {g if g else 'varying'}"
        f", shards {m['num_shards']}, fingerprint {rs.fingerprint[:16]}"
    )
    for key in ("engine", "model_path"):
        if m.get(key):
            lines.append(f"  {key}: {m[key]}")
    lines.append(
        f"  reward mean {reward.mean():.4f}, accuracy {correct.mean():.4f}"
        if len(reward)
        else "  no samples"
    )
    ks, k = [], 1
    while len(n_per) and k <= n_per.min():
        ks.append(k)
        k *= 2
    if ks:
        vals = [np.mean([pass_at_k(int(n), int(c), kk) for n, c in zip(n_per, c_per)]) for kk in ks]
        lines.append("  pass@k   " + "  ".join(f"k={kk}: {v:.4f}" for kk, v in zip(ks, vals)))
    all_c, none_c = int((c_per == n_per).sum()), int((c_per == 0).sum())
    ng = max(len(groups), 1)
    lines.append(
        f"  groups   all-correct {all_c} ({all_c / ng:.0%}), all-wrong {none_c} "
        f"({none_c / ng:.0%}), "
        f"mixed {len(groups) - all_c - none_c} ({(len(groups) - all_c - none_c) / ng:.0%})"
    )
    lines.append(f"  prompt tokens    {_quantiles(plen)}")
    lines.append(f"  response tokens  {_quantiles(rlen)}")
    reasons, counts = np.unique(cols["finish_reason"].astype(str), return_counts=True)
    total = max(int(counts.sum()), 1)
    lines.append(
        "  finish   " + ", ".join(f"{r} {c} ({c / total:.1%})" for r, c in zip(reasons, counts))
    )
    if len(lp_vals):
        finite = np.isfinite(lp_vals)
        lines.append(
            f"  engine log-prob per token: mean {lp_vals[finite].mean():.4f}"
            + (f" ({int((~finite).sum())} non-finite)" if not finite.all() else "")
        )
    return "\n".join(lines)


def record_fields() -> list[str]:
    """Names of :class:`RolloutRecord` fields (= the schema's columns)."""
    return [f.name for f in dataclasses.fields(RolloutRecord)]


__all__ = [
    "COLUMNS",
    "FINISH_REASONS",
    "LIST_COLUMNS",
    "MANIFEST",
    "SCHEMA",
    "RolloutDataError",
    "RolloutRecord",
    "RolloutSet",
    "data_fingerprint",
    "finalize_manifest",
    "inspect_rollouts",
    "pass_at_k",
    "read_shard_metadata",
    "records_to_table",
    "shard_is_complete",
    "shard_name",
    "write_rollout_set",
    "write_shard",
]

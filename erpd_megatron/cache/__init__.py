"""Teacher cache: per-token log-probs of the cached models and each teacher's top-k, keyed
by sample id, in checksummed shards with bit-packed ids (see docs/cache_format.md).

Writer side (every rank, then rank 0)::

    w = CacheWriter(dir, rank=r, sample_ids=ids, vocab_size=V, k=64,
                    sampled_models=["base", "teacher0"], teachers=["teacher0"])
    ...; w.close(); barrier; finalize_manifest(dir, world_size, meta)

Reader side: ``TeacherCache.open(dir, expect_vocab_size=..., ...)``, then ``get`` / ``stream``.
"""

from erpd_megatron.cache.codec import (
    LOGPROB_FLOOR,
    bits_per_id,
    decode_logprobs,
    encode_logprobs,
    pack_ids,
    quantize_reference,
    unpack_ids,
)
from erpd_megatron.cache.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CacheError,
    CacheLayout,
    MissingSampleError,
    shard_name,
)
from erpd_megatron.cache.manifest import finalize_manifest, load_manifest
from erpd_megatron.cache.reader import CacheRecord, TeacherCache
from erpd_megatron.cache.writer import DEFAULT_MAX_SHARD_BYTES, CacheWriter

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "FORMAT_VERSION",
    "LOGPROB_FLOOR",
    "MANIFEST_NAME",
    "CacheError",
    "CacheLayout",
    "CacheRecord",
    "CacheWriter",
    "MissingSampleError",
    "TeacherCache",
    "bits_per_id",
    "decode_logprobs",
    "encode_logprobs",
    "finalize_manifest",
    "load_manifest",
    "pack_ids",
    "quantize_reference",
    "shard_name",
    "unpack_ids",
]

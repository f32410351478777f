"""A manifest's self digest: a changed field no reader re-derives is refused, naming the file.

Before the digest, a changed digit in a teacher's weights fingerprint or a rollout plan field
loaded silently (README "Fault tolerance", damaged files table).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from erpd_megatron.cache import CacheError, TeacherCache, load_manifest
from erpd_megatron.utils.files import SELF_DIGEST_KEY, self_digest_error, with_self_digest
from tests.cache.helpers import FINGERPRINT, build_cache


def test_self_digest_round_trip_and_failures(tmp_path: Path) -> None:
    doc = with_self_digest({"a": 1, "b": [1.5, "x"], "c": {"d": None}})
    assert self_digest_error("m.json", json.loads(json.dumps(doc))) is None
    assert "content differs" in self_digest_error("m.json", {**doc, "a": 2})
    assert "has no self_sha256" in self_digest_error("m.json", {"a": 1})


def test_edited_cache_manifest_is_refused(tmp_path: Path) -> None:
    build_cache(tmp_path, list(range(10)))
    path = tmp_path / "manifest.json"
    TeacherCache.open(tmp_path, expect_rollout_fingerprint=FINGERPRINT)
    good = path.read_text()
    doc = json.loads(good)
    name = next(iter(doc["models"]))
    fp = doc["models"][name]["fingerprint"]
    doc["models"][name]["fingerprint"] = ("1" if fp[0] != "1" else "2") + fp[1:]
    path.write_text(json.dumps(doc))
    with pytest.raises(CacheError, match="manifest.json: content differs.*rebuild"):
        load_manifest(tmp_path)
    del doc[SELF_DIGEST_KEY]
    path.write_text(json.dumps(doc))
    with pytest.raises(CacheError, match="manifest.json: has no self_sha256"):
        load_manifest(tmp_path)
    path.write_text(good)
    assert load_manifest(tmp_path)["models"][name]["fingerprint"] == fp

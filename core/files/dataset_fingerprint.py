"""Content fingerprints: cache keys and the dataset fingerprint stored in a head's metadata.

They hash file *contents* (sha256), never paths or modification times, so the same photos in another
folder give the same key, and an edited photo or caption gives a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Iterable

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(*parts: Any) -> str:
    """A stable short key from JSON-serialisable parts (model ids, settings dicts, file hashes...)."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def dataset_fingerprint(identities: Iterable[tuple[str, Iterable[str], str | None]]) -> str:
    """sha256 over (identity name, its photos' hashes in order, its caption text or None) for each identity."""
    entries = [[name, list(photo_hashes), caption] for name, photo_hashes, caption in identities]
    return hashlib.sha256(json.dumps(entries, sort_keys=False, separators=(",", ":")).encode("utf-8")).hexdigest()

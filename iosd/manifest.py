"""``dataset.json``: read, check and write the manifest of a shard set (atomically)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from iosd.errors import UserError
from iosd.schema import MANIFEST_NAME, SCHEMA_VERSION

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status);
    elsewhere set and restored under a lock (os.umask is process-wide: another thread
    creating a file in that instant would get the wrong mode, so only iosd's own writers,
    which hold the lock, are kept out)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def share_like_output(path: str | Path) -> None:
    """Give a file some library wrote owner-only (safetensors' ``save_file`` writes 0o600) the
    mode any other tool's output gets: 0o666 less the umask."""
    os.chmod(path, 0o666 & ~current_umask())


def mkstemp_shared(path: str | Path, *, suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` beside ``path`` (a hidden name), with the mode any other tool's
    output gets: 0o666 less the umask, not mkstemp's owner-only 0o600. For writers that
    fill the temp file and then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes to a temp name in the same directory, fsync, then rename over ``path``:
    a reader sees the old file or the new one, never half of one. The file gets the mode
    of any other tool's output (0o666 less the umask)."""
    path = Path(path)
    fd, tmp = mkstemp_shared(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`write_bytes_atomic` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """JSON written with write_text_atomic."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_schema(manifest: dict, where: str) -> dict:
    """Refuse manifests this iosd cannot read."""
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise UserError(f"{where} is not an iosd manifest (no schema_version)", "point at a directory written by iosd-gen")
    if version > SCHEMA_VERSION:
        raise UserError(f"{where} has shard schema {version}, newer than this iosd reads ({SCHEMA_VERSION})", "upgrade iosd: pip install -U iosd")
    return manifest


def read_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a local shard directory, checked."""
    path = Path(shard_dir) / MANIFEST_NAME
    if not Path(shard_dir).exists():
        raise UserError(f"shard directory {shard_dir} does not exist", "run iosd-gen first or check the path")
    if not path.exists():
        raise UserError(f"{shard_dir} has no {MANIFEST_NAME}", "point at a directory written by iosd-gen")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not readable JSON ({err})", "regenerate it with iosd-gen or restore it") from None
    return check_schema(manifest, str(path))


def feature_layout(manifest: dict) -> dict:
    """What a head's input depends on: layer paths with (C, H, W) shapes and embedding width;
    for a projected set (``iosd-gen --project``) also the basis (K and sha256), which the
    stored arrays only mean something under."""
    feats = manifest["features"]
    layout = {
        "layers": [[entry["path"], list(entry["shape"])] for entry in feats["layers"]],
        "embedding_dim": int(manifest["embedding"]["dim"]),
    }
    if feats.get("projection"):
        layout["projection"] = {"k": int(feats["projection"]["k"]), "sha256": feats["projection"]["sha256"]}
    return layout


def layout_mismatch(a: dict, b: dict) -> str | None:
    """A one-line description of how two feature layouts differ, or None when they agree."""
    if a["embedding_dim"] != b["embedding_dim"]:
        return f"class embeddings are {a['embedding_dim']}-d vs {b['embedding_dim']}-d"
    la, lb = dict((p, tuple(s)) for p, s in a["layers"]), dict((p, tuple(s)) for p, s in b["layers"])
    if la != lb:
        only_a = sorted(set(la) - set(lb))
        only_b = sorted(set(lb) - set(la))
        shape = sorted(p for p in set(la) & set(lb) if la[p] != lb[p])
        return f"feature layers differ (only in first: {only_a}, only in second: {only_b}, other shape: {shape})"
    if a.get("projection") != b.get("projection"):
        return f"features are {_stored_as(a)} vs {_stored_as(b)}"
    return None


def _stored_as(layout: dict) -> str:
    p = layout.get("projection")
    return f"projected to K={p['k']} by basis {p['sha256'][:12]}" if p else "raw (unprojected)"

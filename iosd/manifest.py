"""``dataset.json``: read, check and write the manifest of a shard set (atomically)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from iosd.errors import UserError, name_path
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
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        name_path(err, path)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`write_bytes_atomic` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    """The one JSON layout of iosd's files (a file written locally or put in a store is the same bytes)."""
    return json.dumps(obj, indent=1, sort_keys=True)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """JSON written with write_text_atomic."""
    write_text_atomic(path, json_text(obj))


def replace_directory(built: Path, out: Path) -> None:
    """Put the directory ``built`` (complete, under a temp name beside ``out``) in ``out``'s
    place: the old one is moved aside first, so a crash leaves one whole version, never a mix."""
    import shutil

    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(built, out)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- field checks: the shape a reader relies on, said as one line naming file and field ---------
_MISSING = object()
Expect = tuple[str, Callable[[Any], bool]]  # what a field must be (said in the error) and the test


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(value: Any, n: int | None = None) -> bool:
    return isinstance(value, list) and (n is None or len(value) == n) and all(_is_int(v) and v > 0 for v in value)


INT: Expect = ("an integer", _is_int)
COUNT: Expect = ("an integer >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE: Expect = ("an integer > 0", lambda v: _is_int(v) and v > 0)
TEXT: Expect = ("a string", lambda v: isinstance(v, str))
FLAG: Expect = ("true or false", lambda v: isinstance(v, bool))
OBJECT: Expect = ("an object", lambda v: isinstance(v, dict))
LIST: Expect = ("a list", lambda v: isinstance(v, list))
ITEMS: Expect = ("a non-empty list", lambda v: isinstance(v, list) and len(v) > 0)
TEXTS: Expect = ("a list of strings", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v))
SIZES: Expect = ("a list of integers > 0", _ints)
SHAPE: Expect = ("a list of 3 integers > 0 (C, H, W)", lambda v: _ints(v, 3))
IMAGE_SIZE: Expect = ("a list of 2 integers > 0", lambda v: _ints(v, 2))


def one_of(options: tuple[str, ...] | list[str]) -> Expect:
    """A string from ``options`` (an enum field)."""
    return (f"one of {', '.join(options)}", lambda v: isinstance(v, str) and v in options)


def _lookup(data: Any, path: str):
    """(dotted name, value or _MISSING) of every field ``path`` names; ``a[].b`` walks a list.
    Fields under an absent or mistyped parent are skipped: the parent's own check says so."""
    found = [("", data)]
    for part in path.split("."):
        key, each = part.removesuffix("[]"), part.endswith("[]")
        step = []
        for prefix, obj in found:
            if not isinstance(obj, dict):
                continue
            name, value = f"{prefix}{key}", obj.get(key, _MISSING)
            if each:
                step += [(f"{name}[{i}]", item) for i, item in enumerate(value)] if isinstance(value, list) else []
            else:
                step.append((name, value))
        found = [(f"{name}.", value) for name, value in step]
    return [(name[:-1], value) for name, value in found]


def _show(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


REQUIRED, OPTIONAL, NULLABLE = "required", "optional", "nullable"  # a field's presence rule
Fields = tuple[tuple[str, Expect, str], ...]  # (dotted path, expectation, presence rule)


def check_fields(data: dict, fields: Fields, where: str, fix: str) -> None:
    """Refuse ``data`` at its first field that is missing (when REQUIRED), null (unless
    NULLABLE) or of another type or value than ``fields`` say: one line, not a KeyError later."""
    for path, (what, test), need in fields:
        for name, value in _lookup(data, path):
            if value is _MISSING:
                if need == REQUIRED:
                    raise UserError(f"{where}: {name} is missing", fix)
            elif not (value is None and need == NULLABLE) and not test(value):
                raise UserError(f"{where}: {name} is {_show(value)}, not {what}", fix)


def manifest_fields() -> Fields:
    """What the readers of dataset.json (iosd-train, -eval, -synth, -shards) rely on."""
    from iosd.choices import CODEC_NAMES, HIDDEN_STATES, POOLINGS
    from iosd.layers import FEATURE_DTYPES
    from iosd.recipes import HALVES, recipe_names

    return (
        ("features", OBJECT, REQUIRED), ("features.layers", ITEMS, REQUIRED), ("features.layers[]", OBJECT, REQUIRED),
        ("features.layers[].path", TEXT, REQUIRED), ("features.layers[].shape", SHAPE, REQUIRED), ("features.layers[].key", TEXT, OPTIONAL),
        ("features.dtype", one_of(FEATURE_DTYPES), OPTIONAL), ("features.codec", one_of(CODEC_NAMES), OPTIONAL),
        ("features.halves", one_of(HALVES), OPTIONAL), ("features.preset", TEXT, OPTIONAL),
        ("features.capture", OBJECT, OPTIONAL), ("features.capture.mode", TEXT, OPTIONAL), ("features.capture.t", INT, NULLABLE),
        ("features.projection", OBJECT, NULLABLE), ("features.projection.file", TEXT, REQUIRED),
        ("features.projection.k", POSITIVE, REQUIRED), ("features.projection.sha256", TEXT, REQUIRED),
        ("features.raw_bytes_per_sample", COUNT, OPTIONAL), ("features.stored_bytes_per_sample", COUNT, OPTIONAL),
        ("embedding", OBJECT, REQUIRED), ("embedding.dim", POSITIVE, REQUIRED), ("embedding.dims", SIZES, OPTIONAL),
        ("embedding.template", TEXT, OPTIONAL), ("embedding.pooling", one_of(POOLINGS), OPTIONAL),
        ("embedding.hidden", one_of(HIDDEN_STATES), OPTIONAL), ("embedding.encoders", TEXTS, OPTIONAL),
        ("shards", LIST, REQUIRED), ("shards[]", OBJECT, REQUIRED), ("shards[].name", TEXT, REQUIRED),
        ("shards[].samples", COUNT, OPTIONAL), ("shards[].bytes", COUNT, OPTIONAL), ("shards[].sha256", TEXT, OPTIONAL),
        ("complete", FLAG, OPTIONAL), ("planned_shards", COUNT, OPTIONAL), ("masks_meaningful", FLAG, OPTIONAL),
        ("classes", OBJECT, OPTIONAL), ("classes.name", TEXT, REQUIRED), ("classes.split", INT, REQUIRED),
        ("classes.seen", TEXTS, REQUIRED), ("classes.unseen", TEXTS, REQUIRED),
        ("subset", one_of(("seen", "unseen", "all")), NULLABLE), ("image_size", IMAGE_SIZE, OPTIONAL),
        ("recipe", OBJECT, NULLABLE), ("recipe.name", one_of(recipe_names()), OPTIONAL), ("recipe.settings", OBJECT, OPTIONAL),
        ("config", OBJECT, OPTIONAL), ("config.source", TEXT, NULLABLE), ("config.objects", TEXT, NULLABLE),
        ("config.images_per_class", COUNT, NULLABLE), ("config.out", TEXT, OPTIONAL),
        ("counts", OBJECT, OPTIONAL), ("counts.written", COUNT, OPTIONAL), ("counts.per_class", OBJECT, OPTIONAL),
        ("model", OBJECT, NULLABLE), ("teacher", OBJECT, NULLABLE), ("notes", TEXTS, OPTIONAL), ("identity", OBJECT, OPTIONAL),
        ("iosd_version", TEXT, OPTIONAL), ("kind", TEXT, OPTIONAL),
    )


def check_schema(manifest: dict, where: str) -> dict:
    """Refuse manifests this iosd cannot read: another format, a newer schema, or a field a
    reader relies on missing or of the wrong type (the one place dataset.json is checked)."""
    if not isinstance(manifest, dict):
        raise UserError(f"{where} is not an iosd manifest", "point at a directory written by iosd-gen")
    version = manifest.get("schema_version")
    if not _is_int(version):
        raise UserError(f"{where} is not an iosd manifest (no schema_version)", "point at a directory written by iosd-gen")
    if version > SCHEMA_VERSION:
        raise UserError(f"{where} has shard schema {version}, newer than this iosd reads ({SCHEMA_VERSION})", "upgrade iosd: pip install -U iosd")
    check_fields(manifest, manifest_fields(), where, "regenerate the set with iosd-gen or fix the field")
    return manifest


def read_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a shard directory or object-store URL (s3://, gs://, ...), checked."""
    from iosd.store import is_remote, open_store

    if is_remote(shard_dir):
        where = f"{str(shard_dir).rstrip('/')}/{MANIFEST_NAME}"
        data = open_store(shard_dir).read_bytes(MANIFEST_NAME)
        if data is None:
            raise UserError(f"{shard_dir} has no {MANIFEST_NAME}", "point at a shard set written by iosd-gen, or check the URL")
        try:
            return check_schema(json.loads(data), where)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{where} is not readable JSON ({err})", "regenerate it with iosd-gen or restore it") from None
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

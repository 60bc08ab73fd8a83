"""Where a training run's shards live: a directory, a brace pattern or a URL, resolved once.

A shard set is named by its ``dataset.json`` (local directory, or an http(s)/s3/gs/... base
URL or manifest URL) or by a brace pattern of tar URLs (``dir/shard-{000000..000009}.tar``);
with a pattern, the manifest next to it is used when there is one, else the feature layout is
read from the first sample. Tars are opened with plain ``open`` for local paths, ``urllib``
for http(s) and fsspec for every other scheme (s3fs / gcsfs installed separately), so one
shard set can be shared between machines.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import braceexpand

from iosd.errors import UserError
from iosd.manifest import check_schema, feature_layout
from iosd.schema import EXT_EMB, EXT_FEAT, MANIFEST_NAME


@dataclass
class ShardSet:
    """Resolved shard URLs and what the manifest (if any) says about them."""

    spec: str
    name: str
    urls: list[str]
    layout: dict
    manifest: dict | None = None
    manifest_sha256: str | None = None
    samples: int | None = None  # total, when the manifest says
    notes: list[str] = field(default_factory=list)

    @property
    def identity(self) -> str:
        """What a checkpoint remembers to recognise this shard set again."""
        if self.manifest_sha256:
            return self.manifest_sha256
        return hashlib.sha256("\n".join(self.urls).encode()).hexdigest()

    def describe(self) -> dict:
        return {"spec": self.spec, "name": self.name, "shards": len(self.urls), "samples": self.samples, "manifest_sha256": self.manifest_sha256, "identity": self.identity}


def is_url(spec: str) -> bool:
    scheme = urlparse(spec).scheme
    return len(scheme) > 1 and "://" in spec  # a Windows drive letter is not a scheme


def open_stream(url: str):
    """A readable binary stream for a local path or URL (tars are read as streams)."""
    scheme = urlparse(url).scheme if is_url(url) else ""
    try:
        if scheme in ("", "file"):
            return open(url[len("file://"):] if scheme == "file" else url, "rb")
        if scheme in ("http", "https"):
            return urllib.request.urlopen(url, timeout=60)
        import fsspec

        return fsspec.open(url, "rb").open()
    except ImportError as err:
        raise UserError(f"cannot open {url}: the {scheme}:// filesystem is not installed ({err})", "pip install s3fs (s3://) or gcsfs (gs://)") from None
    except ValueError as err:  # fsspec: unknown protocol
        raise UserError(f"cannot open {url} ({err})", "use a local path or an http(s)/s3/gs URL") from None


def read_bytes(url: str) -> bytes:
    with open_stream(url) as f:
        return f.read()


def _read_if_present(url: str) -> bytes | None:
    """The file's bytes, or None when it is not there (one fetch for a URL, not two)."""
    if not is_url(url):
        return Path(url).read_bytes() if Path(url).is_file() else None
    try:
        return read_bytes(url)
    except UserError:
        raise
    except Exception:
        return None


def _parse_manifest(data: bytes, where: str) -> dict:
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{where} is not readable JSON ({err})", "regenerate it with iosd-gen or restore it") from None
    if not isinstance(manifest, dict):
        raise UserError(f"{where} is not an iosd manifest", "point at a directory written by iosd-gen")
    return check_schema(manifest, where)


def _set_name(spec: str) -> str:
    """A short name for default run directories: the shard directory's name."""
    path = urlparse(spec).path if is_url(spec) else spec
    parts = [p for p in path.replace("\\", "/").split("/") if p and p != MANIFEST_NAME]
    if "{" in spec or (parts and parts[-1].endswith(".tar")):
        parts = parts[:-1]
    return parts[-1] if parts else "shards"


def _join(base: str, name: str) -> str:
    return posixpath.join(base, name) if is_url(base) else os.path.join(base, name)


def _from_manifest(spec: str, base: str, data: bytes, where: str, urls: list[str] | None = None) -> ShardSet:
    manifest = _parse_manifest(data, where)
    try:
        layout = feature_layout(manifest)
        listed = [entry["name"] for entry in manifest["shards"]]
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{where} lacks the feature layout or shard list ({err})", "regenerate it with iosd-gen") from None
    if urls is None:
        urls = [_join(base, name) for name in listed]
    notes = []
    if manifest.get("complete") is False:
        notes.append(f"{where} is not complete ({len(listed)} of {manifest.get('planned_shards', '?')} shards): training on the finished ones")
    if manifest.get("masks_meaningful") is False:
        notes.append(f"{where}: masks come from a random-weight teacher; the head will learn nothing meaningful")
    samples = sum(int(e.get("samples", 0)) for e in manifest["shards"]) if len(urls) == len(listed) else None
    return ShardSet(spec, _set_name(spec), urls, layout, manifest, hashlib.sha256(data).hexdigest(), samples, notes)


def layout_from_sample(url: str) -> dict:
    """The feature layout read from the first sample of a shard (for sets without a manifest)."""
    import numpy as np
    import webdataset as wds

    from iosd.featstore import open_feature_group

    try:
        with open_stream(url) as stream:
            for sample in wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])):
                group = open_feature_group(sample[EXT_FEAT])
                meta = group.attrs["iosd_features"]
                layers = [[path, list(group[key].shape)] for path, key in meta["layers"].items()]
                emb = np.load(io.BytesIO(sample[EXT_EMB]), allow_pickle=False)
                return {"layers": layers, "embedding_dim": int(emb.shape[-1])}
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"cannot read the feature layout from the first sample of {url} ({type(err).__name__}: {err})", "check the shard, or point at its directory with dataset.json") from None
    raise UserError(f"{url} holds no sample", "point at shards written by iosd-gen")


def resolve_shards(spec: str) -> ShardSet:
    """The shard set named by ``spec`` (directory, dataset.json, brace pattern or URL)."""
    spec = str(spec).strip()
    if not spec:
        raise UserError("no shard set given", "pass a shard directory, a brace pattern or a URL")
    if "{" in spec or spec.endswith(".tar"):
        return _from_pattern(spec)
    if spec.endswith(MANIFEST_NAME):
        where, base = spec, (posixpath.dirname(spec) if is_url(spec) else os.path.dirname(spec) or ".")
    else:
        where, base = _join(spec, MANIFEST_NAME), spec
    if not is_url(spec):
        if not Path(base).exists():
            raise UserError(f"shard set {base} does not exist", "run iosd-gen first or check the path")
        if not Path(where).exists():
            raise UserError(f"{base} has no {MANIFEST_NAME}", "point at a directory written by iosd-gen, or at its tars with a brace pattern")
        data = Path(where).read_bytes()
    else:
        try:
            data = read_bytes(where)
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"cannot fetch {where} ({type(err).__name__}: {err})", "check the URL and that the server is reachable") from None
    shard_set = _from_manifest(spec, base, data, where)
    if not shard_set.urls:
        raise UserError(f"shard set {spec} lists no finished shard", "wait for iosd-gen to write one, or rerun it")
    return shard_set


def _from_pattern(spec: str) -> ShardSet:
    urls = list(braceexpand.braceexpand(spec))
    if not is_url(spec):
        missing = [u for u in urls if not Path(u).exists()]
        if len(missing) == len(urls):
            raise UserError(f"no shard matches {spec}", "check the pattern (e.g. dir/shard-{000000..000009}.tar)")
        if missing:
            raise UserError(f"{len(missing)} of {len(urls)} shards of {spec} are missing (first: {missing[0]})", "fix the pattern's range")
    base = posixpath.dirname(urls[0]) if is_url(spec) else os.path.dirname(urls[0]) or "."
    manifest_url = _join(base, MANIFEST_NAME)
    data = _read_if_present(manifest_url)
    if data is not None:
        return _from_manifest(spec, base, data, manifest_url, urls=urls)
    return ShardSet(spec, _set_name(spec), urls, layout_from_sample(urls[0]), notes=[f"no {MANIFEST_NAME} next to {spec}: layout read from the first sample"])

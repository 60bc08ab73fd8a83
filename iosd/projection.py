"""Head-aligned projection of stored features (``iosd-gen --project K``): per resolution group,
a PCA basis fitted once on a calibration stream, so a shard stores K channels per group
instead of every layer's.

Both heads begin with a linear 1x1 map over each group's concatenated channels, so storing
``basis^T (x - mean)`` keeps what that map can see of the group's top-K span and loses the
rest. The basis is the exact covariance eigenbasis (float64 sums of x and x x^T over every
pixel of the first M candidates, then ``torch.linalg.eigh``): cheap in memory (C x C per
group), exact, and deterministic (each eigenvector's largest entry is made positive).

It lives beside ``dataset.json`` as ``projection.safetensors`` (tensors ``<group>.mean`` (C,)
and ``<group>.basis`` (C, K), float32; the group's layers and the raw layout as JSON
metadata), its sha256 and K in the manifest's ``features.projection``; checkpoints carry a
copy so ``iosd-eval`` and ``iosd-predict`` project raw UNet features before the head.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from iosd.errors import UserError
from iosd.layers import group_by_resolution, layer_key
from iosd.manifest import write_bytes_atomic

PROJECTION_NAME = "projection.safetensors"
FORMAT = "iosd-projection"
_META_KEY = "iosd_projection"


def group_name(side: int) -> str:
    """Name of a projected group's array: dot-free, a valid layer path and zarr key."""
    return f"pca{side}"


def raw_groups(raw_layers: list) -> list[tuple[int, list[tuple[str, tuple[int, ...]]]]]:
    """(side, [(path, (C, H, W)), ...]) per resolution group, lowest first (the heads' grouping)."""
    shapes = {str(p): tuple(int(v) for v in s) for p, s in raw_layers}
    return [(shapes[paths[0]][-1], [(p, shapes[p]) for p in paths]) for paths in group_by_resolution(shapes)]


def check_k(k: int, raw_layers: list) -> None:
    """Refuse a K the layout cannot give: not positive, or more than a group's channels."""
    if k < 1:
        raise UserError(f"--project {k} is not a positive number of channels", "pass e.g. --project 64, or leave it out to store every layer")
    for side, layers in raw_groups(raw_layers):
        channels = sum(s[0] for _, s in layers)
        if k > channels:
            raise UserError(f"--project {k} is more than the {channels} channels of the {side}x{side} group", f"pass --project {channels} or less")


def projected_layers(k: int, raw_layers: list) -> list[dict]:
    """The stored layout of a projected set: one (K, side, side) array per group (manifest entries)."""
    return [{"path": group_name(side), "key": layer_key(group_name(side)), "shape": [k, side, side]} for side, _ in raw_groups(raw_layers)]


@dataclass
class Projection:
    """Mean and basis per resolution group; ``raw_layers`` the UNet layout it takes, in capture order."""

    k: int
    raw_layers: list[list]  # [[path, [C, H, W]], ...]
    means: dict[str, torch.Tensor]  # group name -> (C,)
    bases: dict[str, torch.Tensor]  # group name -> (C, K)

    @property
    def groups(self) -> list[tuple[str, list[str]]]:
        return [(group_name(side), [p for p, _ in layers]) for side, layers in raw_groups(self.raw_layers)]

    def stored_layers(self) -> list[list]:
        """The layout the head is built on: [[group, [K, side, side]], ...]."""
        return [[e["path"], e["shape"]] for e in projected_layers(self.k, self.raw_layers)]

    def raw_layout(self, embedding_dim: int) -> dict:
        """The feature layout of the raw UNet features this projection takes."""
        return {"layers": [[p, list(s)] for p, s in self.raw_layers], "embedding_dim": int(embedding_dim)}

    def apply(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Raw features {path: (B, C, H, W)} -> projected {group: (B, K, H, W)}, float32."""
        out = {}
        for name, paths in self.groups:
            x = torch.cat([features[p].float() for p in paths], dim=1)
            mean, basis = self.means[name].to(x.device), self.bases[name].to(x.device)
            out[name] = torch.einsum("bchw,ck->bkhw", x - mean[None, :, None, None], basis).contiguous()
        return out

    def apply_numpy(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One sample's raw features {path: (C, H, W)} -> {group: (K, H, W)} float32."""
        batch = {p: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None] for p, a in features.items()}
        return {name: t[0].numpy() for name, t in self.apply(batch).items()}

    # -- the file -------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        meta = {"format": FORMAT, "k": self.k, "raw_layers": self.raw_layers, "groups": [{"name": n, "layers": p} for n, p in self.groups]}
        tensors = {}
        for name, _ in self.groups:
            tensors[f"{name}.mean"] = self.means[name].float().contiguous()
            tensors[f"{name}.basis"] = self.bases[name].float().contiguous()
        return save_safetensors(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)})

    def save(self, path: str | Path) -> str:
        """Write atomically (temp name, fsync, rename; the umask's mode); returns its sha256."""
        import hashlib

        data = self.to_bytes()
        write_bytes_atomic(path, data)
        return hashlib.sha256(data).hexdigest()

    def record(self, sha256: str, calibration: int) -> dict:
        """The manifest's ``features.projection``."""
        return {"k": self.k, "file": PROJECTION_NAME, "sha256": sha256, "calibration_samples": calibration, "groups": [{"path": n, "layers": p} for n, p in self.groups], "raw_layers": self.raw_layers}


REGENERATE = "restore it, or regenerate the shard set with iosd-gen --project K --overwrite"


def from_bytes(data: bytes, where: str, expect: dict | None = None, fix: str = REGENERATE) -> Projection:
    """A projection from its file's bytes, checked: readable, every group's mean (C,) and
    basis (C, K) present, and (``expect``: a manifest record) the sha256, K and raw layout
    the record states. Anything else is a one-line UserError naming ``where``."""
    import hashlib

    if expect is not None and expect.get("sha256") and hashlib.sha256(data).hexdigest() != expect["sha256"]:
        raise UserError(f"projection basis {where} does not match the sha256 its manifest records", fix)
    try:
        tensors = load_safetensors(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"][_META_KEY])
        k, raw_layers = int(meta["k"]), [[str(p), [int(v) for v in s]] for p, s in meta["raw_layers"]]
    except (SafetensorError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"projection basis {where} is not a readable iosd projection ({type(err).__name__}: {err})", fix) from None
    if meta.get("format") != FORMAT:
        raise UserError(f"projection basis {where} is not an iosd projection", fix)
    if expect is not None and (int(expect.get("k", k)) != k or [[p, list(s)] for p, s in expect.get("raw_layers", raw_layers)] != raw_layers):
        raise UserError(f"projection basis {where} is for K={k} over other layers than its manifest states (K={expect.get('k')})", fix)
    means, bases = {}, {}
    for side, layers in raw_groups(raw_layers):
        name, channels = group_name(side), sum(s[0] for _, s in layers)
        mean, basis = tensors.get(f"{name}.mean"), tensors.get(f"{name}.basis")
        if mean is None or basis is None:
            raise UserError(f"projection basis {where} lacks the {side}x{side} group ({name}.mean / {name}.basis)", fix)
        if tuple(mean.shape) != (channels,) or tuple(basis.shape) != (channels, k):
            raise UserError(f"projection basis {where}: group {name} is mean {list(mean.shape)}, basis {list(basis.shape)}; K={k} over {channels} channels needs [{channels}] and [{channels}, {k}]", fix)
        if not (torch.isfinite(mean).all() and torch.isfinite(basis).all()):
            raise UserError(f"projection basis {where}: group {name} holds NaN or infinite values", fix)
        means[name], bases[name] = mean.float(), basis.float()
    return Projection(k, raw_layers, means, bases)


def load(path: str | Path, expect: dict | None = None, fix: str = REGENERATE) -> Projection:
    """The projection in a file (see ``from_bytes``); a missing file is a UserError too."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"projection basis {path} is missing", fix)
    return from_bytes(path.read_bytes(), str(path), expect, fix)


def manifest_record(manifest: dict | None) -> dict | None:
    """The ``features.projection`` record of a manifest, or None for raw features."""
    return ((manifest or {}).get("features") or {}).get("projection")


def for_shard_set(shard_set) -> Projection | None:
    """The basis a projected shard set (``iosd.train.shards.ShardSet``) was stored with, read
    from beside its shards (local directory or URL), or None when it stores raw features."""
    import posixpath

    from iosd.train.shards import is_url, read_bytes

    record = manifest_record(shard_set.manifest)
    if record is None:
        return None
    first = shard_set.urls[0] if shard_set.urls else os.path.join(shard_set.spec, "x")
    where = posixpath.join(posixpath.dirname(first), record["file"]) if is_url(first) else os.path.join(os.path.dirname(first), record["file"])
    if not is_url(where):
        return load(where, record)
    try:
        data = read_bytes(where)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"projection basis {where} is missing ({type(err).__name__}: {err})", REGENERATE) from None
    return from_bytes(data, where, record)


class CovarianceFit:
    """Float64 sums of x and x x^T per resolution group over every pixel seen: the exact PCA
    of the calibration stream, whatever order its batches come in (up to float64 rounding)."""

    def __init__(self, raw_layers: list) -> None:
        self.raw_layers = [[str(p), [int(v) for v in s]] for p, s in raw_layers]
        self.groups = [(group_name(side), [p for p, _ in layers]) for side, layers in raw_groups(self.raw_layers)]
        self.sums: dict[str, torch.Tensor] = {}
        self.grams: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def add(self, features: dict[str, torch.Tensor]) -> None:
        """One batch of raw features {path: (B, C, H, W)}."""
        for name, paths in self.groups:
            x = torch.cat([features[p].detach().to("cpu", torch.float64) for p in paths], dim=1)
            rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            if name not in self.sums:
                self.sums[name] = torch.zeros(rows.shape[1], dtype=torch.float64)
                self.grams[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64)
                self.count[name] = 0
            self.sums[name] += rows.sum(0)
            self.grams[name] += rows.T @ rows
            self.count[name] += rows.shape[0]

    def fit(self, k: int) -> Projection:
        """Mean and top-``k`` principal directions per group (largest variance first)."""
        check_k(k, self.raw_layers)
        if not self.count:
            raise UserError("the projection's calibration stream produced no features", "pass --calibration-samples 1 or more")
        means, bases = {}, {}
        for name, _ in self.groups:
            n = self.count[name]
            mean = self.sums[name] / n
            cov = self.grams[name] / n - torch.outer(mean, mean)
            cov = (cov + cov.T) / 2
            if not torch.isfinite(cov).all():
                raise UserError(f"the calibration features of group {name} hold NaN or infinite values", "check the model (a float16 overflow?) or store raw features")
            _, vectors = torch.linalg.eigh(cov)
            top = vectors[:, -k:].flip(1)  # eigh sorts ascending
            pivot = top.abs().argmax(dim=0)
            signs = torch.sign(top[pivot, torch.arange(k)])
            top = top * torch.where(signs == 0, 1.0, signs)
            means[name], bases[name] = mean.float(), top.float().contiguous()
        return Projection(k, self.raw_layers, means, bases)


class ProjectedHead(torch.nn.Module):
    """A head trained on projected features, taking raw UNet features: projects, then runs it."""

    def __init__(self, head: torch.nn.Module, projection: Projection) -> None:
        super().__init__()
        self.head, self.projection = head, projection
        self.config = getattr(head, "config", None)

    def forward(self, features: dict[str, torch.Tensor], queries: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.projection.apply(features), queries, query_mask)

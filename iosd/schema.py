"""The shard contract between stages and machines: member names, sample and manifest layout.

A shard set is a directory with ``dataset.json`` (the manifest) and WebDataset tars
``shard-%06d.tar``. Each sample is a group of tar members ``<key>.<ext>`` where the key
has no dots (WebDataset splits at the first dot):

- ``png``            the image, RGB, lossless
- ``json``           prompt, seed, classes with scores and filter decisions (``SampleMeta``);
                     two-object test prompts add ``group`` (one of ``PAIR_GROUPS``)
- ``masks.npz``      ``masks``: uint8 (K, H, W), one 0/1 mask per *kept* class
- ``emb.npy``        float32 (N, D): the query embedding of every class in ``json`` order
- ``feat.zarr.zip``  UNet features, one array per layer (``iosd.featstore``)
- ``daam.npz``       optional, test shards: ``heat`` float16 (N, h, w) cross-attention maps

Everything is readable with ``tarfile``, ``json``, ``numpy``, ``PIL`` and ``zarr``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from iosd.featstore import decode_features

SCHEMA_VERSION = 1
MANIFEST_NAME = "dataset.json"
SHARD_PREFIX = "shard"
SHARD_GLOB = f"{SHARD_PREFIX}-*.tar"

EXT_IMAGE = "png"
EXT_META = "json"
EXT_MASKS = "masks.npz"
EXT_EMB = "emb.npy"
EXT_FEAT = "feat.zarr.zip"
EXT_DAAM = "daam.npz"
REQUIRED_EXTS = (EXT_IMAGE, EXT_META, EXT_MASKS, EXT_EMB, EXT_FEAT)

# filter decisions recorded per class
KEPT = "kept"
EMPTY_MASK = "empty_mask"
LOW_SCORE = "low_score"
NOT_TARGET = "not_target"  # shown in the prompt but never supervised (IOSD's negative class)
DECISIONS = (KEPT, EMPTY_MASK, LOW_SCORE, NOT_TARGET)

# two-object test prompts, grouped as GD's Table 1: which subsets the two classes come from
PAIR_GROUPS = ("seen+seen", "seen+unseen", "unseen+unseen")


def shard_name(index: int) -> str:
    return f"{SHARD_PREFIX}-{index:06d}.tar"


def sample_key(shard: int, attempt: int) -> str:
    """Globally unique, dot-free key: shard index and candidate number within it."""
    return f"{shard:06d}_{attempt:05d}"


@dataclass
class ClassRecord:
    """One class of a sample's prompt with the teacher's verdict."""

    name: str
    subset: str  # "seen" or "unseen" in the shard set's split
    score: float  # best teacher score for that label (1.0 for exact masks)
    mask_pixels: int
    decision: str  # one of DECISIONS
    mask_index: int | None  # row in masks.npz when kept

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Sample:
    """One decoded sample; ``features`` is filled only when asked for."""

    key: str
    image: np.ndarray  # (H, W, 3) uint8
    prompt: str
    seed: int
    classes: list[ClassRecord]
    masks: np.ndarray  # (K, H, W) uint8, K = number of kept classes
    embeddings: np.ndarray  # (N, D) float32, N = len(classes)
    features: dict[str, np.ndarray] = field(default_factory=dict)
    daam: np.ndarray | None = None  # (N, h, w)
    extra: dict = field(default_factory=dict)

    def targets(self, min_score: float = 0.0) -> list[tuple[int, np.ndarray]]:
        """(class index, mask) for every kept class scoring at least ``min_score``."""
        return [
            (i, self.masks[c.mask_index])
            for i, c in enumerate(self.classes)
            if c.decision == KEPT and c.mask_index is not None and c.score >= min_score
        ]


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_sample(sample: Sample, feat_bytes: bytes) -> dict[str, bytes | str]:
    """WebDataset dict (``__key__`` plus one bytes value per member) of one sample."""
    meta = {"key": sample.key, "prompt": sample.prompt, "seed": sample.seed, "classes": [c.to_json() for c in sample.classes], **sample.extra}
    members: dict[str, bytes | str] = {
        "__key__": sample.key,
        EXT_IMAGE: encode_png(sample.image),
        EXT_META: json.dumps(meta, sort_keys=True).encode(),
        EXT_MASKS: _npz(masks=sample.masks.astype(np.uint8)),
        EXT_EMB: _npy(sample.embeddings.astype(np.float32)),
        EXT_FEAT: feat_bytes,
    }
    if sample.daam is not None:
        members[EXT_DAAM] = _npz(heat=sample.daam.astype(np.float16))
    return members


def decode_sample(members: dict[str, bytes], features: bool | list[str] = True) -> Sample:
    """A sample from its members (ext -> bytes); ``features`` False skips the zarr decode."""
    meta = json.loads(members[EXT_META])
    with np.load(io.BytesIO(members[EXT_MASKS]), allow_pickle=False) as z:
        masks = z["masks"]
    daam = None
    if EXT_DAAM in members:
        with np.load(io.BytesIO(members[EXT_DAAM]), allow_pickle=False) as z:
            daam = z["heat"]
    feats: dict[str, np.ndarray] = {}
    if features:
        feats = decode_features(members[EXT_FEAT], None if features is True else list(features))
    classes = [ClassRecord(**c) for c in meta.pop("classes")]
    return Sample(
        key=meta.pop("key"),
        image=np.asarray(Image.open(io.BytesIO(members[EXT_IMAGE])).convert("RGB")),
        prompt=meta.pop("prompt"),
        seed=meta.pop("seed"),
        classes=classes,
        masks=masks,
        embeddings=np.load(io.BytesIO(members[EXT_EMB]), allow_pickle=False),
        features=feats,
        daam=daam,
        extra=meta,
    )


def iter_tar_samples(path: str, features: bool | list[str] = True):
    """Samples of one shard with nothing but ``tarfile`` (members grouped by key); a URL
    (s3://, gs://, ...) is streamed through fsspec."""
    import contextlib
    import tarfile

    from iosd.store import is_remote

    current: str | None = None
    members: dict[str, bytes] = {}
    with contextlib.ExitStack() as stack:
        if is_remote(path):
            import fsspec

            tar = stack.enter_context(tarfile.open(fileobj=stack.enter_context(fsspec.open(path, "rb")), mode="r|"))
        else:
            tar = stack.enter_context(tarfile.open(path, "r"))
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            if current is not None and key != current:
                yield decode_sample(members, features)
                members = {}
            current = key
            members[ext] = tar.extractfile(info).read()
    if members:
        yield decode_sample(members, features)

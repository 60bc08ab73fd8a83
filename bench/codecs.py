"""Feature codecs measured on real captured activations: compression ratio and encode/decode speed.

Reads the ``feat.zarr.zip`` members of a shard set (default: generates a small tiny-model
shapes set) and re-encodes every sample with each codec of ``iosd.featstore.CODECS``.
Run: ``python bench/codecs.py [SHARD_DIR]``.
"""

from __future__ import annotations

import sys
import tempfile
import time

from iosd.featstore import CODECS, encode_features
from iosd.manifest import read_manifest
from iosd.schema import iter_tar_samples


def main() -> None:
    tmp = None
    if len(sys.argv) > 1:
        shard_dir = sys.argv[1]
    else:
        from iosd.pipeline.generate import GenConfig, generate

        tmp = tempfile.TemporaryDirectory()
        shard_dir = f"{tmp.name}/set"
        generate(GenConfig(classes="shapes", source="shapes", model="tiny", num_samples=16, shard_size=16, out=shard_dir, quiet=True))
    manifest = read_manifest(shard_dir)
    samples = [s.features for shard in manifest["shards"] for s in iter_tar_samples(f"{shard_dir}/{shard['name']}")]
    raw = sum(x.size * 2 for feats in samples for x in feats.values())
    print(f"{len(samples)} samples, raw float16 {raw / len(samples) / 1e3:.1f} kB/sample")
    for dtype in ("float16", "int8"):
        for codec in CODECS:
            t0 = time.perf_counter()
            sizes = [len(encode_features(f, dtype, codec)) for f in samples]
            dt = time.perf_counter() - t0
            print(f"{dtype:8s} {codec:11s} ratio vs raw fp16 {raw / sum(sizes):5.2f}  encode {len(samples) / dt:7.1f} samples/s")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()

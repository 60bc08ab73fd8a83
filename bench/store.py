"""Writing a shard set to an object store against writing it to local disk, in one run.

The same samples (random bytes in the members of a real sample: a ``feat.zarr.zip`` of
``--sample-mb`` MB, a PNG-sized image, masks, embeddings, JSON) go through iosd-gen's own
shard writer (``ShardSetWriter``: tar, sha256 as it streams, per-shard record, manifest)
into a local directory (temp file, fsync, rename) and into ``s3://`` on a local S3 API
server (moto in server mode, its own process on 127.0.0.1: spool file, whole-object
upload, record object, manifest object), with ``--writers`` threads each writing its own
shard as iosd-gen does. Prints one JSON line per target (samples/s, MB/s, seconds) and a
``ratio`` line: s3 samples/s over local samples/s.

The local server runs on the same cores as the writer: it is a lower bound for a real
store, whose network rather than CPU would bound the upload.

Run: ``python bench/store.py [--samples 64] [--shard-size 8] [--sample-mb 4] [--writers 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server() -> tuple[subprocess.Popen, str]:
    """moto's S3 API server in its own process; returns it and its endpoint once it answers."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def samples(shard: int, count: int, sample_mb: float, seed: int = 0) -> list[dict]:
    """One shard's samples: random bytes in the members of a real sample."""
    import numpy as np

    rng = np.random.default_rng([seed, shard])
    feat = int(sample_mb * (1 << 20))
    return [
        {
            "__key__": f"s{shard:06d}a{i:04d}",
            "png": rng.bytes(40_000),
            "json": json.dumps({"prompt": "a photograph of a star", "seed": i}).encode(),
            "masks.npz": rng.bytes(4_000),
            "emb.npy": rng.bytes(8_320),
            "feat.zarr.zip": rng.bytes(feat),
        }
        for i in range(count)
    ]


def write_set(out: str, shards: list[list[dict]], writers: int) -> float:
    """Seconds to write the whole set with iosd-gen's writer (``writers`` shards at a time)."""
    from iosd.pipeline.writer import ShardSetWriter

    header = {"kind": "iosd-shards", "identity": {"bench": "store"}, "features": {"layers": []}}
    writer = ShardSetWriter(out, header, len(shards), overwrite=True)
    t0 = time.perf_counter()
    writer.prepare()

    def one(index: int) -> None:
        stats = {"written": len(shards[index]), "feature_bytes": sum(len(s["feat.zarr.zip"]) for s in shards[index])}
        writer.write_shard(index, iter(shards[index]), stats)

    with ThreadPoolExecutor(writers) as pool:
        list(pool.map(one, range(len(shards))))
    manifest = writer.write_manifest()
    seconds = time.perf_counter() - t0
    assert manifest["complete"], manifest
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--sample-mb", type=float, default=4.0, help="feature bytes per sample (fast recipe fp8 at 512 px: ~3.5 MB)")
    parser.add_argument("--writers", type=int, default=2, help="shards written at once (iosd-gen: one per --workers)")
    args = parser.parse_args()

    n_shards = -(-args.samples // args.shard_size)
    shards = [samples(i, min(args.shard_size, args.samples - i * args.shard_size), args.sample_mb) for i in range(n_shards)]
    total_mb = sum(len(v) for shard in shards for s in shard for v in s.values() if isinstance(v, bytes)) / (1 << 20)
    proc, endpoint = start_server()
    try:
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        import fsspec

        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("bench")
        rates = {}
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["IOSD_SPOOL_DIR"] = str(Path(tmp))
            for target, out in (("local", str(Path(tmp) / "set")), ("s3", "s3://bench/set")):
                seconds = write_set(out, shards, args.writers)
                rates[target] = args.samples / seconds
                print(json.dumps({"target": target, "samples": args.samples, "shards": n_shards, "mb": round(total_mb, 1), "seconds": round(seconds, 3),
                                  "samples_per_s": round(rates[target], 1), "mb_per_s": round(total_mb / seconds, 1), "writers": args.writers}))
        print(json.dumps({"ratio": round(rates["s3"] / rates["local"], 3), "of": "s3 (local moto server) / local disk samples/s"}))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()

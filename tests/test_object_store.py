"""Shard sets in an object store: iosd-gen writes s3:// through a real S3 API server (moto in
server mode on 127.0.0.1, through s3fs), iosd-train and iosd-eval read it, and an unreachable
endpoint or a server stopped mid-upload ends in one line with a rerun completing the set."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import uuid

import pytest
from click.testing import CliRunner

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from iosd.pipeline.cli import main as gen_main  # noqa: E402
from iosd.train.cli import main as train_main  # noqa: E402

GEN = ["--classes", "shapes", "--source", "shapes", "--model", "tiny", "--resolution", "64", "--num-samples", "6", "--shard-size", "2", "--batch-size", "2", "--workers", "1", "--quiet"]
TRAIN = ["--batch-size", "2", "--workers", "0", "--quiet", "--no-tensorboard", "--head-option", "d_model=32", "--head-option", "ffn=64", "--head-option", "visual_channels=[16,16,16]"]


def _start(port: int = 0):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server


@pytest.fixture(scope="session")
def s3_server():
    """One S3 API server for the session (moto keeps its buckets in this process)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = _start()
    yield server
    server.stop()


def _use(monkeypatch, port: int, attempts: int = 2) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(attempts))  # a refused connection fails at once


def _fs():
    import fsspec

    return fsspec.filesystem("s3", skip_instance_cache=True)


@pytest.fixture
def bucket(s3_server, monkeypatch, tmp_path):
    """A new bucket on the session's server, the AWS_* environment pointing at it, a private spool."""
    _use(monkeypatch, s3_server.get_host_and_port()[1])
    monkeypatch.setenv("IOSD_SPOOL_DIR", str(tmp_path))
    name = f"b{uuid.uuid4().hex[:12]}"
    _fs().mkdir(name)
    return name


def _objects(bucket: str, prefix: str) -> dict[str, dict]:
    return {e["name"].split(f"{prefix}/", 1)[1]: e for e in _fs().find(f"{bucket}/{prefix}", detail=True).values()}


def _check_set(bucket: str, prefix: str) -> dict:
    """dataset.json's sha256s hold for the objects, and only final names are visible."""
    fs = _fs()
    manifest = json.loads(fs.cat_file(f"{bucket}/{prefix}/dataset.json"))
    for shard in manifest["shards"]:
        data = fs.cat_file(f"{bucket}/{prefix}/{shard['name']}")
        assert len(data) == shard["bytes"] and hashlib.sha256(data).hexdigest() == shard["sha256"], shard["name"]
    names = set(_objects(bucket, prefix))
    assert all(not n.split("/")[-1].startswith(".") or n.startswith(".parts/") for n in names), names  # no temp or probe object
    return manifest


@pytest.fixture(scope="module")
def generated(s3_server, tmp_path_factory):
    """A set iosd-gen wrote to s3:// (made once)."""
    root = tmp_path_factory.mktemp("s3")
    with pytest.MonkeyPatch.context() as mp:
        _use(mp, s3_server.get_host_and_port()[1])
        mp.setenv("IOSD_SPOOL_DIR", str(root))
        bucket = f"b{uuid.uuid4().hex[:12]}"
        _fs().mkdir(bucket)
        url = f"s3://{bucket}/set"
        result = CliRunner().invoke(gen_main, [*GEN, "--out", url])
        assert result.exit_code == 0, result.output
        assert list(root.iterdir()) == [], "spool files are removed once uploaded"
    return {"bucket": bucket, "url": url, "root": root}


@pytest.fixture(scope="module")
def trained(s3_server, generated):
    """generated's set and a head iosd-train trained from it (made once)."""
    url, root = generated["url"], generated["root"]
    with pytest.MonkeyPatch.context() as mp:
        _use(mp, s3_server.get_host_and_port()[1])
        mp.setenv("IOSD_SPOOL_DIR", str(root))
        trained = CliRunner().invoke(train_main, [url, "--steps", "2", "--out", str(root / "run"), *TRAIN])
        assert trained.exit_code == 0, trained.output
    return {"bucket": generated["bucket"], "url": url, "run": root / "run"}


def test_gen_writes_a_set_whose_sha256s_hold_and_a_rerun_resumes(trained, bucket):
    b, url = trained["bucket"], trained["url"]
    manifest = _check_set(b, "set")
    assert manifest["complete"] and len(manifest["shards"]) == 3
    index = json.loads(_fs().cat_file(f"{b}/set/wids-index.json"))
    assert [s["url"] for s in index["shardlist"]] == [s["name"] for s in manifest["shards"]] and index["name"] == "set"
    before = {n: e["ETag"] for n, e in _objects(b, "set").items() if n.endswith(".tar")}
    again = CliRunner().invoke(gen_main, [*GEN, "--out", url])  # resumes by listing records: nothing to redo
    assert again.exit_code == 0 and json.loads(again.output.strip().splitlines()[-1])["complete"], again.output
    assert {n: e["ETag"] for n, e in _objects(b, "set").items() if n.endswith(".tar")} == before
    other = CliRunner().invoke(gen_main, [*GEN, "--seed", "1", "--out", url])
    assert other.exit_code == 2 and "different config" in other.output, other.output


def test_eval_builds_and_scores_test_shards_in_s3(trained, bucket, tmp_path):
    from iosd.evaluate.cli import main as eval_main

    b, url = trained["bucket"], trained["url"]
    report = tmp_path / "report"
    scored = CliRunner().invoke(eval_main, ["--checkpoint", str(trained["run"]), "--test-shards", f"{url}-test", "--images-per-class", "1", "--report", str(report), "--quiet"])
    assert scored.exit_code == 0, scored.output
    test_manifest = _check_set(b, "set-test")  # built in the bucket, beside the training set
    provenance = json.loads((report / "report.json").read_text())["provenance"]["test_shards"]
    assert provenance["dir"] == f"{url}-test" and provenance["images"] == test_manifest["counts"]["written"]
    assert provenance["manifest_sha256"] == hashlib.sha256(_fs().cat_file(f"{b}/set-test/dataset.json")).hexdigest()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_endpoint_or_missing_bucket_is_one_line(monkeypatch, tmp_path):
    _use(monkeypatch, _closed_port(), attempts=1)
    result = CliRunner().invoke(gen_main, [*GEN, "--out", "s3://nowhere/set"])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "cannot reach the object store" in result.output and "s3://nowhere/set" in result.output and "rerun the same command" in result.output
    trained = CliRunner().invoke(train_main, ["s3://nowhere/set", "--steps", "1", "--out", str(tmp_path / "run"), *TRAIN])
    assert trained.exit_code == 2 and "Traceback" not in trained.output and len(trained.output.strip().splitlines()) == 1, trained.output


def test_missing_bucket_is_one_line(s3_server, monkeypatch):
    _use(monkeypatch, s3_server.get_host_and_port()[1])
    result = CliRunner().invoke(gen_main, [*GEN, "--out", f"s3://no-such-{uuid.uuid4().hex[:8]}/set"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "bucket" in result.output and "does not exist" in result.output


def test_server_stopped_mid_upload_leaves_no_partial_shard_and_a_rerun_completes(s3_server, monkeypatch, tmp_path):
    """The server stops while the second shard uploads: one line, no partial object, an empty
    spool, the first shard kept; the server back, the same command completes the set."""
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = _start()
    port = server.get_host_and_port()[1]
    _use(monkeypatch, port, attempts=1)
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setenv("IOSD_SPOOL_DIR", str(spool))
    bucket = f"b{uuid.uuid4().hex[:12]}"
    _fs().mkdir(bucket)
    real = s3fs.S3FileSystem._put_file
    uploads = []

    async def stop_on_second(self, lpath, rpath, *args, **kwargs):
        uploads.append(rpath)
        if len(uploads) == 2:
            server.stop()  # the object store goes away as the second shard starts uploading
        return await real(self, lpath, rpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", stop_on_second)
    url = f"s3://{bucket}/set"
    try:
        result = CliRunner().invoke(gen_main, [*GEN, "--out", url])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert "cannot reach the object store" in result.output and "shard-00000" in result.output and "rerun the same command to resume" in result.output
        assert list(spool.iterdir()) == [], "spool files are removed"
        server = _start(port)  # the store is back (moto keeps its buckets in this process)
        names = set(_objects(bucket, "set"))
        assert "shard-000000.tar" in names and "shard-000001.tar" not in names, names
        kept = _objects(bucket, "set")["shard-000000.tar"]["ETag"]
        monkeypatch.setattr(s3fs.S3FileSystem, "_put_file", real)
        uploads.clear()
        again = CliRunner().invoke(gen_main, [*GEN, "--out", url])
        assert again.exit_code == 0, again.output
        assert json.loads(again.output.strip().splitlines()[-1])["complete"] is True
        assert _check_set(bucket, "set")["complete"]
        assert _objects(bucket, "set")["shard-000000.tar"]["ETag"] == kept
    finally:
        server.stop()


def test_store_faults_are_classified_by_class(monkeypatch):
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    from iosd.errors import remote_error

    cases = [
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), "cannot reach the object store to write s3://b/s/x"),
        (NoCredentialsError(), "no credentials to write s3://b/s/x"),
        (PermissionError("Access Denied"), "access denied to write s3://b/s/x"),
        (FileNotFoundError("The specified bucket does not exist"), "the bucket of s3://b/s/x does not exist"),
    ]
    for err, line in cases:
        found = remote_error(err, "s3://b/s/x", "write")
        assert found is not None and line in found.line() and "rerun the same command" in found.line(), (err, found)
    assert remote_error(ValueError("x"), "s3://b/s/x") is None


def test_synth_writes_its_export_to_s3_and_a_rerun_resumes(trained, bucket, tmp_path, monkeypatch):
    """iosd-synth --out s3://...: built in a staging directory, uploaded whole (synth.json last);
    its shards are a set iosd-train reads from the bucket, and a rerun on another machine (a
    new staging directory) resumes from the bucket's records and uploads no shard again."""
    from iosd.pipeline.synth_cli import main as synth_main

    run = trained["run"]
    url = f"s3://{bucket}/synth"
    args = ["--checkpoint", str(run), "--out", url, "--quiet", "--classes", "disc,star", "--images-per-class", "2", "--format", "shards"]
    result = CliRunner().invoke(synth_main, args)
    assert result.exit_code == 0, result.output
    manifest = _check_set(bucket, "synth")
    report = json.loads(_fs().cat_file(f"{bucket}/synth/synth.json"))
    assert report["complete"] and sum(s["samples"] for s in manifest["shards"]) == sum(im["kept"] for im in report["images"])
    tars = {n: e["ETag"] for n, e in _objects(bucket, "synth").items() if n.endswith(".tar")}
    monkeypatch.setenv("IOSD_SPOOL_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    again = CliRunner().invoke(synth_main, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.output.strip().splitlines()[-1])["images"] == len(report["images"])
    assert {n: e["ETag"] for n, e in _objects(bucket, "synth").items() if n.endswith(".tar")} == tars
    assert json.loads(_fs().cat_file(f"{bucket}/synth/synth.json"))["images"] == report["images"]
    trained = CliRunner().invoke(train_main, [url, "--steps", "1", "--out", str(tmp_path / "run2"), *TRAIN])
    assert trained.exit_code == 0, trained.output


def test_independent_tasks_write_one_set_to_s3_and_merge_assembles_it(bucket):
    """Two --task runs into one URL: the first leaves the set incomplete (merge names what is
    missing), the second completes it; with the assembly lost (the last task killed before it),
    merge rebuilds the same dataset.json from the records."""
    from iosd.pipeline.shards_cli import main as shards_main

    url = f"s3://{bucket}/tasks"
    first = CliRunner().invoke(gen_main, [*GEN, "--task", "0/2", "--out", url])
    assert first.exit_code == 0, first.output
    partial = _fs().cat_file(f"{bucket}/tasks/dataset.json")  # the header and task 0's shards
    early = CliRunner().invoke(shards_main, ["merge", url])
    assert early.exit_code == 2 and "incomplete" in early.output and len(early.output.strip().splitlines()) == 1, early.output
    second = CliRunner().invoke(gen_main, [*GEN, "--task", "1/2", "--out", url])
    assert second.exit_code == 0, second.output
    manifest = _check_set(bucket, "tasks")
    assert manifest["complete"] and len(manifest["shards"]) == 3
    _fs().pipe_file(f"{bucket}/tasks/dataset.json", partial)  # as if the last task died before assembling
    merged = CliRunner().invoke(shards_main, ["merge", url])
    assert merged.exit_code == 0 and json.loads(merged.output)["complete"], merged.output
    assert _check_set(bucket, "tasks")["shards"] == manifest["shards"]


# -- iosd-shards verify/info/show on a URL ---------------------------------------------------
def _shards(*args: str):
    from iosd.pipeline.shards_cli import main as shards_main

    return CliRunner().invoke(shards_main, [str(a) for a in args])


def _problems(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.split(" ", 1)[0] in {"MISSING", "CORRUPT", "EXTRA", "INCOMPLETE", "MANIFEST"}]


def test_shards_verify_info_show_read_a_set_in_s3_as_on_disk(generated, bucket, tmp_path, monkeypatch):
    """verify passes iosd-gen's set at its URL; info's JSON is the downloaded copy's (the
    location aside), --scan included; show writes its PNG locally (--out, else ./NAME-preview.png).
    (``bucket``: the AWS_* environment pointing at the server.)"""
    from PIL import Image

    b, url = generated["bucket"], generated["url"]
    checked = _shards("verify", url, "--quiet")
    assert checked.exit_code == 0 and "OK" in checked.output and "6 samples decoded" in checked.output, checked.output
    local = tmp_path / "copy"
    _fs().get(f"{b}/set/", str(local), recursive=True)
    for extra in ([], ["--scan"]):
        remote = _shards("info", url, "--json", *extra)
        here = _shards("info", local, "--json", *extra)
        assert remote.exit_code == 0 and here.exit_code == 0, (remote.output, here.output)
        remote_info, local_info = json.loads(remote.output), json.loads(here.output)
        assert remote_info.pop("directory") == url and local_info.pop("directory") == str(local)
        assert remote_info == local_info and (remote_info["shards"], remote_info["samples"]) == (3, 6)
    assert _shards("info", url).exit_code == 0  # the tables
    shown = _shards("show", url, "--n", "3", "--out", tmp_path / "pics" / "three.png")
    assert shown.exit_code == 0, shown.output
    assert Image.open(tmp_path / "pics" / "three.png").size[0] == 3 * 192
    monkeypatch.chdir(tmp_path)
    assert _shards("show", url, "--n", "1").exit_code == 0 and (tmp_path / "set-preview.png").is_file()
    assert not _fs().exists(f"{b}/set/preview.png")


def test_shards_verify_catches_altered_truncated_and_missing_shard_objects(generated, bucket):
    """A copy of the set in another bucket: a flipped byte (same size) fails its sha256, a cut
    object is truncated, a deleted one is missing; show and info --scan name a missing shard's
    URL in one line."""
    fs, src = _fs(), f"{generated['bucket']}/set"
    for key in fs.find(src):
        fs.copy(key, f"{bucket}/copy/{key[len(src) + 1:]}")
    url = f"s3://{bucket}/copy"
    data = bytearray(fs.cat_file(f"{bucket}/copy/shard-000000.tar"))
    data[len(data) // 3] ^= 0x01
    fs.pipe_file(f"{bucket}/copy/shard-000000.tar", bytes(data))
    fs.pipe_file(f"{bucket}/copy/shard-000001.tar", fs.cat_file(f"{bucket}/copy/shard-000001.tar")[:1024])
    fs.rm_file(f"{bucket}/copy/shard-000002.tar")
    result = _shards("verify", url, "--quiet")
    assert result.exit_code == 1, result.output
    lines = _problems(result.output)
    assert len(lines) == 3, result.output
    assert lines[0].startswith("CORRUPT    shard-000000.tar") and "sha256 differs" in lines[0], lines
    assert lines[1].startswith("CORRUPT    shard-000001.tar: truncated: 1024 bytes"), lines
    assert lines[2] == "MISSING    shard-000002.tar: file not found", lines
    assert f"problem(s) in {url};" in result.output and f"--out {url}" in result.output
    fs.rm_file(f"{bucket}/copy/shard-000000.tar")
    for args in (["show", url], ["info", url, "--scan"]):
        failed = _shards(*args)
        assert failed.exit_code == 2 and len(failed.output.strip().splitlines()) == 1, failed.output
        assert f"{url}/shard-000000.tar is missing" in failed.output and f"run iosd-shards verify {url}" in failed.output


def test_shards_commands_on_an_unreachable_or_missing_set_are_one_line(s3_server, monkeypatch, bucket):
    """An unreachable endpoint, a missing bucket, a missing prefix (also in a bucket whose name
    holds "bucket": a missing key is not a missing bucket) end in one line naming the URL."""
    named = f"my-bucket-{uuid.uuid4().hex[:8]}"
    _fs().mkdir(named)
    cases = [
        (_closed_port(), "s3://nowhere/set", "cannot reach the object store"),
        (s3_server.get_host_and_port()[1], f"s3://no-such-{uuid.uuid4().hex[:8]}/set", "does not exist"),
        (s3_server.get_host_and_port()[1], f"s3://{bucket}/nothing-here", "has no dataset.json"),
        (s3_server.get_host_and_port()[1], f"s3://{named}/nothing-here", "has no dataset.json"),
    ]
    for port, url, said in cases:
        _use(monkeypatch, port, attempts=1)
        for command in ("verify", "info", "show"):
            result = _shards(command, url)
            assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, (command, result.output)
            assert said in result.output and url in result.output and "Traceback" not in result.output, (command, result.output)


def test_projected_set_in_s3_stores_its_basis_trains_and_a_rerun_reuses_it(bucket, tmp_path):
    url = f"s3://{bucket}/projected"
    args = [*GEN, "--project", "8", "--calibration-samples", "4", "--out", url]
    result = CliRunner().invoke(gen_main, args)
    assert result.exit_code == 0, result.output
    manifest = _check_set(bucket, "projected")
    record = manifest["features"]["projection"]
    basis = _fs().cat_file(f"{bucket}/projected/{record['file']}")
    assert record["k"] == 8 and hashlib.sha256(basis).hexdigest() == record["sha256"]
    again = CliRunner().invoke(gen_main, args)  # a rerun: the stored basis is reused, not refitted
    assert again.exit_code == 0, again.output
    assert _fs().cat_file(f"{bucket}/projected/{record['file']}") == basis
    run = tmp_path / "run"
    result = CliRunner().invoke(train_main, [url, *TRAIN, "--steps", "2", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "checkpoint.json").read_text())["layout"]


def test_projected_tasks_in_s3_wait_for_task_0s_basis(bucket):
    url = f"s3://{bucket}/tasks"
    args = [*GEN, "--project", "8", "--calibration-samples", "4", "--out", url]
    early = CliRunner().invoke(gen_main, [*args, "--task", "1/2"])
    assert early.exit_code == 2 and len(early.output.strip().splitlines()) == 1 and "start task 0 first (--task 0/2)" in early.output, early.output
    for task in ("0/2", "1/2"):
        result = CliRunner().invoke(gen_main, [*args, "--task", task])
        assert result.exit_code == 0, result.output
    manifest = _check_set(bucket, "tasks")
    assert manifest["complete"] and manifest["features"]["projection"]["k"] == 8

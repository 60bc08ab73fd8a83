"""dataset.json and checkpoint.json fuzzed field by field: a reader either works or ends in one
UserError naming the file, never a KeyError/TypeError/ValueError traceback."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
from click.testing import CliRunner
from conftest import make_shapes_set

from iosd.errors import UserError
from iosd.schema import MANIFEST_NAME
from iosd.train.checkpoint import CHECKPOINT_NAME, load_head, read_checkpoint
from iosd.train.cli import main as train_main
from iosd.train.shards import resolve_shards

QUICK = ["--batch-size", "2", "--workers", "0", "--quiet", "--no-tensorboard", "--head-option", "d_model=32", "--head-option", "ffn=64"]
DELETE = object()


def train(*args) -> object:
    return CliRunner().invoke(train_main, [*map(str, args), *QUICK])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 4-sample set and a 2-step run on it, shared by every case (read-only)."""
    root = tmp_path_factory.mktemp("fuzz")
    make_shapes_set(root / "set", num_samples=4, shard_size=2)
    result = train(root / "set", "--steps", "2", "--out", root / "run")
    assert result.exit_code == 0, result.output
    return root


def paths(obj, prefix=()):
    """Every key path of nested objects; lists are walked at their first item only."""
    items = obj.items() if isinstance(obj, dict) else list(enumerate(obj))[:1] if isinstance(obj, list) else []
    for key, value in items:
        yield (*prefix, key)
        yield from paths(value, (*prefix, key))


def mutations(value):
    """Deleted, null, a value of another type, and an unknown value of the same type."""
    yield "deleted", DELETE
    yield "null", None
    yield "wrong type", 7 if isinstance(value, (str, list, dict)) else "x"
    if isinstance(value, str):
        yield "unknown", "float64"
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield "negative", -3


def mutated(data: dict, path: tuple, new) -> dict:
    out = copy.deepcopy(data)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if new is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return out


def cases(data: dict):
    for path in paths(data):
        value = data
        for key in path:
            value = value[key]
        for label, new in mutations(value):
            yield path, label, mutated(data, path, new)


def works_or_names(read, where: str) -> bool:
    """True when ``read`` worked, False when it refused in one UserError naming ``where``."""
    try:
        read()
    except UserError as err:
        assert where in str(err) and "\n" not in str(err), str(err)
        return False
    return True


def test_every_dataset_json_field_is_read_or_refused_in_one_line(small, tmp_path):
    good = json.loads((small / "set" / MANIFEST_NAME).read_text())
    work = tmp_path / "set"
    shutil.copytree(small / "set", work)
    accepted = []
    for path, label, manifest in cases(good):
        (work / MANIFEST_NAME).write_text(json.dumps(manifest))
        if works_or_names(lambda: resolve_shards(str(work)), MANIFEST_NAME):
            accepted.append((path, label))
    assert (("features", "dtype"), "unknown") not in accepted
    # what the check let through, all deletions at once and all nulls at once, still trains
    for kind, new in (("deleted", DELETE), ("null", None)):
        together = good
        for path, label in accepted:
            if label == kind:
                try:
                    together = mutated(together, path, new)
                except (KeyError, IndexError, TypeError):
                    pass  # under a parent deleted or nulled before
        (work / MANIFEST_NAME).write_text(json.dumps(together))
        result = train(work, "--steps", "1", "--out", tmp_path / f"run-{kind}")
        assert result.exit_code == 0, (kind, result.output)


def test_every_checkpoint_json_field_is_read_or_refused_in_one_line(small, tmp_path):
    good = json.loads((small / "run" / CHECKPOINT_NAME).read_text())
    work = tmp_path / "run"
    shutil.copytree(small / "run", work)
    for path, _label, info in cases(good):
        (work / CHECKPOINT_NAME).write_text(json.dumps(info))
        # the head is built only from these; the rest is read by read_checkpoint's check alone
        load = load_head if path[0] in ("head", "layout", "features", "weights", "format") else read_checkpoint
        works_or_names(lambda load=load: load(work), CHECKPOINT_NAME)


@pytest.mark.parametrize(("path", "value", "message"), [
    (("features", "dtype"), "float64", "features.dtype is 'float64', not one of float16, bfloat16, int8, fp8"),
    (("features", "layers", 0, "shape"), "x", "features.layers[0].shape is 'x', not a list of 3"),
    (("embedding", "dim"), DELETE, "embedding.dim is missing"),
    (("shards",), 7, "shards is 7, not a list"),
])
def test_bad_dataset_json_ends_iosd_train_in_one_line(small, tmp_path, path, value, message):
    work = tmp_path / "set"
    shutil.copytree(small / "set", work)
    (work / MANIFEST_NAME).write_text(json.dumps(mutated(json.loads((small / "set" / MANIFEST_NAME).read_text()), path, value)))
    result = train(work, "--steps", "1", "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert f"{work / MANIFEST_NAME}: {message}" in result.output and "regenerate the set with iosd-gen" in result.output


@pytest.mark.parametrize(("path", "value", "message"), [
    (("head", "kind"), "transformer", "head.kind is 'transformer', not one of"),
    (("head", "d_model"), "x", "head cannot be built"),
    (("train", "data_position", "slots", 0), "x", "train.data_position.slots[0] is 'x'"),
    (("shards",), None, None),  # --resume needs to know the run's shards: refused, still one line
])
def test_bad_checkpoint_json_ends_iosd_train_resume_in_one_line(small, tmp_path, path, value, message):
    run = tmp_path / "run"
    shutil.copytree(small / "run", run)
    (run / CHECKPOINT_NAME).write_text(json.dumps(mutated(json.loads((small / "run" / CHECKPOINT_NAME).read_text()), path, value)))
    result = train(small / "set", "--steps", "3", "--out", run, "--resume")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert message is None or message in result.output

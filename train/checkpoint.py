"""Head checkpoints: safetensors weights and optimizer state plus one JSON, never a pickle.

A run directory holds ``checkpoint.json`` (the latest checkpoint's description, its
``weights`` field naming the step directory) and ``checkpoints/step-NNNNNNN/`` with
``model.safetensors``, ``optimizer.safetensors`` and a copy of the JSON (``weights: "."``),
so a step directory is usable on its own. A step directory is written under a temporary
name and renamed; the run's ``checkpoint.json`` is replaced after it, so a run killed at any
moment still has one complete checkpoint. Optimizer state is flattened into named tensors
(``state.<param>.<name>``) with its scalars and param groups in the JSON metadata.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from iosd import __version__
from iosd.errors import UserError, os_errno
from iosd.manifest import (
    COUNT,
    INT,
    ITEMS,
    NULLABLE,
    OBJECT,
    OPTIONAL,
    POSITIVE,
    REQUIRED,
    TEXT,
    TEXTS,
    Expect,
    Fields,
    check_fields,
    one_of,
    share_like_output,
    write_json_atomic,
)

CHECKPOINT_NAME = "checkpoint.json"
MODEL_NAME = "model.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
STEPS_DIR = "checkpoints"
FORMAT = "iosd-head"
FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


# -- optimizer state <-> tensors + JSON ------------------------------------------------------
def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of an optimizer state dict by name, and everything else as JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entry in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(entry)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's torch RNG states (dropout), so a resumed run draws what it would have."""
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"].to(torch.uint8).cpu())
    cuda = [tensors[k].cpu() for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# -- writing ---------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, head: torch.nn.Module, info: dict, *, optimizer=None, scaler=None, keep: int = 1, projection=None) -> Path:
    """Write step ``info["step"]`` atomically; returns its step directory. ``projection``: the
    basis of projected shards (``iosd.projection``), carried so eval and predict apply it."""
    run_dir = Path(run_dir)
    steps = run_dir / STEPS_DIR
    steps.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(int(info["step"]))
    tmp = steps / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "iosd_version": __version__, **info}
    try:
        weights = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        _save_tensors(weights, tmp / MODEL_NAME, {"format": FORMAT, "step": str(info["step"])})
        share_like_output(tmp / MODEL_NAME)
        if optimizer is not None:
            tensors, meta = flatten_optimizer(optimizer.state_dict())
            tensors.update(rng_tensors())
            meta["scaler"] = scaler.state_dict() if scaler is not None and scaler.is_enabled() else None
            _save_tensors(tensors, tmp / OPTIMIZER_NAME, {"format": FORMAT, "meta": json.dumps(meta)})
            share_like_output(tmp / OPTIMIZER_NAME)
        if projection is not None:
            from iosd.projection import PROJECTION_NAME

            projection.save(tmp / PROJECTION_NAME)
        write_json_atomic(tmp / CHECKPOINT_NAME, {**info, "weights": "."})
        _fsync_dir(tmp)
        final = steps / name
        if final.exists():  # the same step saved again (a resumed run's first save)
            trash = steps / f".{name}.old-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_json_atomic(run_dir / CHECKPOINT_NAME, {**info, "weights": f"{STEPS_DIR}/{name}"})
    _prune(steps, keep)
    return steps / name


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file``, its I/O failures (a full disk) raised as the OSError they are,
    with the file's path, so the CLI can say it in one line."""
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as err:
        code = os_errno(err)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from err


def _fsync_dir(path: Path) -> None:
    for child in path.iterdir():
        with open(child, "rb") as f:
            os.fsync(f.fileno())


def _prune(steps: Path, keep: int) -> None:
    done = sorted(p for p in steps.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in done[: max(0, len(done) - max(keep, 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in steps.glob(".step-*"):  # temp dirs of runs killed mid-save
        shutil.rmtree(stale, ignore_errors=True)


# -- reading ---------------------------------------------------------------------------------
def _is_layer(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and POSITIVE_SHAPE[1](value[1])


POSITIVE_SHAPE: Expect = ("[C, H, W]", lambda v: isinstance(v, list) and len(v) == 3 and all(POSITIVE[1](x) for x in v))
LAYER: Expect = ("[path, [C, H, W]]", _is_layer)
SLOT: Expect = ("[shard, sample]", lambda v: isinstance(v, list) and len(v) == 2 and all(COUNT[1](x) for x in v))
WORKERS: Expect = ("a list of integers >= 0", lambda v: isinstance(v, list) and all(COUNT[1](x) for x in v))
REFIT = "restore the run directory or retrain (a checkpoint.json edited by hand: fix the field)"


def _layout_fields(at: str) -> Fields:
    return (
        (at, OBJECT, REQUIRED), (f"{at}.layers", ITEMS, REQUIRED), (f"{at}.layers[]", LAYER, REQUIRED),
        (f"{at}.embedding_dim", POSITIVE, REQUIRED), (f"{at}.projection", OBJECT, NULLABLE),
        (f"{at}.projection.k", POSITIVE, REQUIRED), (f"{at}.projection.sha256", TEXT, REQUIRED),
    )


def checkpoint_fields() -> Fields:
    """What the readers of checkpoint.json (iosd-eval, -predict, -synth, iosd-train --resume
    and --init) rely on."""
    from iosd.choices import HEAD_KINDS, HIDDEN_STATES, POOLINGS

    return (
        ("format_version", INT, OPTIONAL), ("weights", TEXT, OPTIONAL), ("step", COUNT, OPTIONAL),
        ("head", OBJECT, REQUIRED), ("head.kind", one_of(HEAD_KINDS), REQUIRED), *_layout_fields("head.layout"),
        *_layout_fields("layout"),
        ("features", OBJECT, NULLABLE), ("features.projection", OBJECT, NULLABLE), ("features.projection.file", TEXT, OPTIONAL),
        ("embedding", OBJECT, NULLABLE), ("embedding.dim", POSITIVE, OPTIONAL), ("embedding.template", TEXT, OPTIONAL),
        ("embedding.pooling", one_of(POOLINGS), OPTIONAL), ("embedding.hidden", one_of(HIDDEN_STATES), OPTIONAL),
        ("classes", OBJECT, NULLABLE), ("classes.name", TEXT, REQUIRED), ("classes.split", INT, REQUIRED),
        ("classes.seen", TEXTS, REQUIRED), ("classes.unseen", TEXTS, REQUIRED),
        ("shards", OBJECT, OPTIONAL), ("shards.identity", TEXT, REQUIRED), ("shards.spec", TEXT, REQUIRED),
        ("train", OBJECT, OPTIONAL), ("train.args", OBJECT, REQUIRED), ("train.data_position", OBJECT, OPTIONAL),
        ("train.data_position.slots", ITEMS, REQUIRED), ("train.data_position.slots[]", SLOT, REQUIRED),
        ("train.data_position.next_worker", WORKERS, OPTIONAL),
        ("train.data_position.identity", TEXT, OPTIONAL), ("train.data_position.slots_count", POSITIVE, OPTIONAL),
        ("recipe", OBJECT, OPTIONAL), ("recipe.name", TEXT, OPTIONAL), ("generation", OBJECT, NULLABLE), ("model", OBJECT, NULLABLE),
    )


def check_checkpoint(info: object, where: str) -> dict:
    """Refuse a checkpoint.json this iosd cannot read: another format, a newer one, or a field a
    reader relies on missing or of the wrong type (the one place checkpoint.json is checked)."""
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise UserError(f"{where} is not an iosd head checkpoint", "pass a run directory written by iosd-train")
    check_fields(info, checkpoint_fields(), where, REFIT)
    if int(info.get("format_version") or 0) > FORMAT_VERSION:
        raise UserError(f"{where} has checkpoint format {info['format_version']}, newer than this iosd reads ({FORMAT_VERSION})", "upgrade iosd: pip install -U iosd")
    return info


def read_checkpoint(path: str | Path) -> tuple[dict, Path]:
    """(checkpoint JSON, its step directory) of a run directory, step directory or JSON file."""
    path = Path(path)
    where = path.parent if path.name == CHECKPOINT_NAME else path
    if not where.exists():
        raise UserError(f"checkpoint {path} does not exist", "pass a run directory written by iosd-train")
    if not (where / CHECKPOINT_NAME).exists():
        raise UserError(f"{where} holds no iosd-train checkpoint ({CHECKPOINT_NAME} is missing)", "pass a run directory written by iosd-train")
    try:
        info = json.loads((where / CHECKPOINT_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{where / CHECKPOINT_NAME} is not readable JSON ({err})", "restore it or retrain") from None
    info = check_checkpoint(info, str(where / CHECKPOINT_NAME))
    weights = (where / info.get("weights", ".")).resolve()
    if not (weights / MODEL_NAME).exists():
        raise UserError(f"{weights / MODEL_NAME} (the weights {where / CHECKPOINT_NAME} names) is missing", "the run directory is incomplete: restore it or retrain")
    return info, weights


def build_saved_head(info: dict, where: str | Path) -> torch.nn.Module:
    """The head a checkpoint's ``head`` record describes; options it cannot build from (edited
    or from another version) are a UserError naming the file, not a TypeError deep in torch."""
    from iosd.train.heads import build_head

    try:
        return build_head(**info["head"])
    except UserError as err:
        raise UserError(f"{where}: head: {err.problem}", REFIT) from None
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{where}: head cannot be built ({type(err).__name__}: {err})", REFIT) from None


def _load_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err})", "restore it or retrain") from None


def load_weights(head: torch.nn.Module, weights_dir: Path, device: str = "cpu") -> None:
    state = _load_tensors(weights_dir / MODEL_NAME, device)
    try:
        missing, unexpected = head.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensor shapes: the head's options in checkpoint.json were changed
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise UserError(f"{weights_dir / MODEL_NAME} does not fit the head its {CHECKPOINT_NAME} describes ({first})", REFIT) from None
    if missing or unexpected:
        raise UserError(f"{weights_dir / MODEL_NAME} does not fit the head its {CHECKPOINT_NAME} describes (missing {len(missing)}, unexpected {len(unexpected)} tensors)", "the checkpoint was written by another head version: retrain")


def load_training_state(weights_dir: Path, optimizer, scaler=None, device: str = "cpu") -> None:
    """Optimizer moments, AMP scaler and RNG states of a step directory."""
    path = weights_dir / OPTIMIZER_NAME
    if not path.exists():
        raise UserError(f"{path} is missing: this checkpoint cannot be resumed", "start a new run (without --resume)")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = json.loads(f.metadata()["meta"])
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not a readable optimizer state ({err})", "start a new run (without --resume)") from None
    tensors = _load_tensors(path, "cpu")
    optimizer.load_state_dict(unflatten_optimizer(tensors, meta))
    if scaler is not None and scaler.is_enabled() and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    restore_rng(tensors)


def load_head(run_or_checkpoint_dir: str | Path, device: str = "cpu"):
    """The trained head (eval mode, on ``device``) and its checkpoint JSON.

    A head trained on projected features comes wrapped with its basis (``ProjectedHead``: it
    takes raw UNet features), and the JSON's ``layout`` is then the raw layout it takes (the
    stored one moves to ``stored_layout``), so callers capture and pass raw features."""
    info, weights = read_checkpoint(run_or_checkpoint_dir)
    head = build_saved_head(info, weights / CHECKPOINT_NAME)
    load_weights(head, weights, "cpu")
    if (info.get("layout") or {}).get("projection"):
        from iosd.projection import PROJECTION_NAME, ProjectedHead, load

        record = {**(info.get("features") or {}).get("projection", {}), **info["layout"]["projection"]}
        projection = load(weights / PROJECTION_NAME, record, fix="restore the checkpoint directory, or retrain")
        head = ProjectedHead(head, projection)
        info = {**info, "stored_layout": info["layout"], "layout": projection.raw_layout(info["layout"]["embedding_dim"])}
    return head.to(device).eval(), info


def latest_run(root: str | Path = "runs") -> Path | None:
    """The run directory under ``root`` whose checkpoint was written last."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = [p.parent for p in root.glob(f"*/{CHECKPOINT_NAME}")]
    return max(runs, key=lambda p: (p / CHECKPOINT_NAME).stat().st_mtime) if runs else None

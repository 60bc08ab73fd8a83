"""The Mask R-CNN teacher on mmdet's real code path (CPU, random or saved weights), its synonym
map, and safe checkpoint loading under torch>=2.6's weights_only default."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from iosd.errors import UserError
from iosd.pipeline.teacher import (
    DEFAULT_CONFIG,
    TINY_CONFIG,
    MaskRCNNTeacher,
    build_teacher,
    resolve_config,
    zoo_weights,
)

pytestmark = pytest.mark.teacher

SWIN_S_URL = "https://download.openmmlab.com/mmdetection/v2.0/swin/mask_rcnn_swin-s-p4-w7_fpn_fp16_ms-crop-3x_coco/mask_rcnn_swin-s-p4-w7_fpn_fp16_ms-crop-3x_coco_20210903_104808-b92c91f1.pth"
CLASSES = [["person"], ["dog", "sofa"]]
VOC = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]


def images(n: int = 2, size: int = 128) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny():
    return build_teacher(None, None, device="cpu", score_thr=0.0, mask_thr=0.5, tiny=True, image_size=128)


@pytest.fixture(scope="module")
def tiny_labels(tiny):
    return tiny.label(images(), CLASSES)


@pytest.fixture
def old_checkpoint(tiny, tmp_path):
    """A model-zoo-style file: weights plus metadata that pickles numpy objects and a HistoryBuffer."""
    from mmengine.logging import HistoryBuffer

    state = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    state["roi_head.bbox_head.fc_cls.bias"] = torch.linspace(-1, 1, state["roi_head.bbox_head.fc_cls.bias"].numel())
    loss = HistoryBuffer()
    loss.update(0.5)
    meta = {
        "dataset_meta": {"classes": tuple(tiny.names)},
        "epoch": np.int64(12),
        "lr": np.float64(0.02),
        "stats": np.arange(3.0),
        "dtype": np.dtype("float32"),
    }
    path = tmp_path / "old.pth"
    torch.save({"meta": meta, "state_dict": state, "message_hub": {"log_scalars": {"loss": loss}}}, path)
    return path


def test_tiny_teacher_labels_every_requested_class_with_a_mask_at_image_size(tiny, tiny_labels):
    assert len(tiny_labels) == 2 and [len(per) for per in tiny_labels] == [1, 2]
    for per in tiny_labels:
        for lab in per:
            assert lab.mask.shape == (128, 128) and lab.mask.dtype == bool
            assert isinstance(lab.score, float) and 0.0 <= lab.score <= 1.0
            assert lab.score > 0.0 or not lab.mask.any()
    assert any(lab.mask.any() for per in tiny_labels for lab in per)
    info = tiny.describe()
    assert info["random_weights"] is True and info["checkpoint"] is None and info["num_labels"] == 80
    assert info["config"] == TINY_CONFIG and info["config_path"].endswith(f"{TINY_CONFIG}.py") and info["test_resize"] == 128
    assert info["score_thr"] == 0.0 and info["mask_thr"] == 0.5 and info["device"] == "cpu"


def test_tiny_teacher_is_deterministic_and_leaves_the_callers_rng_alone(tiny_labels):
    state = torch.random.get_rng_state()
    again = build_teacher(None, None, score_thr=0.0, mask_thr=0.5, tiny=True, image_size=128)
    assert torch.equal(torch.random.get_rng_state(), state)
    for first, second in zip(tiny_labels, again.label(images(), CLASSES), strict=True):
        for a, b in zip(first, second, strict=True):
            assert a.score == b.score and np.array_equal(a.mask, b.mask)


def test_no_image_no_work(tiny):
    assert tiny.label([], []) == []
    with pytest.raises(ValueError):
        tiny.label(images(1), [])


def test_voc_spellings_reach_coco_labels_and_unknown_classes_are_refused(tiny):
    tiny.check_classes(["sofa", "tvmonitor", "aeroplane", "diningtable", "pottedplant", "motorbike", "Person"])
    with pytest.raises(UserError) as err:
        tiny.check_classes(["dog", "unicorn", "griffin"])
    assert "'unicorn', 'griffin'" in str(err.value) and "'dog'" not in str(err.value)
    assert "--teacher-config/--teacher-checkpoint" in err.value.fix
    with pytest.raises(UserError):
        tiny.label(images(1), [["unicorn"]])


def test_coco_names_reach_a_voc_labelled_detector():
    teacher = MaskRCNNTeacher(None, None, VOC, {"score_thr": 0.05})
    assert teacher.labels_for("airplane") == [0] and teacher.labels_for("couch") == [17]
    assert teacher.labels_for("tv") == [19] and teacher.labels_for("dining table") == [10]


def test_old_checkpoint_loads_without_weakening_torch_load(tiny, old_checkpoint):
    allowed = set(torch.serialization.get_safe_globals())
    teacher = build_teacher(str(resolve_config(TINY_CONFIG)), str(old_checkpoint))
    bias = teacher.model.roi_head.bbox_head.fc_cls.bias
    assert torch.equal(bias.detach(), torch.linspace(-1, 1, bias.numel()))
    assert not torch.equal(bias.detach(), tiny.model.roi_head.bbox_head.fc_cls.bias.detach())
    info = teacher.describe()
    assert info["random_weights"] is False and info["checkpoint"] == str(old_checkpoint) and info["label_names"] == "checkpoint"
    assert info["checkpoint_sha256"] == hashlib.sha256(old_checkpoint.read_bytes()).hexdigest()
    assert info["score_thr"] == 0.05 and info["missing_keys"] == 0
    assert set(torch.serialization.get_safe_globals()) == allowed
    with pytest.raises(pickle.UnpicklingError):
        torch.load(old_checkpoint)


class Payload:
    """Runs a shell command when unpickled by a trusting loader."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Custom:
    pass


class GetattrPayload:
    """Reaches a file-writing method through getattr on an allowed numpy type."""

    def __reduce__(self):
        return (getattr, (np.ndarray, "tofile"))


@pytest.mark.parametrize("payload", ["system", "custom", "getattr"])
def test_unsafe_checkpoint_is_refused_not_executed(payload, tmp_path):
    marker = tmp_path / "pwned"
    meta = {"system": Payload(marker), "custom": Custom(), "getattr": GetattrPayload()}[payload]
    path = tmp_path / "evil.pth"
    torch.save({"meta": meta, "state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(UserError) as err:
        build_teacher(TINY_CONFIG, str(path))
    assert "refusing" in str(err.value) and not marker.exists()


def test_unreadable_or_missing_checkpoint_is_one_line(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be unpickled"):
        build_teacher(TINY_CONFIG, str(junk))
    with pytest.raises(UserError, match="does not exist"):
        build_teacher(TINY_CONFIG, str(tmp_path / "missing.pth"))


def test_url_checkpoint_without_network_says_to_pass_a_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError) as err:
        build_teacher(TINY_CONFIG, "http://127.0.0.1:9/mask_rcnn.pth")
    assert "cannot be downloaded" in str(err.value) and "--teacher-checkpoint PATH" in err.value.fix


def test_bad_configs_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="unknown teacher config 'mask-rcnn_nope_coco'"):
        build_teacher("mask-rcnn_nope_coco", "weights.pth")
    with pytest.raises(UserError, match="unknown teacher config"):
        build_teacher(str(tmp_path / "missing.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("model = dict(\n")
    with pytest.raises(UserError, match="cannot be read"):
        build_teacher(str(broken))
    with pytest.raises(UserError, match="not a Mask R-CNN"):
        build_teacher("faster-rcnn_r50_fpn_1x_coco")
    with pytest.raises(UserError, match="--mask-thr"):
        build_teacher(tiny=True, mask_thr=1.5)


def test_default_teacher_is_swin_s_with_the_model_zoo_weights():
    path = resolve_config(DEFAULT_CONFIG)
    assert path.parent.name == "swin" and zoo_weights(path) == SWIN_S_URL


def test_missing_mmcv_ops_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mmcv.ops", None)
    with pytest.raises(UserError) as err:
        build_teacher(tiny=True)
    assert "mmcv with ops is not installed" in str(err.value) and "make mmcv" in err.value.fix


def test_importing_the_teacher_does_not_import_mmdet():
    code = "import sys, iosd.pipeline.teacher; assert 'mmdet' not in sys.modules and 'mmcv' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

"""OWLv2 + SAM: OWLv2 finds boxes for each class prompt, SAM turns each box into a mask.

OWLv2 (``Owlv2ForObjectDetection``) scores every image patch's box against every text query of
its image (score = sigmoid of the query's logit, as transformers' ``post_process_object_detection``);
boxes above --score-thr, best first, prompt SAM (``SamModel``), whose mask logits above
--mask-thr (0: SAM's own) are the instances. Two forwards per batch: detector, then segmenter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from iosd.pipeline.teachers.base import (
    BoxThenMaskTeacher,
    Query,
    build_parts,
    common_options,
    half_dtype,
    load_pretrained,
    load_tokenizer,
    prepare_pixels,
    seeded,
    top_boxes,
)

if TYPE_CHECKING:
    from iosd.pipeline.teachers import TeacherOptions

NAME = "owlv2+sam"
TINY_SEED = 0
TINY_DETECTOR_SIZE = 64  # 4x4 patches of 16
TINY_SEGMENTER_SIZE = 64


def tiny_detector_config():
    """OWLv2's classes and layout, tiny widths (random weights, CPU tests)."""
    from transformers import Owlv2Config

    return Owlv2Config(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": TINY_DETECTOR_SIZE, "patch_size": 16},
        projection_dim=32,
    )


def tiny_segmenter_config():
    """SAM's classes and layout, tiny widths."""
    from transformers import SamConfig

    return SamConfig(
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": TINY_SEGMENTER_SIZE, "patch_size": 16,
                       "output_channels": 32, "window_size": 2, "global_attn_indexes": [1], "mlp_dim": 64, "num_pos_feats": 16},
        prompt_encoder_config={"hidden_size": 32, "image_size": TINY_SEGMENTER_SIZE, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
    )


class Owlv2SamTeacher(BoxThenMaskTeacher):
    name = NAME

    def __init__(self, detector: torch.nn.Module, segmenter: torch.nn.Module, specs: dict[str, dict], **kwargs) -> None:
        super().__init__(**kwargs)
        self.detector, self.segmenter, self.specs = detector, segmenter, specs

    def _boxes(self, pixels: torch.Tensor, per_image: list[list[int]], queries: list[Query], shape: tuple[int, int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        n_images = pixels.shape[0]
        most = max(len(p) for p in per_image)
        texts = [" "] * (n_images * most)  # as Owlv2Processor: images with fewer queries padded with " "
        for i, ks in enumerate(per_image):
            for j, k in enumerate(ks):
                texts[i * most + j] = queries[k].text
        spec = self.specs["detector"]
        tok = self.tokenizer(texts, padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt")
        x, _ = prepare_pixels(pixels, spec, self.device, next(self.detector.parameters()).dtype)
        det = self.detector(input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device), pixel_values=x)
        scores_all = det.logits.float().sigmoid()  # (B, patches, most)
        side = float(max(shape))  # boxes are relative to the image padded to a square
        cx, cy, w, h = det.pred_boxes.float().unbind(-1)
        boxes_all = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * side
        boxes_all = boxes_all.clamp(min=0).minimum(torch.tensor([shape[1], shape[0]] * 2, device=boxes_all.device, dtype=boxes_all.dtype))
        found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, ks in enumerate(per_image):
            for j, k in enumerate(ks):
                found[k] = top_boxes(scores_all[i, :, j], boxes_all[i], self.score_thr)
        return found


def build(options: TeacherOptions) -> Owlv2SamTeacher:
    """google/owlv2-base-patch16-ensemble + facebook/sam-vit-huge (or --teacher-model), or
    (tiny) tiny random-weight configs of both with CLIP's real tokenizer, built offline."""
    from transformers import Owlv2ForObjectDetection, SamModel

    parts, device, defaults, specs = build_parts(NAME, options)
    if options.tiny:
        from iosd.pipeline.tiny import clip_tokenizer

        detector = seeded(TINY_SEED, lambda: Owlv2ForObjectDetection(tiny_detector_config()))
        segmenter = seeded(TINY_SEED + 1, lambda: SamModel(tiny_segmenter_config()))
        tokenizer = clip_tokenizer(pad_token="!")  # OWLv2's tokenizer pads with "!" (id 0)
        specs["detector"]["image_size"], specs["segmenter"]["image_size"] = TINY_DETECTOR_SIZE, TINY_SEGMENTER_SIZE
    else:
        (_, _, det_id, det_rev), (_, _, seg_id, seg_rev) = parts
        dtype = half_dtype(device, False)  # OWLv2's box logits and SAM's masks are kept in float32
        detector = load_pretrained(Owlv2ForObjectDetection, det_id, det_rev, dtype, NAME)
        segmenter = load_pretrained(SamModel, seg_id, seg_rev, dtype, NAME)
        tokenizer = load_tokenizer(det_id, det_rev, NAME)
    detector, segmenter = detector.to(device).eval(), segmenter.to(device).eval()
    return Owlv2SamTeacher(
        detector, segmenter, specs, tokenizer=tokenizer, max_tokens=int(specs["detector"]["max_text_tokens"]),
        **common_options(NAME, options, defaults, parts, device),
    )

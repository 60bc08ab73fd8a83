"""Grounding DINO + SAM 2.1: Grounding DINO finds boxes for the class phrases, SAM 2 masks them.

Each image's prompts go to Grounding DINO as one text, "cat. traffic light.", as its model card
writes them; a box belongs to a class where it passes the box threshold (--score-thr, on its
best token, as transformers' ``post_process_grounded_object_detection``) and the class's own
tokens pass the text threshold; its score is the best of those tokens. The kept boxes prompt
SAM 2 (``Sam2Model``); its mask logits above --mask-thr (0: SAM 2's own) are the instances.
"""

from __future__ import annotations

import string
from typing import TYPE_CHECKING

import torch

from iosd.errors import UserError
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

NAME = "grounding-dino+sam2"
TINY_SEED = 0
TINY_DETECTOR_SIZE = 64
TINY_SEGMENTER_SIZE = 64
TINY_TEXT_LEN = 64
# bert-base-uncased's ids of [PAD], [CLS], [SEP], "." and "?": Grounding DINO's text masks are
# built from these fixed ids (modeling_grounding_dino SPECIAL_TOKENS), so the tiny vocabulary keeps them.
PAD_ID, CLS_ID, SEP_ID, DOT_ID, QUESTION_ID = 0, 101, 102, 1012, 1029


def tiny_tokenizer():
    """A WordPiece tokenizer of BERT's class, built offline: letters and digits as words and as
    "##" continuations (any name tokenizes), punctuation, and BERT's special-token ids."""
    from transformers import BertTokenizer

    vocab: dict[str, int] = {"[PAD]": PAD_ID, "[UNK]": 100, "[CLS]": CLS_ID, "[SEP]": SEP_ID, "[MASK]": 103, ".": DOT_ID, "?": QUESTION_ID}
    pieces = [c for c in string.punctuation if c not in ".?"] + list(string.ascii_lowercase + string.digits) + [f"##{c}" for c in string.ascii_lowercase + string.digits]
    free = (i for i in range(1, 2000) if i not in vocab.values())
    for piece in pieces:
        vocab[piece] = next(free)
    for i in range(max(vocab.values()) + 1):
        if i not in vocab.values():
            vocab[f"[unused{i}]"] = i
    return BertTokenizer(vocab=vocab)


def tiny_detector_config(vocab_size: int):
    """Grounding DINO's classes and layout (Swin backbone, BERT text encoder), tiny widths."""
    from transformers import GroundingDinoConfig

    return GroundingDinoConfig(
        backbone_config={"model_type": "swin", "embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "window_size": 4, "image_size": TINY_DETECTOR_SIZE,
                         "out_features": ["stage2", "stage3", "stage4"], "out_indices": [2, 3, 4]},
        text_config={"model_type": "bert", "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": TINY_TEXT_LEN},
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=20, num_feature_levels=4, encoder_n_points=2, decoder_n_points=2, max_text_len=TINY_TEXT_LEN, use_timm_backbone=False,
    )


def tiny_segmenter_config():
    """SAM 2's classes and layout (Hiera backbone, FPN neck), tiny widths."""
    from transformers import Sam2Config

    return Sam2Config(
        vision_config={
            "backbone_config": {"model_type": "sam2_hiera_det_model", "hidden_size": 8, "num_attention_heads": 1, "blocks_per_stage": [1, 1, 2, 1], "embed_dim_per_stage": [8, 16, 32, 64],
                                "num_attention_heads_per_stage": [1, 1, 2, 2], "window_size_per_stage": [2, 2, 2, 2], "global_attention_blocks": [3],
                                "image_size": [TINY_SEGMENTER_SIZE, TINY_SEGMENTER_SIZE], "patch_stride": [4, 4]},
            "backbone_channel_list": [64, 32, 16, 8],
            "fpn_hidden_size": 32,
            "backbone_feature_sizes": [[16, 16], [8, 8], [4, 4]],
        },
        prompt_encoder_config={"hidden_size": 32, "image_size": TINY_SEGMENTER_SIZE, "patch_size": 16, "mask_input_channels": 4},
        mask_decoder_config={"hidden_size": 32, "mlp_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
    )


class GroundingDinoSam2Teacher(BoxThenMaskTeacher):
    name = NAME

    def __init__(self, detector: torch.nn.Module, segmenter: torch.nn.Module, specs: dict[str, dict], text_thr: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.detector, self.segmenter, self.specs = detector, segmenter, specs
        self.text_thr = float(text_thr)

    def _text(self, per_image: list[list[int]], queries: list[Query]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """input_ids of each image's "a. b." text and each query's token span in it."""
        cls_id, sep_id, dot_id = (self.tokenizer.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]", "."))
        rows, spans = [], [(0, 0)] * len(queries)
        for ks in per_image:
            ids = [cls_id]
            for k in ks:
                words = self._tokens(queries[k].text.lower())
                spans[k] = (len(ids), len(ids) + len(words))
                ids += words + [dot_id]
            rows.append(ids + [sep_id])
        longest = max(len(r) for r in rows)
        if longest > self.max_tokens:
            raise UserError(f"the {self.name} teacher's prompt for one image is {longest} tokens, its text encoder takes {self.max_tokens}", "fewer classes or synonyms per image")
        pad = self.tokenizer.pad_token_id or 0
        return torch.tensor([r + [pad] * (longest - len(r)) for r in rows]), spans

    def _boxes(self, pixels: torch.Tensor, per_image: list[list[int]], queries: list[Query], shape: tuple[int, int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        input_ids, spans = self._text(per_image, queries)
        input_ids = input_ids.to(self.device)
        attention = (input_ids != (self.tokenizer.pad_token_id or 0)).long()
        x, _ = prepare_pixels(pixels, self.specs["detector"], self.device, next(self.detector.parameters()).dtype)
        det = self.detector(pixel_values=x, input_ids=input_ids, attention_mask=attention, token_type_ids=torch.zeros_like(input_ids))
        probs = det.logits.float().sigmoid()  # (B, boxes, max_text_len)
        best = probs.max(-1).values
        cx, cy, w, h = det.pred_boxes.float().unbind(-1)
        size = torch.tensor([shape[1], shape[0]] * 2, device=probs.device, dtype=probs.dtype)
        boxes_all = (torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * size).clamp(min=0).minimum(size)
        found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, ks in enumerate(per_image):
            for k in ks:
                a, b = spans[k]
                span = probs[i, :, a:b].max(-1).values
                passed = (best[i] > self.score_thr) & (span > self.text_thr)
                found[k] = top_boxes(span[passed], boxes_all[i][passed], -1.0)
        return found

    def describe(self) -> dict:
        return {**super().describe(), "text_thr": self.text_thr}


def build(options: TeacherOptions) -> GroundingDinoSam2Teacher:
    """IDEA-Research/grounding-dino-base + facebook/sam2.1-hiera-large (or --teacher-model), or
    (tiny) tiny random-weight configs of both with an offline WordPiece vocabulary."""
    from transformers import GroundingDinoForObjectDetection, Sam2Model

    parts, device, defaults, specs = build_parts(NAME, options)
    if options.tiny:
        tokenizer = tiny_tokenizer()
        detector = seeded(TINY_SEED, lambda: GroundingDinoForObjectDetection(tiny_detector_config(len(tokenizer))))
        segmenter = seeded(TINY_SEED + 1, lambda: Sam2Model(tiny_segmenter_config()))
        specs["detector"].update(image_size=TINY_DETECTOR_SIZE, max_text_tokens=TINY_TEXT_LEN)
        specs["segmenter"]["image_size"] = TINY_SEGMENTER_SIZE
    else:
        (_, _, det_id, det_rev), (_, _, seg_id, seg_rev) = parts
        dtype = half_dtype(device, False)  # Grounding DINO's deformable attention is kept in float32
        detector = load_pretrained(GroundingDinoForObjectDetection, det_id, det_rev, dtype, NAME)
        segmenter = load_pretrained(Sam2Model, seg_id, seg_rev, dtype, NAME)
        tokenizer = load_tokenizer(det_id, det_rev, NAME)
    detector, segmenter = detector.to(device).eval(), segmenter.to(device).eval()
    return GroundingDinoSam2Teacher(
        detector, segmenter, specs, defaults["text_thr"]["value"] if not options.tiny else 0.0,
        tokenizer=tokenizer, max_tokens=int(specs["detector"]["max_text_tokens"]),
        **common_options(NAME, options, defaults, parts, device),
    )

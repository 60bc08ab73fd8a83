"""SAM 3 (transformers ``Sam3Model``): text-prompted instance segmentation in one model.

Each (image, class prompt) pair is one row of one forward per batch; an instance's score is its
query's probability times the image-level presence probability (as transformers'
``post_process_instance_segmentation``), its mask the sigmoid of its mask logits above
--mask-thr, upsampled to the image.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from iosd.pipeline.teachers.base import (
    PromptedTeacher,
    Query,
    half_dtype,
    load_pretrained,
    load_tokenizer,
    masks_to_image,
    prepare_pixels,
    resolve_models,
    seeded,
)

if TYPE_CHECKING:
    from iosd.pipeline.teachers import TeacherOptions

NAME = "sam3"
TINY_SEED = 0
TINY_IMAGE_SIZE = 112  # 8 x 14-pixel patches


def tiny_config():
    """SAM 3's classes and block layout with every width shrunk (random weights, CPU tests)."""
    from transformers import Sam3Config

    return Sam3Config(
        vision_config={
            "backbone_config": {"model_type": "sam3_vit_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                "image_size": TINY_IMAGE_SIZE, "patch_size": 14, "window_size": 4, "global_attn_indexes": [1], "pretrain_image_size": 56},
            "fpn_hidden_size": 32,
            "backbone_feature_sizes": [[32, 32], [16, 16], [8, 8]],
        },
        text_config={"model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 32},
        geometry_encoder_config={"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
        detr_encoder_config={"hidden_size": 32, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
        detr_decoder_config={"hidden_size": 32, "num_layers": 1, "num_queries": 20, "num_attention_heads": 2, "intermediate_size": 64},
        mask_decoder_config={"hidden_size": 32, "num_attention_heads": 2},
    )


class Sam3Teacher(PromptedTeacher):
    name = NAME

    def __init__(self, model: torch.nn.Module, spec: dict, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.spec = spec
        self.dtype = next(model.parameters()).dtype

    def _instances(self, pixels: torch.Tensor, queries: list[Query], shape: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, valid = prepare_pixels(pixels, self.spec, self.device, self.dtype)
        text = self.tokenizer([q.text for q in queries], padding="max_length", max_length=self.max_tokens, truncation=True, return_tensors="pt")
        rows = torch.tensor([q.image for q in queries], device=self.device)
        vision = _select(self.model.get_vision_features(pixel_values=x), rows)  # the backbone once per image, not per prompt
        out = self.model(vision_embeds=vision, input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device))
        scores = out.pred_logits.float().sigmoid()
        if out.presence_logits is not None:
            scores = scores * out.presence_logits.float().sigmoid()
        frame = tuple(x.shape[-2:])
        results = []
        for k in range(len(queries)):
            keep = scores[k] > self.score_thr
            if not bool(keep.any()):
                results.append((torch.zeros((0, *shape), dtype=torch.bool), torch.zeros(0)))
                continue
            probs = masks_to_image(out.pred_masks[k][keep], frame, valid, shape).sigmoid()
            results.append(((probs > self.mask_thr).cpu(), scores[k][keep].cpu()))
        return results


def _select(output, rows: torch.Tensor):
    """The vision encoder's output with its batch rows picked (and repeated) per prompt."""
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            output[key] = value[rows]
        elif isinstance(value, (tuple, list)):
            output[key] = type(value)(v[rows] if isinstance(v, torch.Tensor) else v for v in value)
    return output


def build(options: TeacherOptions) -> Sam3Teacher:
    """The real facebook/sam3 (or --teacher-model), or (tiny) its tiny random-weight config."""
    from transformers import Sam3Model

    from iosd.pipeline.teachers import teacher_spec, threshold_defaults

    spec = teacher_spec(NAME)
    ((_, model_spec, location, revision),) = resolve_models(NAME, spec, options.models)
    device = torch.device(options.device)
    defaults = threshold_defaults(NAME)
    if options.tiny:
        from iosd.pipeline.tiny import clip_tokenizer

        model = seeded(TINY_SEED, lambda: Sam3Model(tiny_config()))
        tokenizer = clip_tokenizer()
        model_spec = {**model_spec, "image_size": TINY_IMAGE_SIZE}
        models = [{"role": "segmenter", "id": "tiny", "config": "sam3 tiny (random weights)", "revision": None}]
    else:
        model = load_pretrained(Sam3Model, location, revision, half_dtype(device, True), NAME)
        tokenizer = load_tokenizer(location, revision, NAME)
        models = [{"role": "segmenter", "id": location, "revision": revision, "commit": getattr(model.config, "_commit_hash", None)}]
    model = model.to(device).eval()
    info = {"kind": "text-prompted", "name": NAME, "models": models, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "random_weights": options.tiny, "sources": {k: v["source"] for k, v in defaults.items()}}
    return Sam3Teacher(
        model, model_spec, tokenizer=tokenizer, max_tokens=int(model_spec["max_text_tokens"]),
        score_thr=defaults["score_thr"]["value"] if options.score_thr is None else options.score_thr,
        mask_thr=defaults["mask_thr"]["value"] if options.mask_thr is None else options.mask_thr,
        gt=options.gt, device=str(device), synonyms=options.synonyms, info=info,
    )

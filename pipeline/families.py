"""Model families: what differs between SDXL-class and SD 1.x/2.x pipelines, in one place.

One object per family gives the diffusers pipeline class, the text encoders, the conditioning
of a single UNet call (SDXL adds pooled text embeddings and size ids through
``added_cond_kwargs``; SD needs only ``encoder_hidden_states``), the real UNet config for
meta-device shape probes, and the VAE's latent scaling. Everything else (block layout
aside) is shared: both are ``UNet2DConditionModel`` + ``AutoencoderKL`` + CLIP text encoders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from iosd.errors import UserError

PROBE_TOKENS = 77  # CLIP's context length: the cross-attention sequence of every family here


@dataclass(frozen=True)
class Family:
    """What one model family needs from the rest of the pipeline."""

    name: str  # recorded in manifests (info["family"]) and matched against layer presets
    pipeline_classes: tuple[str, ...]  # model_index.json ``_class_name`` values loaded as this family
    encoders: tuple[tuple[str, str], ...]  # (tokenizer, text encoder) attribute names, prompt order

    def pipeline_class(self) -> type:
        """The diffusers text-to-image pipeline class of this family."""
        import diffusers

        return getattr(diffusers, self.pipeline_classes[0])

    def text_encoders(self, pipe) -> list[tuple[object, torch.nn.Module]]:
        """(tokenizer, encoder) pairs present on ``pipe``, in prompt-embedding order."""
        pairs = [(getattr(pipe, t, None), getattr(pipe, e, None)) for t, e in self.encoders]
        return [(t, e) for t, e in pairs if t is not None and e is not None]

    def unet_config(self) -> dict:
        """The real model's UNet config (for meta-device shape probes)."""
        raise NotImplementedError

    def conditioning(self, pipe, prompts: list[str], *, device: torch.device, size: int, guided: bool = False) -> dict:
        """UNet keyword arguments for one call on ``prompts``; with ``guided`` the batch is the
        pipeline's classifier-free-guidance batch: unconditional rows first, then conditional."""
        raise NotImplementedError

    def meta_conditioning(self, config: dict, rows: int) -> dict:
        """Zero conditioning of the right shapes for a UNet built from ``config`` (any device)."""
        return {"encoder_hidden_states": torch.zeros(rows, PROBE_TOKENS, config["cross_attention_dim"])}

    # The VAE's latent scaling: both families use ``scaling_factor`` (SDXL 0.13025, SD 0.18215);
    # ``shift_factor`` (None on both) is honoured so a later family only overrides the config.
    @staticmethod
    def latents_to_vae(latents: torch.Tensor, vae) -> torch.Tensor:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return latents / vae.config.scaling_factor + shift

    @staticmethod
    def vae_to_latents(moments: torch.Tensor, vae) -> torch.Tensor:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (moments - shift) * vae.config.scaling_factor


class _SDXL(Family):
    def unet_config(self) -> dict:
        from iosd.pipeline.tiny import SDXL_UNET_CONFIG

        return dict(SDXL_UNET_CONFIG)

    def conditioning(self, pipe, prompts, *, device, size, guided=False):
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided)
        if guided:  # as the pipeline builds its guidance batch (zeros for SDXL's empty prompt)
            embeds, pooled = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled])
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=embeds.dtype).repeat(embeds.shape[0], 1)
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}

    def meta_conditioning(self, config, rows):
        time_ids = 6 * config["addition_time_embed_dim"]
        pooled = config["projection_class_embeddings_input_dim"] - time_ids
        conditions = {"text_embeds": torch.zeros(rows, pooled), "time_ids": torch.zeros(rows, 6)}
        return {**super().meta_conditioning(config, rows), "added_cond_kwargs": conditions}


class _SD(Family):
    def unet_config(self) -> dict:
        from iosd.pipeline.tiny import SD1_UNET_CONFIG

        return dict(SD1_UNET_CONFIG)

    def conditioning(self, pipe, prompts, *, device, size, guided=False):
        embeds, neg = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided)
        if guided:  # the empty prompt's embedding, as the pipeline (and GD's code) use
            embeds = torch.cat([neg, embeds])
        return {"encoder_hidden_states": embeds}


SDXL = _SDXL("sdxl", ("StableDiffusionXLPipeline",), (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")))
SD = _SD("sd", ("StableDiffusionPipeline",), (("tokenizer", "text_encoder"),))
FAMILIES: dict[str, Family] = {f.name: f for f in (SDXL, SD)}


def get_family(name: str | Family) -> Family:
    """The family called ``name`` ("sdxl" or "sd"), or a one-line error."""
    if isinstance(name, Family):
        return name
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}", f"use one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_class(class_name: str) -> Family | None:
    """The family whose pipeline class is ``class_name`` (model_index.json ``_class_name``)."""
    return next((f for f in FAMILIES.values() if class_name in f.pipeline_classes), None)


def family_of_pipe(pipe) -> Family:
    """The family of a constructed pipeline (by class, subclasses included)."""
    for family in FAMILIES.values():
        if isinstance(pipe, family.pipeline_class()):
            return family
    raise UserError(f"{type(pipe).__name__} is not a pipeline iosd can drive", supported_hint())


def supported_hint() -> str:
    classes = " or ".join(c for f in FAMILIES.values() for c in f.pipeline_classes)
    return f"use a diffusers {classes} model (SDXL-class or SD 1.x/2.x), or --model tiny / tiny-sd1"

"""Class-name query embeddings from the SDXL text encoders, and token spans in prompts.

One definition, used by iosd-gen (stored per sample so training never loads a text
encoder), by DAAM (which tokens of a prompt name a class) and by iosd-predict.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from iosd.choices import HIDDEN_STATES, POOLINGS
from iosd.errors import UserError

EMBED_TEMPLATE = "a photograph of a {}"


def find_token_span(tokenizer, text: str, phrase: str) -> tuple[int, int]:
    """[start, end) positions of ``phrase``'s tokens in ``text`` as the encoder sees it (BOS = 0).

    CLIP's BPE tokenises word by word, so a phrase inside a prompt has the same tokens as
    the phrase alone; the last occurrence wins ("a photograph of a ..." repeats "a").
    """
    words = tokenizer(phrase, add_special_tokens=False).input_ids
    if not phrase.strip() or not words:
        raise UserError(f"class name {phrase!r} has no tokens", "give a non-empty class name")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    limit = tokenizer.model_max_length - 2  # room for BOS and EOS
    for start in range(len(ids) - len(words), -1, -1):
        if ids[start : start + len(words)] == words:
            if start + len(words) > limit:
                break
            return start + 1, start + 1 + len(words)
    raise UserError(f"class name {phrase!r} does not appear in the prompt {text!r} (or is cut at 77 tokens)", "put the class name in the prompt or --template")


def text_encoders(pipe) -> list[tuple[object, torch.nn.Module]]:
    """(tokenizer, encoder) pairs of a pipeline, in prompt-embedding order: two on SDXL, one on
    SD 1.x/2.x (the pairs of ``iosd.pipeline.families``; absent ones are skipped)."""
    pairs = [(getattr(pipe, t, None), getattr(pipe, e, None)) for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))]
    return [(t, e) for t, e in pairs if t is not None and e is not None]


@dataclass(frozen=True)
class QuerySpec:
    """How a class name becomes its query embedding; recorded in manifests and checkpoints."""

    template: str = EMBED_TEMPLATE
    pooling: str = "mean"
    hidden: str = "penultimate"

    def check(self) -> QuerySpec:
        if self.template.count("{}") != 1:
            raise UserError(f"query template {self.template!r} needs exactly one {{}}", 'e.g. "{}" or "a photograph of a {}"')
        if self.pooling not in POOLINGS:
            raise UserError(f"unknown query pooling {self.pooling!r}", f"use one of {', '.join(POOLINGS)}")
        if self.hidden not in HIDDEN_STATES:
            raise UserError(f"unknown query hidden state {self.hidden!r}", f"use one of {', '.join(HIDDEN_STATES)}")
        return self

    @classmethod
    def from_record(cls, spec: dict) -> QuerySpec:
        """The spec a manifest's "embedding" entry describes (older sets: mean, penultimate)."""
        return cls(spec.get("template", EMBED_TEMPLATE), spec.get("pooling", "mean"), spec.get("hidden", "penultimate")).check()


def query_tokens(tokenizer, names: list[str], spec: QuerySpec) -> list[tuple[int, int]]:
    """[start, end) of the tokens each name's query pools over, in ``spec.template``."""
    spans = [find_token_span(tokenizer, spec.template.format(n), n) for n in names]
    return [(s, s + 1) if spec.pooling == "first" else (s, e) for s, e in spans]


def coinciding_queries(tokenizer, names: list[str]) -> list[list[str]]:
    """Groups of class names whose first token is the same: first-token queries cannot tell them apart."""
    by_token: dict[int, list[str]] = {}
    for name in names:
        by_token.setdefault(tokenizer(name, add_special_tokens=False).input_ids[0], []).append(name)
    return [group for group in by_token.values() if len(group) > 1]


@torch.no_grad()
def class_embeddings(pipe, names: list[str], spec: QuerySpec | None = None) -> np.ndarray:
    """(N, D) float32 query embeddings: each encoder's hidden states (``spec.hidden``) at the
    class-name tokens of ``spec.template``, pooled by ``spec.pooling``, the encoders
    concatenated (D = 2048 on SDXL, 768 on SD v1)."""
    spec = (spec or QuerySpec()).check()
    texts = [spec.template.format(n) for n in names]
    out = []
    for tokenizer, encoder in text_encoders(pipe):
        device = next(encoder.parameters()).device
        spans = query_tokens(tokenizer, names, spec)
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        result = encoder(ids.to(device), output_hidden_states=True)
        hidden = (result.hidden_states[-2] if spec.hidden == "penultimate" else result.last_hidden_state).float()
        out.append(torch.stack([hidden[i, s:e].mean(0) for i, (s, e) in enumerate(spans)]))
    return torch.cat(out, dim=-1).cpu().numpy().astype(np.float32)


def embedding_spec(pipe, spec: QuerySpec | None = None) -> dict:
    """What a stored class embedding means, recorded in the manifest and checkpoints."""
    spec = (spec or QuerySpec()).check()
    pairs = text_encoders(pipe)
    dims = [int(e.config.hidden_size) for _, e in pairs]
    encoders = [name for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None][: len(dims)]
    return {"template": spec.template, "pooling": spec.pooling, "hidden": spec.hidden, "encoders": encoders, "dims": dims, "dim": sum(dims)}

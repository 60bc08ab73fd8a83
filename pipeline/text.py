"""Class-name query embeddings from the SDXL text encoders, and token spans in prompts.

One definition, used by iosd-gen (stored per sample so training never loads a text
encoder), by DAAM (which tokens of a prompt name a class) and by iosd-predict.
"""

from __future__ import annotations

import numpy as np
import torch

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
    """(tokenizer, encoder) pairs of an SDXL pipeline, in prompt-embedding order."""
    pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    return [(t, e) for t, e in pairs if t is not None and e is not None]


@torch.no_grad()
def class_embeddings(pipe, names: list[str], template: str = EMBED_TEMPLATE) -> np.ndarray:
    """(N, D) float32: penultimate hidden states of each encoder at the class-name tokens of
    ``template``, averaged over the name's tokens, the encoders concatenated (D = 2048 on SDXL).
    """
    if "{}" not in template:
        raise UserError(f"embedding template {template!r} has no {{}}", "write the class slot as {}")
    out = []
    for tokenizer, encoder in text_encoders(pipe):
        device = next(encoder.parameters()).device
        texts = [template.format(n) for n in names]
        spans = [find_token_span(tokenizer, t, n) for t, n in zip(texts, names, strict=True)]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        hidden = encoder(ids.to(device), output_hidden_states=True).hidden_states[-2].float()
        out.append(torch.stack([hidden[i, s:e].mean(0) for i, (s, e) in enumerate(spans)]))
    return torch.cat(out, dim=-1).cpu().numpy().astype(np.float32)


def embedding_spec(pipe, template: str = EMBED_TEMPLATE) -> dict:
    """What a stored class embedding means, recorded in the manifest and checkpoints."""
    dims = [int(e.config.hidden_size) for _, e in text_encoders(pipe)]
    return {"template": template, "encoders": ["text_encoder", "text_encoder_2"][: len(dims)], "hidden_state": -2, "token_pooling": "mean over class-name tokens", "dims": dims, "dim": sum(dims)}

"""How far apart a model's class names are, where a head and the UNet read them.

A grounding head finds "the star" through its query (the name's embedding from the text
encoders) and can only transfer to an unseen name along directions the seen names span; the
UNet reads the same hidden states through each cross-attention layer's keys. Names whose
queries point the same way, after removing what all names share, are one class to both.
``scripts/world-queries.py`` prints this for a trained world; docs/cpu-world.md reads it.
"""

from __future__ import annotations

import itertools

import torch

from iosd.pipeline.text import QuerySpec, class_embeddings


def centred_cosines(x: torch.Tensor) -> torch.Tensor:
    """(N, N) cosine similarity of the rows of ``x`` after subtracting their mean."""
    x = x - x.mean(0)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x @ x.T


@torch.no_grad()
def name_geometry(pipe, names: list[str], template: str = "a photograph of a {}") -> dict:
    """Centred cosines between class names in the query space and in the UNet's key space
    (mean over its cross-attention layers), and the share of the names' variance that the
    top 1-4 directions hold."""
    queries = torch.from_numpy(class_embeddings(pipe, names, QuerySpec(template, "mean", "penultimate")))
    query_cos = centred_cosines(queries)
    spectrum = torch.linalg.svdvals(queries - queries.mean(0)) ** 2
    explained = (spectrum / spectrum.sum()).cumsum(0)
    layers = [m for n, m in pipe.unet.named_modules() if n.endswith("attn2")]
    key_cos = torch.stack([centred_cosines(m.to_k(queries.to(m.to_k.weight.dtype)).float()) for m in layers]).mean(0)
    pairs = sorted(((float(query_cos[i, j]), float(key_cos[i, j]), names[i], names[j]) for i, j in itertools.combinations(range(len(names)), 2)), reverse=True)
    return {
        "template": template, "classes": names, "attention_layers": len(layers),
        "variance_in_top_components": [round(float(v), 3) for v in explained[:4]],
        "closest_pairs": [{"pair": [a, b], "query_cos": round(q, 3), "key_cos": round(k, 3)} for q, k, a, b in pairs[:6]],
        "pairs_above_0.9": sum(q > 0.9 for q, *_ in pairs), "pairs": len(pairs),
        "query_cos": [[round(float(v), 3) for v in row] for row in query_cos],
    }

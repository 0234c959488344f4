"""Image↔text retrieval recall@K, with several captions per image, in bounded memory.

Texts are de-duplicated first: a text shared by several images (e.g. "No acute
findings.") is one candidate whose positives are all those images. An image is
retrieved correctly if ANY of its captions is in the top K; a text if ANY of its
images is. Similarities are computed in row chunks, so N x M is never held whole.
"""

from __future__ import annotations

import torch


def _hits(queries: torch.Tensor, keys: torch.Tensor, pair_codes: torch.Tensor, ks: tuple[int, ...], chunk: int) -> dict[int, int]:
    """Count queries with a positive among their top-k keys; ``pair_codes`` = sorted q * n_keys + k."""
    kmax = min(max(ks), keys.shape[0])
    hits = {k: 0 for k in ks}
    n_keys = keys.shape[0]
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk] @ keys.T
        top = sims.topk(kmax, dim=1).indices  # (c, kmax)
        rows = torch.arange(start, start + top.shape[0]).unsqueeze(1)
        codes = rows * n_keys + top
        pos = torch.isin(codes, pair_codes)
        first = torch.where(pos.any(1), pos.float().argmax(1), torch.full((top.shape[0],), kmax))
        for k in ks:
            hits[k] += int((first < k).sum())
    return hits


def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: list[int] | torch.Tensor,
    texts: list[str] | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@K both ways.

    image_emb (N, D) and text_emb (M, D), L2-normalised; ``text_image[j]`` = the
    image that text j describes; ``texts`` (optional) = the strings, used to merge
    identical captions. Returns ``{"i2t_R@1": ..., "t2i_R@1": ..., ...}`` in [0, 1].
    """
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    if text_emb.shape[0] != text_image.shape[0]:
        raise ValueError(f"{text_emb.shape[0]} text embeddings but {text_image.shape[0]} text→image links")
    if texts is not None:
        unique: dict[str, int] = {}
        rep = [unique.setdefault(t, len(unique)) for t in texts]
        rep_t = torch.tensor(rep, dtype=torch.long)
        first = torch.full((len(unique),), -1, dtype=torch.long)
        for j in range(len(rep) - 1, -1, -1):
            first[rep[j]] = j
        keys_text = text_emb[first]
    else:
        rep_t = torch.arange(text_emb.shape[0])
        keys_text = text_emb
    n_img, n_txt = image_emb.shape[0], keys_text.shape[0]
    i2t_codes = torch.unique(text_image * n_txt + rep_t)
    t2i_codes = torch.unique(rep_t * n_img + text_image)
    i2t = _hits(image_emb, keys_text, i2t_codes, ks, chunk)
    # only images that have a caption count as queries
    has_text = torch.zeros(n_img, dtype=torch.bool)
    has_text[text_image] = True
    n_queries = int(has_text.sum())
    t2i = _hits(keys_text, image_emb, t2i_codes, ks, chunk)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = i2t[k] / max(1, n_queries)
        out[f"t2i_R@{k}"] = t2i[k] / max(1, n_txt)
    return out

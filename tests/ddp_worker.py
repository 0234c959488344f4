"""Worker for tests/test_distributed.py; run with two processes:

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.json`` with the checks below (numbers, not
verdicts; the test decides). Reads nothing else; CPU and gloo only.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from regionmed.distributed import (
    all_reduce_gradients,
    cleanup_distributed,
    gather_with_grad,
    init_distributed,
)
from regionmed.losses import LOSS_NAMES, LossInputs, compute_losses, gather_loss_inputs, text_ids

WEIGHTS = {"global": 1.0, "summary": 0.5, "region": 1.0, "hard_negative": 0.7}

# The union batch: 6 images, rank 0 gets 2 and rank 1 gets 4; 7 ROIs, rank 0
# gets 5 and rank 1 gets 2. Texts repeat across ranks on purpose.
IMAGES_PER_RANK = (2, 4)
ROIS_PER_IMAGE = (3, 2, 1, 0, 1, 0)
REPORTS = (
    "no acute cardiopulmonary process",
    "left pleural effusion",
    "no acute cardiopulmonary process",
    "cardiomegaly",
    "left pleural effusion",
    "right upper lobe nodule",
)
SUMMARIES = ("normal", "effusion", "normal", "cardiomegaly", "effusion", "nodule")
CAPTIONS = (
    "normal heart size",
    "clear left lung",
    "small left effusion",
    "normal heart size",
    "clear right lung",
    # rank 1 from here
    "normal heart size",
    "small left effusion",
)
N_ROI_NEG, N_IMG_NEG = 3, 2
IMG_DIM, TXT_DIM, EMB_DIM = 16, 12, 8


def text_vector(text: str) -> torch.Tensor:
    """A fixed raw feature per text, so identical texts have identical features."""
    seed = int(text_ids([text])[0]) % (2**31)
    return torch.randn(TXT_DIM, generator=torch.Generator().manual_seed(seed))


def texts_tensor(texts) -> torch.Tensor:
    return torch.stack([text_vector(t) for t in texts]) if texts else torch.zeros(0, TXT_DIM)


def union_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    n_img, n_roi = len(REPORTS), len(CAPTIONS)
    roi_negs = [[f"{c} variant {k}" for k in range(N_ROI_NEG)] for c in CAPTIONS]
    img_negs = [[f"{r} negated {k}" for k in range(N_IMG_NEG)] for r in REPORTS]
    roi_mask = torch.ones(n_roi, N_ROI_NEG, dtype=torch.bool)
    roi_mask[1, 2] = roi_mask[4, 1:] = roi_mask[6, 0] = False  # padding slots
    img_mask = torch.ones(n_img, N_IMG_NEG, dtype=torch.bool)
    img_mask[3, 1] = False
    return {
        "images": torch.randn(n_img, IMG_DIM, generator=gen),
        "report_feat": texts_tensor(REPORTS),
        "report_ids": text_ids(list(REPORTS)),
        "summary_feat": texts_tensor(SUMMARIES),
        "summary_ids": text_ids(list(SUMMARIES)),
        "roi_feat": torch.randn(n_roi, IMG_DIM, generator=gen),
        "caption_feat": texts_tensor(CAPTIONS),
        "caption_ids": text_ids(list(CAPTIONS)),
        "roi_neg_feat": torch.stack([texts_tensor(n) for n in roi_negs]),
        "roi_neg_mask": roi_mask,
        "img_neg_feat": torch.stack([texts_tensor(n) for n in img_negs]),
        "img_neg_mask": img_mask,
    }


def rank_slice(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    img_start = sum(IMAGES_PER_RANK[:rank])
    img_end = img_start + IMAGES_PER_RANK[rank]
    roi_start = sum(ROIS_PER_IMAGE[:img_start])
    roi_end = sum(ROIS_PER_IMAGE[:img_end])
    roi_keys = {"roi_feat", "caption_feat", "caption_ids", "roi_neg_feat", "roi_neg_mask"}
    return {
        k: v[roi_start:roi_end] if k in roi_keys else v[img_start:img_end] for k, v in batch.items()
    }


class Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(IMG_DIM, EMB_DIM)
        self.image_global = nn.Linear(IMG_DIM, EMB_DIM)
        self.text = nn.Linear(TXT_DIM, EMB_DIM)
        self.roi = nn.Linear(IMG_DIM, EMB_DIM)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.unused = nn.Linear(2, 2)  # never in the graph: its grad must stay None

    def features(self, b: dict[str, torch.Tensor]) -> LossInputs:
        def text(x: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.text(x), dim=-1)

        return LossInputs(
            logit_scale=self.log_scale.exp().clamp(max=100.0),
            image_fused=F.normalize(self.image(b["images"]), dim=-1),
            image_global=F.normalize(self.image_global(b["images"]), dim=-1),
            report=text(b["report_feat"]),
            report_ids=b["report_ids"],
            summary=text(b["summary_feat"]),
            summary_ids=b["summary_ids"],
            roi=F.normalize(self.roi(b["roi_feat"]), dim=-1),
            caption=text(b["caption_feat"]),
            caption_ids=b["caption_ids"],
            roi_negatives=text(b["roi_neg_feat"]),
            roi_negatives_mask=b["roi_neg_mask"],
            image_negatives=text(b["img_neg_feat"]),
            image_negatives_mask=b["img_neg_mask"],
        )


def check_gather(rank: int) -> dict:
    sizes = (3, 1)
    offset = sum(sizes[:rank])
    full = torch.arange(sum(sizes) * 4, dtype=torch.float32).reshape(-1, 2, 2)
    x = full[offset : offset + sizes[rank]].clone().requires_grad_(True)
    gathered = gather_with_grad(x)
    weight = torch.randn(full.shape, generator=torch.Generator().manual_seed(7))
    (gathered * weight).sum().backward()

    ids_full = torch.tensor([11, 22, 33, 44], dtype=torch.long)
    ids = gather_with_grad(ids_full[offset : offset + sizes[rank]])

    e_full = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    e_gathered = gather_with_grad(e_full[:0] if rank == 0 else e_full)  # rank 0 has no rows

    mask_full = torch.tensor([[True, False], [False, True], [True, True], [False, False]])
    mask = gather_with_grad(mask_full[offset : offset + sizes[rank]])

    try:
        gather_with_grad(torch.zeros(2, 3 + rank))
        mismatch_raised = False
    except RuntimeError:
        mismatch_raised = True

    return {
        "shape": list(gathered.shape),
        "value_err": float((gathered.detach() - full).abs().max()),
        "grad_err": float((x.grad - weight[offset : offset + sizes[rank]]).abs().max()),
        "ids_equal": ids.dtype == torch.long and torch.equal(ids, ids_full),
        "empty_equal": torch.equal(e_gathered, e_full),
        "mask_equal": mask.dtype == torch.bool and torch.equal(mask, mask_full),
        "mismatch_raised": mismatch_raised,
    }


def check_losses(rank: int) -> dict:
    torch.manual_seed(0)
    model = Towers()
    reference = copy.deepcopy(model)
    batch = union_batch()

    # Data parallel: local features -> gather -> same loss everywhere -> sum grads.
    local = model.features(rank_slice(batch, rank))
    out = compute_losses(gather_loss_inputs(local), WEIGHTS)
    out["total"].backward()
    all_reduce_gradients(model.parameters())

    # Single process on the whole batch, same weights (no gathering).
    ref_out = compute_losses(reference.features(batch), WEIGHTS)
    ref_out["total"].backward()

    grad_err = 0.0
    none_mismatch = []
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if (p.grad is None) != (q.grad is None):
            none_mismatch.append(name)
        elif p.grad is not None:
            grad_err = max(grad_err, float((p.grad - q.grad).abs().max()))
    return {
        "local_rois": int(local.roi.shape[0]),
        "terms": sorted(out),
        "loss": {k: v.item() for k, v in out.items()},
        "ref_loss": {k: v.item() for k, v in ref_out.items()},
        "loss_err": max(abs(out[k].item() - ref_out[k].item()) for k in ref_out),
        "grad_err": grad_err,
        "grad_norm": sum(
            q.grad.norm().item() for q in reference.parameters() if q.grad is not None
        ),
        "grad_none_mismatch": none_mismatch,
        "unused_grad_is_none": model.unused.weight.grad is None,
    }


def check_reduce(rank: int) -> dict:
    only_rank0 = nn.Parameter(torch.zeros(5))
    nowhere = nn.Parameter(torch.zeros(3))
    nowhere_kept = nn.Parameter(torch.zeros(3))
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    frozen.grad = torch.full((2,), 9.0)
    many = [nn.Parameter(torch.zeros(4)) for _ in range(6)]
    for i, p in enumerate(many):
        p.grad = torch.full((4,), float((rank + 1) * (i + 1)))
    if rank == 0:
        only_rank0.grad = torch.arange(5, dtype=torch.float32)
    # A tiny bucket size forces several buckets.
    all_reduce_gradients([only_rank0, nowhere, frozen, *many], bucket_mb=20 / 2**20)
    all_reduce_gradients([nowhere_kept], restore_unused=False)
    return {
        "only_rank0_err": float((only_rank0.grad - torch.arange(5.0)).abs().max()),
        "nowhere_is_none": nowhere.grad is None,
        "nowhere_kept_zero": nowhere_kept.grad is not None and not nowhere_kept.grad.any().item(),
        "frozen_untouched": torch.equal(frozen.grad, torch.full((2,), 9.0)),
        "many_err": max(float((p.grad - 3.0 * (i + 1)).abs().max()) for i, p in enumerate(many)),
    }


def main(out_dir: str) -> None:
    info = init_distributed(backend="gloo")
    result: dict = {"rank": info.rank, "world_size": info.world_size, "device": str(info.device)}
    try:
        result["gather"] = check_gather(info.rank)
        result["losses"] = check_losses(info.rank)
        result["reduce"] = check_reduce(info.rank)
        result["loss_names"] = list(LOSS_NAMES)
    except Exception:  # the test reports it; the other rank will fail on its own
        result["error"] = traceback.format_exc()
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(result, indent=1))
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])

"""Worker for tests/test_distributed.py; run with two processes:

    torchrun --standalone --nproc_per_node 2 tests/ddp_worker.py OUT_DIR

Each rank writes ``OUT_DIR/rank<r>.json`` with the checks below (numbers, not
verdicts; the test decides). Reads nothing else; CPU and gloo only.
"""

from __future__ import annotations

import json
import math
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from regionmed.distributed import all_reduce_sum, cleanup_distributed, gather_tensor, gather_with_grad, init_distributed
from regionmed.losses import LOSS_NAMES, LossInputs, compute_losses, text_ids

WEIGHTS = {"global": 1.0, "summary": 0.5, "region": 1.0, "hard_negative": 0.7, "grounding": 0.6}
GRID, PHRASES = 4, 2  # a 4x4 cell grid per image, 2 phrase slots per image

# The union batch: 6 images, 3 per rank, K = 3 ROI slots each; 7 ROIs, rank 0
# holds 6 and rank 1 holds 1 (ragged, and images without regions). Texts repeat
# across ranks on purpose.
IMAGES_PER_RANK = (3, 3)
ROIS_PER_IMAGE = (3, 2, 1, 0, 1, 0)
K = 3
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
    """Fixed-shape union batch: per-ROI fields are (6, K, ...) with a slot mask."""
    gen = torch.Generator().manual_seed(1234)
    n_img = len(REPORTS)
    roi_mask = torch.zeros(n_img, K, dtype=torch.bool)
    for i, n in enumerate(ROIS_PER_IMAGE):
        roi_mask[i, :n] = True
    slots = roi_mask.nonzero(as_tuple=True)

    def per_slot(rows: torch.Tensor) -> torch.Tensor:  # (R, ...) -> (6, K, ...), zero padding
        out = rows.new_zeros(n_img, K, *rows.shape[1:])
        out[slots] = rows
        return out

    roi_negs = [[f"{c} variant {k}" for k in range(N_ROI_NEG)] for c in CAPTIONS]
    img_negs = [[f"{r} negated {k}" for k in range(N_IMG_NEG)] for r in REPORTS]
    neg_mask = torch.ones(len(CAPTIONS), N_ROI_NEG, dtype=torch.bool)
    neg_mask[1, 2] = neg_mask[4, 1:] = neg_mask[6, 0] = False  # ragged negatives
    img_mask = torch.ones(n_img, N_IMG_NEG, dtype=torch.bool)
    img_mask[3, 1] = False
    # grounding: letterbox rows of image 1 invalid; phrase slots ragged (image 3 none, image 5 one
    # whose box lies in the padding only: it counts nowhere); targets = covered shares
    cell_valid = torch.ones(n_img, GRID, GRID, dtype=torch.bool)
    cell_valid[1, :1] = cell_valid[1, -1:] = False
    phrase_mask = torch.tensor([[True, True], [True, False], [True, True], [False, False], [True, False], [True, False]])
    target = torch.zeros(n_img, PHRASES, GRID, GRID)
    target[:, 0, 1:3, 1:3] = 1.0
    target[:, 1, 0:2, 2:4] = 0.5
    target[5, 0] = 0.0
    target[5, 0, 0] = 1.0
    cell_valid[5, 0] = False
    return {
        "images": torch.randn(n_img, IMG_DIM, generator=gen),
        "report_feat": texts_tensor(REPORTS),
        "report_ids": text_ids(list(REPORTS)),
        "summary_feat": texts_tensor(SUMMARIES),
        "summary_ids": text_ids(list(SUMMARIES)),
        "roi_feat": per_slot(torch.randn(len(CAPTIONS), IMG_DIM, generator=gen)),
        "roi_mask": roi_mask,
        "caption_feat": per_slot(texts_tensor(CAPTIONS)),
        "caption_ids": per_slot(text_ids(list(CAPTIONS))),
        "roi_neg_feat": per_slot(torch.stack([texts_tensor(n) for n in roi_negs])),
        "roi_neg_mask": per_slot(neg_mask),
        "img_neg_feat": torch.stack([texts_tensor(n) for n in img_negs]),
        "img_neg_mask": img_mask,
        "cell_feat": torch.randn(n_img, GRID, GRID, IMG_DIM, generator=gen),
        "cell_valid": cell_valid,
        "phrase_feat": torch.stack([texts_tensor([f"{c} phrase {k}" for k in range(PHRASES)]) for c in REPORTS]),
        "phrase_mask": phrase_mask,
        "phrase_target": target,
    }


def rank_slice(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    start = sum(IMAGES_PER_RANK[:rank])
    return {k: v[start : start + IMAGES_PER_RANK[rank]] for k, v in batch.items()}


class Towers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(IMG_DIM, EMB_DIM)
        self.image_global = nn.Linear(IMG_DIM, EMB_DIM)
        self.text = nn.Linear(TXT_DIM, EMB_DIM)
        self.roi = nn.Linear(IMG_DIM, EMB_DIM)
        self.cell = nn.Linear(IMG_DIM, EMB_DIM)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.grounding_log_scale = nn.Parameter(torch.tensor(math.log(5.0)))

    def forward(self, b: dict[str, torch.Tensor], distributed: bool = True) -> dict[str, torch.Tensor]:
        return compute_losses(self.features(b), WEIGHTS, distributed)

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
            roi_mask=b["roi_mask"],
            caption=text(b["caption_feat"]),
            caption_ids=b["caption_ids"],
            roi_negatives=text(b["roi_neg_feat"]),
            roi_negatives_mask=b["roi_neg_mask"],
            image_negatives=text(b["img_neg_feat"]),
            image_negatives_mask=b["img_neg_mask"],
            cells=F.normalize(self.cell(b["cell_feat"]), dim=-1),
            cell_valid=b["cell_valid"],
            phrases=text(b["phrase_feat"]),
            phrase_mask=b["phrase_mask"],
            phrase_target=b["phrase_target"],
            grounding_scale=self.grounding_log_scale.exp(),
        )


def check_gather(rank: int) -> dict:
    full = torch.arange(4 * 4, dtype=torch.float32).reshape(4, 2, 2)
    x = full[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
    gathered = gather_with_grad(x)
    # Each rank's loss weights the union differently; the gradient a rank receives for its
    # slice is the sum over ranks (autograd all-gather), as the local loss needs.
    weight = torch.randn(full.shape, generator=torch.Generator().manual_seed(7 + rank))
    (gathered * weight).sum().backward()
    weight_sum = sum(torch.randn(full.shape, generator=torch.Generator().manual_seed(7 + r)) for r in range(2))

    ids_full = torch.tensor([11, 22, 33, 44], dtype=torch.long)
    ids = gather_tensor(ids_full[2 * rank : 2 * rank + 2])
    mask_full = torch.tensor([[True, False], [False, True], [True, True], [False, False]])
    mask = gather_tensor(mask_full[2 * rank : 2 * rank + 2])
    total = all_reduce_sum(torch.tensor([1.0 + rank]))
    return {
        "shape": list(gathered.shape),
        "value_err": float((gathered.detach() - full).abs().max()),
        "grad_err": float((x.grad - weight_sum[2 * rank : 2 * rank + 2]).abs().max()),
        "ids_equal": ids.dtype == torch.long and torch.equal(ids, ids_full),
        "mask_equal": mask.dtype == torch.bool and torch.equal(mask, mask_full),
        "sum": total.item(),
    }


def check_losses(rank: int, world: int) -> dict:
    torch.manual_seed(rank)  # different on purpose: DDP must broadcast rank 0's weights
    model = Towers()
    ddp = DistributedDataParallel(model)
    torch.manual_seed(0)
    reference = Towers()
    batch = union_batch()

    # Data parallel: local rows against gathered columns, DDP averages world × local grads.
    out = ddp(rank_slice(batch, rank))
    (out["total"] * world).backward()
    summed = {k: all_reduce_sum(v.detach()).item() for k, v in out.items()}

    ref_out = reference(batch, distributed=False)  # the single-process loss, inside the process group
    ref_out["total"].backward()

    grad_err = 0.0
    for p, q in zip(model.parameters(), reference.parameters()):
        grad_err = max(grad_err, float((p.grad - q.grad).abs().max()))
    return {
        "local_rois": int(rank_slice(batch, rank)["roi_mask"].sum()),
        "terms": sorted(out),
        "loss": summed,
        "ref_loss": {k: v.item() for k, v in ref_out.items()},
        "loss_err": max(abs(summed[k] - ref_out[k].item()) for k in ref_out),
        "weights_err": max(float((p - q).abs().max()) for p, q in zip(model.parameters(), reference.parameters())),
        "grad_err": grad_err,
        "grad_norm": sum(q.grad.norm().item() for q in reference.parameters()),
    }


def main(out_dir: str) -> None:
    info = init_distributed(backend="gloo")
    result: dict = {"rank": info.rank, "world_size": info.world_size, "device": str(info.device)}
    try:
        result["gather"] = check_gather(info.rank)
        result["losses"] = check_losses(info.rank, info.world_size)
        result["loss_names"] = list(LOSS_NAMES)
    except Exception:  # the test reports it; the other rank will fail on its own
        result["error"] = traceback.format_exc()
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(result, indent=1))
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1])

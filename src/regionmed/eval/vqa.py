"""VQA as classification over the training answer set, with a small head on frozen encoders.

**Answer normalisation** (:func:`normalize_answer`), applied to training and test
answers alike before they are compared:

1. the answer is read as text (VQA-RAD has a few integer answers) and Unicode
   NFKC-normalised;
2. lower case;
3. every punctuation character becomes a space, except a ``.`` between two digits
   (a decimal point: ``"2.5 cm"`` stays), and a ``,`` between two digits is removed
   (``"1,000"`` → ``"1000"``);
4. runs of whitespace become one space; leading/trailing space is removed.

So ``"X-Ray"``, ``"x ray"`` and ``" X-ray. "`` are one answer (``"x ray"``).

**Answer set**: the normalised answers of the TRAINING questions only. Test answers
outside it cannot be predicted; they count as wrong, and their share is reported
(``out_of_set``), together with the accuracy on the in-set questions.

**Head**: an MLP on ``[image embedding ; question embedding]``: Linear(2D, hidden)
→ GELU → Dropout → Linear(hidden, n_answers), AdamW, cross-entropy. With validation
questions, the epoch with the best validation accuracy is kept.

* **frozen** (default, :func:`run_vqa`): both embeddings come from the frozen model,
  precomputed once; the head trains for ``epochs`` on them.
* **fine-tuned** (``VQAConfig.finetune``, :func:`run_vqa_finetune`): linear probe,
  then fine-tune. The head first trains as above; then a copy of the model trains
  end to end with it (image tower, ROI processor, text tower and projections at
  ``finetune_lr``, the head at ``lr``) for ``finetune_epochs``, keeping the best
  of the probe and each epoch on validation. The images are read and preprocessed
  once (kept in memory), and their test-time ROIs are fixed before training. The
  caller's model is never changed.

Questions whose image could not be read are skipped and counted (``skipped``).
"""

from __future__ import annotations

import copy
import re
import unicodedata
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from regionmed.data.loader import ImageBatch
from regionmed.eval.images import ImageSetEmbeddings, feature_of, prepare_all, resolve_rois
from regionmed.eval.stats import bootstrap_counts, mean_with_ci
from regionmed.optim import GuardedStep


@dataclass
class Question:
    """One VQA question about one image (answers are compared after normalisation)."""

    qid: str
    image_key: str
    question: str
    answer: str
    answer_type: str  # "OPEN" | "CLOSED"
    qtypes: list[str] = field(default_factory=list)


_PUNCT = re.compile(r"[^\w\s]|_")


def _is_decimal_point(m: re.Match) -> bool:
    s, i = m.string, m.start()
    return m.group(0) == "." and 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit()


def normalize_answer(answer) -> str:
    """Normalise an answer (see the module docstring for the exact rules)."""
    text = unicodedata.normalize("NFKC", str(answer)).lower()
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    text = _PUNCT.sub(lambda m: m.group(0) if _is_decimal_point(m) else " ", text)
    return " ".join(text.split())


def answer_vocabulary(train: list[Question]) -> list[str]:
    """Sorted normalised answers of the training questions."""
    return sorted({normalize_answer(q.answer) for q in train} - {""})


@dataclass
class VQAConfig:
    image_feature: str = "fused"  # global | fused | roi
    hidden: int = 512
    dropout: float = 0.2
    epochs: int = 60
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 128
    seed: int = 0
    n_boot: int = 1000
    finetune: bool = False  # train the encoders with the head (see run_vqa_finetune)
    finetune_epochs: int = 3
    finetune_lr: float = 1e-5  # encoders; the head keeps ``lr``
    finetune_batch_size: int = 32
    # The trainer's step rules (regionmed.optim.GuardedStep), for the fine-tuning stage:
    precision: str = "fp32"  # fp32 | bf16 autocast
    grad_clip: float = 1.0  # global gradient-norm clip; 0 = off
    max_nonfinite: int = 5  # non-finite steps in a row before the fine-tuning stops with an error


class VQAHead(nn.Module):
    def __init__(self, dim_in: int, n_answers: int, hidden: int = 512, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_answers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _features(model, questions: list[Question], images: ImageSetEmbeddings, kind: str):
    """(features, kept questions, skipped questions)."""
    index = images.index()
    kept = [q for q in questions if q.image_key in index]
    skipped = [q for q in questions if q.image_key not in index]
    if not kept:
        return torch.zeros(0, 2 * images.global_.shape[1]), kept, skipped
    with torch.no_grad():
        qemb = model.encode_text([q.question for q in kept]).float().cpu()
    img = images.get(kind)[torch.tensor([index[q.image_key] for q in kept])].float()
    return torch.cat([img, qemb], dim=1), kept, skipped


def _accuracy(head, x, y) -> float:
    head.eval()
    with torch.no_grad():
        return float((head(x).argmax(1) == y).float().mean()) if len(y) else 0.0


def train_head(x: torch.Tensor, y: torch.Tensor, n_answers: int, cfg: VQAConfig,
               val: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[VQAHead, dict]:
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    head = VQAHead(x.shape[1], n_answers, cfg.hidden, cfg.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    best, best_state, best_epoch, history = -1.0, None, cfg.epochs, []
    for epoch in range(cfg.epochs):
        head.train()
        perm = torch.randperm(len(y), generator=gen)
        total = 0.0
        for start in range(0, len(y), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            loss = loss_fn(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        rec = {"epoch": epoch + 1, "loss": total / max(1, len(y))}
        if val is not None and len(val[1]):
            acc = _accuracy(head, *val)
            rec["val_accuracy"] = acc
            if acc > best:
                best, best_state, best_epoch = acc, copy.deepcopy(head.state_dict()), epoch + 1
        history.append(rec)
    if best_state is not None:
        head.load_state_dict(best_state)
    head.eval()
    return head, {"epochs_run": cfg.epochs, "epoch_kept": best_epoch, "history": history}


def _answer_set(train: list[Question], name: str) -> tuple[list[str], dict[str, int], list[str]]:
    """(answer vocabulary, answer → class index, problems) of the training questions."""
    vocab = answer_vocabulary(train)
    if not vocab:
        raise ValueError(f"{name}: the training split has no answers")
    problems = [f"training question {q.qid}: answer {q.answer!r} is empty after normalisation (skipped)"
                for q in train if not normalize_answer(q.answer)]
    return vocab, {a: i for i, a in enumerate(vocab)}, problems


def run_vqa(model, train: list[Question], test: list[Question], images: ImageSetEmbeddings, cfg: VQAConfig | None = None,
            val: list[Question] | None = None, name: str = "vqa") -> dict:
    """Train the head on ``train`` (best epoch on ``val`` when given) and score ``test``."""
    cfg = cfg or VQAConfig()
    vocab, pos, problems = _answer_set(train, name)
    xtr, qtr, sktr = _features(model, [q for q in train if normalize_answer(q.answer)], images, cfg.image_feature)
    if not qtr:
        raise ValueError(f"{name}: no training question has a readable image")
    ytr = torch.tensor([pos[normalize_answer(q.answer)] for q in qtr])
    val_xy = None
    if val:
        xv, qv, _ = _features(model, val, images, cfg.image_feature)
        in_set = [i for i, q in enumerate(qv) if normalize_answer(q.answer) in pos]
        val_xy = (xv[in_set], torch.tensor([pos[normalize_answer(qv[i].answer)] for i in in_set], dtype=torch.long))
    head, training = train_head(xtr, ytr, len(vocab), cfg, val_xy)
    xte, qte, skte = _features(model, test, images, cfg.image_feature)
    for q in sktr + skte:
        problems.append(f"question {q.qid}: image {q.image_key} is missing or unreadable (skipped)")
    with torch.no_grad():
        pred = head(xte).argmax(1).tolist() if qte else []
    out = score_answers(pred, qte, vocab, cfg, name)
    out.update(rois=images.rois, train_questions=len(qtr), skipped={"train": len(sktr), "test": len(skte)},
               val_questions_used=int(len(val_xy[1])) if val_xy else 0, problems=problems[:50], n_problems=len(problems),
               training={k: v for k, v in training.items() if k != "history"})
    return out


def score_answers(pred: list[int], qte: list[Question], vocab: list[str], cfg: VQAConfig, name: str) -> dict:
    """Accuracy (overall / open / closed, bootstrap CIs), per question type, and the
    share of test answers outside the answer set, for predicted answer indices."""
    pos = {a: i for i, a in enumerate(vocab)}
    gold = [normalize_answer(q.answer) for q in qte]
    correct = np.array([float(vocab[p] == g) for p, g in zip(pred, gold)])
    in_set = np.array([g in pos for g in gold], dtype=bool)
    counts = bootstrap_counts(len(qte), cfg.n_boot, cfg.seed)

    def acc(mask: np.ndarray) -> dict:
        sub = correct[mask]
        if mask.sum() == 0:
            return {"value": None, "ci": [None, None], "n": 0}
        return mean_with_ci(sub, bootstrap_counts(int(mask.sum()), cfg.n_boot, cfg.seed))

    types = np.array([q.answer_type for q in qte])
    per_type: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(qte):
        for t in q.qtypes:
            per_type[t].append(i)
    return {
        "name": name,
        "image_feature": cfg.image_feature,
        "encoders": "fine-tuned" if cfg.finetune else "frozen",
        "answers": len(vocab),
        "test_questions": len(qte),
        "overall": mean_with_ci(correct, counts) if len(qte) else {"value": None, "ci": [None, None], "n": 0},
        "open": acc(types == "OPEN"),
        "closed": acc(types == "CLOSED"),
        "per_question_type": {t: {"accuracy": float(correct[idx].mean()), "n": len(idx)} for t, idx in sorted(per_type.items())},
        "out_of_set": {"count": int((~in_set).sum()), "share": float((~in_set).mean()) if len(in_set) else 0.0,
                       "examples": sorted({g for g, ok in zip(gold, in_set) if not ok})[:10],
                       "note": "test answers outside the training answer set count as wrong"},
        "in_set_accuracy": float(correct[in_set].mean()) if in_set.any() else None,
        "config": asdict(cfg),
    }


def run_vqa_finetune(model, train: list[Question], test: list[Question], refs, rois: str = "none",
                     cfg: VQAConfig | None = None, val: list[Question] | None = None, name: str = "vqa",
                     phrases: list[str] | None = None, progress: bool = False) -> dict:
    """VQA with the encoders fine-tuned together with the head (a copy of ``model``).

    Linear probe, then fine-tune: the head first trains on the frozen embeddings
    exactly as in :func:`run_vqa` (``epochs``), then head and encoders train end to
    end for ``finetune_epochs``. With validation questions the best of the probe
    (epoch 0) and every fine-tuning epoch is kept, so a fine-tuning that hurts on
    validation is not kept. ``refs``: the ImageRefs of every question's image;
    ``rois``: test-time ROIs (none / given / self), fixed before training. Returns
    what :func:`run_vqa` does."""
    from tqdm import tqdm

    cfg = cfg or VQAConfig(finetune=True)
    vocab, pos, problems = _answer_set(train, name)
    plan = resolve_rois(model, refs, rois, phrases, cfg.finetune_batch_size)
    cache, missing = prepare_all(refs, plan)
    for key, why in missing:
        problems.append(f"image {key} could not be read ({why})")
    qtr = [q for q in train if normalize_answer(q.answer) and q.image_key in cache]
    sktr = [q for q in train if normalize_answer(q.answer) and q.image_key not in cache]
    if not qtr:
        raise ValueError(f"{name}: no training question has a readable image")
    qv = [q for q in (val or []) if q.image_key in cache and normalize_answer(q.answer) in pos]
    qte = [q for q in test if q.image_key in cache]
    skte = [q for q in test if q.image_key not in cache]
    for q in sktr + skte:
        problems.append(f"question {q.qid}: image {q.image_key} is missing or unreadable (skipped)")

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tuned = copy.deepcopy(model)
    start_weights = torch.cat([p.detach().flatten().float().cpu() for p in model.parameters()])
    device = tuned.logit_scale.device
    bs = cfg.finetune_batch_size

    def image_features(questions: list[Question]) -> torch.Tensor:
        emb = tuned.encode_batch(ImageBatch.from_samples([cache[q.image_key] for q in questions]), plan.use_rois)
        return feature_of(emb, cfg.image_feature)

    def features(questions: list[Question]) -> torch.Tensor:
        tuned.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(questions), bs):
                part = questions[start : start + bs]
                img = image_features(part)
                out.append(torch.cat([img, tuned.encode_text([q.question for q in part])], dim=1).float())
        return torch.cat(out) if out else torch.zeros(0, 2 * tuned.cfg.embed_dim, device=device)

    def predict(questions: list[Question]) -> list[int]:
        x = features(questions)
        head.eval()
        with torch.no_grad():
            return head(x).argmax(1).tolist() if len(x) else []

    def val_accuracy() -> float:
        gold = [pos[normalize_answer(q.answer)] for q in qv]
        return float(np.mean([p == g for p, g in zip(predict(qv), gold)]))

    # 1. linear probe on the frozen embeddings (as run_vqa)
    ytr = torch.tensor([pos[normalize_answer(q.answer)] for q in qtr])
    val_xy = (features(qv).cpu(), torch.tensor([pos[normalize_answer(q.answer)] for q in qv], dtype=torch.long)) if qv else None
    head, probe = train_head(features(qtr).cpu(), ytr, len(vocab), cfg, val_xy)
    history = [{"epoch": 0, "val_accuracy": _accuracy(head, *val_xy)}] if qv else []  # the probe, on the features above
    head = head.to(device)
    best, best_epoch = (history[0]["val_accuracy"], 0) if qv else (-1.0, cfg.finetune_epochs)
    best_state = (copy.deepcopy(tuned.state_dict()), copy.deepcopy(head.state_dict())) if qv else None

    # 2. end-to-end fine-tuning of encoders + head
    for prm in tuned.parameters():
        prm.requires_grad_(True)
    tuned.logit_scale.requires_grad_(False)  # no contrastive loss here: the temperature is unused
    opt = torch.optim.AdamW([
        {"params": [p for p in tuned.parameters() if p.requires_grad], "lr": cfg.finetune_lr},
        {"params": list(head.parameters()), "lr": cfg.lr},
    ], weight_decay=cfg.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    guard = GuardedStep(cfg.precision, cfg.grad_clip, cfg.max_nonfinite)
    params = [*tuned.parameters(), *head.parameters()]
    skipped = 0
    steps = cfg.finetune_epochs * ((len(qtr) + bs - 1) // bs)
    bar = tqdm(total=steps, desc=f"{name} fine-tune", disable=None if progress else True, leave=False)
    for epoch in range(cfg.finetune_epochs):
        tuned.train()
        head.train()
        perm = torch.randperm(len(qtr), generator=gen).tolist()
        total = 0.0
        for start in range(0, len(perm), bs):
            idx = perm[start : start + bs]
            part = [qtr[i] for i in idx]
            with guard.autocast(device):
                img = image_features(part)
                txt = tuned.encode_text([q.question for q in part])
                loss = loss_fn(head(torch.cat([img, txt], dim=1)).float(), ytr[idx].to(device))
            done = guard.step({"total": loss}, opt, params, where=f"{name} fine-tuning, epoch {epoch + 1}")
            if done is None:
                skipped += 1
                problems.append(guard.last_skip)
            else:
                total += done["total"] * len(idx)
            bar.update(1)
        rec = {"epoch": epoch + 1, "loss": total / len(qtr)}
        if qv:
            rec["val_accuracy"] = val_accuracy()
            if rec["val_accuracy"] > best:
                best, best_epoch = rec["val_accuracy"], epoch + 1
                best_state = (copy.deepcopy(tuned.state_dict()), copy.deepcopy(head.state_dict()))
        history.append(rec)
    bar.close()
    if best_state is not None:
        tuned.load_state_dict(best_state[0])
        head.load_state_dict(best_state[1])
    out = score_answers(predict(qte), qte, vocab, cfg, name)
    moved = torch.cat([p.detach().flatten().float().cpu() for p in tuned.parameters()]) - start_weights
    out.update(rois=plan.label, train_questions=len(qtr), skipped={"train": len(sktr), "test": len(skte)},
               val_questions_used=len(qv), problems=problems[:50], n_problems=len(problems),
               training={"probe_epochs": cfg.epochs, "probe_epoch_kept": probe["epoch_kept"],
                         "finetune_epochs": cfg.finetune_epochs, "steps": steps, "skipped_nonfinite_steps": skipped,
                         "precision": cfg.precision, "grad_clip": cfg.grad_clip,
                         "epoch_kept": best_epoch, "epoch_kept_note": "0 = the linear probe (fine-tuning not kept)",
                         "losses": [round(h["loss"], 4) for h in history if "loss" in h],
                         "val_accuracy": [round(h["val_accuracy"], 4) for h in history if "val_accuracy" in h],
                         "encoder_weight_change": float(moved.norm() / start_weights.norm().clamp_min(1e-12))})
    return out

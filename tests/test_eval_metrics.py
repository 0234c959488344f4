import torch
import torch.nn.functional as F

from regionmed.eval.location import hard_negative_accuracy
from regionmed.eval.retrieval import retrieval_recall


def _brute_force(img, txt, owner, ks):
    sims = img @ txt.T
    out = {}
    for k in ks:
        top = sims.topk(min(k, sims.shape[1]), dim=1).indices
        i2t = sum(any(owner[j] == i for j in top[i].tolist()) for i in range(img.shape[0]) if i in owner)
        top_t = sims.T.topk(min(k, sims.shape[0]), dim=1).indices
        t2i = sum(owner[j] in top_t[j].tolist() for j in range(txt.shape[0]))
        out[f"i2t_R@{k}"] = i2t / len(set(owner))
        out[f"t2i_R@{k}"] = t2i / txt.shape[0]
    return out


def test_recall_matches_brute_force_with_several_captions_per_image_and_any_chunk():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    owner = [i // 2 for i in range(80)]  # two captions per image
    txt = F.normalize(img[owner] + 0.8 * torch.randn(80, 16, generator=g), dim=-1)
    expected = _brute_force(img, txt, owner, (1, 5, 10))
    for chunk in (1, 7, 1000):
        got = retrieval_recall(img, txt, owner, ks=(1, 5, 10), chunk=chunk)
        assert got == expected
    assert 0 < expected["i2t_R@1"] < expected["i2t_R@10"] <= 1


def test_identical_texts_are_one_caption_of_several_images():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0.6, 0.8, 0], [0.6, 0.8, 0]])  # texts 1 and 2 are the same string
    texts = ["a", "normal", "normal"]
    got = retrieval_recall(img, txt, [0, 1, 2], texts, ks=(1,))
    # merged: "normal" describes images 1 and 2 and ranks image 1 first, so both of its queries hit
    assert got["t2i_R@1"] == 1.0
    # not merged: the copy owned by image 2 also ranks image 1 first, a miss
    no_merge = retrieval_recall(img, txt, [0, 1, 2], None, ks=(1,))
    assert abs(no_merge["t2i_R@1"] - 2 / 3) < 1e-9


def test_hard_negative_accuracy_counts_wins_per_rule_and_subset():
    region = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    caption = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    negs = [torch.tensor([[0.1, 0.9], [0.95, 0.0]]), torch.tensor([[0.2, 0.8], [0.7, 0.3]])]
    rules = [["laterality", "finding"], ["laterality", "zone"]]
    out = hard_negative_accuracy(region, caption, negs, rules)
    # region 0: beats laterality (0.9 > 0.1), loses to finding (0.9 < 0.95); region 1: beats laterality, loses to zone
    assert out["all"] == 0.0 and out["rule:laterality"] == 1.0 and out["rule:finding"] == 0.0 and out["rule:zone"] == 0.0
    only = hard_negative_accuracy(region, caption, negs, rules, only_rules=("laterality",))
    assert only["all"] == 1.0 and only["n"] == 2 and only["chance"] == 0.5

"""Turn VQA question–answer pairs into plain sentences (for VQA-RAD and SLAKE reports)."""

from __future__ import annotations

import re

_YES = {"yes", "y", "true"}
_NO = {"no", "n", "false"}


def _clean(text: str) -> str:
    return " ".join(str(text).replace("?", " ").split()).strip()


def _sentence(text: str) -> str:
    text = text.strip().rstrip(".")
    return (text[:1].upper() + text[1:] + ".") if text else ""


def qa_to_sentence(question: str, answer: str, kind: str = "") -> str:
    """A declarative sentence for one QA pair, or "" when none can be made.

    Closed (yes/no) questions are rewritten ("Is there a pneumothorax?" + "No" →
    "There is no pneumothorax."); open ones by their type (modality, plane,
    organ, position, abnormality) or as "<question>: <answer>.".
    """
    q = _clean(question)
    a = _clean(answer)
    if not q or not a:
        return ""
    ql, al = q.lower(), a.lower()
    kind = (kind or "").upper()
    if re.search(r"\b(not|n't)\b", ql):
        return _sentence(f"{q}: {a}")
    a = re.sub(r"^(the|a|an) ", "", a, flags=re.I)
    if al in ("not seen", "unknown", "n/a"):
        return ""
    if al in _YES or al in _NO:
        yes = al in _YES
        patterns = [
            (r"^(is|are) there (an |a |any )?(evidence of )?(.+)$", lambda m: f"there {'is' if m.group(1) == 'is' else 'are'} {'' if yes else 'no '}{m.group(3) or ''}{m.group(4)}"),
            (r"^(is|are) (the )?(.+?) (normal|abnormal|enlarged|present|visible|seen|dilated|symmetric|symmetrical|healthy)(.*)$",
             lambda m: f"{m.group(2) or ''}{m.group(3)} {m.group(1)} {'' if yes else 'not '}{m.group(4)}{m.group(5)}"),
            (r"^(is|are) this (image )?(an? )?(.+)$", lambda m: f"this image is {'' if yes else 'not '}{m.group(3) or ''}{m.group(4)}"),
            (r"^(does|do) (the )?(.+?) (show|have|contain|appear|look)(s)? (.+)$",
             lambda m: f"{m.group(2) or ''}{m.group(3)} {'' if yes else ('does not ' if m.group(1) == 'does' else 'do not ')}{m.group(4)}{('s' if yes and m.group(1) == 'does' else '')} {m.group(6)}"),
            (r"^(can|could) (you |we )?(see|identify|detect) (an |a |any )?(.+)$", lambda m: f"{'' if yes else 'no '}{m.group(5)} {'is' if yes else 'is'} seen"),
            (r"^(is|are|was|were) (the |a |an )?(\w+(?: of the \w+)?) (.+)$",
             lambda m: f"{m.group(2) or ''}{m.group(3)} {m.group(1)} {'' if yes else 'not '}{m.group(4)}"),
        ]
        for pat, fn in patterns:
            m = re.match(pat, ql)
            if m:
                return _sentence(" ".join(fn(m).split()))
        return _sentence(f"{q}: {al}")
    if kind in ("MODALITY",) or re.search(r"\b(modality|imaging technique|type of (image|imaging|scan))\b", ql):
        return _sentence(f"the imaging modality is {a}")
    if kind == "PLANE" or re.search(r"\bplane\b", ql):
        return _sentence(f"the image is in the {a} plane")
    if kind == "ORGAN" or re.search(r"\b(organ system|which organ|what organ|part of the body|body part)\b", ql):
        return _sentence(f"the image shows the {a}")
    if re.search(r"\b(diseases?|abnormalit\w*|findings?)\b", ql) and re.match(r"^(what|which)\b", ql):
        return _sentence(f"findings: {a}")
    if re.match(r"^where\b", ql):
        subject = re.sub(r"^where (is|are) (the )?", "", ql)
        return _sentence(f"{subject} is located in the {a}" if subject != ql else f"{ql}: {a}")
    return _sentence(f"{q}: {a}")


def facts_report(pairs: list[tuple[str, str, str]], max_sentences: int = 40) -> list[str]:
    """Unique sentences from ``[(question, answer, type)]``, in order."""
    out: list[str] = []
    seen: set[str] = set()
    for q, a, kind in pairs:
        s = qa_to_sentence(q, a, kind)
        key = s.lower()
        if s and key not in seen:
            seen.add(key)
            out.append(s)
        if len(out) >= max_sentences:
            break
    return out

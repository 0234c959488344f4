"""Evaluation: zero-shot AUC, retrieval, VQA, grounding, and the same-data ablation.

Modules (imported on use; nothing heavy happens at ``import regionmed.eval``):

* :mod:`.embed`, :mod:`.retrieval`, :mod:`.location` — embedding a MedRegion split,
  chunked R@K with several captions per image, the hard-negative location test;
* :mod:`.images` — ``embed_images(model, refs, rois="none"|"given"|"self")``;
* :mod:`.prompts` — versioned prompt templates (``prompts/default.yaml``), per-dataset overrides;
* :mod:`.stats` — AUC / accuracy with seeded, vectorised bootstrap 95% CIs;
* :mod:`.zeroshot` — prompt-ensemble zero-shot classification (softmax or pos/neg pairs), ROC plot;
* :mod:`.vqa` — answer normalisation, training answer set, MLP head on frozen embeddings;
* :mod:`.grounding` — patch–text similarity maps → point + box, pointing game, IoU, overlays;
* :mod:`.datasets` — SLAKE / VQA-RAD read from their JSON, MedRegion labels, class folders;
* :mod:`.run` — ``evaluate(model, EvalOptions, out_dir)``; :mod:`.report` — JSON + Markdown;
* :mod:`.ablation` — ``regionmed ablate``; :mod:`.cli` — ``add_eval_parser``, ``add_ablate_parser``.
"""

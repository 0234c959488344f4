"""Evaluation primitives: zero-shot AUC, retrieval, VQA heads, grounding, overlays.

Modules (imported on use; nothing heavy happens at ``import regionmed.eval``):

* :mod:`.embed`, :mod:`.retrieval`, :mod:`.location` — embedding a MedRegion split,
  chunked R@K with several captions per image, the hard-negative location test;
* :mod:`.images` — ``embed_images(model, refs, rois="none"|"given"|"self")`` (given boxes
  that cannot be used are listed in ``box_problems``);
* :mod:`.prompts` — versioned prompt templates (``prompts/default.yaml``), user files laid over them;
* :mod:`.stats` — AUC / accuracy with seeded, vectorised bootstrap 95% CIs;
* :mod:`.zeroshot` — prompt-ensemble zero-shot classification (softmax or cosine), ROC plot;
* :mod:`.vqa` — answer normalisation, training answer set, MLP head on frozen embeddings;
* :mod:`.grounding` — patch–text similarity maps → point + box, pointing game, IoU;
* :mod:`.readout` — ``ground_image``: one image + phrases → heatmaps, peaks, boxes (patch map or
  windows through the ROI path), shared by evaluation and :mod:`regionmed.inference`;
* :mod:`.overlay` — ``render_overlay``: a heatmap, its box and peak drawn over the image.

The suites over SLAKE / VQA-RAD / MedRegion splits / class folders, ``regionmed eval`` and the
ablation are applications (:mod:`regionmed.apps.evaluate`, :mod:`regionmed.apps.ablation`).
"""

"""Dataset curation: the MedRegion dataset builder (``regionmed build``) and the synthetic phantoms.

Turns real images and their text (reports, clinical notes, VQA question–answer
facts) into region-annotated, multi-caption MedRegion shards that the trainer
reads with :class:`regionmed.data.shards.MedRegionDataset`.

An application: it uses the library (:mod:`regionmed.data` for the shard format)
and the library never imports it. Pieces:

* :mod:`.sources` — small adapters behind one interface (:class:`.sources.Source`)
  that iterate raw items: ``generic`` (folder + CSV/JSONL table, COCO / YOLO / VOC boxes),
  ``detection`` (folder of images + YOLO or VOC labels), ``dicom``, ``slake``, ``vqa_rad``, ``covid_cxr``;
* :mod:`.tables` — the one reader of tables and text files (encodings, headers,
  row lengths, missing-value spellings); ``Source.check`` reads every row before a build;
* :mod:`.captions` — summary / report / region captions and rule-based hard negatives;
* :mod:`.proposers` — ROI proposers by name: ``annotation``, ``unsupervised``, ``detector``;
* :mod:`.builder` — streaming, parallel, resumable build with rejects and a manifest;
* :mod:`.leakage`, :mod:`.stats` — dataset checks; :mod:`.cli` — the subcommands;
* :mod:`.phantoms` — deterministic synthetic radiographs written as a MedRegion dataset.

Records written by the builder add these optional fields to schema v1:
``sha256`` (hex digest of the stored image bytes), ``phash`` (64 hex digits,
256-bit DCT perceptual hash of the image; 16 digits before builder 1.1) and, on regions, ``location``
({"side", "vertical", "radial"}); from builder 1.2, ``caption_rule`` and ``report_captions``
(report sentences matched to the region, each with its rule), and each split's
``<split>-index.npz`` with build-time statistics in the manifest; from builder 1.3, a region's
``kind`` ("anatomy" | "finding", when the source knows it) and class names written in
CamelCase / snake_case read as words in captions.

An unfinished build is resumed only by the same builder version (staged items of
another version are built again).
"""

from __future__ import annotations

BUILDER_VERSION = "1.3.0"

__all__ = ["BUILDER_VERSION"]

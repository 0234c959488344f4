"""Task ``retrieval``: image↔report and region↔caption R@1/5/10 on a MedRegion split (:mod:`regionmed.eval.retrieval`)."""

from __future__ import annotations

from regionmed.apps.evaluate.context import EvalContext, EvalData
from regionmed.apps.evaluate.markdown import pct
from regionmed.apps.evaluate.tasks.base import EvalTask
from regionmed.eval.embed import embed_split
from regionmed.eval.retrieval import retrieval_recall


class Retrieval(EvalTask):
    """Image->report and region->caption R@1/5/10 both ways (--rois given: the ROI embeddings of the split's boxes)."""

    name = "retrieval"
    datasets = "--medregion: its split's reports and region captions"

    def unsupported(self, data: EvalData) -> str | None:
        return None if data.medregion else "retrieval needs a MedRegion dataset with reports: --medregion DIR"

    def run(self, model, ctx: EvalContext, options) -> dict:
        data = ctx.datasets
        emb = embed_split(model, data.medregion.split(data.data.medregion_split), batch_size=ctx.opts.batch_size, progress=False)
        for where, why in emb.skipped:
            ctx.problems.add(self.name, f"sample {where} could not be read ({why}); skipped")
        if ctx.opts.rois == "self":
            ctx.problems.add(self.name, "--rois self is not used by retrieval (the split's own boxes or none): scored with none", "note")
        # --rois given: the fused image embedding and the ROI embeddings of the split's boxes; otherwise (the default,
        # none) the whole-image embedding for reports and for each region's caption alike.
        region_aware = emb.region_emb is not None and ctx.opts.rois == "given"
        image = emb.image_fused if region_aware else emb.image_global
        res = {"reports": retrieval_recall(image, emb.report_emb, list(range(len(emb.reports))), emb.reports)}
        if len(emb.captions):
            region_side = emb.region_emb if region_aware else emb.image_global[emb.region_image]
            res["region_captions"] = retrieval_recall(region_side, emb.caption_emb, list(range(len(emb.captions))), emb.captions)
        res["rois"] = "given" if region_aware else "none"
        res["n_images"] = len(emb.ids)
        res["n_skipped"] = len(emb.skipped)
        return res

    def report(self, r: dict) -> list[str]:
        lines = ["## Retrieval", "", f"{r.get('n_images')} images; test-time ROIs: {r.get('rois')}", "",
                 "| texts | i→t R@1 | R@5 | R@10 | t→i R@1 | R@5 | R@10 |", "|---|---|---|---|---|---|---|"]
        for name in ("reports", "region_captions"):
            d = r.get(name)
            if d:
                lines.append(f"| {name} | " + " | ".join(pct(d[f"{w}_R@{k}"]) for w in ("i2t", "t2i") for k in (1, 5, 10)) + " |")
        return lines

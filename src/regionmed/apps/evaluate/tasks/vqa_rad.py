"""Task ``vqa_rad``: VQA on the built-in VQA-RAD, 3,064 train / 451 test questions (the VQA runner of :mod:`.vqa`)."""

from __future__ import annotations

from regionmed.apps.evaluate.context import EvalContext, EvalData
from regionmed.apps.evaluate.tasks.vqa import VQAOptions, VQATask


class VqaRadVQA(VQATask):
    __doc__ = VQATask.__doc__

    name = "vqa_rad"
    datasets = "VQA-RAD 3,064 train / 451 test questions (built-in)"
    headline = (
        ("VQA-RAD overall", ("overall", "value")),
        ("VQA-RAD open", ("open", "value")),
        ("VQA-RAD closed", ("closed", "value")),
    )

    def default(self, data: EvalData) -> bool:
        return data.uses_builtin

    def uses_data_root(self, data: EvalData) -> bool:
        return True

    def questions(self, ctx: EvalContext, options: VQAOptions):
        vqa_rad = ctx.datasets.vqa_rad
        train, test, val, keys = self.limited(ctx, vqa_rad.questions("train"), vqa_rad.questions("test"), None)
        return train, test, val, vqa_rad.image_refs(keys)

"""Task ``slake_vqa``: VQA on the built-in SLAKE, English train / validate (best epoch) / test (the VQA runner of :mod:`.vqa`)."""

from __future__ import annotations

from regionmed.apps.evaluate.context import EvalContext, EvalData
from regionmed.apps.evaluate.tasks.vqa import VQAOptions, VQATask


class SlakeVQA(VQATask):
    __doc__ = VQATask.__doc__

    name = "slake_vqa"
    datasets = "SLAKE English train / validate (best epoch) / test (built-in)"
    headline = (
        ("SLAKE VQA overall", ("overall", "value")),
        ("SLAKE open", ("open", "value")),
        ("SLAKE closed", ("closed", "value")),
    )

    def default(self, data: EvalData) -> bool:
        return data.uses_builtin

    def uses_data_root(self, data: EvalData) -> bool:
        return True

    def questions(self, ctx: EvalContext, options: VQAOptions):
        slake = ctx.datasets.slake
        val = slake.questions("validate") if options.use_val else None
        train, test, val, keys = self.limited(ctx, slake.questions("train"), slake.questions("test"), val)
        return train, test, val, slake.image_refs(keys)[0]

"""Task ``vqa`` (a user's question file) and the VQA runner that ``vqa_rad`` and ``slake_vqa`` share.

VQA = an MLP head on [image ; question] embeddings of the frozen model (or, with
``--vqa-finetune``, of a copy trained end to end with it), answers = the training answer set
(normalised: case, whitespace, punctuation); the share of test answers outside it is reported
(:mod:`regionmed.eval.vqa`).
"""

from __future__ import annotations

from dataclasses import dataclass

from regionmed.apps.evaluate.context import EvalContext, EvalData
from regionmed.apps.evaluate.markdown import pct, with_ci
from regionmed.apps.evaluate.tasks.base import EvalTask, option_field
from regionmed.eval.images import ImageRef
from regionmed.eval.prompts import proposal_phrases
from regionmed.eval.vqa import Question, VQAConfig, run_vqa, run_vqa_finetune


@dataclass
class VQAOptions:
    """The VQA head's training (shared by every VQA task)."""

    epochs: int = option_field(60, "--vqa-epochs", "VQA head training epochs (default 60)")
    hidden: int = option_field(512, "--vqa-hidden", "VQA head hidden width (default 512)")
    finetune: bool = option_field(False, "--vqa-finetune",
                                  "fine-tune the encoders with the VQA head (a copy of the model; default: frozen encoders)")
    finetune_epochs: int = option_field(3, "--vqa-finetune-epochs", "epochs when fine-tuning (default 3)")
    finetune_lr: float = option_field(1e-5, "--vqa-finetune-lr", "encoder learning rate when fine-tuning (default 1e-5)")
    use_val: bool = True  # keep the head's best epoch on the validation questions, where the dataset has them


class VQATask(EvalTask):
    """Accuracy (overall, open, closed, per question type) of an MLP head on [image ; question] embeddings.

    The VQA runner: a subclass says where its questions come from (:meth:`questions`)."""

    Options = VQAOptions
    needs_grad = True

    def questions(self, ctx: EvalContext, options: VQAOptions) -> tuple[list[Question], list[Question], list[Question] | None, list[ImageRef]]:
        """``(train, test, val or None, image refs of those questions)``."""
        raise NotImplementedError

    def dataset_name(self, ctx: EvalContext) -> str:
        return self.name

    def run(self, model, ctx: EvalContext, options: VQAOptions) -> dict:
        train, test, val, refs = self.questions(ctx, options)
        rois, note = ctx.opts.rois, ""
        if rois == "given" and not any(r.boxes for r in refs):
            rois, note = "none", "no boxes come with these images: given ROIs = none"
        cfg = VQAConfig(epochs=options.epochs, hidden=options.hidden, finetune=options.finetune,
                        finetune_epochs=options.finetune_epochs, finetune_lr=options.finetune_lr,
                        image_feature=ctx.feature(model), seed=ctx.opts.seed, n_boot=ctx.opts.n_boot)
        if cfg.finetune:
            res = run_vqa_finetune(model, train, test, refs, rois, cfg, val, self.name, phrases=proposal_phrases(ctx.opts.prompts),
                                   progress=True)
        else:
            res = run_vqa(model, train, test, ctx.embed(model, refs, self.name, rois), cfg, val, self.name)
        for msg in res.pop("problems"):
            ctx.problems.add(self.name, msg)
        oos = res["out_of_set"]
        if oos["count"]:
            ctx.problems.add(self.name, f"{oos['count']} test answer(s) ({100 * oos['share']:.1f}%) are outside the training answer "
                                        f"set and count as wrong, e.g. {oos['examples'][:5]}", "answer_outside_set")
        if note:
            res["rois_note"] = note
        res["dataset"] = self.dataset_name(ctx)
        return res

    @staticmethod
    def limited(ctx: EvalContext, train, test, val) -> tuple[list, list, list | None, list[str]]:
        """The splits cut to ``--limit-questions`` and the image keys they ask about (in order)."""
        train, test = ctx.limit_questions(train), ctx.limit_questions(test)
        val = ctx.limit_questions(val) if val else val
        return train, test, val, list(dict.fromkeys(q.image_key for q in train + test + (val or [])))

    def report(self, r: dict) -> list[str]:
        lines = [f"## VQA: {self.name}", "",
                 f"Answers (training set only): {r['answers']}; train questions {r['train_questions']}, test questions {r['test_questions']}; "
                 f"test-time ROIs: {r['rois']}; image feature: {r['image_feature']}; head kept at epoch {r['training']['epoch_kept']}.",
                 "", "| overall [95% CI] | open | closed | out-of-set test answers | in-set accuracy |", "|---|---|---|---|---|",
                 f"| {with_ci(r['overall'])} | {with_ci(r['open'])} (n={r['open']['n']}) | {with_ci(r['closed'])} (n={r['closed']['n']}) | "
                 f"{r['out_of_set']['count']} ({pct(r['out_of_set']['share'])}%) | {pct(r['in_set_accuracy'])} |",
                 "", "| question type | n | accuracy |", "|---|---|---|"]
        for t, d in r["per_question_type"].items():
            lines.append(f"| {t} | {d['n']} | {pct(d['accuracy'])} |")
        if r.get("rois_note"):
            lines += ["", r["rois_note"]]
        return lines


class QuestionFileVQA(VQATask):
    __doc__ = VQATask.__doc__

    name = "vqa"
    datasets = ("--questions FILE: a CSV/TSV or JSONL file, one question a row, columns image (path, relative to the file "
                "or absolute), question, answer, split (train / val / test; train and test required), optional answer_type "
                "(OPEN / CLOSED; default CLOSED for yes/no answers), question_type, qid. Errors name the file, row and column.")

    def unsupported(self, data: EvalData) -> str | None:
        if data.questions:
            return None
        return "vqa needs a question file: --questions FILE (columns image, question, answer, split[, answer_type])"

    def questions(self, ctx: EvalContext, options: VQAOptions):
        split_qs, refs = ctx.datasets.question_file()
        val = (split_qs["val"] or None) if options.use_val else None
        train, test, val, keys = self.limited(ctx, split_qs["train"], split_qs["test"], val)
        return train, test, val, [r for r in refs if r.key in set(keys)]

    def dataset_name(self, ctx: EvalContext) -> str:
        return str(ctx.datasets.data.questions)

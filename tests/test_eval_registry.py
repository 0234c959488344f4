"""The evaluation task registry: what each task declares, how options reach it from the command
line, and that a newly registered task is picked up by the CLI, evaluate(), results.json,
report.md and the ablation."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

import pytest

from conftest import tiny_model_config
from regionmed.apps import ablation
from regionmed.apps.evaluate import tasks as registry
from regionmed.apps.evaluate.cli import add_eval_parser, eval_options
from regionmed.apps.evaluate.context import EvalData, EvalOptions
from regionmed.apps.evaluate.report import write_report
from regionmed.apps.evaluate.run import TaskError, evaluate, plan_tasks
from regionmed.apps.evaluate.tasks import EvalTask, get_task, option_field, register_task, task_names, tasks
from regionmed.apps.evaluate.tasks.grounding import GroundingOptions
from regionmed.apps.evaluate.tasks.vqa import VQAOptions
from regionmed.model.clip import RegionMedCLIP


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    return parser


def test_every_task_declares_name_datasets_options_and_run():
    assert task_names() == ["zeroshot", "vqa_rad", "slake_vqa", "grounding", "region_zeroshot", "retrieval", "vqa"]
    for task in tasks():
        assert get_task(task.name) is task and task.datasets and task.__doc__
        assert dataclasses.is_dataclass(task.Options) and type(task).run is not EvalTask.run
        assert type(task).report is not EvalTask.report  # its own report.md section
        for label, path in task.headline:
            assert label and path and all(isinstance(p, str) for p in path)
    with pytest.raises(KeyError, match="unknown evaluation task 'nope' .*known: zeroshot"):
        get_task("nope")


def test_each_task_says_which_datasets_it_can_score():
    none, medregion, folder = EvalData(builtin=False), EvalData(medregion="m"), EvalData(class_folder="c")
    assert plan_tasks(task_names(), medregion).unsupported.keys() == {"vqa"}
    assert set(plan_tasks(task_names(), folder).unsupported) == {"grounding", "region_zeroshot", "retrieval", "vqa"}
    assert set(plan_tasks(task_names(), none).unsupported) == {"zeroshot", "grounding", "region_zeroshot", "retrieval", "vqa"}
    plan = plan_tasks(["grounding", "bogus", "zeroshot"], folder)
    assert plan.run == ["zeroshot"] and plan.unknown == ["bogus"] and "--medregion" in plan.unsupported["grounding"]


def test_command_line_options_reach_each_task():
    args = _parser().parse_args(["eval", "model", "--vqa-epochs", "3", "--vqa-finetune", "--grounding-readouts", "patch",
                                 "--overlays", "2", "--grounding-phrase", "caption", "--n-boot", "50"])
    opts = eval_options(args)
    assert opts.tasks == ["zeroshot", "vqa_rad", "slake_vqa", "grounding"] and opts.n_boot == 50
    for name in ("vqa_rad", "slake_vqa", "vqa"):
        assert opts.task_options[name] == VQAOptions(epochs=3, finetune=True)
    assert opts.task_options["grounding"] == GroundingOptions(readouts=["patch"], overlays=2, phrase="caption")
    defaults = eval_options(_parser().parse_args(["eval", "model"]))
    assert all(o == get_task(name).Options() for name, o in defaults.task_options.items())  # CLI defaults = the dataclass's
    with pytest.raises(TaskError, match="unknown or no task"):
        eval_options(_parser().parse_args(["eval", "model", "--tasks", "zeroshot,nonsense"]))
    with pytest.raises(TaskError, match="task 'retrieval' cannot run on the given data"):
        eval_options(_parser().parse_args(["eval", "model", "--tasks", "retrieval", "--class-folder", "x"]))


@dataclass
class CountOptions:
    words: int = option_field(3, "--count-words", "words per caption")


class CountTask(EvalTask):
    """How many phrases a model is asked about (a registration example)."""

    name = "count"
    datasets = "any: it scores nothing but its options"
    Options = CountOptions
    headline = (("count words", ("words",)),)

    def run(self, model, ctx, options):
        return {"words": options.words, "embed_dim": model.cfg.embed_dim}

    def report(self, results):
        return ["## Count", "", f"{results['words']} words"]


def test_a_registered_task_is_picked_up_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the registry as it was after the test
    register_task(CountTask)
    with pytest.raises(ValueError, match="already registered"):
        register_task(type("Other", (CountTask,), {}))
    help_text = add_eval_parser(argparse.ArgumentParser().add_subparsers()).format_help()
    assert "count" in task_names() and "--count-words" in help_text and "How many phrases" in help_text
    opts = eval_options(_parser().parse_args(["eval", "model", "--tasks", "count", "--count-words", "5"]))
    assert opts.task_options["count"] == CountOptions(words=5)
    model = RegionMedCLIP(tiny_model_config())
    results = evaluate(model, dataclasses.replace(opts, data=EvalData(builtin=False)), tmp_path)
    assert results["tasks"]["count"] == {"words": 5, "embed_dim": 64}
    json_path, md_path = write_report(results, tmp_path)
    assert json.loads(json_path.read_text())["tasks"]["count"]["words"] == 5 and "## Count" in md_path.read_text()
    assert ablation.other_columns({"config": {"eval": {"tasks": ["zeroshot", "count"]}}}) == [("count words", ("count", "words"))]
    assert evaluate(model, EvalOptions(tasks=["count"], data=EvalData(builtin=False)), tmp_path)["tasks"]["count"]["words"] == 3

import json

from regionmed.apps.demo import DEMO_FINDING_SCALE, MODELS, run_demo


def test_demo_pipeline_end_to_end_smoke(tmp_path):
    """The `regionmed demo` pipeline at a tiny scale (steps and data shrunk, real models)."""
    out = tmp_path / "demo"
    run_demo(out, n_train=64, n_test=16, steps_scale=0.02, progress=False)
    results = json.loads((out / "results.json").read_text())
    assert results["phantoms"]["finding_scale"] == DEMO_FINDING_SCALE
    labels = list(MODELS)
    region, pixels, glob = (results["results"][label] for label in labels)
    assert region["scored_with"] == "ROI embedding, given boxes, with box geometry"
    assert pixels["scored_with"] == "ROI embedding, given boxes, pixels only (no box geometry)"
    assert glob["scored_with"].startswith("whole-image")
    assert region["location"]["n"] == pixels["location"]["n"] == glob["location"]["n"] > 0
    # the two region models differ only in box geometry
    configs = [json.loads((out / MODELS[label][0] / "model" / "config.json").read_text())["model"]["roi"] for label in labels[:2]]
    assert [c["box_geometry"] for c in configs] == [True, False]
    assert configs[0]["grid_context"] is configs[1]["grid_context"] is True
    assert {k: v for k, v in configs[0].items() if k != "box_geometry"} == {k: v for k, v in configs[1].items() if k != "box_geometry"}
    # all three models ran the same number of steps
    steps = [sum(1 for line in (out / MODELS[label][0] / "metrics.jsonl").read_text().splitlines() if '"event": "step"' in line)
             for label in labels]
    assert steps == [results["steps"]] * 3
    report = (out / "report.md").read_text()
    assert "location/side" in report and "global-only CLIP" in report and "pixels only (no box geometry)" in report
    assert "Pixels-only region vs global-only" in report
    assert (out / "loss_curves.png").stat().st_size > 1000

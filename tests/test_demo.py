import json

from regionmed.apps.demo import run_demo


def test_demo_pipeline_end_to_end_smoke(tmp_path):
    """The `regionmed demo` pipeline at a tiny scale (steps and data shrunk, real models)."""
    out = tmp_path / "demo"
    run_demo(out, n_train=64, n_test=16, steps_scale=0.02, progress=False)
    results = json.loads((out / "results.json").read_text())
    region, glob = results["results"]["region-aware (full method)"], results["results"]["global-only CLIP"]
    assert region["scored_with"].startswith("ROI") and glob["scored_with"].startswith("whole-image")
    assert region["location"]["n"] == glob["location"]["n"] > 0
    # both models ran the same number of steps
    steps = [sum(1 for line in (out / run / "metrics.jsonl").read_text().splitlines() if '"event": "step"' in line)
             for run in ("region", "global")]
    assert steps[0] == steps[1] == results["steps"]
    report = (out / "report.md").read_text()
    assert "location/side" in report and "global-only CLIP" in report
    assert (out / "loss_curves.png").stat().st_size > 1000

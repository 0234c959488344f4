"""The build / stats / check-leakage subcommands."""

from __future__ import annotations

import argparse

import pytest

from conftest_build import data_dir, public_build  # noqa: F401
from regionmed.apps.cli import main
from regionmed.apps.curation.cli import add_build_parser, add_check_leakage_parser, add_stats_parser


def parser():
    p = argparse.ArgumentParser(prog="regionmed")
    sub = p.add_subparsers(dest="command")
    add_build_parser(sub)
    add_stats_parser(sub)
    add_check_leakage_parser(sub)
    return p


def run(argv):
    return main(argv)  # the command line, with its one error boundary


@pytest.mark.parametrize("cmd,words", [("build", ["--config", "--source", "--input", "--out", "rejects.jsonl"]),
                                       ("stats", ["DIR", "PNG"]), ("check-leakage", ["perceptual", "Exit status"])])
def test_help(cmd, words, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args([cmd, "--help"])
    text = capsys.readouterr().out
    for w in words:
        assert w in text


def test_build_with_flags_then_stats_and_leakage(data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "s"
    assert run(["build", "--source", "slake", "--input", str(data_dir / "slake"), "--out", str(out),
                "--limit", "8", "--workers", "0", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "accounted: 8 inputs = 8 built + 0 rejected [OK]" in text
    assert run(["stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "regions per image" in text and "box size" in text and "modalities" in text
    png = (out / "stats.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert run(["check-leakage", str(out)]) == 0  # no overlap between its own splits
    assert run(["check-leakage", str(out), str(out)]) == 1  # a dataset overlaps itself
    assert "8 exact" in capsys.readouterr().out


def test_build_config_errors_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("out: x\nsources: []\nbogus: 1\n")
    assert run(["build", "--config", str(cfg)]) == 2
    assert "unknown key bogus" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    assert run(["build", "--source", "nope", "--input", str(tmp_path / "in"), "--out", str(tmp_path / "o")]) == 2
    assert "unknown source" in capsys.readouterr().err
    assert run(["stats", str(tmp_path / "missing")]) == 2

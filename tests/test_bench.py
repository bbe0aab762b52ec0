"""The speed benchmark runs and prints its table (ratios are measured by hand, not here)."""

from __future__ import annotations

from tuner import bench


def test_bench_prints_one_line_per_measure(capsys):
    assert bench.main(["--images", "60", "--size", "32", "--epochs", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["measure", "reference", "s", "ours", "s", "ratio", "target"]
    last = lines[-4:]
    assert [line.split(":")[0] for line in last] == [
        "frozen trial",
        "second frozen trial",
        "fine-tune top 20%",
        "decoding",
    ]
    assert all(line.endswith("x") and float(line.split(": ")[1][:-1]) > 0 for line in last)

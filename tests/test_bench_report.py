"""`make bench`'s closing table reads each bench's results file: a goal missed must say NO, a bench not run must
say so, and every peer row must appear, whatever subset of the benches ran."""
from __future__ import annotations

import json

from bench import report


def test_the_table_marks_goals_met_missed_and_not_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    (tmp_path / "supervise.json").write_text(json.dumps({"families": {"sd": {"ratio": 1.07}, "flux": {"ratio": 2.7}}}))
    (tmp_path / "evaluate.json").write_text(json.dumps({"rescore_cold_s": 2.0, "rescore_warm_s": 0.05}))
    (tmp_path / "peers.json").write_text(json.dumps({
        "janus": {"tiny_batch1": {"ratio": 1.1, "ratio_median": 0.9}}, "bench_seconds": 12.0, "threads": 2}))
    report.main()
    lines = {line.split("  ")[0].strip(): line for line in capsys.readouterr().out.splitlines() if line.strip()}

    assert "1.07x" in lines["supervisor steps/s, cached latents vs not, sd"]
    assert lines["supervisor steps/s, cached latents vs not, sd"].split()[-2] == "NO"
    assert lines["supervisor steps/s, cached latents vs not, flux"].split()[-2] == "yes"
    assert "2.5%" in lines["re-evaluation, warm embedding cache / cold, tiny evaluators"]
    assert "yes" in lines["re-evaluation, warm embedding cache / cold, tiny evaluators"]
    assert "not run" in lines["batched proxy synthesis vs one at a time"]
    assert "1.10x" in lines["janus tiny_batch1"] and "0.90x" in lines["janus tiny_batch1"]

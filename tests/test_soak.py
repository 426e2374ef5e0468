"""`facert bench soak` end to end: a real `facert serve` on loopback under a few seconds of mixed
load (its length is what the 10-minute run in bench/results/soak.md is for)."""

from __future__ import annotations

import json

from facert.cli import main


def test_a_short_soak_gets_only_intended_answers(tmp_path, capsys):
    assert main(["bench", "soak", "--minutes", "0.1", "--clients", "2", "-o", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["unexpected"]["count"] == 0, result["unexpected"]["kept"]
    # every well-formed kind ran, and every malformed kind once at least, with its 4xx
    for label, e in result["endpoints"].items():
        assert e["n"] >= 1, label
        if e["expected"] is not None:
            assert 400 <= e["expected"] < 500 and set(e["statuses"]) == {str(e["expected"])}
    assert result["readyz_at_end"]["status"] == 200
    assert result["server_exit_code"] == 0
    assert result["memory"]["growth_pct"] is None  # no longer than its warm-up
    assert result["memory"]["end"]["rss_mib"] > 0
    assert "RSS growth after warm-up: not measured" in (tmp_path / "soak.md").read_text()
    assert "Answers other than the intended one: 0" in capsys.readouterr().out

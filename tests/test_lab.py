"""The lab study (experiments/lab.py) in --quick mode, in-process: every recipe runs, the report
has the paper's Table-1 layout, the chart is drawn, and a re-run reuses every finished unit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from experiments.lab import run_lab
from experiments.lab_report import TABLE_HEADER
from experiments.lab_scale import QUICK, RECIPES

REPOSITORY = Path(__file__).resolve().parents[1]
NUMBER = r"-?\d+\.\d\d"


def table_rows(markdown: str) -> list[str]:
    """The lines of the result table: from its header to the first line that is not a table row."""
    lines = markdown.splitlines()
    start = lines.index(TABLE_HEADER)
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


def test_quick_lab_writes_the_table_chart_and_json_and_resumes(tmp_path):
    assert run_lab(tmp_path, QUICK, workers=1, until="sft") is None  # the teacher SFT can run ahead
    assert (tmp_path / "runs" / "teacher-sft" / "student").is_dir() and not (tmp_path / "runs" / "distill").exists()
    assert not (tmp_path / "lab.md").exists()
    report = run_lab(tmp_path, QUICK, workers=1)

    rows = table_rows(report.read_text(encoding="utf-8"))
    assert [cell.strip() for cell in rows[0].strip("|").split("|")] == ["Method", "Dolly", "SelfInst", "Vicuna", "S-NI", "UnNI†", "Avg."]
    body = rows[2:]
    assert body[0].startswith("| Teacher")
    assert body[1].startswith("| Student init")
    assert [re.search(r"\(`(\w+)`\)", row).group(1) for row in body[2:]] == list(RECIPES)
    for row in body:
        cells = [cell.strip() for cell in row.strip("|").split("|")[1:]]
        assert len(cells) == 6 and all(re.fullmatch(f"{NUMBER}( ± {NUMBER})?", cell) for cell in cells), row

    assert (tmp_path / "lab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "lab.json").read_text())
    assert set(data["runs"]) == {f"{recipe}-s{seed}" for recipe in RECIPES for seed in QUICK.train_seeds}
    assert all(run["steps"] == QUICK.distill_steps for run in data["runs"].values())

    evidence = data["evidence"]
    from experiments.lab_fidelity import METRICS

    assert set(evidence["comparisons"]) == set(METRICS)
    for metric, comparison in evidence["comparisons"].items():
        assert set(comparison["scores"]) == {"teacher", "student-init", *RECIPES}
        assert all(entry["low"] <= entry["estimate"] <= entry["high"] for entry in comparison["scores"].values()), metric
        assert set(comparison["differences"]) == set(RECIPES) - {comparison["best_baseline"]}
        assert comparison["mde"] >= 0
    for metric in ("kl_ts_gt", "kl_st_gt", "kl_ts_tgen", "kl_st_tgen"):  # the teacher against itself: KL 0 up to float16 caching
        assert abs(evidence["comparisons"][metric]["scores"]["teacher"]["estimate"]) < 1e-2
        assert evidence["comparisons"][metric]["scores"]["student-init"]["estimate"] > 0
    assert 0 <= evidence["scrg"]["changed"] <= 1 and evidence["scrg"]["sequences"] > 0
    assert "dac_band_mass" in evidence["logged_terms"]["mgsr-s1"] and "span" in evidence["logged_terms"]["mgsr-s1"]
    shares = evidence["term_shares"]["mgsr-s1"]
    assert list(shares) == ["sft", "dac_kl", "span"] and all(entry["magnitude"]["mean"] >= 0 for entry in shares.values())
    assert "kd-s1" not in evidence["term_shares"]  # one term: its share of the gradient is 1
    markdown = report.read_text(encoding="utf-8")
    for heading in ("## Paired comparison", "### Difference to the best baseline", "Minimum detectable effect", "## Mechanism checks", "### Each loss term", "## Tuning budget"):
        assert heading in markdown

    units = dict(data["timings"]["units"])
    run_lab(tmp_path, QUICK, workers=1)
    again = json.loads((tmp_path / "lab.json").read_text())
    assert again["timings"]["units"] == units and again["timings"]["invocations"] == 3 and len(again["timings"]["commits"]) == 3


def test_term_shares_match_logged_gradient_shares_to_their_terms():
    from experiments.lab_evidence import share_term, term_shares

    names = ["sft", "dac_kl", "span"]
    assert [share_term(key, names) for key in ("grad_share/span", "grad_share_dac_kl", "sft_grad_share", "sgo_share", "grad_norm", "span")] == ["span", "dac_kl", "sft", None, None, None]
    stats = {"first": 0.5, "mean": 0.4, "min": 0.3, "max": 0.5, "last": 0.3}
    logged = {"mgsr-s1": {"sft": stats, "span": stats, "grad_share/span": stats, "grad_norm": stats}, "kd-s1": {"fkl": stats}}
    table = term_shares(logged, {"mgsr-s1": names, "kd-s1": ["fkl"]})
    assert table == {"mgsr-s1": {"sft": {"magnitude": stats, "grad_share": None}, "dac_kl": {"magnitude": None, "grad_share": None}, "span": {"magnitude": stats, "grad_share": stats}}}


def test_copy_table_into_replaces_only_the_marked_table(tmp_path):
    from experiments.lab_report import README_MARKERS, copy_table_into

    lab = tmp_path / "lab.md"
    lab.write_text(f"# t\n\n{TABLE_HEADER}\n|---|\n| Teacher | 1 |\n\nafter\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_MARKERS[0]}\n| old |\n{README_MARKERS[1]}\noutro\n")
    copy_table_into(readme, lab)
    assert readme.read_text() == f"intro\n{README_MARKERS[0]}\n{TABLE_HEADER}\n|---|\n| Teacher | 1 |\n{README_MARKERS[1]}\noutro\n"


def test_readme_shows_the_table_of_the_committed_lab_report():
    """The README's lab table is lab.md's, so it is never typed in by hand."""
    lab = REPOSITORY / "experiments" / "results" / "lab.md"
    if not lab.exists():
        pytest.skip("no committed lab report")
    readme = (REPOSITORY / "README.md").read_text(encoding="utf-8")
    assert "\n".join(table_rows(lab.read_text(encoding="utf-8"))) in readme


def test_a_runs_directory_pins_each_phase_s_knobs_once_it_has_run(tmp_path):
    import dataclasses

    from experiments.lab import check_scale

    check_scale(tmp_path, QUICK)
    check_scale(tmp_path, dataclasses.replace(QUICK, distill_steps=3, eval_examples=5))  # only SFT has run: later knobs may change
    with pytest.raises(SystemExit, match="teacher_sft_steps"):
        check_scale(tmp_path, dataclasses.replace(QUICK, teacher_sft_steps=3))
    (tmp_path / "distill").mkdir()
    check_scale(tmp_path, dataclasses.replace(QUICK, distill_steps=3))  # evaluation knobs still open
    with pytest.raises(SystemExit, match="distill_steps"):
        check_scale(tmp_path, QUICK)
    (tmp_path / "evaluate").mkdir()
    with pytest.raises(SystemExit, match="eval_examples"):
        check_scale(tmp_path, dataclasses.replace(QUICK, distill_steps=3, eval_examples=3))

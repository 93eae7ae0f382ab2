"""The results page is generated from the results files: a figure changed in one and not the other fails here."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_results_page_matches_results_files():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_results_page_check_fails_on_a_stale_page(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import report
    finally:
        sys.path.pop(0)
    stale = tmp_path / "results.md"
    stale.write_text(report.render().replace("Quality against the peers", "Quality", 1))
    monkeypatch.setattr(report, "PAGE", stale)
    monkeypatch.setattr(sys, "argv", ["report.py", "--check"])
    try:
        report.main()
    except SystemExit as exit:
        assert "out of date" in str(exit.code)
    else:
        raise AssertionError("--check passed on a stale page")

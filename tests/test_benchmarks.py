"""Every benchmark script runs in its quick mode and ends with its ratio line, so none can rot.

The full runs (``make bench``) are not part of the test suite; these take seconds each.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = ("startup", "train_overhead", "train_end_to_end", "data_pipeline", "inference", "serving")
RATIO_LINE = re.compile(r"^ratio .+ = \d+\.\d{3} \(target (>=|<=) [\d.]+: (ok|MISSED)(; .*)?\)$")


def test_every_script_is_run_by_make_bench():
    from importlib import util

    spec = util.spec_from_file_location("run_all", BENCH / "run_all.py")
    run_all = util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    on_disk = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_") and p.stem != "run_all"}
    assert set(run_all.SCRIPTS) == on_disk == set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_quick_mode_prints_a_ratio_last(script, tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert RATIO_LINE.match(lines[-1]), lines[-5:]
    import json

    figures = json.loads(out.read_text())
    assert figures["script"] == script and figures["quick"] is True
    assert figures["ratios"] and all(r["value"] > 0 for r in figures["ratios"])

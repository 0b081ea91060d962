"""Run every benchmark (``make bench``) and rewrite ``benchmarks/RESULTS.md`` from their figures.

Each script runs in its own process with ``--json``; a script that fails is reported as
such and the others still run. ``--quick`` runs the seconds-long smoke versions and writes
nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Serving last: it depends on `pixelmill serve` and is the longest.
SCRIPTS = ("startup", "train_overhead", "train_end_to_end", "data_pipeline", "inference", "serving")
PACKAGES = ("torch", "torchvision", "lightning", "timm", "onnxruntime", "onnx", "pillow", "numpy", "fastapi", "uvicorn", "mlflow", "litserve")


def machine() -> list[tuple[str, str]]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = ""
    try:
        kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")).split()[1])
        ram = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration):
        pass
    return [
        ("CPU", f"{cpu}, {os.cpu_count()} logical CPUs (shared with other users' test runs)"),
        ("RAM", ram),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
    ]


def versions() -> str:
    out = []
    for name in ("pixelmill", *PACKAGES):
        try:
            out.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def commit() -> str:
    """The checked-out commit (read-only git), with '+changes' when the tree differs from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(name: str, quick: bool, out: Path) -> dict:
    """Run one script, streaming its output; its JSON figures, or a failure record."""
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--json", str(out)] + (["--quick"] if quick else [])
    print(f"\n=== {name} ===", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT)
    if proc.returncode != 0 or not out.exists():
        return {"script": name, "failed": f"exit code {proc.returncode}", "seconds": round(time.time() - start, 1)}
    return json.loads(out.read_text())


def _fmt(value: float) -> str:
    return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"


def render(results: list[dict], started: datetime, seconds: float) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`benchmarks/run_all.py`); do not edit by hand - the change log at",
        "the end comes from `benchmarks/CHANGES.md`. Each script measures pixelmill and its",
        "comparison in the same run, interleaved, and reports the ratio. The machine is shared",
        "with other people's test runs, so absolute figures are noisy; the 1-minute load average",
        "at the start and end of each script is given, and the ratios are what to read.",
        "",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')} ({seconds / 60:.1f} min for all scripts)",
    ]
    lines += [f"- {k}: {v}" for k, v in machine()]
    lines += [f"- Versions: {versions()}", f"- Commit: {commit()}", "", "## Claims", "",
              "| script | claim | ratio | target | verdict | note |", "|---|---|---|---|---|---|"]
    for r in results:
        if "failed" in r:
            lines.append(f"| `{r['script']}.py` | (script failed: {r['failed']}) | | | FAILED | |")
            continue
        for q in r["ratios"]:
            op = ">=" if q["higher_is_better"] else "<="
            verdict = "ok" if q["ok"] else "**missed**"
            note = q.get("note", "").replace("|", "\\|")
            lines.append(f"| `{r['script']}.py` | {q['name']} | {q['value']:.3f} | {op} {q['target']:g} | {verdict} | {note} |")
    for r in results:
        lines += ["", f"## {r['script']}.py", ""]
        if "failed" in r:
            lines.append(f"The script failed ({r['failed']}) after {r['seconds']} s; see the `make bench` output.")
            continue
        load = r.get("load_average", ["?", "?"])
        lines += [f"{r['seconds']} s, load average {load[0]} -> {load[1]}.", "", "| figure | value | unit | detail |", "|---|---:|---|---|"]
        for f in r["figures"]:
            detail = ", ".join(f"{k}={v}" for k, v in f.items() if k not in ("name", "value", "unit"))
            lines.append(f"| {f['name']} | {_fmt(f['value'])} | {f['unit']} | {detail} |")
        for note in r.get("notes", []):
            lines += ["", f"Note: {note}"]
    changes = HERE / "CHANGES.md"
    if changes.exists():
        lines += ["", changes.read_text().strip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Run the quick modes.")
    parser.add_argument("--only", nargs="*", choices=SCRIPTS, help="Run only these scripts.")
    parser.add_argument("--out", type=Path, default=None, help="Where to write the results (default benchmarks/RESULTS.md; none for --quick).")
    args = parser.parse_args()
    out = args.out or (None if args.quick else HERE / "RESULTS.md")
    started, t0 = datetime.now(timezone.utc), time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="pixelmill-bench-") as tmp:
        for name in args.only or SCRIPTS:
            results.append(run(name, args.quick, Path(tmp) / f"{name}.json"))
    if out:
        out.write_text(render(results, started, time.time() - t0))
        print(f"\nwrote {out}")
    failed = [r["script"] for r in results if "failed" in r]
    missed = [q["name"] for r in results for q in r.get("ratios", []) if not q["ok"]]
    print(f"{len(results) - len(failed)} scripts ran, {len(failed)} failed; {len(missed)} target(s) missed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

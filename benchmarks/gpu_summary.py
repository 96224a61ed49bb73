"""The report of benchmarks/gpu_check.sh: every number next to its target, and what each step did.

Standard library only, so it still reports when the wheels, torch or foldsweep failed to import: a
failed step then shows as its exit code and log, never as a missing report.

    python benchmarks/gpu_summary.py mlflow mlruns/mlflow.db OUT.json   # system metrics of an MLflow store
    python benchmarks/gpu_summary.py summary DIR [--dry-run]            # DIR/details/* -> DIR/summary.md
"""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

TARGETS = {"speedup": 100.0, "sonar_s": 30.0}


def mlflow_system(db: Path) -> dict[str, Any]:
    """Per system metric in the store: samples, mean and max (MLflow names GPU rows `system/gpu_*`)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        found = con.execute("select key, count(*), avg(value), max(value) from metrics where key like 'system/%' "
                            "group by key order by key").fetchall()
    metrics = {key: {"samples": n, "mean": mean, "max": top} for key, n, mean, top in found}
    for key, row in metrics.items():
        print(f"{key}: {row['samples']} samples, mean {row['mean']:.1f}, max {row['max']:.1f}")
    return {"metrics": metrics}


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _sonar_summary(details: Path) -> dict[str, Any] | None:
    """The sweep's own JSON summary: the last line `foldsweep run --json` printed."""
    try:
        return json.loads((details / "sonar.out").read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def utilisation(path: Path) -> str:
    """Mean and max GPU utilisation from nvidia-smi's CSV rows (`N %, M MiB`, no header)."""
    try:
        with path.open() as f:
            rows = list(csv.reader(f))
        util = [float(r[0].split()[0]) for r in rows if len(r) == 2]
        memory = [float(r[1].split()[0]) for r in rows if len(r) == 2]
    except (OSError, ValueError, IndexError):
        return "no samples"
    if not util:
        return "no samples"
    return (f"mean {statistics.mean(util):.0f}%, max {max(util):.0f}%, {len(util)} samples; "
            f"max memory used {max(memory):.0f} MiB")


def junit(path: Path) -> dict[str, Any] | None:
    """Counts and per-test outcomes from pytest's junit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    cases = []
    for case in suite.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        cases.append(f"{case.get('classname')}::{case.get('name')} {outcome}")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {"cases": cases}


def _verdict(ok: bool | None) -> str:
    return "NOT RUN" if ok is None else ("PASS" if ok else "FAIL")


def _speed_row(micro: dict[str, Any] | None, bases: list[dict[str, Any]], dry_run: bool) -> str:
    """foldsweep's best fold-epochs/s over the plain loop's best device."""
    best = max(micro["rows"], key=lambda r: r["fold_epochs_per_s"]) if micro and micro["rows"] else None
    base = max(bases, key=lambda b: b["fold_epochs_per_s"]) if bases else None
    if best is None or base is None:
        return f"| fold-fit epochs/s >= {TARGETS['speedup']:.0f}x the plain loop on its best device | - | NOT RUN |"
    speedup = best["fold_epochs_per_s"] / base["fold_epochs_per_s"]
    return (f"| fold-fit epochs/s >= {TARGETS['speedup']:.0f}x the plain loop on its best device | "
            f"{best['fold_epochs_per_s']:,.0f} ({best['models']:,} models, {best['mode']}) vs "
            f"{base['fold_epochs_per_s']:,.0f} (plain loop, {base['device']}): **{speedup:,.1f}x** | "
            f"{_verdict(None if dry_run else speedup >= TARGETS['speedup'])} |")


def _sonar_row(details: Path, step: list[str] | None, dry_run: bool) -> str:
    sonar = _sonar_summary(details)
    label = f"| sweeps/sonar.yaml end to end <= {TARGETS['sonar_s']:.0f} s"
    if sonar is None or step is None or step[1] != "0":
        return f"{label} | - | NOT RUN |"
    wall = float(step[2])
    tracking = (details / "tracking.txt").read_text().strip() if (details / "tracking.txt").exists() else "?"
    return (f"{label} | **{wall:.1f} s** process wall ({sonar['wall_s']} s inside the sweep), "
            f"{sonar['fold_fits']:,} fold fits, nested {sonar['nested']['mean']:.3f}; {tracking} | "
            f"{_verdict(None if dry_run else wall <= TARGETS['sonar_s'])} |")


def _same_row(micro: dict[str, Any] | None, tests: dict[str, Any] | None) -> str:
    """Captured == eager: the microbenchmark's own comparison, and the engine's equivalence tests."""
    same = micro["same"] if micro else []
    ran = tests["tests"] - tests["skipped"] if tests else 0
    tests_ok = None if not ran else tests is not None and tests["failures"] + tests["errors"] == 0
    ok = None if not same and tests_ok is None else all(s["ok"] for s in same) and tests_ok is not False
    parts = [f"{s['models']:,} models: max abs val-loss diff {s['max_abs_val_loss_diff']:.1e}" for s in same]
    if tests:
        parts.append(f"engine tests: {ran} ran, {tests['failures']} failed, {tests['errors']} errors, "
                     f"{tests['skipped']} skipped")
    return f"| captured == eager within tolerance | {'; '.join(parts) or '-'} | {_verdict(ok)} |"


def _mlflow_row(system: dict[str, Any] | None) -> str:
    gpu = {k: v for k, v in (system or {}).get("metrics", {}).items() if "gpu" in k}
    text = ", ".join(f"{k}: mean {v['mean']:.0f}, max {v['max']:.0f} ({v['samples']} samples)" for k, v in gpu.items())
    return f"| GPU in MLflow's system metrics (sweep run) | {text or ('none' if system else 'no MLflow store')} | |"


def _unmet(env: dict[str, Any]) -> list[str]:
    """foldsweep's requirements that the machine misses (it runs from src/, so pip never checked them)."""
    unmet = [f"{name} {have}" for name, have in env.get("requirements", {}).items() if " " in have or have == "MISSING"]
    return [f"Requirements not met there: {', '.join(unmet)}.", ""] if unmet else []


def _micro_table(micro: dict[str, Any] | None) -> list[str]:
    if not micro:
        return ["", "Microbenchmark: no result (see its step)."]
    lines = ["", f"Microbenchmark on {micro['device']}: sonar-sized fold fits, {micro['epochs']} epochs, a report "
             f"every {micro['report_every']} (tolerance for captured vs eager: {micro['tolerance']}).", "",
             "| models | mode | fold-epochs/s | fits/s | s | peak GPU MiB |", "|---|---|---|---|---|---|"]
    for r in micro["rows"]:
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        lines.append(f"| {r['models']:,} | {r['mode']} | {r['fold_epochs_per_s']:,.0f} | {r['fits_per_s']:,.1f} | "
                     f"{r['seconds']:.2f} | {peak} |")
    return lines + [f"- not measured: {s}" for s in micro["skipped"]]


def _baseline_table(bases: list[dict[str, Any]]) -> list[str]:
    lines = ["", "Plain loop (one model, DataLoader, `.item()` per batch, AdamW):", "",
             "| device | torch threads | fits x epochs | fold-epochs/s |", "|---|---|---|---|"]
    return lines + [f"| {b['device']} | {b['threads']} | {b['fits']} x {b['epochs']} | {b['fold_epochs_per_s']:,.0f} |"
                    for b in bases]


def summary(folder: Path, dry_run: bool) -> list[str]:
    """summary.md's lines, from what the steps left in `folder/details`."""
    details = folder / "details"
    micro = _load(details / "micro.json")
    bases = [b for b in (_load(details / f"baseline_{d}.json") for d in ("gpu", "cpu")) if b]
    steps = [line.split("\t") for line in (details / "steps.tsv").read_text().splitlines() if line]
    by_name = {s[0]: s for s in steps}
    env = _load(details / "env.json") or {}
    tests = junit(details / "junit.xml")
    lines = ["# GPU check", ""]
    if dry_run:
        lines += ["**CPU DRY RUN**: tiny sizes on the CPU, proving the script end to end. Its numbers say nothing",
                  "about the targets, which are for one GPU; verdicts on them read NOT RUN.", ""]
    lines += [f"Device: {env.get('gpu', 'no GPU')}; torch {env.get('torch')} (CUDA build {env.get('cuda_build')}); "
              f"Python {env.get('python')}; optuna {env.get('optuna')}; mlflow {env.get('mlflow')}.", "",
              *_unmet(env),
              "| target | measured | verdict |", "|---|---|---|",
              _speed_row(micro, bases, dry_run), _sonar_row(details, by_name.get("sonar"), dry_run),
              _same_row(micro, tests),
              f"| GPU utilisation through the sonar sweep (nvidia-smi) | {utilisation(details / 'gpu_util.csv')} | |",
              _mlflow_row(_load(details / "mlflow.json"))]
    lines += _micro_table(micro) + _baseline_table(bases)
    lines += ["", "Steps (rc 124: stopped at its time limit; `-`: skipped; logs in details/):", "",
              "| step | rc | s | note |", "|---|---|---|---|"]
    lines += ["| " + " | ".join((s + ["", "", "", ""])[:4]) + " |" for s in steps]
    if tests:
        lines += ["", "Engine tests selected:", ""] + ([f"- {c}" for c in tests["cases"]]
                                                       or ["- none matched the selection (GPU_CHECK_TESTS)"])
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("mlflow")
    p.add_argument("db", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("summary")
    p.add_argument("dir", type=Path)
    p.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.command == "mlflow":
        args.out.write_text(json.dumps(mlflow_system(args.db), indent=1))
        return
    lines = summary(args.dir, args.dry_run)
    (args.dir / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

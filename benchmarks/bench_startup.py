"""foldsweep's fixed costs, as a user meets them: each command a fresh process in a fresh folder.

Measures what issue 14 sets targets for, alternating the compared runs (A, B, A, B, ...) so that a
change in machine load hits both alike, and takes medians:
- `foldsweep validate sweeps/quickstart.yaml`, wall seconds of the whole process;
- `foldsweep run sweeps/quickstart.yaml --profile` with tracking on and off: wall, time to the first
  training step, the end of the sweep (report + shutdown; refits excluded) and every phase;
- the 3 outer x 3 inner x 8 trials x 30 epochs budget on sonar (99 fold fits), `foldsweep run` with full
  tracking in a fresh folder (fresh MLflow store: interpreter start, imports and all), against the plain
  loop of bench_sweep.py without logging (Optuna + StratifiedKFold + DataLoader), run in this process
  with its imports already paid: fold fits per second.

With `--against SRC` (another checkout's `src/`, e.g. `git archive main | tar -x -C /tmp/main`) every
measurement alternates between that code and this one, so before and after come from one run; phases
are printed for this code only (`--profile` is new).

    python benchmarks/bench_startup.py                              # about 3 minutes on 2 idle cores
    python benchmarks/bench_startup.py --against /tmp/main/src --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "sweeps" / "quickstart.yaml"
HERE = str(ROOT / "src")


CPU: list[float] = []  # CPU seconds of the last command and every process it waited for (the MLflow writer)


def timed(args: list[str], folder: Path, src: str = HERE) -> tuple[float, str, str]:
    """Wall seconds, stdout and stderr of one foldsweep command (the code in `src`) as its own process.

    Its CPU seconds go to `CPU`: on a shared machine they move far less with the load than wall time does.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": src}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "foldsweep", *args], cwd=folder, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU[:] = [after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime]
    if done.returncode != 0:
        raise SystemExit(f"foldsweep {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return wall, done.stdout, done.stderr


def phases(stderr: str) -> dict[str, float]:
    """The `--profile` table: seconds per phase, "wall", "to first training step"."""
    from foldsweep import profile

    names = (*profile.ORDER, "other", "wall", "to first training step")
    return {line[:24].strip(): float(line[24:34]) for line in stderr.splitlines() if line[:24].strip() in names}


def run_sweep_process(spec: Path, sets: list[str], src: str = HERE) -> tuple[float, dict[str, float],
                                                                          dict[str, object]]:
    """`foldsweep run SPEC --json` (with `--profile` for this code) in a fresh folder: wall, phases, summary."""
    with tempfile.TemporaryDirectory() as folder:
        args = ["run", str(spec), "--json", *(["--profile"] if src == HERE else []),
                *[item for s in sets for item in ("--set", s)]]
        wall, stdout, stderr = timed(args, Path(folder), src)
    return wall, phases(stderr), json.loads(stdout.strip().splitlines()[-1])


def budget_spec(folder: Path) -> Path:
    """The 3 x 3 x 8-trial x 30-epoch sweep of bench_sweep.py --quick sizes, as a spec file."""
    from bench_sweep import Setup, sweep_spec

    spec = sweep_spec(Setup(3, 3, 8, 30, patience=10, startup=2), trials_per_batch=8)
    path = folder / "budget.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def plain_loop() -> float:
    """Fold fits per second of bench_sweep.py's baseline without logging, on the same budget."""
    import torch
    from bench_sweep import Setup, baseline

    from foldsweep.data import load_dataset
    from foldsweep.spec import DataSpec

    torch.set_num_threads(1)
    data = load_dataset(DataSpec(dataset="sonar"))
    with tempfile.TemporaryDirectory() as folder:
        side = baseline(data.X, data.y, Setup(3, 3, 8, 30, patience=10, startup=2), False, Path(folder))
    return side.fits_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind (medians are reported)")
    parser.add_argument("--against", default=None, metavar="SRC", help="another foldsweep src/ to compare with")
    args = parser.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    trees = {"this code": HERE} | ({"against": str(Path(args.against).resolve())} if args.against else {})
    for src in trees.values():
        timed(["validate", str(QUICKSTART)], ROOT, src)  # caches warm (files, the MLflow schema template)
        run_sweep_process(QUICKSTART, ["optuna.n_trials=1"], src)
    found = {name: Found() for name in trees}
    plain: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = budget_spec(Path(tmp))
        for repeat in range(args.repeats):
            for name, src in trees.items():
                measure(found[name], spec, src)
                print(f"run {repeat + 1}, {name}: validate {found[name].validate[-1]:.2f} s, quickstart off "
                      f"{found[name].quick['off'][-1]['process wall']:.2f} s / on "
                      f"{found[name].quick['on'][-1]['process wall']:.2f} s, budget {found[name].budget[-1]:.2f} "
                      "fits/s", flush=True)
            plain.append(plain_loop())
            print(f"run {repeat + 1}: plain loop {plain[-1]:.2f} fits/s", flush=True)
    for name in trees:
        print(f"\n## {name} ({trees[name]})")
        report(found[name], plain)


@dataclass
class Found:
    """One code tree's measurements, a list entry per repeat."""

    validate: list[float] = field(default_factory=list)
    validate_cpu: list[float] = field(default_factory=list)
    quick: dict[str, list[dict[str, float]]] = field(default_factory=lambda: {"on": [], "off": []})
    budget: list[float] = field(default_factory=list)
    budget_warm: list[float] = field(default_factory=list)  # fits/s with start-up and imports left out


def measure(found: Found, spec: Path, src: str) -> None:
    found.validate.append(timed(["validate", str(QUICKSTART)], ROOT, src)[0])
    found.validate_cpu.append(CPU[0])
    for mode in ("off", "on"):
        wall, times, _ = run_sweep_process(QUICKSTART, [f"tracking.enabled={mode == 'on'}".lower()], src)
        found.quick[mode].append(times | {"process wall": wall, "process cpu": CPU[0]})
    wall, times, summary = run_sweep_process(spec, [], src)
    fits = float(summary["fold_fits"])  # type: ignore[arg-type]
    found.budget.append(fits / wall)
    if "wall" in times:
        found.budget_warm.append(fits / (times["wall"] - times["start-up and imports"]))


def report(found: Found, plain: list[float]) -> None:
    quick = found.quick

    def median(mode: str, key: str) -> float:
        return statistics.median(t.get(key, 0.0) for t in quick[mode])

    on, off = median("on", "process wall"), median("off", "process wall")
    end = statistics.median(t.get("report", 0) + t.get("shutdown", 0)  # and the process's own exit:
                            + max(0.0, t["process wall"] - t.get("wall", t["process wall"])) for t in quick["on"])
    budget = statistics.median(found.budget)
    print("| measure | median | target |")
    print("|---|---|---|")
    cpu_on, cpu_off = median("on", "process cpu"), median("off", "process cpu")
    print(f"| `foldsweep validate sweeps/quickstart.yaml` | {statistics.median(found.validate):.2f} s "
          f"({statistics.median(found.validate_cpu):.2f} CPU s) | <= 1.5 s |")
    print(f"| quickstart, tracking off / on (process wall) | {off:.2f} s / {on:.2f} s | |")
    print(f"| full tracking's share of the wall time | {(on - off) / on * 100:.1f}% | <= 10% |")
    print(f"| quickstart, tracking off / on (CPU s, all processes) | {cpu_off:.2f} / {cpu_on:.2f} "
          f"(tracking {(cpu_on - cpu_off) / cpu_on * 100:.1f}%) | |")
    if "wall" in quick["on"][0]:
        print(f"| `run` to the first training step (tracking on) | {median('on', 'to first training step'):.2f} s "
              "| <= 2 s |")
        print(f"| end of the sweep, refits excluded (report + shutdown + exit) | {end:.2f} s | <= 1 s |")
    print(f"| 3x3x8x30 budget: foldsweep (full tracking, whole process) vs plain loop | "
          f"{budget:.2f} vs {statistics.median(plain):.2f} fits/s = {budget / statistics.median(plain):.2f}x "
          "| >= 4x |")
    if found.budget_warm:  # the plain loop runs in this process: its imports are paid before it is timed
        warm = statistics.median(found.budget_warm)
        print(f"| the same, foldsweep's start-up and imports left out as the plain loop's are | {warm:.2f} vs "
              f"{statistics.median(plain):.2f} fits/s = {warm / statistics.median(plain):.2f}x | >= 4x |")
    if "wall" in quick["on"][0]:
        print("quickstart phases, tracking on (median s): " + ", ".join(
            f"{name} {median('on', name):.2f}" for name in quick["on"][0] if not name.startswith("process")))


if __name__ == "__main__":
    main()

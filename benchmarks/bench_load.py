"""Loading at scale: a synthetic N x F float table (binary label) as Parquet and CSV, through
`load_dataset` (read, float32, missing check, label encoding, row hashes), the fingerprint, the
fold plan (seal, duplicate check, 5 outer x 5 inner folds) and the sweep's record (written by a new
sweep, read back by a resumed one: record.json, plan.npz and its hash check).

    python benchmarks/bench_load.py --rows 1000000 --features 50
    python benchmarks/bench_load.py --rows 10000000 --features 50 --formats parquet

The table is written by a child process, so the peak RSS printed is the loader's own. Prints one
line per stage with wall seconds, CPU seconds and the process's peak RSS so far.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from foldsweep.data import hash_rows, load_dataset
from foldsweep.record import PLAN_FILE, ROOT_ENV, SweepRecord, create_or_resume
from foldsweep.spec import DataSpec, SplitSpec, SweepSpec
from foldsweep.splits import make_plan


def write_table(folder: Path, rows: int, features: int, formats: list[str]) -> dict[str, Path]:
    """Written in row blocks so the generator never holds the whole table as float64."""
    rng = np.random.default_rng(0)
    names = [f"f{i}" for i in range(features)]
    schema = pa.schema([(n, pa.float32()) for n in names] + [("y", pa.string())])
    paths = {fmt: folder / f"table.{fmt}" for fmt in formats}
    writers = {}
    if "parquet" in formats:
        writers["parquet"] = pq.ParquetWriter(paths["parquet"], schema)
    if "csv" in formats:
        writers["csv"] = pacsv.CSVWriter(paths["csv"], schema)
    block = 1_000_000
    for start in range(0, rows, block):
        n = min(block, rows - start)
        X = rng.standard_normal((n, features), dtype=np.float32)
        labels = np.where(X[:, 0] + 0.5 * rng.standard_normal(n, dtype=np.float32) > 0, "pos", "neg")
        batch = pa.record_batch([pa.array(X[:, j]) for j in range(features)] + [pa.array(labels)], schema=schema)
        for writer in writers.values():
            writer.write(batch)
    for writer in writers.values():
        writer.close()
    return paths


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def stage(label: str, started: tuple[float, float]) -> tuple[float, float]:
    now = (time.perf_counter(), time.process_time())
    print(f"  {label:<44} {now[0] - started[0]:7.2f} s  cpu {now[1] - started[1]:7.2f} s   "
          f"peak RSS {peak_gb():5.2f} GB", flush=True)
    return now


def written(folder: Path, rows: int, features: int, formats: list[str]) -> dict[str, Path]:
    """`write_table` in a child process: its blocks never count in this process's peak RSS."""
    child = multiprocessing.get_context("fork").Process(target=write_table, args=(folder, rows, features, formats))
    child.start()
    child.join()
    if child.exitcode:
        raise SystemExit(f"writing the table failed (exit {child.exitcode})")
    return {fmt: folder / f"table.{fmt}" for fmt in formats}


def bench_format(path: Path, home: Path) -> None:
    t = (time.perf_counter(), time.process_time())
    data = load_dataset(DataSpec(path=str(path), target="y"))
    t = stage("load_dataset (read .. row hashes)", t)
    hash_rows(data.X, data.y)
    t = stage("  of which hash_rows alone", t)
    data.fingerprint  # noqa: B018 -- the property is the work measured
    t = stage("fingerprint", t)
    plan = make_plan(data, SplitSpec())
    t = stage(f"make_plan ({len(plan.dev):,} dev / {len(plan.test):,} test)", t)
    test = plan.test
    del plan  # a sweep holds one plan: the new sweep below makes its own
    os.environ[ROOT_ENV] = str(home / path.suffix[1:])
    spec = SweepSpec(name="bench", data=DataSpec(path=str(path), target="y"))
    record, _, _ = create_or_resume(spec, data, "unused")
    size = sum(f.stat().st_size for f in record.folder.iterdir()) / 1e6
    t = stage(f"new sweep: make_plan + record written ({size:.0f} MB)", t)
    resumed, back, _ = create_or_resume(spec, data, "unused")
    t = stage("resumed sweep: record + plan.npz read, checked", t)
    record_kb = (resumed.folder / "record.json").stat().st_size / 1e3
    SweepRecord(spec.name, resumed.folder).meta  # noqa: B018
    stage(f"meta of a new SweepRecord (record.json {record_kb:.1f} KB)", t)
    assert np.array_equal(back.test, test) and (resumed.folder / PLAN_FILE).is_file()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=50)
    parser.add_argument("--formats", default="parquet,csv")
    parser.add_argument("--dir", default=None, help="where to write the table (default: a temporary folder)")
    args = parser.parse_args()
    formats = args.formats.split(",")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        started = time.perf_counter()
        paths = written(Path(tmp), args.rows, args.features, formats)
        sizes = ", ".join(f"{fmt} {path.stat().st_size / 1e9:.2f} GB" for fmt, path in paths.items())
        print(f"{args.rows:,} x {args.features} written in {time.perf_counter() - started:.1f} s ({sizes}); "
              f"load average {os.getloadavg()[0]:.1f}")
        for fmt, path in paths.items():
            print(f"{fmt}:")
            bench_format(path, Path(tmp) / "home")
        print(f"load average {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
    main()

"""Loading at scale: a synthetic N x F float table (binary label) as Parquet and CSV, through
`load_dataset` (read, float32, missing check, label encoding, row hashes), the fingerprint and the
fold plan (seal, duplicate check, outer and inner folds).

    python benchmarks/bench_load.py --rows 1000000 --features 50
    python benchmarks/bench_load.py --rows 10000000 --features 50 --formats parquet

Prints one line per stage with seconds and the process's peak RSS so far.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from foldsweep.data import hash_rows, load_dataset
from foldsweep.spec import DataSpec, SplitSpec
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


def stage(label: str, started: float) -> float:
    now = time.perf_counter()
    print(f"  {label:<34} {now - started:7.2f} s   peak RSS {peak_gb():5.2f} GB", flush=True)
    return now


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
        paths = write_table(Path(tmp), args.rows, args.features, formats)
        sizes = ", ".join(f"{fmt} {path.stat().st_size / 1e9:.2f} GB" for fmt, path in paths.items())
        print(f"{args.rows:,} x {args.features} written in {time.perf_counter() - started:.1f} s ({sizes})")
        for fmt, path in paths.items():
            print(f"{fmt}:")
            t = time.perf_counter()
            data = load_dataset(DataSpec(path=str(path), target="y"))
            t = stage("load_dataset (read .. row hashes)", t)
            hash_rows(data.X, data.y)
            t = stage("  of which hash_rows alone", t)
            data.fingerprint  # noqa: B018 -- the property is the work measured
            t = stage("fingerprint", t)
            plan = make_plan(data, SplitSpec())
            stage(f"make_plan ({len(plan.dev):,} dev / {len(plan.test):,} test)", t)
            del data, plan


if __name__ == "__main__":
    main()

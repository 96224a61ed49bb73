"""Write the two synthetic CSVs the example sweeps use: sweeps/data/grouped.csv and sweeps/data/timeseries.csv.

grouped.csv: 300 rows from 30 sites (10 rows each). Features f0-f3 carry the real signal; f4-f9 are a
fingerprint of the site, and each site has its own share of positive labels. A model can score well by
recognising the site, but only on sites it has seen: random folds reward that, group folds do not.

timeseries.csv: 400 daily rows, written in shuffled order (the `day` column orders them). The target
follows the features through weights that drift over time, so a model fitted on the past is scored
honestly only on the future.

Run from the repository root:  python benchmarks/make_grouped.py   (deterministic; overwrites both files)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "sweeps" / "data"


def grouped(n_sites: int = 30, per_site: int = 10, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    site = np.repeat(np.arange(n_sites), per_site)
    fingerprint = rng.normal(0, 1.5, size=(n_sites, 6))[site] + rng.normal(0, 0.3, size=(len(site), 6))
    signal = rng.normal(size=(len(site), 4))
    site_bias = rng.normal(0, 1.5, size=n_sites)[site]
    logit = signal @ np.array([1.2, -0.8, 0.6, 0.0]) + site_bias
    label = np.where(rng.random(len(site)) < 1 / (1 + np.exp(-logit)), "yes", "no")
    frame = pd.DataFrame(np.hstack([signal, fingerprint]).round(4), columns=[f"f{i}" for i in range(10)])
    frame.insert(0, "site", [f"site-{s:02d}" for s in site])
    frame["label"] = label
    return frame


def timeseries(n_days: int = 400, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    day = np.arange(n_days)
    x = rng.normal(size=(n_days, 8)) + np.linspace(0, 1.0, n_days)[:, None] * rng.normal(size=8)  # slow drift
    drift = np.linspace(0, 1, n_days)[:, None]
    weights = (1 - drift) * np.array([1.0, -0.5, 0.8, 0, 0, 0.3, 0, 0]) + drift * np.array([0.4, -0.5, 1.2, 0.5, 0, 0,
                                                                                              0, 0])
    target = (x * weights).sum(1) + 0.5 * np.sin(day / 30) + rng.normal(0, 0.3, n_days)
    frame = pd.DataFrame(x.round(4), columns=[f"x{i}" for i in range(8)])
    frame.insert(0, "day", day)
    frame["demand"] = target.round(4)
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # file order is not time order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write into (default: sweeps/data)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, frame in (("grouped.csv", grouped()), ("timeseries.csv", timeseries())):
        frame.to_csv(args.out / name, index=False)
        print(f"wrote {args.out / name}: {len(frame)} rows x {frame.shape[1]} columns")


if __name__ == "__main__":
    main()

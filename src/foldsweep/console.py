"""What the commands print: rich tables for people, the live sweep display, and the JSON summary's keys.

Kept apart from `cli` so the commands stay a page of parsing and calls; nothing here decides anything.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

out = Console()


def print_report(rep: dict[str, Any]) -> None:
    n, metric = rep["nested"], rep["metric"]
    out.print(f"[bold]{rep['sweep']}[/bold]: nested {metric} ({rep['direction']}) {n['mean']:.4f} ± {n['std']:.4f}, "
              f"95% CI {n['ci95'][0]:.4f}..{n['ci95'][1]:.4f} over {len(n['outer'])} outer folds; "
              f"optimism {rep['optimism']:+.4f} (inner-CV best minus outer test; > 0: the search flattered itself)")
    out.print(_table("outer folds", ["fold", "best inner value", "outer-test", "optimism", "refit epochs"],
                     [[str(i), f"{r['best_inner_value']:.4f}", f"{r['outer_test_score']:.4f}",
                       f"{r['optimism']:+.4f}", str(r["epochs"])] for i, r in enumerate(rep["outer_refits"])]))
    out.print(_table("hyperparameter stability (best config per outer fold)", ["knob", "per outer fold", "spread"],
                     [[k, ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in e["values"]),
                       f"{e['spread']:.3g} ({e['spread_kind']})"] for k, e in rep["stability"].items()]))
    out.print(_table("overfitting diagnostics (best trial per study)",
                     ["study", "trial", "inner value", "fold std", "best epoch per fold", "at budget",
                      "val - train loss"],
                     [[d["study"], str(d["trial"]), f"{d['value']:.4f}",
                       f"{d['fold_std']:.4f}" if d["fold_std"] is not None else "-",
                       ", ".join(map(str, d["best_epochs"])), f"{d['at_budget']}/{len(d['best_epochs'])} of "
                       f"{d['epoch_budget']}", f"{d['gap']:+.4f}" if d["gap"] is not None else "-"]
                      for d in rep["diagnostics"]]))
    final = rep["final"]
    value = f"{final['best_value']:.4f}" if final["best_value"] is not None else "-"
    out.print(f"final config: trial {final['best_trial']} of study final, inner-CV {value}, refit epochs "
              f"{final.get('best_epoch')}")
    out.print(_table("final config", ["knob", "value"],
                     [[k, f"{v:.4g}" if isinstance(v, float) else str(v)] for k, v in final["best_params"].items()]))
    looks = rep["test_looks"]
    if not looks:
        out.print(f"sealed test set: never looked at (foldsweep test {rep['sweep']})")
        return
    out.print(_table(f"sealed test set: {len(looks)} look(s)", ["look", "time", metric, "model", "--again"],
                     [[str(i + 1), lk["time"], f"{lk['score']:.4f}", str(lk.get("model_hash", ""))[:12],
                       "yes" if lk.get("again") else "no"] for i, lk in enumerate(looks)]))


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


def public_summary(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("sweep", "metric", "nested", "final", "optimism", "mlflow", "storage", "fold_fits", "wall_s")
    return {k: summary[k] for k in keys if k in summary} | {"workers": summary.get("workers"),
                                                            "resumed": summary.get("resumed")}


def print_summary(summary: dict[str, Any]) -> None:
    n = summary["nested"]
    out.print(f"[bold]{summary['sweep']}[/bold]: nested {summary['metric']} {n['mean']:.4f} ± {n['std']:.4f} "
              f"(95% CI {n['ci95'][0]:.4f}..{n['ci95'][1]:.4f}), optimism {summary['optimism']:+.4f}, "
              f"{summary['fold_fits']} fold fits in {summary['wall_s']:.1f}s")
    out.print(f"final config: {summary['final']['best_params']}")
    out.print(f"next: foldsweep export {summary['sweep']} -o best.yaml   |   foldsweep ui")


def status_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("study", "finished", "running", "failed", "best", "outer-test"):
        table.add_column(column)
    for row in rows:
        refit = row.get("refit") or {}
        table.add_row(row["study"], f"{row['finished']}/{row['n_trials']}", str(row["in_flight"]), str(row["failed"]),
                      f"{row['best']:.4f}" if row["best"] is not None else "-",
                      f"{refit['outer_test_score']:.4f}" if refit else "-")
    return table


class Display:
    """Live table on a terminal; plain lines otherwise; nothing with --json."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.live: Live | None = None
        self.started = time.time()
        self.rows: list[dict[str, Any]] = []
        self.workers: list[dict[str, Any]] = []
        self.done_before: int | None = None  # trials a resumed sweep had already: not part of this run's rate

    def __enter__(self) -> Display:
        if not self.quiet and out.is_terminal:
            self.live = Live(Table(), console=out, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def event(self, kind: str, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        if kind == "start":
            verb = "resuming" if info["resumed"] else "starting"
            workers = ", ".join(sorted({f"{info['workers'].count(d)} x {d}" for d in info["workers"]}))
            self._say(f"{verb} {info['sweep']}: {info['studies']} studies x {info['n_trials']} trials on {workers} "
                      f"(storage {info['storage']})")
            for note in info["notes"]:
                self._say(f"note: {note}")
        elif kind == "status":
            self.rows, self.workers = info["rows"], info.get("workers", [])
            if self.live is not None:
                self.live.update(self._table())
        elif kind == "trial" and self.live is None:
            value = f"{info['value']:.4f}" if info["value"] is not None else info["state"]
            self._say(f"{info['study']} trial {info['number']}: {value}")
        elif kind == "stale":
            self._say(f"{info['study']} trial {info['number']}: its worker is gone; failed and re-queued")
        elif kind == "worker_failed":
            self._say(f"{info['worker']} exited with code {info['code']} (see {info['log']}); the others go on")

    def _table(self) -> Group:
        done = sum(r["finished"] for r in self.rows)
        total = sum(r["n_trials"] for r in self.rows)
        if self.done_before is None:
            self.done_before = done
        elapsed = time.time() - self.started
        new = done - self.done_before
        eta = f", ETA {elapsed / new * (total - done):.0f}s" if new else ""
        workers = Table(title="workers")
        for column in ("worker", "host", "device", "running"):
            workers.add_column(column)
        for entry in self.workers:
            workers.add_row(entry["worker"], entry["host"], entry["device"], ", ".join(entry["trials"]))
        return Group(status_table(self.rows, f"{done}/{total} trials, {elapsed:.0f}s{eta}"), workers)

    def _say(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text)
        else:
            out.print(text, markup=False, highlight=False, soft_wrap=True)

"""What people see: rich tables and lines for the results, and the live display of a running sweep.

The same renderables serve the terminal (`foldsweep report`), piped output (no hard wrapping: a CI log
or `| tee` keeps each line whole) and Jupyter (`Shown` renders as HTML). Nothing here decides anything;
the numbers come in as the dicts the stages return.
"""

from __future__ import annotations

import importlib.util
import io
import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

__all__ = ["Display", "Shown", "fit_lines", "look_lines", "out", "print_report", "print_summary", "public_summary",
           "report_view", "status_view", "summary_view", "trials_table", "value"]

PIPED_WIDTH = 1000  # lines are never cut when nobody reads them in a terminal; tables keep their natural width
HTML_WIDTH = 120
PIPED_STEPS_EVERY_S = 30.0  # a long round's training progress, piped: one line this often at most
HTML_FRAGMENT = ("<pre style=\"white-space:pre;overflow-x:auto;line-height:normal;"
                 "font-family:Menlo,'DejaVu Sans Mono',consolas,'Courier New',monospace\">{code}</pre>")


def _console() -> Console:
    """A terminal's own width; piped (not a terminal, not Jupyter): no hard wrapping at 80 columns."""
    console = Console()
    if console.is_terminal or console.is_jupyter:
        return console
    return Console(width=PIPED_WIDTH, soft_wrap=True)


out = _console()


def value(v: Any) -> str:
    """A searched value as people read it: floats to 4 significant digits, the rest as they are."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _score(v: float | None) -> str:
    return f"{v:.4f}" if v is not None else "-"


def _table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    return table


def _config_table(params: dict[str, Any], title: str = "final config") -> Table:
    return _table(title, ["knob", "value"], [[k, value(v)] for k, v in params.items()])


# -- results -------------------------------------------------------------------------------------------------
def public_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The keys `foldsweep run --json` prints (the contract scripts rely on)."""
    keys = ("sweep", "metric", "nested", "final", "optimism", "refit_fallbacks", "sealed_test", "mlflow", "storage",
            "fold_fits", "wall_s")
    return {k: summary[k] for k in keys if k in summary} | {"workers": summary.get("workers"),
                                                            "resumed": summary.get("resumed")}


def _headline(summary: dict[str, Any]) -> str:
    n = summary["nested"]
    return (f"[bold]{summary['sweep']}[/bold]: nested {summary['metric']} {n['mean']:.4f} (95% CI "
            f"{n['ci95'][0]:.4f}..{n['ci95'][1]:.4f}; sd of {len(n['outer'])} outer-fold scores {n['std']:.4f}); "
            f"optimism {summary['optimism']:+.4f}")


def summary_view(summary: dict[str, Any]) -> Group:
    """A finished sweep at a glance: the nested estimate, the final config as a table, what to do next."""
    final = summary["final"]
    parts: list[RenderableType] = [Text.from_markup(_headline(summary))]
    if "fold_fits" in summary:
        workers = summary.get("workers") or 1
        parts.append(Text(f"{summary['fold_fits']} fold fits in {summary['wall_s']:.1f}s on {workers} worker"
                          f"{'s' if workers > 1 else ''}"))
    parts.append(Text(f"final config (study final, inner-CV {_score(final['best_value'])}):"))
    parts.append(_config_table(final["best_params"], ""))
    return Group(*parts)


def print_summary(summary: dict[str, Any]) -> None:
    out.print(summary_view(summary))
    out.print(f"next: foldsweep export {summary['sweep']} -o best.yaml  |  foldsweep test {summary['sweep']}  |  "
              "foldsweep ui", markup=False, highlight=False)


def report_view(rep: dict[str, Any]) -> Group:
    """`foldsweep report`: nested estimate, outer folds, stability, diagnostics, final config, test looks."""
    from foldsweep.report import optimism_wording  # the report's imports are heavy; only `report` pays them

    metric = rep["metric"]
    parts: list[RenderableType] = [Text.from_markup(_headline(rep)), Text(
        f"optimism: {optimism_wording(rep['direction'])} ({rep['direction']} {metric})")]
    parts += [Text.from_markup(f"[yellow]{escape(note)}[/yellow]") for note in
              [*rep.get("refit_fallbacks", []), rep.get("sealed_test", {}).get("note"), rep.get("pictures_note")]
              if note]
    if rep.get("data"):
        parts.append(Text(f"data: {rep['data']}"))
    parts.append(_table("outer folds", ["fold", "best inner value", "outer-test", "optimism", "refit epochs"],
                        [[str(i), f"{r['best_inner_value']:.4f}", f"{r['outer_test_score']:.4f}",
                          f"{r['optimism']:+.4f}", str(r["epochs"])] for i, r in enumerate(rep["outer_refits"])]))
    parts.append(_table("hyperparameter stability (best config per outer fold)", ["knob", "per outer fold", "spread"],
                        [[k, ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in e["values"]),
                          f"{e['spread']:.3g} ({e['spread_kind']})"] for k, e in rep["stability"].items()]))
    parts.append(_table("overfitting diagnostics (best trial per study)",
                        ["study", "trial", "inner value", "fold std", "best epoch per fold", "at budget",
                         "val - train loss"],
                        [[d["study"], str(d["trial"]), f"{d['value']:.4f}", _score(d["fold_std"]),
                          ", ".join(map(str, d["best_epochs"])),
                          f"{d['at_budget']}/{len(d['best_epochs'])} of {d['epoch_budget']}",
                          f"{d['gap']:+.4f}" if d["gap"] is not None else "-"] for d in rep["diagnostics"]]))
    final = rep["final"]
    parts.append(Text(f"final config: trial {final['best_trial']} of study final, inner-CV "
                      f"{_score(final['best_value'])}, refit epochs {final.get('best_epoch')}"))
    parts.append(_config_table(final["best_params"]))
    looks = rep["test_looks"]
    if not looks:
        parts.append(Text(f"sealed test set: never looked at (foldsweep test {rep['sweep']})"))
    else:
        parts.append(_table(f"sealed test set: {len(looks)} look(s)",
                            ["look", "time", "sweep", metric, "model", "--again"],
                            [[str(i + 1), lk["time"], lk.get("sweep", rep["sweep"]),
                              "damaged" if lk.get("damaged") else f"{lk['score']:.4f}",
                              str(lk.get("model_hash", ""))[:12], "yes" if lk.get("again") else "no"]
                             for i, lk in enumerate(looks)]))
    return Group(*parts)


def print_report(rep: dict[str, Any]) -> None:
    out.print(report_view(rep))


def status_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("study", "finished", "running", "failed", "best", "outer-test"):
        table.add_column(column)
    for row in rows:
        refit = row.get("refit") or {}
        table.add_row(row["study"], f"{row['finished']}/{row['n_trials']}", str(row["in_flight"]), str(row["failed"]),
                      _score(row["best"]), f"{refit['outer_test_score']:.4f}" if refit else "-")
    return table


def status_view(entry: dict[str, Any]) -> Group:
    """One sweep of `foldsweep status`: its studies, who runs what, the estimate once there is one."""
    title = f"{entry['sweep']} ({entry['backend']}: {entry['storage']})"
    parts: list[RenderableType] = [status_table(entry["studies"], title)]
    if entry.get("data"):
        parts.append(Text(f"data: {entry['data']}"))
    for held in entry["workers"]:
        parts.append(Text(f"{held['worker']} on {held['host']} ({held['device']}) runs {', '.join(held['trials'])}"))
    if entry.get("nested"):
        n = entry["nested"]
        parts.append(Text(f"nested estimate {n['mean']:.4f} (95% CI {n['ci95'][0]:.4f}..{n['ci95'][1]:.4f}; sd "
                          f"of the outer-fold scores {n['std']:.4f})"))
    return Group(*parts)


def trials_table(rows: list[dict[str, Any]], title: str) -> Table:
    """`foldsweep trials`: one row per trial, searched values to 4 significant digits."""
    knobs = [k for k in (rows[0] if rows else {}) if k.startswith("params_")]
    columns = ["study", "number", "state", "value", "best epoch", "duration_s", *[k[7:] for k in knobs]]
    body = [[str(r["study"]), str(r["number"]), str(r["state"]), _score(r["value"]),
             value(r["mean_best_epoch"]), value(r["duration_s"]), *[value(r[k]) for k in knobs]] for r in rows]
    return _table(title, columns, body)


def look_lines(entry: dict[str, Any]) -> Group:
    """The test look as it is recorded: score, rows, the nested estimate it should fall near, and its count."""
    n = entry["nested"]
    parts: list[RenderableType] = [Text.from_markup(
        f"[bold]{entry['sweep']}[/bold] sealed test set, look {entry['look_number']}: {entry['metric']} "
        f"{entry['score']:.4f} on {entry['test_rows']} rows (nested estimate {n['mean']:.4f}, 95% CI "
        f"{n['ci95'][0]:.4f}..{n['ci95'][1]:.4f})")]
    if entry.get("note"):
        parts.append(Text.from_markup(f"[yellow]{escape(entry['note'])}[/yellow]"))
    if entry["look_number"] > 1:
        parts.append(Text.from_markup(f"[yellow]this is look {entry['look_number']}[/yellow]: the ledger counts "
                                      "every look, and each one after the first is biased by those before"))
    return Group(*parts)


def fit_lines(info: dict[str, Any]) -> Group:
    parts: list[RenderableType] = [Text.from_markup(f"[yellow]note[/yellow]: {note}") for note in info["notes"]]
    parts.append(Text(f"wrote {info['folder']}: {info['epochs']} epochs on {info['dev_rows']} development rows "
                      f"({info['dev_source']}); training-rows {info['metric']} {info['train_score']:.4f} "
                      f"(not an estimate); model {info['model_hash'][:12]}"))
    if info["mlflow"]:
        parts.append(Text(f"MLflow model: {info['mlflow']['model_uri']} (run {info['mlflow']['run_id']})"))
    return Group(*parts)


class Shown:
    """A result's view that shows itself everywhere: rich (`__rich__`), Jupyter (HTML) and `print` (text).

    `data` keeps the plain values the view was drawn from, for code that wants numbers, not pictures.
    """

    def __init__(self, view: RenderableType, data: Any = None) -> None:
        self.view = view
        self.data = data

    def __rich__(self) -> RenderableType:
        return self.view

    def _render(self, html: bool) -> str:
        console = Console(record=True, file=io.StringIO(), width=HTML_WIDTH, color_system="truecolor",
                          force_jupyter=False, force_terminal=html)
        console.print(self.view)
        return console.export_html(inline_styles=True, code_format=HTML_FRAGMENT) if html else console.export_text()

    def __str__(self) -> str:
        return self._render(html=False)

    def _repr_html_(self) -> str:
        return self._render(html=True)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, str]:
        """What Jupyter shows: HTML with rich's colours, plain text where HTML is not wanted."""
        return {"text/plain": str(self), "text/html": self._repr_html_()}


# -- the running sweep ---------------------------------------------------------------------------------------
def _live_possible(console: Console) -> bool:
    """A terminal, or Jupyter with ipywidgets (rich draws its live display into an output widget there)."""
    if console.is_jupyter:
        return importlib.util.find_spec("ipywidgets") is not None
    return console.is_terminal


class Display:
    """A running sweep as people expect to see it.

    On a terminal (or in Jupyter): one progress bar per phase (trials, then refits, then the report) with
    elapsed time and ETA, the studies table refreshed as trials land, and a workers table only when
    several workers share the sweep. Piped: plain lines, one per trial, each with the count so far.
    `quiet` (for `--json`, or `progress=False`): nothing at all.
    """

    def __init__(self, *, quiet: bool, console: Console | None = None) -> None:
        self.quiet = quiet
        self.console = console or out
        self.live: Live | None = None
        self.bars = Progress(TextColumn("{task.description:<7}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console)
        self.tasks: dict[str, TaskID] = {}
        self.rows: list[dict[str, Any]] = []
        self.workers: list[dict[str, Any]] = []
        self.several = False
        self.total = 0
        self.done = 0
        self.started = time.time()
        self.steps_done, self.steps_said = 0, 0.0  # the round's steps so far; when a piped line last said so

    def __enter__(self) -> Display:
        if not self.quiet and _live_possible(self.console):
            self.live = Live(self._view(), console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._view())
            self.live.__exit__(*exc)

    def event(self, kind: str, info: dict[str, Any]) -> None:
        """The sweep's progress callback (`workers.run_sweep(progress=...)`)."""
        if self.quiet:
            return
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(info)
        if self.live is not None:
            self.live.update(self._view())

    def _on_start(self, info: dict[str, Any]) -> None:
        verb = "resuming" if info["resumed"] else "starting"
        slots = info["workers"]
        self.several = len(slots) > 1
        self.total = info["studies"] * info["n_trials"]
        on = ", ".join(sorted({f"{slots.count(d)} x {d}" for d in slots}))
        self._say(f"{verb} {info['sweep']}: {info['studies']} studies x {info['n_trials']} trials on {on} "
                  f"(storage {info['storage']})")
        for note in info["notes"]:
            self._say(f"note: {note}")

    def _on_status(self, info: dict[str, Any]) -> None:
        self.rows, self.workers = info["rows"], info.get("workers", [])
        self.done = sum(r["finished"] for r in self.rows)
        self.total = sum(r["n_trials"] for r in self.rows)
        if "trials" not in self.tasks:  # a resumed sweep's earlier trials are not part of this run's rate
            self.tasks["trials"] = self.bars.add_task("trials", total=self.total, completed=self.done)
        self.bars.update(self.tasks["trials"], completed=self.done, total=self.total)

    def _on_trial(self, info: dict[str, Any]) -> None:
        self._end_steps()
        self.done = min(self.done + 1, self.total) if self.total else self.done + 1
        if "trials" in self.tasks:
            self.bars.update(self.tasks["trials"], completed=self.done)
        if self.live is None:
            shown = _score(info["value"]) if info["value"] is not None else info["state"]
            self._say(f"{info['study']} trial {info['number']}: {shown}  [{self.done}/{self.total} trials, "
                      f"{time.time() - self.started:.0f}s]")

    def _on_steps(self, info: dict[str, Any]) -> None:
        """A round whose epochs take seconds: its training steps so far and the rows trained per second
        (`sweep`'s `steps` events); the bar's ETA is the round's if every model trains every epoch."""
        if "steps" in self.tasks and info["done"] < self.steps_done:  # the next batch of folds: a bar of its own
            self._end_steps()
        if "steps" not in self.tasks:
            self.tasks["steps"] = self.bars.add_task("steps", total=info["total"])
        self.steps_done = info["done"]
        rate = f"steps ({info['rows_per_s']:,.0f} rows/s)"
        self.bars.update(self.tasks["steps"], completed=info["done"], total=info["total"], description=rate)
        now = time.time()
        if self.live is None and now - self.steps_said >= PIPED_STEPS_EVERY_S:
            self.steps_said = now
            self._say(f"training: step {info['done']:,} of {info['total']:,} in this round, "
                      f"{info['rows_per_s']:,.0f} rows/s [{now - self.started:.0f}s]")

    def _end_steps(self) -> None:
        """The round's training is over: its steps bar goes."""
        if "steps" in self.tasks:
            self.bars.remove_task(self.tasks.pop("steps"))
        self.steps_done = 0

    def _on_phase(self, info: dict[str, Any]) -> None:
        """After the trials: `refits` (outer-fold bests on their outer-train rows), `report`, `done`."""
        for task in self.bars.tasks:
            self.bars.update(task.id, completed=task.total)
        self.rows = info.get("rows", self.rows)
        phase = info["phase"]
        if phase == "done":
            return
        self.tasks[phase] = self.bars.add_task(phase, total=info.get("total") or 1)
        if self.live is None:
            what = {"refits": f"refitting {info.get('total')} outer-fold bests and scoring their outer-test rows",
                    "report": "writing the report and closing the MLflow runs (pictures follow)"}.get(phase, phase)
            self._say(f"{what} [{time.time() - self.started:.0f}s]")

    def _on_stale(self, info: dict[str, Any]) -> None:
        self._say(f"{info['study']} trial {info['number']}: its worker is gone; failed and re-queued")

    def _on_worker_failed(self, info: dict[str, Any]) -> None:
        self._say(f"{info['worker']} exited with code {info['code']} (see {info['log']}); the others go on")

    def _view(self) -> Group:
        parts: list[RenderableType] = [self.bars]
        if self.rows:
            parts.append(status_table(self.rows, "studies"))
        if self.several and self.workers:
            workers = _table("workers", ["worker", "host", "device", "running"],
                             [[w["worker"], w["host"], w["device"], ", ".join(w["trials"])] for w in self.workers])
            parts.append(workers)
        return Group(*parts)

    def _say(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False)
        else:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)

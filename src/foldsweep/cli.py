"""The `foldsweep` command: parse options, call a stage, print. Errors become one line and exit code 2."""

from __future__ import annotations

import functools
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from foldsweep import __version__
from foldsweep.errors import FoldsweepError

out = Console()
err = Console(stderr=True)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """FoldsweepError -> one line on stderr, exit 2; Ctrl-C -> exit 130 with how to resume."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except FoldsweepError as error:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {error}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            spec = kwargs.get("spec")
            hint = f"; resume with: foldsweep run {spec}" if spec else ""
            click.echo(f"interrupted: finished trials are kept{hint}", err=True)
            sys.exit(130)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="foldsweep")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def cli(debug: bool) -> None:
    """Honest hyperparameter sweeps: nested k-fold CV, a sealed test set, Optuna, MLflow."""
    import logging

    import optuna

    optuna.logging.set_verbosity(optuna.logging.DEBUG if debug else optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.DEBUG if debug else logging.WARNING)


def _load(spec: str, overrides: tuple[str, ...]) -> Any:
    from foldsweep.spec import load_spec

    return load_spec(spec, overrides)


spec_arg = click.argument("spec", type=click.Path(dir_okay=False))
set_opt = click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
                       help="Override a spec value (repeatable), validated like the file.")
json_opt = click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line.")


@cli.command()
@spec_arg
@set_opt
@json_opt
@click.option("--fresh", is_flag=True, help="Start over under a new name (NAME-2, ...); nothing is deleted.")
@click.option("--storage", default=None, help="Optuna storage URL (overrides the spec's `storage`).")
@_guard
def run(spec: str, overrides: tuple[str, ...], as_json: bool, fresh: bool, storage: str | None) -> None:
    """Run (or resume) the nested sweep SPEC."""
    from foldsweep.workers import run_sweep

    sweep_spec = _load(spec, overrides)
    display = Display(quiet=as_json)
    with display:
        summary = run_sweep(sweep_spec, fresh=fresh, storage=storage, progress=display.event)
    if as_json:
        click.echo(json.dumps(_public(summary), default=str))
    else:
        _print_summary(summary)


@cli.command()
@spec_arg
@set_opt
@click.option("--storage", required=True, help="The Optuna storage URL the sweep runs on.")
@click.option("--device", default=None, help="cpu or cuda:N (default: the spec's first device).")
@click.option("--name", default="worker", help="Worker name shown in MLflow and status.")
@click.option("--threads", type=int, default=None, help="torch threads for a CPU worker.")
@click.option("--quiet", is_flag=True)
@_guard
def worker(spec: str, overrides: tuple[str, ...], storage: str, device: str | None, name: str,
           threads: int | None, quiet: bool) -> None:
    """Join a running sweep from this machine and take trials until every study is done."""
    from foldsweep.workers import join_sweep

    ran = join_sweep(_load(spec, overrides), storage=storage, device=device, name=name, threads=threads)
    if not quiet:
        click.echo(f"{name}: ran {ran} trials; every study is done")


@cli.command()
@spec_arg
@set_opt
@json_opt
@_guard
def validate(spec: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check SPEC and its data (and the fold plan) without training anything."""
    from foldsweep.data import load_dataset
    from foldsweep.splits import make_plan
    from foldsweep.workers import resolve_devices

    sweep_spec = _load(spec, overrides)
    data = load_dataset(sweep_spec.data)
    plan = make_plan(data, sweep_spec.split)
    info = {"sweep": sweep_spec.name, "rows": len(data.y), "features": data.X.shape[1], "task": data.task,
            "metric": data.metric, "classes": data.classes, "dev_rows": len(plan.dev), "test_rows": len(plan.test),
            "outer_folds": len(plan.outer), "inner_folds": len(plan.final_inner),
            "searched": list(sweep_spec.search), "devices": resolve_devices(sweep_spec), "notes": plan.notes,
            "fingerprint": data.fingerprint}
    if as_json:
        click.echo(json.dumps(info, default=str))
        return
    out.print(f"[green]ok[/green] {spec}: {info['rows']} rows x {info['features']} features, {data.task}, "
              f"metric {data.metric}; {info['dev_rows']} dev / {info['test_rows']} sealed test rows; "
              f"{info['outer_folds']} outer x {info['inner_folds']} inner folds; searching {', '.join(sweep_spec.search)}")
    for note in plan.notes:
        out.print(f"[yellow]note[/yellow]: {note}")


@cli.command()
@click.argument("sweep", required=False)
@json_opt
@_guard
def status(sweep: str | None, as_json: bool) -> None:
    """Per study: finished / n_trials, running, failed, best value (all sweeps without SWEEP)."""
    from foldsweep.record import home
    from foldsweep.storage import backend
    from foldsweep.sweep import study_status
    from foldsweep.workers import open_existing

    names = [sweep] if sweep else sorted(p.name for p in (home() / "sweeps").glob("*") if (p / "record.json").exists())
    report = []
    for name in names:
        record, refs = open_existing(name)
        report.append({"sweep": name, "storage": record.meta["storage"], "backend": backend(record.meta["storage"]),
                       "studies": study_status(refs, record.spec.optuna.n_trials),
                       "nested": record.meta.get("summary", {}).get("nested")})
    if as_json:
        click.echo(json.dumps(report, default=str))
        return
    for entry in report:
        out.print(_status_table(entry["studies"], f"{entry['sweep']} ({entry['backend']}: {entry['storage']})"))
        if entry["nested"]:
            n = entry["nested"]
            out.print(f"nested estimate {n['mean']:.4f} ± {n['std']:.4f} (95% CI {n['ci95'][0]:.4f}..{n['ci95'][1]:.4f})")


@cli.command()
@click.argument("sweep")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="File to write (default: stdout).")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml")
@_guard
def export(sweep: str, output: str | None, fmt: str) -> None:
    """Write the final study's best configuration, with provenance, as a loadable spec."""
    from foldsweep.export import export_best, render

    text = render(export_best(sweep), fmt)
    if output is None:
        click.echo(text, nl=False)
        return
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(text)
    click.echo(f"wrote {output}", err=True)


@cli.command()
@click.argument("sweep")
@json_opt
@click.option("--markdown", type=click.Path(dir_okay=False), default=None, help="Also write the report here.")
@_guard
def report(sweep: str, as_json: bool, markdown: str | None) -> None:
    """The nested-CV report: estimate and CI, optimism, stability, final config, test looks."""
    from foldsweep.record import SweepRecord
    from foldsweep.report import stability, summary_markdown

    record = SweepRecord.open(sweep)
    summary = record.meta.get("summary")
    if summary is None:
        raise FoldsweepError(f"sweep `{sweep}` has not finished yet; `foldsweep run` it to the end first")
    looks = record.ledger
    if markdown:
        Path(markdown).write_text(summary_markdown(summary, looks))
    if as_json:
        click.echo(json.dumps(summary | {"stability": stability(summary), "test_looks": looks}, default=str))
        return
    out.print(summary_markdown(summary, looks))


# -- printing -------------------------------------------------------------------------------------------
def _public(summary: dict[str, Any]) -> dict[str, Any]:
    keys = ("sweep", "metric", "nested", "final", "optimism", "mlflow", "storage", "fold_fits", "wall_s")
    return {k: summary[k] for k in keys if k in summary} | {"workers": summary.get("workers"),
                                                            "resumed": summary.get("resumed")}


def _print_summary(summary: dict[str, Any]) -> None:
    n = summary["nested"]
    out.print(f"[bold]{summary['sweep']}[/bold]: nested {summary['metric']} {n['mean']:.4f} ± {n['std']:.4f} "
              f"(95% CI {n['ci95'][0]:.4f}..{n['ci95'][1]:.4f}), optimism {summary['optimism']:+.4f}, "
              f"{summary['fold_fits']} fold fits in {summary['wall_s']:.1f}s")
    out.print(f"final config: {summary['final']['best_params']}")
    out.print(f"next: foldsweep export {summary['sweep']} -o best.yaml   |   foldsweep ui")


def _status_table(rows: list[dict[str, Any]], title: str) -> Table:
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
            self.rows = info["rows"]
            if self.live is not None:
                self.live.update(self._table())
        elif kind == "trial" and self.live is None:
            value = f"{info['value']:.4f}" if info["value"] is not None else info["state"]
            self._say(f"{info['study']} trial {info['number']}: {value}")
        elif kind == "stale":
            self._say(f"{info['study']} trial {info['number']}: worker stopped answering; failed and re-queued")

    def _table(self) -> Table:
        done = sum(r["finished"] for r in self.rows)
        total = sum(r["n_trials"] for r in self.rows)
        elapsed = time.time() - self.started
        eta = f", ETA {elapsed / done * (total - done):.0f}s" if done else ""
        return _status_table(self.rows, f"{done}/{total} trials, {elapsed:.0f}s{eta}")

    def _say(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text)
        else:
            click.echo(text)


def main() -> None:
    cli(prog_name="foldsweep")

"""The `foldsweep` command: parse options, call the Python API (`foldsweep.api`), print.

Errors become one line and exit code 2; Ctrl-C exits 130. Both, and the SIGINT handling, live only
here: the API raises and leaves the process alone, so a notebook or a script decides for itself.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from foldsweep import __version__, profile
from foldsweep.errors import FoldsweepError, explain

LIGHT = {"validate"}  # commands that never import optuna (tests/test_startup.py pins it)
_EXITING: list[bool] = []  # set by `main`: the process ends after the command, so Ctrl-C may stay held


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """FoldsweepError -> one line on stderr, exit 2; Ctrl-C -> exit 130 with how to resume."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        previous = _stop_on_first_ctrl_c()
        interrupted = False
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # a FoldsweepError, or a machine / store failure `explain` knows
            known = explain(error)
            if known is None:
                raise
            if debug:
                traceback.print_exc()
            click.echo(f"error: {known}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            interrupted = True
            spec = kwargs.get("spec")
            hint = f"; resume with: foldsweep run {spec}" if spec and fn.__name__ == "run" else ""
            click.echo(f"interrupted: finished trials are kept{hint}", err=True)
            sys.exit(130)
        finally:
            # after a Ctrl-C the `foldsweep` process keeps ignoring further ones until it has exited; a command
            # run in a Python process that goes on (a notebook, a test) gives its handler back, else that
            # process would ignore every later Ctrl-C
            if previous is not None and not (interrupted and _EXITING):
                signal.signal(signal.SIGINT, previous)

    return wrapper


def _stop_on_first_ctrl_c() -> Any:
    """The first Ctrl-C stops the command; later ones are ignored until the process has exited.

    A terminal's Ctrl-C reaches a worker and then the coordinator forwards one more: a second
    KeyboardInterrupt would cut short the recording of the trials in hand, or land in an exit handler
    and print a traceback. Returns the handler to put back when the command ends without Ctrl-C.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    stopping: list[int] = []

    def first_only(signum: int, frame: Any) -> None:
        if not stopping:
            stopping.append(signum)
            raise KeyboardInterrupt

    return signal.signal(signal.SIGINT, first_only)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="foldsweep")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def cli(debug: bool) -> None:
    """Honest hyperparameter sweeps: nested k-fold CV, a sealed test set, Optuna, MLflow."""
    import logging

    logging.getLogger("mlflow").setLevel(logging.DEBUG if debug else logging.WARNING)
    if click.get_current_context().invoked_subcommand in LIGHT:
        return
    import optuna  # its level is set after it is imported: its first logger resets it

    optuna.logging.set_verbosity(optuna.logging.DEBUG if debug else optuna.logging.WARNING)


def _load(spec: str, overrides: tuple[str, ...]) -> Any:
    from foldsweep.spec import load_spec

    return load_spec(spec, overrides)


def _print(renderable: Any) -> None:
    """Rich output on stdout (a terminal's width; piped output is never hard-wrapped)."""
    from foldsweep.console import out

    out.print(renderable)


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
@click.option("--profile", "profiled", is_flag=True, help="Print on stderr where the time went, by phase.")
@_guard
def run(spec: str, overrides: tuple[str, ...], as_json: bool, fresh: bool, storage: str | None,
        profiled: bool) -> None:
    """Run (or resume) the nested sweep SPEC."""
    from foldsweep import api, console

    if profiled:
        profile.enable()
    try:
        result = api.run(spec, overrides=overrides, fresh=fresh, storage=storage, progress=not as_json)
    finally:
        if profiled:
            click.echo(profile.render(profile.snapshot()), err=True)
    if as_json:
        click.echo(json.dumps(console.public_summary(result.summary), default=str))
    else:
        console.print_summary(result.summary)


@cli.command()
@spec_arg
@set_opt
@click.option("--storage", required=True, help="The Optuna storage URL the sweep runs on.")
@click.option("--device", default=None, help="cpu or cuda:N (default: the spec's first device).")
@click.option("--name", default=None, help="Worker name shown in MLflow and status (default: HOST-PID).")
@click.option("--threads", type=int, default=None, help="torch threads for a CPU worker.")
@click.option("--wait", "wait_s", type=click.FloatRange(min=0), default=0.0, metavar="SECONDS",
              help="Wait this long for the coordinator to create the sweep (batch jobs may start first).")
@click.option("--quiet", is_flag=True)
@_guard
def worker(spec: str, overrides: tuple[str, ...], storage: str, device: str | None, name: str | None,
           threads: int | None, wait_s: float, quiet: bool) -> None:
    """Join a running sweep from this machine and take trials until every study is done."""
    from foldsweep.workers import join_sweep

    ran = join_sweep(_load(spec, overrides), storage=storage, device=device, name=name, threads=threads,
                     wait_s=wait_s)
    if not quiet:
        click.echo(f"{name or 'worker'}: ran {ran} trials; every study is done")


@cli.command()
@spec_arg
@set_opt
@json_opt
@_guard
def validate(spec: str, overrides: tuple[str, ...], as_json: bool) -> None:
    """Check SPEC and its data (and the fold plan) without training anything."""
    from foldsweep.data import load_dataset
    from foldsweep.devices import resolve_devices
    from foldsweep.splits import check_batch_size, duplicate_count, make_plan

    sweep_spec = _load(spec, overrides)
    data = load_dataset(sweep_spec.data)
    plan = make_plan(data, sweep_spec.split)
    check_batch_size(sweep_spec, plan)
    info = {"sweep": sweep_spec.name, "rows": len(data.y), "features": data.X.shape[1], "task": data.task,
            "metric": data.metric, "classes": data.classes, "dev_rows": len(plan.dev), "test_rows": len(plan.test),
            "outer_folds": len(plan.outer), "inner_folds": len(plan.final_inner),
            "searched": list(sweep_spec.search), "devices": resolve_devices(sweep_spec), "notes": plan.notes,
            "fingerprint": data.fingerprint} | duplicate_count(data)
    if as_json:
        click.echo(json.dumps(info, default=str))
        return
    from foldsweep.console import out

    out.print(f"[green]ok[/green] {spec}: {info['rows']} rows x {info['features']} features, {data.task}, "
              f"metric {data.metric}; {info['dev_rows']} dev / {info['test_rows']} sealed test rows; "
              f"{info['outer_folds']} outer x {info['inner_folds']} inner folds; "
              f"searching {', '.join(sweep_spec.search)}")
    for note in plan.notes:
        out.print(f"[yellow]note[/yellow]: {note}")


@cli.command()
@click.argument("sweep", required=False)
@json_opt
@_guard
def status(sweep: str | None, as_json: bool) -> None:
    """Per study: finished / n_trials, running, failed, best value (all sweeps without SWEEP)."""
    from foldsweep import api
    from foldsweep.console import status_view

    report = api.status(sweep)
    if as_json:
        click.echo(json.dumps(report, default=str))
        return
    for entry in report:
        _print(status_view(entry))


@cli.command()
@click.argument("sweep")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="File to write (default: stdout).")
@click.option("--format", "fmt", type=click.Choice(["yaml", "json"]), default="yaml")
@_guard
def export(sweep: str, output: str | None, fmt: str) -> None:
    """Write the final study's best configuration, with provenance, as a loadable spec."""
    from foldsweep import api
    from foldsweep.export import render

    doc = api.open(sweep).export(output, fmt="json" if fmt == "json" else "yaml")
    if output is None:
        click.echo(render(doc, fmt), nl=False)
        return
    click.echo(f"wrote {output}", err=True)


@cli.command()
@click.argument("sweep")
@json_opt
@click.option("--markdown", type=click.Path(dir_okay=False), default=None, help="Also write the report here.")
@_guard
def report(sweep: str, as_json: bool, markdown: str | None) -> None:
    """The nested-CV report: estimate and CI, optimism, stability, overfitting, final config, test looks."""
    from foldsweep import api
    from foldsweep.files import write_text_atomic
    from foldsweep.report import report_markdown

    shown = api.open(sweep).report()
    if markdown:
        write_text_atomic(Path(markdown), report_markdown(shown.data))
    if as_json:
        click.echo(json.dumps(shown.data, default=str))
        return
    _print(shown)


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="Model folder to write.")
@json_opt
@_guard
def fit(config: str, output: str, as_json: bool) -> None:
    """Train an exported CONFIG on all development rows; save weights, preprocessing, config, provenance."""
    from foldsweep import api
    from foldsweep.console import fit_lines

    info = api.fit(Path(config), out=output).info
    if as_json:
        click.echo(json.dumps(info, default=str))
        return
    _print(fit_lines(info))


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="Predictions CSV to write.")
@_guard
def predict(model_dir: str, data: str, output: str) -> None:
    """Apply the model in MODEL_DIR (from `foldsweep fit`) to the rows of DATA (CSV or Parquet)."""
    from foldsweep.evaluate import predict_file

    info = predict_file(Path(model_dir), Path(data), Path(output))
    imputed = f"; {info['imputed']} missing values filled with training means" if info["imputed"] else ""
    click.echo(f"wrote {info['rows']} predictions to {info['output']}{imputed}", err=True)


@cli.command()
@click.argument("sweep")
@click.option("--again", is_flag=True, help="Look although the test set was looked at before (counted).")
@click.option("--model", "model_dir", type=click.Path(file_okay=False), default=None,
              help="Score this `foldsweep fit` folder instead of refitting the final config.")
@json_opt
@_guard
def test(sweep: str, again: bool, model_dir: str | None, as_json: bool) -> None:
    """The one deliberate look: score the final config on the sealed test rows of SWEEP."""
    from foldsweep import api
    from foldsweep.console import look_lines

    entry = api.open(sweep).test(again=again, model=model_dir)
    if as_json:
        click.echo(json.dumps(entry, default=str))
        return
    _print(look_lines(entry))


@cli.command()
@click.argument("sweep")
@click.option("--study", default=None, help="Only this study (outer-0, ..., final).")
@json_opt
@_guard
def trials(sweep: str, study: str | None, as_json: bool) -> None:
    """Every trial of SWEEP: study, number, state, inner-CV value, epochs, duration, searched values."""
    from foldsweep import api
    from foldsweep.console import trials_table

    rows = api.open(sweep).trial_rows(study)
    if as_json:
        click.echo(json.dumps(rows, default=str))
        return
    _print(trials_table(rows, f"{sweep}: {len(rows)} trials"))


@cli.command()
@click.argument("spec", required=False, type=click.Path(dir_okay=False))
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 0.0.0.0 shows the UI to the whole network.")
@_guard
def ui(spec: str | None, port: int, host: str) -> None:
    """The MLflow UI over ./mlruns (or SPEC's `tracking:` store): every sweep, study and trial."""
    from foldsweep.spec import TrackingSpec
    from foldsweep.tracking import serve_ui

    tracking = _load(spec, ()).tracking if spec else TrackingSpec()

    def ready(url: str, links: list[tuple[str, str]]) -> None:
        click.echo(f"MLflow UI at {url} (Ctrl-C stops it)")
        for name, link in links:
            click.echo(f"  {name}: {link}")

    try:
        code = serve_ui(tracking, host, port, ready)
    except KeyboardInterrupt:
        click.echo("MLflow UI stopped", err=True)
        return
    if code:
        raise FoldsweepError(f"the MLflow UI stopped with exit code {code}")


def main() -> None:
    """The `foldsweep` command.

    It ends without tearing down the interpreter's modules, which takes seconds once torch, Optuna and
    scikit-learn are loaded (measured 1-2 s here after a sweep). What a normal exit does that matters
    still happens, in the same order: threads that are not daemons are waited for, exit handlers run (a
    writer process is waited for, logs are flushed), output is flushed; then the process ends with the
    command's exit code.
    """
    _EXITING.append(True)
    try:
        cli(prog_name="foldsweep")
    except SystemExit as done:
        _exit_now(done.code)


def _exit_now(code: int | str | None) -> None:
    if isinstance(code, str):
        click.echo(code, err=True)
    for thread in threading.enumerate():
        if not thread.daemon and thread is not threading.main_thread():
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe (`foldsweep ... | head`) has nothing to flush into
            stream.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)

"""What people see: the live display's phases, piped lines that never wrap, tables with sensible precision."""

from __future__ import annotations

import io
import sys

from rich.console import Console
from rich.text import Text

from foldsweep.console import Display, Shown, _console, _headline, summary_view, value

ROWS = [{"study": "outer-0", "finished": 1, "n_trials": 2, "in_flight": 1, "failed": 0, "best": 0.75, "refit": None},
        {"study": "final", "finished": 0, "n_trials": 2, "in_flight": 0, "failed": 0, "best": None, "refit": None}]
SUMMARY = {"sweep": "tiny", "metric": "accuracy", "direction": "maximize",
           "nested": {"mean": 0.7372, "std": 0.0272, "ci95": [0.4928, 0.9815], "outer": [0.75, 0.72]},
           "optimism": -0.0128, "fold_fits": 14, "wall_s": 3.5, "workers": 1,
           "final": {"best_params": {"lr": 0.007455461557142221, "weight_decay": 4.3350892469155154e-05,
                                     "batch_size": 16, "width": 8}, "best_value": 0.7756}}


def start(workers: list[str]) -> dict:
    return {"sweep": "tiny", "resumed": False, "workers": workers, "storage": "mlruns/optuna/tiny.journal",
            "notes": [], "n_trials": 2, "studies": 2}


def drive(display: Display, workers: list[str]) -> None:
    with display:
        display.event("start", start(workers))
        display.event("status", {"rows": ROWS, "workers": [{"worker": "worker-1", "host": "h", "device": "cpu",
                                                            "trials": ["outer-0#1"]}]})
        display.event("trial", {"study": "outer-0", "number": 1, "state": "complete", "value": 0.8, "worker": "w"})
        display.event("phase", {"phase": "refits", "total": 1})
        display.event("phase", {"phase": "report", "total": 1,
                                 "rows": [ROWS[0] | {"refit": {"outer_test_score": 0.6543}}, ROWS[1]]})
        display.event("phase", {"phase": "done", "total": 1})


def terminal(width: int = 120) -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=width, color_system=None)


def test_live_display_shows_a_bar_per_phase_and_workers_only_when_several() -> None:
    mid = Display(quiet=False, console=terminal())
    mid.event("start", start(["cpu"]))
    mid.event("status", {"rows": ROWS, "workers": []})
    mid.event("trial", {"study": "outer-0", "number": 1, "state": "complete", "value": 0.8, "worker": "w"})
    snapshot = terminal()
    snapshot.print(mid._view())
    shown = snapshot.file.getvalue()
    assert "trials" in shown and "2/4" in shown and "ETA" in shown and "refits" not in shown
    assert "outer-0" in shown and "0.7500" in shown and "1/2" in shown  # the studies table
    one = terminal()
    drive(Display(quiet=False, console=one), ["cpu"])
    text = one.file.getvalue()
    for bar in ("trials  ", "refits  ", "report  "):
        assert any(bar in line and "━" in line for line in text.splitlines()), bar
    assert "4/4" in text  # the trials bar is complete once the refits start
    assert "0.6543" in text  # the outer-test column fills once the refits are done
    assert "worker-1" not in text  # one worker: no workers table
    several = terminal()
    drive(Display(quiet=False, console=several), ["cpu", "cpu"])
    assert "worker-1" in several.file.getvalue() and "outer-0#1" in several.file.getvalue()


def test_piped_display_prints_whole_lines_with_the_count_and_quiet_prints_nothing() -> None:
    piped = Console(file=io.StringIO(), width=40, soft_wrap=True)
    drive(Display(quiet=False, console=piped), ["cpu"])
    lines = piped.file.getvalue().splitlines()
    assert lines[0] == "starting tiny: 2 studies x 2 trials on 1 x cpu (storage mlruns/optuna/tiny.journal)"
    assert lines[1].startswith("outer-0 trial 1: 0.8000  [2/4 trials, ")
    assert lines[2].startswith("refitting 1 outer-fold bests and scoring their outer-test rows [")
    quiet = Console(file=io.StringIO())
    drive(Display(quiet=True, console=quiet), ["cpu"])
    assert quiet.file.getvalue() == ""


def test_final_config_is_a_table_with_four_significant_digits() -> None:
    assert value(0.007455461557142221) == "0.007455" and value(4.3350892469155154e-05) == "4.335e-05"
    assert value(16) == "16"
    text = str(Shown(summary_view(SUMMARY)))
    assert "0.007455461557142221" not in text
    assert any("lr" in line and "0.007455" in line for line in text.splitlines())
    assert any("weight_decay" in line and "4.335e-05" in line for line in text.splitlines())
    assert "14 fold fits in 3.5s on 1 worker" in text


def test_shown_renders_as_html_for_jupyter_and_text_for_print() -> None:
    shown = Shown(summary_view(SUMMARY), SUMMARY)
    bundle = shown._repr_mimebundle_()
    assert set(bundle) == {"text/plain", "text/html"}
    assert "0.7372" in bundle["text/plain"] and "0.7372" in bundle["text/html"]
    assert bundle["text/html"].startswith("<pre") and "<html" not in bundle["text/html"]  # a fragment for a cell
    assert shown.data is SUMMARY


def test_piped_output_is_never_hard_wrapped(monkeypatch) -> None:
    """Not a terminal (`| tee`, a CI log): a long line stays one line, a wide table keeps its width."""
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", piped)
    console = _console()
    assert not console.is_terminal
    console.print(Text.from_markup(_headline(SUMMARY) + ", " + "and more words " * 12))
    console.print(summary_view(SUMMARY | {"final": {"best_params": {f"knob_{i}": 0.1 * i for i in range(12)},
                                                    "best_value": 0.7}}))
    lines = piped.getvalue().splitlines()
    assert lines[0].startswith("tiny: nested accuracy 0.7372") and lines[0].rstrip().endswith("and more words")
    assert max(len(line) for line in lines) > 80


def test_a_long_round_shows_its_steps_rows_per_second_and_an_eta_until_its_trials_land() -> None:
    shown = Display(quiet=False, console=terminal())
    shown.event("start", start(["cpu"]))
    shown.event("status", {"rows": ROWS, "workers": []})
    for done in (40, 80):
        shown.event("steps", {"done": done, "total": 400, "rows": done * 512 * 48, "rows_per_s": 123_456.7})
    view = terminal()
    view.print(shown._view())
    line = next(line for line in view.file.getvalue().splitlines() if "steps" in line)
    assert "123,457 rows/s" in line and "80/400" in line and "━" in line
    assert shown.bars.tasks[-1].remaining == 320  # what the ETA column is computed from
    shown.event("steps", {"done": 10, "total": 200, "rows": 5120, "rows_per_s": 9.0})  # the round's next fit_many
    assert [t.total for t in shown.bars.tasks if t.description.startswith("steps")] == [200]
    shown.event("trial", {"study": "outer-0", "number": 1, "state": "complete", "value": 0.8, "worker": "w"})
    assert not any(t.description.startswith("steps") for t in shown.bars.tasks)  # the round is over
    piped = Console(file=io.StringIO(), force_terminal=False, width=80)
    plain = Display(quiet=False, console=piped)
    with plain:
        plain.event("steps", {"done": 40, "total": 400, "rows": 1000, "rows_per_s": 2500.0})
        plain.event("steps", {"done": 41, "total": 400, "rows": 1025, "rows_per_s": 2500.0})  # within 30 s: no line
    assert piped.file.getvalue().splitlines() == ["training: step 40 of 400 in this round, 2,500 rows/s [0s]"]

"""The best trial, one rule for every reader: tied values go to the lowest slot, not to Optuna's first trial."""

from __future__ import annotations

import optuna
from matplotlib.figure import Figure

from foldsweep import plots
from foldsweep.export import export_best
from foldsweep.pictures import sweep_pictures
from foldsweep.report import diagnostics, study_metrics
from foldsweep.space import distributions
from foldsweep.spec import load_spec
from foldsweep.storage import SLOT
from foldsweep.studies import best_trial, open_existing
from foldsweep.workers import run_sweep


def _tied(study: optuna.Study, params: list[dict[str, object]], dists: dict, value: float) -> tuple[int, int]:
    """Two complete trials of equal value: the first added (lower number) in a high slot, the second (a
    retry, enqueued later) in slot 0. Returns (Optuna's pick, the lowest slot's)."""
    numbers = []
    for i, (slot, chosen) in enumerate(((7, params[0]), (0, params[1]))):
        study.add_trial(optuna.trial.create_trial(
            params=chosen, distributions=dists, value=value,
            user_attrs={SLOT: slot, "mlflow_run_id": f"run-{i}", "best_epochs": [2, 3], "fold_scores": [value] * 2}))
        numbers.append(study.get_trials(deepcopy=False)[-1].number)
    return numbers[0], numbers[1]


def test_every_reader_picks_the_lowest_slot_of_tied_best_trials(write_spec) -> None:
    spec = load_spec(write_spec(tracking={"enabled": False}))
    run_sweep(spec)
    record, refs = open_existing("tiny")
    final = next(ref for ref in refs if ref.key == "final")
    ran = final.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    optunas, lowest_slot = _tied(final.study, [ran[0].params, ran[1].params], distributions(spec), value=1.5)
    assert ran[0].params != ran[1].params
    assert final.study.best_trial.number == optunas != lowest_slot  # the case where the two rules disagree

    chosen = best_trial(final)
    assert chosen is not None and chosen.number == lowest_slot
    exported = export_best("tiny")["provenance"]
    assert (exported["trial"], exported["best_params"]) == (lowest_slot, chosen.params)
    assert [row["trial"] for row in diagnostics(refs, spec) if row["study"] == "final"] == [lowest_slot]
    assert study_metrics(final.study)["best_inner_value"] == 1.5
    drawn = [b for b in sweep_pictures(refs, list(spec.search), "accuracy").best if b.title.startswith("final")]
    assert [b.run_id for b in drawn] == ["run-1"] and f"trial {lowest_slot} " in drawn[0].title
    picture = plots._parallel([("final", final.study)], list(spec.search), "accuracy")
    assert picture is not None and _thick_line(picture) == [plots._scaled(chosen, knob) for knob in spec.search]


def _thick_line(fig: Figure) -> list[float]:
    """The knob coordinates of the parallel-coordinates line drawn thick (the study's best trial)."""
    (line,) = [line for line in fig.axes[0].lines if line.get_linewidth() > 2]
    return list(line.get_ydata())[:-1]

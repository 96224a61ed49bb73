"""Sealed test rows the model trained on (`duplicates: warn`) are counted in the summary, the report and the look."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_spec

from foldsweep.cli import cli
from foldsweep.data import load_dataset
from foldsweep.spec import DataSpec, SplitSpec
from foldsweep.splits import seal_test_set

SPLIT = {"test_size": 0.25, "seed": 0, "outer": {"k": 2}, "inner": {"k": 2}, "duplicates": "warn"}
COPIES = 5  # development rows overwritten with copies of sealed test rows


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Sonar with COPIES dev rows turned into copies of sealed test rows (labels untouched: the seal is the same)."""
    folder = tmp_path_factory.mktemp("sealed")
    data = load_dataset(DataSpec(dataset="sonar"))
    dev, test = seal_test_set(data, SplitSpec(**SPLIT))
    X = data.X.copy()
    used: list[int] = []
    for t in test[:COPIES]:
        d = next(int(r) for r in dev if data.y[r] == data.y[t] and r not in used)
        X[d] = X[t]
        used.append(d)
    frame = pd.DataFrame(X, columns=data.feature_names).assign(label=[data.classes[i] for i in data.y])
    frame.to_csv(folder / "sonar.csv", index=False)
    spec = tiny_spec(data={"dataset": None, "path": "sonar.csv", "target": "label"}, split=SPLIT,
                     tracking={"enabled": False})
    (folder / "tiny.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.delenv("FOLDSWEEP_HOME", raising=False)
        code, ran, stderr = _run("run", "tiny.yaml", "--json")
        assert code == 0, stderr
        report = _run("report", "tiny", "--json")[1]
        markdown = (folder / "mlruns/sweeps/tiny/report.md").read_text()
        code, looked, stderr = _run("test", "tiny", "--json")
        assert code == 0, stderr
        shown = _run("test", "tiny", "--again")[1]
    return {"run": json.loads(ran.strip().splitlines()[-1]), "report": json.loads(report), "markdown": markdown,
            "look": json.loads(looked), "shown": " ".join(shown.split()), "n_test": len(test)}


def test_summary_report_and_look_count_the_test_rows_the_model_trained_on(swept: dict) -> None:
    n = swept["n_test"]
    note = (f"{COPIES} of {n} sealed test rows have the features of development rows the model trained on: the test "
            f"look is optimistic, by up to {COPIES / n:.1%} of its rows (split.duplicates: group keeps identical rows "
            f"on one side); {COPIES} groups of rows with identical features ({2 * COPIES} rows)")
    for sealed in (swept["run"]["sealed_test"], swept["report"]["sealed_test"]):
        assert sealed == {"test_rows_in_dev": COPIES, "test_rows": n, "share": COPIES / n, "duplicate_groups": COPIES,
                          "duplicate_rows": 2 * COPIES, "note": note}
    assert f"- **{note}**" in swept["markdown"]
    look = swept["look"]
    assert look["test_rows_in_dev"] == COPIES and look["optimistic_by_up_to"] == COPIES / n and look["note"] == note
    assert note in swept["shown"]


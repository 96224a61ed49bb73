"""One code path: a sweep driven from Python on a DataFrame gives exactly the numbers the CLI gives on
the same table written to CSV (run, status, trials, report, export, fit, predict, the test look)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_spec

import foldsweep
from foldsweep.cli import cli
from foldsweep.console import public_summary
from foldsweep.data import _bundled

# what may differ between two sweeps in two folders: ids, absolute paths, clocks, and where the rows came from
DIFFERENT = {"run_id", "tracking_uri", "model_uri", "wall_s", "time", "duration_s", "mlflow_run_id", "spec_hash",
             "config_hash", "data", "created", "mlflow"}


def cli_json(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def plain(value: Any) -> Any:
    """What the CLI's JSON makes of a Python value (tuples become lists, numpy scalars numbers)."""
    return json.loads(json.dumps(value, default=str))


def same(cli_value: Any, api_value: Any, where: str = "") -> int:
    """Assert equal everywhere but the DIFFERENT keys; numbers exactly. Returns how many numbers were compared."""
    if isinstance(cli_value, dict):
        assert isinstance(api_value, dict) and set(cli_value) == set(api_value), where
        return sum(same(cli_value[k], api_value[k], f"{where}.{k}") for k in cli_value if k not in DIFFERENT)
    if isinstance(cli_value, list):
        assert isinstance(api_value, list) and len(cli_value) == len(api_value), where
        return sum(same(c, a, f"{where}[{i}]") for i, (c, a) in enumerate(zip(cli_value, api_value)))
    if isinstance(cli_value, float) and math.isnan(cli_value):
        assert isinstance(api_value, float) and math.isnan(api_value), where
        return 1
    assert cli_value == api_value, f"{where}: CLI {cli_value!r} vs API {api_value!r}"
    return int(isinstance(cli_value, (int, float)) and not isinstance(cli_value, bool))


@pytest.mark.slow
def test_python_on_a_frame_equals_the_cli_on_the_same_csv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frame = _bundled("sonar")[0].to_pandas()
    monkeypatch.delenv("FOLDSWEEP_HOME", raising=False)

    (tmp_path / "cli").mkdir()
    monkeypatch.chdir(tmp_path / "cli")
    frame.to_csv("table.csv", index=False)
    spec = tiny_spec(data={"dataset": None, "path": "table.csv", "target": "label"})
    Path("tiny.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))  # search order is sampling order
    from_cli = {
        "run": cli_json("run", "tiny.yaml", "--json"),
        "status": cli_json("status", "tiny", "--json")[0],
        "trials": cli_json("trials", "tiny", "--json"),
        "report": cli_json("report", "tiny", "--json"),
    }
    CliRunner().invoke(cli, ["export", "tiny", "--format", "json", "-o", "best.json"], catch_exceptions=False)
    from_cli["export"] = json.loads(Path("best.json").read_text())
    from_cli["fit"] = cli_json("fit", "best.json", "-o", "model", "--json")
    CliRunner().invoke(cli, ["predict", "model", "table.csv", "-o", "pred.csv"], catch_exceptions=False)
    cli_predictions = pd.read_csv("pred.csv")
    from_cli["test"] = cli_json("test", "tiny", "--json")

    (tmp_path / "api").mkdir()
    monkeypatch.chdir(tmp_path / "api")
    result = foldsweep.run(tiny_spec(), data=frame, target="label", progress=False)
    model = result.fit("model")
    from_api = {
        "run": public_summary(result.summary), "status": result.status(), "trials": result.trial_rows(),
        "report": result.report().data, "export": result.export("best.json", fmt="json"), "fit": model.info,
    }
    api_predictions = model.predictions(frame)
    from_api["test"] = result.test()

    assert from_api["export"]["provenance"]["data_fingerprint"] == from_cli["export"]["provenance"]["data_fingerprint"]
    assert from_cli["fit"]["model_hash"] == from_api["fit"]["model_hash"]  # the same weights, bit for bit
    compared = {part: same(from_cli[part], plain(from_api[part]), part) for part in from_cli}
    assert all(n > 0 for n in compared.values()), compared
    assert sum(compared.values()) > 150, compared  # every trial value, fold score, parameter, estimate ...

    assert list(cli_predictions.columns) == list(api_predictions.columns) == ["prediction", "prob_M", "prob_R"]
    assert (cli_predictions["prediction"] == api_predictions["prediction"]).all()
    for column in ("prob_M", "prob_R"):  # the CSV holds float32's shortest repr: it reads back to the same value
        assert np.array_equal(cli_predictions[column].to_numpy(np.float32), api_predictions[column].to_numpy())

"""Every bad input the CLI is known to meet: exit code 2, one line on stderr naming the file, key or column,
no traceback (unless --debug). One table, one test; each row writes its own files into a fresh folder.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import tiny_spec

from foldsweep.cli import cli
from foldsweep.data import load_dataset
from foldsweep.evaluate import save_model, train_final
from foldsweep.record import create_or_resume
from foldsweep.spec import load_spec, parse_spec
from foldsweep.splits import make_plan
from foldsweep.storage import default_storage


def write_yaml(folder: Path, spec: dict[str, Any], name: str = "sweep.yaml") -> str:
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def tiny(folder: Path, data: dict[str, Any] | None = None, search: dict[str, Any] | None = None,
         **overrides: Any) -> str:
    """The tiny sonar sweep; `data` and `search` replace whole blocks, other blocks merge."""
    spec = tiny_spec(**overrides)
    spec["data"] = data or spec["data"]
    spec["search"] = spec["search"] if search is None else search
    return write_yaml(folder, spec)


def with_search(folder: Path, **params: Any) -> str:
    return tiny(folder, search=params)


def csv_spec(folder: Path, frame: pd.DataFrame | None = None, text: str | None = None,
             split: dict[str, Any] | None = None, **data: Any) -> str:
    """A sweep over `data.csv` (a clean 60-row binary table unless `frame` or raw `text` is given)."""
    path = folder / "data.csv"
    if text is not None:
        path.write_text(text)
    else:
        (frame if frame is not None else table()).to_csv(path, index=False)
    spec = tiny_spec(train={"epochs": 3, "batch_size": 4}, split=split or {})
    spec["data"], spec["search"] = {"path": "data.csv", "target": "y", **data}, {}
    return write_yaml(folder, spec)


def table(n: int = 60, minority: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"f1": rng.normal(size=n).round(3), "f2": rng.normal(size=n).round(3),
                         "y": ["a"] * (n - minority) + ["b"] * minority})


def with_nan(frame: pd.DataFrame, value: float) -> pd.DataFrame:
    frame = frame.copy()
    frame.loc[[3, 10, 20], "f2"] = value
    return frame


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Case:
    """One bad input: `make` writes the files into a folder and returns the CLI arguments."""

    what: str
    make: Callable[[Path], list[str]]
    words: tuple[str, ...]


def validate(make_spec: Callable[[Path], str], *extra: str) -> Callable[[Path], list[str]]:
    return lambda folder: ["validate", make_spec(folder), *extra]


def run(make_spec: Callable[[Path], str], *extra: str) -> Callable[[Path], list[str]]:
    return lambda folder: ["run", make_spec(folder), *extra]


def text(body: str) -> Callable[[Path], str]:
    def make(folder: Path) -> str:
        (folder / "sweep.yaml").write_text(body)
        return str(folder / "sweep.yaml")

    return make


LR = {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}
CASES = [
    Case("missing spec file", lambda f: ["validate", "nope.yaml"], ("spec file `nope.yaml` not found",)),
    Case("YAML syntax error", validate(text("name: t\ndata:\n  dataset: sonar\ntrain:\n  epochs: 5\n   lr: 3\n")),
         ("sweep.yaml: line 6, column 6: YAML syntax error", "mapping values are not allowed")),
    Case("unknown key", validate(text("name: t\ndata: {dataset: sonar}\ntrian: {epochs: 5}\n")),
         ("unknown key `trian` (did you mean `train`?)",)),
    Case("unknown nested key", validate(lambda f: tiny(f, train={"patiense": 3})),
         ("`train.patiense`", "did you mean `patience`?")),
    Case("wrong type", validate(lambda f: tiny(f, train={"epochs": "many"})),
         ("`train.epochs`", "valid integer", "'many'")),
    Case("low > high", validate(lambda f: with_search(f, lr={"type": "float", "low": 0.1, "high": 0.01})),
         ("`search.lr`", "`low` must be <= `high`, got low=0.1 > high=0.01")),
    Case("log range with low <= 0", validate(lambda f: with_search(f, lr={**LR, "low": 0.0})),
         ("`search.lr`", "`low` must be > 0 for a log range, got 0.0")),
    Case("empty categorical", validate(lambda f: with_search(f, batch_size={"type": "categorical", "choices": []})),
         ("`search.batch_size.choices`", "at least 1 item")),
    Case("unknown search knob", validate(lambda f: with_search(f, learning_rate=LR)),
         ("unknown key `learning_rate`",)),
    Case("unknown sampler", validate(lambda f: tiny(f, optuna={"sampler": "grid"})),
         ("`optuna.sampler`", "'tpe', 'random' or 'qmc'", "'grid'")),
    Case("unknown pruner", validate(lambda f: tiny(f, optuna={"pruner": "early"})),
         ("`optuna.pruner`", "'median'", "'early'")),
    Case("unknown metric", validate(lambda f: tiny(f, data={"dataset": "sonar", "metric": "auc"})),
         ("`data.metric`", "'roc_auc'", "'auc'")),
    Case("unknown dataset", validate(lambda f: tiny(f, data={"dataset": "mnist"})),
         ("`data.dataset`", "'sonar'", "'mnist'")),
    Case("metric does not fit the task", validate(lambda f: tiny(f, data={"dataset": "diabetes", "task": "regression",
                                                                          "metric": "accuracy"})),
         ("metric `accuracy` is for classification", "rmse")),
    Case("metric does not fit the data", validate(lambda f: tiny(f, data={"dataset": "diabetes", "metric": "roc_auc"})),
         ("metric `roc_auc` needs a classification target", "set data.task: classification")),
    Case("test_size outside (0, 1)", validate(lambda f: tiny(f, split={"test_size": 1.5})),
         ("`split.test_size`", "less than 1", "1.5")),
    Case("k larger than the smallest class",
         validate(lambda f: csv_spec(f, table(minority=5), split={"outer": {"kind": "stratified", "k": 5}})),
         ("`split.outer.k`=5 is larger than the smallest class", "of 'b'", "lower k or use kind: kfold")),
    Case("k larger than the rows", validate(lambda f: tiny(f, split={"outer": {"kind": "kfold", "k": 500}})),
         ("`split.outer.k`=500 is larger than the 156 rows it must split",)),
    Case("missing data file", validate(lambda f: tiny(f, data={"path": "nowhere.csv", "target": "y"})),
         ("data file", "nowhere.csv` not found (data.path)")),
    Case("missing target column", validate(lambda f: csv_spec(f, target="label")),
         ("column `label` not found in `data`", "columns: f1, f2, y")),
    Case("non-numeric feature column", validate(lambda f: csv_spec(f, table().assign(colour=["red", "blue"] * 30))),
         ("feature column `colour` is not numeric", "data.categorical: onehot")),
    Case("NaN in features", validate(lambda f: csv_spec(f, with_nan(table(), np.nan))),
         ("feature column `f2` has 3 rows with NaN or inf", "data.missing: drop or impute")),
    Case("inf in features", validate(lambda f: csv_spec(f, with_nan(table(), np.inf))),
         ("feature column `f2` has 3 rows with NaN or inf",)),
    Case("target with one class", validate(lambda f: csv_spec(f, table().assign(y="a"))),
         ("target column `y` has one class only ('a')",)),
    Case("empty file", validate(lambda f: csv_spec(f, text="")), ("data.csv` is empty",)),
    Case("header without rows", validate(lambda f: csv_spec(f, text="f1,f2,y\n")), ("has a header but no rows",)),
    Case("duplicate column names", validate(lambda f: csv_spec(f, text="f1,f1,y\n1,2,a\n3,4,b\n")),
         ("duplicate column names: f1",)),
    Case("NUL bytes in a column name", validate(lambda f: csv_spec(f, text="f\x001,f2,y\n1,2,a\n3,4,b\n")),
         ("column 1 of", "has a control character in its name ('f\\x001')",)),
    Case("one name in two Unicode forms",
         validate(lambda f: csv_spec(f, text="caf\u00e9,cafe\u0301,y\n1,2,a\n3,4,b\n")),
         ("two columns spelt alike, 'caf\\xe9' and 'cafe\\u0301'", "two Unicode forms")),
    Case("fixed batch size larger than a fold", validate(lambda f: tiny(f, train={"batch_size": 64}, search={})),
         ("`train.batch_size` is 64 but the smallest inner-fold training set has 39 rows", "at most 39")),
    Case("searched batch size larger than a fold",
         validate(lambda f: with_search(f, batch_size={"type": "categorical", "choices": [16, 512]})),
         ("`search.batch_size` reaches 512 but the smallest inner-fold training set has 39 rows",)),
    Case("device that does not exist", validate(lambda f: tiny(f, resources={"devices": ["cuda:3"]})),
         ("resources.devices: `cuda:3` does not exist",)),
    Case("device name that is not one", validate(lambda f: tiny(f, resources={"devices": ["gpu0"]})),
         ("`resources.devices`", "device `gpu0` is not `cpu` or `cuda:N`")),
    Case("malformed --set", validate(lambda f: tiny(f), "--set", "train.epochs"),
         ("--set `train.epochs` must look like key.path=value",)),
    Case("YAML tag that builds a Python object",
         validate(text('name: t\ndata: !!python/object/apply:os.system ["echo owned"]\n')),
         ("refused", "python/object/apply:os.system", "plain values only")),
    Case("storage that cannot be reached",
         lambda f: ["run", tiny(f), "--storage", f"postgresql://u:secret@127.0.0.1:{closed_port()}/x"],
         ("storage `postgresql://u:***@127.0.0.1:", "cannot be reached")),
    Case("every trial diverges",
         run(lambda f: tiny(f, search={"lr": {"type": "categorical", "choices": [1e9]}}, train={"weight_decay": 0.01}),
             "--set", "tracking.enabled=false"),
         ("every trial of study outer-0 failed (", "x diverged: loss became NaN/inf at epoch")),
]


def data_file(name: str, content: bytes | str) -> Callable[[Path], list[str]]:
    """`validate` of a sweep over the file `name` holding `content` (or an absolute path)."""
    def make(folder: Path) -> list[str]:
        path = Path(name) if name.startswith("/") else folder / name
        if not name.startswith("/"):
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        spec = tiny_spec(train={"epochs": 3, "batch_size": 4})
        spec["data"], spec["search"] = {"path": str(path), "target": "y"}, {}
        return ["validate", write_yaml(folder, spec)]

    return make


def random_bytes(n: int, seed: int = 0) -> bytes:
    return bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8))


def binary_spec(folder: Path) -> list[str]:
    (folder / "sweep.yaml").write_bytes(random_bytes(3000))
    return ["validate", str(folder / "sweep.yaml")]


def damaged_journal(folder: Path) -> list[str]:
    """A sweep's record and an Optuna journal holding only lines that are not JSON."""
    spec = load_spec(tiny(folder))
    create_or_resume(spec, load_dataset(spec.data), default_storage("tiny"))
    journal = Path(default_storage("tiny"))
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text("this is not json\n{\"op_code\": 0, garbage\n")
    return ["status", "tiny"]


def model_folder(folder: Path, edit: Callable[[Path], None]) -> list[str]:
    """A real `fit` folder, edited by `edit` (which rewrites the hash a forger would rewrite too)."""
    config = parse_spec(tiny_spec(train={"epochs": 2}) | {"search": {}})
    data = load_dataset(config.data)
    final, _ = train_final(config, data, make_plan(data, config.split).dev, epochs=2)
    save_model(final, folder / "m")
    edit(folder / "m")
    pd.DataFrame(data.X[:3], columns=data.feature_names).to_csv(folder / "rows.csv", index=False)
    return ["predict", str(folder / "m"), str(folder / "rows.csv"), "-o", str(folder / "p.csv")]


def forged(folder: Path, name: str, content: bytes) -> None:
    (folder / name).write_bytes(content)
    provenance = json.loads((folder / "provenance.json").read_text())
    provenance["file_hashes"][name] = hashlib.sha256(content).hexdigest()
    (folder / "provenance.json").write_text(json.dumps(provenance))


class Pickled:
    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("owned",))


def pickle_in_model_pt(folder: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"head.bias": Pickled()}, buffer)
    forged(folder, "model.pt", buffer.getvalue())


def python_tag_in_config(folder: Path) -> None:
    text = (folder / "config.yaml").read_text() + 'x: !!python/object/apply:os.system ["echo owned"]\n'
    forged(folder, "config.yaml", text.encode())


HOSTILE = [
    Case("text file named .parquet", data_file("data.parquet", "f1,y\n1,a\n"),
         ("data.parquet` cannot be read as Parquet", "magic bytes")),
    Case("random bytes as CSV", data_file("data.csv", random_bytes(5000)), ("data.csv` cannot be read as CSV",)),
    Case("/etc/passwd as data", data_file("/etc/passwd", ""), ("`/etc/passwd`",)),
    Case("random bytes as the spec", binary_spec, ("sweep.yaml: not UTF-8 text (byte", "a spec file is YAML text")),
    Case("alias bomb under provenance",
         validate(text("name: t\ndata: {dataset: sonar}\nprovenance:\n  l0: &l0 [lol]\n" + "".join(
             f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 10)))),
         ("refused: expands to more than 100,000 values", "alias bomb")),
    Case("a billion trials", validate(lambda f: tiny(f, optuna={"n_trials": 1e9})),
         ("`optuna.n_trials`", "less than or equal to 1000000")),
    Case("a pickle in model.pt", lambda f: model_folder(f, pickle_in_model_pt),
         ("m/model.pt` is not a state dict of the network in config.yaml (torch, weights only:",)),
    Case("a python tag in a model's config.yaml", lambda f: model_folder(f, python_tag_in_config),
         ("m/config.yaml: line", "refused", "python/object/apply:os.system", "a model config holds plain values")),
    Case("an edited model config", lambda f: model_folder(f, lambda m: (m / "config.yaml").write_text(
        (m / "config.yaml").read_text().replace("activation: relu", "activation: tanh"))),
         ("m/config.yaml` does not match the hash in its provenance.json; the folder was changed",)),
]
CASES += HOSTILE


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_bad_input_is_one_line_and_exit_code_2(case: Case, workdir: Path) -> None:
    started = time.time()
    result = CliRunner().invoke(cli, case.make(workdir))
    assert result.exit_code == 2, (result.output, result.exception)
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    assert message.startswith("error: ")
    for word in case.words:
        assert word in message, message
    assert "secret" not in message
    assert time.time() - started < 30


@pytest.mark.parametrize(("data", "fixed"), [
    ({"categorical": "onehot"}, "colour"), ({"missing": "drop"}, "nan"), ({"missing": "impute"}, "nan"),
])
def test_the_suggested_fix_is_accepted(workdir: Path, data: dict[str, str], fixed: str) -> None:
    frame = table().assign(colour=["red", "blue"] * 30) if fixed == "colour" else with_nan(table(), np.nan)
    result = CliRunner().invoke(cli, ["validate", csv_spec(workdir, frame, **data), "--json"])
    assert result.exit_code == 0, result.stderr
    info = yaml.safe_load(result.stdout.strip().splitlines()[-1])
    assert info["rows"] == (57 if data.get("missing") == "drop" else 60)
    assert info["features"] == (4 if fixed == "colour" else 2)  # f1, f2 and one column per colour


def test_debug_shows_the_traceback(workdir: Path) -> None:
    result = CliRunner().invoke(cli, ["--debug", "validate", tiny(workdir, optuna={"sampler": "grid"})])
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert "SpecError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_real_process_prints_one_line_and_no_warnings(workdir: Path) -> None:
    """CliRunner cannot see what Python's warnings print; a subprocess shows what a user sees."""
    import subprocess

    spec = tiny(workdir, resources={"devices": ["cuda:3"]})
    proc = subprocess.run([sys.executable, "-m", "foldsweep", "validate", spec], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "cuda:3" in proc.stderr


@pytest.fixture
def read_only_mlruns(workdir: Path):
    """`mlruns/` on a read-only bind mount (root) or without write permission (anyone else)."""
    folder = workdir / "mlruns"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True).returncode == 0
    if not mounted or subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)],
                                     capture_output=True).returncode != 0:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)
        pytest.skip("root without permission to mount: a read-only folder cannot be made here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("home", ["mlruns", "elsewhere"])
def test_a_read_only_mlruns_is_one_line_and_quick(read_only_mlruns: Path, workdir: Path, home: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Errno 30 was a traceback; with the sweep state elsewhere, MLflow retried its database for 145 s."""
    if home == "elsewhere":
        monkeypatch.setenv("FOLDSWEEP_HOME", str(workdir / "state"))
    started = time.time()
    result = CliRunner().invoke(cli, ["run", tiny(workdir)])
    assert result.exit_code == 2, (result.output, result.exception)
    message = result.stderr.strip()
    assert "\n" not in message and message.startswith("error: "), message
    expected = "Read-only file system" if home == "mlruns" else "the MLflow database cannot be opened"
    if os.geteuid() != 0:
        expected = "Permission denied" if home == "mlruns" else expected
    assert expected in message and "writable" in message, message
    assert home != "mlruns" or "mlruns/" in message, message  # names what could not be written
    assert time.time() - started < 60


def test_a_garbage_journal_is_refused_in_one_line_and_left_as_it_was(workdir: Path) -> None:
    """Unreadable journal lines were a JSONDecodeError on every command; dropping them could renumber the
    records after them, so the command refuses in one line that says where, and how to go on."""
    command = damaged_journal(workdir)
    journal = workdir / "mlruns" / "optuna" / "tiny.journal"
    before = journal.read_bytes()
    result = CliRunner().invoke(cli, command)
    assert "Traceback" not in result.output and result.exit_code == 2, result.output
    assert result.stderr == ("error: the Optuna journal `mlruns/optuna/tiny.journal` is damaged at line 1 (byte 0): "
                             "an unreadable line of unknown kind (1 more damaged line after it); dropping it would "
                             "change the records after it (ids, states, parameters), so the file is left as it was: "
                             "rerun with --fresh to start a new sweep beside it, or put back a copy of the journal\n")
    assert journal.read_bytes() == before and not list(journal.parent.glob("tiny.journal.torn-*"))


def test_a_ctrl_c_in_a_command_run_in_process_gives_the_signal_handler_back(workdir: Path, write_spec,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Once it held a Ctrl-C the command kept its handler, and the process ignored every later Ctrl-C."""
    import foldsweep.data

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(foldsweep.data, "load_dataset", interrupted)
    before = signal.getsignal(signal.SIGINT)
    result = CliRunner().invoke(cli, ["validate", str(write_spec())])
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert signal.getsignal(signal.SIGINT) is before

"""Sweep files: the minimal file loads, every bad file is refused with one line naming the key path."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from foldsweep.errors import FoldsweepError, SpecError
from foldsweep.spec import FloatParam, IntParam, SweepSpec, load_spec, parse_spec

MINIMAL = "name: t\ndata:\n  dataset: sonar\n"
LR = "search:\n  lr: {type: float, low: 1.0e-4, high: 0.1, log: true}\n"
SWEEPS = sorted((Path(__file__).resolve().parents[1] / "sweeps").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refused(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> str:
    """The one-line message of the SpecError that loading `text` raises."""
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text), overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_spec_error_is_a_foldsweep_error() -> None:
    assert issubclass(SpecError, FoldsweepError)


def test_minimal_file_loads_with_defaults(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL))
    assert isinstance(spec, SweepSpec)
    assert spec.name == "t"
    assert spec.data.dataset == "sonar" and spec.data.task == "auto" and spec.data.metric == "auto"
    assert spec.split.test_size == 0.2 and spec.split.outer.k == 5 and spec.split.inner.k == 5
    assert spec.model.width == 64 and spec.train.lr == 1e-3 and spec.optuna.n_trials == 20
    assert spec.search == {}


def test_spec_is_frozen(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL))
    with pytest.raises(pydantic.ValidationError):
        spec.train.lr = 0.5  # type: ignore[misc]


def test_search_block_becomes_typed_params(tmp_path: Path) -> None:
    text = MINIMAL + LR + "  width: {type: int, low: 16, high: 256, step: 16}\n" \
        + "  activation: {type: categorical, choices: [relu, gelu]}\n"
    spec = load_spec(write(tmp_path, text))
    assert spec.search["lr"] == FloatParam(type="float", low=1e-4, high=0.1, log=True)
    assert spec.search["width"] == IntParam(type="int", low=16, high=256, step=16)
    assert spec.search["activation"].choices == ["relu", "gelu"]


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_every_bundled_sweep_file_loads(path: Path) -> None:
    assert load_spec(path).name


# --- unknown keys -----------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "serach: {}\n")
    assert "`serach`" in message and "unknown key" in message and "did you mean `search`?" in message
    assert "allowed: name, data, split" in message


def test_typo_of_a_required_key_is_reported_as_unknown(tmp_path: Path) -> None:
    message = refused(tmp_path, "nmae: t\ndata:\n  dataset: sonar\n")
    assert "`nmae`" in message and "did you mean `name`?" in message


def test_unknown_nested_key_names_its_path(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "train:\n  lrr: 0.1\n")
    assert "`train.lrr`" in message and "did you mean `lr`?" in message


def test_unknown_key_two_levels_down(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "split:\n  outer:\n    kk: 3\n")
    assert "`split.outer.kk`" in message and "did you mean `k`?" in message


def test_unknown_key_inside_a_search_param(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "search:\n  lr: {type: float, low: 0.001, high: 0.1, foo: 1}\n")
    assert "`search.lr.foo`" in message and "unknown key `foo`" in message
    message = refused(tmp_path, MINIMAL + "search:\n  lr: {type: float, low: 0.001, hihg: 0.1}\n")
    assert "`search.lr.hihg`" in message and "did you mean `high`?" in message


def test_unknown_search_param_name(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "search:\n  lrr: {type: float, low: 0.001, high: 0.1}\n")
    assert "search" in message and "unknown key `lrr`" in message and "did you mean `lr`?" in message


# --- values -----------------------------------------------------------------------------------------


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "train:\n  epochs: many\n")
    assert "`train.epochs`" in message and "valid integer" in message and "got 'many'" in message


def test_missing_required_key(tmp_path: Path) -> None:
    assert "`name` is required" in refused(tmp_path, "data:\n  dataset: sonar\n")


def test_bad_name_pattern(tmp_path: Path) -> None:
    message = refused(tmp_path, "name: 'no spaces!'\ndata:\n  dataset: sonar\n")
    assert "`name`" in message and "pattern" in message


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    assert "must be a mapping of keys, got list" in refused(tmp_path, "- a\n- b\n")
    assert "must be a mapping of keys, got NoneType" in refused(tmp_path, "")


@pytest.mark.parametrize("kind", ["float", "int"])
def test_low_above_high(tmp_path: Path, kind: str) -> None:
    message = refused(tmp_path, MINIMAL + f"search:\n  width: {{type: {kind}, low: 64, high: 8}}\n")
    assert "`search.width`" in message and "`low` must be <= `high`" in message and "low=64" in message


@pytest.mark.parametrize("low", ["0.0", "-0.1"])
def test_log_range_needs_positive_low(tmp_path: Path, low: str) -> None:
    message = refused(tmp_path, MINIMAL + f"search:\n  lr: {{type: float, low: {low}, high: 0.1, log: true}}\n")
    assert "`search.lr`" in message and "must be > 0 for a log range" in message and f"got {low}" in message


def test_log_with_step_is_refused(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "search:\n  lr: {type: float, low: 0.01, high: 0.1, log: true, step: 0.01}\n")
    assert "`search.lr`" in message and "`step` cannot be combined with `log: true`" in message


def test_empty_categorical_choices(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "search:\n  activation: {type: categorical, choices: []}\n")
    assert "`search.activation.choices`" in message and "at least 1 item" in message


def test_search_param_without_known_type(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "search:\n  lr: {type: double, low: 0.001, high: 0.1}\n")
    assert "`search.lr`" in message and "'float', 'int', 'categorical'" in message


@pytest.mark.parametrize(
    ("block", "key", "allowed"),
    [
        ("optuna:\n  sampler: cmaes\n", "optuna.sampler", "'tpe', 'random' or 'qmc'"),
        ("optuna:\n  pruner: asha\n", "optuna.pruner", "'median'"),
        ("split:\n  duplicates: ignore\n", "split.duplicates", "'group', 'warn', 'drop' or 'error'"),
        ("model:\n  activation: swish\n", "model.activation", "'relu'"),
    ],
)
def test_unknown_choice_lists_the_allowed_ones(tmp_path: Path, block: str, key: str, allowed: str) -> None:
    message = refused(tmp_path, MINIMAL + block)
    assert f"`{key}`" in message and allowed in message and "got '" in message


def test_unknown_metric(tmp_path: Path) -> None:
    message = refused(tmp_path, "name: t\ndata:\n  dataset: sonar\n  metric: auc\n")
    assert "`data.metric`" in message and "'roc_auc'" in message and "got 'auc'" in message


def test_unknown_dataset(tmp_path: Path) -> None:
    message = refused(tmp_path, "name: t\ndata:\n  dataset: mnist\n")
    assert "`data.dataset`" in message and "'sonar'" in message and "got 'mnist'" in message


def test_metric_must_fit_the_task(tmp_path: Path) -> None:
    message = refused(tmp_path, "name: t\ndata:\n  dataset: diabetes\n  task: regression\n  metric: accuracy\n")
    assert "`data`" in message and "metric `accuracy` is for classification" in message and "'rmse'" in message
    message = refused(tmp_path, "name: t\ndata:\n  dataset: sonar\n  task: classification\n  metric: rmse\n")
    assert "metric `rmse` is for regression" in message and "'accuracy'" in message


def test_data_needs_exactly_one_source(tmp_path: Path) -> None:
    assert "give exactly one of `dataset`" in refused(tmp_path, "name: t\ndata:\n  task: auto\n")
    assert "give exactly one of `dataset`" in refused(
        tmp_path, "name: t\ndata:\n  dataset: sonar\n  path: x.csv\n  target: y\n")
    assert "`target` is required with `path`" in refused(tmp_path, "name: t\ndata:\n  path: x.csv\n")


@pytest.mark.parametrize(("value", "rule"), [("0", "greater than 0"), ("1.0", "less than 1"),
                                             ("1.5", "less than 1"), ("-0.2", "greater than 0")])
def test_test_size_outside_open_unit_interval(tmp_path: Path, value: str, rule: str) -> None:
    message = refused(tmp_path, MINIMAL + f"split:\n  test_size: {value}\n")
    assert "`split.test_size`" in message and rule in message


def test_fold_k_at_least_two(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "split:\n  inner:\n    k: 1\n")
    assert "`split.inner.k`" in message and "greater than or equal to 2" in message


def test_searched_range_must_fit_the_fixed_block(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "search:\n  dropout: {type: float, low: 0.0, high: 1.0}\n")
    assert "search.dropout" in message and "1.0 is not allowed" in message and "less than 1" in message
    message = refused(tmp_path, MINIMAL + "search:\n  width: {type: int, low: 8, high: 5000}\n")
    assert "search.width" in message and "5000 is not allowed" in message
    message = refused(tmp_path, MINIMAL + "search:\n  activation: {type: categorical, choices: [relu, swish]}\n")
    assert "search.activation" in message and "'swish' is not allowed" in message


def test_bad_device_name(tmp_path: Path) -> None:
    message = refused(tmp_path, MINIMAL + "resources:\n  devices: [gpu0]\n")
    assert "`resources.devices`" in message and "device `gpu0` is not `cpu` or `cuda:N`" in message


# --- files and --set --------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"spec file `.*nope\.yaml` not found"):
        load_spec(tmp_path / "nope.yaml")


def test_yaml_syntax_error_reports_line(tmp_path: Path) -> None:
    message = refused(tmp_path, "name: t\ndata:\n  dataset: sonar\n  metric: [accuracy\ntrain:\n  lr: 1\n")
    assert "sweep.yaml" in message and "line 5" in message and "YAML syntax error" in message


def test_overrides_are_applied(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + LR)
    spec = load_spec(path, ["optuna.n_trials=3", "search.lr.high=0.5", "model.batch_norm=true",
                            "train.optimizer=sgd", "split.outer.k=3"])
    assert spec.optuna.n_trials == 3
    assert spec.search["lr"].high == 0.5 and spec.search["lr"].low == 1e-4
    assert spec.model.batch_norm is True and spec.train.optimizer == "sgd" and spec.split.outer.k == 3
    assert load_spec(path).optuna.n_trials == 20  # the file itself is untouched


def test_override_can_add_a_block(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL), ["search.lr.type=float", "search.lr.low=0.001",
                                                "search.lr.high=0.5"])
    assert spec.search["lr"] == FloatParam(type="float", low=0.001, high=0.5)


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("optuna.n_trials=0", ["`optuna.n_trials`", "greater than or equal to 1"]),
        ("search.lr.high=1e-6", ["`search.lr`", "`low` must be <= `high`"]),
        ("train.lrr=0.1", ["`train.lrr`", "did you mean `lr`?"]),
        ("search.lr.low=0", ["`search.lr`", "must be > 0 for a log range"]),
    ],
)
def test_overrides_are_validated(tmp_path: Path, override: str, words: list[str]) -> None:
    message = refused(tmp_path, MINIMAL + LR, (override,))
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("optuna.n_trials", ["--set `optuna.n_trials` must look like key.path=value"]),
        ("=3", ["must look like key.path=value"]),
        ("data.dataset.x=1", ["--set `data.dataset.x`", "`dataset` holds a value"]),
        ("train.lr=[", ["--set `train.lr=[`", "not valid YAML"]),
    ],
)
def test_malformed_override(tmp_path: Path, override: str, words: list[str]) -> None:
    message = refused(tmp_path, MINIMAL, (override,))
    for word in words:
        assert word in message


def test_override_on_an_empty_file(tmp_path: Path) -> None:
    assert "must be a mapping of keys" in refused(tmp_path, "", ("name=t",))


# --- hashing and trial configs ----------------------------------------------------------------------


def test_spec_hash_is_stable(tmp_path: Path) -> None:
    first = load_spec(write(tmp_path, MINIMAL + LR, "a.yaml")).spec_hash()
    reordered = LR + "data:\n  dataset: sonar\nname: t\n"
    assert load_spec(write(tmp_path, reordered, "b.yaml")).spec_hash() == first
    assert load_spec(write(tmp_path, MINIMAL + LR + "train:\n  lr: 0.001\n", "c.yaml")).spec_hash() == first
    assert len(first) == 16 and all(c in "0123456789abcdef" for c in first)


def test_spec_hash_changes_with_any_value(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + LR)
    base = load_spec(path).spec_hash()
    assert load_spec(path, ["optuna.n_trials=21"]).spec_hash() != base
    assert load_spec(path, ["search.lr.high=0.11"]).spec_hash() != base
    assert load_spec(path, ["split.seed=1"]).spec_hash() != base


def test_with_params_writes_model_and_train(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL + LR))
    trial = spec.with_params({"lr": 0.05, "width": 128, "dropout": 0.3, "batch_size": 32})
    assert trial.train.lr == 0.05 and trial.train.batch_size == 32
    assert trial.model.width == 128 and trial.model.dropout == 0.3
    assert trial.model.depth == spec.model.depth and trial.train.epochs == spec.train.epochs
    assert spec.train.lr == 1e-3 and spec.model.width == 64  # the original is unchanged
    assert trial.spec_hash() != spec.spec_hash()


def test_with_params_validates(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, MINIMAL))
    with pytest.raises(pydantic.ValidationError):
        spec.with_params({"dropout": 1.0})


def test_parse_spec_names_its_source() -> None:
    with pytest.raises(SpecError, match=r"^my\.yaml: `train\.lrr`"):
        parse_spec({"name": "t", "data": {"dataset": "sonar"}, "train": {"lrr": 1}}, source="my.yaml")

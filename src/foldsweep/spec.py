"""Sweep files as typed, frozen objects.

Everything downstream trusts these objects, so every rule lives here and every message names the key
path (``search.lr.low``), the rule and the value that broke it.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from foldsweep.errors import SpecError

__all__ = ["CLASSIFICATION_METRICS", "MAX_YAML_BYTES", "MAX_YAML_DEPTH", "MAX_YAML_NODES", "MEMORY_UNITS",
           "REGRESSION_METRICS", "SEARCHABLE", "Activation", "CategoricalParam", "CudaGraphs", "DataSpec", "Dataset",
           "FloatParam", "FoldSpec", "Init", "IntParam", "Metric", "ModelSpec", "OptunaSpec", "Pruner",
           "ResourcesSpec", "Sampler", "Schedule", "SearchParam", "SplitKind", "SplitSpec", "SweepSpec", "Task",
           "TrackingSpec", "TrainSpec", "YamlLimitError", "build_spec", "load_spec", "parse_bytes", "parse_spec",
           "read_yaml"]

Task = Literal["auto", "classification", "regression"]
Metric = Literal["auto", "accuracy", "roc_auc", "log_loss", "f1_macro", "rmse", "mae", "r2"]
Dataset = Literal["sonar", "breast_cancer", "digits", "wine", "iris", "diabetes"]
Activation = Literal["relu", "gelu", "tanh", "leaky_relu"]
Init = Literal["default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"]
Schedule = Literal["none", "step", "cosine", "plateau", "one_cycle"]
SplitKind = Literal["auto", "kfold", "stratified", "group", "stratified_group", "time_series"]
Pruner = Literal["none", "median", "percentile", "successive_halving", "hyperband", "wilcoxon"]
Sampler = Literal["tpe", "random", "qmc"]
CudaGraphs = Literal["auto", "on", "off"]  # capture each training epoch as a CUDA graph (`graphs`)

CLASSIFICATION_METRICS = ("accuracy", "roc_auc", "log_loss", "f1_macro")
REGRESSION_METRICS = ("rmse", "mae", "r2")


MEMORY_UNITS = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def parse_bytes(value: object) -> int:
    """'4GB', '512MB', '1.5 GB' or a plain number of bytes -> bytes; ValueError says what is allowed."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(KB|MB|GB|TB|B)?\s*", str(value).upper())
    if isinstance(value, bool) or match is None or float(match.group(1)) <= 0:
        raise ValueError("is not a memory size: write e.g. 512MB, 4GB or 1.5GB")
    return int(float(match.group(1)) * MEMORY_UNITS[match.group(2) or ""])


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Frozen):
    dataset: Dataset | None = None
    path: str | None = None
    frame: str | None = None  # a label for an in-memory table handed to `foldsweep.run(spec, data=...)`
    target: str | None = None
    task: Task = "auto"
    metric: Metric = "auto"
    missing: Literal["error", "drop", "impute"] = "error"
    categorical: Literal["error", "onehot"] = "error"
    group: str | None = None
    time: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if sum(source is not None for source in (self.dataset, self.path, self.frame)) != 1:
            raise ValueError("give exactly one of `dataset` (a bundled set) or `path` (a CSV/Parquet file) "
                             "(or `frame`: an in-memory table passed to foldsweep.run)")
        if self.target is None and (self.path is not None or self.frame is not None):
            raise ValueError(f"`target` is required with `{'path' if self.path is not None else 'frame'}`: "
                             "name the label column")
        if self.task == "classification" and self.metric in REGRESSION_METRICS:
            raise ValueError(f"metric `{self.metric}` is for regression; use one of {CLASSIFICATION_METRICS}")
        if self.task == "regression" and self.metric in CLASSIFICATION_METRICS:
            raise ValueError(f"metric `{self.metric}` is for classification; use one of {REGRESSION_METRICS}")
        return self


class FoldSpec(_Frozen):
    kind: SplitKind = "auto"
    k: int = Field(5, ge=2)
    shuffle: bool = True
    repeats: int = Field(1, ge=1)


class SplitSpec(_Frozen):
    test_size: float = Field(0.2, gt=0, lt=1)
    seed: int = 0
    duplicates: Literal["group", "warn", "drop", "error"] = "group"
    outer: FoldSpec = FoldSpec()
    inner: FoldSpec = FoldSpec()


class ModelSpec(_Frozen):
    width: int = Field(64, ge=1, le=4096)
    depth: int = Field(2, ge=1, le=8)
    dropout: float = Field(0.0, ge=0, lt=1)
    activation: Activation = "relu"
    batch_norm: bool = False
    init: Init = "default"


class TrainSpec(_Frozen):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    l1: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    lr_schedule: Schedule = "none"
    step_size: int = Field(30, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    patience: int = Field(10, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float = Field(0.0, ge=0)
    noise: float = Field(0.0, ge=0)
    mixup: float = Field(0.0, ge=0)
    preprocess: Literal["standard", "minmax", "none"] = "standard"
    select_k: int | None = Field(None, ge=1)


class FloatParam(_Frozen):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step is not None:
            raise ValueError("`step` cannot be combined with `log: true`")
        return self


class IntParam(_Frozen):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        _check_range(self.low, self.high, self.log)
        if self.log and self.step != 1:
            raise ValueError("`step` cannot be combined with `log: true`")
        return self


class CategoricalParam(_Frozen):
    type: Literal["categorical"]
    choices: list[Any] = Field(min_length=1)


def _check_range(low: float, high: float, log: bool) -> None:
    if low > high:
        raise ValueError(f"`low` must be <= `high`, got low={low} > high={high}")
    if log and low <= 0:
        raise ValueError(f"`low` must be > 0 for a log range, got {low}")


SearchParam = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]
SEARCHABLE = tuple(ModelSpec.model_fields) + tuple(TrainSpec.model_fields)


class OptunaSpec(_Frozen):
    n_trials: int = Field(20, ge=1, le=1_000_000)  # 1e9 is a typo: its journal alone would fill the disk
    sampler: Sampler = "tpe"
    pruner: Pruner = "none"
    seed: int = 0
    n_startup_trials: int = Field(5, ge=0)
    percentile: float = Field(25.0, gt=0, lt=100)
    report_every: int = Field(5, ge=1)
    trials_per_batch: int = Field(4, ge=1)
    warm_start_final: bool = True


class ResourcesSpec(_Frozen):
    devices: Literal["auto", "cpu"] | list[str] = "auto"
    workers: int | None = Field(None, ge=1)
    workers_per_device: int = Field(1, ge=1)
    models_per_batch: int | None = Field(None, ge=1)
    memory: int | None = None  # bytes one training batch may use at most; "4GB", "512MB" accepted
    cuda_graphs: CudaGraphs = "auto"  # auto: captured on CUDA, eager on a CPU or where capture fails

    @field_validator("memory", mode="before")
    @classmethod
    def _memory_size(cls, value: Any) -> Any:
        return value if value is None else parse_bytes(value)

    @field_validator("devices")
    @classmethod
    def _device_names(cls, value: Any) -> Any:
        if isinstance(value, list):
            for name in value:
                if not (name == "cpu" or (name.startswith("cuda:") and name[5:].isdigit())):
                    raise ValueError(f"device `{name}` is not `cpu` or `cuda:N`")
        return value


class TrackingSpec(_Frozen):
    uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str | None = None
    artifact_location: str = "mlruns/artifacts"
    enabled: bool = True
    system_metrics: bool = True


class SweepSpec(_Frozen):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    data: DataSpec
    split: SplitSpec = SplitSpec()
    model: ModelSpec = ModelSpec()
    search: dict[str, SearchParam] = Field(default_factory=dict)
    train: TrainSpec = TrainSpec()
    optuna: OptunaSpec = OptunaSpec()
    resources: ResourcesSpec = ResourcesSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: str | None = None
    provenance: dict[str, Any] | None = None  # written by `export`; ignored by the sweep itself

    @field_validator("search")
    @classmethod
    def _searchable(cls, search: dict[str, Any]) -> dict[str, Any]:
        for name in search:
            if name not in SEARCHABLE:
                raise ValueError(_unknown_key_message(name, SEARCHABLE))
        return search

    @model_validator(mode="after")
    def _search_within_bounds(self) -> SweepSpec:
        """A searched range must only produce values the fixed block would accept."""
        for name, param in self.search.items():
            values = param.choices if isinstance(param, CategoricalParam) else [param.low, param.high]
            for value in values:
                try:
                    self.with_params({name: value})
                except ValidationError as err:
                    raise ValueError(f"search.{name}: {value!r} is not allowed: {_first_message(err)}") from None
        return self

    def with_params(self, params: dict[str, Any]) -> SweepSpec:
        """The spec with `params` (a trial's choices) written into `model:` and `train:`."""
        model = {k: v for k, v in params.items() if k in ModelSpec.model_fields}
        train = {k: v for k, v in params.items() if k in TrainSpec.model_fields}
        return self.model_copy(
            update={
                "model": ModelSpec.model_validate({**self.model.model_dump(), **model}),
                "train": TrainSpec.model_validate({**self.train.model_dump(), **train}),
            }
        )

    def spec_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def load_spec(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> SweepSpec:
    """Read a sweep file, apply `key.path=value` overrides, validate once."""
    path = Path(path)
    return build_spec(read_yaml(path), overrides, source=str(path), folder=path.parent)


def build_spec(raw: Any, overrides: tuple[str, ...] | list[str] = (), *, source: str = "<spec>",
               folder: Path | None = None) -> SweepSpec:
    """A spec from plain values (a parsed file, or a dict written in Python), with `key.path=value` overrides.

    `raw` is not modified; a relative `data.path` is anchored to the working folder, else to `folder`.
    """
    if overrides and not isinstance(raw, dict):
        return parse_spec(raw, source=source)  # refuses it: --set needs a mapping to write into
    raw = copy.deepcopy(raw)
    for override in overrides:
        _apply_override(raw, override)
    spec = parse_spec(raw, source=source)
    return _anchor_data_path(spec, folder or Path.cwd())


def parse_spec(raw: Any, source: str = "<spec>") -> SweepSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a sweep file must be a mapping of keys, got {type(raw).__name__}")
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(f"{source}: {_first_message(err, raw)}") from None


def _anchor_data_path(spec: SweepSpec, folder: Path) -> SweepSpec:
    """A relative `data.path` means the working folder, else the spec's folder; it stays relative to the first.

    The record (and so the spec hash) then holds the path as the user's project names it: a project
    folder copied or moved elsewhere resumes, tests and fits in place, and reads its own copy of the
    data, not the original's. A path given absolute stays absolute.
    """
    if spec.data.path is None or Path(spec.data.path).expanduser().is_absolute():
        return spec
    candidate = Path(spec.data.path).expanduser()
    if not candidate.exists() and (folder / candidate).exists():
        candidate = Path(os.path.relpath((folder / candidate).resolve(), Path.cwd().resolve()))
    data = spec.data.model_copy(update={"path": os.path.normpath(candidate)})
    return spec.model_copy(update={"data": data})


MAX_YAML_BYTES = 1 << 20  # a sweep file, an exported config or a model's config.yaml is a few KiB
MAX_YAML_NODES = 100_000  # values after every alias is expanded: what pydantic and json will walk
MAX_YAML_DEPTH = 64


class YamlLimitError(yaml.error.MarkedYAMLError):
    """A document past foldsweep's limits: an alias bomb, absurd nesting, or a recursive alias."""


class _Loader(yaml.SafeLoader):
    """The safe loader (no tags that build Python objects), with limits, reading `1e-3` as a number.

    PyYAML follows YAML 1.1, where a float needs a dot: `choices: [1e-3, 1e-2]` would be two strings.
    An alias is one node in PyYAML's graph but a whole subtree to everything that walks the loaded value
    (pydantic, the spec hash), so a few hundred bytes of nested aliases expand to billions of values.
    Each composed node's expanded size is worked out from its children as it is built (linear in the
    document), and the document is refused once it passes MAX_YAML_NODES or MAX_YAML_DEPTH.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._expanded: dict[int, int] = {}
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise YamlLimitError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if alias and id(node) not in self._expanded:
            raise YamlLimitError(None, None, "an alias refers to the collection that holds it (recursive)", mark)
        if not alias:
            self._expanded[id(node)] = 1 + sum(self._expanded[id(child)] for child in _children(node))
        if self._expanded[id(node)] > MAX_YAML_NODES:
            raise YamlLimitError(None, None, f"expands to more than {MAX_YAML_NODES:,} values once its aliases "
                                 "are followed (an alias bomb?)", mark)
        return node


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: still no Python objects


def read_yaml(path: Path, *, what: str = "spec file") -> Any:
    """Every YAML file foldsweep reads (sweep files, exported configs, a sweep's record, a model's config.yaml).

    Bounded in bytes, nodes after alias expansion and depth; anything wrong becomes one SpecError naming
    the file, never a traceback.
    """
    if not path.is_file():
        raise SpecError(f"{what} `{path}` not found")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise SpecError(f"{path}: {size:,} bytes; a {what} may be at most {MAX_YAML_BYTES:,} bytes")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not UTF-8 text (byte {err.start}); a {what} is YAML text") from None
    try:
        return _yaml(text)
    except yaml.YAMLError as err:
        raise SpecError(f"{path}:{_yaml_problem(err, what)}") from None


def _yaml_problem(err: yaml.YAMLError, what: str) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if isinstance(err, yaml.constructor.ConstructorError):  # e.g. !!python/object: never built, never run
        return f"{where} refused: {problem}; a {what} holds plain values only"
    if isinstance(err, YamlLimitError):
        return f"{where} refused: {problem}"
    return f"{where} YAML syntax error: {problem}"


def _apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise SpecError(f"--set `{override}` must look like key.path=value")
    try:
        value = _yaml(text)
    except yaml.YAMLError as err:
        raise SpecError(f"--set `{override}`: the value is not valid YAML:{_yaml_problem(err, 'value')}") from None
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set `{key}`: `{part}` holds a value, not a block of keys")
        node = child
    node[parts[-1]] = value


def _unknown_key_message(name: str, allowed: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return f"unknown key `{name}`{hint}; allowed: {', '.join(allowed)}"


_TAGS = {"float", "int", "categorical", "list[str]", "literal['auto','cpu']"}


def _first_message(err: ValidationError, raw: Any = None) -> str:
    """One line for the first problem: `key.path` rule, got value."""
    errors = err.errors()
    # an unknown key first: a typo (`hihg`) also makes the key it meant (`high`) look missing
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [str(part) for part in first["loc"] if str(part).replace(" ", "").lower() not in _TAGS]
    path = ".".join(loc)
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        return f"`{path}`: " + _unknown_key_message(loc[-1], allowed)
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("missing",):
        return f"`{path}` is required"
    got = first.get("input")
    shown = "" if isinstance(got, dict) or "got" in message else f", got {got!r}"
    return f"`{path}` {message}{shown}" if path else f"{message}"


def _allowed_keys(loc: list[str]) -> list[str]:
    model: Any = SweepSpec
    for part in loc:
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return list(FloatParam.model_fields) + ["choices"]
        model = field.annotation
    return list(model.model_fields) if hasattr(model, "model_fields") else []

"""Property: any configuration a sweep can pick survives export (YAML or JSON) and loads back unchanged.

An exported best config is only trustworthy if `foldsweep fit` trains exactly what the search scored;
floats such as 1e-05 are where YAML 1.1 loaders quietly turn numbers into strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import tiny_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foldsweep.export import render
from foldsweep.spec import load_spec, parse_spec

BASE = parse_spec(tiny_spec())

unit = st.floats(min_value=0.0, max_value=0.99, allow_nan=False)
positive = st.floats(min_value=1e-300, max_value=1e3, allow_nan=False, allow_subnormal=False)
params = st.fixed_dictionaries({
    "lr": positive,
    "weight_decay": st.floats(min_value=0.0, max_value=1e3),
    "l1": st.floats(min_value=0.0, max_value=1.0),
    "dropout": unit,
    "label_smoothing": unit,
    "batch_size": st.integers(1, 4096),
    "width": st.integers(1, 4096),
    "depth": st.integers(1, 8),
    "activation": st.sampled_from(["relu", "gelu", "tanh", "leaky_relu"]),
    "init": st.sampled_from(["default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"]),
    "batch_norm": st.booleans(),
    "optimizer": st.sampled_from(["adamw", "sgd"]),
    "lr_schedule": st.sampled_from(["none", "step", "cosine", "plateau", "one_cycle"]),
    "noise": st.floats(min_value=0.0, max_value=10.0),
    "mixup": st.floats(min_value=0.0, max_value=10.0),
    "select_k": st.none() | st.integers(1, 60),
    "preprocess": st.sampled_from(["standard", "minmax", "none"]),
})


def exported(chosen: dict[str, Any]) -> dict[str, Any]:
    """What `export_best` writes for a trial with these params (its provenance is plain data too)."""
    config = BASE.with_params(chosen).model_copy(update={"search": {}})
    doc = config.model_dump(mode="json", exclude={"provenance"})
    doc["provenance"] = {"sweep": "tiny", "best_params": chosen, "inner_cv_value": chosen["lr"] / 3}
    return doc


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=params, fmt=st.sampled_from(["yaml", "json"]))
def test_an_exported_config_loads_back_unchanged(tmp_path: Path, chosen: dict[str, Any], fmt: str) -> None:
    doc = exported(chosen)
    path = tmp_path / f"best.{fmt}"
    path.write_text(render(doc, fmt))
    loaded = load_spec(path)
    assert loaded.model_dump(mode="json") == doc
    assert loaded.provenance == doc["provenance"]
    assert loaded == parse_spec(doc)

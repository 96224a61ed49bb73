"""Nothing in a sweep file, an override or a model folder can run code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from foldsweep.errors import SpecError
from foldsweep.spec import load_spec

SRC = Path(__file__).resolve().parents[1] / "src" / "foldsweep"
MINIMAL = "name: t\ndata:\n  dataset: sonar\n"


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system", "!!python/module:os"])
def test_a_yaml_tag_that_builds_python_objects_is_refused_and_never_runs(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "owned"
    spec = tmp_path / "sweep.yaml"
    spec.write_text(MINIMAL + f'train: {tag} ["touch {marker}"]\n')
    with pytest.raises(SpecError, match=r"line 4, column 8: refused: .*python/.*plain values only"):
        load_spec(spec)
    assert not marker.exists()


def test_an_override_cannot_smuggle_a_tag_in(tmp_path: Path) -> None:
    marker = tmp_path / "owned"
    spec = tmp_path / "sweep.yaml"
    spec.write_text(MINIMAL)
    with pytest.raises(SpecError, match=r"--set .*not valid YAML"):
        load_spec(spec, [f'train=!!python/object/apply:os.system ["touch {marker}"]'])
    assert not marker.exists()


def test_exponent_floats_are_numbers_not_strings(tmp_path: Path) -> None:
    """YAML 1.1 reads `1e-3` as a string; in a categorical list it would stay one and reach the trainer."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text(MINIMAL + "search:\n  lr: {type: categorical, choices: [1e-3, 3E-4, 1.5e+2, '1e-2']}\n")
    loaded = load_spec(spec, ["train.weight_decay=1e-4"])
    assert loaded.search["lr"].choices == [0.001, 0.0003, 150.0, "1e-2"]  # quoted stays text, as written
    assert loaded.train.weight_decay == 0.0001


def test_the_source_loads_yaml_and_torch_files_safely() -> None:
    """A guard against a later edit: every loader call in the package is the safe one (calls fit one line)."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"yaml\.(?:load|unsafe_load|full_load)\(.*", text):
            assert "Loader=_Loader" in call, (path.name, call)
        for call in re.findall(r"torch\.load\(.*", text):
            assert "weights_only=True" in call, (path.name, call)
        assert not re.search(r"\b(?:eval|exec)\(|\bpickle\.loads?\(", text.replace(".eval()", "")), path.name

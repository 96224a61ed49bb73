"""Nothing in a sweep file, an override or a model folder can run code."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
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


BOMB = "".join(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 10))


def _bomb(where: str) -> str:
    """The billion laughs: nine levels of nine aliases, 9^9 values once expanded, under 700 bytes."""
    return MINIMAL + f"{where}:\n  l0: &l0 [lol]\n" + "".join("  " + line for line in BOMB.splitlines(True))


@pytest.mark.parametrize("where", ["provenance", "train"])
def test_an_alias_bomb_is_refused_at_once(tmp_path: Path, where: str) -> None:
    """Under the free-form `provenance:` key it used to pass validation and grow past 2.6 GB."""
    spec = tmp_path / "sweep.yaml"
    spec.write_text(_bomb(where))
    started = time.perf_counter()
    with pytest.raises(SpecError, match=r"sweep.yaml: line \d+, column \d+: refused: expands to more than "
                                        r"100,000 values once its aliases are followed \(an alias bomb\?\)$"):
        load_spec(spec)
    assert time.perf_counter() - started < 1.0


def test_an_alias_bomb_in_an_override_is_refused(tmp_path: Path) -> None:
    spec = tmp_path / "sweep.yaml"
    spec.write_text(MINIMAL)
    bomb = "{a: &a [x, x, x, x, x, x, x, x, x, x], " + ", ".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 10) + "]" for i in range(6)) + "}"
    with pytest.raises(SpecError, match=r"--set `provenance=.*not valid YAML: line 1, .*refused: expands to more"):
        load_spec(spec, [f"provenance={bomb}"])


def test_anchors_of_ordinary_size_still_work(tmp_path: Path) -> None:
    spec = tmp_path / "sweep.yaml"
    spec.write_text(MINIMAL + "model: &m {width: 32}\nprovenance: {copy: *m, more: [*m, *m]}\n")
    assert load_spec(spec).provenance == {"copy": {"width": 32}, "more": [{"width": 32}, {"width": 32}]}


def test_a_recursive_alias_and_deep_nesting_are_refused(tmp_path: Path) -> None:
    spec = tmp_path / "sweep.yaml"
    spec.write_text(MINIMAL + "provenance: &p {me: *p}\n")
    with pytest.raises(SpecError, match=r"refused: an alias refers to the collection that holds it \(recursive\)"):
        load_spec(spec)
    spec.write_text(MINIMAL + "provenance: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(SpecError, match=r"refused: nested deeper than 64 levels"):
        load_spec(spec)


def test_a_huge_or_binary_spec_file_is_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "sweep.yaml"
    spec.write_text(MINIMAL + "provenance:\n" + "".join(f"  k{i}: {'x' * 60}\n" for i in range(20_000)))
    with pytest.raises(SpecError, match=r"sweep.yaml: 1,\d{3},\d{3} bytes; a spec file may be at most 1,048,576"):
        load_spec(spec)
    spec.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)))
    with pytest.raises(SpecError, match=r"sweep.yaml: not UTF-8 text \(byte \d+\); a spec file is YAML text$"):
        load_spec(spec)
    spec.write_text("name: t\x00\n")
    with pytest.raises(SpecError, match=r"sweep.yaml: YAML syntax error: unacceptable character #x0000"):
        load_spec(spec)


def test_every_yaml_foldsweep_reads_goes_through_the_bounded_loader() -> None:
    """The record's spec.yaml and a model folder's config.yaml once went through plain yaml.safe_load."""
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"yaml\.(?:safe_load|load_all|safe_load_all|compose|parse)\(", text), path.name

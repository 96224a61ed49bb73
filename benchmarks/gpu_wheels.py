"""Prove, here, that the wheels in `.whl/` are all foldsweep needs on the GPU machine beside its own packages.

The GPU machine (device kind nvidia-h200) reaches no package registry: what it lacks must travel as
wheels with the working tree, and a missing one is found only after a machine was started and paid
for. So two checks run here first, on the CPU:

1. `closure`: every requirement a carried wheel declares (for CPython 3.12 on x86-64 Linux, extras
   left out) is carried, on the GPU image, or named in NOT_CARRIED with the reason; a carried version
   must satisfy every specifier on it; no name is carried twice (two versions stop the whole install).
2. `sweep`: a tiny tracked sweep runs with every import of a package that is neither on the GPU image
   nor carried refused (a finder on `sys.meta_path`, installed through `sitecustomize` so the MLflow
   writer process gets it too). It must finish and leave every run, trial runs included, in MLflow.
   Refused names are listed: those are optional imports that fell back (or the cause of a failure).

    python benchmarks/gpu_wheels.py .whl        # gpu_wheels.sh runs this after downloading
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.metadata
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# Python packages on the device machine's image ('cuda'), as KINDS.md lists them (read there 2026-11-17).
GPU_IMAGE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson
ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyre-extensions pyparsing pyproject-hooks pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())

# Requirements that carried wheels declare but a foldsweep sweep never imports (`sweep` proves it: it
# runs with them refused). Carrying them would cost megabytes of the 64 MiB the working tree may use.
NOT_CARRIED = {
    "google-auth": "databricks-sdk's Google Cloud sign-in (foldsweep needs only the `databricks` namespace it adds)",
    "uvicorn": "MLflow's tracking server",
    "gitpython": "MLflow's git tags; foldsweep records the commit itself (`git` on the PATH)",
}
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "platform_python_implementation": "CPython", "implementation_name": "cpython", "extra": ""}
ALLOWED_ENV, LOG_ENV = "GPU_WHEELS_ALLOWED", "GPU_WHEELS_REFUSED_LOG"


def normalise(name: str) -> str:
    """PEP 503 names, so `PyYAML`, `pyyaml` and `py_yaml` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def carried(wheel_dir: Path) -> dict[str, tuple[str, Path]]:
    """Normalised name -> (version, wheel), read from the wheel file names."""
    found: dict[str, tuple[str, Path]] = {}
    for wheel in sorted(wheel_dir.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if normalise(name) in found:
            raise SystemExit(f"{name} is carried twice ({found[normalise(name)][1].name}, {wheel.name}): keep one")
        found[normalise(name)] = (version, wheel)
    return found


def requirements(wheel: Path) -> list[str]:
    """The wheel's `Requires-Dist` lines, as written in its METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def closure(wheels: dict[str, tuple[str, Path]]) -> list[str]:
    """Every unmet requirement of the carried wheels on the GPU machine, as one line each."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    problems = []
    for name, (_, wheel) in wheels.items():
        for line in requirements(wheel):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(TARGET):
                continue
            need = normalise(req.name)
            if need in wheels:
                have = wheels[need][0]
                if not req.specifier.contains(Version(have), prereleases=True):
                    problems.append(f"{name} needs {line}, carried {have}")
            elif need not in GPU_IMAGE and need not in NOT_CARRIED:
                problems.append(f"{name} needs {line}: neither carried nor on the GPU image")
    return problems


class _Refuse(importlib.abc.MetaPathFinder):
    """Refuses top-level imports of packages whose distributions are all outside `allowed`."""

    def __init__(self, allowed: set[str], log: Path) -> None:
        owners = importlib.metadata.packages_distributions()
        self.refused = {module for module, dists in owners.items()
                        if not any(normalise(d) in allowed for d in dists)}
        self.log = log

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if path is None and name in self.refused:
            with self.log.open("a") as out:
                out.write(f"{name}\n")
            raise ModuleNotFoundError(f"No module named {name!r} (not on the GPU machine)", name=name)


def refuse_imports() -> None:
    """Install the finder in this process when the environment asks for it (from `sitecustomize`)."""
    if ALLOWED_ENV in os.environ:
        allowed = set(os.environ[ALLOWED_ENV].split(","))
        sys.meta_path.insert(0, _Refuse(allowed, Path(os.environ[LOG_ENV])))


def tiny_spec() -> dict[str, object]:
    """A sweep with every stage a real one has (3 studies, trial runs, refits, report), in seconds."""
    return {"name": "wheels", "data": {"dataset": "sonar"},
            "split": {"test_size": 0.25, "seed": 0, "outer": {"k": 2}, "inner": {"k": 2}},
            "model": {"width": 16, "depth": 1}, "train": {"epochs": 4, "patience": 2, "batch_size": 32},
            "search": {"lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True}},
            "optuna": {"n_trials": 2, "trials_per_batch": 2, "n_startup_trials": 1, "report_every": 2},
            "resources": {"devices": "cpu", "workers": 1}}


def sweep(wheels: dict[str, tuple[str, Path]]) -> list[str]:
    """Run the tiny tracked sweep with imports limited to the GPU machine's; problems found, one per line."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp:
        folder = Path(tmp)
        (folder / "site").mkdir()
        (folder / "site" / "sitecustomize.py").write_text("import gpu_wheels\n\ngpu_wheels.refuse_imports()\n")
        (folder / "wheels.yaml").write_text(json.dumps(tiny_spec()))  # JSON is YAML
        allowed = GPU_IMAGE | set(wheels) | {"foldsweep"}
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder / "site"), str(root / "benchmarks"),
                                                            str(root / "src")]),
                   **{ALLOWED_ENV: ",".join(sorted(allowed)), LOG_ENV: str(folder / "refused.txt")})
        done = subprocess.run([sys.executable, "-m", "foldsweep", "run", "wheels.yaml", "--json"], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=600)
        log = folder / "refused.txt"
        refused = sorted(set(log.read_text().split())) if log.exists() else []
        print(f"imports refused (optional, fell back): {' '.join(refused) or 'none'}")
        if done.returncode != 0:
            return [f"the sweep failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}"]
        return _tracked_problems(folder / "mlruns" / "mlflow.db", json.loads(done.stdout.splitlines()[-1]))


def _tracked_problems(db: Path, summary: dict[str, object]) -> list[str]:
    """The sweep run, 3 study runs and 2 trial runs per study must all be in MLflow, finished."""
    if not isinstance(summary.get("mlflow"), dict):
        return ["the sweep's summary names no MLflow run: tracking did not start"]
    with sqlite3.connect(db) as con:
        states = dict(con.execute("select status, count(*) from runs group by status").fetchall())
    expected = 1 + 3 + 3 * 2
    print(f"MLflow runs by state: {states} (expected {expected} FINISHED)")
    return [] if states == {"FINISHED": expected} else [f"MLflow holds {states}, expected {expected} FINISHED runs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheels", type=Path, help="the folder gpu_wheels.sh downloaded into")
    args = parser.parse_args()
    wheels = carried(args.wheels)
    problems = closure(wheels)
    print(f"closure: {len(wheels)} wheels, {len(problems)} unmet requirements")
    problems += sweep(wheels)
    for line in problems:
        print(f"  PROBLEM {line}")
    print("wheels: ready" if not problems else "wheels: NOT ready")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()

"""Workers: devices and slots, several processes sharing one sweep, and the same over a real PostgreSQL."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from optuna.trial import TrialState
from sweep_procs import finish, finished, lock_errors, start, states, trials, wait_for, worker_names

from foldsweep.errors import DeviceError
from foldsweep.spec import load_spec
from foldsweep.workers import resolve_devices, worker_slots

# Long enough that a worker starting a few seconds after the coordinator still finds trials to take.
BUSY = {"resources": {"devices": "cpu", "workers": 2, "models_per_batch": 2},  # one trial (2 folds) a batch
        "train": {"epochs": 150, "patience": 150, "batch_size": 32},
        "optuna": {"n_trials": 8, "trials_per_batch": 1, "n_startup_trials": 2, "report_every": 5}}


def test_cpu_workers_default_to_one_and_named_cuda_devices_must_exist(write_spec) -> None:
    spec = load_spec(write_spec(resources={"devices": "cpu", "workers": None}))
    assert worker_slots(spec, resolve_devices(spec)) == ["cpu"]  # reproducible, and no slower on 2 cores
    missing = load_spec(write_spec(resources={"devices": ["cuda:7"]}))
    with pytest.raises(DeviceError, match=r"resources.devices: `cuda:7` does not exist"):
        resolve_devices(missing)


def test_gpu_slots_repeat_each_device_per_worker_and_respect_the_cap(write_spec) -> None:
    spec = load_spec(write_spec(resources={"devices": "auto", "workers_per_device": 2, "workers": 3}))
    assert worker_slots(spec, ["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:0", "cuda:1"]


def test_a_worker_without_a_running_sweep_says_how_to_start_one(write_spec, workdir: Path) -> None:
    spec = write_spec()
    code, _, err = finish(start("worker", str(spec), "--storage", "mlruns/optuna/tiny.journal", "--wait", "1",
                                cwd=workdir), timeout=120)
    assert code == 2
    assert "no sweep `tiny` in storage `mlruns/optuna/tiny.journal` after waiting 1s" in err
    assert "foldsweep run SPEC --storage URL" in err


@pytest.mark.slow  # ~30 s on 2 cores: two processes must both start up and share the work
def test_two_cpu_workers_finish_each_study_at_exactly_n_trials_without_lock_errors(write_spec, workdir: Path) -> None:
    spec = write_spec(**BUSY)
    code, out, err = finish(start("run", str(spec), "--json", cwd=workdir))
    logs = "".join(p.read_text() for p in (workdir / "mlruns" / "sweeps" / "tiny" / "logs").glob("*.log"))
    assert code == 0, err + logs
    assert json.loads(out.strip().splitlines()[-1])["workers"] == 2

    journal = str(workdir / "mlruns" / "optuna" / "tiny.journal")
    assert {key: finished(c) for key, c in states(journal, "tiny").items()} == {"outer-0": 8, "outer-1": 8, "final": 8}
    assert set(worker_names(journal, "tiny")) == {"worker-0", "worker-1"}  # both processes ran trials
    assert lock_errors(err, logs) == []
    assert "Traceback" not in err + logs


@pytest.mark.slow  # ~35 s: a two-worker sweep in which one worker is killed
def test_a_worker_killed_mid_sweep_has_its_trials_failed_and_retried_while_the_sweep_goes_on(write_spec,
                                                                                            workdir: Path) -> None:
    spec = write_spec(**BUSY)
    journal = str(workdir / "mlruns" / "optuna" / "tiny.journal")
    coordinator = start("run", str(spec), "--json", cwd=workdir)

    def held_by_worker_1() -> list[int]:
        if not Path(journal).exists():
            return []
        return [t.user_attrs["worker"]["pid"] for ts in trials(journal, "tiny").values() for t in ts
                if t.state == TrialState.RUNNING and t.user_attrs.get("worker", {}).get("name") == "worker-1"]

    wait_for(lambda: bool(held_by_worker_1()), coordinator)
    os.kill(held_by_worker_1()[0], signal.SIGKILL)
    code, out, err = finish(coordinator)
    assert code == 0, err
    assert {key: finished(c) for key, c in states(journal, "tiny").items()} == {"outer-0": 8, "outer-1": 8, "final": 8}
    found = trials(journal, "tiny")
    dead = {(key, t.number) for key, ts in found.items() for t in ts
            if t.user_attrs.get("reason", "").startswith("worker worker-1 (pid") and t.state == TrialState.FAIL
            and t.user_attrs["lost"]}
    retried = {(key, t.user_attrs.get("retry_of")) for key, ts in found.items() for t in ts if t.state.is_finished()}
    assert dead and dead <= retried  # each dead trial's configuration was run again


# -- a real PostgreSQL, started by the test --------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1 (trust auth), stopped and deleted afterwards."""
    initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not initdb:
        pytest.skip("PostgreSQL server binaries not installed (/usr/lib/postgresql/*/bin); .ci/postgres.sh "
                    "installs them")
    bindir = initdb[-1].parent
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="foldsweep-pg-"))  # not under pytest's private tmp: the server user reads it
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = root / "data"

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_user, str(bindir / tool), *args], check=True, capture_output=True, timeout=120)

    pg("initdb", "-D", str(data), "-U", "foldsweep", "--auth=trust", "-E", "UTF8")
    pg("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
       "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
    try:
        pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "foldsweep", "sweeps")
        yield f"postgresql://foldsweep@127.0.0.1:{port}/sweeps"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow  # ~35 s: a database server and three foldsweep processes start up on 2 cores
def test_a_coordinator_and_two_workers_share_one_sweep_over_postgresql(postgres: str, write_spec,
                                                                       workdir: Path) -> None:
    spec = write_spec(**{**BUSY, "resources": {**BUSY["resources"], "workers": 1}})
    workers = [start("worker", str(spec), "--storage", postgres, "--name", name, "--threads", "1", "--wait", "120",
                     cwd=workdir) for name in ("pg-a", "pg-b")]
    coordinator = start("run", str(spec), "--storage", postgres, "--json", cwd=workdir)
    code, out, err = finish(coordinator)
    ends = [finish(proc) for proc in workers]
    assert code == 0, err
    assert [end[0] for end in ends] == [0, 0], [end[2] for end in ends]
    assert json.loads(out.strip().splitlines()[-1])["storage"] == postgres

    assert {key: finished(c) for key, c in states(postgres, "tiny").items()} == {"outer-0": 8, "outer-1": 8, "final": 8}
    ran = worker_names(postgres, "tiny")
    assert len(ran) >= 2 and {"pg-a", "pg-b"} & set(ran), ran  # the sweep was shared
    assert lock_errors(err, *(end[2] for end in ends)) == []

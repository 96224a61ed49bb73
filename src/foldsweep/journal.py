"""Which damaged records of an Optuna journal a repair may drop, and what it says when it may not.

Optuna's journal is a log replayed in order, and ids are positions in it: the n-th create-study record
makes study n, the n-th create-trial record trial n, and every later record names them by those ids.
Dropping a record from the middle therefore shifts, loses or misattributes whatever comes after it
(another study's best under a sibling, trials without parameters, a slot used twice). Two kinds of
damage are safe to drop, because the replayed state is the same without them:

- the torn tail, the bytes after the last newline: Optuna's reader never applies a line that has no
  newline, so no process ever acted on it (the caller cuts it);
- a heartbeat stamp (our lease on a running trial) whose trial is stamped again or finished further on:
  the later stamp is what the lease reads, and a finished trial's lease is never read.

A dropped stamp is replaced in place by a record of the same length that replays to nothing, so no
record moves and a process that has the journal open reads on from its byte offsets. Every other
damaged line (create or delete a study, create a trial, a parameter, a state change, a value, an
attribute other than the lease, a line of unknown kind) is refused, with the file left as it was.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from optuna.trial import TrialState

from foldsweep.compat import JournalOperation

__all__ = ["LEASE", "Damage", "damaged_records", "refusal"]

LEASE = "heartbeat"  # the trial system attribute a worker stamps while it runs the trial

_FIELDS: dict[int, frozenset[str]] = {  # what Optuna's replay reads from each kind of record
    JournalOperation.CREATE_STUDY: frozenset({"study_name", "directions"}),
    JournalOperation.DELETE_STUDY: frozenset({"study_id"}),
    JournalOperation.SET_STUDY_USER_ATTR: frozenset({"study_id", "user_attr"}),
    JournalOperation.SET_STUDY_SYSTEM_ATTR: frozenset({"study_id", "system_attr"}),
    JournalOperation.CREATE_TRIAL: frozenset({"study_id", "datetime_start"}),
    JournalOperation.SET_TRIAL_PARAM: frozenset({"trial_id", "param_name", "param_value_internal", "distribution"}),
    JournalOperation.SET_TRIAL_STATE_VALUES: frozenset({"trial_id", "state", "values"}),
    JournalOperation.SET_TRIAL_INTERMEDIATE_VALUE: frozenset({"trial_id", "step", "intermediate_value"}),
    JournalOperation.SET_TRIAL_USER_ATTR: frozenset({"trial_id", "user_attr"}),
    JournalOperation.SET_TRIAL_SYSTEM_ATTR: frozenset({"trial_id", "system_attr"}),
    JournalOperation.DISCARD_TRIALS: frozenset(),
}
_FINISHED = frozenset(state.value for state in TrialState if state.is_finished())
_OP_CODE = re.compile(rb'\{"op_code":(\d+),')
_STAMP = re.compile(rb'\{"op_code":%d,"worker_id":"[^"]*","trial_id":(\d+),"system_attr":\{"%s":'
                    % (JournalOperation.SET_TRIAL_SYSTEM_ATTR, LEASE.encode()))
# a study attribute for a study id that never exists: Optuna's replay skips it (the writer is no process)
_NOTHING = json.dumps({"op_code": JournalOperation.SET_STUDY_SYSTEM_ATTR, "worker_id": "foldsweep-repair",
                       "study_id": -1, "system_attr": {"replaced": "a damaged heartbeat stamp"}},
                      separators=(",", ":")).encode()


@dataclass(frozen=True)
class Damage:
    """One unreadable line of the journal (1-based `line`, `offset` its first byte) and what a repair may do.

    `bad` is what cannot be read (a whole line, or the cut-short record that runs into the next one);
    `replacement` is the line to write instead, of the same length, or None when nothing may replace it.
    """

    line: int
    offset: int
    kind: str
    bad: bytes
    glued: bool
    replacement: bytes | None


def damaged_records(lines: list[bytes]) -> list[Damage]:
    """The journal's unreadable lines (each complete line, without its newline), judged as the module says."""
    records = [_record(line) for line in lines]
    found: list[tuple[int, int, bytes]] = []  # line index, offset, bytes before the readable end
    offset = 0
    for i, line in enumerate(lines):
        if records[i] is None:
            end = _readable_end(line)
            if end is not None:
                records[i] = _record(end)
            found.append((i, offset, line[: len(line) - len(end or b"")]))
        offset += len(line) + 1
    return [_judge(lines[i], i, at, head, records[i:]) for i, at, head in found]  # [i]: the readable end, if any


def refusal(path: str, damage: list[Damage]) -> str:
    """One line: where the first damage that may not be dropped is, what it is, and how to go on."""
    first = next(d for d in damage if d.replacement is None)
    what = (f"a {first.kind} record cut short and run into the next one" if first.glued and first.kind != "unknown"
            else "a record cut short and run into the next one" if first.glued
            else f"an unreadable {first.kind} record" if first.kind != "unknown"
            else "an unreadable line of unknown kind")
    others = len(damage) - 1
    more = f" ({others} more damaged line{'s' if others > 1 else ''} after it)" if others else ""
    return (f"the Optuna journal `{path}` is damaged at line {first.line} (byte {first.offset}): {what}{more}; "
            "dropping it would change the records after it (ids, states, parameters), so the file is left as it "
            "was: rerun with --fresh to start a new sweep beside it, or put back a copy of the journal")


def _judge(line: bytes, index: int, offset: int, head: bytes, later: list[dict[str, Any] | None]) -> Damage:
    op = _OP_CODE.match(head)
    kind = _kind(int(op.group(1))) if op else "unknown"
    stamp = _STAMP.match(head)
    replacement = None
    if stamp and any(record is not None and _settles(record, int(stamp.group(1))) for record in later):
        if len(head) < len(line):  # the readable end is kept where it is
            replacement = b" " * len(head) + line[len(head):]
        elif len(_NOTHING) <= len(line):
            replacement = _NOTHING.ljust(len(line))
    return Damage(index + 1, offset, "heartbeat stamp" if stamp else kind, head, len(head) < len(line), replacement)


def _settles(record: dict[str, Any], trial_id: int) -> bool:
    """Whether this later record decides the trial's lease: a new stamp, or the trial finishing."""
    if record.get("trial_id") != trial_id:
        return False
    if record["op_code"] == JournalOperation.SET_TRIAL_SYSTEM_ATTR:
        return isinstance(record["system_attr"], dict) and LEASE in record["system_attr"]
    if record["op_code"] != JournalOperation.SET_TRIAL_STATE_VALUES:
        return False
    return type(record["state"]) is int and record["state"] in _FINISHED


def _kind(op: int) -> str:
    try:
        return JournalOperation(op).name.lower().replace("_", "-")
    except ValueError:
        return "unknown"


def _record(line: bytes) -> dict[str, Any] | None:
    """The line as an Optuna record (it has everything the replay reads), or None."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested beyond reason
        return None
    if not isinstance(value, dict):
        return None
    op = value.get("op_code")
    if type(op) is not int or op not in _FIELDS or not isinstance(value.get("worker_id"), str):
        return None
    return value if _FIELDS[op] <= value.keys() else None


def _readable_end(line: bytes) -> bytes | None:
    """The record a cut-short one runs into (a torn record an append was glued to), or None."""
    start = line.find(b'{"op_code"', 1)
    while start > 0:
        if _record(line[start:]) is not None:
            return line[start:]
        start = line.find(b'{"op_code"', start + 1)
    return None

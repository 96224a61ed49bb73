"""Slots: what makes a trial's configuration the same whether or not the sweep was interrupted.

A study's trials fill slots 0..n_trials-1. A fresh trial takes the next free slot; a retry of a trial
lost to a crash or Ctrl-C takes the slot of the trial it repeats (with its parameters), so slots, unlike
Optuna's trial numbers, do not move when a trial has to be run again.

`SlotSampler` makes a suggestion a function of (seed, study, slot, history) only: it reseeds the
sampler's random state from the slot before every ask (a restarted process would otherwise start its
stream over and repeat an earlier trial's configuration) and shows the sampler the history in slot
order (TPE weighs trials by position and breaks ties in value by it). The work loop asks trials in
rounds aligned on multiples of `trials_per_batch` slots, so each slot is asked with the same history.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from foldsweep.compat import list_trials, seed_sampler, storage_of, trial_id
from foldsweep.objective import job_seed
from foldsweep.storage import LOST, SLOT, holder
from foldsweep.studies import slot_order

__all__ = ["SlotSampler", "slot_of", "stored_slot"]


def slot_of(trial: FrozenTrial, trials: list[FrozenTrial]) -> int:
    """The trial's slot: recorded when it was asked (or enqueued as a retry), else the next free one."""
    if SLOT in trial.user_attrs:
        return int(trial.user_attrs[SLOT])
    held = [slot_order(t)[0] for t in trials if t.number < trial.number and not t.user_attrs.get(LOST)]
    return max(held, default=-1) + 1


def stored_slot(trial: optuna.trial.Trial) -> int:
    """A live trial's slot as stored (the `Trial` object caches its attributes from before the sampler ran)."""
    return int(storage_of(trial.study).get_trial_user_attrs(trial_id(trial)).get(SLOT, trial.number))


class _InSlotOrder:
    """The study as the sampler sees it: the same trials, listed in slot order."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(self, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        return sorted(list_trials(self._study, *args, **kwargs), key=slot_order)

    def get_trials(self, *args: Any, **kwargs: Any) -> list[FrozenTrial]:
        return sorted(self._study.get_trials(*args, **kwargs), key=slot_order)


class SlotSampler(optuna.samplers.BaseSampler):
    """Wraps a study's sampler so that each slot's suggestion is reproducible (see the module doc)."""

    def __init__(self, inner: optuna.samplers.BaseSampler, seed: int, study_key: str) -> None:
        self.inner = inner
        self.seed = seed
        self.study_key = study_key

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        slot = slot_of(trial, study.get_trials(deepcopy=False))
        if SLOT not in trial.user_attrs:
            storage_of(study).set_trial_user_attr(trial_id(trial), SLOT, slot)
        # who asks it, before its parameters are written: a kill mid-ask is then seen as dead at once
        storage_of(study).set_trial_user_attr(trial_id(trial), "worker", holder())
        seed_sampler(self.inner, job_seed(self.seed, self.study_key, "sampler", slot))
        self.inner.before_trial(_InSlotOrder(study), trial)  # type: ignore[arg-type]

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self.inner.infer_relative_search_space(_InSlotOrder(study), trial)  # type: ignore[arg-type]

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self.inner.sample_relative(_InSlotOrder(study), trial, search_space)  # type: ignore[arg-type]

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.inner.sample_independent(_InSlotOrder(study), trial, param_name,  # type: ignore[arg-type]
                                             param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        """Nothing to do: every ask reseeds from its slot."""


"""The spec's `search:` block as Optuna distributions.

Distributions (rather than `suggest_*` calls inside an objective) let the sweep ask trials up front with
`study.ask(fixed_distributions)`, which is what batching many trials into one model needs.
"""

from __future__ import annotations

import warnings
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from foldsweep.spec import CategoricalParam, FloatParam, SweepSpec

__all__ = ["distributions", "pruner", "sampler", "trial_spec"]


def distributions(spec: SweepSpec) -> dict[str, BaseDistribution]:
    return {name: _distribution(param) for name, param in spec.search.items()}


def _distribution(param: Any) -> BaseDistribution:
    if isinstance(param, CategoricalParam):
        return CategoricalDistribution(param.choices)
    if isinstance(param, FloatParam):
        return FloatDistribution(param.low, param.high, log=param.log, step=param.step)
    return IntDistribution(param.low, param.high, log=param.log, step=param.step)


def trial_spec(spec: SweepSpec, trial: optuna.trial.BaseTrial) -> SweepSpec:
    """The configuration a trial stands for: its sampled knobs written over the fixed ones."""
    return spec.with_params(dict(trial.params))


def sampler(spec: SweepSpec, seed_offset: int) -> optuna.samplers.BaseSampler:
    """Each study gets its own seed so outer-fold studies never share a sample stream."""
    opts = spec.optuna
    seed = opts.seed + seed_offset
    if opts.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if opts.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed)
    # constant_liar keeps trials asked together (one batch, or several workers) from piling onto one point
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=opts.n_startup_trials, constant_liar=True,
                                      multivariate=True)


def pruner(spec: SweepSpec) -> optuna.pruners.BasePruner:
    opts = spec.optuna
    warmup = opts.report_every
    if opts.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=opts.n_startup_trials, n_warmup_steps=warmup)
    if opts.pruner == "percentile":
        return optuna.pruners.PercentilePruner(opts.percentile, n_startup_trials=opts.n_startup_trials,
                                               n_warmup_steps=warmup)
    if opts.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=warmup)
    if opts.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=warmup, max_resource=spec.train.epochs)
    if opts.pruner == "wilcoxon":
        with warnings.catch_warnings():  # experimental in Optuna, and the user chose it by name
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=2)
    return optuna.pruners.NopPruner()

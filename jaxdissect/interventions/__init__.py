"""Interventions: switch units off (or on) and measure what changes.

* :mod:`jaxdissect.interventions.classifier`: per-class accuracy of a
  classifier with units of a layer ablated (spec 3.3): single-unit sweeps,
  custom unit sets, per-class rankings and unit importance (the whole
  experiment is :mod:`jaxdissect.pipelines.ablate_classifier`).
* :mod:`jaxdissect.interventions.generator`: object removal and insertion in
  a generator (spec 3.4).

The classifier functions are re-exported here (imported on first use).
"""

import importlib

_CLASSIFIER = (
    "InterventionError",
    "ablate_units",
    "ablation_sweep",
    "perclass_accuracy",
    "perclass_counts",
    "perclass_metrics",
    "rank_units",
    "single_unit_sweep",
    "unit_importance",
)

__all__ = list(_CLASSIFIER) + ["classifier", "generator"]


def __getattr__(name):
    if name in ("classifier", "generator"):
        return importlib.import_module(f"jaxdissect.interventions.{name}")
    if name in _CLASSIFIER:
        value = getattr(importlib.import_module("jaxdissect.interventions.classifier"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'jaxdissect.interventions' has no attribute {name!r}")


def __dir__():
    return __all__

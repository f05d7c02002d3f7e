"""The method as three calls on a loaded model and its calibration windows, used by the run, the
sweep, the quality probe and the tools alike:

    measured = measure_model(loaded, calib, settings)        # pass 1: outliers (POD), scores, errors
    plan = make_plan(loaded.shape, loaded.source, measured, settings)   # planner.py: the ratios
    apply_to_model(loaded, plan, calib)                      # pass 2: prune and resize in place

(prune_model does the three.) Each pass streams the calibration windows through the decoder one
layer at a time from the embeddings (calibration.LayerStream), so pass 2 sees the inputs of the
layers as pruned before it, and a streamed model's layers are read from disk one at a time.
"""

from __future__ import annotations

import torch

from mosaic_export.method.calibration import LayerStream
from mosaic_export.method.plan import Plan, PruneSettings
from mosaic_export.method.planner import make_plan
from mosaic_export.method.pod import LayerMeasurement, measure
from mosaic_export.method.prune.apply import apply_plan
from mosaic_export.model.folder import LoadedModel


def stream(loaded: LoadedModel, calib: torch.Tensor, settings: PruneSettings,
           batch_size: int = 1) -> LayerStream:
    """The calibration windows entering the decoder, kept between layers in the settings' dtype."""
    return LayerStream(loaded.model, loaded.spec, calib, batch_size, loaded.weights,
                       settings.calibration.states)


def measure_model(loaded: LoadedModel, calib: torch.Tensor, settings: PruneSettings,
                  batch_size: int = 1, error_kinds: frozenset[str] | None = None) -> list[LayerMeasurement]:
    """Pass 1 over the dense model: per layer, each projection's outlier ratio and the scores the
    structured part ranks by (and, ``error_kinds``, the reconstruction errors the error allocation
    and the quality model need; None: what the settings' allocation needs)."""
    kinds = settings.error_kinds(False) if error_kinds is None else error_kinds
    return measure(stream(loaded, calib, settings, batch_size), loaded.spec, loaded.shape,
                   settings.outlier_m, kinds)


def apply_to_model(loaded: LoadedModel, plan: Plan, calib: torch.Tensor, batch_size: int = 1) -> None:
    """Pass 2: the model pruned in place to the plan (structure first, compensated; then the
    unstructured zeros), its layers resized."""
    apply_plan(stream(loaded, calib, plan.settings, batch_size), loaded.spec, plan)


def prune_model(loaded: LoadedModel, calib: torch.Tensor, settings: PruneSettings,
                batch_size: int = 1) -> Plan:
    """Measure, plan at settings.sparsity, apply: the plan the model was pruned to."""
    measured = measure_model(loaded, calib, settings, batch_size)
    plan = make_plan(loaded.shape, loaded.source, measured, settings)
    apply_to_model(loaded, plan, calib, batch_size)
    return plan

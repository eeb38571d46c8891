"""One-shot pruning that keeps a model accurate, from a few hundred calibration inputs.

Methods, each a function (weight [out, in], input statistics, sparsity, pattern) -> (mask, new
values or None):

- :func:`wanda`: |W| x ||X_j||, compared per output row (no weight update).
- :func:`sparsegpt`: inverse-Hessian pruning with updates of the kept weights.
- :func:`dsnot`: prune-and-grow refinement of any mask that never increases the reconstruction
  error.

Layer-wise allocation of a global sparsity (``uniform``, ``erk``, ``owl``) and the sequential
whole-model driver (:func:`prune_calibrated`) are what ``sparse_ext.sparsify(method=...,
calibration=...)`` uses.
"""
from .allocation import erk, outlier_ratio, owl, uniform
from .calibrate import ALLOCATIONS, METHODS, LayerPruning, allocate, prune_calibrated
from .dsnot import dsnot, reconstruction_error
from .sparsegpt import sparsegpt
from .stats import InputStats
from .wanda import wanda, wanda_scores

__all__ = ["ALLOCATIONS", "METHODS", "InputStats", "LayerPruning", "allocate", "dsnot", "erk",
           "outlier_ratio", "owl", "prune_calibrated", "reconstruction_error", "sparsegpt",
           "uniform", "wanda", "wanda_scores"]

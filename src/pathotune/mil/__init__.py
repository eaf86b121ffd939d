"""Slide-level multiple-instance learning on frozen tile features: aggregators, feature bags, training.

Bags are read through :mod:`pathotune.features` (the feature-file contract); ``mil`` never imports ``slides``.
"""

from ..features import check_feature_compatibility, read_feature_attrs
from .aggregators import (
    ABMIL,
    MIL_AGGREGATORS,
    MeanMIL,
    MILAggregator,
    TransMIL,
    aggregator_options,
    create_aggregator,
    list_aggregators,
)
from .bags import FeatureBagDataset, read_slide_features
from .config import MILConfig, load_mil_config
from .labels import SlideLabel, SlideLabels, plan_folds, read_slide_labels
from .models import FoldEnsemble, load_mil_model, predict_cohort, predict_slides, write_slide_predictions
from .train import train_mil

__all__ = [
    "ABMIL",
    "MIL_AGGREGATORS",
    "MILAggregator",
    "MILConfig",
    "MeanMIL",
    "TransMIL",
    "FeatureBagDataset",
    "SlideLabel",
    "SlideLabels",
    "aggregator_options",
    "check_feature_compatibility",
    "create_aggregator",
    "list_aggregators",
    "load_mil_config",
    "load_mil_model",
    "plan_folds",
    "FoldEnsemble",
    "predict_cohort",
    "predict_slides",
    "read_feature_attrs",
    "read_slide_features",
    "read_slide_labels",
    "train_mil",
    "write_slide_predictions",
]

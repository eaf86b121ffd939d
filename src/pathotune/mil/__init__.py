"""Slide-level multiple-instance learning on frozen tile features: aggregators, feature bags, training."""

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
from .features import (
    FeatureBagDataset,
    SlideLabel,
    SlideLabels,
    check_feature_compatibility,
    read_feature_attrs,
    read_slide_features,
    read_slide_labels,
)
from .train import MILConfig, load_mil_config, load_mil_model, plan_folds, predict_slides, train_mil

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
    "predict_slides",
    "read_feature_attrs",
    "read_slide_features",
    "read_slide_labels",
    "train_mil",
]

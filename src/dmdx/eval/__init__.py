"""Evaluation metrics: mixture metrics and sliced Wasserstein for vectors, FD / precision / recall for images."""

from .images import (FeatureClassifier, PixelBackbone, frechet_distance, get_classifier, get_pixel_backbone,
                     image_metrics, precision_recall, train_classifier, train_pixel_backbone)
from .vectors import chi2_quantile, mixture_metrics, sliced_wasserstein

__all__ = ["FeatureClassifier", "PixelBackbone", "chi2_quantile", "frechet_distance", "get_classifier",
           "get_pixel_backbone", "image_metrics", "mixture_metrics", "precision_recall", "sliced_wasserstein",
           "train_classifier", "train_pixel_backbone"]

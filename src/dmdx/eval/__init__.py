"""Evaluation metrics: mixture metrics and sliced Wasserstein for vectors, FD / precision / recall for images (in the
evaluation classifier's features and, as a second judge, in a contrastive encoder's)."""

from .contrastive import ContrastiveEncoder, contrastive_metrics, get_contrastive, train_contrastive
from .images import (FeatureClassifier, PixelBackbone, frechet_distance, get_classifier, get_pixel_backbone,
                     image_metrics, precision_recall, train_classifier, train_pixel_backbone)
from .vectors import chi2_quantile, class_metrics, mixture_metrics, sliced_wasserstein

__all__ = ["ContrastiveEncoder", "FeatureClassifier", "PixelBackbone", "chi2_quantile", "class_metrics",
           "contrastive_metrics", "frechet_distance", "get_classifier", "get_contrastive", "get_pixel_backbone",
           "image_metrics", "mixture_metrics", "precision_recall", "sliced_wasserstein", "train_classifier",
           "train_contrastive", "train_pixel_backbone"]

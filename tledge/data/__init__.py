"""Data: one image loader, the generated shapes set, and the sources a recipe can name."""

from tledge.data.images import IMAGE_SUFFIXES, load_image, load_images, resize_images
from tledge.data.sources import Splits, calibration_images, load_splits

__all__ = ["IMAGE_SUFFIXES", "Splits", "calibration_images", "load_image", "load_images",
           "load_splits", "resize_images"]

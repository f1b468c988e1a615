"""Segmentation task: synthetic abdominal phantoms (or real image/mask folders), a U-Net,
Dice-family losses, Dice and HD95 metrics.

Heavy dependencies (MONAI, matplotlib) are imported lazily inside functions.
"""

from medtasks.segmentation.task import SegmentationParams, SegmentationTask

__all__ = ["SegmentationParams", "SegmentationTask"]

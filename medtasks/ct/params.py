"""``task.params`` of the CT reconstruction task: the neutral scanner, the phantoms and the networks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from medtasks.base import TaskParams
from medtasks.ct import realdata
from medtasks.ct.operator import FilterName
from medtasks.segmentation.model import NormName, check_group_norm

__all__ = ["MIN_VIEWS", "CTParams", "PhantomName"]

MIN_VIEWS = 4
"""Fewest projections a site's scanner takes."""

PhantomName = Literal["torso", "ellipses", "mixed", "packaged"]
"""Where synthetic slices come from (:data:`medtasks.ct.anatomy.ANATOMIES` lists their labels)."""


class CTParams(TaskParams):
    """``task.params`` of the CT reconstruction task."""

    image_size: int = Field(64, ge=16, description="Image side N in pixels (and detector bins).")
    num_views: int = Field(30, ge=MIN_VIEWS, description="Projections of the neutral scanner (sparse view).")
    angular_range: float = Field(180.0, gt=0, le=360, description="Angular range of the neutral scanner, degrees.")
    dose_i0: float = Field(1e5, gt=0, description="Unattenuated photons per detector bin of the neutral scanner.")
    detector_blur: float = Field(0.0, ge=0, description="Gaussian detector blur of the neutral scanner, bins.")
    phantom: PhantomName = Field(
        "torso",
        description="Anatomy family: torso (thorax/abdomen), ellipses, mixed (all three), or packaged "
        "(augmented patches of real CT slices shipped by slice_packages).",
    )
    slice_packages: tuple[realdata.Package, ...] = Field(
        ("pydicom",),
        min_length=1,
        description="Distributions whose real CT slices phantom=packaged uses: pydicom (2 slices, always "
        "installed) and pydicom-data (4 more, optional: pip install pydicom-data).",
    )
    filter: FilterName = Field("ram-lak", description="FBP filter window.")
    channels: tuple[int, ...] = Field((16, 32, 64), min_length=2, description="FBPConvNet U-Net widths.")
    norm: NormName = Field("instance", description="FBPConvNet normalisation: instance, batch or group.")
    num_groups: int = Field(4, ge=1, description="GroupNorm groups (norm=group); divides every width.")
    unrolled_iterations: int = Field(5, ge=1, le=50, description="Iterations K of the unrolled network.")
    prox_channels: int = Field(32, ge=1, description="Hidden channels of each unrolled proximal CNN.")
    shared_weights: bool = Field(False, description="One proximal CNN for all unrolled iterations.")
    loss: Literal["mse", "l1"] = Field("mse", description="Training loss on the normalised images.")

    @model_validator(mode="after")
    def _check(self) -> CTParams:
        if any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive, got {self.channels}")
        factor = 2 ** (len(self.channels) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of {factor} (2**(len(channels)-1) "
                f"for channels={self.channels})"
            )
        if self.norm == "group":
            check_group_norm(self.channels, self.channels[0], self.num_groups)
        return self

"""Multiple-instance learning (MIL) building blocks for whole-slide-image-like tasks.

A slide is a bag of tiles with one weak label: ``Y = 1`` iff at least one tile
is positive (the standard MIL assumption: Dietterich, Lathrop & Lozano-Pérez 1997,
Artificial Intelligence 89; Ilse et al. 2018, §2.1, arXiv:1802.04712). The pieces:

* :mod:`medtasks.mil.synthetic`: H&E-like synthetic slides (Beer–Lambert stain
  model, normal / inflamed / tumour morphology), per-site acquisition (stain,
  brightness, blur) and annotator (tumour-fraction threshold) shifts, and
  :func:`~medtasks.mil.synthetic.tiles_from_image` to tile a real micrograph.
* :mod:`medtasks.mil.stains`: Beer–Lambert imaging, colour deconvolution and stain shifts.
* :mod:`medtasks.mil.ihc`: the offline demo source, slides of real crops of scikit-image's
  bundled immunohistochemistry image with DAB-positive tiles as the positive class.
* :mod:`medtasks.mil.folder`: real slides from a folder (one sub-folder of tiles per slide
  and ``labels.csv``).
* :mod:`medtasks.mil.models`: a small tile encoder, permutation-invariant MIL
  pooling (mean, max, attention and gated attention of Ilse et al. 2018,
  arXiv:1802.04712) with key-padding masks, and instance- vs embedding-level
  MIL models.
* :mod:`medtasks.mil.losses`: bag losses corrected for a site's own label prior
  (class-balanced weights, logit adjustment).
* :mod:`medtasks.mil.metrics`: ROC AUC (Mann–Whitney), accuracy, balanced
  accuracy, and attention localisation AUC.
* :mod:`medtasks.mil.plots`: tiles | attention | truth pictures.
* :mod:`medtasks.mil.task`: :class:`~medtasks.mil.task.MILTask`, which wires these
  into the platform as the task ``mil``.
"""

from medtasks.mil.folder import SlideFolder, load_slide_folder
from medtasks.mil.ihc import IHC_ACQUISITION_SPACE, generate_ihc_slides, load_ihc_image
from medtasks.mil.losses import prior_corrected_bce, site_log_odds
from medtasks.mil.metrics import (
    accuracy,
    attention_localisation_auc,
    balanced_accuracy,
    roc_auc,
)
from medtasks.mil.models import (
    AttentionPooling,
    GatedAttentionPooling,
    MaxPooling,
    MeanPooling,
    MILModel,
    MILOutput,
    TileEncoder,
    build_mil_model,
    pad_bags,
)
from medtasks.mil.synthetic import (
    ACQUISITION_SPACE,
    ANNOTATOR_SPACE,
    Slides,
    generate_slides,
    tiles_from_image,
)
from medtasks.mil.task import MILBatch, MILParams, MILTask

__all__ = [
    "ACQUISITION_SPACE",
    "ANNOTATOR_SPACE",
    "IHC_ACQUISITION_SPACE",
    "AttentionPooling",
    "GatedAttentionPooling",
    "MILBatch",
    "MILModel",
    "MILOutput",
    "MILParams",
    "MILTask",
    "MaxPooling",
    "MeanPooling",
    "SlideFolder",
    "Slides",
    "TileEncoder",
    "accuracy",
    "attention_localisation_auc",
    "balanced_accuracy",
    "build_mil_model",
    "generate_ihc_slides",
    "generate_slides",
    "load_ihc_image",
    "load_slide_folder",
    "pad_bags",
    "prior_corrected_bce",
    "roc_auc",
    "site_log_odds",
    "tiles_from_image",
]

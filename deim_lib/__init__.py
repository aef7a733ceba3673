"""DEIMv2 as a library: the detector, its criterion, post-processing, data pipeline and COCO evaluation.

The module tree and state_dict keys are those of the official DEIMv2 code, so official checkpoints load strictly.
"""

from deim_lib.checkpoint import CheckpointError, load_detector_state, load_official_checkpoint
from deim_lib.criterion.deim_criterion import DEIMCriterion, build_criterion
from deim_lib.criterion.matcher import HungarianMatcher
from deim_lib.model import DEIM, build_detector
from deim_lib.postprocessor import PostProcessor
from deim_lib.variants import RELEASED_VARIANTS, VARIANTS, get_variant

__all__ = [
    "DEIM",
    "RELEASED_VARIANTS",
    "VARIANTS",
    "CheckpointError",
    "DEIMCriterion",
    "HungarianMatcher",
    "PostProcessor",
    "build_criterion",
    "build_detector",
    "get_variant",
    "load_detector_state",
    "load_official_checkpoint",
]

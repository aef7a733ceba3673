"""DEIMv2 as a library: the detector, its criterion, post-processing, data pipeline and COCO evaluation.

The module tree and state_dict keys are those of the official DEIMv2 code, so official checkpoints load strictly.
"""

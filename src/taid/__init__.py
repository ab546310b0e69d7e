"""taid: Temporally Adaptive Interpolated Distillation for causal language models.

``TAIDLoss`` is KL(p_t || q) with ``p_t = softmax((1 - t) * stopgrad(z_s) + t * z_T)``;
``TAIDScheduler`` moves ``t`` from ``t_start`` to 1 by the paper's momentum rule with a linear
floor. The baseline divergences share the same interface; ``build_loss`` names them all.
"""

from taid import functional
from taid.functional import LossOutput
from taid.losses import (
    LOSSES,
    AdaptiveKLLoss,
    DistillationLoss,
    ForwardKLLoss,
    JSDLoss,
    ReverseKLLoss,
    SFTLoss,
    SkewKLLoss,
    SkewReverseKLLoss,
    TAIDLoss,
    TVDLoss,
    build_loss,
    loss_parameters,
)
from taid.scheduler import TAIDScheduler

__version__ = "0.1.0"

__all__ = [
    "LOSSES",
    "AdaptiveKLLoss",
    "DistillationLoss",
    "ForwardKLLoss",
    "JSDLoss",
    "LossOutput",
    "ReverseKLLoss",
    "SFTLoss",
    "SkewKLLoss",
    "SkewReverseKLLoss",
    "TAIDLoss",
    "TAIDScheduler",
    "TVDLoss",
    "build_loss",
    "functional",
    "loss_parameters",
]

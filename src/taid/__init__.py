"""taid: Temporally Adaptive Interpolated Distillation for causal language models.

``TAIDLoss`` is KL(p_t || q) with ``p_t = softmax((1 - t) * stopgrad(z_s) + t * z_T)``;
``TAIDScheduler`` moves ``t`` from ``t_start`` to 1 by the paper's momentum rule with a linear
floor. The baseline divergences share the same interface; ``build_loss`` names them all.
"""

from taid import functional
from taid.functional import LossOutput
from taid.losses import (
    LOSSES,
    DistillationLoss,
    DivergenceLoss,
    SFTLoss,
    TAIDLoss,
    build_loss,
    loss_parameters,
    register_divergence,
)
from taid.scheduler import TAIDScheduler

__version__ = "0.1.0"

# One module per divergence (ForwardKLLoss, JSDLoss, ...), derived from its description.
globals().update({cls.__name__: cls for cls in LOSSES.values()})

__all__ = [
    "LOSSES",
    "DistillationLoss",
    "DivergenceLoss",
    "LossOutput",
    "SFTLoss",
    "TAIDLoss",
    "TAIDScheduler",
    "build_loss",
    "functional",
    "loss_parameters",
    "register_divergence",
]
__all__ += [cls.__name__ for cls in LOSSES.values() if cls.__name__ not in __all__]

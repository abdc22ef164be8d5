"""Pure-PyTorch losses and logit transforms; nothing here imports Lightning.

Each function takes and returns tensors, documents its shapes, and validates its input with a
message that names the problem. Callbacks and modules in :mod:`lightning_logits` are thin layers
over these functions.
"""

from lightning_logits.functional.classification import classification_loss
from lightning_logits.functional.distillation import kd_loss, nkd_loss
from lightning_logits.functional.lawn import (
    frobenius_norm,
    project_to_tangent,
    project_to_tangent_,
    rescale_to_norm,
    rescale_to_norm_,
)
from lightning_logits.functional.mowst import (
    mowst_dispersion,
    mowst_expected_accuracy,
    mowst_loss,
    mowst_predict,
    mowst_route,
    mowst_star_loss,
)
from lightning_logits.functional.replay import (
    average_accuracy,
    average_forgetting,
    average_incremental_accuracy,
    backward_transfer,
    cosine_logits,
    er_ace_loss,
    final_average_accuracy,
    learning_accuracy,
    replay_cross_entropy,
    uer_loss,
)
from lightning_logits.functional.uskd import uskd_loss, uskd_soft_target_weight, uskd_target_classes, uskd_zipf_labels

__all__ = [
    "average_accuracy",
    "average_forgetting",
    "average_incremental_accuracy",
    "backward_transfer",
    "classification_loss",
    "cosine_logits",
    "er_ace_loss",
    "final_average_accuracy",
    "frobenius_norm",
    "kd_loss",
    "learning_accuracy",
    "mowst_dispersion",
    "mowst_expected_accuracy",
    "mowst_loss",
    "mowst_predict",
    "mowst_route",
    "mowst_star_loss",
    "nkd_loss",
    "project_to_tangent",
    "replay_cross_entropy",
    "project_to_tangent_",
    "rescale_to_norm",
    "rescale_to_norm_",
    "uer_loss",
    "uskd_loss",
    "uskd_soft_target_weight",
    "uskd_target_classes",
    "uskd_zipf_labels",
]

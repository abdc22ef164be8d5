"""Read or build a user's network: head search and the logit tap, class count, intermediate features,
LAWN's layer tracer, and the model/teacher factory. Pure PyTorch: nothing here imports Lightning."""

# First: registers "reduced_resnet18" with timm before anything can ask timm for a model name.
from lightning_logits.networks.reduced_resnet import ReducedResNet18, reduced_resnet18  # isort: skip
from lightning_logits.networks.causal_lm import build_causal_lm, causal_lm_logits
from lightning_logits.networks.factory import build_expert, build_model, load_teacher, teacher_fingerprint
from lightning_logits.networks.features import (
    FeatureLayer,
    default_feature_layer,
    pool_feature,
    probe_feature_width,
    resolve_feature_layer,
)
from lightning_logits.networks.heads import (
    AUX_ATTRIBUTE,
    LogitTap,
    aux_modules,
    count_classes,
    find_classifier,
    find_module,
    first_tensor,
    is_aux,
)
from lightning_logits.networks.lawn import find_constrained_layers

__all__ = [
    "build_causal_lm",
    "causal_lm_logits",
    "AUX_ATTRIBUTE",
    "FeatureLayer",
    "LogitTap",
    "ReducedResNet18",
    "aux_modules",
    "build_expert",
    "build_model",
    "default_feature_layer",
    "find_classifier",
    "find_constrained_layers",
    "find_module",
    "first_tensor",
    "is_aux",
    "load_teacher",
    "count_classes",
    "pool_feature",
    "probe_feature_width",
    "reduced_resnet18",
    "resolve_feature_layer",
    "teacher_fingerprint",
]

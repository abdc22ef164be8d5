"""Read or build a user's network: head search and the logit tap, class count, intermediate features,
LAWN's layer tracer, the model/teacher factory, and FSDP2 sharding block by block. Pure PyTorch: nothing
here imports Lightning."""

# First: registers "reduced_resnet18" with timm before anything can ask timm for a model name.
from lightning_logits.networks.reduced_resnet import ReducedResNet18, reduced_resnet18  # isort: skip
from lightning_logits.networks.causal_lm import (
    build_causal_lm,
    causal_lm_head,
    causal_lm_hidden_states,
    causal_lm_logits,
)
from lightning_logits.networks.factory import (
    build_expert,
    build_model,
    check_checkpoint,
    load_teacher,
    teacher_fingerprint,
)
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
from lightning_logits.networks.sharding import find_blocks, fsdp_mesh, is_sharded, reshard, shard_model, sharded_bytes

__all__ = [
    "build_causal_lm",
    "causal_lm_head",
    "causal_lm_hidden_states",
    "causal_lm_logits",
    "AUX_ATTRIBUTE",
    "FeatureLayer",
    "LogitTap",
    "ReducedResNet18",
    "aux_modules",
    "build_expert",
    "build_model",
    "check_checkpoint",
    "default_feature_layer",
    "find_blocks",
    "find_classifier",
    "find_constrained_layers",
    "find_module",
    "first_tensor",
    "fsdp_mesh",
    "is_aux",
    "is_sharded",
    "load_teacher",
    "count_classes",
    "pool_feature",
    "probe_feature_width",
    "reduced_resnet18",
    "reshard",
    "resolve_feature_layer",
    "shard_model",
    "sharded_bytes",
    "teacher_fingerprint",
]

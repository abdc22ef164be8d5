"""Which layers LAWN constrains: the parameterized layers of a network's final homogeneous part.

LAWN attenuates the logits by fixing the weight norms of the layers that run after the last
normalization layer. Everything before a normalization layer is (close to) scale invariant, so
those weights do not set the logit scale; the layers after it do, and if they are positively
homogeneous (linear/conv layers with ReLU, pooling, dropout between them) the logits scale as the
product of their weight norms. For timm CNNs and ViTs the part after the last normalization is the
classifier; for a network without normalization it is every layer.

"Runs after" is read off one real forward pass, with forward hooks on every module: a layer is in
the final part when its forward *starts* after the last normalization layer's forward *ends*
(so a container that holds the normalization layer is never "after" it). Functional calls inside a
``forward`` (``F.gelu``, ``F.layer_norm``) are invisible to hooks: pass the layers explicitly
(``layers=[...]``) for such models.

This is the search behind ``LAWN(scope="final")``; ``scope="all"`` needs no trace (every trainable
weight with two or more dimensions, see :func:`weight_matrices`).

Pure PyTorch, no Lightning: :func:`find_constrained_layers` works on any ``nn.Module``.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from lightning_logits.networks.heads import is_aux

__all__ = [
    "NON_HOMOGENEOUS_ACTIVATIONS",
    "NORM_TYPES",
    "ExecutionTrace",
    "constrained_parameter_names",
    "find_constrained_layers",
    "is_non_homogeneous_activation",
    "is_norm_layer",
    "match_layers",
    "non_homogeneous_activations",
    "record_execution",
    "select_constrained_layers",
    "weight_matrices",
]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    _NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*, their lazy versions
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
)
"""Normalization layer types; a leaf module whose class name contains ``Norm`` counts too (timm's
``RmsNorm``, ``SimpleNorm``, ``FrozenBatchNorm2d``...).

With ``scope="final"`` LAWN constrains the layers that run after the last of them.

Example:
    >>> from torch import nn
    >>> [isinstance(m, NORM_TYPES) for m in (nn.BatchNorm2d(4), nn.LayerNorm(4), nn.Linear(2, 2))]
    [True, True, False]
"""

NON_HOMOGENEOUS_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Tanh,
    nn.GELU,
    nn.Sigmoid,
    nn.SiLU,
    nn.Mish,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.Softplus,
    nn.Softsign,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,  # ReLU6 too: it saturates, so it is not homogeneous
    nn.LogSigmoid,
    nn.Tanhshrink,
    nn.GLU,
)
"""Activations ``f`` with ``f(a x) != a f(x)`` for ``a > 0``: in the constrained part they break the
link between weight norms and logit scale (LAWN still holds the norms, but attenuates less).

Example:
    >>> from torch import nn
    >>> isinstance(nn.GELU(), NON_HOMOGENEOUS_ACTIVATIONS), isinstance(nn.ReLU(), NON_HOMOGENEOUS_ACTIVATIONS)
    (True, False)
"""

# Class names (lower case) of other libraries' non-homogeneous activations (timm's GELU, Swish...).
_NON_HOMOGENEOUS_NAMES = frozenset(
    {
        "gelu",
        "gelutanh",
        "quickgelu",
        "silu",
        "swish",
        "mish",
        "tanh",
        "sigmoid",
        "hardswish",
        "hardsigmoid",
        "hardmish",
        "elu",
        "selu",
        "celu",
        "softplus",
        "swiglu",
        "geglu",
    }
)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (see :data:`NORM_TYPES`).

    Example:
        >>> from torch import nn
        >>> is_norm_layer(nn.BatchNorm2d(4)), is_norm_layer(nn.LayerNorm(4)), is_norm_layer(nn.Linear(4, 4))
        (True, True, False)
    """
    if isinstance(module, NORM_TYPES):
        return True
    return "Norm" in type(module).__name__ and next(module.children(), None) is None


def is_non_homogeneous_activation(module: nn.Module) -> bool:
    """Whether ``module`` is an activation that is not positively homogeneous (tanh, GELU, SiLU...).

    Example:
        >>> from torch import nn
        >>> is_non_homogeneous_activation(nn.GELU()), is_non_homogeneous_activation(nn.ReLU())
        (True, False)
    """
    if isinstance(module, NON_HOMOGENEOUS_ACTIVATIONS):
        return True
    return type(module).__name__.lower() in _NON_HOMOGENEOUS_NAMES


def weight_matrices(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters LAWN constrains in ``module``: its own (not its children's) trainable
    parameters with at least 2 dimensions. Biases (1-d) and normalization layers give none.

    Example:
        >>> from torch import nn
        >>> [name for name, _ in weight_matrices(nn.Linear(4, 3))]
        ['weight']
        >>> weight_matrices(nn.LayerNorm(4))
        []
    """
    if is_norm_layer(module):
        return []
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad and p.ndim >= 2]


def constrained_parameter_names(model: nn.Module, layers: Sequence[str]) -> list[str]:
    """Dotted names (as in ``model.named_parameters()``) of the weight matrices of ``layers``.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> constrained_parameter_names(net, ["0", "2"])
        ['0.weight', '2.weight']
    """
    names: list[str] = []
    for layer in layers:
        module = model.get_submodule(layer)
        names.extend(f"{layer}.{n}" if layer else n for n, _ in weight_matrices(module))
    return names


@dataclass
class ExecutionTrace:
    """What ran during a forward pass, in order.

    Attributes:
        events: ``("start" | "end", module name)`` in the order the hooks fired: a module's
            ``start`` precedes its children's events and its ``end`` follows them.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        >>> with record_execution(net) as trace:
        ...     _ = net(torch.randn(2, 4))
        >>> trace.events
        [('start', ''), ('start', '0'), ('end', '0'), ('start', '1'), ('end', '1'), ('end', '')]
    """

    events: list[tuple[str, str]] = field(default_factory=list)

    def ran(self) -> list[str]:
        """Names of the modules that ran, in the order they first started."""
        seen: dict[str, None] = {}
        for kind, name in self.events:
            if kind == "start":
                seen.setdefault(name, None)
        return list(seen)


@contextlib.contextmanager
def record_execution(model: nn.Module) -> Iterator[ExecutionTrace]:
    """Record the start and end of every submodule's forward that runs inside the ``with`` block.

    Modules under :data:`lightning_logits.networks.heads.AUX_ATTRIBUTE` (modules added by callbacks) are
    not watched. The hooks are removed on exit.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> with record_execution(net) as trace:
        ...     _ = net(torch.randn(2, 4))
        >>> trace.ran()
        ['', '0', '1', '2']
    """
    trace = ExecutionTrace()
    handles = []

    def watch(name: str, module: nn.Module) -> None:
        def pre_hook(_module: nn.Module, _args: Any) -> None:
            trace.events.append(("start", name))

        def post_hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            trace.events.append(("end", name))

        handles.append(module.register_forward_pre_hook(pre_hook))
        handles.append(module.register_forward_hook(post_hook))

    for name, module in model.named_modules():
        if not is_aux(name):
            watch(name, module)
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()


def select_constrained_layers(model: nn.Module, trace: ExecutionTrace) -> list[str]:
    """The layers of ``model`` with weight matrices that start after the last normalization layer ended.

    Without any normalization layer in ``trace`` that is every layer with a weight matrix that ran.

    Raises:
        ValueError: when nothing ran, or no layer with a weight matrix runs after the last
            normalization layer.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
        >>> with record_execution(net) as trace:
        ...     _ = net(torch.randn(2, 1, 5, 5))
        >>> select_constrained_layers(net, trace)
        ['4']
    """
    if not trace.events:
        raise ValueError(
            f"no forward pass of {type(model).__name__} was recorded: run the model inside record_execution"
        )
    modules = dict(model.named_modules())
    last_norm_end = -1
    for index, (kind, name) in enumerate(trace.events):
        if kind == "end" and is_norm_layer(modules[name]):
            last_norm_end = index
    chosen: dict[str, None] = {}
    for kind, name in trace.events[last_norm_end + 1 :]:
        if kind != "start":
            continue
        # A module that starts after the last norm brings its whole subtree: submodules whose
        # weights it uses without calling them (MultiheadAttention's out_proj) never fire a hook.
        for sub_name, sub in modules[name].named_modules(prefix=name):
            if not is_aux(sub_name) and weight_matrices(sub):
                chosen.setdefault(sub_name, None)
    if not chosen:
        norms = [n for n in trace.ran() if is_norm_layer(modules[n])]
        raise ValueError(
            f"no layer with a trainable weight matrix runs after the last normalization layer "
            f"('{norms[-1] if norms else None}') of {type(model).__name__}: nothing to constrain. "
            "Pass the layers to constrain explicitly (layers=['head'] or a pattern such as 'blocks.11.*')"
        )
    return list(chosen)


def non_homogeneous_activations(model: nn.Module, trace: ExecutionTrace, layers: Sequence[str]) -> list[str]:
    """Names of non-homogeneous activation modules that run inside the constrained part.

    The constrained part is from the start of the first of ``layers`` to the end of the last one.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> with record_execution(net) as trace:
        ...     _ = net(torch.randn(2, 4))
        >>> non_homogeneous_activations(net, trace, ["0", "2"])
        ['1']
    """
    wanted = set(layers)
    positions = [i for i, (_, name) in enumerate(trace.events) if name in wanted]
    if not positions:
        return []
    modules = dict(model.named_modules())
    found: dict[str, None] = {}
    for kind, name in trace.events[positions[0] : positions[-1] + 1]:
        if kind == "start" and is_non_homogeneous_activation(modules[name]):
            found.setdefault(name, None)
    return list(found)


def match_layers(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Module names of ``model`` matched by ``patterns`` (exact names or ``fnmatch`` patterns) that
    hold a weight matrix, in ``model.named_modules()`` order.

    Raises:
        ValueError: when a pattern matches no module with a weight matrix; the message lists them.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
        >>> match_layers(net, ["*"])
        ['0', '2']
        >>> match_layers(net, ["2"])
        ['2']
    """
    if isinstance(patterns, str):
        raise TypeError(f"layers must be a list of names or patterns, got the string '{patterns}': use ['{patterns}']")
    candidates = [name for name, m in model.named_modules() if not is_aux(name) and weight_matrices(m)]
    chosen: dict[str, None] = {}
    for pattern in patterns:
        hits = [name for name in candidates if name == pattern or fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            shown = ", ".join(candidates[:40]) + (" ..." if len(candidates) > 40 else "")
            raise ValueError(
                f"layer pattern '{pattern}' matches no layer with a trainable weight matrix in "
                f"{type(model).__name__} (biases and normalization layers are never constrained); "
                f"layers that can be constrained: {shown or 'none'}"
            )
        for name in hits:
            chosen.setdefault(name, None)
    return list(chosen)


def find_constrained_layers(model: nn.Module, *args: Any, **kwargs: Any) -> list[str]:
    """Run ``model(*args, **kwargs)`` once and return the layers LAWN would constrain.

    The pass runs under ``torch.no_grad()`` in eval mode (so BatchNorm statistics do not move);
    the model's train/eval flags are restored afterwards.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        >>> find_constrained_layers(cnn, torch.randn(2, 1, 5, 5))
        ['5']
        >>> mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> find_constrained_layers(mlp, torch.randn(2, 4))
        ['0', '2']
    """
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), record_execution(model) as trace:
            model(*args, **kwargs)
    finally:
        for module, training in flags.items():
            module.training = training
    return select_constrained_layers(model, trace)

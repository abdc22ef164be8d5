"""Find a model's classifier head and capture what flows through it: the logit tap.

The *logit tap* is how every method in this library sees a model without changing it: forward
hooks on the classifier head record the features entering it and the logits leaving it, and hooks
on named layers record intermediate outputs. Hooks sit on the inner modules, so they keep working
when Lightning wraps the model in ``DistributedDataParallel``.

Modules that this library adds to a user's model (auxiliary heads) live under the attribute
:data:`AUX_ATTRIBUTE`; the head search skips them, so "the last Linear" stays the user's head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

AUX_ATTRIBUTE = "lightning_logits_aux"
"""Name of the ``nn.ModuleDict`` on a LightningModule that holds modules added by callbacks.

Every network reader of the package (head search, layer tracing) skips what is under it; get or
create it with :func:`aux_modules`.

Example:
    >>> import torch
    >>> module = torch.nn.Sequential(torch.nn.Linear(4, 3))
    >>> aux_modules(module)["extra_head"] = torch.nn.Linear(4, 3)
    >>> AUX_ATTRIBUTE, isinstance(getattr(module, AUX_ATTRIBUTE), torch.nn.ModuleDict)
    ('lightning_logits_aux', True)
"""

_TORCHVISION_HEAD_NAMES = ("fc", "classifier", "heads", "head", "last_linear")
_PARAMETERIZED_HEADS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LazyLinear)


def is_aux(name: str) -> bool:
    """Whether the module at dotted path ``name`` was added by this library (under :data:`AUX_ATTRIBUTE`).

    The one rule every network reader uses: such modules are never a model's head, never a LAWN
    layer, never a default feature layer.

    Example:
        >>> is_aux("lightning_logits_aux.uskd"), is_aux("model.fc"), is_aux("model.lightning_logits_aux_x")
        (True, False, False)
    """
    return AUX_ATTRIBUTE in name.split(".")


def _module_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise LookupError(f"{type(target).__name__} is not a submodule of {type(root).__name__}")


def _last_parameterized(
    module: nn.Module, prefix: str, kinds: tuple[type[nn.Module], ...] = _PARAMETERIZED_HEADS
) -> tuple[str, nn.Module] | None:
    """The last module of one of ``kinds`` inside ``module`` (itself if it is one)."""
    found: tuple[str, nn.Module] | None = None
    for name, sub in module.named_modules(prefix=prefix):
        if isinstance(sub, kinds) and not is_aux(name):
            found = (name, sub)
    return found


def _candidates(model: nn.Module) -> list[str]:
    return [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if name and isinstance(m, _PARAMETERIZED_HEADS) and not is_aux(name)
    ]


def find_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name``, with an error that lists what exists.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> find_module(net, "2")
        Linear(in_features=8, out_features=3, bias=True)
    """
    try:
        return model.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n and not is_aux(n)]
        shown = ", ".join(names[:40]) + (" ..." if len(names) > 40 else "")
        raise LookupError(f"no module named '{name}' in {type(model).__name__}; its modules are: {shown}") from None


def find_classifier(model: nn.Module, head: str | None = None) -> tuple[str, nn.Module]:
    """Locate the classifier head of ``model``: the layer whose output is the logits.

    The search order is: the dotted path ``head`` when given; timm's ``get_classifier()`` on the
    model or its first submodule that has it; torchvision's ``fc``/``classifier``/``heads``/``head``
    attributes (the last Linear inside them when they are containers); the last ``nn.Linear``.
    Modules under :data:`AUX_ATTRIBUTE` are never chosen.

    Args:
        model: any ``nn.Module``, a LightningModule included.
        head: optional dotted path of the head, relative to ``model``.

    Returns:
        ``(name, module)``: the head's dotted path in ``model`` and the module.

    Raises:
        LookupError: when no head can be found; the message lists the candidates.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> find_classifier(net)[0]
        '2'
    """
    if head is not None:
        module = find_module(model, head)
        return head, module

    for name, sub in model.named_modules():
        if is_aux(name):
            continue
        get_classifier = getattr(sub, "get_classifier", None)
        if callable(get_classifier):
            classifier = get_classifier()
            if isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Identity):
                inner = _last_parameterized(classifier, _module_name(model, classifier))
                if inner is not None:
                    return inner
            break

    for prefix, sub in [("", model), *list(model.named_children())]:
        if is_aux(prefix):
            continue
        for attr in _TORCHVISION_HEAD_NAMES:
            candidate = getattr(sub, attr, None)
            if isinstance(candidate, nn.Module):
                path = f"{prefix}.{attr}" if prefix else attr
                inner = _last_parameterized(candidate, path)
                if inner is not None:
                    return inner

    # Convolutions count as heads only inside a named head container (SqueezeNet's classifier).
    last = _last_parameterized(model, "", (nn.Linear, nn.LazyLinear))
    if last is not None and last[0]:
        return last
    raise LookupError(
        f"no classifier head found in {type(model).__name__}: no get_classifier(), no fc/classifier/"
        f"head attribute and no nn.Linear. Parameterized layers seen: {_candidates(model) or 'none'}. "
        "Pass the head's dotted module path (e.g. head='model.fc')."
    )


def count_classes(model: nn.Module, head: str | None = None) -> int | None:
    """Classes predicted by ``model``: its head's ``out_features``, else a ``num_classes`` attribute, else ``None``.

    The one class-count rule of the library: what the network outputs (its head) wins over what a
    module says of itself; a module whose head cannot be found may still declare ``num_classes``.

    Args:
        model: any ``nn.Module``.
        head: dotted path of the head when it cannot be found automatically.

    Example:
        >>> from torch import nn
        >>> count_classes(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
        3
    """
    try:
        _, module = find_classifier(model, head)
    except LookupError:
        module = None
    for attr in ("out_features", "out_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    value = getattr(model, "num_classes", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def first_tensor(output: Any) -> Tensor:
    """The logits in what a network returned: a tensor, ``output.logits``, or the first element of a tuple.

    Example:
        >>> import torch
        >>> first_tensor((torch.zeros(2, 3), "aux")).shape
        torch.Size([2, 3])
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"the network returned {type(output).__name__}; it must return logits [N, C]")


class LogitTap:
    """Capture the features entering a model's head, its logits, and named intermediate outputs.

    Hooks are registered once at construction and record only inside :meth:`capture`, so
    validation passes and other code cost nothing. Each forward pass inside one ``capture`` block
    appends one entry, so a step that runs the model twice (replay) sees both, in order.

    Args:
        model: the module to watch (a LightningModule, a timm model, ...).
        head: dotted path of the classifier head; found with :func:`find_classifier` when ``None``.
        layers: dotted paths of intermediate modules whose outputs to record.
        require_head: raise when no head is found (default); with ``False`` the tap records only
            the named layers, ``head`` is ``None`` and ``head_error`` says why.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> tap = LogitTap(net, layers=["1"])
        >>> with tap.capture():
        ...     _ = net(torch.randn(5, 4))
        >>> tap.features[0].shape, tap.logits[0].shape, tap.outputs["1"][0].shape
        (torch.Size([5, 8]), torch.Size([5, 3]), torch.Size([5, 8]))
        >>> tap.remove()
    """

    def __init__(
        self, model: nn.Module, head: str | None = None, layers: Sequence[str] = (), require_head: bool = True
    ) -> None:
        self.model = model
        self.head_name: str | None = None
        self.head: nn.Module | None = None
        self.head_error: LookupError | None = None
        self.features: list[Tensor] = []
        self.logits: list[Tensor] = []
        self.outputs: dict[str, list[Any]] = {}
        self._active = False
        self._handles: list[Any] = []
        try:
            self.head_name, self.head = find_classifier(model, head)
        except LookupError as err:
            if require_head:
                raise
            self.head_error = err  # layer outputs can still be recorded; logits must come from elsewhere
        if self.head is not None:
            self._handles.append(self.head.register_forward_hook(self._head_hook))
        for layer in layers:
            self.add_layer(layer)

    def add_layer(self, name: str) -> None:
        """Also record the output of the module at dotted path ``name``."""
        if name in self.outputs:
            return
        module = find_module(self.model, name)
        self.outputs[name] = []

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            if self._active:
                self.outputs[name].append(output)

        self._handles.append(module.register_forward_hook(hook))

    def _head_hook(self, _module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self._active:
            self.features.append(args[0])
            self.logits.append(output)

    def clear(self) -> None:
        """Drop everything recorded so far."""
        self.features.clear()
        self.logits.clear()
        for values in self.outputs.values():
            values.clear()

    def capture(self) -> LogitTap:
        """Record forward passes inside the ``with`` block (earlier records are cleared): ``with tap.capture():``."""
        return self

    def __enter__(self) -> LogitTap:
        self.clear()
        self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._active = False

    def record_pass(self, run: Callable[[], Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Call ``run()`` with recording on, keeping what was recorded before; its ``(features, logits)``.

        For a second forward pass in a step (a replayed batch): the step's own records stay first,
        and the same hook serves both passes (one hook call per head call, not one per user).
        Returns the features and logits the head saw during ``run()``, in order.
        """
        start, active = len(self.logits), self._active
        self._active = True
        try:
            run()
        finally:
            self._active = active
        return self.features[start:], self.logits[start:]

    def remove(self) -> None:
        """Remove every hook; the model is as it was before the tap."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()


def aux_modules(model: nn.Module) -> nn.ModuleDict:
    """The ``nn.ModuleDict`` under :data:`AUX_ATTRIBUTE` on ``model``, created when missing.

    Callbacks put the modules they add (auxiliary heads) here, during ``setup``: they then train
    with the model's optimizer, are saved in its checkpoints, and are never mistaken for its head.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
        >>> aux_modules(model)["weak_head"] = torch.nn.Linear(4, 3)  # added after the real head
        >>> find_classifier(model)[0], [n for n, _ in model.named_children()]
        ('1', ['0', '1', 'lightning_logits_aux'])
    """
    existing = getattr(model, AUX_ATTRIBUTE, None)
    if isinstance(existing, nn.ModuleDict):
        return existing
    container = nn.ModuleDict()
    model.add_module(AUX_ATTRIBUTE, container)
    return container

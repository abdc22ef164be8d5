"""Build or load the networks that methods train or consult: models by name, graph experts, teachers.

Pure PyTorch, no Lightning, and no import of the LightningModules: a teacher saved as a
:class:`~lightning_logits.modules.Classifier` checkpoint is rebuilt from the checkpoint's
hyperparameters and weights.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_logits.networks.causal_lm import build_causal_lm

__all__ = [
    "TORCHVISION_PREFIX",
    "build_expert",
    "build_model",
    "check_checkpoint",
    "load_teacher",
    "teacher_fingerprint",
]

TORCHVISION_PREFIX = "torchvision/"
"""Model names starting with it are torchvision models (``"torchvision/resnet18"``); others are timm names.

Example:
    >>> net = build_model(TORCHVISION_PREFIX + "resnet18", num_classes=10)
    >>> type(net).__module__
    'torchvision.models.resnet'
"""


def build_model(model: str | nn.Module, num_classes: int | None, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Create a model from a timm name, ``"torchvision/<name>"``, or pass an ``nn.Module`` through.

    Args:
        model: timm model name (``"resnet18"``, ``"vit_tiny_patch16_224"``), a torchvision model
            name prefixed with ``"torchvision/"``, or a ready ``nn.Module``.
        num_classes: classes of the new head (ignored for a ready module).
        pretrained: load pretrained weights (timm/torchvision download them: off by default).
        **kwargs: passed to the model factory (``in_chans=1``, ``img_size=32``, ...).

    Example:
        >>> net = build_model("resnet18", num_classes=10, in_chans=1)
        >>> net.get_classifier().out_features
        10
    """
    if isinstance(model, nn.Module):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a model name or an nn.Module, got {type(model).__name__}")
    if num_classes is None:
        raise ValueError(f"num_classes is required to build '{model}' by name")
    if model.startswith(TORCHVISION_PREFIX):
        import torchvision

        name = model[len(TORCHVISION_PREFIX) :]
        weights = "DEFAULT" if pretrained else None
        return torchvision.models.get_model(name, weights=weights, num_classes=num_classes, **kwargs)
    import timm

    if not timm.is_model(model):
        close = timm.list_models(f"*{model}*")[:10]
        raise ValueError(
            f"'{model}' is not a timm model name (similar: {close or 'none'}); for torchvision "
            f"use '{TORCHVISION_PREFIX}<name>', or pass an nn.Module"
        )
    return timm.create_model(model, pretrained=pretrained, num_classes=num_classes, **kwargs)


def build_expert(
    name: str,
    num_features: int,
    num_classes: int,
    hidden: int = 64,
    num_layers: int = 2,
    dropout: float = 0.5,
    batch_norm: bool = True,
    norm: Literal["batch"] | None = None,
) -> nn.Module:
    """An expert by name: ``"mlp"`` (Linear -> BatchNorm -> ReLU -> dropout, ..., Linear; without the
    BatchNorm when ``batch_norm=False``) or a GNN of
    :mod:`torch_geometric.nn.models`: ``"gcn"`` (GCN), ``"sage"`` (GraphSAGE), ``"gat"`` (GAT), ``"gin"`` (GIN).
    ``norm="batch"`` puts a BatchNorm after each hidden GNN layer (as in the Mowst authors' GNNs);
    ``batch_norm`` is the MLP's.

    Example:
        >>> import torch
        >>> gnn = build_expert("sage", num_features=5, num_classes=3, hidden=8)
        >>> gnn(torch.randn(4, 5), torch.tensor([[0, 1], [1, 0]])).shape
        torch.Size([4, 3])
    """
    from torch_geometric.nn import models

    if name == "mlp":
        return models.MLP(
            in_channels=num_features,
            hidden_channels=hidden,
            out_channels=num_classes,
            num_layers=num_layers,
            dropout=dropout,
            norm="batch_norm" if batch_norm else None,
        )
    factories = {"gcn": models.GCN, "sage": models.GraphSAGE, "gat": models.GAT, "gin": models.GIN}
    if name not in factories:
        raise ValueError(f"unknown expert {name!r}: use one of {('mlp', *factories)} or pass an nn.Module")
    if norm not in (None, "batch"):
        raise ValueError(f"norm must be None or 'batch', got {norm!r}")
    extra = {"norm": "batch_norm"} if norm == "batch" else {}
    return factories[name](num_features, hidden, num_layers, num_classes, dropout=dropout, **extra)


def load_teacher(
    teacher: str | nn.Module,
    checkpoint: str | None = None,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build a teacher network from a module, a model name plus weights, or a ``Classifier`` checkpoint.

    Args:
        teacher: an ``nn.Module`` (returned as is); the path of a checkpoint of our
            :class:`~lightning_logits.modules.Classifier` or :class:`~lightning_logits.modules.CausalLM`
            (a ``.ckpt`` that Lightning saved: the wrapped network is returned, a causal LM rebuilt
            from the config it recorded); a timm model name / ``"torchvision/<name>"``; or
            ``"hf:<name or directory>"``, a Hugging Face causal LM loaded with
            ``AutoModelForCausalLM.from_pretrained`` (``model_kwargs`` are its keyword arguments,
            e.g. ``{"dtype": "bfloat16"}``).
        checkpoint: weights for a model name: a plain ``state_dict`` file or a Lightning
            checkpoint of a ``Classifier`` (its ``model.`` prefix is stripped). ``None``: random
            weights (only useful for speed tests).
        num_classes: classes of a model built by name.
        model_kwargs: keyword arguments of the model factory (``{"in_chans": 1}``).

    Returns:
        The network (in train mode as built; callers freeze it).

    Example:
        >>> net = load_teacher("resnet10t", num_classes=10, model_kwargs={"in_chans": 1})
        >>> net.get_classifier().out_features
        10
    """
    if isinstance(teacher, nn.Module):
        return teacher
    if not isinstance(teacher, str):
        raise TypeError(
            f"teacher must be an nn.Module, a model name or a checkpoint path, got {type(teacher).__name__}"
        )
    if teacher.startswith("hf:"):
        if checkpoint is not None:
            raise ValueError(
                f"teacher={teacher!r} loads its weights with from_pretrained; checkpoint={checkpoint!r} would be "
                "ignored: give a local directory as 'hf:<directory>' instead"
            )
        return build_causal_lm(teacher[len("hf:") :], model_kwargs)
    path = Path(teacher)
    if path.is_dir():
        raise IsADirectoryError(_directory_message(path, "teacher"))
    if path.suffix == ".ckpt" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"teacher checkpoint '{teacher}' does not exist; train the teacher first")
        return _network_from_classifier_checkpoint(path)
    net = build_model(teacher, num_classes, **(model_kwargs or {}))
    if checkpoint is not None:
        state = _read_checkpoint(Path(checkpoint))
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise TypeError(f"'{checkpoint}' holds a {type(state).__name__}, not a state_dict")
        if state and all(key.startswith("model.") for key in state if not key.startswith(("val_", "test_", "train_"))):
            state = {key[len("model.") :]: value for key, value in state.items() if key.startswith("model.")}
        net.load_state_dict(state)
    return net


def teacher_fingerprint(teacher: nn.Module) -> str:
    """A short SHA-1 of the teacher's parameters and buffers, to tell two teachers apart on resume.

    Example:
        >>> from torch import nn
        >>> net = nn.Linear(2, 2)
        >>> teacher_fingerprint(net) == teacher_fingerprint(net)
        True
    """
    digest = hashlib.sha1()
    for name, tensor in teacher.state_dict().items():
        digest.update(name.encode())
        if isinstance(tensor, Tensor):
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_checkpoint(path: str | Path) -> Path:
    """Check that a checkpoint file is whole before it is loaded; return its path.

    ``torch.save`` writes a zip archive with a CRC-32 checksum per record, but ``torch.load`` does
    not compare them: a checkpoint whose bytes changed after it was written (an interrupted copy
    that was padded, a bad disk or transfer) loads without a word and training resumes from wrong
    weights. This reads every record once and compares its checksum (about as long as reading the
    file), and names the file, what is wrong, and the other checkpoints of its folder, newest first.
    Call it before ``trainer.fit(..., ckpt_path=path)``; ``lightning-logits fit --ckpt_path`` and
    teacher checkpoints (:func:`load_teacher`) are checked with it. A legacy (non-zip) ``torch.save``
    file carries no checksums: it passes unchecked.

    Args:
        path: the ``.ckpt``/``.pt`` file.

    Raises:
        FileNotFoundError: no such file.
        IsADirectoryError: ``path`` is a directory (a sharded checkpoint folder is not checked here).
        ValueError: the file is empty, truncated, not a checkpoint, or a record fails its checksum.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     good = Path(tmp) / "good.ckpt"
        ...     torch.save({"w": torch.ones(3)}, good)
        ...     cut = Path(tmp) / "cut.ckpt"
        ...     _ = cut.write_bytes(good.read_bytes()[:100])  # killed while being copied
        ...     check_checkpoint(good) == good
        ...     try:
        ...         check_checkpoint(cut)
        ...     except ValueError as err:
        ...         print(str(err).split(";")[0].replace(tmp, "..."))
        True
        '.../cut.ckpt' is not a readable checkpoint (truncated, or not a torch checkpoint: File is not a zip file)
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(_directory_message(path, "checkpoint"))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; fix the path{_others(path)}")
    with open(path, "rb") as file:
        head = file.read(2)
    if not zipfile.is_zipfile(path):
        if len(head) == 2 and head[0] == 0x80:  # a legacy pickle-format torch.save: no checksums to compare
            return path
        reason = "an empty file" if not head else "File is not a zip file"
        raise ValueError(
            f"'{path}' is not a readable checkpoint (truncated, or not a torch checkpoint: {reason}); it may have "
            f"been cut off while it was written or copied: re-save it or point to another file{_others(path)}"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                crc = 0
                with archive.open(info) as record:
                    while chunk := record.read(1 << 24):
                        crc = zlib.crc32(chunk, crc)
                if crc != info.CRC:
                    raise zipfile.BadZipFile(f"Bad CRC-32 for file {info.filename!r}")
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise ValueError(
            f"'{path}' is not a readable checkpoint ({type(err).__name__}: {err}): its bytes changed after it was "
            f"written (a bad copy, transfer or disk); it cannot be trusted: point to another file{_others(path)}"
        ) from None
    return path


def _others(path: Path) -> str:
    """`` (other checkpoints in its folder, newest first: ...)`` or an empty string."""
    try:
        found = [p for p in path.parent.glob("*.ckpt") if p.is_file() and p.resolve() != path.resolve()]
    except OSError:
        return ""
    found = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)[:3]
    return f" (other checkpoints in its folder, newest first: {', '.join(map(str, found))})" if found else ""


def _read_checkpoint(path: Path) -> Any:
    """``torch.load`` of a checkpoint file, with errors that name the file and what is wrong with it."""
    if path.is_dir():
        raise IsADirectoryError(_directory_message(path, "checkpoint"))
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist; train the teacher first or fix the path")
    check_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(
            f"'{path}' is not a readable checkpoint ({type(err).__name__}: {reason}); "
            "the file may be truncated or not a torch checkpoint: re-save it or point to another file"
        ) from None


def _directory_message(path: Path, what: str) -> str:
    found = sorted(str(p) for pattern in ("*.ckpt", "*.pt", "*.pth") for p in path.glob(pattern))[:3]
    hint = f" (it holds {', '.join(found)})" if found else ""
    return f"{what} '{path}' is a directory, not a checkpoint file: pass the path of a .ckpt/.pt file{hint}"


def _network_from_classifier_checkpoint(path: Path) -> nn.Module:
    """The network inside a Lightning checkpoint of :class:`~lightning_logits.modules.Classifier` or ``CausalLM``.

    Rebuilt from the checkpoint's hyperparameters (``model``, ``num_classes``, ``model_kwargs``; a
    ``CausalLM``'s ``model`` is a ``transformers`` config dict, or a name, and it has no
    ``num_classes``) and its ``model.*`` weights, without importing the LightningModule (networks sit below modules).
    """
    ckpt = _read_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or not isinstance(state, dict) or "model" not in hparams:
        raise ValueError(
            f"'{path}' is not a checkpoint of lightning_logits' Classifier or CausalLM (no 'hyper_parameters' with "
            "'model'); "
            "for another network pass teacher=<timm name> with checkpoint=<weights file>, or an nn.Module"
        )
    model = hparams["model"]
    if not isinstance(model, str | Mapping):
        raise ValueError(
            f"'{path}' was saved from a Classifier that wrapped a module object ({type(model).__name__}), which a "
            "checkpoint cannot rebuild: pass that nn.Module as the teacher and load the weights yourself"
        )
    kwargs = dict(hparams.get("model_kwargs") or {})  # Classifier stores its merged factory kwargs here
    if isinstance(model, Mapping) or "num_classes" not in hparams:
        # a CausalLM checkpoint: its model is a transformers config dict (or a model name)
        net = build_causal_lm(model, kwargs)
    else:
        net = build_model(model, hparams.get("num_classes"), **kwargs)
    weights = {key[len("model.") :]: value for key, value in state.items() if key.startswith("model.")}
    net.load_state_dict(weights)
    return net

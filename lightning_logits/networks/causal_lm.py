"""Build and call causal language models: Hugging Face ``transformers`` models or any module taking token ids.

``transformers`` is imported only when a model is built from a name or a config (the ``lm`` extra:
``pip install 'lightning-logits[lm]'``); calling a model you built yourself needs nothing more.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_logits.networks.heads import first_tensor

__all__ = ["build_causal_lm", "causal_lm_head", "causal_lm_hidden_states", "causal_lm_logits"]

_INPUT_NAMES = ("input_ids", "attention_mask", "position_ids")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - the dev extra installs it
        raise ImportError(
            "building a causal LM from a name or a config needs Hugging Face transformers: "
            "pip install 'lightning-logits[lm]' (or pass an nn.Module you built yourself)"
        ) from err
    return transformers


def build_causal_lm(model: Any, model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """A causal LM from a module, a ``transformers`` config (object or dict), or a model name.

    Args:
        model: an ``nn.Module`` (returned as is, e.g. an ``AutoModelForCausalLM`` instance); a
            ``transformers.PretrainedConfig`` or a dict with its ``model_type`` and fields (built
            with ``AutoModelForCausalLM.from_config``: random weights, no download); or a model
            name or local directory (``AutoModelForCausalLM.from_pretrained``: needs the weights,
            i.e. internet or a local copy).
        model_kwargs: keyword arguments of ``from_config``/``from_pretrained``
            (``{"dtype": "bfloat16"}``, ``{"attn_implementation": "sdpa"}``).

    Returns:
        The model, in the mode ``transformers`` builds it (``from_pretrained`` gives eval mode;
        Lightning puts a trained module in train mode).

    Example:
        >>> net = build_causal_lm({"model_type": "llama", "vocab_size": 64, "hidden_size": 16,
        ...                        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2})
        >>> type(net).__name__, net.get_output_embeddings().out_features
        ('LlamaForCausalLM', 64)
    """
    if isinstance(model, nn.Module):
        return model
    kwargs = dict(model_kwargs or {})
    transformers = _transformers()
    if isinstance(model, str):
        return transformers.AutoModelForCausalLM.from_pretrained(model, **kwargs)
    if isinstance(model, Mapping):
        fields = dict(model)
        model_type = fields.pop("model_type", None)
        if not isinstance(model_type, str):
            raise ValueError(
                "a causal LM config given as a dict needs its 'model_type' (e.g. 'llama', 'gpt2', 'qwen2'), "
                f"got keys {sorted(model)}"
            )
        config = transformers.AutoConfig.for_model(model_type, **fields)
    elif isinstance(model, transformers.PretrainedConfig):
        config = model
    else:
        raise TypeError(
            "model must be an nn.Module, a transformers config (object or dict with 'model_type') or a model "
            f"name, got {type(model).__name__}"
        )
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs)


def _accepted_keywords(model: nn.Module) -> tuple[set[str], bool]:
    """The names ``model.forward`` accepts, and whether it takes ``**kwargs``.

    A ``torch.compile``d module (``forward(*args, **kwargs)``) is read through to the module it wraps.
    """
    inner = getattr(model, "_orig_mod", model)
    try:
        parameters = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return set(), True
    names = set(parameters)
    var_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return names, var_keyword


def causal_lm_logits(model: nn.Module, inputs: Mapping[str, Tensor | None]) -> Tensor:
    """``[B, T, V]`` logits of ``model`` on keyword inputs (``input_ids``, ``attention_mask``, ``position_ids``).

    A model whose ``forward`` names ``input_ids`` (every ``transformers`` causal LM, and
    :class:`~lightning_logits.modules.CausalLM`) gets the inputs it accepts by keyword, plus
    ``use_cache=False`` when it has that argument: training needs no key/value cache, and
    ``transformers`` isolates packed documents (per-document ``position_ids``, no
    ``attention_mask``) only without one. Any other module is called as ``model(input_ids)``.
    The logits are read off a tensor, a ``.logits`` attribute or a tuple's first element.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
        >>> causal_lm_logits(net, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}).shape
        torch.Size([2, 3, 10])
    """
    input_ids = inputs.get("input_ids")
    if not isinstance(input_ids, Tensor):
        raise ValueError(f"causal_lm_logits needs an 'input_ids' tensor [B, T], got keys {sorted(inputs)}")
    kwargs = _keyword_inputs(model, inputs)
    if kwargs is None:
        return first_tensor(model(input_ids))
    return first_tensor(model(**kwargs))


def _keyword_inputs(model: nn.Module, inputs: Mapping[str, Tensor | None]) -> dict[str, Any] | None:
    """The keyword arguments ``model.forward`` accepts of ``inputs`` (``use_cache=False`` added), or ``None``
    for a module whose ``forward`` takes no ``input_ids``."""
    names, var_keyword = _accepted_keywords(model)
    if "input_ids" not in names:
        return None
    kwargs: dict[str, Any] = {
        key: value
        for key, value in inputs.items()
        if key in _INPUT_NAMES and value is not None and (key in names or var_keyword)
    }
    if "use_cache" in names:
        kwargs["use_cache"] = False
    return kwargs


def causal_lm_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``(base model, LM head)`` of a Hugging Face causal LM: the body whose last hidden states enter the head.

    The base is ``model.base_model`` (``LlamaModel`` in ``LlamaForCausalLM``, ``GPT2Model`` in
    ``GPT2LMHeadModel``) and the head ``model.get_output_embeddings()``, an ``nn.Linear`` ``[V, H]``
    (for tied embeddings its weight is the input embedding's). What a fused loss needs to compute
    the logits chunk by chunk instead of all at once; that they really are ``F.linear(hidden,
    head.weight, head.bias)`` is checked by :func:`causal_lm_hidden_states` with ``check=True``.

    Raises:
        LookupError: for a model that exposes no separate base model or no linear output embedding,
            naming what was found.

    Example:
        >>> net = build_causal_lm({"model_type": "llama", "vocab_size": 64, "hidden_size": 16,
        ...                        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2})
        >>> base, head = causal_lm_head(net)
        >>> type(base).__name__, tuple(head.weight.shape)
        ('LlamaModel', (64, 16))
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its original module
    name = type(model).__name__
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(base, nn.Module) or base is model:
        raise LookupError(
            f"{name} exposes no base model (`model.base_model`, as Hugging Face causal LMs do) whose last hidden "
            "states enter its head, so the fused loss cannot compute its logits chunk by chunk; use logits='full' "
            "(the fused path needs a transformers AutoModelForCausalLM)"
        )
    if not isinstance(head, nn.Linear) or head.weight.ndim != 2:
        raise LookupError(
            f"{name}.get_output_embeddings() gave {type(head).__name__}, not an nn.Linear [V, H] LM head, so the "
            "fused loss cannot compute its logits chunk by chunk; use logits='full'"
        )
    return base, head


def causal_lm_hidden_states(
    model: nn.Module, inputs: Mapping[str, Tensor | None], check: bool = False
) -> tuple[Tensor, nn.Linear]:
    """``([B, T, H] last hidden states, LM head)`` of a Hugging Face causal LM: everything but the logits.

    ``F.linear(hidden, head.weight, head.bias)`` are the model's logits; a fused loss
    (:func:`~lightning_logits.functional.fused_linear_cross_entropy`) takes ``hidden`` and the
    head's weight instead, so the ``[B, T, V]`` logits are never built. The base model gets the
    keyword inputs as in :func:`causal_lm_logits`.

    Args:
        model: a ``transformers`` causal LM (see :func:`causal_lm_head`).
        inputs: ``input_ids`` ``[B, T]`` and optionally ``attention_mask``/``position_ids``.
        check: also run the whole model, in eval mode and without gradients, on the first row's first
            (at most 8) tokens and compare its logits with ``F.linear(hidden, weight, bias)``: a model
            that changes its logits after the head (soft-capping, a logit scale) is refused with a
            ``ValueError``. Reads values on the host: once, not every step.

    Example:
        >>> import torch
        >>> net = build_causal_lm({"model_type": "llama", "vocab_size": 64, "hidden_size": 16,
        ...                        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2})
        >>> hidden, head = causal_lm_hidden_states(net, {"input_ids": torch.randint(0, 64, (2, 5))}, check=True)
        >>> hidden.shape, head.out_features
        (torch.Size([2, 5, 16]), 64)
    """
    base, head = causal_lm_head(model)
    if not isinstance(inputs.get("input_ids"), Tensor):
        raise ValueError(f"causal_lm_hidden_states needs an 'input_ids' tensor [B, T], got keys {sorted(inputs)}")
    kwargs = _keyword_inputs(base, inputs)
    if kwargs is None:
        raise LookupError(f"{type(base).__name__}.forward takes no input_ids; use logits='full'")
    hidden = _last_hidden_state(base(**kwargs), base)
    if check:
        _check_head_gives_the_logits(model, base, head, {k: v for k, v in inputs.items() if v is not None})
    return hidden, head


def _last_hidden_state(output: Any, base: nn.Module) -> Tensor:
    """``last_hidden_state`` of a base model's output (a ``transformers`` output, a tuple or a tensor)."""
    value = getattr(output, "last_hidden_state", None)
    if value is None and isinstance(output, tuple | list) and output:
        value = output[0]
    if value is None and isinstance(output, Tensor):
        value = output
    if not isinstance(value, Tensor) or value.ndim != 3:
        raise TypeError(
            f"{type(base).__name__} returned {type(output).__name__}, with no [B, T, H] last_hidden_state; the "
            "fused loss needs the hidden states entering the LM head (use logits='full')"
        )
    return value


def _check_head_gives_the_logits(model: nn.Module, base: nn.Module, head: nn.Linear, inputs: dict[str, Tensor]) -> None:
    """Refuse a model whose logits are not ``F.linear(last hidden state, head)`` (a probe on a few tokens)."""
    length = min(8, inputs["input_ids"].shape[1])
    # no attention mask: a left-padded row's first tokens may all be masked (NaN logits); the head is the same
    probe = {key: value[:1, :length] for key, value in inputs.items() if key in ("input_ids", "position_ids")}
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            full = causal_lm_logits(model, probe).float()
            hidden = _last_hidden_state(base(**(_keyword_inputs(base, probe) or {})), base)
            mine = F.linear(hidden, head.weight, head.bias).float()
    finally:
        for module, mode in modes.items():
            module.training = mode
    if full.shape != mine.shape or not torch.allclose(
        full, mine, rtol=1e-3, atol=1e-3 * (1 + float(mine.nan_to_num().abs().max())), equal_nan=True
    ):
        gap = float((full - mine).abs().max()) if full.shape == mine.shape else float("nan")
        raise ValueError(
            f"{type(model).__name__}'s logits are not F.linear(last hidden state, get_output_embeddings()) (largest "
            f"difference {gap:.3g}, shapes {tuple(full.shape)} and {tuple(mine.shape)}): it transforms them after "
            "the head (logit soft-capping or scaling), which the fused loss does not do; use logits='full'"
        )

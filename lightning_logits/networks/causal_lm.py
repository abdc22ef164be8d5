"""Build and call causal language models: Hugging Face ``transformers`` models or any module taking token ids.

``transformers`` is imported only when a model is built from a name or a config (the ``lm`` extra:
``pip install 'lightning-logits[lm]'``); calling a model you built yourself needs nothing more.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_logits.networks.heads import first_tensor

__all__ = ["build_causal_lm", "causal_lm_logits"]

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
    names, var_keyword = _accepted_keywords(model)
    if "input_ids" not in names:
        return first_tensor(model(input_ids))
    kwargs: dict[str, Any] = {
        key: value
        for key, value in inputs.items()
        if key in _INPUT_NAMES and value is not None and (key in names or var_keyword)
    }
    if "use_cache" in names:
        kwargs["use_cache"] = False
    return first_tensor(model(**kwargs))

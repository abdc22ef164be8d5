"""Pack variable-length token documents into fixed-length rows with per-document position ids."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["pack_documents"]


def pack_documents(
    documents: Sequence[Tensor | Sequence[int]],
    length: int,
    pad_id: int = 0,
    ignore_index: int = -100,
    token_index: bool = False,
) -> dict[str, Tensor]:
    """Pack token documents into rows of ``length`` tokens, each document with its own positions.

    Documents are placed in order; a document that does not fit in what is left of the current
    row starts a new row, and one longer than ``length`` is cut into pieces of ``length`` tokens
    (each piece a document of its own). The rest of each row is padding: ``pad_id`` tokens whose
    labels are ``ignore_index``, with positions counting from 0 like one more document.

    Give the result to :class:`~lightning_logits.modules.CausalLM` **without** an
    ``attention_mask``: ``transformers`` causal LMs then read the document boundaries off
    ``position_ids`` (each restarts at 0) and let no token attend across them, and ``CausalLM``
    predicts no token across a boundary.

    Args:
        documents: token id sequences (1-D tensors or lists), each with at least one token.
        length: tokens per row (``>= 1``).
        pad_id: token id of the padding.
        ignore_index: label of the padding (and of nothing else).
        token_index: also return ``"token_index"``: for each position, the number of its token in
            the documents laid end to end (token ``j`` of document ``d`` is ``offsets[d] + j``, where
            ``offsets`` are the running sums of the document lengths), ``-1`` at padding. This is the
            row of a token-scale teacher-logit cache
            (:func:`~lightning_logits.teacher_cache.build_token_cache`) built on the same documents.

    Returns:
        ``{"input_ids", "labels", "position_ids"}`` (and ``"token_index"`` when asked), each
        ``[R, length]`` int64. ``labels`` equals ``input_ids`` except at padding (HF convention:
        not shifted; the module shifts).

    Example:
        >>> packed = pack_documents([[5, 6, 7], [8, 9], [4]], length=4)
        >>> packed["input_ids"].tolist()
        [[5, 6, 7, 0], [8, 9, 4, 0]]
        >>> packed["position_ids"].tolist()
        [[0, 1, 2, 0], [0, 1, 0, 0]]
        >>> packed["labels"].tolist()
        [[5, 6, 7, -100], [8, 9, 4, -100]]
        >>> pack_documents([[5, 6, 7], [8, 9], [4]], length=4, token_index=True)["token_index"].tolist()
        [[0, 1, 2, -1], [3, 4, 5, -1]]
    """
    if not (isinstance(length, int) and length >= 1):
        raise ValueError(f"length must be a positive number of tokens per row, got {length!r}")
    pieces: list[Tensor] = []
    starts: list[int] = []  # flat number of each piece's first token
    flat = 0
    for number, document in enumerate(documents):
        tokens = torch.as_tensor(document, dtype=torch.long).reshape(-1)
        if tokens.numel() == 0:
            raise ValueError(f"document {number} is empty; drop empty documents before packing")
        for piece in tokens.split(length):
            pieces.append(piece)
            starts.append(flat)
            flat += piece.numel()
    rows: list[list[tuple[Tensor, int]]] = []
    used = length  # forces a new row for the first piece
    for piece, first in zip(pieces, starts, strict=True):
        if used + piece.numel() > length:
            rows.append([])
            used = 0
        rows[-1].append((piece, first))
        used += piece.numel()
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), ignore_index, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    flat_index = torch.full((len(rows), length), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for piece, first in row:
            end = start + piece.numel()
            input_ids[r, start:end] = piece
            labels[r, start:end] = piece
            position_ids[r, start:end] = torch.arange(piece.numel())
            flat_index[r, start:end] = torch.arange(first, first + piece.numel())
            start = end
        position_ids[r, start:] = torch.arange(length - start)
    packed = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if token_index:
        packed["token_index"] = flat_index
    return packed

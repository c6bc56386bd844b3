"""Static BatchNorm's second half: :func:`recompute_bn_statistics` recomputes the running
statistics of the full model from data (the first half, training that leaves them untouched,
is :meth:`DroppableModel.set_static_bn`).

Part of :mod:`flwr_distreal.core.dropout` (import the public names from there).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from .model import DroppableModel


def recompute_bn_statistics(
    model: DroppableModel,
    batches: Iterable[Tensor | Sequence[Tensor]],
    device: str | torch.device | None = None,
) -> int:
    """Recompute the running statistics of every BatchNorm layer of the full model from data.

    HeteroFL's static BatchNorm (Diao, Ding and Tarokh, ICLR 2021, section 3, "Static Batch
    Normalization"; repository ``src/train_classifier_fed.py``, ``stats``): the running
    statistics are reset and then accumulated by a cumulative moving average (momentum
    ``None``: every batch counts equally) over one pass of training-mode forwards of the full
    model (no dropout, no fixed subsets), without gradients. The running mean of a layer is thus the mean of its per-batch means,
    and its running variance the mean of its per-batch unbiased variances. Each layer's
    momentum, its static flag and the model's training mode are restored afterwards; the
    model's dropout vector and fixed subsets are cleared (as for evaluation).

    Parameters
    ----------
    model : DroppableModel
        The model whose BatchNorm statistics are recomputed in place.
    batches : iterable
        Input batches: tensors, or ``(inputs, labels, ...)`` tuples (only ``inputs`` is used),
        e.g. one or more DataLoaders chained.
    device : str or torch.device, optional
        Where the inputs go; defaults to the device of the model's first parameter.

    Returns
    -------
    int
        The number of samples the statistics were computed from (0 when the model has no
        BatchNorm layer: then nothing is read and nothing changes).

    Raises
    ------
    ValueError
        If the model has BatchNorm layers but ``batches`` yields no sample.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    if device is None:
        device = next(model.parameters()).device
    saved = [(m, m.momentum, getattr(m, "static_stats", False), m.track_running_stats) for m in layers]
    was_training = model.training
    model.set_dropout(None)
    model.set_fixed_subsets(None)
    seen = 0
    try:
        for m in layers:
            m.track_running_stats = True
            m.reset_running_stats()
            m.momentum = None
            if hasattr(m, "static_stats"):
                m.static_stats = False
        model.train()
        with torch.no_grad():
            for batch in batches:
                inputs = batch if isinstance(batch, Tensor) else batch[0]
                if inputs.shape[0] == 0:
                    continue
                model(inputs.to(device))
                seen += int(inputs.shape[0])
    finally:
        for m, momentum, static, track in saved:
            m.momentum = momentum
            m.track_running_stats = track
            if hasattr(m, "static_stats"):
                m.static_stats = static
        model.train(was_training)
    if seen == 0:
        raise ValueError("recompute_bn_statistics: the batches yielded no sample")
    return seen

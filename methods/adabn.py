"""``adabn``: BatchNorm statistics re-estimated on the target domain.

Li, Wang, Shi, Liu, Hou, "Revisiting Batch Normalization For Practical Domain Adaptation", ICLR workshop 2017
(arXiv 1603.04779, 2016); extended as "Adaptive Batch Normalization for practical domain adaptation", Pattern
Recognition 80, 2018.

AdaBN keeps every weight of the source model and replaces the mean and variance of each BatchNorm layer by
statistics of the target data, so that every layer sees target responses normalised as source responses were.
Here: the running statistics are reset and re-accumulated over the unlabelled target-train slices with no
gradient (:func:`sfdabench.blocks.self_training.reestimate_bn_statistics`), ``epochs`` passes of shuffled batches.
The target *test* split is never seen; the adapted model is evaluated in eval mode with these statistics.

Choice: the statistics are PyTorch's cumulative average of per-batch means and variances (``momentum=None``),
the usual implementation. The paper's "statistics of all target data" per neuron would need one pass per
layer, each normalising the earlier layers with their final statistics; with shuffled batches of 16 slices
(about a million pixels per batch at 256x256) the two differ by the variance of the batch means.
"""
from __future__ import annotations

from torch import nn

from sfdabench.api import Context, Method, TargetImages
from sfdabench.hookspecs import hookimpl
from sfdabench.blocks.self_training import bn_layers, reestimate_bn_statistics


class AdaBN(Method):
    """AdaBN (Li et al., 2016/2018): BatchNorm running statistics re-estimated on target-train images."""

    name = "adabn"

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        if not bn_layers(source_model):
            raise ValueError("adabn: the segmenter has no BatchNorm layer to adapt")
        with context.phase("bn_statistics"):
            batches = reestimate_bn_statistics(source_model, target_train, context,
                                               batch_size=int(self.cfg["batch_size"]),
                                               passes=int(self.cfg["epochs"]), generator=context.generator(1))
        context.record("adabn_batches", batches)
        return source_model


@hookimpl
def sfdabench_methods():
    return [AdaBN]

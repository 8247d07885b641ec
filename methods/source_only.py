"""``source_only``: the source model applied to the target without adaptation (the lower reference)."""
from __future__ import annotations

from torch import nn

from sfdabench.api import Context, Method, TargetImages
from sfdabench.hookspecs import hookimpl


class SourceOnly(Method):
    """No adaptation: the cached source model as is (w/o adaptation row of every SFDA table)."""

    name = "source_only"
    reference = "lower"       # paired differences and the gap closed are measured from it

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        return source_model


@hookimpl
def sfdabench_methods():
    return [SourceOnly]

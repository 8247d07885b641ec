"""Example third-party plugin: BatchNorm statistics re-estimated on the target images."""
import torch
from torch import nn

from sfdabench import hookimpl
from sfdabench.api import Context, Method, TargetImages


class ExampleBNStats(Method):
    """Example plugin method: re-estimate BatchNorm running statistics on target images."""

    name = "example_bnstats"

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        for m in source_model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over all target batches
        source_model.train()
        loader = torch.utils.data.DataLoader(target_train, batch_size=int(self.cfg["batch_size"]))
        with torch.no_grad():
            for batch in loader:
                source_model(batch["image"].to(context.device))
        return source_model


@hookimpl
def sfdabench_methods():
    return [ExampleBNStats]


@hookimpl
def sfdabench_config_searchpath():
    return ["pkg://sfdabench_example_plugin.configs"]

"""Example third-party plugin: BatchNorm statistics re-estimated on the target images, with an ablation grid,
a metric (``abs_volume_error``, lower is better) and a subcommand (``sfdabench example-methods``)."""
import torch
from torch import nn

from sfdabench import hookimpl
from sfdabench.api import Ablation, Command, Context, Method, Metric, TargetImages, UsageError


class ResetAblation(Ablation):
    """Reset the running statistics before re-estimating them, or keep the source's as a prior."""

    grids = {"default": ["reset", "keep"]}
    reference = "reset"

    def settings(self, variant):
        if variant not in ("reset", "keep"):
            raise UsageError(f"unknown example_bnstats variant '{variant}'; use reset or keep")
        return {"reset": variant == "reset"}

    def columns(self, variant):
        return {"reset": variant == "reset"}

    def cells(self, variant):
        return {"running statistics": "reset" if variant == "reset" else "kept"}


class ExampleBNStats(Method):
    """Example plugin method: re-estimate BatchNorm running statistics on target images."""

    name = "example_bnstats"
    ablation = ResetAblation()

    def variant(self) -> str:
        return "reset" if self.cfg["reset"] else "keep"

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        for m in source_model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if self.cfg["reset"]:
                    m.reset_running_stats()
                    m.momentum = None  # cumulative average over all target batches
                else:
                    m.momentum = 0.5   # the source statistics stay in as a prior
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


class ExampleMethods(Command):
    """Print the methods that read target labels (a plugin's own subcommand)."""

    name = "example-methods"
    usage = "example-methods [--sfda]   the registered methods; --sfda: only the source-free ones"

    @staticmethod
    def main(args):
        from sfdabench.harness.plugins import get_registry

        if any(a not in ("--sfda",) for a in args):
            raise UsageError(f"example-methods takes only --sfda, got {' '.join(args)}")
        for name, entry in get_registry().entries["methods"].items():
            if "--sfda" not in args or not entry.obj.uses_target_labels:
                print(name)
        return 0


@hookimpl
def sfdabench_commands():
    return [ExampleMethods]


class AbsVolumeError(Metric):
    """|V_pred - V_gt| / V_gt of one organ; NaN where the organ is absent from the ground truth."""

    name = "abs_volume_error"
    label = "|dV|/V"
    higher_is_better = False
    digits = 3

    def __call__(self, pred, gt, spacing):
        v_gt = float(gt.sum())
        return abs(float(pred.sum()) - v_gt) / v_gt if v_gt else float("nan")


@hookimpl
def sfdabench_metrics():
    return [AbsVolumeError]

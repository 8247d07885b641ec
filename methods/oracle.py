"""``oracle``: supervised training on the *labelled* target-train split: an upper bound, NOT source-free.

Rows of this method carry ``sfda = False``. It starts from the same source checkpoint (``init: source``)
or from scratch (``init: scratch``) and trains with the recipe ``recipe`` names: ``source`` (default), the
source model's own recipe, so the only difference to the source model is the domain of the labels; or
``dfg``, DFG's retraining recipe, which ``box_ceiling`` uses by default (label quality vs recipe).
"""
from __future__ import annotations

from torch import nn

from sfdabench.api import Context, Method, TargetImages
from sfdabench.hookspecs import hookimpl
from sfdabench.blocks.nets import build_segmenter
from sfdabench.blocks.training import train_supervised, training_recipe


class Oracle(Method):
    """Target-supervised upper bound (uses target labels: not SFDA)."""

    name = "oracle"
    uses_target_labels = True
    reference = "upper"       # the gap closed is measured to it

    def __init__(self, cfg):
        super().__init__(cfg)
        self.recipe_name, self.recipe = training_recipe(cfg)

    def variant(self) -> str:
        recipe = "" if self.recipe_name == "source" else f"+{self.recipe_name}-recipe"
        return f"init-{self.cfg['init']}{recipe}"

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        if self.cfg["init"] == "scratch":  # the source model's architecture, whatever the training recipe
            model = build_segmenter(self.cfg["recipes"]["source"], context.num_classes).to(context.device)
        elif self.cfg["init"] == "source":
            model = source_model
        else:
            raise ValueError(f"oracle: init must be 'source' or 'scratch', got {self.cfg['init']!r}")
        with context.phase("supervised_training"):
            train_supervised(model, target_train.labelled(context.target_train_labels()), self.recipe, device=context.device,
                             generator=context.generator(), progress=context.progress, desc="oracle training")
        return model


@hookimpl
def sfdabench_methods():
    return [Oracle]

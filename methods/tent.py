"""``tent``: entropy minimisation that updates only the BatchNorm affine parameters.

Wang, Shelhamer, Liu, Olshausen, Darrell, "Tent: Fully Test-Time Adaptation by Entropy Minimization",
ICLR 2021.

As in Tent: every BatchNorm layer normalises with the statistics of the current batch (train-mode BN, running
statistics not tracked), every parameter except the BN scale and shift (gamma, beta) is frozen, and the loss is
the mean Shannon entropy of the softmax prediction over the batch's pixels. No augmentation.

Adaptation to the matched protocol:

- **Offline, on target-train.** Tent adapts online on the test stream. sfdabench adapts every method on the
  unlabelled target-*train* split and evaluates the returned model on the disjoint test split, so Tent runs
  ``iterations`` updates on shuffled target-train batches (Tent's own "offline" variant); one update per
  batch as Tent, the default 87 being one pass over the paper protocol's ~1404-slice target-train at batch 16
  (configs/method/tent.yaml states the scaling).
  Shuffling gives i.i.d. batches; slices in volume order would make each batch a thin slab of one patient.
- **Statistics at evaluation.** Tent predicts each test batch with that batch's own statistics; the harness
  evaluates every method in eval mode, and a prediction should not depend on which slices share its batch. So
  after adaptation the running statistics are re-estimated on target-train with the adapted model (the AdaBN
  pass of :func:`sfdabench.blocks.self_training.reestimate_bn_statistics`; ``eval_statistics: target``). With
  ``eval_statistics: source`` the source running statistics are kept (only gamma/beta change).
- **Optimiser.** Adam, lr 1e-3, betas (0.9, 0.999), no weight decay: the configuration of Tent's CIFAR
  experiments (official repo, ``cfgs/tent.yaml``). Tent used SGD (momentum 0.9, lr 2.5e-4 at batch 64) for
  ImageNet; ``optimizer: sgd`` with ``lr``/``momentum`` selects it.
- **Budget**: fixed ``iterations``, last model (``selection = last``); Tent does no model selection.
"""
from __future__ import annotations

from torch import nn

from sfdabench.api import Context, Method, TargetImages
from sfdabench.hookspecs import hookimpl
from sfdabench.blocks.self_training import bn_layers, reestimate_bn_statistics, softmax_entropy
from sfdabench.blocks.training import forever, loader, make_optimizer

EVAL_STATISTICS = ("target", "source")


def configure_tent(model: nn.Module) -> list[nn.Parameter]:
    """Tent's model set-up: BN in train mode without running statistics, only BN affine parameters trainable.
    Returns those parameters. (Everything else is in eval mode, so dropout, if any, stays off.)"""
    model.eval()
    params = []
    for p in model.parameters():
        p.requires_grad_(False)
    for m in bn_layers(model):
        m.train()
        m.track_running_stats = False     # batch statistics; the running buffers stay untouched
        for p in (m.weight, m.bias):
            if p is not None:
                p.requires_grad_(True)
                params.append(p)
    return params


def restore(model: nn.Module) -> None:
    """Undo :func:`configure_tent`: all parameters trainable, BN tracking its running statistics again."""
    for p in model.parameters():
        p.requires_grad_(True)
    for m in bn_layers(model):
        m.track_running_stats = True


class Tent(Method):
    """Tent (Wang et al., ICLR 2021): entropy minimisation of BN affine parameters, batch-statistics BN."""

    name = "tent"

    def variant(self) -> str:
        return f"{self.cfg['optimizer']}+{self.cfg['eval_statistics']}-stats"

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        cfg = self.cfg
        if cfg["eval_statistics"] not in EVAL_STATISTICS:
            raise ValueError(f"tent: eval_statistics must be one of {EVAL_STATISTICS}, got {cfg['eval_statistics']!r}")
        model = source_model.to(context.device)
        params = configure_tent(model)
        if not params:
            raise ValueError("tent: the segmenter has no BatchNorm affine parameters to adapt")
        opt = make_optimizer(params, cfg)
        batches = forever(loader(target_train, int(cfg["batch_size"]), context.generator(1)))
        losses = []
        try:
            with context.phase("entropy_minimisation"):
                for _ in context.progress(range(int(cfg["iterations"])), desc="tent"):
                    _, logits = model(next(batches)["image"].to(context.device))
                    loss = softmax_entropy(logits).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(float(loss.detach()))
        finally:
            restore(model)
        context.record("tent_entropy", {"first": losses[0], "last": losses[-1]} if losses else {})
        if cfg["eval_statistics"] == "target":
            with context.phase("bn_statistics"):
                reestimate_bn_statistics(model, target_train, context, batch_size=int(cfg["batch_size"]),
                                         generator=context.generator(2))
        return model.eval()


@hookimpl
def sfdabench_methods():
    return [Tent]

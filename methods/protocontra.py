"""ProtoContra: prototype-anchored feature alignment (PFA), then contrastive learning (CL).

Yu, Xi, Yuan, Zhou, Dang, Ding, "Source-Free Domain Adaptation for Medical Image Segmentation via
Prototype-Anchored Feature Alignment and Contrastive Learning", MICCAI 2023 (arXiv 2307.09769). The
transport loss follows PCT (Tanwisuth et al., NeurIPS 2021), the contrastive loss U2PL (Wang et al., CVPR 2022).

Both stages run in one ``adapt`` (spec 8.2-8.3):

1. **PFA**: the bias-free classifier weights are the source class prototypes; target features are aligned to
   them with the bi-directional transport loss of :func:`sfdabench.blocks.losses.bidirectional_transport_loss`
   (tau 0.1, rho 0.5) under a class prior that is an EMA (beta 0.001) of the mean soft assignment, updated
   every iteration *before* the loss (as the released code does; the assignment is computed from the
   detached logits, which equal prototype-feature similarities because the classifier has no bias).
   Adam 1e-4, StepLR x0.8 every 5 iterations.
2. **CL**: the PFA model, frozen and in eval mode, is the teacher; the student starts from it. Per batch the
   teacher's pseudo-labels are split by per-class entropy percentiles into reliable and unreliable pixels
   (alpha_t = 20 (1 - t/T); background shifts by alpha_t / 4). Per class: 64 anchors (student features of
   reliable pixels with teacher probability > 0.3), the positive is the mean teacher feature of the
   class's reliable pixels, 256 negatives per anchor come from a per-class FIFO bank of teacher features of
   unreliable pixels that rank the class 3rd-5th. InfoNCE on cosine similarity / 0.1, averaged over the valid
   classes; fewer than 2 valid classes give loss 0. Adam 1e-4, StepLR(2, 0.95) stepped every 5 iterations.

``behaviour`` (config) chooses between the paper's evident intent and the released code (spec 3.3, 8.2, 8.3):

- ``intent`` (default): the classifier is truly frozen during PFA, and in CL each valid class's anchors and
  positive are paired with that class's own negative bank.
- ``released``: the released code. Its PFA only sets a Python attribute to "freeze" the classifier, so the
  prototypes are trained with everything else. Its CL builds anchor and positive lists for *all* classes but
  walks them by position in the list of *valid* classes while taking the bank of ``valid_classes[i]``: when a
  class is absent from a batch, the anchors/positive of class ``i`` meet the negatives of another class.
  With every class present the two behaviours are identical.

Protocol notes:

- Model selection: the released configs pick checkpoints by target *test* Dice (PFA: iteration 25; CL: best
  of 5 epochs). sfdabench trains fixed budgets and returns the last model (``selection = last``): PFA runs the
  200 iterations the paper reportedly states (ProtoContra issue #6), CL the released config's 5 epochs counted
  over the paper protocol's ~1404 target slices (435 steps at batch 16; configs/method/protocontra.yaml).
- Input channels: ProtoContra fed 2.5D input (previous/current/next slice). sfdabench uses the matched
  single-slice input of the shared protocol (the slice replicated 3x, as DFG) for every method, so all
  methods adapt the same source checkpoint. This is a documented deviation.
- The negative banks stay on the compute device (the released code keeps them on the CPU) and are bounded
  (30,000 features per foreground class, 50,000 for background); each push keeps the newest features.
- Uncertain points followed as the spec describes them: a class takes part in the reliable/unreliable split
  only if the sum of teacher entropies over its pixels exceeds 5; the StepLR schedulers take their first step
  after iteration ``lr_step_every`` as the released counter does (``lr_counter: dfg``: also at iteration 0,
  as DFG's fork of the counter, which steps at every evaluation including the one before training); the
  CL loss divides by the number of valid classes, including valid classes skipped for want of anchors or
  negatives (U2PL).
- ``pseudo_label_ce`` (spec 8.3 step 5, disabled in the released config and here by default) adds CE on
  the teacher's pseudo-labels, dropping per class the pixels whose entropy is above a percentile that rises
  linearly from 80 to 100, re-weighted by all pixels / kept pixels. Whether the paper used it is uncertain.
- ``stop_after_pfa`` returns the PFA model (the "PFA only" row).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sfdabench.api import Context, Method, TargetImages
from sfdabench.hookspecs import hookimpl
from sfdabench.blocks.losses import bidirectional_transport_loss
from sfdabench.blocks.training import Augment, forever, loader, make_optimizer

BEHAVIOURS = ("intent", "released")


LR_COUNTERS = ("protocontra", "dfg")


def stepped_lr(base: float, gamma: float, step_size: int, every: int, it: int, counter: str = "protocontra"
               ) -> float:
    """Rate at iteration ``it`` (0-based) of StepLR(step_size, gamma) stepped every ``every`` iterations.

    ``protocontra`` (released utils/iter_counter.py): the scheduler steps when ``steps_so_far % every == 0``
    with ``steps_so_far >= every``, so the first decay follows iteration ``every``; ``dfg`` (DFG's fork of the
    counter): it also steps before the first iteration, so every rate is one decay lower."""
    if counter == "protocontra":
        decays = max(0, (it - 1) // every)
    elif counter == "dfg":
        decays = it // every + 1
    else:
        raise ValueError(f"protocontra: lr_counter={counter!r} unknown; use one of {', '.join(LR_COUNTERS)}")
    return base * gamma ** (decays // step_size)


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------------------------------------------ PFA


@torch.no_grad()
def update_class_prior(prior: torch.Tensor, logits: torch.Tensor, *, tau: float, beta: float) -> torch.Tensor:
    """EMA class prior of PFA: pi <- (1 - beta) pi + beta mean_i softmax_k(s_ki / tau + log pi_k).

    ``logits`` (B, K, H, W) are the similarities s_ki (bias-free classifier), so the softmax is the transport
    loss's target->prototype assignment P(k|i) under the current prior.
    """
    assignment = torch.softmax(logits.detach() / tau + prior.log()[None, :, None, None], dim=1)
    return (1 - beta) * prior + beta * assignment.mean(dim=(0, 2, 3))


def prototype_feature_alignment(model: nn.Module, target_train: TargetImages, cfg: Mapping[str, Any],
                                context: Context, *, freeze_classifier: bool) -> tuple[list[float], torch.Tensor]:
    """Train ``model`` in place with the PFA loss; returns the loss per iteration and the final class prior."""
    model.to(context.device).train()
    prototypes = model.classifier.weight                      # (K, C, 1, 1)
    prototypes.requires_grad_(not freeze_classifier)
    try:
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg)
        generator = context.generator(offset=1)
        augment = Augment(cfg.get("augment"), generator)
        batches = forever(loader(target_train, int(cfg["batch_size"]), generator))
        num_classes = prototypes.shape[0]
        prior = torch.full((num_classes,), 1.0 / num_classes, device=context.device)
        tau, rho, beta = float(cfg["tau"]), float(cfg["rho"]), float(cfg["prior_momentum"])
        losses = []
        for it in context.progress(range(int(cfg["iterations"])), desc="PFA"):
            _set_lr(opt, stepped_lr(float(cfg["lr"]), float(cfg["lr_gamma"]), int(cfg["lr_step_size"]),
                                    int(cfg["lr_step_every"]), it, str(cfg.get("lr_counter", "protocontra"))))
            image, _ = augment(next(batches)["image"].to(context.device))
            features, logits = model(image)
            prior = update_class_prior(prior, logits, tau=tau, beta=beta)   # before the loss, as released
            loss, _ = bidirectional_transport_loss(features, prototypes.flatten(1), tau=tau, rho=rho,
                                                   log_prior=prior.log())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    finally:
        prototypes.requires_grad_(True)
    return losses, prior


# ------------------------------------------------------------------------------------------------- CL


def reliability_masks(entropy: torch.Tensor, pseudo: torch.Tensor, num_classes: int, alpha: float, *,
                      percentile: float = 90.0, background_alpha_scale: float = 0.25,
                      min_entropy_sum: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split pixels into reliable / unreliable by entropy percentiles within each pseudo-class.

    For class k (background: alpha scaled by ``background_alpha_scale``), pixels with entropy at most the
    (percentile - alpha)-th percentile are reliable, those at least the (100 - alpha)-th unreliable. Classes
    whose summed entropy is at most ``min_entropy_sum`` are left out of both. Returns two bool (B, H, W) masks.
    """
    reliable = torch.zeros_like(pseudo, dtype=torch.bool)
    unreliable = torch.zeros_like(pseudo, dtype=torch.bool)
    for k in range(num_classes):
        in_k = pseudo == k
        h = entropy[in_k]
        if h.numel() == 0 or float(h.sum()) <= min_entropy_sum:
            continue
        shift = alpha * background_alpha_scale if k == 0 else alpha
        q = torch.tensor([percentile - shift, 100.0 - shift], device=h.device, dtype=h.dtype).clamp(0, 100) / 100
        low, high = torch.quantile(h, q)
        reliable |= in_k & (entropy <= low)
        unreliable |= in_k & (entropy >= high)
    return reliable, unreliable


class NegativeBank:
    """Per-class FIFO memory of teacher features (detached), bounded, on the compute device."""

    def __init__(self, capacities: list[int], dim: int, device: torch.device):
        self.capacities = capacities
        self.queues = [torch.empty(0, dim, device=device) for _ in capacities]

    def __len__(self) -> int:
        return len(self.queues)

    def push(self, k: int, keys: torch.Tensor) -> None:
        self.queues[k] = torch.cat([self.queues[k], keys.detach()])[-self.capacities[k]:]

    def push_unreliable(self, teacher_features: torch.Tensor, teacher_probs: torch.Tensor,
                        unreliable: torch.Tensor, ranks: tuple[int, int]) -> None:
        """Enqueue, for each class k, the unreliable pixels whose teacher ranks k within ``ranks`` (0-based
        [low, high)): pixels that are surely not k, i.e. its negatives."""
        order = torch.sort(teacher_probs, dim=1, descending=True, stable=True).indices[:, ranks[0]:ranks[1]]
        pixels = teacher_features.permute(0, 2, 3, 1)          # (B, H, W, C) view, no copy
        for k in range(len(self)):
            where = (unreliable & (order == k).any(dim=1)).nonzero(as_tuple=True)
            # Only the newest `capacity` survive the push: gather no more than that.
            where = tuple(w[-self.capacities[k]:] for w in where)
            if where[0].numel():
                self.push(k, pixels[where])


def contrastive_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, teacher_probs: torch.Tensor,
                     reliable: torch.Tensor, bank: NegativeBank, generator: torch.Generator, *, anchors: int,
                     anchor_min_prob: float, negatives: int, temperature: float, released: bool
                     ) -> tuple[torch.Tensor, int]:
    """U2PL-style InfoNCE of ProtoContra's CL stage. Returns (loss, number of valid classes).

    A class is valid if it has reliable pixels. Per valid class: ``anchors`` student features sampled with
    replacement among its reliable pixels with teacher probability > ``anchor_min_prob``; positive = mean
    teacher feature over its reliable pixels; ``negatives`` per anchor sampled with replacement from its bank.
    ``released=True`` reproduces the released pairing: the i-th valid class takes the anchors and positive of
    class ``i`` (not ``valid[i]``) and the bank of ``valid[i]``.
    """
    num_classes = teacher_probs.shape[1]
    pseudo = teacher_probs.argmax(1)
    zero = 0.0 * student_features.sum()                        # keeps the graph: the optimiser step still runs
    student_pixels = student_features.permute(0, 2, 3, 1)
    class_reliable = [reliable & (pseudo == k) for k in range(num_classes)]
    valid = [k for k in range(num_classes) if bool(class_reliable[k].any())]
    if len(valid) < 2:
        return zero, len(valid)
    total = zero
    for i, k in enumerate(valid):
        source = i if released else k
        queue = bank.queues[k]
        candidates = (class_reliable[source] & (teacher_probs[:, source] > anchor_min_prob)).nonzero(as_tuple=True)
        if candidates[0].numel() == 0 or queue.shape[0] == 0:
            continue                                           # counted in the mean, contributes 0 (U2PL)
        pick = torch.randint(candidates[0].numel(), (anchors,), generator=generator).to(student_features.device)
        anchor = student_pixels[tuple(c[pick] for c in candidates)]                       # (A, C)
        mask = class_reliable[source].to(teacher_features.dtype)
        positive = torch.einsum("bhw,bchw->c", mask, teacher_features) / mask.sum()      # (C,)
        neg_idx = torch.randint(queue.shape[0], (anchors * negatives,), generator=generator).to(queue.device)
        keys = torch.cat([positive.expand(anchors, 1, -1), queue[neg_idx].view(anchors, negatives, -1)], dim=1)
        logits = F.cosine_similarity(anchor.unsqueeze(1), keys, dim=2) / temperature      # (A, 1 + negatives)
        target = torch.zeros(anchors, dtype=torch.long, device=logits.device)             # the positive
        total = total + F.cross_entropy(logits, target)
    return total / len(valid), len(valid)


def pseudo_label_ce(logits: torch.Tensor, pseudo: torch.Tensor, entropy: torch.Tensor,
                    keep_percentile: float) -> torch.Tensor:
    """CE on teacher pseudo-labels, per class dropping pixels above the ``keep_percentile``-th entropy
    percentile, re-weighted by all pixels / kept pixels (U2PL's unsupervised loss, per class)."""
    target = pseudo.clone()
    for k in range(logits.shape[1]):
        in_k = pseudo == k
        if bool(in_k.any()):
            threshold = torch.quantile(entropy[in_k], keep_percentile / 100)
            target[in_k & (entropy > threshold)] = -1
    kept = int((target >= 0).sum())
    if kept == 0:
        return 0.0 * logits.sum()
    return target.numel() / kept * F.cross_entropy(logits, target, ignore_index=-1)


def contrastive_learning(model: nn.Module, target_train: TargetImages, cfg: Mapping[str, Any], context: Context,
                         *, released: bool) -> dict[str, Any]:
    """Train ``model`` (the student, initialised from PFA) in place against a frozen copy (the teacher)."""
    device = context.device
    model.to(device)
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model.train()
    opt = make_optimizer(model.parameters(), cfg)
    data_gen, sample_gen = context.generator(offset=2), context.generator(offset=3)
    augment = Augment(cfg.get("augment"), data_gen)
    batches = forever(loader(target_train, int(cfg["batch_size"]), data_gen))
    total = int(cfg["steps"])
    num_classes = model.classifier.weight.shape[0]
    bank = NegativeBank([int(cfg["bank_size_background"])] + [int(cfg["bank_size_foreground"])] * (num_classes - 1),
                        model.classifier.weight.shape[1], device)
    ranks = tuple(int(r) for r in cfg["negative_ranks"])
    keep_lo, keep_hi = (float(v) for v in cfg["pseudo_label_keep_percentile"])
    losses, valid_counts = [], []
    bar = context.progress(total=total, desc="CL")
    for it in range(total):
        batch = next(batches)
        _set_lr(opt, stepped_lr(float(cfg["lr"]), float(cfg["lr_gamma"]), int(cfg["lr_step_size"]),
                                int(cfg["lr_step_every"]), it, str(cfg.get("lr_counter", "protocontra"))))
        image, _ = augment(batch["image"].to(device))      # teacher and student see the same image
        with torch.no_grad():
            t_features, t_logits = teacher(image)
            log_probs = t_logits.log_softmax(1)
            probs = log_probs.exp()
            entropy = -(probs * log_probs).sum(1)
            pseudo = probs.argmax(1)
        s_features, s_logits = model(image)
        alpha = float(cfg["alpha_start"]) * (1 - it / total)
        reliable, unreliable = reliability_masks(
            entropy, pseudo, num_classes, alpha, percentile=float(cfg["reliable_percentile"]),
            background_alpha_scale=float(cfg["background_alpha_scale"]),
            min_entropy_sum=float(cfg["min_class_entropy_sum"]))
        bank.push_unreliable(t_features, probs, unreliable, ranks)   # enqueue first, then sample (U2PL)
        loss, n_valid = contrastive_loss(
            s_features, t_features, probs, reliable, bank, sample_gen, anchors=int(cfg["anchors"]),
            anchor_min_prob=float(cfg["anchor_min_prob"]), negatives=int(cfg["negatives"]),
            temperature=float(cfg["temperature"]), released=released)
        if cfg["pseudo_label_ce"]:
            keep = keep_lo + (keep_hi - keep_lo) * it / total
            loss = loss + float(cfg["pseudo_label_ce_weight"]) * pseudo_label_ce(s_logits, pseudo, entropy, keep)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        valid_counts.append(n_valid)
        bar.update(1)
    bar.close()
    return {"losses": losses, "valid_classes": valid_counts, "bank_sizes": [q.shape[0] for q in bank.queues]}


# --------------------------------------------------------------------------------------------- method


class ProtoContra(Method):
    """ProtoContra (Yu et al., MICCAI 2023): prototype-anchored feature alignment, then contrastive learning."""

    name = "protocontra"

    @property
    def behaviour(self) -> str:
        behaviour = str(self.cfg["behaviour"])
        if behaviour not in BEHAVIOURS:
            raise ValueError(f"protocontra: behaviour must be one of {BEHAVIOURS}, got {behaviour!r}")
        return behaviour

    def variant(self) -> str:
        parts = [self.behaviour]
        if self.cfg["stop_after_pfa"]:
            parts.append("pfa-only")
        elif self.cfg["cl"]["pseudo_label_ce"]:
            parts.append("plce")
        return "+".join(parts)

    def adapt(self, source_model: nn.Module, target_train: TargetImages, context: Context) -> nn.Module:
        released = self.behaviour == "released"
        model = source_model
        with context.phase("pfa"):
            losses, prior = prototype_feature_alignment(model, target_train, self.cfg["pfa"], context,
                                                        freeze_classifier=not released)
        context.record("pfa", {"loss_first": _first(losses), "loss_last": _last(losses),
                               "class_prior": [round(float(v), 6) for v in prior]})
        if self.cfg["stop_after_pfa"]:
            return model
        with context.phase("cl"):
            stats = contrastive_learning(model, target_train, self.cfg["cl"], context, released=released)
        counts = stats["valid_classes"]
        context.record("cl", {"loss_first": _first(stats["losses"]), "loss_last": _last(stats["losses"]),
                              "mean_valid_classes": sum(counts) / len(counts) if counts else None,
                              "iterations_without_loss": sum(c < 2 for c in counts),
                              "bank_sizes": stats["bank_sizes"]})
        return model


def _first(values: list[float]) -> float | None:
    return values[0] if values else None


def _last(values: list[float]) -> float | None:
    return values[-1] if values else None


@hookimpl
def sfdabench_methods():
    return [ProtoContra]

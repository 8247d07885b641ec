"""Backends on the ``segment_anything`` package: MedSAM (ViT-B, the DFG paper's segmenter) and plain SAM.

Both build the network with ``sam_model_registry[model_type](checkpoint=None)`` and load the weights
themselves with ``map_location="cpu"``: the registry's own loader calls ``torch.load`` without it, which
fails for GPU-saved checkpoints on CPU-only machines. Architecture mismatches are reported on one line
before the (slow, memory-hungry) network is built.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sfdabench.api import SamEmbedding, SfdaBenchError, UsageError
from sfdabench.sam.litemedsam import (TorchSamBackend, check_box, check_slice, describe_state_dict,
                                      file_identity, load_into, load_state_dict_file, minmax, vit_size)

#: model_type -> (image-encoder embed dim, number of blocks, official SAM checkpoint file name)
VIT_SPECS = {
    "vit_b": (768, 12, "sam_vit_b_01ec64.pth"),
    "vit_l": (1024, 24, "sam_vit_l_0b3195.pth"),
    "vit_h": (1280, 32, "sam_vit_h_4b8939.pth"),
}
SAM_SOURCE = "links under 'Model Checkpoints' in the README of github.com/facebookresearch/segment-anything"
MEDSAM_SOURCE = "download link in the README of github.com/bowang-lab/MedSAM"


class _SegmentAnythingBackend(TorchSamBackend):
    """Checkpoint resolution, architecture check and network construction for ``segment_anything``."""

    image_size = 1024
    input_size = 1024     # the encoder's (padded) input side

    @classmethod
    def _expected_file(cls, cfg: Mapping[str, Any]) -> tuple[str, str]:
        """(what the file is, e.g. 'medsam_vit_b.pth, the MedSAM ViT-B checkpoint', where to get it)."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        """A checkpoint is configured and the file exists (its content is checked when the model is built)."""
        super().check_config(cfg)
        what, source = cls._expected_file(cfg)
        ckpt = cfg.get("checkpoint")
        example = what.split(",")[0]
        hint = f"it needs {what}: set sam.checkpoint=/path/to/{example} ({source})"
        if not ckpt:
            raise UsageError(f"SAM backend {cls.name!r} has no checkpoint configured; {hint}")
        path = Path(str(ckpt)).expanduser()
        if not path.is_file():
            raise UsageError(f"SAM backend {cls.name!r}: checkpoint {path} not found; {hint}")

    def _load(self, model_type: str) -> None:
        path = Path(str(self.cfg.get("checkpoint"))).expanduser()  # present: checked by check_config
        state = load_state_dict_file(path)

        dim, depth, _ = VIT_SPECS[model_type]
        expected = f"SAM {model_type} (ViT image encoder with embed dim {dim} and {depth} blocks)"
        size = vit_size(state)
        if size != (dim, depth):
            # Checked on the keys before building the model: a ViT-H costs seconds and GBs to build.
            found = next((t for t, (d, n, _) in VIT_SPECS.items() if size == (d, n)), None)
            raise SfdaBenchError(f"SAM checkpoint {path} does not match the expected architecture "
                                 f"{expected} of backend {self.name!r}: the file is {describe_state_dict(state)}"
                                 + (self._model_type_hint(found) if found else ""))

        from segment_anything import sam_model_registry

        model = sam_model_registry[model_type](checkpoint=None)
        load_into(model, state, path, expected)
        del state
        self.checkpoint_path = path
        self._weights = file_identity(path)
        self._finish_model(model)

    def _weights_id(self) -> str:
        return self._weights

    def _model_type_hint(self, found: str) -> str:
        """What to set when the file is a valid SAM ViT of another size."""
        return f"; for this file use sam=sam sam.model_type={found}"


class MedSamBackend(_SegmentAnythingBackend):
    """MedSAM ViT-B (bowang-lab) with MedSAM's preprocessing: 1024x1024 bicubic, min-max, no mean/std."""

    name = "medsam"
    description = "MedSAM ViT-B (medsam_vit_b.pth) with MedSAM's 1024x1024 min-max preprocessing"

    def __init__(self, cfg: Mapping[str, Any], device: torch.device):
        super().__init__(cfg, device)
        self._load("vit_b")

    @classmethod
    def _expected_file(cls, cfg: Mapping[str, Any]) -> tuple[str, str]:
        return "medsam_vit_b.pth, the MedSAM ViT-B checkpoint", MEDSAM_SOURCE

    def embed(self, image: np.ndarray) -> SamEmbedding:
        """Spec 4.1 / 11.9: bicubic resize (skimage order 3, anti-aliasing) of the whole slice to 1024x1024
        (aspect not kept, as in MedSAM), per-image min-max to [0, 1], 3 channels, straight to the encoder."""
        from skimage.transform import resize

        image = check_slice(image)
        big = resize(image, (self.image_size, self.image_size), order=3, preserve_range=True,
                     anti_aliasing=True).astype(np.float32)
        x = torch.from_numpy(minmax(big))[None, None].expand(1, 3, -1, -1)
        return SamEmbedding(features=self._encode(x), image_size=image.shape)

    def decode(self, embedding: SamEmbedding, box: Sequence[float]) -> np.ndarray:
        h, w = embedding.image_size
        b = check_box(box) * (self.image_size / np.array([w, h, w, h], dtype=np.float64))
        logits = self._box_logits(embedding, b)
        with torch.no_grad():
            # MedSAM: sigmoid of the 256x256 low-res logits, bilinear to the slice size, > 0.5.
            prob = F.interpolate(torch.sigmoid(logits), (h, w), mode="bilinear", align_corners=False)
        return (prob[0, 0] > 0.5).cpu().numpy()


class SamViTBackend(_SegmentAnythingBackend):
    """Segment Anything ViT-B/L/H with SAM's own preprocessing (as SamPredictor), on the configured device."""

    name = "sam"
    description = "Segment Anything ViT-B/L/H (sam.model_type) with SamPredictor's preprocessing"
    preprocess_version = "v1-uint8"

    def __init__(self, cfg: Mapping[str, Any], device: torch.device):
        super().__init__(cfg, device)
        self.model_type = self._model_type(cfg)
        self._load(self.model_type)

    @staticmethod
    def _model_type(cfg: Mapping[str, Any]) -> str:
        return str(cfg.get("model_type", "vit_b") or "vit_b")

    @classmethod
    def check_config(cls, cfg: Mapping[str, Any]) -> None:
        model_type = cls._model_type(cfg)
        if model_type not in VIT_SPECS:  # first: the expected checkpoint file depends on it
            raise UsageError(f"sam.model_type={model_type!r} is not one of {sorted(VIT_SPECS)}; set "
                             f"sam.model_type=vit_b, vit_l or vit_h to match the checkpoint")
        super().check_config(cfg)

    @classmethod
    def _expected_file(cls, cfg: Mapping[str, Any]) -> tuple[str, str]:
        model_type = cls._model_type(cfg)
        fname = VIT_SPECS[model_type][2]
        return f"{fname}, the SAM ViT-{model_type[-1].upper()} checkpoint", SAM_SOURCE

    def fingerprint(self) -> str:
        return super().fingerprint() + f"|model_type={self.model_type}"

    def _model_type_hint(self, found: str) -> str:
        return f"; set sam.model_type={found} if this is the intended checkpoint"

    def embed(self, image: np.ndarray) -> SamEmbedding:
        """SamPredictor.set_image: the slice as an RGB uint8 image (values x 255, not min-max normalised),
        ResizeLongestSide(1024) via PIL, SAM pixel mean/std, zero padding to 1024x1024."""
        from segment_anything.utils.transforms import ResizeLongestSide

        image = check_slice(image)
        rgb = np.repeat(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        resized = ResizeLongestSide(self.image_size).apply_image(rgb)
        x = torch.from_numpy(resized).permute(2, 0, 1)[None].float().to(self.device)
        input_size = tuple(int(s) for s in x.shape[-2:])
        x = self.model.preprocess(x)  # (x - pixel_mean) / pixel_std, then pad bottom/right
        return SamEmbedding(features=self._encode(x), image_size=image.shape,
                            extra={"input_size": input_size})

    def decode(self, embedding: SamEmbedding, box: Sequence[float]) -> np.ndarray:
        from segment_anything.utils.transforms import ResizeLongestSide

        h, w = embedding.image_size
        b = ResizeLongestSide(self.image_size).apply_boxes(check_box(box)[None], (h, w))[0]
        logits = self._box_logits(embedding, b)
        with torch.no_grad():
            # Sam.postprocess_masks: upsample to 1024, crop the padding, resize to the slice; logits > 0.
            masks = self.model.postprocess_masks(logits, tuple(embedding.extra["input_size"]), (h, w))
        return (masks[0, 0] > self.model.mask_threshold).cpu().numpy()

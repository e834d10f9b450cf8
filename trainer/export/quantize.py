"""Post-training row-wise quantization of a ranking model's embedding tables (int8, int4, fp16).

`quantize_tables(model, "int8")` returns a copy of an unsharded CPU RecModel whose every
TorchRec `EmbeddingBagCollection` is swapped for TorchRec's quantized one
(`torchrec.quant.embedding_modules.EmbeddingBagCollection`, built by
`torchrec.inference.modules.quantize_embeddings`): each row is stored as int8 / int4 codes with
its own fp16 scale and bias (row-wise asymmetric quantization), or as fp16, and looked up by
FBGEMM's `IntNBitTableBatchedEmbeddingBagsCodegen` kernels, which exist for CPU in
fbgemm-gpu-cpu. The dense part stays fp32.

Rows are packed without padding (row alignment 1, FBGEMM's own CPU default; TorchRec's default
of 16 bytes is for GPU loads and would make a dim-32 int8 row 48 bytes instead of 36).

`table_bytes(model)` measures the tables from the tensors that hold them: the fp32 weights of
a float model, the packed rows (codes + per-row scale/bias) of a quantized one.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

QUANT_MODES = ("int8", "int4", "fp16")
_DTYPES = {"int8": torch.qint8, "int4": torch.quint4x2, "fp16": torch.float16}
ROW_ALIGNMENT = 1


def float_collections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every float TorchRec EmbeddingBagCollection in `model`."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    return [(n, m) for n, m in model.named_modules() if type(m) is EmbeddingBagCollection]


def quant_collections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every quantized TorchRec EmbeddingBagCollection in `model`."""
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantEBC)]


@torch.no_grad()
def quantize_tables(model: nn.Module, mode: str) -> nn.Module:
    """A copy of `model` (unsharded, CPU, eval mode) with its embedding tables quantized."""
    from torchrec.inference.modules import quantize_embeddings
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    if mode not in _DTYPES:
        raise ValueError(f"--quantize {mode!r}: use one of {', '.join(QUANT_MODES)}")
    q = copy.deepcopy(model).cpu().eval()
    if not float_collections(q):
        raise ValueError(f"model {type(model).__name__} has no EmbeddingBagCollection to quantize")
    try:
        from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

        quant_prep_customize_row_alignment(q, [EmbeddingBagCollection], ROW_ALIGNMENT)
    except ImportError:  # an older TorchRec: its default alignment (measured, so the bytes stay honest)
        pass
    return quantize_embeddings(q, _DTYPES[mode], inplace=True, output_dtype=torch.float32).eval()


def table_bytes(model: nn.Module) -> int:
    """Bytes of the embedding tables, from the tensors that hold them (float or quantized)."""
    total = 0
    for _, ebc in float_collections(model):
        total += sum(p.numel() * p.element_size() for p in ebc.parameters())
    for _, qebc in quant_collections(model):
        for tbe in qebc._emb_modules:
            for name in ("weights_host", "weights_dev", "weights_uvm"):
                t = getattr(tbe, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
    return total

"""Model FLOPs per token and GPU peak throughput, for model FLOPs utilisation (MFU)."""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (no sparsity), by a substring of torch.cuda.get_device_name().
_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower, see below
    "H100 PCIe": 756e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "4090": 165e12,
    "3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights plus attention, 12 * L * d * T (PaLM appendix B)."""
    return 6 * n_params + 12 * n_layers * hidden * seq_len


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of this GPU, or None when unknown (CPU or an unlisted card)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in _PEAK_BF16 if key in name]
    return _PEAK_BF16[max(matches, key=len)] if matches else None


def numel(p: torch.Tensor) -> int:
    """Elements of a parameter, whole even when DeepSpeed ZeRO-3 keeps only a partition of it here
    (FSDP2's DTensors already report their global size)."""
    return getattr(p, "ds_numel", p.numel())


def parameter_count(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters minus the input embedding (it is a lookup, not a matmul)."""
    emb = model.get_input_embeddings().weight
    total = parameter_count(model)
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb
    # A tied embedding still does the output matmul, so count it once.
    return total if tied else total - numel(emb)

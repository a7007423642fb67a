"""Confidence heads' post-processing: pLDDT, predicted aligned error (PAE) and pTM."""

from __future__ import annotations

import torch


def categorical_lddt(logits: torch.Tensor, bins: int = 50) -> torch.Tensor:
    """Expected lDDT in [0, 1] from logits [..., bins] over equal-width bins of [0, 1]."""
    edges = torch.linspace(0, 1, bins + 1, device=logits.device, dtype=logits.dtype)
    centers = (edges[:-1] + edges[1:]) / 2
    return (logits.softmax(-1) @ centers.unsqueeze(1)).squeeze(-1)


def _aligned_error_bin_centers(max_bin: int, no_bins: int, device: torch.device) -> torch.Tensor:
    """Centers of the ``no_bins`` aligned-error bins: ``no_bins - 1`` breaks on [0, max_bin] and one
    open bin beyond, each represented by the break plus half a step."""
    breaks = torch.linspace(0, max_bin, steps=no_bins - 1, device=device)
    step = breaks[1] - breaks[0]
    centers = breaks + step / 2
    return torch.cat([centers, (centers[-1] + step).unsqueeze(-1)], dim=0)


def predicted_aligned_error(
    logits: torch.Tensor, max_bin: int = 31, no_bins: int = 64
) -> dict[str, torch.Tensor]:
    """logits [*, N, N, bins] -> aligned_confidence_probs [*, N, N, bins], predicted_aligned_error
    [*, N, N] (Angstrom) and max_predicted_aligned_error (scalar)."""
    centers = _aligned_error_bin_centers(max_bin, no_bins, logits.device)
    probs = torch.softmax(logits, dim=-1)
    return {
        "aligned_confidence_probs": probs,
        "predicted_aligned_error": torch.sum(probs * centers, dim=-1),
        "max_predicted_aligned_error": centers[-1],
    }


def predicted_tm_score(
    logits: torch.Tensor, mask: torch.Tensor, max_bin: int = 31, no_bins: int = 64, eps: float = 1e-8
) -> torch.Tensor:
    """pTM per sequence over its own residues. logits [B, N, N, bins]; mask [B, N] -> [B].

    For each aligned residue i: mean over residues j of E[1 / (1 + (e_ij / d0)^2)], with d0 from the
    sequence's own length; pTM is the maximum over i (AlphaFold2 supplement 1.9.7).
    """
    mask = mask.to(logits.dtype)
    n = mask.sum(-1)
    # [B]: TM-score distance scale for each sequence's length (lengths below 19 clipped to 19)
    d0 = 1.24 * (n.clamp(min=19) - 15) ** (1.0 / 3) - 1.8
    centers = _aligned_error_bin_centers(max_bin, no_bins, logits.device)
    # [B, 1, 1, bins]
    tm_per_bin = 1.0 / (1 + centers**2 / d0[:, None, None, None] ** 2)
    # [B, N, N]
    term = torch.sum(torch.softmax(logits, dim=-1) * tm_per_bin, dim=-1)
    # [B, N]
    per_alignment = torch.sum(term * (mask / (eps + n[:, None]))[:, None, :], dim=-1)
    per_alignment = per_alignment.masked_fill(mask == 0, float("-inf"))
    return per_alignment.max(dim=-1).values

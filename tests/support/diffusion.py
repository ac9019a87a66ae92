"""Tiny seeded diffusers models for the image-format tests (kohya, LyCORIS, diffusers LoRA files)."""

from __future__ import annotations

import diffusers
import torch


def tiny_unet(seed: int = 0, *, sdxl_pattern: bool = False) -> torch.nn.Module:
    """A UNet2DConditionModel with SD 1.x's block pattern (attention in the first down / last up
    block), or SDXL's (``sdxl_pattern``: none there, so the last up block has no upsampler and the
    first up block's upsampler is the third layer of its sgm slot)."""
    torch.manual_seed(seed)
    down = (
        ("DownBlock2D", "CrossAttnDownBlock2D") if sdxl_pattern else ("CrossAttnDownBlock2D", "DownBlock2D")
    )
    up = ("CrossAttnUpBlock2D", "UpBlock2D") if sdxl_pattern else ("UpBlock2D", "CrossAttnUpBlock2D")
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )


def tiny_flux(seed: int = 0, *, guidance_embeds: bool = False) -> torch.nn.Module:
    """A FluxTransformer2DModel with one double and one single block, hidden size 8."""
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=4,
        num_attention_heads=2,
        joint_attention_dim=8,
        pooled_projection_dim=8,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(0, 2, 2),
    )

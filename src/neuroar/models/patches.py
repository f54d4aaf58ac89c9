"""Non-overlapping p x p x p patches folded into channels and back (3D pixel unshuffle / shuffle).

Video and 3D tokenizers start this way: the first convolution then runs on p^3 fewer voxels, where a
full-resolution layer costs most of a training step on a CPU, and loses nothing (the fold is invertible).
"""

from __future__ import annotations

import torch


def space_to_channels(x_BCDHW: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C * p^3, D / p, H / p, W / p): each p x p x p patch folded into channels."""
    if patch == 1:
        return x_BCDHW
    B, C, D, H, W = x_BCDHW.shape
    p = patch
    x = x_BCDHW.reshape(B, C, D // p, p, H // p, p, W // p, p)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(B, C * p**3, D // p, H // p, W // p)


def channels_to_space(x_BCdhw: torch.Tensor, patch: int) -> torch.Tensor:
    """The inverse of `space_to_channels`."""
    if patch == 1:
        return x_BCdhw
    B, Cp, d, h, w = x_BCdhw.shape
    p = patch
    x = x_BCdhw.reshape(B, Cp // p**3, p, p, p, d, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, Cp // p**3, d * p, h * p, w * p)

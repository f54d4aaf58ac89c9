"""The latent diffusion baseline: MONAI's DiffusionModelUNet denoises the follow-up latent (by default it
predicts the velocity), given the earlier scan's latent (concatenated channels) and both ages
(cross-attention to three age tokens: earlier age, target age, years between). DDPM noise schedule for
training, DDIM for sampling; the latent grid is zero-padded to what the U-Net's levels can halve.

With `ldm.target: change` it diffuses the follow-up's change from the earlier latent instead, scaled to unit
variance over the training pairs (`change_scale`, kept with the weights): a sampler that has learnt little
then stays near the earlier latent, where one of the follow-up itself starts from noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler
from torch import nn

from neuroar.config import LDMConfig
from neuroar.models.conditioning import AgeEmbedding


class LatentDiffusion(nn.Module):
    def __init__(self, config: LDMConfig, latent_channels: int, norm_groups: int):
        super().__init__()
        self.config = config
        context = config.head_channels
        self.ages = AgeEmbedding(context)
        # No pooled age vector and no age dropout here; DDP needs every trainable parameter in each step.
        for unused in (self.ages.pool, self.ages.dropped):
            unused.requires_grad_(False)
        self.unet = DiffusionModelUNet(
            spatial_dims=3, in_channels=2 * latent_channels, out_channels=latent_channels,
            num_res_blocks=config.res_blocks, channels=config.channels, attention_levels=config.attention_levels,
            norm_num_groups=norm_groups, num_head_channels=config.head_channels, with_conditioning=True,
            cross_attention_dim=context)
        # The latent-diffusion schedule (scaled linear betas). Latents are scaled to unit variance, so each
        # step's estimate of the clean latent is clipped to +-5 standard deviations: at the noisiest steps
        # it divides the noise prediction's error by sqrt(alpha_bar) ~ 0.015, which can otherwise explode.
        self.scheduler = DDIMScheduler(num_train_timesteps=config.timesteps, schedule="scaled_linear_beta",
                                       beta_start=0.0015, beta_end=0.0195, clip_sample=True,
                                       clip_sample_min=-5.0, clip_sample_max=5.0, prediction_type=config.prediction)
        if config.target == "change":  # set by training; absent otherwise, so models of the follow-up load as before
            self.register_buffer("change_scale", torch.ones(()))

    def denoise(self, noisy_BCDHW: torch.Tensor, earlier_BCDHW: torch.Tensor, t_B: torch.Tensor,
                earlier_age_B: torch.Tensor, target_age_B: torch.Tensor) -> torch.Tensor:
        context_B3W, _ = self.ages(earlier_age_B, target_age_B)
        x = torch.cat([noisy_BCDHW, earlier_BCDHW], 1)
        # Each U-Net level halves the grid, so pad it (at the far end) to a multiple of 2 ** (levels - 1).
        multiple = 2 ** (len(self.config.channels) - 1)
        size = x.shape[2:]
        pad = [p for s in reversed(size) for p in (0, -s % multiple)]
        noise = self.unet(F.pad(x, pad), t_B, context=context_B3W)
        return noise[:, :, :size[0], :size[1], :size[2]]

    def forward(self, later_BCDHW: torch.Tensor, earlier_BCDHW: torch.Tensor, earlier_age_B: torch.Tensor,
                target_age_B: torch.Tensor, noise_BCDHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        """The training loss at timesteps `t_B`: mean squared error of the predicted noise, clean latent or
        velocity (`ldm.prediction`)."""
        clean = (later_BCDHW - earlier_BCDHW) * self.change_scale if self.config.target == "change" else later_BCDHW
        noisy = self.scheduler.add_noise(clean, noise_BCDHW, t_B)
        target = {"epsilon": noise_BCDHW, "sample": clean,
                  "v_prediction": self.scheduler.get_velocity(clean, noise_BCDHW, t_B)}[self.config.prediction]
        return F.mse_loss(self.denoise(noisy, earlier_BCDHW, t_B, earlier_age_B, target_age_B).float(), target)

    @torch.no_grad()
    def sample(self, earlier_BCDHW: torch.Tensor, earlier_age_B: torch.Tensor, target_age_B: torch.Tensor,
               noise_BCDHW: torch.Tensor | None = None, steps: int | None = None) -> torch.Tensor:
        """Follow-up latents by deterministic DDIM (eta 0) from `noise_BCDHW` (default: fresh Gaussian noise),
        `ldm.ddim_steps` U-Net passes."""
        self.scheduler.set_timesteps(steps or self.config.ddim_steps, device=earlier_BCDHW.device)
        x = torch.randn_like(earlier_BCDHW) if noise_BCDHW is None else noise_BCDHW
        for t in self.scheduler.timesteps:
            t_B = torch.full((len(x),), int(t), device=x.device, dtype=torch.long)
            prediction = self.denoise(x, earlier_BCDHW, t_B, earlier_age_B, target_age_B).float()
            x, _ = self.scheduler.step(prediction, int(t), x)
        return earlier_BCDHW + x / self.change_scale if self.config.target == "change" else x

"""MONAI's AutoencoderKL as configured here: the latent space of the LDM and latent StarGAN baselines."""

from __future__ import annotations

from monai.networks.nets import AutoencoderKL

from neuroar.config import AutoencoderConfig


def build_autoencoder(config: AutoencoderConfig) -> AutoencoderKL:
    # No non-local attention: at the bottleneck of a 3D volume it is the most expensive layer and the
    # baselines' latent models attend over the latent grid themselves.
    return AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=config.channels,
                         num_res_blocks=config.res_blocks, attention_levels=(False,) * len(config.channels),
                         latent_channels=config.latent_channels, norm_num_groups=config.norm_groups,
                         with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)

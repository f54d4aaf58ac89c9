"""The multi-scale quantizer's exact invariants and the MS-VQVAE's shapes and training signal."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from neuroar.config import TokenizerConfig, load_config
from neuroar.models.patches import channels_to_space, space_to_channels
from neuroar.models.quantizer import MultiScaleQuantizer
from neuroar.models.tokenizer import MSVQVAE

SCALES = ((1, 1, 1), (2, 3, 2), (3, 4, 4), (4, 5, 4))


@pytest.fixture(params=[False, True], ids=["shared", "per_scale"])
def quantizer(request):
    torch.manual_seed(0)
    q = MultiScaleQuantizer(codebook_size=64, dim=8, scales=SCALES, per_scale=request.param)
    torch.nn.init.normal_(q.codebook.weight)  # spread codes so that many are used
    return q.eval()


def test_tokens_have_the_scale_shapes_and_rebuild_the_encoding_fhat(quantizer):
    f = torch.randn(2, 8, 4, 5, 4)
    f_hat, tokens, _, _ = quantizer(f)
    assert [tuple(t.shape) for t in tokens] == [(2, *s) for s in SCALES]
    assert all(t.dtype == torch.int64 and int(t.max()) < 64 for t in tokens)
    assert all(torch.equal(a, b) for a, b in zip(tokens, quantizer.encode(f)))
    assert torch.allclose(quantizer.tokens_to_fhat(tokens), f_hat, atol=1e-6)


def test_teacher_forcing_inputs_equal_the_sampling_steps(quantizer):
    tokens = quantizer.encode(torch.randn(2, 8, 4, 5, 4))
    inputs = quantizer.teacher_forcing_inputs(tokens)
    assert len(inputs) == len(SCALES) - 1
    for k, input_BCdhw in enumerate(inputs):
        # Independently: decode the prefix of scales 0..k, then area-downsample to scale k + 1.
        expected = F.adaptive_avg_pool3d(quantizer.tokens_to_fhat(tokens[: k + 1]), SCALES[k + 1])
        assert torch.allclose(input_BCdhw, expected, atol=1e-6)
    # Sampling: one `add_scale` per predicted scale, from nothing.
    f_hat = None
    for k, idx in enumerate(tokens):
        f_hat, next_input = quantizer.add_scale(k, f_hat, idx)
        if next_input is not None:
            assert torch.equal(next_input, inputs[k])
    assert torch.allclose(f_hat, quantizer.tokens_to_fhat(tokens))


def test_each_scale_picks_the_nearest_code_of_its_residual(quantizer):
    """Brute force, independently of `add_scale`: at each scale the residual left by the coarser scales,
    area-averaged to the scale, and its nearest code by `torch.cdist`."""
    f = torch.randn(2, 8, 4, 5, 4)
    tokens = quantizer.encode(f)
    mix = quantizer.phi_mix
    books = quantizer.codebook.weight.detach().view(-1, 64, 8)  # one codebook, or one per scale
    f_hat = torch.zeros_like(f)
    with torch.no_grad():
        for k, scale in enumerate(SCALES):
            codes = books[k % len(books)]
            z = F.adaptive_avg_pool3d(f - f_hat, scale)
            z_NC = z.permute(0, 2, 3, 4, 1).reshape(-1, 8)
            nearest = torch.cdist(z_NC, codes).argmin(1).view(2, *scale)
            assert torch.equal(tokens[k], nearest), f"scale {k}"
            h = F.interpolate(codes[tokens[k]].permute(0, 4, 1, 2, 3), size=SCALES[-1], mode="trilinear")
            f_hat = f_hat + (1 - mix) * h + mix * quantizer.phis[k](h)


def test_quantizer_runs_in_float32_under_bf16_autocast(quantizer):
    """The decoder and the token cache must see the same tokens: under autocast (bf16 on this CPU, as on a
    GPU) the quantizer still looks codes up and sums f_hat in float32."""
    torch.manual_seed(1)
    codes = quantizer.codebook.weight.detach()[:64]  # the first scale's
    # Features near the midpoint of two codes, where bf16 rounding of the distances would flip the choice.
    f_NC = 0.5 * (codes[torch.randint(64, (160,))] + codes[torch.randint(64, (160,))]) + 1e-3 * torch.randn(160, 8)
    f = f_NC.view(2, 4, 5, 4, 8).permute(0, 4, 1, 2, 3).contiguous()
    first = quantizer.encode(f)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        f_hat, tokens, _, _ = quantizer(f.bfloat16())
        encoded = quantizer.encode(f.bfloat16())
        _, next_input = quantizer.add_scale(0, None, first)
    # Only the input's own rounding to bf16 may move a token (as it would without autocast).
    assert all(torch.equal(a, b) for a, b in zip(encoded, quantizer.encode(f.bfloat16().float())))
    assert all(torch.equal(a, b) for a, b in zip(tokens, encoded))
    assert f_hat.dtype == next_input.dtype == torch.float32


def test_finer_scales_shrink_the_residual(quantizer):
    f = torch.randn(1, 8, 4, 5, 4)
    tokens = quantizer.encode(f)
    with torch.no_grad():
        errors = [float((quantizer.tokens_to_fhat(tokens[: k + 1]) - f).square().mean()) for k in range(len(SCALES))]
    assert errors[-1] < errors[0]


def test_straight_through_gradient_reaches_encoder_and_vq_loss_reaches_codebook(quantizer):
    quantizer.train()
    f = torch.randn(2, 8, 4, 5, 4, requires_grad=True)
    f_hat, _, vq_loss, _ = quantizer(f)
    f_hat.sum().backward(retain_graph=True)
    assert torch.allclose(f.grad, torch.ones_like(f))  # identity through the quantization
    assert quantizer.codebook.weight.grad is None
    vq_loss.backward()
    assert quantizer.codebook.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in quantizer.phis.parameters())


def test_dead_codes_are_restarted_on_current_features():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(codebook_size=32, dim=4, scales=((1, 1, 1), (2, 2, 2)), usage_decay=0.0, dead_usage=0.5)
    q.codebook.weight.data.zero_()
    q.codebook.weight.data[0] = 1.0  # every feature maps to one of two identical regions
    q.initialized.fill_(True)  # test the restarts, not the data-dependent start
    q.train()
    f = torch.randn(8, 4, 2, 2, 2) * 5
    q(f)
    assert q.codebook.weight.data.abs().sum(1).gt(0).sum() > 2  # dead codes now hold features
    stats = q.usage_stats(q.encode(f))
    assert stats["scale1_used"] > 1 / 32 and stats["scale1_perplexity"] > 1.0


def test_codebook_starts_from_the_first_batch_of_features():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(codebook_size=16, dim=4, scales=((1, 1, 1), (2, 2, 2))).train()
    f = 10 + torch.randn(4, 4, 2, 2, 2)  # far from the tiny initial codes
    q(f)
    assert bool(q.initialized)
    assert torch.allclose(q.codebook.weight.mean(), torch.tensor(10.0), atol=1.0)
    before = q.codebook.weight.detach().clone()
    q(f)
    assert torch.equal(before, q.codebook.weight)  # only once (no dead codes: usage is still near 1)


def test_each_scale_codebook_starts_from_its_own_residual():
    """Per scale, a codebook starts from the residual its scale looks up: here the first scale codes the mean
    (about 10) and the second the rest around it (about 0); one shared codebook would start both near 10."""
    torch.manual_seed(0)
    q = MultiScaleQuantizer(codebook_size=16, dim=4, scales=((1, 1, 1), (2, 2, 2)), phi_mix=0.0, per_scale=True)
    q.train()(10 + torch.randn(4, 4, 2, 2, 2))
    first, second = q.codebook.weight.detach().view(2, 16, 4)
    assert abs(float(first.mean()) - 10) < 1 and abs(float(second.mean())) < 1 and float(second.std()) > 0.3


def test_each_scale_codebook_restarts_from_its_own_residual():
    torch.manual_seed(0)
    q = MultiScaleQuantizer(codebook_size=32, dim=4, scales=((1, 1, 1), (2, 2, 2)), phi_mix=0.0, usage_decay=0.0,
                            dead_usage=0.5, per_scale=True)
    q.codebook.weight.data[:32] = 10.0  # the first scale codes every mean with code 0
    q.codebook.weight.data[32:] = 0.0  # the second scale codes every rest (about 0) with its code 0
    q.initialized.fill_(True)  # test the restarts, not the data-dependent start
    q.train()(10 + torch.randn(8, 4, 2, 2, 2))
    first, second = q.codebook.weight.detach().view(2, 32, 4)
    assert abs(float(first.mean()) - 10) < 1  # restarted on means
    assert second.abs().sum(1).gt(0).sum() > 2 and abs(float(second.mean())) < 1  # restarted on rests


def test_per_scale_codebooks_are_a_config():
    config = dataclasses.replace(load_config("demo").tokenizer, codebook_per_scale=True)
    quantizer = MSVQVAE(config).quantizer
    assert quantizer.codebook.num_embeddings == len(config.scales) * config.codebook_size
    assert quantizer.codes_at(len(config.scales) - 1).shape == (config.codebook_size, config.latent_dim)


@pytest.mark.parametrize("name", ["reference", "paper"])
def test_configs_give_the_latent_grid_and_token_counts(name):
    config = load_config(name)
    q = MultiScaleQuantizer(config.tokenizer.codebook_size, config.tokenizer.latent_dim, config.tokenizer.scales)
    assert q.latent == config.latent_shape == (10, 12, 11)
    assert q.tokens_per_scale == [1, 36, 180, 576, 1320] and sum(q.tokens_per_scale) == 2113


def tiny_config():
    return TokenizerConfig(downsample=4, channels=8, norm_groups=4, latent_dim=8, codebook_size=32,
                           scales=((1, 1, 1), (2, 2, 2), (4, 4, 4)))


def test_patch_fold_puts_each_patch_into_channels_and_back():
    x = torch.randn(2, 3, 4, 6, 8)
    folded = space_to_channels(x, 2)
    assert folded.shape == (2, 24, 2, 3, 4)
    # Independently: channel c * 8 + (i * 4 + j * 2 + k) at (d, h, w) holds voxel (2d + i, 2h + j, 2w + k).
    for c, d, h, w, i, j, k in [(0, 0, 0, 0, 0, 0, 0), (2, 1, 2, 3, 1, 0, 1), (1, 0, 1, 2, 1, 1, 1)]:
        assert folded[1, c * 8 + i * 4 + j * 2 + k, d, h, w] == x[1, c, 2 * d + i, 2 * h + j, 2 * w + k]
    assert torch.equal(channels_to_space(folded, 2), x)
    assert torch.equal(space_to_channels(x, 1), x)


def test_tokenizer_shapes_and_token_roundtrip():
    torch.manual_seed(0)
    model = MSVQVAE(tiny_config()).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    reconstruction, vq_loss, stats = model(x)
    assert reconstruction.shape == x.shape and vq_loss.ndim == 0 and "scale2_perplexity" in stats
    tokens = model.encode_scan(x)
    assert [tuple(t.shape[1:]) for t in tokens] == [(1, 1, 1), (2, 2, 2), (4, 4, 4)]
    assert torch.allclose(model.decode_tokens(tokens), reconstruction, atol=1e-5)


def test_the_shortcut_passes_each_patch_through_encoder_and_decoder_linearly():
    """tokenizer.shortcut: with the convolutional branches silenced, a left-inverse pair of shortcut weights
    reconstructs any volume exactly, through the latent."""
    config = dataclasses.replace(tiny_config(), downsample=2, patch=2, scales=((1, 1, 1), (8, 8, 8)), shortcut=True)
    torch.manual_seed(0)
    model = MSVQVAE(config).eval()
    with torch.no_grad():
        for conv in (model.quant_conv, model.decoder.blocks[-1].conv):
            conv.weight.zero_()
            conv.bias.zero_()
        into_8C = torch.linalg.qr(torch.randn(config.latent_dim, 8)).Q  # well conditioned
        model.shortcuts[0].weight.copy_(into_8C[:, :, None, None, None])
        model.shortcuts[0].bias.zero_()
        model.shortcuts[1].weight.copy_(torch.linalg.pinv(into_8C)[:, :, None, None, None])
        model.shortcuts[1].bias.zero_()
        x = torch.rand(2, 1, 16, 16, 16)
        assert torch.allclose(model.decode(model.features(x)), x, atol=1e-4)
    with pytest.raises(Exception, match="downsample"):
        load_config("demo", ["tokenizer.downsample=4"])  # a latent coarser than the patches


def test_reconstruction_loss_falls_on_a_tiny_training_run():
    torch.manual_seed(0)
    model = MSVQVAE(tiny_config())
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, 16)] * 3, indexing="ij"))
    volumes = torch.stack([((grid - c.view(3, 1, 1, 1)).square().sum(0) < 0.5).float()[None]
                           for c in torch.rand(8, 3) * 0.6 - 0.3])
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(60):
        reconstruction, vq_loss, _ = model(volumes)
        l1 = (reconstruction - volumes).abs().mean()
        optimizer.zero_grad()
        (l1 + vq_loss).backward()
        optimizer.step()
        losses.append(l1.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_paper_tokenizer_builds_and_takes_a_training_step():
    """The paper's network (every weight at its paper shape) on a small volume: a full 160x192x176 step needs
    more than this machine's 24 GB, so the full shape is left to GPUs."""
    config = load_config("paper").tokenizer
    model = MSVQVAE(config)
    assert 20e6 < sum(p.numel() for p in model.parameters()) < 100e6
    small = MSVQVAE(dataclasses.replace(config, scales=((1, 1, 1), (2, 2, 2))))
    assert [p.shape for p in small.encoder.parameters()] == [p.shape for p in model.encoder.parameters()]
    x = torch.rand(1, 1, 32, 32, 32)
    optimizer = torch.optim.SGD(small.parameters(), lr=1e-3)
    reconstruction, vq_loss, _ = small(x)
    assert reconstruction.shape == x.shape
    before = [p.detach().clone() for p in small.decoder.parameters()]
    ((reconstruction - x).abs().mean() + vq_loss).backward()
    optimizer.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in small.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, small.decoder.parameters()))

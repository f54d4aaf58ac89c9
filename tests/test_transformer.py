"""The NeuroAR transformer: block-causal attention, the earlier-scan input and the ablation switches,
initialisation and weight-decay groups, the KV cache, sampling filters, and that it learns to copy what stays."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from neuroar.config import SamplingConfig, TransformerConfig, load_config
from neuroar.errors import NeuroARError
from neuroar.models.quantizer import MultiScaleQuantizer
from neuroar.models.transformer import (
    NeuroAR,
    draw,
    earlier_scale_features,
    flatten,
    teacher_forcing_sequence,
    token_probabilities,
)

SCALES = ((1, 1, 1), (2, 2, 2), (3, 4, 3))
DIM, CODES = 8, 32


def build(seed: int = 0, per_scale: bool = False, **switches) -> tuple[NeuroAR, MultiScaleQuantizer]:
    torch.manual_seed(seed)
    config = TransformerConfig(depth=2, **switches)
    quantizer = MultiScaleQuantizer(CODES, DIM, SCALES, per_scale=per_scale)
    nn_init_all(quantizer)
    model = NeuroAR(config, DIM, CODES, SCALES)
    nn_init_all(model)
    return model.eval(), quantizer.eval()


def nn_init_all(module: torch.nn.Module) -> None:
    """Random values everywhere, including the zero-initialised gates, so every path is active."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0, 0.3)


def random_tokens(batch: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CODES, (batch, *s), generator=generator) for s in SCALES]


def sequence(tokens: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.flatten(1) for t in tokens], 1)


def earlier_inputs(model: NeuroAR, quantizer: MultiScaleQuantizer, earlier: list[torch.Tensor]):
    """(earlier_BLC, earlier_tokens_BL) as the model's config asks for them."""
    features = earlier_scale_features(quantizer, earlier, model.config.earlier)
    return torch.cat([flatten(f) for f in features], 1), sequence(earlier)


def inputs(model, quantizer, batch=2, seed=0):
    target, earlier = random_tokens(batch, seed), random_tokens(batch, seed + 1)
    ages = torch.tensor([70.0, 75.0][:batch]), torch.tensor([72.0, 80.0][:batch])
    return target, teacher_forcing_sequence(quantizer, target), earlier_inputs(model, quantizer, earlier), ages


# The finest scale through attention, or through the convolutional head (`transformer.local_scales`).
LOCAL = pytest.mark.parametrize("local", [0, 1])


@LOCAL
def test_a_token_sees_only_its_own_and_coarser_scales(local):
    """Perturbing scale 1 (inputs or earlier tokens) leaves scale 0's logits alone and changes those of scales 1
    and 2: a token-causal mask (a token sees only earlier positions) would fail the last check, a mask that
    leaks finer scales the first; with a local head for scale 2, it must read the attended scales."""
    model, quantizer = build(local_scales=local)
    _, target_BLC, (earlier_BLC, earlier_BL), (a1, a2) = inputs(model, quantizer)
    logits = model(target_BLC, earlier_BLC, earlier_BL, a1, a2)
    start, end = model.starts[1], model.starts[2]
    changed_inputs = target_BLC.clone()
    changed_inputs[:, start:end] += 1.0
    changed_tokens = earlier_BL.clone()
    changed_tokens[:, end - 1] = (changed_tokens[:, end - 1] + 1) % CODES  # the last token of scale 1 only
    for changed in (model(changed_inputs, earlier_BLC, earlier_BL, a1, a2),
                    model(target_BLC, earlier_BLC, changed_tokens, a1, a2)):
        assert torch.allclose(logits[:, :start], changed[:, :start], atol=1e-5)
        assert not torch.equal(logits[:, start:start + 1], changed[:, start:start + 1])
        assert not torch.allclose(logits[:, end:], changed[:, end:], atol=1e-3)


def test_local_scales_of_one_grid_read_their_own_earlier_input():
    """Two local scales on one grid share the head's read of the context and the earlier scan only where that scan's
    input is the same at both (`transformer.earlier` latent): with "tokens" it differs per scale, so perturbing the
    last scale's earlier input must change the last scale's logits and leave the one before alone."""
    scales = ((1, 1, 1), (2, 2, 2), (3, 4, 3), (3, 4, 3))
    torch.manual_seed(0)
    model = NeuroAR(TransformerConfig(depth=1, local_scales=2, earlier="tokens"), DIM, CODES, scales).eval()
    nn_init_all(model)
    target_BLC = torch.randn(2, model.ends[-1], DIM)
    earlier_BLC = torch.randn(2, model.ends[-1], 2 * DIM)
    earlier_BL = torch.randint(0, CODES, (2, model.ends[-1]))
    ages = torch.tensor([70.0, 75.0]), torch.tensor([72.0, 80.0])
    logits = model(target_BLC, earlier_BLC, earlier_BL, *ages)
    changed = earlier_BLC.clone()
    changed[:, model.starts[3]:] += 1.0
    after = model(target_BLC, changed, earlier_BL, *ages)
    assert torch.equal(logits[:, :model.starts[3]], after[:, :model.starts[3]])
    assert not torch.allclose(logits[:, model.starts[3]:], after[:, model.starts[3]:], atol=1e-3)


def test_attention_scale_by_scale_equals_a_block_causal_mask():
    """The per-scale attention against softmax attention written out with an explicit block-causal mask."""
    model, _ = build()
    block = model.blocks[0]
    x_BLW = torch.randn(2, model.ends[-1], model.config.width)
    out = block._attend(x_BLW, model.ends, None)
    B, L, W = x_BLW.shape
    q, k, v = block.qkv(x_BLW).view(B, L, 3, block.heads, W // block.heads).permute(2, 0, 3, 1, 4)
    levels = torch.repeat_interleave(torch.arange(len(model.lengths)), torch.tensor(model.lengths))
    visible_LL = levels[None, :] <= levels[:, None]
    scores = (q @ k.transpose(-1, -2) / (W // block.heads) ** 0.5).masked_fill(~visible_LL, float("-inf"))
    expected = block.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, W))
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("off", [{"earlier": "none"}, {"adaln": False, "cross_attention": False}])
def test_switches_remove_exactly_their_input(off):
    model_on, quantizer = build()
    model_off, _ = build(**off)
    target = random_tokens(2, seed=0)
    target_BLC = teacher_forcing_sequence(quantizer, target)
    a1, a2 = torch.tensor([70.0, 75.0]), torch.tensor([72.0, 80.0])
    for model in (model_on, model_off):
        earlier, other_earlier = random_tokens(2, seed=1), random_tokens(2, seed=2)
        base = model(target_BLC, *earlier_inputs(model, quantizer, earlier), a1, a2)
        if "earlier" in off:
            other = model(target_BLC, *earlier_inputs(model, quantizer, other_earlier), a1, a2)
        else:
            other = model(target_BLC, *earlier_inputs(model, quantizer, earlier), a1 + 5.0, a2 + 9.0)
        if model is model_on:
            assert not torch.allclose(base, other, atol=1e-3)
        else:
            assert torch.equal(base, other)


@pytest.mark.parametrize("per_scale", [False, True], ids=["shared", "per_scale"])
def test_the_earlier_input_is_the_scans_code_vectors_and_own_input_at_each_scale(per_scale):
    """"tokens": scale k's input is the vector of the earlier scan's scale-k token in scale k's codebook (an
    independent lookup) beside the f_hat of its scales < k pooled to scale k; "fhat": the f_hat of all its scales
    pooled."""
    _, quantizer = build(per_scale=per_scale)
    books = quantizer.codebook.weight.view(-1, CODES, DIM)  # one codebook, or one per scale
    earlier = random_tokens(2, seed=4)
    features = earlier_scale_features(quantizer, earlier, "tokens")
    for k, idx in enumerate(earlier):
        codes = books[k % len(books)][idx.flatten()].view(*idx.shape, DIM).permute(0, 4, 1, 2, 3)
        assert torch.equal(features[k][:, :DIM], codes)
        coarser = (F.adaptive_avg_pool3d(quantizer.tokens_to_fhat(earlier[:k]), SCALES[k]) if k
                   else torch.zeros_like(codes))
        assert torch.allclose(features[k][:, DIM:], coarser, atol=1e-6)
    pooled = earlier_scale_features(quantizer, earlier, "fhat")
    assert pooled[-1].shape[1] == DIM and not torch.allclose(pooled[-1], features[-1][:, :DIM])


def test_dropped_ages_make_the_prediction_age_blind():
    model, quantizer = build()
    _, target_BLC, earlier, (a1, a2) = inputs(model, quantizer)
    drop = torch.ones(2, dtype=torch.bool)
    older = (a1 + 3, a2 + 9)
    assert torch.equal(model(target_BLC, *earlier, a1, a2, drop), model(target_BLC, *earlier, *older, drop))
    assert not torch.allclose(model(target_BLC, *earlier, a1, a2), model(target_BLC, *earlier, *older))


def test_the_diagnosis_conditions_the_prediction_and_is_dropped_with_the_ages():
    model, quantizer = build(diagnoses=("CN", "MCI", "AD"))
    _, target_BLC, earlier, ages = inputs(model, quantizer)
    assert model.diagnosis_ids(["AD", "", None, "CN"]).tolist() == [2, 3, 3, 0]  # missing: "no diagnosis"
    with pytest.raises(NeuroARError, match="'Dementia' is not one this model was trained on.*CN, MCI, AD"):
        model.diagnosis_ids(["Dementia"])
    ad, cn, none = (model.diagnosis_ids([d, d]) for d in ("AD", "CN", None))
    assert not torch.allclose(model(target_BLC, *earlier, *ages, diagnosis_B=ad),
                              model(target_BLC, *earlier, *ages, diagnosis_B=cn))
    assert torch.equal(model(target_BLC, *earlier, *ages, diagnosis_B=none), model(target_BLC, *earlier, *ages))
    drop = torch.ones(2, dtype=torch.bool)  # classifier-free guidance's unconditional half: no ages, no diagnosis
    assert torch.equal(model(target_BLC, *earlier, *ages, drop, ad), model(target_BLC, *earlier, *ages, drop, cn))
    decayed, _ = model.parameter_groups(0.05)
    assert all(p is not model.diagnosis.weight for p in decayed["params"])

    ages_only, quantizer = build()  # ignores a diagnosis it was not configured with
    assert ages_only.diagnosis is None and ages_only.diagnosis_ids(["AD", "Dementia"]).tolist() == [0, 0]
    assert torch.equal(ages_only(target_BLC, *earlier, *ages, diagnosis_B=ad), ages_only(target_BLC, *earlier, *ages))


def test_no_weight_decay_on_embeddings_norms_biases_and_condition_tokens():
    model, _ = build()
    decayed, plain = model.parameter_groups(0.05)
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert len(decayed_names) + len(plain_names) == len(names)
    for name in ("position", "level.weight", "earlier_token.weight", "copy_logit", "ages.kind", "ages.dropped",
                 "blocks.0.qkv.bias"):
        assert name in plain_names
    assert {"input_proj.weight", "head.weight", "blocks.0.qkv.weight", "blocks.1.mlp.0.weight"} <= decayed_names


def test_embeddings_start_small_beside_the_positions():
    model = NeuroAR(TransformerConfig(depth=2), DIM, CODES, SCALES)
    for weight in (model.level.weight, model.earlier_token.weight, model.position):
        assert 0.01 < weight.std().item() < 0.03


@LOCAL
def test_copy_logits_start_the_model_as_a_calibrated_copy(local):
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(CODES, DIM, SCALES).eval()
    model = NeuroAR(TransformerConfig(depth=2, local_scales=local), DIM, CODES, SCALES).eval()
    rates = [0.95, 0.7, 0.4]
    model.init_copy_logits(rates)
    target, earlier = random_tokens(4, seed=0), random_tokens(4, seed=1)
    a1 = torch.full((4,), 70.0)
    with torch.no_grad():
        logits = model(teacher_forcing_sequence(quantizer, target), *earlier_inputs(model, quantizer, earlier),
                       a1, a1 + 2)
    probability_BL = logits.softmax(-1).gather(-1, sequence(earlier)[..., None])[..., 0]
    assert torch.equal(logits.argmax(-1), sequence(earlier))
    for k, rate in enumerate(rates):
        start, length = model.starts[k], model.lengths[k]
        assert probability_BL[:, start:start + length].mean().item() == pytest.approx(rate, abs=0.03)


def test_activation_checkpointing_gives_the_same_gradients():
    gradients = []
    for checkpointing in (False, True):
        model, quantizer = build()
        model.train().activation_checkpointing = checkpointing
        target, target_BLC, earlier, ages = inputs(model, quantizer)
        F.cross_entropy(model(target_BLC, *earlier, *ages).flatten(0, 1), sequence(target).flatten()).backward()
        gradients.append([p.grad for p in model.parameters() if p.grad is not None])
    assert len(gradients[0]) == len(gradients[1]) > 10
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*gradients))


@LOCAL
@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(guidance=2.5, top_k=8, top_p=0.9,
                                                                       temperature=0.7)])
def test_kv_cache_sampling_gives_exactly_the_tokens_of_full_recomputation(sampling, local):
    model, quantizer = build(local_scales=local)
    model, quantizer = model.double(), quantizer.double()  # rounding must not decide a draw
    earlier = random_tokens(3, seed=5)
    ages = torch.tensor([60.0, 70.0, 80.0], dtype=torch.float64), torch.tensor([62.0, 75.0, 81.0], dtype=torch.float64)
    cached, f_hat = model.sample(quantizer, earlier, *ages, sampling, torch.Generator().manual_seed(1))
    full, _ = model.sample(quantizer, earlier, *ages, sampling, torch.Generator().manual_seed(1), use_cache=False)
    assert [tuple(t.shape) for t in cached] == [(3, *s) for s in SCALES]
    assert all(torch.equal(a, b) for a, b in zip(cached, full))
    again, _ = model.sample(quantizer, earlier, *ages, sampling, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(cached, again))
    assert torch.equal(f_hat, quantizer.tokens_to_fhat(cached))


@LOCAL
def test_sampling_uses_teacher_forcing_inputs_of_its_own_tokens(local):
    """Greedy sampling must equal the argmax of the teacher-forced logits computed on the sampled tokens:
    training and sampling build the inputs with the same quantizer step (and the local head the same context)."""
    model, quantizer = build(local_scales=local)
    earlier = random_tokens(2, seed=3)
    a1, a2 = torch.tensor([70.0, 71.0]), torch.tensor([73.0, 79.0])
    tokens, _ = model.sample(quantizer, earlier, a1, a2, SamplingConfig(top_k=1), torch.Generator().manual_seed(0))
    logits = model(teacher_forcing_sequence(quantizer, tokens), *earlier_inputs(model, quantizer, earlier), a1, a2)
    assert torch.equal(logits.argmax(-1), sequence(tokens))


@LOCAL
def test_expected_codes_add_the_probability_weighted_codes(local):
    """With one token certain (top-k 1) the expected codes are the drawn ones: the same tokens and f_hat as greedy
    drawing. And a position's expected code is the mean of the codes weighted by their probabilities, after the
    quantizer's interpolation and refinement as well (both are affine, so the weights carry through)."""
    model, quantizer = build(local_scales=local)
    earlier = random_tokens(2, seed=3)
    ages = torch.tensor([70.0, 71.0]), torch.tensor([73.0, 79.0])
    greedy = SamplingConfig(top_k=1)
    drawn, f_drawn = model.sample(quantizer, earlier, *ages, greedy, torch.Generator().manual_seed(0))
    expected, f_expected = model.sample(quantizer, earlier, *ages, dataclasses.replace(greedy, codes="expected"))
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected))
    assert torch.allclose(f_drawn, f_expected, atol=1e-6)
    soft = SamplingConfig(temperature=100.0, codes="expected")  # flat probabilities; no generator: nothing drawn
    _, f_soft = model.sample(quantizer, earlier, *ages, soft)
    assert torch.equal(f_soft, model.sample(quantizer, earlier, *ages, soft)[1])
    assert not torch.allclose(f_soft, f_expected, atol=1e-3)
    k = 1
    a, b = random_tokens(1, seed=8)[k], random_tokens(1, seed=9)[k]
    mixed = 0.25 * F.one_hot(a, CODES) + 0.75 * F.one_hot(b, CODES)
    f_prior = quantizer.tokens_to_fhat(random_tokens(1, seed=4)[:k])
    f_mixed, next_mixed = quantizer.add_expected(k, f_prior, mixed.float())
    (f_a, next_a), (f_b, next_b) = quantizer.add_scale(k, f_prior, a), quantizer.add_scale(k, f_prior, b)
    assert f_mixed.shape == f_a.shape and next_mixed.shape[2:] == SCALES[k + 1]
    assert torch.allclose(f_mixed, 0.25 * f_a + 0.75 * f_b, atol=1e-5)
    assert torch.allclose(next_mixed, 0.25 * next_a + 0.75 * next_b, atol=1e-5)


def test_top_k_and_top_p_draw_only_from_the_kept_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])).expand(1, 2000, 4)
    generator = torch.Generator().manual_seed(0)

    def sample_logits(logits_BlV, sampling, generator):
        return draw(token_probabilities(logits_BlV, sampling).flatten(0, 1), generator)

    top2 = sample_logits(logits, SamplingConfig(top_k=2), generator)
    assert set(top2.unique().tolist()) == {0, 1}
    nucleus = sample_logits(logits, SamplingConfig(top_p=0.75), generator)  # 0.5 + 0.3 crosses 0.75
    assert set(nucleus.unique().tolist()) == {0, 1}
    everything = sample_logits(logits, SamplingConfig(temperature=1.0), generator)
    assert set(everything.unique().tolist()) == {0, 1, 2, 3}
    share = (everything == 0).float().mean().item()
    assert abs(share - 0.5) < 0.05


def test_draws_follow_the_probabilities_and_never_pick_an_impossible_token():
    probabilities = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0])
    drawn = draw(probabilities.expand(40_000, -1), torch.Generator().manual_seed(0))
    shares = torch.bincount(drawn, minlength=6) / len(drawn)
    assert torch.allclose(shares, probabilities, atol=0.01)  # 3.5 standard errors at most
    assert shares[[0, 2, 5]].sum() == 0


def test_it_learns_to_keep_the_earlier_scans_tokens_and_does_so_on_unseen_scans():
    """Trained a few dozen steps on pairs whose later scan is the earlier one (at other ages), greedy sampling
    reproduces the tokens of scans it never saw: copying is learnable from the earlier scan's input, not
    memorised from positions. The copy logit is held at 0 throughout, since it alone would copy: the network
    must learn it from the earlier scan's code vectors and token embedding."""
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(CODES, DIM, SCALES).eval()
    nn_init_all(quantizer)
    model = NeuroAR(TransformerConfig(depth=2), DIM, CODES, SCALES)
    model.copy_logit.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameter_groups(0.0), lr=3e-3)
    for step in range(60):
        tokens = random_tokens(16, seed=100 + step)
        a1 = 60 + 20 * torch.rand(16)
        logits = model(teacher_forcing_sequence(quantizer, tokens), *earlier_inputs(model, quantizer, tokens),
                       a1, a1 + 1 + 5 * torch.rand(16))
        loss = F.cross_entropy(logits.flatten(0, 1), sequence(tokens).flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    unseen = random_tokens(8, seed=7)
    a1 = torch.full((8,), 71.0)
    predicted, _ = model.sample(quantizer, unseen, a1, a1 + 4, SamplingConfig(top_k=1),
                                torch.Generator().manual_seed(0))
    assert (sequence(predicted) == sequence(unseen)).float().mean().item() >= 0.99
    assert torch.equal(model.copy_logit, torch.zeros(len(SCALES)))


@pytest.mark.parametrize("name, tokens, attended", [("reference", 2113, 2113), ("paper", 2113, 2113),
                                                     ("demo", 22657, 1537)])  # the demo's 20x24x22 scales are local
def test_shipped_configs_build_with_their_sequence_length(name, tokens, attended):
    config = load_config(name)
    tok = config.tokenizer
    model = NeuroAR(dataclasses.replace(config.transformer, depth=1), tok.latent_dim, tok.codebook_size, tok.scales)
    assert sum(d * h * w for d, h, w in tok.scales) == tokens and model.position.shape[1] == attended
    assert model.head.out_features == tok.codebook_size

"""The NeuroAR transformer: block-causal attention, the ablation switches, the KV cache, sampling filters,
and that it can learn (overfit one pair)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from neuroar.config import SamplingConfig, TransformerConfig, load_config
from neuroar.models.quantizer import MultiScaleQuantizer
from neuroar.models.transformer import NeuroAR, earlier_scale_features, flatten, sample_logits, teacher_forcing_sequence

SCALES = ((1, 1, 1), (2, 2, 2), (3, 4, 3))
DIM, CODES = 8, 32


def build(seed: int = 0, **switches) -> tuple[NeuroAR, MultiScaleQuantizer]:
    torch.manual_seed(seed)
    config = TransformerConfig(depth=2, **switches)
    quantizer = MultiScaleQuantizer(CODES, DIM, SCALES)
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


def inputs(quantizer, batch=2, seed=0):
    target, earlier = random_tokens(batch, seed), random_tokens(batch, seed + 1)
    earlier_BLC = torch.cat([flatten(f) for f in earlier_scale_features(quantizer, earlier)], 1)
    ages = torch.tensor([70.0, 75.0][:batch]), torch.tensor([72.0, 80.0][:batch])
    return target, teacher_forcing_sequence(quantizer, target), earlier_BLC, ages


def test_a_token_sees_only_its_own_and_coarser_scales():
    model, quantizer = build()
    _, target_BLC, earlier_BLC, (a1, a2) = inputs(quantizer)
    logits = model(target_BLC, earlier_BLC, a1, a2)
    last = model.starts[-1]
    changed = target_BLC.clone()
    changed[:, last:] += 1.0  # the finest scale's inputs
    logits_changed = model(changed, earlier_BLC, a1, a2)
    assert torch.allclose(logits[:, :last], logits_changed[:, :last], atol=1e-5)
    assert not torch.allclose(logits[:, last:], logits_changed[:, last:], atol=1e-3)


@pytest.mark.parametrize("switch", ["concat_earlier", "ages"])
def test_switches_remove_exactly_their_input(switch):
    off = {"concat_earlier": False} if switch == "concat_earlier" else {"adaln": False, "cross_attention": False}
    model_on, quantizer = build(**{k: True for k in off})
    model_off, _ = build(**off)
    _, target_BLC, earlier_BLC, (a1, a2) = inputs(quantizer)
    if switch == "concat_earlier":
        other = (target_BLC, earlier_BLC + 1.0, a1, a2)
    else:
        other = (target_BLC, earlier_BLC, a1 + 5.0, a2 + 9.0)
    assert not torch.allclose(model_on(target_BLC, earlier_BLC, a1, a2), model_on(*other), atol=1e-3)
    assert torch.equal(model_off(target_BLC, earlier_BLC, a1, a2), model_off(*other))


def test_dropped_ages_make_the_prediction_age_blind():
    model, quantizer = build()
    _, target_BLC, earlier_BLC, (a1, a2) = inputs(quantizer)
    drop = torch.ones(2, dtype=torch.bool)
    older = (a1 + 3, a2 + 9)
    assert torch.equal(model(target_BLC, earlier_BLC, a1, a2, drop), model(target_BLC, earlier_BLC, *older, drop))
    assert not torch.allclose(model(target_BLC, earlier_BLC, a1, a2), model(target_BLC, earlier_BLC, *older))


def test_activation_checkpointing_gives_the_same_gradients():
    gradients = []
    for checkpointing in (False, True):
        model, quantizer = build()
        model.train().activation_checkpointing = checkpointing
        target, target_BLC, earlier_BLC, ages = inputs(quantizer)
        labels = torch.cat([t.flatten(1) for t in target], 1)
        F.cross_entropy(model(target_BLC, earlier_BLC, *ages).flatten(0, 1), labels.flatten()).backward()
        gradients.append([p.grad for p in model.parameters() if p.grad is not None])
    assert len(gradients[0]) == len(gradients[1]) > 10
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*gradients))


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(guidance=2.5, top_k=8, top_p=0.9,
                                                                       temperature=0.7)])
def test_kv_cache_sampling_gives_exactly_the_tokens_of_full_recomputation(sampling):
    model, quantizer = build()
    model, quantizer = model.double(), quantizer.double()  # rounding must not decide a draw
    earlier = random_tokens(3, seed=5)
    ages = torch.tensor([60.0, 70.0, 80.0], dtype=torch.float64), torch.tensor([62.0, 75.0, 81.0], dtype=torch.float64)
    cached = model.sample(quantizer, earlier, *ages, sampling, torch.Generator().manual_seed(1))
    full = model.sample(quantizer, earlier, *ages, sampling, torch.Generator().manual_seed(1), use_cache=False)
    assert [tuple(t.shape) for t in cached] == [(3, *s) for s in SCALES]
    assert all(torch.equal(a, b) for a, b in zip(cached, full))
    again = model.sample(quantizer, earlier, *ages, sampling, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(cached, again))


def test_sampling_uses_teacher_forcing_inputs_of_its_own_tokens():
    """Greedy sampling must equal the argmax of the teacher-forced logits computed on the sampled tokens:
    training and sampling build the inputs with the same quantizer step."""
    model, quantizer = build()
    earlier = random_tokens(2, seed=3)
    a1, a2 = torch.tensor([70.0, 71.0]), torch.tensor([73.0, 79.0])
    tokens = model.sample(quantizer, earlier, a1, a2, SamplingConfig(top_k=1), torch.Generator().manual_seed(0))
    earlier_BLC = torch.cat([flatten(f) for f in earlier_scale_features(quantizer, earlier)], 1)
    logits = model(teacher_forcing_sequence(quantizer, tokens), earlier_BLC, a1, a2)
    assert torch.equal(logits.argmax(-1), torch.cat([t.flatten(1) for t in tokens], 1))


def test_top_k_and_top_p_draw_only_from_the_kept_tokens():
    logits = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])).expand(1, 2000, 4)
    generator = torch.Generator().manual_seed(0)
    top2 = sample_logits(logits, SamplingConfig(top_k=2), generator)
    assert set(top2.unique().tolist()) == {0, 1}
    nucleus = sample_logits(logits, SamplingConfig(top_p=0.75), generator)  # 0.5 + 0.3 crosses 0.75
    assert set(nucleus.unique().tolist()) == {0, 1}
    everything = sample_logits(logits, SamplingConfig(), generator)
    assert set(everything.unique().tolist()) == {0, 1, 2, 3}
    share = (everything == 0).float().mean().item()
    assert abs(share - 0.5) < 0.05


def test_it_can_overfit_one_pair():
    torch.manual_seed(0)
    quantizer = MultiScaleQuantizer(CODES, DIM, SCALES).eval()
    model = NeuroAR(TransformerConfig(depth=2), DIM, CODES, SCALES)
    target, target_BLC, earlier_BLC, (a1, a2) = inputs(quantizer, batch=1)
    tokens_BL = torch.cat([t.flatten(1) for t in target], 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(150):
        loss = F.cross_entropy(model(target_BLC, earlier_BLC, a1, a2).flatten(0, 1), tokens_BL.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (model(target_BLC, earlier_BLC, a1, a2).argmax(-1) == tokens_BL).float().mean().item()
    assert accuracy > 0.99


@pytest.mark.parametrize("name", ["demo", "paper"])
def test_shipped_configs_build_with_their_sequence_length(name):
    config = load_config(name)
    tok = config.tokenizer
    model = NeuroAR(dataclasses.replace(config.transformer, depth=1), tok.latent_dim, tok.codebook_size, tok.scales)
    assert model.position.shape[1] == sum(d * h * w for d, h, w in tok.scales) == 2113
    assert model.head.out_features == tok.codebook_size

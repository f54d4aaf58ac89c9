"""The NeuroAR transformer: next-scale prediction of a follow-up scan's tokens from the earlier scan and
both ages.

The sequence is every scale of the target scan, coarse to fine (token maps flattened in (d, h, w) order).
The input of scale k is the target's cumulative f_hat of scales < k, area-downsampled to scale k (zeros at
scale 0), concatenated channel-wise with the earlier scan's scale-k code vectors (the residual that scan
used at that scale) and the earlier scan's own input of scale k (the same construction on its tokens: where
the two scans' coarser scales agree these channels agree, and where a coarser token changed, the finer
tokens that compensate for it change too), then projected to the width, plus a learned embedding of the
earlier scan's scale-k token ids, a level embedding and a learned 3D position per token. Both scans share
one tokenizer and one grid, so most tokens do not change between them: with the earlier token's id in its
input, "keep this token" is one linear map away from the logits, and a learned copy logit per scale (a
pointer, as in pointer-generator networks) adds to the earlier token's logit directly: initialised from the
training pairs' copy rates, the model starts as the copy baseline and learns what changes.
(`transformer.earlier` selects this input, the earlier scan's pooled f_hat, or none, for ablations.)
Attention is block-causal by scale. The ages enter every block twice: an embedding of (earlier age, target
age, years between) modulates it through AdaLN (shift, scale and gate, zero-initialised so each block
starts as the identity), and the same three age tokens are reached through cross-attention. With
`config.diagnoses`, the subject's diagnosis enters the same two ways (one more token, added to the AdaLN
condition): with ages alone a model can only predict the average rate of subjects of that age. Dropping the
conditions for a share of training pairs (learned "no age" tokens and "no diagnosis" embedding, which a scan
without a diagnosis also gets) allows classifier-free guidance at sampling time.

With a change-coding tokenizer (`transformer.earlier: latent`) the target is the follow-up's change tokens, the
earlier scan enters as its continuous latent pooled to each scale, and the copy logit sits on token 0 (no
change). With `config.local_scales`, the finest scales' logits come from `LocalHead`, a small convolutional
network that reads the transformer's last attended scale, instead of attention over 10,560 tokens each.

Sampling runs scale by scale with a KV cache; each scale's tokens go through the quantizer's `add_scale`,
the same step that built the teacher-forcing inputs during training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from neuroar.config import Config, SamplingConfig, TransformerConfig
from neuroar.errors import NeuroARError
from neuroar.models.change_regressor import ChangeRegressor
from neuroar.models.conditioning import AgeEmbedding
from neuroar.models.mean_change import advance
from neuroar.models.quantizer import MultiScaleQuantizer, Shape3, area_down


class NeuroAR(nn.Module):
    def __init__(self, config: TransformerConfig, latent_dim: int, codebook_size: int, scales: tuple[Shape3, ...]):
        super().__init__()
        self.config = config
        self.scales = tuple(tuple(s) for s in scales)
        self.lengths = [d * h * w for d, h, w in self.scales]
        self.starts = [sum(self.lengths[:k]) for k in range(len(self.scales))]
        self.ends = tuple(start + length for start, length in zip(self.starts, self.lengths))
        width = config.width
        # Scales 0..attended-1 go through attention; the last `config.local_scales` through `LocalHead`.
        self.attended = len(self.scales) - config.local_scales
        self.attended_length = self.ends[self.attended - 1]
        channels = latent_dim + earlier_channels(config.earlier, latent_dim)
        self.input_proj = nn.Linear(channels, width)
        self.earlier_token = nn.Embedding(codebook_size, width) if config.earlier == "tokens" else None
        # Added to the logit of the unchanged token (the earlier scan's, or that of no change), per scale; see
        # `init_copy_logits`.
        self.copy_logit = (nn.Parameter(torch.zeros(len(self.scales))) if config.earlier in ("tokens", "latent")
                           else None)
        self.level = nn.Embedding(self.attended, width)
        self.position = nn.Parameter(torch.empty(1, self.attended_length, width))
        self.ages = AgeEmbedding(width)
        # One row per configured diagnosis and a last one for "no diagnosis" (missing, or dropped with the ages).
        self.diagnosis = nn.Embedding(len(config.diagnoses) + 1, width) if config.diagnoses else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.head_norm = nn.LayerNorm(width, elementwise_affine=not config.adaln, eps=1e-6)
        self.head_modulation = _modulation(width, 2) if config.adaln else None
        self.head = nn.Linear(width, codebook_size)
        self.local = (LocalHead(latent_dim, channels - latent_dim, width, config.local_width, codebook_size,
                                config.local_scales) if config.local_scales else None)
        levels_L = torch.cat([torch.full((n,), k) for k, n in enumerate(self.lengths)])
        self.register_buffer("levels", levels_L, persistent=False)
        # The cohort's mean latent change per year (transformer.mean_change) and the regressor of a scan's deviation
        # from it (transformer.change_width); both set by training before the transformer, saved with the model.
        if config.mean_change:
            self.register_buffer("mean_change_Cdhw", torch.zeros(latent_dim, *self.scales[-1]))
        self.change_regressor = (ChangeRegressor(latent_dim, config.change_width).requires_grad_(False)
                                 if config.change_width else None)
        self.activation_checkpointing = False  # trade compute for memory when training: blocks recompute
        self._init_weights()

    def change_base(self, f_earlier_BCdhw: torch.Tensor, years_B: torch.Tensor, earlier_age_B: torch.Tensor
                    ) -> torch.Tensor:
        """The latent a follow-up's change tokens are coded against: the earlier latent, advanced over `years_B`
        by the cohort's mean change with `transformer.mean_change`, plus the scan's own deviation from it (read
        from its latent and `earlier_age_B`) with `transformer.change_width`."""
        if not self.config.mean_change:
            return f_earlier_BCdhw
        rate = self.mean_change_Cdhw
        if self.change_regressor is not None:
            rate = rate + self.change_regressor(f_earlier_BCdhw, earlier_age_B)
        return advance(f_earlier_BCdhw, years_B, rate)

    def _init_weights(self) -> None:
        """As GPT-2 and VAR: every linear map and embedding N(0, 0.02), biases zero, the projections back into
        the residual stream scaled down by sqrt(2 * depth); AdaLN and cross-attention outputs stay zero, so
        every block starts as the identity."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.position, std=0.02)
        for block in self.blocks:
            for projection in (block.proj, block.mlp[-1]):
                nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))
            block.zero_init()
        if self.head_modulation is not None:
            nn.init.zeros_(self.head_modulation[-1].weight)
        if self.local is not None:
            self.local.zero_init()

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups as nanoGPT forms them: weight decay on the weights of linear maps only; none on biases,
        norms, embeddings, positions or the age and "no age" tokens (the last train on 10 % of pairs only)."""
        decayed = {id(m.weight) for m in self.modules() if isinstance(m, nn.Linear)}
        params = [p for p in self.parameters() if p.requires_grad]  # not the change regressor: trained before
        return [{"params": [p for p in params if id(p) in decayed], "weight_decay": weight_decay},
                {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]

    def forward(self, target_inputs_BLC: torch.Tensor, earlier_BLC: torch.Tensor | None,
                earlier_tokens_BL: torch.Tensor | None, earlier_age_B: torch.Tensor, target_age_B: torch.Tensor,
                drop_ages_B: torch.Tensor | None = None, diagnosis_B: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, L, V) for every token of the sequence. `earlier_BLC` is the earlier scan's
        input (`earlier_scale_features`, flattened), `earlier_tokens_BL` its token ids; the model reads what
        `config.earlier` asks for (None is fine for the rest). `diagnosis_B`: `diagnosis_ids` of the subjects
        (None: no diagnosis); `drop_ages_B` drops the diagnosis too."""
        age_tokens, condition = self.conditions(earlier_age_B, target_age_B, drop_ages_B, diagnosis_B)
        n = self.attended_length
        x_BnW = self._embed(target_inputs_BLC[:, :n], _part(earlier_BLC, 0, n), _part(earlier_tokens_BL, 0, n), 0, n)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x_BnW = checkpoint(block, x_BnW, condition, age_tokens, self.ends[:self.attended], use_reentrant=False)
            else:
                x_BnW = block(x_BnW, condition, age_tokens, self.ends[:self.attended])
        hidden_BnW = self._head_input(x_BnW, condition)
        logits = [self._with_copy(self.head(hidden_BnW), _part(earlier_tokens_BL, 0, n), self.levels[:n])]
        if self.local is not None:
            context, reads = self._local_context(hidden_BnW), {}
            for k in range(self.attended, len(self.scales)):
                start, end = self.starts[k], self.ends[k]
                logits.append(self._local_logits(k, context, target_inputs_BLC[:, start:end],
                                                 _part(earlier_BLC, start, end), _part(earlier_tokens_BL, start, end),
                                                 condition, reads))
        return torch.cat(logits, 1)

    def conditions(self, earlier_age_B: torch.Tensor, target_age_B: torch.Tensor, drop_B: torch.Tensor | None,
                   diagnosis_B: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens (B, T, W) that cross-attention reaches and the AdaLN condition (B, W): the three age
        tokens and their pooled vector, and with `config.diagnoses` the diagnosis embedding as a fourth token,
        added to the condition."""
        tokens_BTW, condition_BW = self.ages(earlier_age_B, target_age_B, drop_B)
        if self.diagnosis is None:
            return tokens_BTW, condition_BW
        none = len(self.config.diagnoses)
        if diagnosis_B is None:
            diagnosis_B = torch.full_like(earlier_age_B, none, dtype=torch.long)
        if drop_B is not None:
            diagnosis_B = diagnosis_B.masked_fill(drop_B, none)
        diagnosis_BW = self.diagnosis(diagnosis_B)
        return torch.cat([tokens_BTW, diagnosis_BW[:, None]], 1), condition_BW + diagnosis_BW

    def diagnosis_ids(self, labels: Sequence[str | None]) -> torch.Tensor:
        """(B,) rows of the diagnosis embedding: a missing label ("" or None) reads "no diagnosis"; a label that
        `config.diagnoses` does not list is refused. All zeros for a model conditioned on the ages alone."""
        known = {label: i for i, label in enumerate(self.config.diagnoses)}
        ids = []
        for label in labels:
            if label is None or (isinstance(label, float) and math.isnan(label)) or str(label).strip() == "":
                ids.append(len(known))
            elif not known:
                ids.append(0)
            elif str(label) in known:
                ids.append(known[str(label)])
            else:
                raise NeuroARError(f"diagnosis {label!r} is not one this model was trained on "
                                   f"({', '.join(known)}); give one of those, or none.")
        return torch.tensor(ids, dtype=torch.long)

    def _embed(self, target_BlC: torch.Tensor, earlier_BlC: torch.Tensor | None, earlier_tokens_Bl: torch.Tensor | None,
               start: int, end: int) -> torch.Tensor:
        x = target_BlC if self.config.earlier == "none" else torch.cat([target_BlC, earlier_BlC], -1)
        x_BlW = self.input_proj(x) + self.position[:, start:end] + self.level(self.levels[start:end])
        if self.earlier_token is not None:
            x_BlW = x_BlW + self.earlier_token(earlier_tokens_Bl)
        return x_BlW

    def _head_input(self, x_BlW: torch.Tensor, condition_BW: torch.Tensor) -> torch.Tensor:
        """The last hidden states, normalised (and modulated by the condition) for the head."""
        x_BlW = self.head_norm(x_BlW)
        if self.head_modulation is not None:
            shift, scale = self.head_modulation(condition_BW)[:, None].chunk(2, -1)
            x_BlW = x_BlW * (1 + scale) + shift
        return x_BlW

    def _with_copy(self, logits_BlV: torch.Tensor, unchanged_Bl: torch.Tensor | None, levels_l: torch.Tensor
                   ) -> torch.Tensor:
        """The copy logit of each token's scale added to the logit of its unchanged token."""
        if self.copy_logit is None:
            return logits_BlV
        copy_Bl = self.copy_logit[levels_l].expand(len(logits_BlV), -1)
        return logits_BlV.scatter_add(-1, unchanged_Bl[..., None], copy_Bl[..., None].to(logits_BlV.dtype))

    def _local_context(self, hidden_BnW: torch.Tensor) -> torch.Tensor:
        """The head's input at the last attended scale as a grid (B, W, d, h, w): what `LocalHead` reads of
        the transformer."""
        grid = self.scales[self.attended - 1]
        return hidden_BnW[:, -self.lengths[self.attended - 1]:].transpose(1, 2).reshape(len(hidden_BnW), -1, *grid)

    def _local_logits(self, k: int, context_BWdhw: torch.Tensor, target_BlC: torch.Tensor,
                      earlier_BlC: torch.Tensor | None, unchanged_Bl: torch.Tensor | None, condition_BW: torch.Tensor,
                      reads: dict) -> torch.Tensor:
        """Logits (B, l, V) of scale k (one of the last `config.local_scales`) from `LocalHead`. `reads` keeps the
        head's read of the context and the earlier scan (`LocalHead.read`) over the calls of one prediction: with
        `transformer.earlier` latent or none it is the same for every local scale of one grid, so made once."""
        grid = self.scales[k]
        key = grid if self.config.earlier in ("latent", "none") else k
        if key not in reads:
            earlier = None if self.config.earlier == "none" else grid_of(earlier_BlC, grid)
            reads[key] = self.local.read(context_BWdhw, earlier, grid)
        logits_BlV = self.local(k - self.attended, grid_of(target_BlC, grid), reads[key], condition_BW)
        return self._with_copy(logits_BlV, unchanged_Bl, self.levels[self.starts[k]:self.ends[k]])

    @torch.no_grad()
    def init_copy_logits(self, copy_rates: list[float]) -> None:
        """Start as the copy baseline, calibrated: with every other logit equal, the earlier scan's token gets
        probability `copy_rates[k]` at scale k (the share of unchanged tokens in the training pairs)."""
        if self.copy_logit is None:
            return
        others = self.head.out_features - 1
        for k, rate in enumerate(copy_rates):
            rate = min(max(rate, 1e-3), 1 - 1e-3)
            self.copy_logit[k] = math.log(rate * others / (1 - rate))

    @torch.no_grad()
    def sample(self, quantizer: MultiScaleQuantizer, earlier_tokens: list[torch.Tensor], earlier_age_B: torch.Tensor,
               target_age_B: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None,
               use_cache: bool = True, diagnosis_B: torch.Tensor | None = None,
               earlier_maps: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The predicted follow-ups, one per batch item (`diagnosis_B` as in `forward`): token maps (B, d, h, w) per
        scale and their f_hat (B, C, d, h, w). With `sampling.codes` "expected", f_hat sums each scale's expected
        codes and the token maps hold the most probable tokens. `earlier_tokens`: the unchanged tokens (the earlier
        scan's own with code "scan", those of no change with code "change"); `earlier_maps`: the earlier scan's
        input per scale, (B, C', d, h, w), which by default `earlier_scale_features` makes from `earlier_tokens`
        (code "scan"); with code "change" pass `earlier_latent_features`.

        Without the cache every scale re-runs the whole prefix, block-causal by scale; both ways give
        the same logits, the cache only saves the work."""
        if earlier_maps is None:
            earlier_maps = earlier_scale_features(quantizer, earlier_tokens, self.config.earlier)
        batch = earlier_age_B.shape[0]
        guided = sampling.guidance != 1.0
        drop = torch.zeros(batch, dtype=torch.bool, device=earlier_age_B.device)
        if guided:  # conditional and unconditional halves of one batch
            earlier_maps = [torch.cat([m, m]) for m in earlier_maps]
            earlier_tokens = [torch.cat([t, t]) for t in earlier_tokens]
            earlier_age_B, target_age_B = earlier_age_B.repeat(2), target_age_B.repeat(2)
            diagnosis_B = None if diagnosis_B is None else diagnosis_B.repeat(2)
            drop = torch.cat([drop, ~drop])
        age_tokens, condition = self.conditions(earlier_age_B, target_age_B, drop, diagnosis_B)
        caches: list[dict[str, torch.Tensor]] | None = [{} for _ in self.blocks] if use_cache else None
        f_hat = None
        next_input = earlier_maps[0].new_zeros(len(earlier_maps[0]), quantizer.codebook.embedding_dim, *self.scales[0])
        embedded, tokens, context, hidden_BlW, reads = [], [], None, None, {}
        for k, scale in enumerate(self.scales):
            start, end = self.starts[k], self.ends[k]
            if guided and k:
                next_input = torch.cat([next_input, next_input])
            unchanged_Bl = earlier_tokens[k].flatten(1)
            if k >= self.attended:
                if context is None:
                    context = self._local_context(hidden_BlW)
                logits_BlV = self._local_logits(k, context, flatten(next_input), flatten(earlier_maps[k]),
                                                unchanged_Bl, condition, reads)
            else:
                embedded.append(self._embed(flatten(next_input), flatten(earlier_maps[k]), unchanged_Bl, start, end))
                if use_cache:  # this scale's queries see every cached key: no scale boundaries to keep
                    x, ends = embedded[-1], None
                else:
                    x, ends = torch.cat(embedded, 1), self.ends[:k + 1]
                for b, block in enumerate(self.blocks):
                    x = block(x, condition, age_tokens, ends, caches[b] if caches is not None else None)
                hidden_BlW = self._head_input(x[:, -self.lengths[k]:], condition)
                logits_BlV = self._with_copy(self.head(hidden_BlW), unchanged_Bl, self.levels[start:end])
            if guided:
                conditional, unconditional = logits_BlV.chunk(2)
                logits_BlV = unconditional + sampling.guidance * (conditional - unconditional)
            probabilities_BlV = token_probabilities(logits_BlV, sampling)
            if sampling.codes == "expected":
                idx_Bl = probabilities_BlV.argmax(-1)
                f_hat, next_input = quantizer.add_expected(k, f_hat, probabilities_BlV.view(batch, *scale, -1))
            else:
                idx_Bl = draw(probabilities_BlV.flatten(0, 1), generator).view(batch, -1)
                f_hat, next_input = quantizer.add_scale(k, f_hat, idx_Bl.view(batch, *scale))
            tokens.append(idx_Bl.view(batch, *scale))
        return tokens, f_hat


def build_transformer(config: Config) -> NeuroAR:
    """NeuroAR for a config's tokenizer (its codebook, latent channels and scales)."""
    tok = config.tokenizer
    return NeuroAR(config.transformer, tok.latent_dim, tok.codebook_size, tok.scales)


class Block(nn.Module):
    """Self-attention (block-causal, optionally cached), cross-attention to the age tokens, MLP; AdaLN."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        width, self.heads = config.width, config.heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=not config.adaln, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.cross = CrossAttention(width, self.heads) if config.cross_attention else None
        self.norm2 = nn.LayerNorm(width, elementwise_affine=not config.adaln, eps=1e-6)
        hidden = int(width * config.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.modulation = _modulation(width, 6) if config.adaln else None
        self.drop = nn.Dropout(config.dropout)

    def zero_init(self) -> None:
        """AdaLN-Zero and a zero cross-attention output: the block starts as the identity of the stream."""
        if self.modulation is not None:
            nn.init.zeros_(self.modulation[-1].weight)
        if self.cross is not None:
            nn.init.zeros_(self.cross.proj.weight)

    def forward(self, x_BLW: torch.Tensor, condition_BW: torch.Tensor, age_tokens_B3W: torch.Tensor,
                scale_ends: tuple[int, ...] | None, cache: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if self.modulation is not None:
            shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(condition_BW)[:, None].chunk(6, -1)
        else:
            shift1 = scale1 = shift2 = scale2 = torch.zeros((), device=x_BLW.device)
            gate1 = gate2 = torch.ones((), device=x_BLW.device)
        x_BLW = x_BLW + gate1 * self.drop(self._attend(self.norm1(x_BLW) * (1 + scale1) + shift1, scale_ends, cache))
        if self.cross is not None:
            x_BLW = x_BLW + self.cross(x_BLW, age_tokens_B3W)
        return x_BLW + gate2 * self.drop(self.mlp(self.norm2(x_BLW) * (1 + scale2) + shift2))

    def _attend(self, x_BLW: torch.Tensor, scale_ends: tuple[int, ...] | None,
                cache: dict[str, torch.Tensor] | None) -> torch.Tensor:
        """Self-attention, block-causal by scale: the queries of the scale ending at `scale_ends[k]` see every
        key before that end. Computed scale by scale without a mask, which lets SDPA use its fused kernel and
        skips the masked-out blocks (a masked L x L attention computes and discards them). `scale_ends` None:
        every query sees every key (one scale against the cache of coarser ones)."""
        B, L, W = x_BLW.shape
        q, k, v = self.qkv(x_BLW).view(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:  # keys and values of coarser scales, computed once
            if cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        if scale_ends is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end])
                             for start, end in zip((0, *scale_ends[:-1]), scale_ends)], 2)
        return self.proj(out.transpose(1, 2).reshape(B, L, W))


class CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLW: torch.Tensor, context_BTW: torch.Tensor) -> torch.Tensor:
        B, L, W = x_BLW.shape
        q = self.q(self.norm(x_BLW)).view(B, L, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context_BTW).view(B, -1, 2, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, W))


def _modulation(width: int, chunks: int) -> nn.Sequential:
    linear = nn.Linear(width, chunks * width)
    nn.init.zeros_(linear.weight)  # AdaLN-Zero: no shift, no scale and closed gates at the start
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.SiLU(), linear)


def flatten(map_BCdhw: torch.Tensor) -> torch.Tensor:
    """(B, C, d, h, w) -> (B, d*h*w, C), tokens in (d, h, w) order."""
    return map_BCdhw.flatten(2).transpose(1, 2)


def earlier_channels(kind: str, latent_dim: int) -> int:
    """Channels of the earlier scan's input (`earlier_scale_features`) that the model reads, per token."""
    return {"none": 0, "fhat": latent_dim, "latent": latent_dim, "tokens": 2 * latent_dim}[kind]


def _part(x: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    return None if x is None else x[:, start:end]


def grid_of(x_BlC: torch.Tensor, grid: Shape3) -> torch.Tensor:
    """A scale's flattened tokens (B, l, C) as a grid (B, C, d, h, w): the inverse of `flatten`."""
    return x_BlC.transpose(1, 2).reshape(len(x_BlC), -1, *grid)


class LocalHead(nn.Module):
    """The logits of the finest scales (`transformer.local_scales`) from a small 3D convolutional network in
    place of attention: each token reads its 3x3x3 neighbourhood of the target's input and the earlier scan's,
    and the transformer's head input at the last attended scale (projected, then upsampled), modulated by the
    condition (ages, diagnosis) as AdaLN modulates the blocks. A scale's tokens are predicted together from the
    coarser ones either way (as in VAR); attention's reach over the whole scale is what is given up, and a
    cost that grows with the tokens, not their square, is what is gained: a 20x24x22 scale has 10,560 of them.
    Its output starts at zero, so the model starts as the calibrated copy of `init_copy_logits` there too.

    The first convolution reads (target's input, earlier scan's input, context) concatenated; being linear, it is
    computed as the sum of its target part and the rest (`read`), which the local scales of one grid share: the
    finest scales' cost is then mostly their own input's and the layers after it."""

    def __init__(self, target_channels: int, earlier_channels: int, width: int, hidden: int, codebook_size: int,
                 scales: int):
        super().__init__()
        self.target_channels = target_channels
        self.context = nn.Linear(width, hidden)
        self.level = nn.Embedding(scales, hidden)
        self.inputs = nn.Conv3d(target_channels + earlier_channels + hidden, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(1, hidden, affine=False)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * hidden))  # shift and scale
        self.conv = nn.Conv3d(hidden, hidden, 3, padding=1)
        self.out = nn.Conv3d(hidden, codebook_size, 1)

    def zero_init(self) -> None:
        for layer in (self.out, self.modulation[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def read(self, context_BWdhw: torch.Tensor, earlier_BCdhw: torch.Tensor | None, grid: Shape3) -> torch.Tensor:
        """The first convolution's part (B, H, d, h, w) over the transformer's context, upsampled to `grid`, and the
        earlier scan's input (None: the model reads none), bias included."""
        context = self.context(context_BWdhw.movedim(1, -1)).movedim(-1, 1)
        context = F.interpolate(context, size=grid, mode="trilinear", align_corners=False)
        parts = [context] if earlier_BCdhw is None else [earlier_BCdhw, context.to(earlier_BCdhw.dtype)]
        return F.conv3d(torch.cat(parts, 1), self.inputs.weight[:, self.target_channels:], self.inputs.bias, padding=1)

    def forward(self, j: int, target_BCdhw: torch.Tensor, read_BHdhw: torch.Tensor, condition_BW: torch.Tensor
                ) -> torch.Tensor:
        """Logits (B, l, V) of the j-th local scale from its target's input and `read`'s output."""
        target = F.conv3d(target_BCdhw, self.inputs.weight[:, :self.target_channels], padding=1)
        h = read_BHdhw + target.to(read_BHdhw.dtype) + self.level.weight[j][None, :, None, None, None]
        shift, scale = self.modulation(condition_BW)[:, :, None, None, None].chunk(2, 1)
        h = h + self.conv(F.silu(self.norm(h) * (1 + scale) + shift))
        # The 1x1x1 output convolution as a linear map over the tokens: logits come out (B, l, V) without a copy.
        return F.linear(flatten(F.silu(h)), self.out.weight.flatten(1), self.out.bias)


@torch.no_grad()
def earlier_scale_features(quantizer: MultiScaleQuantizer, tokens: list[torch.Tensor], kind: str
                           ) -> list[torch.Tensor]:
    """The earlier scan's input at every scale from its tokens (code "scan"), (B, C', d, h, w) each: "tokens" =
    its scale-k code vectors beside its own teacher-forcing input of scale k (C' = 2C); "fhat" = its f_hat of all
    scales area-downsampled to scale k (C' = C); "none" = zeros (unused). With code "change" see
    `earlier_latent_features`."""
    if kind == "tokens":
        codes = [F.embedding(idx_Bdhw, quantizer.codes_at(k)).permute(0, 4, 1, 2, 3)
                 for k, idx_Bdhw in enumerate(tokens)]
        inputs = [torch.zeros_like(codes[0]), *quantizer.teacher_forcing_inputs(tokens)]
        return [torch.cat([c, i], 1) for c, i in zip(codes, inputs)]
    if kind == "fhat":
        f_hat = quantizer.tokens_to_fhat(tokens)
        return [area_down(f_hat, scale) for scale in quantizer.scales]
    channels = quantizer.codebook.embedding_dim
    return [torch.zeros(len(idx), channels, *idx.shape[1:], device=idx.device) for idx in tokens]


@torch.no_grad()
def earlier_latent_features(scales: Sequence[Shape3], f_BCdhw: torch.Tensor) -> list[torch.Tensor]:
    """The earlier scan's continuous latent area-downsampled to every scale (`transformer.earlier: latent`, the
    input of a model of a change-coding tokenizer's tokens)."""
    return [area_down(f_BCdhw, scale) for scale in scales]


@torch.no_grad()
def teacher_forcing_sequence(quantizer: MultiScaleQuantizer, tokens: list[torch.Tensor]) -> torch.Tensor:
    """The target's inputs for every token, (B, L, C): zeros at scale 0, then the quantizer's teacher-forcing
    inputs of scales 1..K-1."""
    inputs = quantizer.teacher_forcing_inputs(tokens)
    first = torch.zeros(tokens[0].shape[0], quantizer.tokens_per_scale[0], quantizer.codebook.embedding_dim,
                        device=tokens[0].device)
    return torch.cat([first, *map(flatten, inputs)], 1)


def token_probabilities(logits_BlV: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering: the probabilities (B, l, V) sampling uses."""
    logits = logits_BlV.float() / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= sampling.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    return logits.softmax(-1)


def draw(probabilities_NV: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row, drawn with the row's probabilities (N,): the first whose cumulative probability
    exceeds a uniform draw. torch.multinomial does the same but on CPU took 0.23 s for the 21,120 x 512 of a
    20x24x22 scale's two samples against 0.02 s (a third of the demo's evaluation went into it)."""
    cumulative_NV = probabilities_NV.cumsum(-1)
    uniform_N1 = torch.rand(len(probabilities_NV), 1, generator=generator, device=probabilities_NV.device)
    index_N = torch.searchsorted(cumulative_NV, uniform_N1 * cumulative_NV[:, -1:], right=True).clamp_max(
        probabilities_NV.shape[1] - 1).squeeze(1)
    # Rounding can push the draw past the last cumulative sum: there the index must still be a possible token.
    possible_N = probabilities_NV.gather(1, index_N[:, None]).squeeze(1) > 0
    return torch.where(possible_N, index_N, probabilities_NV.argmax(-1))

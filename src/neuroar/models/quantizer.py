"""The multi-scale residual quantizer (VAR's next-scale tokenization, in 3D with (d, h, w) scales).

    f_rest = f; f_hat = 0
    for k, scale in enumerate(scales):
        z   = area_down(f_rest, scale)                       # identity at the last scale
        idx = nearest code of z in the shared codebook
        h   = phi_k(trilinear_up(codebook[idx], latent))      # per-scale 3x3x3 refinement
        f_hat += h; f_rest -= h

Its users need exactly four conversions, all built on `add_scale`, the one step that turns a scale's
tokens into the next f_hat and the next scale's transformer input:
features -> tokens (`encode`), tokens -> f_hat (`tokens_to_fhat`), tokens -> teacher-forcing inputs
(`teacher_forcing_inputs`), and the sampling step (`add_scale` itself). Training and sampling therefore
build the transformer's inputs with the same code.

Codebook health: Euclidean lookup with a commitment loss; the codebook starts from the encoder's features of
the first training batch (all scales), so that codes and features share a scale from step one; an EMA of
each code's use, and restarts of codes that fell out of use (replaced by features the encoder produces now).

Precision: the quantizer always runs in float32 with autocast off (as VAR's does): under bf16 the nearest
code of a feature can differ from the one float32 finds, and the decoder would train on other tokens than
the ones cached for the transformer.

Coding a change (`zero_code`, the tokenizer's code "change"): code 0 is pinned to the zero vector and the
refinements have no bias, so "nothing changed here" is token 0 at every scale and decodes to exactly nothing.
With `dead_zone` > 0 a vector takes token 0 unless another code brings it closer by more than dead_zone times
the mean energy of the change vectors (an EMA over training): the small, unpredictable part of a change (the
two scans' noise) is left out of the tokens, which then say where something changed, the part a model can learn.

One codebook per scale (`per_scale`): scale k looks its residual up in a codebook of its own (token ids stay
0..V-1 at every scale, as residual VQ in audio codecs). With one codebook shared by all scales (VAR's), the
residuals that shrink from scale to scale compete with the first scales' large vectors for the same codes: in a
tokenizer with four 20x24x22 stages the code histograms' perplexities were 340 at the first, 85, 18 and 3 at the
next three, so the last stages' rest mostly fell to a few codes and more stages stopped carrying more of a change
(benchmarks/TOKEN_SPACE_ADOLESCENT_STUDY.md). Each codebook starts from its own scale's residuals (the residual
loop run once at initialisation), and restarts its dead codes from them.

Several processes: the trainer hands the quantizer two functions (`connect`): one that gathers the global
batch, so that initialisation and restarts see what one process would see, and one that broadcasts rank 0's
codebook and code-use buffers after each update, so that every rank keeps the same codebook even where their
random streams differ. Alone, both are the identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from neuroar.config import Shape3


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _float32(x: torch.Tensor):
    """Autocast off on x's device (the meta device of `neuroar plan` has no autocast to turn off)."""
    if torch.amp.is_autocast_available(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


class MultiScaleQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, scales: tuple[Shape3, ...], beta: float = 0.25,
                 phi_mix: float = 0.5, usage_decay: float = 0.95, dead_usage: float = 0.03, zero_code: bool = False,
                 dead_zone: float = 0.0, per_scale: bool = False):
        super().__init__()
        self.scales = tuple(tuple(s) for s in scales)
        self.latent = self.scales[-1]
        self.beta = beta
        self.phi_mix = phi_mix  # h = (1 - mix) h + mix conv(h): the refinement starts near the identity
        self.size = codebook_size  # V codes in each codebook
        self.books = len(self.scales) if per_scale else 1
        self.codebook = nn.Embedding(self.books * codebook_size, dim)  # codebook b is rows b*V .. (b+1)*V-1
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)
        self.phis = nn.ModuleList(nn.Conv3d(dim, dim, 3, padding=1, bias=not zero_code) for _ in self.scales)
        self.zero_code, self.dead_zone = zero_code, dead_zone
        keep = torch.ones(self.books, codebook_size)
        if zero_code:
            keep[:, 0] = 0.0
        self.register_buffer("keep", keep.flatten(), persistent=False)  # 0 for each codebook's pinned zero code
        # EMA of a change vector's squared norm (dead_zone's unit); kept in checkpoints of change coders only.
        self.register_buffer("energy", torch.ones(()), persistent=zero_code)
        self.usage_decay, self.dead_usage = usage_decay, dead_usage
        # EMA of each code's share of its codebook's use, relative to uniform use (1.0 = used as often as 1/V of
        # the tokens that codebook coded).
        self.register_buffer("usage", torch.ones(self.books * codebook_size))
        self.register_buffer("initialized", torch.tensor(False))
        self.gather_batch: Callable[[torch.Tensor], torch.Tensor] = _same
        self.broadcast: Callable[[torch.Tensor], torch.Tensor] = _same

    def connect(self, gather_batch: Callable[[torch.Tensor], torch.Tensor],
                broadcast: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Train under several processes: `gather_batch` returns the global batch from this rank's share,
        `broadcast` overwrites a tensor in place with rank 0's."""
        self.gather_batch, self.broadcast = gather_batch, broadcast

    @property
    def codes(self) -> torch.Tensor:
        """Every codebook's code vectors (books * V, C), the zero codes pinned (no gradient reaches them)."""
        return self.codebook.weight * self.keep[:, None] if self.zero_code else self.codebook.weight

    def book(self, k: int) -> int:
        """The codebook that scale k looks its residual up in."""
        return k if self.books > 1 else 0

    def codes_at(self, k: int) -> torch.Tensor:
        """Scale k's code vectors (V, C): token i of scale k decodes from row i."""
        b = self.book(k)
        return self.codes[b * self.size:(b + 1) * self.size]

    @property
    def tokens_per_scale(self) -> list[int]:
        return [d * h * w for d, h, w in self.scales]

    def forward(self, f_BCdhw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, dict]:
        """Quantize; returns (f_hat with a straight-through gradient to f, tokens per scale, vq loss, stats)."""
        with _float32(f_BCdhw):
            return self._forward(f_BCdhw.float())

    def _forward(self, f_BCdhw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, dict]:
        f_detached = f_BCdhw.detach()
        # Codebook initialisation and restarts use the global batch (in its global order), as one process would.
        f_global = self.gather_batch(f_detached) if self.training else f_detached
        # On the meta device (`neuroar plan` counting FLOPs and memory) there are no values to initialise
        # from, restart with or report.
        updates = self.training and not f_BCdhw.is_meta
        if updates and not bool(self.initialized):
            self._initialize(f_global)
        if updates and self.dead_zone > 0:
            with torch.no_grad():
                self.energy.mul_(self.usage_decay).add_((1 - self.usage_decay) * f_global.square().sum(1).mean())
        f_hats, tokens, residuals = self._quantize(f_detached)
        # Codebook and refinements move toward the features; the encoder commits to the quantization.
        loss = sum(F.mse_loss(f_hat, f_detached) + self.beta * F.mse_loss(f_hat.detach(), f_BCdhw)
                   for f_hat in f_hats) / len(self.scales)
        global_tokens = tokens
        if updates:
            if f_global is not f_detached:
                with torch.no_grad():
                    _, global_tokens, residuals = self._quantize(f_global)
            self._update_usage(global_tokens, residuals)
        # Reported for the global batch, so that several processes report what one process would.
        stats = self.usage_stats(global_tokens) if not f_BCdhw.is_meta else {}
        # Straight-through: the decoder sees f_hat, its gradient reaches the encoder as if quantization were
        # the identity; codebook and refinements learn from the vq loss alone.
        f_hat_ste = f_BCdhw + (f_hats[-1] - f_BCdhw).detach()
        return f_hat_ste, tokens, loss, stats

    @torch.no_grad()
    def encode(self, f_BCdhw: torch.Tensor) -> list[torch.Tensor]:
        """Token maps, coarse to fine: a list of (B, d, h, w) integer tensors."""
        with _float32(f_BCdhw):
            return self._quantize(f_BCdhw.float())[1]

    def _quantize(self, f_BCdhw: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The residual loop: cumulative f_hat after each scale, tokens, and per scale the (N, C) vectors that were
        looked up (the candidates for restarting dead codes). `f_BCdhw` must carry no gradient."""
        f_hat, f_hats, tokens, residuals = None, [], [], []
        for k, scale in enumerate(self.scales):
            z_BCdhw = area_down(f_BCdhw if f_hat is None else f_BCdhw - f_hat.detach(), scale)
            idx_Bdhw = self._nearest(z_BCdhw, k)
            f_hat, _ = self.add_scale(k, f_hat, idx_Bdhw)
            f_hats.append(f_hat)
            tokens.append(idx_Bdhw)
            residuals.append(z_BCdhw.permute(0, 2, 3, 4, 1).reshape(-1, z_BCdhw.shape[1]))
        return f_hats, tokens, residuals

    def tokens_to_fhat(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        f_hat = None
        for k, idx_Bdhw in enumerate(tokens):
            f_hat, _ = self.add_scale(k, f_hat, idx_Bdhw)
        return f_hat

    def teacher_forcing_inputs(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """The transformer's inputs for scales 1..K-1: the cumulative f_hat of coarser scales, area-downsampled
        to each next scale, as (B, C, d, h, w) tensors."""
        f_hat, inputs = None, []
        for k, idx_Bdhw in enumerate(tokens[:-1]):
            f_hat, next_BCdhw = self.add_scale(k, f_hat, idx_Bdhw)
            inputs.append(next_BCdhw)
        return inputs

    def add_scale(self, k: int, f_hat: torch.Tensor | None, idx_Bdhw: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add scale k's tokens to f_hat; return the new f_hat and the input for scale k + 1 (None after the
        last scale). The one step shared by encoding, decoding, teacher forcing and sampling (float32)."""
        with _float32(idx_Bdhw):
            return self._add_codes(k, f_hat, F.embedding(idx_Bdhw, self.codes_at(k)).permute(0, 4, 1, 2, 3))

    def add_expected(self, k: int, f_hat: torch.Tensor | None, probabilities_BdhwV: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`add_scale` with each position's code replaced by the mean of scale k's codes weighted by its
        probabilities over the tokens (one-hot probabilities give `add_scale`'s result)."""
        with _float32(probabilities_BdhwV):
            h_BdhwC = probabilities_BdhwV.float() @ self.codes_at(k)
            return self._add_codes(k, f_hat, h_BdhwC.permute(0, 4, 1, 2, 3))

    def _add_codes(self, k: int, f_hat: torch.Tensor | None, h_BCdhw: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if tuple(h_BCdhw.shape[2:]) != self.latent:
            h_BCdhw = F.interpolate(h_BCdhw, size=self.latent, mode="trilinear", align_corners=False)
        h_BCdhw = (1 - self.phi_mix) * h_BCdhw + self.phi_mix * self.phis[k](h_BCdhw)
        f_hat = h_BCdhw if f_hat is None else f_hat.float() + h_BCdhw
        if k + 1 == len(self.scales):
            return f_hat, None
        return f_hat, area_down(f_hat, self.scales[k + 1])

    def usage_stats(self, tokens: list[torch.Tensor]) -> dict[str, float]:
        """Per scale: the share of the codebook used in this batch, and the perplexity of the code histogram."""
        stats = {}
        for k, idx in enumerate(tokens):
            counts = torch.bincount(idx.flatten(), minlength=self.size).float()
            p = counts / counts.sum()
            stats[f"scale{k}_used"] = float((counts > 0).float().mean())
            stats[f"scale{k}_perplexity"] = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
        return stats

    def _nearest(self, z_BCdhw: torch.Tensor, k: int, chunk: int = 8192) -> torch.Tensor:
        """The nearest code of scale k's codebook for every vector. |z|^2 is the same for every code of a row and
        left out; rows go in chunks whose (chunk, V) distances stay in cache (6x faster on a CPU than one (N, V)
        matrix)."""
        B, C, d, h, w = z_BCdhw.shape
        z_NC = z_BCdhw.permute(0, 2, 3, 4, 1).reshape(-1, C)
        codes_VC = self.codes_at(k)
        cost_V = codes_VC.square().sum(1)
        if self.zero_code and self.dead_zone > 0:  # any code but zero must be worth its cost
            cost_V = cost_V + self.dead_zone * self.energy * (torch.arange(len(cost_V), device=cost_V.device) > 0)
        nearest = [torch.addmm(cost_V, part_nC, codes_VC.T, alpha=-2).argmin(dim=1) for part_nC in z_NC.split(chunk)]
        return torch.cat(nearest).view(B, d, h, w)

    @torch.no_grad()
    def _initialize(self, f_BCdhw: torch.Tensor) -> None:
        C = f_BCdhw.shape[1]
        if self.books == 1:  # the shared codebook: from the features at every scale
            vectors_NC = torch.cat([area_down(f_BCdhw, s).permute(0, 2, 3, 4, 1).reshape(-1, C) for s in self.scales])
            self._fill(0, vectors_NC)
        else:  # scale k's codebook from the residual that scale k looks up once the coarser scales are coded
            f_hat = None
            for k, scale in enumerate(self.scales):
                z_BCdhw = area_down(f_BCdhw if f_hat is None else f_BCdhw - f_hat, scale)
                self._fill(k, z_BCdhw.permute(0, 2, 3, 4, 1).reshape(-1, C))
                f_hat, _ = self.add_scale(k, f_hat, self._nearest(z_BCdhw, k))
        self.broadcast(self.codebook.weight.data)
        self.energy.fill_(float(f_BCdhw.square().sum(1).mean()))
        self.initialized.fill_(True)

    def _fill(self, b: int, vectors_NC: torch.Tensor) -> None:
        """Codebook b from randomly picked vectors, each with a little noise so that no two codes are equal."""
        V, C = self.size, vectors_NC.shape[1]
        pick = torch.randint(len(vectors_NC), (V,), device=vectors_NC.device)
        noise = 0.01 * vectors_NC.std() * torch.randn(V, C, device=vectors_NC.device)
        self.codebook.weight.data[b * V:(b + 1) * V] = vectors_NC[pick] + noise

    @torch.no_grad()
    def _update_usage(self, tokens: list[torch.Tensor], residuals: list[torch.Tensor]) -> None:
        V = self.size
        for b in range(self.books):
            scales = [k for k in range(len(self.scales)) if self.book(k) == b]
            counts = sum(torch.bincount(tokens[k].flatten(), minlength=V).float() for k in scales)
            usage, keep = self.usage[b * V:(b + 1) * V], self.keep[b * V:(b + 1) * V]
            usage.mul_(self.usage_decay).add_((1 - self.usage_decay) * counts * V / counts.sum())
            dead = ((usage < self.dead_usage) & (keep > 0)).nonzero().flatten()
            if len(dead):
                # Restart dead codes on residuals this codebook's scales look up now, so they can be picked again.
                residuals_NC = torch.cat([residuals[k] for k in scales])
                pick = torch.randint(len(residuals_NC), (len(dead),), device=residuals_NC.device)
                self.codebook.weight.data[b * V + dead] = residuals_NC[pick].to(self.codebook.weight.dtype)
                usage[dead] = 1.0
        # Every rank computed the same use from the same global batch; rank 0's random picks are the ones kept.
        self.broadcast(self.codebook.weight.data)
        self.broadcast(self.usage)


def area_down(f_BCdhw: torch.Tensor, size: Shape3) -> torch.Tensor:
    if tuple(f_BCdhw.shape[2:]) == tuple(size):
        return f_BCdhw
    return F.adaptive_avg_pool3d(f_BCdhw, size)

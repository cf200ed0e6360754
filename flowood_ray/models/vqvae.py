"""VQ-VAE with a PixelSNAIL prior over its code map, and latent restoration (Marimont & Tarroni 2021).

* :class:`VQVAE` compresses a face crop to an (h, w) map of discrete codes (EMA codebook,
  dead-code restarts, commitment loss, straight-through gradients) and decodes codes back.
* :class:`PixelSNAIL` is an autoregressive prior over that map in raster order:
  ``p(c) = prod_i p(c_i | c_<i)``. Causality comes from shifted convolutions in two streams (a
  vertical one that sees only rows above, a horizontal one that sees rows above and the left part of
  the current row) and from strictly causal self-attention.
* :func:`restore` resamples chosen (or unlikely) codes from the prior conditioned on the rest, in
  raster order (up to one prior pass per position); :func:`restore_parallel` is its one-pass
  approximation that judges and redraws every code given the original codes before it. The
  pixel-wise score decodes several restorations and weighs the residuals.

Codes are (N, h, w) int64 tensors; NLLs are in nats.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from flowood_ray.models.randomness import draw


class VQVAEConfig(BaseModel):
    """Hyper-parameters of a :class:`VQVAE`; saved as JSON with every run and enough to rebuild it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    in_channels: int = Field(3, ge=1)
    image_size: int = Field(64, ge=2)
    hidden_channels: int = Field(128, ge=2)
    res_channels: int = Field(64, ge=1)
    n_res_blocks: int = Field(2, ge=0)
    downsample_levels: int = Field(2, ge=1)  # 64x64 -> 16x16 with 2, 8x8 with 3
    codebook_size: int = Field(512, ge=2)
    code_dim: int = Field(64, ge=1)
    commitment: float = Field(0.25, ge=0)
    ema_decay: float = Field(0.99, gt=0, lt=1)
    # Codes whose EMA usage (assignments per training batch) falls below this are re-seeded from
    # encoder outputs; it scales with the number of code positions per batch.
    dead_code_threshold: float = Field(1.0, ge=0)
    recon_loss: Literal["mse", "l1"] = "mse"

    @model_validator(mode="after")
    def _check_divisible(self) -> VQVAEConfig:
        if self.image_size % 2**self.downsample_levels:
            raise ValueError("image_size must be divisible by 2**downsample_levels")
        return self

    @property
    def code_size(self) -> int:
        """Side of the square code map."""
        return self.image_size // 2**self.downsample_levels


class _ResBlock(nn.Module):
    def __init__(self, channels: int, res_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, res_channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(res_channels, channels, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with exponential-moving-average updates (van den Oord et al. 2017).

    The codebook is a buffer, updated in training mode only, from the EMA of assignment counts
    (``cluster_size``) and of the sums of assigned vectors (``embed_sum``) with Laplace smoothing.
    Codes whose EMA count drops below ``dead_code_threshold`` are moved onto random encoder outputs
    of the current batch, so a poor initialisation or a drifting encoder cannot leave most of the
    codebook unused. Under torch.distributed the statistics are summed over ranks and restarts are
    taken from rank 0, so every rank keeps the same codebook.
    """

    def __init__(
        self, num_codes: int, dim: int, decay: float = 0.99, dead_code_threshold: float = 1.0, eps: float = 1e-5
    ) -> None:
        super().__init__()
        self.num_codes = num_codes
        self.decay = decay
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps
        self.register_buffer("embedding", torch.randn(num_codes, dim))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_sum", torch.zeros(num_codes, dim))

    def nearest(self, flat: Tensor) -> Tensor:
        """Index of the closest code for each row of ``flat`` (M, D)."""
        distances = (
            flat.pow(2).sum(dim=1, keepdim=True)
            - 2.0 * flat @ self.embedding.T
            + self.embedding.pow(2).sum(dim=1)[None, :]
        )
        return distances.argmin(dim=1)

    def lookup(self, codes: Tensor) -> Tensor:
        """Codes (N, h, w) -> code vectors (N, D, h, w)."""
        return F.embedding(codes, self.embedding).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, codes: Tensor) -> None:
        counts = torch.bincount(codes, minlength=self.num_codes).to(flat.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, flat)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.embedding.copy_(self.embed_sum / smoothed[:, None])

        dead = self.cluster_size < self.dead_code_threshold
        n_dead = int(dead.sum())
        if n_dead:
            picks = flat[torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)]
            self.embedding[dead] = picks
            # Seed the EMA so that embed_sum / cluster_size equals the new vector.
            self.cluster_size[dead] = self.dead_code_threshold
            self.embed_sum[dead] = picks * self.dead_code_threshold
            if distributed:
                for buffer in (self.embedding, self.cluster_size, self.embed_sum):
                    dist.broadcast(buffer, src=0)

    def forward(self, z_e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z_e (N, D, h, w) -> (straight-through quantised z, commitment MSE, codes (N, h, w))."""
        n, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        codes = self.nearest(flat.detach())
        if self.training:
            self._ema_update(flat.detach(), codes)
        codes = codes.view(n, h, w)
        z_q = self.lookup(codes)
        commitment = F.mse_loss(z_e, z_q.detach())
        # Straight-through: the decoder's gradient w.r.t. z_q is passed to the encoder unchanged.
        return z_e + (z_q - z_e).detach(), commitment, codes


class VQVAE(nn.Module):
    """``forward(x) -> (reconstruction, vq_loss, codes)``; train on ``recon_loss(recon, x) + vq_loss``.

    x is float (N, C, H, W), e.g. from :func:`flowood_ray.models.glow.preprocess` (range [-0.5, 0.5)).
    """

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_channels
        encoder: list[nn.Module] = []
        channels = config.in_channels
        for level in range(config.downsample_levels):
            out = hidden if level == config.downsample_levels - 1 else hidden // 2
            encoder += [nn.Conv2d(channels, out, 4, stride=2, padding=1), nn.ReLU()]
            channels = out
        encoder.append(nn.Conv2d(hidden, hidden, 3, padding=1))
        encoder += [_ResBlock(hidden, config.res_channels) for _ in range(config.n_res_blocks)]
        encoder += [nn.ReLU(), nn.Conv2d(hidden, config.code_dim, 1)]
        self.encoder = nn.Sequential(*encoder)

        self.quantizer = VectorQuantizer(
            config.codebook_size, config.code_dim, config.ema_decay, config.dead_code_threshold
        )

        decoder: list[nn.Module] = [nn.Conv2d(config.code_dim, hidden, 3, padding=1)]
        decoder += [_ResBlock(hidden, config.res_channels) for _ in range(config.n_res_blocks)]
        decoder.append(nn.ReLU())
        channels = hidden
        for level in range(config.downsample_levels):
            last = level == config.downsample_levels - 1
            out = config.in_channels if last else hidden // 2
            decoder.append(nn.ConvTranspose2d(channels, out, 4, stride=2, padding=1))
            if not last:
                decoder.append(nn.ReLU())
            channels = out
        self.decoder = nn.Sequential(*decoder)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z_q, commitment, codes = self.quantizer(self.encoder(x))
        return self.decoder(z_q), self.config.commitment * commitment, codes

    def loss(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(total loss, reconstruction loss, vq loss) for a training step."""
        recon, vq_loss, _ = self.forward(x)
        recon_fn = F.mse_loss if self.config.recon_loss == "mse" else F.l1_loss
        recon_loss = recon_fn(recon, x)
        return recon_loss + vq_loss, recon_loss, vq_loss

    def encode(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) -> codes (N, h, w) int64 (uses the encoder, never updates the codebook)."""
        z_e = self.encoder(x)
        n, d, h, w = z_e.shape
        return self.quantizer.nearest(z_e.permute(0, 2, 3, 1).reshape(-1, d)).view(n, h, w)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """codes (N, h, w) -> reconstruction (N, C, H, W)."""
        return self.decoder(self.quantizer.lookup(codes))


# --------------------------------------------------------------------------------------------------
# PixelSNAIL prior
# --------------------------------------------------------------------------------------------------


class PixelSNAILConfig(BaseModel):
    """Hyper-parameters of a :class:`PixelSNAIL`; saved as JSON with every run and enough to rebuild it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_codes: int = Field(512, ge=2)
    height: int = Field(16, ge=1)
    width: int = Field(16, ge=1)
    channels: int = Field(128, ge=1)
    n_blocks: int = Field(2, ge=1)
    n_res_blocks: int = Field(2, ge=1)
    kernel_size: int = Field(3, ge=1)
    attention: bool = True
    n_heads: int = Field(4, ge=1)
    key_channels: int = Field(64, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> PixelSNAILConfig:
        if self.kernel_size % 2 == 0:
            raise ValueError("kernel_size must be odd")
        if self.key_channels % self.n_heads or self.channels % self.n_heads:
            raise ValueError("key_channels and channels must be divisible by n_heads")
        return self


def _shift_down(x: Tensor) -> Tensor:
    return F.pad(x, [0, 0, 1, 0])[:, :, :-1, :]


def _shift_right(x: Tensor) -> Tensor:
    return F.pad(x, [1, 0, 0, 0])[:, :, :, :-1]


class DownConv(nn.Module):
    """Conv whose output at (r, c) sees rows r-kh+1..r and columns c-kw//2..c+kw//2 (rows <= r only)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int]) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv2d(in_channels, out_channels, kernel)

    def forward(self, x: Tensor) -> Tensor:
        kh, kw = self.kernel
        return self.conv(F.pad(x, [kw // 2, kw // 2, kh - 1, 0]))


class DownRightConv(nn.Module):
    """Conv whose output at (r, c) sees rows r-kh+1..r and columns c-kw+1..c (the rectangle up-left)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int]) -> None:
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv2d(in_channels, out_channels, kernel)

    def forward(self, x: Tensor) -> Tensor:
        kh, kw = self.kernel
        return self.conv(F.pad(x, [kw - 1, 0, kh - 1, 0]))


ConvFactory = Callable[[int, int], nn.Module]


class GatedResBlock(nn.Module):
    """``x + a * sigmoid(b)`` with ``[a, b] = conv2(dropout(elu(conv1(elu(x)) + proj(elu(aux)))))``.

    ``conv`` builds both convolutions, so the block inherits their causal footprint; ``aux`` enters
    through a 1x1 projection and must itself be causal at each position.
    """

    def __init__(self, channels: int, conv: ConvFactory, aux_channels: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = conv(channels, channels)
        self.aux = nn.Conv2d(aux_channels, channels, 1) if aux_channels else None
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(channels, 2 * channels)

    def forward(self, x: Tensor, aux: Tensor | None = None) -> Tensor:
        out = self.conv1(F.elu(x))
        if self.aux is not None:
            if aux is None:
                raise ValueError("this block needs an aux input")
            out = out + self.aux(F.elu(aux))
        a, b = self.conv2(self.dropout(F.elu(out))).chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class CausalSelfAttention(nn.Module):
    """Multi-head attention over raster positions where position i reads only keys j < i.

    Strictly earlier (not j <= i) because the key/value input includes the codes themselves. Position 0
    has nothing to attend to and outputs zeros.
    """

    def __init__(self, query_channels: int, kv_channels: int, key_channels: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Linear(query_channels, key_channels)
        self.key = nn.Linear(kv_channels, key_channels)
        self.value = nn.Linear(kv_channels, query_channels)

    def forward(self, query: Tensor, kv: Tensor) -> Tensor:
        n, c, h, w = query.shape
        length = h * w

        def heads(t: Tensor) -> Tensor:
            return t.view(n, length, self.n_heads, -1).transpose(1, 2)

        q = heads(self.query(query.flatten(2).transpose(1, 2)))
        k = heads(self.key(kv.flatten(2).transpose(1, 2)))
        v = heads(self.value(kv.flatten(2).transpose(1, 2)))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        allowed = torch.ones(length, length, dtype=torch.bool, device=query.device).tril(-1)
        # A finite fill keeps the softmax of the all-masked first row defined; that row is zeroed below.
        weights = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(dim=-1)
        out = (weights @ v).masked_fill(~allowed.any(dim=1)[None, None, :, None], 0.0)
        return out.transpose(1, 2).reshape(n, length, c).transpose(1, 2).reshape(n, c, h, w)


class PixelSNAIL(nn.Module):
    """Autoregressive prior over (N, h, w) code maps; ``forward(codes) -> logits (N, K, h, w)``.

    The logits at raster position i depend only on codes at positions < i. Because of that, a map
    cropped to its first r rows gives exactly the first r rows of the full map's logits, which
    :func:`restore` uses to skip work. Call ``eval()`` before scoring (dropout).
    """

    def __init__(self, config: PixelSNAILConfig) -> None:
        super().__init__()
        self.config = config
        c, k = config.channels, config.kernel_size
        rows = (k + 1) // 2
        in_channels = c + 2  # code embedding + (row, column) coordinates
        self.embed = nn.Embedding(config.num_codes, c)
        self.v_in = DownConv(in_channels, c, (rows, k))
        self.h_in = DownRightConv(in_channels, c, (1, rows))

        def down(i: int, o: int) -> nn.Module:
            return DownConv(i, o, (rows, k))

        def down_right(i: int, o: int) -> nn.Module:
            return DownRightConv(i, o, (rows, rows))

        def pointwise(i: int, o: int) -> nn.Module:
            return nn.Conv2d(i, o, 1)

        self.v_blocks = nn.ModuleList()
        self.h_blocks = nn.ModuleList()
        self.attentions = nn.ModuleList()
        self.attention_mix = nn.ModuleList()
        for _ in range(config.n_blocks):
            self.v_blocks.append(
                nn.ModuleList(GatedResBlock(c, down, dropout=config.dropout) for _ in range(config.n_res_blocks))
            )
            self.h_blocks.append(
                nn.ModuleList(
                    GatedResBlock(c, down_right, aux_channels=c, dropout=config.dropout)
                    for _ in range(config.n_res_blocks)
                )
            )
            if config.attention:
                self.attentions.append(CausalSelfAttention(c, c + in_channels, config.key_channels, config.n_heads))
                self.attention_mix.append(GatedResBlock(c, pointwise, aux_channels=c, dropout=config.dropout))
        self.head = nn.Sequential(nn.ELU(), nn.Conv2d(c, c, 1), nn.ELU(), nn.Conv2d(c, config.num_codes, 1))

    def _background(self, codes: Tensor, dtype: torch.dtype) -> Tensor:
        n, h, w = codes.shape
        rows = torch.linspace(-1.0, 1.0, self.config.height, device=codes.device, dtype=dtype)[:h]
        cols = torch.linspace(-1.0, 1.0, self.config.width, device=codes.device, dtype=dtype)
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
        return grid.unsqueeze(0).expand(n, 2, h, w)

    def forward(self, codes: Tensor) -> Tensor:
        """codes (N, r, width) with r <= height (a crop to the first r rows is allowed) -> logits (N, K, r, width)."""
        if codes.dim() != 3 or codes.shape[1] > self.config.height or codes.shape[2] != self.config.width:
            raise ValueError(
                f"expected codes (N, <= {self.config.height}, {self.config.width}), got {tuple(codes.shape)}"
            )
        embedded = self.embed(codes).permute(0, 3, 1, 2)
        x = torch.cat([embedded, self._background(codes, embedded.dtype)], dim=1)
        # v: inputs from rows strictly above; h: additionally the current row strictly to the left.
        v = _shift_down(self.v_in(x))
        h = v + _shift_right(self.h_in(x))
        for block in range(self.config.n_blocks):
            for v_block, h_block in zip(self.v_blocks[block], self.h_blocks[block], strict=True):
                v = v_block(v)
                h = h_block(h, aux=v)
            if self.config.attention:
                attended = self.attentions[block](h, torch.cat([h, x], dim=1))
                h = self.attention_mix[block](h, aux=attended)
        return self.head(h)

    def nll_map(self, codes: Tensor) -> Tensor:
        """Per-position NLL -log p(c_i | c_<i) in nats, shape (N, h, w)."""
        return F.cross_entropy(self.forward(codes), codes, reduction="none")

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """n code maps drawn in raster order (one cropped forward per position)."""
        device = self.embed.weight.device
        start = torch.zeros((n, self.config.height, self.config.width), dtype=torch.long, device=device)
        return restore(self, start, None, generator, 1, temperature=temperature)[:, 0]


def _sample_inverse_cdf(logits: Tensor, uniforms: Tensor, temperature: float) -> Tensor:
    """Categorical draw by inverting the CDF of softmax(logits / T) at the given uniforms (float64)."""
    cdf = torch.softmax(logits.double() / temperature, dim=-1).cumsum(dim=-1)
    return (cdf < uniforms[:, None]).sum(dim=-1).clamp_max(logits.shape[-1] - 1)


def _eligible_positions(prior: PixelSNAIL, codes: Tensor, mask: Tensor | None) -> Tensor:
    """The checked (N, h, w) bool mask of positions a restoration may change (None: all of them)."""
    if prior.training:
        raise ValueError("call prior.eval() before restore: dropout would randomise the restorations")
    if codes.dim() != 3:
        raise ValueError(f"expected codes (N, h, w), got {tuple(codes.shape)}")
    if mask is None:
        return torch.ones_like(codes, dtype=torch.bool)
    if mask.shape != codes.shape:
        raise ValueError(f"mask {tuple(mask.shape)} does not match codes {tuple(codes.shape)}")
    return mask


@torch.no_grad()
def restore(
    prior: PixelSNAIL,
    codes: Tensor,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    n_samples: int = 1,
    *,
    threshold: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Resample codes from the prior, in raster order, conditioned on everything before them.

    codes (N, h, w); mask (N, h, w) bool marks the eligible positions (None: all). An eligible position
    is resampled if ``threshold`` is None, or if its NLL under the *current* (partly restored) context
    exceeds ``threshold`` nats (Marimont & Tarroni's restoration with lambda_p). Returns
    (N, n_samples, h, w); positions that are not eligible are never changed.

    Cost. Positions are visited in raster order and position i depends only on positions < i, so a
    replica whose codes have not changed yet still has the logits of the initial forward pass. One
    forward on the unmodified maps therefore serves every replica until it first changes a code; after
    that, a replica needs a fresh forward only at the eligible positions it visits later, and that
    forward takes the map cropped to the rows up to the current one. All replicas that need a
    position are batched into one call: at most one prior forward per distinct eligible raster
    position (the first such position needs none beyond the initial pass), instead of one full
    forward per position of the map.

    Randomness. One uniform per (replica, position) is drawn up front as
    ``torch.rand((N * n_samples, h * w), generator=generator, dtype=torch.float64)`` (replica j of
    image i is row ``i * n_samples + j``) and a code is drawn by inverting the CDF of
    ``softmax(logits / temperature)`` at its uniform, so the result depends only on the seed, not on
    which forwards could be skipped. ``prior`` must be in eval mode.
    """
    mask = _eligible_positions(prior, codes, mask)
    n, h, w = codes.shape
    length = h * w
    current = codes.repeat_interleave(n_samples, dim=0).contiguous()
    flat = current.view(-1, length)
    eligible = mask.repeat_interleave(n_samples, dim=0).reshape(-1, length)
    uniforms = draw(torch.rand, flat.shape, generator, codes.device, torch.float64)
    initial_logits = prior(codes).flatten(2)  # (N, K, h*w)
    changed = torch.zeros(flat.shape[0], dtype=torch.bool, device=codes.device)

    for position in range(length):
        rows = torch.nonzero(eligible[:, position]).flatten()
        if rows.numel() == 0:
            continue
        logits = initial_logits[rows // n_samples, :, position]
        stale = changed[rows]
        if bool(stale.any()):
            row, col = divmod(position, w)
            fresh = prior(current[rows[stale], : row + 1])
            logits = logits.clone()
            logits[stale] = fresh[:, :, row, col].to(logits.dtype)
        old = flat[rows, position]
        take = torch.ones_like(old, dtype=torch.bool)
        if threshold is not None:
            take = F.cross_entropy(logits, old, reduction="none") > threshold
        new = torch.where(take, _sample_inverse_cdf(logits, uniforms[rows, position], temperature), old)
        differs = new != old
        flat[rows[differs], position] = new[differs]
        changed[rows[differs]] = True
    return current.view(n, n_samples, h, w)


@torch.no_grad()
def restore_parallel(
    prior: PixelSNAIL,
    codes: Tensor,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    n_samples: int = 1,
    *,
    threshold: float | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """One-pass approximation of :func:`restore`, with the same arguments, randomness and output.

    One teacher-forced prior forward over the original codes gives every position's distribution
    given the original codes before it. An eligible position is resampled if ``threshold`` is None
    or if its NLL there (``prior.nll_map(codes)``, the map the sample score thresholds) exceeds
    ``threshold``, and all resampled positions of all ``n_samples`` replicas are drawn at once from
    those distributions, with the uniforms ``restore`` would use.

    What is approximated: in :func:`restore` a redrawn code becomes context for every later position,
    both for its distribution and for the threshold test. Here it does not, so neighbouring redrawn
    codes are drawn independently of each other, and the codes judged unlikely are exactly those the
    original context makes unlikely. Per replica and from the same generator state, the two agree on
    every position up to and including the first one above ``threshold``, and entirely when that is
    the only code above it in either context (when it is the last position, say).
    """
    mask = _eligible_positions(prior, codes, mask)
    n, h, w = codes.shape
    flat = codes.reshape(n, h * w)
    uniforms = draw(torch.rand, (n * n_samples, h * w), generator, codes.device, torch.float64)
    raw_logits = prior(codes)  # (N, K, h, w): position i given the original codes before it
    take = mask
    if threshold is not None:
        # Computed as prior.nll_map computes it, so exactly the codes the sample score counts are redrawn.
        take = take & (F.cross_entropy(raw_logits, codes, reduction="none") > threshold)
    logits = raw_logits.flatten(2).transpose(1, 2)  # (N, h*w, K)
    image, position = torch.nonzero(take.reshape(n, h * w), as_tuple=True)
    chosen = logits[image, position]  # (M, K)
    replica_uniforms = uniforms.view(n, n_samples, h * w)[image, :, position]  # (M, n_samples)
    drawn = _sample_inverse_cdf(
        chosen.repeat_interleave(n_samples, dim=0), replica_uniforms.reshape(-1), temperature
    ).view(-1, n_samples)
    restored = flat[:, None].repeat(1, n_samples, 1)
    restored[image, :, position] = drawn
    return restored.view(n, n_samples, h, w)

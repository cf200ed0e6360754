"""VQ-VAE with a PixelSNAIL prior over its code map, and latent restoration (Marimont & Tarroni 2021).

* :class:`VQVAE` compresses a face crop to an (h, w) map of discrete codes (EMA codebook,
  dead-code restarts, commitment loss, straight-through gradients) and decodes codes back.
* :class:`PixelSNAIL` is an autoregressive prior over that map in raster order:
  ``p(c) = prod_i p(c_i | c_<i)``. Causality comes from shifted convolutions in two streams (a
  vertical one that sees only rows above, a horizontal one that sees rows above and the left part of
  the current row) and from strictly causal self-attention.
* Latent restoration (resampling unlikely codes from the prior) is in vqvae_restore.py.

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
        from flowood_ray.models.vqvae_restore import restore  # restore drives this class's forward

        return restore(self, start, None, generator, 1, temperature=temperature)[:, 0]

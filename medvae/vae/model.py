"""The convolutional BatchNorm (conditional) VAE: a pure nn.Module that returns tensors, never losses."""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from medvae.config import ModelConfig

# log sigma^2 is clamped: during the KL warm-up (weight 0 at epoch 0) nothing bounds it, and with an extra
# image term it was measured drifting to ~100 within 20 steps, overflowing exp(). Inactive at convergence.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class VAEOutput(NamedTuple):
    """What one forward pass returns; losses are computed apart from the model (see ``medvae.vae.losses``)."""

    recon: torch.Tensor  # sigmoid output in [0, 1], shape (N, 1, H, W)
    logits: torch.Tensor  # pre-sigmoid decoder output; BCE on logits is stable and autocast-safe
    mu: torch.Tensor  # posterior mean, (N, latent)
    logvar: torch.Tensor  # posterior log-variance, (N, latent)
    z: torch.Tensor  # the reparameterised sample fed to the decoder (mu in eval mode)


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without an affine of its own, then a per-class scale (init 1) and shift (init 0).

    It is FiLM driven by the one-hot label, placed where the BatchNorm VAE already normalises: the label
    acts on every decoder block, so the decoder cannot learn to ignore it as it ignored a one-hot label
    appended once to a 128-dimensional z.
    """

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, affine=False)
        self.gamma = nn.Embedding(num_classes, num_features)
        self.beta = nn.Embedding(num_classes, num_features)
        nn.init.ones_(self.gamma.weight)
        nn.init.zeros_(self.beta.weight)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Normalise ``h`` (N, C, H, W) and apply the scale and shift of each image's class ``y`` (N,)."""
        g = self.gamma(y).to(h.dtype)[:, :, None, None]
        b = self.beta(y).to(h.dtype)[:, :, None, None]
        return self.bn(h) * g + b


def _enc_block(i: int, o: int) -> list[nn.Module]:
    # bias=False: a bias before BatchNorm is cancelled by its mean subtraction, so it only costs compute.
    return [nn.Conv2d(i, o, 4, 2, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)]


def _dec_block(i: int, o: int, cbn_classes: int) -> list[nn.Module]:
    norm = ConditionalBatchNorm2d(o, cbn_classes) if cbn_classes else nn.BatchNorm2d(o)
    return [nn.ConvTranspose2d(i, o, 4, 2, 1, bias=False), norm, nn.ReLU(inplace=True)]


class ConvVAE(nn.Module):
    """Convolutional BatchNorm VAE, optionally conditioned on a class label (CVAE).

    The encoder is ``depth`` stride-2 Conv→BatchNorm→ReLU blocks (64→4 px with the default four)
    followed by linear heads for μ and log σ². The decoder mirrors it with ConvTranspose→BatchNorm→ReLU
    and ends in a logit image. A conditional model appends the one-hot label to the encoder features
    and to z and, by default (``conditioning: cbn``), feeds it to every decoder block through
    :class:`ConditionalBatchNorm2d` and to the encoder as one constant input plane per class.

    In ``eval()`` mode the forward pass is deterministic: z is the posterior mean.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.conditional and cfg.num_classes < 1:
            raise ValueError("a conditional VAE needs num_classes >= 1")
        self.cfg = cfg
        chans = list(cfg.channels)
        self.bottom = cfg.image_size // (2 ** len(chans))
        self.n_cond = cfg.num_classes if cfg.conditional else 0
        self.label_planes = bool(self.n_cond and cfg.encoder_label_planes)
        cbn = self.n_cond if cfg.conditioning == "cbn" else 0
        feat = chans[-1] * self.bottom * self.bottom

        enc: list[nn.Module] = []
        for i, o in zip([1 + self.n_cond * self.label_planes, *chans[:-1]], chans, strict=True):
            enc += _enc_block(i, o)
        self.encoder = nn.Sequential(*enc, nn.Flatten())
        self.fc_mu = nn.Linear(feat + self.n_cond, cfg.latent_dim)
        self.fc_logvar = nn.Linear(feat + self.n_cond, cfg.latent_dim)

        self.decoder_input = nn.Linear(cfg.latent_dim + self.n_cond, feat)
        rev = chans[::-1]
        dec: list[nn.Module] = [nn.Unflatten(1, (rev[0], self.bottom, self.bottom))]
        for i, o in itertools.pairwise(rev):
            dec += _dec_block(i, o, cbn)
        dec.append(nn.ConvTranspose2d(rev[-1], 1, 4, 2, 1))
        self.decoder = nn.Sequential(*dec)

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    def _labels(self, y: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if not self.n_cond:
            return None
        if y is None:
            raise ValueError("this VAE is conditional: pass the label indices y")
        if y.shape[0] != n:
            raise ValueError(f"got {y.shape[0]} labels for {n} inputs")
        return y.long()

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (μ, log σ²) for images ``x`` of shape (N, 1, H, W) in [0, 1]."""
        yl = self._labels(y, x.shape[0])
        if yl is not None and self.label_planes:
            planes = F.one_hot(yl, self.n_cond).to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, planes], dim=1)
        h = self.encoder(x)
        if yl is not None:
            h = torch.cat([h, F.one_hot(yl, self.n_cond).to(h.dtype)], dim=1)
        return self.fc_mu(h), self.fc_logvar(h).clamp(LOGVAR_MIN, LOGVAR_MAX)

    def decode_logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder output before the final sigmoid."""
        yl = self._labels(y, z.shape[0])
        if yl is not None:
            z = torch.cat([z, F.one_hot(yl, self.n_cond).to(z.dtype)], dim=1)
        h = self.decoder_input(z)
        for layer in self.decoder:
            h = layer(h, yl) if isinstance(layer, ConditionalBatchNorm2d) else layer(h)
        return h

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1] for latent codes ``z`` (and labels ``y`` for a CVAE)."""
        return torch.sigmoid(self.decode_logits(z, y))

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """z = μ + σ·ε, the reparameterisation trick."""
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> VAEOutput:
        mu, logvar = self.encode(x, y)
        # Evaluation is deterministic and uses the posterior mean.
        z = self.reparameterize(mu, logvar) if self.training else mu
        logits = self.decode_logits(z, y)
        return VAEOutput(torch.sigmoid(logits), logits, mu, logvar, z)

    def sample(
        self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw ``n`` images from the prior N(0, I) (per label ``y`` for a CVAE)."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, device=p.device, dtype=p.dtype)
        return self.decode(z, y)

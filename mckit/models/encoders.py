"""Small modality encoders (stand-ins for CLIP, BEATs, LanguageBind, Point-BERT).

Each maps a batch of raw inputs to a short sequence of feature tokens
``(B, T, ENC_DIM)``. They are pretrained here on the toy world (entity
identity + the high/low nuisance) and then frozen, like the real encoders.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

ENC_DIM = 64
#: Feature tokens each encoder emits per input.
ENC_TOKENS = {"image": 4, "audio": 8, "video": 4, "point": 2}


class ImageEncoder(nn.Module):
    """(B, 3, 16, 16) -> (B, 4, 64): a 3-layer CNN, 2x2 grid of feature tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, ENC_DIM, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(2).transpose(1, 2)


class AudioEncoder(nn.Module):
    """(B, 1024) waveform -> log spectrogram (B, 1, 65, 33) -> (B, 8, 64) time tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(128), persistent=False)
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, ENC_DIM, 3, stride=2, padding=1), nn.GELU(),
        )
        self.pool = nn.AdaptiveAvgPool2d((1, ENC_TOKENS["audio"]))

    @staticmethod
    def spectrogram(wave: torch.Tensor, window: torch.Tensor | None = None) -> torch.Tensor:
        """Log-magnitude STFT (n_fft 128, hop 32): (B, 1024) -> (B, 1, 65, 33)."""
        window = torch.hann_window(128, device=wave.device) if window is None else window
        spec = torch.stft(wave, n_fft=128, hop_length=32, window=window, return_complex=True)
        return torch.log1p(spec.abs()).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net(self.spectrogram(x, self.window))
        return self.pool(h).squeeze(2).transpose(1, 2)


class VideoEncoder(nn.Module):
    """(B, 4, 16, 16) frames -> (B, 4, 64): a per-frame CNN, then a temporal conv across frames."""

    def __init__(self) -> None:
        super().__init__()
        self.frame = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.GELU(),
            nn.Conv2d(16, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, ENC_DIM, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.temporal = nn.Conv1d(ENC_DIM, ENC_DIM, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        per_frame = self.frame(x.reshape(b * t, 1, *x.shape[2:])).reshape(b, t, ENC_DIM)
        return per_frame + self.temporal(per_frame.transpose(1, 2)).transpose(1, 2)


class PointEncoder(nn.Module):
    """(B, 128, 6) xyz+rgb -> (B, 2, 64): a PointNet (shared MLP, then max and mean pooling)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(6, 64), nn.GELU(), nn.Linear(64, 128), nn.GELU(), nn.Linear(128, ENC_DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)
        return torch.stack([h.max(1).values, h.mean(1)], 1)


ENCODERS = {"image": ImageEncoder, "audio": AudioEncoder, "video": VideoEncoder, "point": PointEncoder}


def make_encoder(modality: str) -> nn.Module:
    if modality not in ENCODERS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {tuple(ENCODERS)}")
    return ENCODERS[modality]()


def pretrain_encoder(
    encoder: nn.Module, x: torch.Tensor, entity: torch.Tensor, level: torch.Tensor, n_entities: int,
    steps: int = 300, batch: int = 128, lr: float = 3e-3, seed: int = 0, desc: str = "encoder",
) -> tuple[list[float], nn.ModuleDict]:
    """Pretrain ``encoder`` to classify the entity and the high/low level from its mean token.

    x: (N, ...) raw inputs; entity, level: (N,) int64 labels. Two linear heads are
    (entity from the mean token, level from all tokens) are
    trained with it. Returns the loss per step and the heads (for probing). The encoder is
    left in eval mode with ``requires_grad=False`` (frozen).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        n_tokens = encoder(x[:1]).shape[1]
    heads = nn.ModuleDict({"entity": nn.Linear(ENC_DIM, n_entities), "level": nn.Linear(n_tokens * ENC_DIM, 2)})
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.01)
    losses = []
    encoder.train().requires_grad_(True)
    for _ in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        feats = encoder(x[idx])
        pooled = feats.mean(1)
        loss = nn.functional.cross_entropy(heads["entity"](pooled), entity[idx]) + nn.functional.cross_entropy(
            heads["level"](feats.flatten(1)), level[idx]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    encoder.eval().requires_grad_(False)
    return losses, heads.eval()


@torch.no_grad()
def probe_accuracy(encoder: nn.Module, heads: nn.ModuleDict, x: torch.Tensor, entity: torch.Tensor,
                   level: torch.Tensor) -> dict[str, float]:
    """Held-out accuracy of the pretraining heads: how much identity and level the features keep."""
    feats = encoder(x)
    return {
        "entity": (heads["entity"](feats.mean(1)).argmax(-1) == entity).float().mean().item(),
        "level": (heads["level"](feats.flatten(1)).argmax(-1) == level).float().mean().item(),
    }

"""Dataset statistics of the audio encoder's log-mel features (`mmeff audio-stats`: encoder.norm_mean/norm_std)."""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from mmeff.config import ConfigError, DataConfig, RunConfig
from mmeff.data.pipeline import ShardDataModule, make_loader
from mmeff.encoders.audio import AudioEncoderConfig, audio_bytes, decode, fbank


class _Moments:
    """Shard sample -> the sum, sum of squares and count of its log-mel values (unpadded, unnormalised)."""

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        self.cfg = cfg

    def __call__(self, sample: dict) -> dict[str, torch.Tensor]:
        x = fbank(decode(audio_bytes(sample, self.cfg.keys), self.cfg.sample_rate), self.cfg).double()
        return {"moments": torch.stack([x.sum(), (x**2).sum(), torch.tensor(float(x.numel()), dtype=torch.float64)])}


def compute_stats(cfg: RunConfig | DataConfig, encoder_cfg: AudioEncoderConfig | None = None) -> tuple[float, float]:
    """Log-mel mean and std over the train shards of `cfg` (written first from `data.source` if absent)."""
    data = cfg.data if isinstance(cfg, RunConfig) else cfg
    enc = encoder_cfg if encoder_cfg is not None else getattr(cfg, "encoder", None)
    if not isinstance(enc, AudioEncoderConfig):
        raise ConfigError(f"audio statistics need encoder.name: audio, got {getattr(enc, 'name', enc)!r}")
    moments = _Moments(enc)
    ShardDataModule(data, moments, moments).prepare_data()
    total = torch.zeros(3, dtype=torch.float64)
    loader = make_loader(data, "train", moments, train=False)
    for batch in tqdm(loader, desc="audio-stats", unit=" batches", disable=None):
        total += batch["moments"].sum(0)
    s, sq, n = total.tolist()
    if n == 0:
        raise ValueError(f"no audio in the train shards of {data.root}")
    mean = s / n
    return mean, math.sqrt(max(sq / n - mean**2, 0.0))

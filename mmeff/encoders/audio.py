"""Audio tokenizer: the AST frontend (Gong et al., 2021), then spectrogram patches or stacked frames as tokens."""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from mmeff.config import ENCODERS, ConfigError
from mmeff.blocks import Tokens
from mmeff.encoders.common import GridTokens


@ENCODERS.register("audio")
@dataclass
class AudioEncoderConfig:
    """Frontend and token options; the first of `keys` present in a shard sample holds the audio bytes."""

    name: str = "audio"
    keys: list[str] = field(default_factory=lambda: ["flac", "wav", "ogg", "mp3"])
    sample_rate: int = 16000  # every input is resampled to this rate
    # Kaldi fbank (torchaudio.compliance.kaldi.fbank) options, AST's choices.
    num_mel_bins: int = 128
    frame_length: float = 25.0  # ms
    frame_shift: float = 10.0  # ms
    window_type: Literal["hanning", "hamming", "povey", "rectangular", "blackman"] = "hanning"
    htk_compat: bool = True
    low_freq: float = 20.0
    high_freq: float = 0.0  # <= 0: offset below Nyquist (Kaldi's convention)
    preemphasis: float = 0.97
    dither: float = 0.0  # training only; evaluation never dithers
    frames: int = 100  # pad (with the mean) or crop (random in training, centred at eval) to this many frames
    # Log-mel statistics of the training set; features become (x - mean) / (2 * std) as in AST.
    # Defaults are AST's AudioSet values; `mmeff audio-stats CONFIG` computes a data set's own.
    norm_mean: float = -4.2677393
    norm_std: float = 4.5689974
    tokens: Literal["patch", "frame"] = "patch"
    patch_size: list[int] = field(default_factory=lambda: [16, 16])  # (freq, time)
    patch_stride: list[int] = field(default_factory=lambda: [10, 10])  # < patch_size: overlapping, as AST
    frame_stack: int = 4  # frame tokens: this many consecutive frames, projected
    scan: Literal["time", "freq"] = "time"  # patch token order: time-major (all bands of a step together) or AST's
    pool: Literal["cls", "mean"] = "cls"
    cls_position: Literal["first", "middle", "last"] = "first"
    # SpecAugment (Park et al., 2019), training only: maximum mask widths in bins / frames, 0 disables.
    freq_mask: int = 24
    time_mask: int = 20


class AudioEncoder(GridTokens):
    """Normalised fbank features [B, frames, mel bins] -> tokens [B, T, D], at any clip length."""

    def __init__(self, cfg: AudioEncoderConfig, dim: int) -> None:
        mels, frames = cfg.num_mel_bins, cfg.frames
        if cfg.tokens == "patch":
            for key in ("patch_size", "patch_stride"):
                value = getattr(cfg, key)
                if len(value) != 2 or min(value) < 1:
                    raise ConfigError(f"encoder.{key}: got {value}; expected [freq, time] positive integers")
            (pf, pt), (sf_, st) = cfg.patch_size, cfg.patch_stride
            if pf > mels or pt > frames:
                raise ConfigError(f"encoder.patch_size {cfg.patch_size} exceeds the [{mels}, {frames}] spectrogram")
            grid = ((mels - pf) // sf_ + 1, (frames - pt) // st + 1)
            proj: nn.Module = nn.Conv2d(1, dim, (pf, pt), (sf_, st))
        else:
            if cfg.frame_stack < 1:
                raise ConfigError(f"encoder.frame_stack: got {cfg.frame_stack}; expected >= 1")
            grid = (1, math.ceil(frames / cfg.frame_stack))
            proj = nn.Linear(cfg.frame_stack * mels, dim)
        super().__init__(dim, grid, cfg.pool, cfg.cls_position)
        self.cfg = cfg
        self.proj = proj

    def forward(self, features: torch.Tensor) -> Tokens:
        mels = self.cfg.num_mel_bins
        if features.dim() != 3 or features.shape[2] != mels:
            raise ValueError(f"AudioEncoder expects features [B, frames, {mels}], got {tuple(features.shape)}")
        B, T, _ = features.shape
        if self.cfg.tokens == "patch":
            x = self.proj(features.transpose(1, 2).unsqueeze(1)).permute(0, 2, 3, 1)  # [B, freq, time, D]
            x = self.add_position(x)
            if self.cfg.scan == "time":
                x = x.transpose(1, 2)
        else:
            k = self.cfg.frame_stack
            x = F.pad(features, (0, 0, 0, -T % k)).reshape(B, 1, -1, k * mels)
            x = self.add_position(self.proj(x))
        return self.tokens(x)


def audio_bytes(sample: dict, keys: list[str]) -> bytes:
    """The encoded audio of a shard sample: its first field named in `keys`."""
    for key in keys:
        if key in sample:
            return sample[key]
    raise KeyError(f"sample has none of the audio fields {keys} (fields: {sorted(sample)})")


def decode(data: bytes, sample_rate: int) -> torch.Tensor:
    """Mono float waveform [N] at `sample_rate` from encoded audio bytes (any format soundfile reads)."""
    import soundfile as sf  # only where audio is decoded: text-only and GPU images need not have libsndfile

    try:
        wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        raise ValueError(f"not decodable audio: {e}") from None
    wave = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))
    return wave if rate == sample_rate else _resampler(rate, sample_rate)(wave)


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    """torchaudio's sinc resampler (`functional.resample`) with its costly kernel made once per rate pair."""
    return torchaudio.transforms.Resample(orig, new)


def fbank(wave: torch.Tensor, cfg: AudioEncoderConfig, train: bool = False) -> torch.Tensor:
    """Log-mel filterbank [frames, mel bins] of a waveform [N] at `cfg.sample_rate`, mean removed first."""
    return torchaudio.compliance.kaldi.fbank(
        (wave - wave.mean()).unsqueeze(0),
        num_mel_bins=cfg.num_mel_bins,
        frame_length=cfg.frame_length,
        frame_shift=cfg.frame_shift,
        window_type=cfg.window_type,
        htk_compat=cfg.htk_compat,
        low_freq=cfg.low_freq,
        high_freq=cfg.high_freq,
        preemphasis_coefficient=cfg.preemphasis,
        dither=cfg.dither if train else 0.0,
        sample_frequency=cfg.sample_rate,
        use_energy=False,
    )


class AudioTransform:
    """Shard sample -> normalised, fixed-length fbank features [frames, mel bins] (SpecAugment in training)."""

    def __init__(self, cfg: AudioEncoderConfig, train: bool) -> None:
        self.cfg, self.train = cfg, train
        masks = [torchaudio.transforms.FrequencyMasking(cfg.freq_mask)] if cfg.freq_mask > 0 else []
        masks += [torchaudio.transforms.TimeMasking(cfg.time_mask)] if cfg.time_mask > 0 else []
        self.masks = nn.Sequential(*masks) if train else None

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        n, frames = x.shape[0], self.cfg.frames
        if n < frames:
            return F.pad(x, (0, 0, 0, frames - n))
        start = int(torch.randint(n - frames + 1, ())) if self.train else (n - frames) // 2
        return x[start : start + frames]

    def __call__(self, sample: dict) -> torch.Tensor:
        cfg = self.cfg
        x = fbank(decode(audio_bytes(sample, cfg.keys), cfg.sample_rate), cfg, self.train)
        x = self._fit((x - cfg.norm_mean) / (2 * cfg.norm_std))  # padding 0 here is the data set mean
        if self.masks is not None:
            x = self.masks(x.T.unsqueeze(0))[0].T  # torchaudio masks take [..., freq, time]
        return x


def build(cfg: AudioEncoderConfig, dim: int) -> AudioEncoder:
    """The audio tokenizer of `cfg` with token width `dim`."""
    return AudioEncoder(cfg, dim)


def make_transform(cfg: AudioEncoderConfig, train: bool) -> AudioTransform:
    """Per-sample audio preprocessing."""
    return AudioTransform(cfg, train)

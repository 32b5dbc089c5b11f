"""Spoken digit strings ("four one seven") by espeak-ng voices, with their text ("417"), split by voice (16 kHz audio)."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmeff.data.sources import SOURCES
from mmeff.data.sources.spoken_digits import DIGITS, VOICES, _Renderer, _Utterance, espeak

STYLES = ("digits", "words")


@dataclass(frozen=True)
class _Sentence:
    """One string of digits said by one voice (variant), accent, speed and pitch, with pauses between words."""

    index: int
    digits: tuple[int, ...]
    voice: str
    accent: str
    speed: int
    pitch: int
    pauses: tuple[float, ...]  # seconds of silence after each word but the last

    @property
    def digit(self) -> int:  # what _Renderer.__call__ labels a sample with; replaced by the text afterwards
        return self.digits[0]

    @property
    def key(self) -> str:
        name = f"{self.index:06d}_{self.voice}_{self.accent}_{''.join(map(str, self.digits))}_s{self.speed}_p{self.pitch}"
        return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def text(digits: tuple[int, ...] | list[int], style: str = "digits") -> str:
    """The transcript of a digit string: '417' ('digits') or 'four one seven' ('words')."""
    if style not in STYLES:
        raise ValueError(f"spoken-sentences style {style!r}: expected one of {', '.join(STYLES)}")
    return "".join(map(str, digits)) if style == "digits" else " ".join(DIGITS[d] for d in digits)


class _SentenceRenderer(_Renderer):
    """spoken-digits' renderer, speaking each digit word with its synthesis (cached per word and voice setting)
    and joining the words with pauses; noise, gain and encoding are spoken-digits' too."""

    def __init__(self, *args: Any, style: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.style = style
        self.words: dict[_Utterance, np.ndarray] = {}
        self.lock = threading.Lock()

    def _word(self, u: _Utterance) -> np.ndarray:
        with self.lock:
            wave = self.words.get(u)
        if wave is None:
            wave = _Renderer._speech(self, u)
            with self.lock:
                self.words[u] = wave
        return wave

    def _speech(self, s: _Sentence) -> np.ndarray:  # type: ignore[override]
        parts = []
        for i, d in enumerate(s.digits):
            parts.append(self._word(_Utterance(d, s.voice, s.accent, s.speed, s.pitch)))
            if i < len(s.pauses):
                parts.append(np.zeros(round(s.pauses[i] * self.sample_rate)))
        return np.concatenate(parts)

    def __call__(self, s: _Sentence) -> dict[str, Any]:  # type: ignore[override]
        sample = super().__call__(s)
        del sample["cls"]
        info = sample["json"]
        del info["word"]
        info["digits"] = list(s.digits)
        sample["txt"] = text(s.digits, self.style)
        return sample


def split_voices(voices: list[str], val_voices: int, test_voices: int, seed: int) -> dict[str, list[str]]:
    """The voices of each split: the same seeded draw as spoken-digits, so both sources hold out the same voices."""
    voices = sorted(set(voices))
    if val_voices + test_voices >= len(voices):
        raise ValueError(f"spoken-sentences: {len(voices)} voices leave none for training after {val_voices} val + {test_voices} test")
    order = [voices[i] for i in np.random.default_rng(seed).permutation(len(voices))]
    return {
        "train": sorted(order[val_voices + test_voices :]),
        "val": sorted(order[:val_voices]),
        "test": sorted(order[val_voices : val_voices + test_voices]),
    }


def sentences(
    split: str, count: int, voices: list[str], accents: list[str], speeds: list[int], pitches: list[int],
    min_digits: int, max_digits: int, pause: list[float], seed: int,
) -> list[_Sentence]:  # fmt: skip
    """`count` seeded random digit strings of `split`, each said by one of `voices` with a random setting."""
    rng = np.random.default_rng([seed, ("train", "val", "test").index(split)])
    out = []
    for i in range(count):
        n = int(rng.integers(min_digits, max_digits + 1))
        digits = tuple(int(d) for d in rng.integers(0, 10, size=n))
        pauses = tuple(round(float(p), 3) for p in rng.uniform(pause[0], pause[1], size=n - 1))
        out.append(
            _Sentence(i, digits, str(rng.choice(voices)), str(rng.choice(accents)), int(rng.choice(speeds)), int(rng.choice(pitches)), pauses)
        )
    return out


@SOURCES.register("spoken-sentences", summary=__doc__)
def build(
    out_dir: Path,
    voices: list[str] = VOICES,
    accents: list[str] = ("en-us", "en-gb", "en-gb-x-rp"),
    speeds: list[int] = (140, 190),
    pitches: list[int] = (35, 65),
    min_digits: int = 1,
    max_digits: int = 4,
    pause: list[float] = (0.05, 0.3),
    train: int = 8000,
    val: int = 400,
    test: int = 1000,
    val_voices: int = 8,
    test_voices: int = 12,
    style: str = "digits",
    seconds: float = 3.0,
    sample_rate: int = 16000,
    snr_db: list[float] = (15.0, 40.0),
    gain_db: list[float] = (-20.0, -1.0),
    format: str = "flac",
    seed: int = 0,
    workers: int = 2,
    maxcount: int = 1000,
) -> dict[str, int]:
    """Write `flac` (or `wav`) clips of `seconds` (longer if the speech is) + `txt` transcript (+ `json`) shards;
    val and test voices (spoken-digits' draw) are never heard in train."""
    from mmeff.data import write_shards

    exe = espeak()
    text((), style)  # checks the style
    if format not in ("flac", "wav"):
        raise ValueError(f"spoken-sentences format {format!r}: expected 'flac' or 'wav'")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"spoken-sentences: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    by_split = split_voices(list(voices), val_voices, test_voices, seed)
    render = _SentenceRenderer(exe, sample_rate, seconds, list(snr_db), list(gain_db), format, seed, style=style)
    meta = {"style": style, "sample_rate": sample_rate, "voices": by_split, "digits": [min_digits, max_digits]}
    counts = {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for split, count in (("train", train), ("val", val), ("test", test)):
            if count <= 0:
                continue
            jobs = sentences(split, count, by_split[split], sorted(accents), sorted(speeds), sorted(pitches), min_digits, max_digits, list(pause), seed)
            write_shards(pool.map(render, jobs), out_dir, split, maxcount=maxcount, meta=meta, total=len(jobs))
            counts[split] = count
    return counts

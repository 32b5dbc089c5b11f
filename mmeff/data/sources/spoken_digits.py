"""Spoken digits 'zero'..'nine' synthesised offline by espeak-ng in many voices, split by voice (16 kHz audio)."""

from __future__ import annotations

import io
import math
import re
import shutil
import subprocess
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmeff.data.sources import SOURCES

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng voice variants (espeak-ng-data/voices/!v): each is one speaker; splits never share one.
VOICES = (
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Demonic", "Denis", "Diogo", "Gene", "Gene2",
    "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike", "Mr serious", "Nguyen",
    "RicishayMax", "RicishayMax2", "RicishayMax3", "Storm", "Tweaky", "UniRobot", "adam", "anika", "anikaRobot",
    "announcer", "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "croak", "david", "ed", "edward",
    "edward2", "f1", "f2", "f3", "f4", "f5", "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4",
    "john", "kaukovalta", "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "linda", "m1", "m2", "m3",
    "m4", "m5", "m6", "m7", "m8", "marcelo", "max", "michel", "miguel", "norbert", "pablo", "paul", "pedro",
    "quincy", "rob", "robert", "robosoft", "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6",
    "robosoft7", "robosoft8", "sandro", "shelby", "steph", "steph2", "steph3", "travis", "victor", "whisper",
    "whisperf", "zac",
)  # fmt: skip
INSTALL_HINT = "install it with `apt-get install espeak-ng` (Debian/Ubuntu) or `brew install espeak-ng` (macOS)"


@dataclass(frozen=True)
class _Utterance:
    """One synthesis job: a digit said by a voice (variant) with an accent, speed and pitch."""

    digit: int
    voice: str
    accent: str
    speed: int
    pitch: int

    @property
    def key(self) -> str:
        name = f"{self.voice}_{self.accent}_{DIGITS[self.digit]}_s{self.speed}_p{self.pitch}"
        return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def espeak() -> str:
    """Path of the espeak-ng binary, or a FileNotFoundError saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise FileNotFoundError(f"the spoken-digits source synthesises speech with espeak-ng, not on PATH; {INSTALL_HINT}")
    return path


def _noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS white, pink (1/f power) or brown (1/f^2 power) noise."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
    spectrum /= {"white": 1.0, "pink": np.sqrt(f), "brown": f}[kind]
    noise = np.fft.irfft(spectrum, n)
    return noise / np.sqrt(np.mean(noise**2))


@dataclass
class _Renderer:
    """Synthesises an utterance and turns it into a noisy, gain-varied clip of encoded 16-bit audio."""

    exe: str
    sample_rate: int
    seconds: float
    snr_db: Sequence[float]
    gain_db: Sequence[float]
    fmt: str
    seed: int

    def _speech(self, u: _Utterance) -> np.ndarray:
        import soundfile as sf
        from scipy.signal import resample_poly

        voice = f"{u.accent}+{u.voice}"
        cmd = [self.exe, "-v", voice, "-s", str(u.speed), "-p", str(u.pitch), "--stdout", DIGITS[u.digit]]
        run = subprocess.run(cmd, capture_output=True, check=False)
        if run.returncode != 0 or not run.stdout:
            raise RuntimeError(f"espeak-ng failed for voice {voice}: {run.stderr.decode(errors='replace').strip()}")
        wave, rate = sf.read(io.BytesIO(run.stdout), dtype="float64")
        loud = np.flatnonzero(np.abs(wave) > 0.01 * np.abs(wave).max())  # trim espeak's silence, keep 10 ms
        margin = rate // 100
        wave = wave[max(0, loud[0] - margin) : loud[-1] + margin]
        g = math.gcd(rate, self.sample_rate)
        wave = resample_poly(wave, self.sample_rate // g, rate // g)  # polyphase: fast, and exact bytes run to run
        return wave / np.abs(wave).max()

    def __call__(self, u: _Utterance) -> dict[str, Any]:
        import soundfile as sf

        speech = self._speech(u)
        rng = np.random.default_rng([self.seed, zlib.crc32(u.key.encode())])
        n = max(len(speech), round(self.seconds * self.sample_rate))
        clip = np.zeros(n)
        offset = int(rng.integers(n - len(speech) + 1))
        clip[offset : offset + len(speech)] = speech
        kind = str(rng.choice(["white", "pink", "brown"]))
        snr, gain = rng.uniform(*self.snr_db), rng.uniform(*self.gain_db)
        clip += _noise(kind, n, rng) * np.sqrt(np.mean(speech**2)) * 10 ** (-snr / 20)
        clip *= 10 ** (gain / 20) / np.abs(clip).max()  # peak at `gain` dB below full scale
        buf = io.BytesIO()
        pcm = np.round(clip * 32767).astype(np.int16)
        sf.write(buf, pcm, self.sample_rate, format=self.fmt.upper(), subtype="PCM_16")
        info = {"word": DIGITS[u.digit], "voice": u.voice, "accent": u.accent, "speed": u.speed, "pitch": u.pitch,
                "noise": kind, "snr_db": round(snr, 2), "gain_db": round(gain, 2)}  # fmt: skip
        return {"__key__": u.key, self.fmt: buf.getvalue(), "cls": u.digit, "json": info}


@SOURCES.register("spoken-digits", summary=__doc__)
def build(
    out_dir: Path,
    voices: Sequence[str] = VOICES,
    accents: Sequence[str] = ("en-us", "en-gb", "en-gb-x-rp"),
    speeds: Sequence[int] = (140, 190),
    pitches: Sequence[int] = (35, 65),
    val_voices: int = 8,
    test_voices: int = 12,
    seconds: float = 1.0,
    sample_rate: int = 16000,
    snr_db: Sequence[float] = (10.0, 40.0),  # background noise below the speech, range drawn from
    gain_db: Sequence[float] = (-20.0, -1.0),  # clip peak below full scale, range drawn from
    format: str = "flac",
    seed: int = 0,
    workers: int = 2,
    maxcount: int = 500,
) -> dict[str, int]:
    """Shards of every digit x voice x accent x speed x pitch; val and test voices (seeded draw) are not in train."""
    from mmeff.data import write_shards

    exe = espeak()
    if format not in ("flac", "wav"):
        raise ValueError(f"spoken-digits format {format!r}: expected 'flac' or 'wav'")
    voices = sorted(set(voices))
    if val_voices + test_voices >= len(voices):
        raise ValueError(f"spoken-digits: {len(voices)} voices leave none to train on after {val_voices} val + {test_voices} test")
    rng = np.random.default_rng(seed)
    order = [voices[i] for i in rng.permutation(len(voices))]
    split_voices = {
        "train": sorted(order[val_voices + test_voices :]),
        "val": sorted(order[:val_voices]),
        "test": sorted(order[val_voices : val_voices + test_voices]),
    }
    render = _Renderer(exe, sample_rate, seconds, snr_db, gain_db, format, seed)
    meta = {"classes": list(DIGITS), "sample_rate": sample_rate, "voices": split_voices}
    counts = {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for split, names in split_voices.items():
            jobs = [
                _Utterance(d, v, a, s, p)
                for v in names for a in sorted(accents) for s in sorted(speeds) for p in sorted(pitches) for d in range(10)
            ]  # fmt: skip
            jobs = [jobs[i] for i in rng.permutation(len(jobs))]  # mixed shards shuffle better
            write_shards(pool.map(render, jobs), out_dir, split, maxcount=maxcount, meta=meta, total=len(jobs))
            counts[split] = len(jobs)
    return counts

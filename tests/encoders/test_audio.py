"""Audio tokenizer: AST frontend parity, pad/crop, resampling, formats, SpecAugment, tokens, positions, stats."""

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
import yaml

from mmeff.cli import main
from mmeff.config import DataConfig, parse
from mmeff.data import build_shards, read_index
from mmeff.data.audio_stats import compute_stats
from mmeff.encoders.audio import AudioEncoder, AudioEncoderConfig, AudioTransform, decode, fbank
from mmeff.tasks.classify import build_model

REAL = Path("/usr/share/pocketsphinx/test/data")


def encode(wave: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), rate, format=fmt)
    return buf.getvalue()


def tone(seconds: float, rate: int, hz: float = 1000.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return 0.3 * np.sin(2 * np.pi * hz * t) + 0.01 * np.random.default_rng(0).standard_normal(t.size)


def test_fbank_is_kaldi_fbank_with_ast_settings():
    wave = torch.randn(16000) * 0.1 + 0.05
    expected = torchaudio.compliance.kaldi.fbank(
        (wave - wave.mean()).unsqueeze(0), htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10, frame_length=25,
    )  # fmt: skip
    assert torch.equal(fbank(wave, AudioEncoderConfig()), expected)
    assert expected.shape == (98, 128)


def test_transform_normalises_pads_and_crops():
    cfg = AudioEncoderConfig(num_mel_bins=32, frames=100, norm_mean=-5.0, norm_std=3.0)
    short, long = encode(tone(0.5, 16000), 16000), encode(tone(2.0, 16000), 16000, "FLAC")
    feats = [(fbank(decode(data, 16000), cfg) - cfg.norm_mean) / (2 * cfg.norm_std) for data in (short, long)]
    out = AudioTransform(cfg, train=False)({"wav": short})
    n = feats[0].shape[0]
    assert out.shape == (100, 32) and torch.equal(out[:n], feats[0]) and torch.equal(out[n:], torch.zeros(100 - n, 32))
    centre = (feats[1].shape[0] - 100) // 2
    assert torch.equal(AudioTransform(cfg, train=False)({"flac": long}), feats[1][centre : centre + 100])
    train = AudioTransform(AudioEncoderConfig(num_mel_bins=32, frames=100, freq_mask=0, time_mask=0), train=True)
    torch.manual_seed(0)
    assert len({tuple(train({"flac": long})[0, :3].tolist()) for _ in range(5)}) > 1  # random crops in training


def test_missing_or_bad_audio_named():
    with pytest.raises(KeyError, match="none of the audio fields"):
        AudioTransform(AudioEncoderConfig(), train=False)({"png": b"x"})
    with pytest.raises(ValueError, match="not decodable audio"):
        AudioTransform(AudioEncoderConfig(), train=False)({"wav": b"garbage"})


@pytest.mark.parametrize("fmt", ["WAV", "FLAC", "OGG", "MP3"])
def test_decodes_each_format(fmt):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt}")
    wave = tone(1.0, 16000)
    out = decode(encode(wave, 16000, fmt), 16000).numpy()
    assert abs(len(out) - len(wave)) <= 2000  # lossy codecs pad a little
    if fmt in ("WAV", "FLAC"):
        assert np.allclose(out, wave, atol=1e-4)
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 16000 / len(out) - 1000) < 5


@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_resamples_to_the_configured_rate(rate):
    out = decode(encode(tone(1.0, rate), rate), 16000).numpy()
    assert len(out) == 16000
    assert abs(np.argmax(np.abs(np.fft.rfft(out))) - 1000) <= 1  # 1 s: bin index = Hz
    stereo = np.stack([tone(1.0, rate), tone(1.0, rate)], axis=1)
    assert torch.allclose(decode(encode(stereo, rate), 16000), torch.from_numpy(out), atol=1e-5)


def test_spec_augment_only_in_training():
    # Features far above the mean are all positive, so a mask (filled with 0) shows as zeros.
    cfg = AudioEncoderConfig(num_mel_bins=64, frames=98, norm_mean=-100.0, freq_mask=30, time_mask=40)
    sample = {"wav": encode(tone(1.0, 16000), 16000)}
    assert (AudioTransform(cfg, train=False)(sample) > 0).all()
    torch.manual_seed(0)
    masked = [(AudioTransform(cfg, train=True)(sample) == 0) for _ in range(4)]
    assert any(m.all(dim=0).any() for m in masked)  # whole time steps masked
    assert any(m.all(dim=1).any() for m in masked)  # whole mel bands masked


def test_patch_and_frame_token_shapes():
    feats = torch.randn(2, 100, 128)
    patch = AudioEncoder(AudioEncoderConfig(pool="mean"), dim=16)
    assert patch.grid == (12, 9) and patch(feats).x.shape == (2, 108, 16)
    frame = AudioEncoder(AudioEncoderConfig(tokens="frame", frame_stack=4, pool="mean"), dim=16)
    assert frame(feats).x.shape == (2, 25, 16)
    assert frame(torch.randn(2, 99, 128)).x.shape == (2, 25, 16)  # the last frames padded to a full stack
    with pytest.raises(ValueError, match=r"features \[B, frames, 128\], got \(2, 100, 64\)"):
        patch(torch.randn(2, 100, 64))


@pytest.mark.parametrize("tokens", ["patch", "frame"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_class_token_and_pool(tokens, where):
    enc = AudioEncoder(AudioEncoderConfig(tokens=tokens, num_mel_bins=32, pool="cls", cls_position=where), dim=8)
    out = enc(torch.randn(3, 100, 32)).x
    n = out.shape[1] - 1
    i = {"first": 0, "middle": n // 2, "last": n}[where]
    assert torch.equal(out[:, i], enc.cls.expand(3, 1, 8)[:, 0]) and torch.equal(enc.pool(out), out[:, i])


def test_time_scan_is_a_transpose_of_freq_scan():
    cfg = dict(num_mel_bins=32, frames=40, patch_stride=[16, 12], pool="mean")
    time, freq = AudioEncoder(AudioEncoderConfig(**cfg), dim=8), AudioEncoder(AudioEncoderConfig(**cfg, scan="freq"), dim=8)
    freq.load_state_dict(time.state_dict())
    f, t = time.grid
    x = torch.randn(1, 40, 32)
    order = [fi * t + ti for ti in range(t) for fi in range(f)]
    assert torch.equal(time(x).x, freq(x).x[:, order])
    assert time(x).layout.grid == (1, t, f) and freq(x).layout.grid == (1, f, t)


@pytest.mark.parametrize("tokens", ["patch", "frame"])
def test_model_trained_on_1s_runs_on_3s(tokens):
    """The position embedding interpolates: a 1 s classifier takes 3 s features."""
    enc = {"name": "audio", "num_mel_bins": 64, "frames": 100, "tokens": tokens}
    cfg = parse({"encoder": enc, "task": {"name": "classify", "num_classes": 10}, "backbone": {"dim": 32, "causal": False}})
    model = build_model(cfg).eval()
    long = AudioEncoderConfig(**{**enc, "frames": 300})
    feats = AudioTransform(long, train=False)({"wav": encode(tone(3.0, 16000), 16000)})
    assert feats.shape == (300, 64)
    assert model.encoder(feats[None]).x.shape[1] == (1 + 5 * 29 if tokens == "patch" else 1 + 75)  # class + grid
    logits = model(feats[None])
    assert logits.shape == (1, 10) and torch.isfinite(logits).all()


def test_compute_stats_over_folder_shards(tmp_path, capsys):
    """A folder of class/xxx.wav -> shards (audio under `wav`) -> train-split log-mel moments, also via the CLI."""
    for label in ("yes", "no"):
        (tmp_path / "src" / label).mkdir(parents=True)
        for i in range(5):
            wave = tone(0.3 + 0.1 * i, 16000, hz=300 + 100 * i) * (1 + i)
            (tmp_path / "src" / label / f"{i}.wav").write_bytes(encode(wave, 16000))
    root = tmp_path / "shards"
    build_shards(str(tmp_path / "src"), root, maxcount=4)
    cfg = AudioEncoderConfig(num_mel_bins=32)
    mean, std = compute_stats(DataConfig(root=str(root), num_workers=0), cfg)
    feats = []
    for shard in read_index(root)["train"]["shards"]:
        with tarfile.open(root / shard) as tar:
            feats += [fbank(decode(tar.extractfile(m).read(), 16000), cfg).flatten() for m in tar if m.name.endswith(".wav")]
    x = torch.cat(feats).double()
    assert len(feats) > 1
    assert math.isclose(mean, x.mean().item(), rel_tol=1e-9) and math.isclose(std, x.std(correction=0).item(), rel_tol=1e-6)

    config = tmp_path / "audio.yaml"
    run = {"data": {"root": str(root)}, "encoder": {"name": "audio", "num_mel_bins": 32}, "task": {"name": "classify"}}
    config.write_text(yaml.safe_dump(run))
    assert main(["audio-stats", str(config)]) == 0
    assert capsys.readouterr().out.split() == ["norm_mean:", f"{mean:.6g}", "norm_std:", f"{std:.6g}"]


@pytest.mark.skipif(not REAL.is_dir(), reason="pocketsphinx-testdata is not installed (apt-get install pocketsphinx-testdata)")
def test_real_recordings():
    """Every recorded 16 kHz utterance gives finite features; two of them also through 8 and 22.05 kHz models."""
    files = sorted(REAL.glob("*/*.wav"))
    assert files, f"no .wav recordings under {REAL}"
    for rate, paths in ((16000, files), (8000, files[:2]), (22050, files[:2])):
        transform = AudioTransform(AudioEncoderConfig(sample_rate=rate, frames=300), train=False)
        for path in paths:
            data = path.read_bytes()
            info = sf.info(io.BytesIO(data))
            assert info.samplerate == 16000
            assert abs(len(decode(data, rate)) - info.frames * rate / 16000) <= 1
            feats = transform({"wav": data})
            assert feats.shape == (300, 128) and torch.isfinite(feats).all() and feats.std() > 0.1

"""The spoken-digits source: voice-disjoint splits, deterministic bytes, audio through the loader, missing espeak-ng."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import soundfile as sf

from mmeff.cli import main
from mmeff.config import DataConfig
from mmeff.data import build_shards, make_loader
from mmeff.data.sources import spoken_digits
from mmeff.encoders.audio import AudioEncoderConfig, AudioTransform

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
TINY = {"voices": ["f3", "m3", "croak", "klatt"], "accents": ["en-us"], "speeds": [175], "pitches": [50], "val_voices": 1, "test_voices": 1}


def members(root: Path, split: str) -> dict[str, bytes]:
    out = {}
    for shard in sorted(root.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    root = tmp_path_factory.mktemp("spoken")
    assert build_shards(None, root, source="spoken-digits", **TINY) == {"train": 20, "val": 10, "test": 10}
    return root


@needs_espeak
def test_splits_hold_every_digit_and_never_share_a_voice(tiny):
    voices = {}
    for split in ("train", "val", "test"):
        infos = [json.loads(v) for k, v in members(tiny, split).items() if k.endswith(".json")]
        labels = sorted(int(v) for k, v in members(tiny, split).items() if k.endswith(".cls"))
        assert labels == sorted(list(range(10)) * (len(infos) // 10))
        voices[split] = {i["voice"] for i in infos}
    assert voices["train"] | voices["val"] | voices["test"] == set(TINY["voices"])
    assert not voices["train"] & (voices["val"] | voices["test"]) and not voices["val"] & voices["test"]
    assert json.loads((tiny / "index.json").read_text())["meta"]["voices"] == {k: sorted(v) for k, v in voices.items()}


@needs_espeak
def test_build_is_deterministic(tiny, tmp_path):
    spoken_digits.build(tmp_path, workers=1, **TINY)
    for split in ("train", "val", "test"):
        assert [p.read_bytes() for p in sorted(tmp_path.glob(f"{split}-*.tar"))] == [
            p.read_bytes() for p in sorted(tiny.glob(f"{split}-*.tar"))
        ]


@needs_espeak
def test_audio_is_16k_flac_and_loads_as_features(tiny):
    flacs = [v for k, v in members(tiny, "test").items() if k.endswith(".flac")]
    info = sf.info(io.BytesIO(flacs[0]))
    assert (info.format, info.samplerate, info.channels, info.frames) == ("FLAC", 16000, 1, 16000)
    cfg = AudioEncoderConfig(num_mel_bins=40, frames=100)
    transform = AudioTransform(cfg, train=False)
    loader = make_loader(DataConfig(root=str(tiny), batch_size=4), "test", lambda s: {"x": transform(s), "y": int(s["cls"])}, train=False)
    batches = list(loader)
    assert sum(len(b["y"]) for b in batches) == 10 and batches[0]["x"].shape == (4, 100, 40)


def test_missing_espeak_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(spoken_digits.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"espeak-ng.*apt-get install espeak-ng"):
        spoken_digits.build(tmp_path)
    assert main(["shards", "--source", "spoken-digits", str(tmp_path / "out")]) == 2
    assert "apt-get install espeak-ng" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

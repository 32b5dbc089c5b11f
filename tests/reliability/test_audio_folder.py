"""Audio folders: a corrupt or empty clip stops `mmeff shards` naming the file; later skips name the source file."""

import logging

import numpy as np
import pytest
import soundfile as sf

from mmeff.data import build_shards, make_loader
from mmeff.config import DataConfig
from mmeff.errors import DataError


def _folder(root, n=6):
    for i in range(n):
        label = "yes" if i % 2 else "no"
        (root / label).mkdir(parents=True, exist_ok=True)
        sf.write(root / label / f"clip{i}.wav", np.sin(np.arange(800) * (i + 1) / 10).astype(np.float32), 8000)
    return root


def test_corrupt_and_empty_clips_are_named(tmp_path):
    src = _folder(tmp_path / "src")
    (src / "yes" / "broken.wav").write_bytes(b"RIFF\x00\x00garbage")
    sf.write(src / "no" / "silent.wav", np.zeros(0, dtype=np.float32), 8000)
    with pytest.raises(DataError, match=r"2 audio file\(s\) cannot be decoded: .*silent.wav \(no samples\).*broken.wav"):
        build_shards(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_skipped_sample_names_its_source_file(tmp_path, caplog):
    src = _folder(tmp_path / "src")
    build_shards(str(src), tmp_path / "out")
    cfg = DataConfig(root=str(tmp_path / "out"), val="{train,val,test}-*.tar")

    def needs_a_transcript(sample):
        return {"text": sample["txt"]}

    with caplog.at_level(logging.WARNING, logger="mmeff.data"), pytest.raises(DataError, match="no usable sample"):
        list(make_loader(cfg, "train", needs_a_transcript, train=True))
    assert "(from no/clip0.wav)" in caplog.text or "(from yes/clip1.wav)" in caplog.text

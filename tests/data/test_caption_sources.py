"""Caption sources: digit-scenes (deterministic, caption = layout, held-out scenes from held-out digit images only)
and spoken-sentences (voice split, transcripts)."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from mmeff.data import build_shards
from mmeff.data.sources import digit_scenes


def read(root, split):
    """{key: {ext: bytes}} of a split's shards."""
    samples = {}
    for shard in sorted(root.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    counts = build_shards(None, root, source="digit-scenes", train=60, val=10, test=30, maxcount=40)
    assert counts == {"train": 60, "val": 10, "test": 30}
    return root


def test_captions_read_the_layout():
    assert digit_scenes.caption([4, 1, 7]) == "three digits: 4, 1 and 7 from left to right"
    assert digit_scenes.caption([2, 9]) == "two digits: 2 and 9 from left to right"
    assert digit_scenes.caption([5]) == "one digit: 5"
    assert digit_scenes.caption([4, 1, 7], "words") == "four one seven"
    with pytest.raises(ValueError, match="style"):
        digit_scenes.caption([1], "poem")


def test_digit_scenes_are_deterministic(scenes, tmp_path):
    again = tmp_path / "again"
    build_shards(None, again, source="digit-scenes", train=60, val=10, test=30, maxcount=40)
    for shard in scenes.glob("*.tar"):
        assert (again / shard.name).read_bytes() == shard.read_bytes()


def test_caption_and_pixels_match_the_layout(scenes):
    tiles, labels = digit_scenes.digit_tiles(16)
    for split in ("train", "test"):
        for key, sample in read(scenes, split).items():
            info = json.loads(sample["json"])
            digits, corners = info["digits"], info["corners"]
            assert sample["txt"].decode() == digit_scenes.caption(digits)
            assert 1 <= len(digits) <= 4 and [int(labels[j]) for j in info["sources"]] == digits
            xs = [x for x, _ in corners]
            assert all(b - a >= 16 for a, b in zip(xs, xs[1:])), "tiles overlap or are out of order"
            canvas = np.array(Image.open(io.BytesIO(sample["png"])))
            assert canvas.shape == (16, 64)
            for j, (x, y) in zip(info["sources"], corners):
                assert (canvas[y : y + 16, x : x + 16] == tiles[j]).all()  # tiles never overlap: drawn as is


def test_held_out_scenes_use_only_held_out_digit_images(scenes):
    pools = digit_scenes.digit_pools(0)
    assert not set(pools["train"]) & (set(pools["val"]) | set(pools["test"]))
    used = {s: {j for x in read(scenes, s).values() for j in json.loads(x["json"])["sources"]} for s in ("train", "val", "test")}
    for split, indices in used.items():
        assert indices <= set(pools[split].tolist())
    assert not used["test"] & used["train"]


def test_words_style(tmp_path):
    build_shards(None, tmp_path, source="digit-scenes", train=5, val=0, test=0, style="words")
    for sample in read(tmp_path, "train").values():
        words = sample["txt"].decode().split()
        assert words == [digit_scenes.NUMBER_WORDS[d] for d in json.loads(sample["json"])["digits"]]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_spoken_sentences_split_by_voice_with_transcripts(tmp_path):
    import soundfile as sf

    voices = ["Alex", "Andy", "f1", "m1", "klatt"]
    options = dict(voices=voices, accents=["en-us"], speeds=[170], pitches=[50], val_voices=1, test_voices=1,
                   train=4, val=2, test=2, seconds=2.5)  # fmt: skip
    build_shards(None, tmp_path, source="spoken-sentences", **options)
    index = json.loads((tmp_path / "index.json").read_text())
    split_voices = index["meta"]["voices"]
    assert not set(split_voices["train"]) & (set(split_voices["val"]) | set(split_voices["test"]))
    for split in ("train", "val", "test"):
        for sample in read(tmp_path, split).values():
            info = json.loads(sample["json"])
            assert info["voice"] in split_voices[split]
            assert sample["txt"].decode() == "".join(map(str, info["digits"]))
            wave, rate = sf.read(io.BytesIO(sample["flac"]))
            assert rate == 16000 and len(wave) >= 2.5 * 16000
    again = tmp_path / "again"
    build_shards(None, again, source="spoken-sentences", **options)
    assert read(again, "test").keys() == read(tmp_path, "test").keys()
    build_shards(None, tmp_path / "words", source="spoken-sentences", **{**options, "style": "words"})
    for sample in read(tmp_path / "words", "val").values():
        assert sample["txt"].decode().split()[0] in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

"""Writing shards: round trips through plain webdataset and tar, the index, and the bundled sources."""

import collections
import csv
import io
import json
import subprocess
import tarfile

import numpy as np
import pytest
import soundfile as sf
import webdataset as wds
from PIL import Image

from mmeff.data import build_shards, read_index, write_shards


def samples(n, start=0):
    for i in range(start, start + n):
        yield {"__key__": f"s{i:04d}", "cls": i % 3, "txt": f"text {i}", "npy": np.arange(i, i + 4)}


def test_round_trip_through_webdataset_and_tar(tmp_path):
    shards = write_shards(samples(25), tmp_path, "train", maxcount=10, meta={"classes": ["a", "b", "c"]})
    assert [s.name for s in shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".index.json.lock", "index.json", *(s.name for s in shards)]

    read = list(wds.WebDataset(str(tmp_path / "train-{000000..000002}.tar"), shardshuffle=False).decode())
    assert [r["__key__"] for r in read] == [f"s{i:04d}" for i in range(25)]
    assert [r["cls"] for r in read] == [i % 3 for i in range(25)]
    assert read[7]["txt"] == "text 7" and read[7]["npy"].tolist() == [7, 8, 9, 10]

    listing = subprocess.run(["tar", "tf", str(shards[0])], capture_output=True, text=True, check=True).stdout.split()
    assert listing[:3] == ["s0000.cls", "s0000.npy", "s0000.txt"] and len(listing) == 30

    index = json.loads((tmp_path / "index.json").read_text())
    assert index == {
        "train": {"shards": [s.name for s in shards], "samples": 25, "counts": [10, 10, 5]},
        "meta": {"classes": ["a", "b", "c"]},
    }
    assert read_index(tmp_path) == index


def test_rewrite_replaces_the_split_and_keeps_the_others(tmp_path):
    write_shards(samples(25), tmp_path, "train", maxcount=10)
    write_shards(samples(4), tmp_path, "val", maxcount=10, meta={"classes": ["x"]})
    write_shards(samples(5), tmp_path, "train", maxcount=10, meta={"source": "test"})
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000000.tar", "val-000000.tar"]
    index = read_index(tmp_path)
    assert index["train"]["samples"] == 5 and index["val"]["samples"] == 4
    assert index["meta"] == {"classes": ["x"], "source": "test"}


def test_failed_write_leaves_no_shard_and_no_index(tmp_path):
    def broken():
        yield from samples(15)
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError, match="source failed"):
        write_shards(broken(), tmp_path, "train", maxcount=10)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    with pytest.raises(ValueError, match="no samples"):
        write_shards([], tmp_path, "train")
    with pytest.raises(ValueError, match="split name"):
        write_shards(samples(1), tmp_path, "my-split")


def test_read_index_of_shards_written_by_webdataset(tmp_path):
    with wds.ShardWriter(str(tmp_path / "valid-%04d.tar"), maxcount=10, verbose=0) as sink:
        for s in samples(23):
            sink.write(s)
    index = read_index(tmp_path)
    shards = ["valid-0000.tar", "valid-0001.tar", "valid-0002.tar"]
    assert index == {"valid": {"shards": shards, "samples": 23, "counts": [10, 10, 3]}}


def test_digits_source(tmp_path):
    assert build_shards(None, tmp_path / "a", source="digits") == {"train": 1293, "val": 144, "test": 360}
    assert build_shards(None, tmp_path / "b", source="digits", size=16) == {"train": 1293, "val": 144, "test": 360}
    index_bytes = (tmp_path / "a" / "index.json").read_bytes()
    assert index_bytes == (tmp_path / "b" / "index.json").read_bytes()  # same split, same shards
    index = json.loads(index_bytes)
    assert index["meta"]["classes"] == [str(c) for c in range(10)]
    assert len(index["test"]["shards"]) >= 3 and len(index["val"]["shards"]) >= 3

    for size, root in ((32, tmp_path / "a"), (16, tmp_path / "b")):
        split_labels = {}
        for split in ("train", "val", "test"):
            urls = [str(root / name) for name in index[split]["shards"]]
            rows = list(wds.WebDataset(urls, shardshuffle=False))
            split_labels[split] = collections.Counter(int(r["cls"]) for r in rows)
            image = Image.open(io.BytesIO(rows[0]["png"]))
            assert image.mode == "L" and image.size == (size, size)
        totals = split_labels["train"] + split_labels["val"] + split_labels["test"]
        assert sum(totals.values()) == 1797
        for c, n in totals.items():  # stratified: each class ~20% in test
            assert abs(split_labels["test"][c] - 0.2 * n) <= 1
    with tarfile.open(tmp_path / "a" / "test-000000.tar") as a, tarfile.open(tmp_path / "b" / "test-000000.tar") as b:
        assert a.getnames() == b.getnames()


def test_unknown_source_and_options(tmp_path):
    with pytest.raises(ValueError, match=r"unknown shard source 'nope'; bundled sources: .*digits.*folder"):
        build_shards(None, tmp_path, source="nope")
    with pytest.raises(ValueError, match=r"unknown option.*colour.*its options \(-o KEY=VALUE\): size=32 maxcount=64 seed=0"):
        build_shards(None, tmp_path, source="digits", colour=True)
    with pytest.raises(ValueError, match="either SRC"):
        build_shards(None, tmp_path)


def png(value):
    out = io.BytesIO()
    Image.fromarray(np.full((4, 4), value, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_folder_source(tmp_path):
    src = tmp_path / "src"
    files = {}
    for c, name in enumerate(["cat", "dog", "emu"]):
        (src / name).mkdir(parents=True)
        for i in range(10):
            path = src / name / f"{i}.png"
            path.write_bytes(png(c * 10 + i))
            files[path.read_bytes()] = c
    out = tmp_path / "out"
    assert build_shards(str(src), out) == {"train": 21, "val": 3, "test": 6}
    index = read_index(out)
    assert index["meta"]["classes"] == ["cat", "dog", "emu"]
    rows = list(wds.WebDataset(str(out / "{train,val,test}-000000.tar"), shardshuffle=False))
    assert len(rows) == 30 and all(files[r["png"]] == int(r["cls"]) for r in rows)


def test_csv_manifest_with_split_column(tmp_path):
    (tmp_path / "clips").mkdir()
    with open(tmp_path / "clips.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for i in range(12):
            sf.write(tmp_path / "clips" / f"{i}.wav", np.full(8, i / 16, dtype=np.float32), 8000)
            writer.writerow([f"clips/{i}.wav", "yes" if i % 2 else "no", "test" if i < 3 else "train"])
    out = tmp_path / "out"
    assert build_shards(str(tmp_path / "clips.csv"), out) == {"test": 3, "train": 9}
    rows = list(wds.WebDataset(str(out / "test-000000.tar"), shardshuffle=False))
    wavs = [(tmp_path / "clips" / f"{i}.wav").read_bytes() for i in range(3)]
    assert [(r["wav"], int(r["cls"]), r["src"]) for r in rows] == [
        (wavs[0], 0, b"clips/0.wav"), (wavs[1], 1, b"clips/1.wav"), (wavs[2], 0, b"clips/2.wav")]
    assert read_index(out)["meta"]["classes"] == ["no", "yes"]


def test_jsonl_manifest_without_split_column(tmp_path):
    lines = []
    for i in range(40):
        (tmp_path / f"{i}.txt").write_text(f"doc {i}")
        lines.append(json.dumps({"path": str(tmp_path / f"{i}.txt"), "label": 10 if i % 2 else 2}))
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    assert build_shards(str(tmp_path / "docs.jsonl"), tmp_path / "out") == {"train": 28, "val": 4, "test": 8}
    assert read_index(tmp_path / "out")["meta"]["classes"] == ["2", "10"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"path": "missing.txt", "label": 1}) + "\n")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        build_shards(str(tmp_path / "bad.jsonl"), tmp_path / "out2")

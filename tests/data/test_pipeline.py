"""Loading shards: rank/worker splits, epoch lengths, skipping corrupt data, the Lightning DataModule."""

import logging
import tarfile

import lightning as L
import pytest
import torch
import webdataset as wds

from mmeff.config import DataConfig
from mmeff.data import ShardDataModule, make_loader, write_shards
from mmeff.errors import DataError


def write(root, n, maxcount, split="train", drop_cls=()):
    samples = (
        {"__key__": f"{split}{i:04d}", "bin": bytes([i % 256]) * 600, **({} if i in drop_cls else {"cls": i % 3})}
        for i in range(n)
    )
    return write_shards(samples, root, split, maxcount=maxcount)


def record(sample):
    return {"y": int(sample["cls"]), "key": sample["__key__"], "url": sample["__url__"]}


def run(loader):
    """All batches of one epoch, checked against the loader's length."""
    batches = list(loader)
    assert len(batches) == len(loader)
    return batches


def keys(batches):
    return [k for b in batches for k in b["key"]]


def test_train_ranks_get_exact_lengths_and_disjoint_shards(tmp_path):
    write(tmp_path, 80, 10)
    cfg = DataConfig(root=str(tmp_path), batch_size=8)
    loaders = [make_loader(cfg, "train", record, True, world_size=2, rank=r) for r in (0, 1)]
    orders = []
    for _ in range(2):
        epoch = [run(loader) for loader in loaders]
        assert [len(b) for b in epoch] == [5, 5] and all(len(b["y"]) == 8 for b in epoch[0] + epoch[1])
        urls = [{u for b in batches for u in b["url"]} for batches in epoch]
        assert not urls[0] & urls[1] and len(urls[0] | urls[1]) == 8
        orders.append([b["key"] for b in epoch[0]])
    assert orders[0] != orders[1]  # reshuffled each epoch
    again = make_loader(cfg, "train", record, True, world_size=2, rank=0)
    assert [b["key"] for b in run(again)] == orders[0]  # deterministic from the seed


def test_train_ranks_take_equal_runs_of_uneven_shards(tmp_path):
    write(tmp_path, 30, 10)  # 3 shards for 2 ranks: each takes 30 // (2 * 4) = 3 batches of 4, one shard shared
    cfg = DataConfig(root=str(tmp_path), batch_size=4, shuffle_buffer=0)
    seen = [keys(run(make_loader(cfg, "train", record, True, 2, r))) for r in (0, 1)]
    assert [len(k) for k in seen] == [12, 12] and len(set(seen[0] + seen[1])) == 24  # no sample twice


def test_fewer_train_shards_than_ranks_times_workers(tmp_path):
    write(tmp_path, 20, 10)  # 2 shards for 2 ranks x 2 workers: each worker reads its part of one
    cfg = DataConfig(root=str(tmp_path), batch_size=2, num_workers=2)
    seen = [keys(run(make_loader(cfg, "train", record, True, world_size=2, rank=r))) for r in (0, 1)]
    assert sorted(seen[0] + seen[1]) == [f"train{i:04d}" for i in range(20)]


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_sees_each_sample_once_across_ranks(tmp_path, workers):
    write(tmp_path, 38, 7, split="val")  # 6 shards: 5 x 7 + 3
    cfg = DataConfig(root=str(tmp_path), batch_size=64, eval_batch_size=4, num_workers=workers)
    seen = [keys(run(make_loader(cfg, "val", record, False, world_size=2, rank=r))) for r in (0, 1)]
    assert sorted(seen[0] + seen[1]) == [f"val{i:04d}" for i in range(38)]
    assert not set(seen[0]) & set(seen[1])


def test_train_with_two_workers(tmp_path):
    write(tmp_path, 60, 10)
    cfg = DataConfig(root=str(tmp_path), batch_size=8, num_workers=2)
    loader = make_loader(cfg, "train", record, True)
    assert loader.persistent_workers
    first, second = run(loader), run(loader)
    assert len(first) == len(second) == 7 and keys(first) != keys(second)


def test_eval_uses_fewer_workers_than_shards(tmp_path, caplog):
    write(tmp_path, 5, 10, split="test")
    cfg = DataConfig(root=str(tmp_path), num_workers=2)
    with caplog.at_level(logging.INFO, logger="mmeff.data"):
        loader = make_loader(cfg, "test", record, False)
    assert loader.num_workers == 1 and "rank 0 has 1 shard(s), so it uses as many loader workers, not 2" in caplog.text
    assert len(keys(run(loader))) == 5


def test_missing_shards(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "none"), source="digits")
    with pytest.raises(FileNotFoundError) as error:
        make_loader(cfg, "val", record, False)
    assert str(error.value) == (
        f"no val shards: pattern 'val-*.tar' matches nothing in {tmp_path / 'none'}; "
        f"write them with `mmeff shards --source digits {tmp_path / 'none'}`"
    )


def test_reads_shards_written_by_webdataset(tmp_path):
    with wds.ShardWriter(str(tmp_path / "part-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(35):
            sink.write({"__key__": f"k{i:03d}", "cls": i % 2})
    cfg = DataConfig(root=str(tmp_path), val="part-{000000..000003}.tar", batch_size=8)
    loader = make_loader(cfg, "val", record, False)
    assert len(loader) == 5  # ceil(35 / 8), the count read from the tar listings
    assert keys(run(loader)) == [f"k{i:03d}" for i in range(35)]


def truncate_inside_data(path):
    """Cut the tar in the middle of its third member's data."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[2]
    with open(path, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


def truncate_at_header(path):
    """Cut the tar cleanly before its third member (tarfile then sees a short, valid-looking archive)."""
    with tarfile.open(path) as tar:
        member = tar.getmembers()[2]
    with open(path, "r+b") as f:
        f.truncate(member.offset)


def corrupt_set(root):
    shards = write(root, 50, 10)
    truncate_inside_data(shards[1])
    truncate_at_header(shards[3])
    (root / "train-000009.tar").write_bytes(b"not a tar file" * 100)
    return shards


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shards_are_skipped_and_counted(tmp_path, caplog, workers):
    shards = corrupt_set(tmp_path)
    cfg = DataConfig(root=str(tmp_path), val="train-*.tar", eval_batch_size=8, num_workers=workers)
    with caplog.at_level(logging.WARNING, logger="mmeff.data"):
        loader = make_loader(cfg, "val", record, False)
        batches = list(loader)  # len(loader) is an upper bound here: it counts the lost samples too
    assert sum(b["_skipped"] for b in batches) == 3
    assert len(keys(batches)) == 10 + 0 + 10 + 1 + 10
    assert "cannot list shard" in caplog.text and "train-000009.tar" in caplog.text
    if workers == 0:  # worker processes log to their own stderr
        assert f"skipping corrupt shard {shards[1]} after 0 sample(s): ReadError: unexpected end of data" in caplog.text
        assert f"skipping truncated shard {shards[3]}: it ended after 1 of 10 samples" in caplog.text
        assert f"skipping corrupt shard {tmp_path / 'train-000009.tar'} after 0 sample(s): ReadError" in caplog.text
    train = make_loader(DataConfig(root=str(tmp_path), batch_size=8, num_workers=workers), "train", record, True)
    assert len(run(train)) == 50 // 8  # the index's counts: damage is found only when reading


def test_strict_mode_raises_naming_the_shard(tmp_path):
    shards = corrupt_set(tmp_path)
    cfg = DataConfig(root=str(tmp_path), strict=True)
    with pytest.raises(DataError, match="cannot list shard .*train-000009.tar"):
        make_loader(cfg, "train", record, True)
    cfg.train = "train-00000[0-3].tar"
    with pytest.raises(DataError, match=f"^corrupt shard {shards[1]} .*data.strict: true stops") as e:
        list(make_loader(cfg, "train", record, True))
    assert "skipping" not in str(e.value)


def test_sample_missing_a_field_is_skipped(tmp_path, caplog):
    shards = write(tmp_path, 12, 5, split="test", drop_cls={6})
    cfg = DataConfig(root=str(tmp_path), batch_size=4)
    with caplog.at_level(logging.WARNING, logger="mmeff.data"):
        batches = run(make_loader(cfg, "test", record, False))
    assert [b["_skipped"] for b in batches] == [0, 1, 0]
    assert len(keys(batches)) == 11
    assert f"skipping sample 'test0006' in shard {shards[1]}: missing field 'cls'" in caplog.text
    cfg.strict = True
    with pytest.raises(DataError, match="sample 'test0006' in shard .*test-000001.tar: missing field 'cls'"):
        list(make_loader(cfg, "test", record, False))


def test_all_samples_skipped_in_train_is_an_error(tmp_path):
    write(tmp_path, 10, 5)
    cfg = DataConfig(root=str(tmp_path), batch_size=2)
    with pytest.raises(DataError, match="got no usable sample"):
        list(make_loader(cfg, "train", lambda s: {"x": s["jpg"]}, True))


class Counting(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.train_keys, self.val_keys = [], []

    def training_step(self, batch, _):
        self.train_keys += batch["key"]
        return (self.w * batch["y"].float()).sum()

    def validation_step(self, batch, _):
        self.val_keys += batch["key"]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_datamodule_with_a_trainer(tmp_path):
    write(tmp_path, 40, 10)
    write(tmp_path, 10, 5, split="val")
    cfg = DataConfig(root=str(tmp_path), batch_size=8, test=None)
    data, model = ShardDataModule(cfg, record, record), Counting()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    assert trainer.num_training_batches == 5 and len(model.train_keys) == 2 * 5 * 8
    assert sorted(model.val_keys) == sorted(2 * [f"val{i:04d}" for i in range(10)])
    assert trainer.train_dataloader.dataset.epoch == 2
    assert data.test_dataloader() == []

"""Data that scales with ranks (issue 23): mid-epoch resume skips exactly the batches trained on, resampled shards,
equal eval batch counts for sharded models, samples_per_epoch, and the resume state of the DataModule."""

import logging
from types import SimpleNamespace

import pytest

from mmeff.config import DataConfig
from mmeff.data import ShardDataModule, make_loader, write_shards


def write(root, n, maxcount, split="train"):
    samples = ({"__key__": f"{split}{i:04d}", "cls": i % 3} for i in range(n))
    return write_shards(samples, root, split, maxcount=maxcount)


def record(sample):
    return {"key": sample["__key__"]}


def keys(batches):
    return [k for b in batches for k in b["key"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skips_the_batches_trained_on(tmp_path, workers):
    write(tmp_path, 120, 10)
    cfg = DataConfig(root=str(tmp_path), batch_size=4, num_workers=workers, shuffle_buffer=20)
    full = make_loader(cfg, "train", record, True, world_size=2, rank=1)
    first, second = list(full), list(full)
    resumed = make_loader(cfg, "train", record, True, world_size=2, rank=1, skip=5)
    again, after = list(resumed), list(resumed)
    assert len(first) == 15 and len(again) == 10
    # Exactly the batches after the first 5 (with 2 workers the loader interleaves them from worker 0 again, so
    # their order may differ); the first 5 are never read again in this epoch.
    assert sorted(keys(again)) == sorted(keys(first[5:]))
    assert keys(after) == keys(second)  # the next epoch is whole


def test_resampled_draws_shards_for_any_rank_count(tmp_path):
    write(tmp_path, 30, 10)  # 3 shards for 2 ranks x 2 workers: too few to split, fine to resample
    cfg = DataConfig(root=str(tmp_path), batch_size=5, num_workers=2)
    with pytest.raises(Exception, match="resampled: true"):
        make_loader(cfg, "train", record, True, world_size=2, rank=0)
    cfg.resampled = True
    epochs = [[keys(make_loader(cfg, "train", record, True, world_size=2, rank=r)) for r in (0, 1)] for _ in range(2)]
    assert [len(k) for k in epochs[0]] == [15, 15] and epochs[0] == epochs[1]  # equal counts, deterministic
    assert epochs[0][0] != epochs[0][1] and {k[:5] for k in epochs[0][0] + epochs[0][1]} == {"train"}


def test_samples_per_epoch_sets_the_epoch_length(tmp_path):
    write(tmp_path, 40, 10)
    cfg = DataConfig(root=str(tmp_path), batch_size=4, samples_per_epoch=200, resampled=True)
    assert len(list(make_loader(cfg, "train", record, True, world_size=2, rank=1))) == 200 // (2 * 4)


@pytest.mark.parametrize("workers, length, padding", [(0, 4, 1), (2, 5, 2)])
def test_equal_eval_pads_the_short_ranks(tmp_path, workers, length, padding, caplog):
    # Shards of 10, 10, 5: rank 0 batches 15 samples (in 4 batches, or 3 + 2 by two workers), rank 1 10 (3 batches).
    write(tmp_path, 25, 10, split="val")
    cfg = DataConfig(root=str(tmp_path), batch_size=4, num_workers=workers)
    with caplog.at_level(logging.WARNING, "mmeff.data"):
        loaders = [make_loader(cfg, "val", record, False, 2, r, equal=True) for r in (0, 1)]
        batches = [list(loader) for loader in loaders]
    assert [len(b) for b in batches] == [len(loader) for loader in loaders] == [length, length]
    real = [k for b in batches for batch in b if not batch.get("_pad") for k in batch["key"]]
    assert sorted(real) == [f"val{i:04d}" for i in range(25)]  # every sample once, plus flagged repeats
    assert f"rank 1 repeats {padding} batch(es)" in caplog.text


def test_equal_eval_pads_a_rank_without_shards(tmp_path):
    write(tmp_path, 9, 10, split="val")  # one shard: rank 1 has none and repeats the split's first batch
    cfg = DataConfig(root=str(tmp_path), batch_size=4)
    batches = [list(make_loader(cfg, "val", record, False, 2, r, equal=True)) for r in (0, 1)]
    assert [len(b) for b in batches] == [3, 3] and all(b["_pad"] for b in batches[1])
    assert batches[1][0]["key"] == batches[0][0]["key"]


def _datamodule_at(tmp_path, processed: int) -> ShardDataModule:
    """A datamodule over 80 samples (10 batches of 4 per epoch and rank of 2) whose fake trainer is `processed`
    batches into epoch 1."""
    write(tmp_path, 80, 10)
    data = ShardDataModule(DataConfig(root=str(tmp_path), batch_size=4, val=None, test=None), record, record)
    progress = SimpleNamespace(current=SimpleNamespace(processed=processed))
    data.trainer = SimpleNamespace(world_size=2, global_rank=0, current_epoch=1, strategy=object(), num_training_batches=10,
                                   fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
    return data


def test_datamodule_resume_state(tmp_path, caplog):
    data = _datamodule_at(tmp_path, processed=3)
    state = data.state_dict()
    assert state == {"epoch": 1, "batches": 3, "world_size": 2, "num_workers": 0, "batch_size": 4}
    data.load_state_dict(state)
    assert len(list(data.train_dataloader())) == 10 - 3
    assert len(list(data.train_dataloader())) == 10  # the skip applies once
    data.load_state_dict({**state, "world_size": 4})
    with caplog.at_level(logging.WARNING, "mmeff.data"):
        assert len(list(data.train_dataloader())) == 10
    assert "starts over" in caplog.text


def test_a_checkpoint_at_an_epoch_end_resumes_with_the_next_epochs_data(tmp_path):
    # Lightning builds the train loader of a run resumed from an epoch's end before it moves to the next epoch
    # (current_epoch is still the saved one): the loader must start at the next data epoch, not skip the whole saved
    # one and train the next epoch on its leftovers (what the kill-and-resume test caught: the loss moved by 0.03).
    data = _datamodule_at(tmp_path, processed=10)
    state = data.state_dict()
    assert state["epoch"] == 2 and state["batches"] == 0
    data.load_state_dict(state)
    loader = data.train_dataloader()
    assert loader.dataset.epoch == 2 and len(list(loader)) == 10

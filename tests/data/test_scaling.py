"""Data that scales with ranks (issue 23): a mid-epoch resume takes exactly the samples of the epoch not trained on,
on the same number of ranks or another (a fake world of several ranks in one process), resampled shards, equal eval
batch counts for sharded models, samples_per_epoch, and the resume state of the DataModule."""

import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import SingleDeviceStrategy

from mmeff.config import DataConfig
from mmeff.data import ShardDataModule, make_loader, saved_position, write_shards
from mmeff.data.plan import Deal, rank_batches


def write(root, n, maxcount, split="train"):
    samples = ({"__key__": f"{split}{i:04d}", "cls": i % 3} for i in range(n))
    return write_shards(samples, root, split, maxcount=maxcount)


def record(sample):
    return {"key": sample["__key__"]}


def keys(batches):
    return [k for b in batches for k in b["key"]]


def fake_trainer(world_size: int, rank: int = 0, epoch: int = 0) -> SimpleNamespace:
    """What ShardDataModule reads of a Lightning trainer, for one rank of a `world_size`-rank world."""
    current = SimpleNamespace(ready=0, started=0, processed=0, completed=0)
    return SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=epoch, strategy=object(),
                           callbacks=[], fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
                               batch_progress=SimpleNamespace(current=current))))


def world(cfg, world_size, state=None, epoch=0):
    """Each rank's ShardDataModule in a fake `world_size`-rank world, resumed from `state`, and its train batches."""
    ranks = []
    for rank in range(world_size):
        data = ShardDataModule(cfg, record, record, resume=state)
        data.trainer = fake_trainer(world_size, rank, epoch)
        loader = data.train_dataloader()
        data.trainer.num_training_batches = len(loader)
        ranks.append((data, list(loader)))
    return ranks


def saved(data, processed):
    """The datamodule's state in a checkpoint written after Lightning's `processed` batches (on a train batch end)."""
    current = data.trainer.fit_loop.epoch_loop.batch_progress.current
    current.ready = current.started = current.processed = processed
    current.completed = processed - 1
    return data.state_dict()


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skips_the_batches_trained_on(tmp_path, workers):
    write(tmp_path, 120, 10)
    cfg = DataConfig(root=str(tmp_path), batch_size=4, num_workers=workers, shuffle_buffer=20)
    full = make_loader(cfg, "train", record, True, world_size=2, rank=1)
    first, second = list(full), list(full)
    state = saved(world(cfg, 2)[1][0], 5)
    assert state["segments"] == [[2, max(1, workers), 4, 5]] and state["consumed"] == 2 * 5 * 4
    resumed = make_loader(cfg, "train", record, True, world_size=2, rank=1, resume=state)
    again, after = list(resumed), list(resumed)
    assert len(first) == 15 and len(again) == 10
    # Exactly the batches after the first 5 (with 2 workers the loader interleaves them from worker 0 again, so
    # their order may differ); the first 5 are never read again in this epoch.
    assert sorted(keys(again)) == sorted(keys(first[5:]))
    assert keys(after) == keys(second)  # the next epoch is whole


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_on_another_rank_count_takes_exactly_the_unseen_samples(tmp_path, workers, caplog):
    write(tmp_path, 100, 7)  # 15 shards: 14 of 7 samples and one of 2
    cfg = DataConfig(root=str(tmp_path), batch_size=4, shuffle_buffer=8, val=None, test=None)
    # Epoch 0 on 2 ranks: 12 batches of 4 a rank (96 of the 100 samples), checkpointed after 5.
    two = world(cfg, 2)
    epoch = keys(two[0][1] + two[1][1])
    seen = keys(two[0][1][:5] + two[1][1][:5])
    assert len(set(epoch)) == 96 and set(seen) < set(epoch)
    state = saved(two[0][0], 5)

    # Resumed on 1 rank (and `workers` loader workers): the 56 unseen samples, in 14 of this deal's 25 batches per
    # epoch; Lightning's count (5 batches of the old deal) is moved to 25 - 14, so its epoch ends with the last one.
    cfg.num_workers = workers
    with caplog.at_level(logging.WARNING, "mmeff.data"):
        [(one, rest)] = world(cfg, 1, state)
    assert "the 56 samples left of the epoch are dealt over this run's 1 rank(s)" in caplog.text
    assert len(rest) == 14 and sorted(keys(rest)) == sorted(set(epoch) - set(seen))
    [count] = one.trainer.callbacks
    saved(one, 5)
    count.on_train_start(one.trainer, None)
    current = one.trainer.fit_loop.epoch_loop.batch_progress.current
    assert (current.processed, current.completed) == (11, 10)

    # Checkpointed after 3 of those, resumed on 2 ranks: the 44 left, 22 a rank (five batches of 4, one of 2).
    state = saved(one, 11 + 3)
    assert state["segments"] == [[2, 1, 4, 5], [1, max(1, workers), 4, 3]] and state["consumed"] == 40 + 12
    cfg.num_workers = 0
    two = world(cfg, 2, state)
    assert [[len(b["key"]) for b in batches] for _, batches in two] == [[4, 4, 4, 4, 4, 2]] * 2
    rest2 = keys(two[0][1] + two[1][1])
    assert len(rest2) == 44 and set(rest2) == set(epoch) - set(seen) - set(keys(rest[:3]))
    assert two[0][0].trainer.callbacks[0].count == 12 - 6


@pytest.mark.parametrize("count, ranks, size, limit, batches", [
    (9, 2, 4, 10, [[4, 1], [3, 1]]),  # every sample, as many batches on each rank
    (30, 2, 4, 2, [[4, 4], [4, 4]]),  # no more batches than an epoch of this deal has: 14 left out
    (3, 2, 1, 10, [[1], [1]]),  # batch size 1 and an odd count: one left out
    (1, 2, 4, 10, [[], []]),  # fewer samples than ranks: none
])
def test_rank_batches(count, ranks, size, limit, batches):
    assert rank_batches(count, Deal(ranks, 1, size), limit) == batches


class Keys(L.LightningModule):
    """Records the sample keys of each train batch by epoch; its schedule asks for the train loader's length."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = {}

    def training_step(self, batch, _):
        self.seen.setdefault(self.current_epoch, []).append(list(batch["key"]))
        return self.w.sum() * len(batch["key"])

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, self.trainer.estimated_stepping_batches)]


class RestoresAfterSetup(SingleDeviceStrategy):
    """Restores a checkpoint after its setup, as FSDP does: configure_optimizers has then built the train loader."""

    restore_checkpoint_after_setup = True


def test_lightning_resumes_mid_epoch_on_another_deal(tmp_path):
    # One process, so the deal changes through the batch size (as a rank count would): Lightning restores its batch
    # count of the old deal, and the epoch must still end exactly with the last of the unseen samples. The checkpoint
    # is in epoch 1, which the loader must take from the position: Lightning builds it before restoring its epoch.
    write(tmp_path, 40, 10)
    fits, last = [], tmp_path / "ckpt" / "last.ckpt"
    for batch_size, steps in ((4, 10 + 3), (8, -1)):
        cfg = DataConfig(root=str(tmp_path), batch_size=batch_size, val=None, test=None)
        model, data = Keys(), ShardDataModule(cfg, record, record, resume=saved_position(last) if fits else None)
        trainer = L.Trainer(strategy=RestoresAfterSetup("cpu"), max_epochs=3, max_steps=steps, logger=False,
                            enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[ModelCheckpoint(last.parent, "last", every_n_train_steps=13,
                                                       enable_version_counter=False)])
        trainer.fit(model, datamodule=data, ckpt_path=last if fits else None)
        fits.append((model.seen, trainer.global_step))
    (before, _), (after, steps) = fits
    assert [len(b) for b in after[1]] == [8, 8, 8, 4] and [len(b) for b in after[2]] == [8] * 5
    assert steps == 13 + 4 + 5 and len(before[0]) == 10 and len(before[1]) == 3
    everything = [f"train{i:04d}" for i in range(40)]
    assert sorted(sum(before[1] + after[1], [])) == sorted(sum(after[2], [])) == everything


def test_resampled_draws_shards_for_any_rank_count(tmp_path, caplog):
    write(tmp_path, 30, 10)  # 3 shards for 2 ranks x 2 workers
    cfg = DataConfig(root=str(tmp_path), batch_size=5, num_workers=2, resampled=True, val=None, test=None)
    epochs = [[keys(make_loader(cfg, "train", record, True, world_size=2, rank=r)) for r in (0, 1)] for _ in range(2)]
    assert [len(k) for k in epochs[0]] == [15, 15] and epochs[0] == epochs[1]  # equal counts, deterministic
    assert epochs[0][0] != epochs[0][1] and {k[:5] for k in epochs[0][0] + epochs[0][1]} == {"train"}
    # Resumed on 1 rank after 1 batch a rank: the epoch's 20 other samples are drawn afresh, and it says so.
    cfg.num_workers = 0
    state = saved(world(cfg, 2)[0][0], 1)
    with caplog.at_level(logging.WARNING, "mmeff.data"):
        [(one, rest)] = world(cfg, 1, state)
    assert len(rest) == 4 and one.trainer.callbacks[0].count == 6 - 4
    assert "drawn afresh on the new deal: samples seen before the checkpoint may come again" in caplog.text


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


def test_datamodule_resume_state(tmp_path, caplog):
    write(tmp_path, 80, 10)  # 10 batches of 4 per epoch and rank of 2
    cfg = DataConfig(root=str(tmp_path), batch_size=4, val=None, test=None)
    [(data, _), _] = world(cfg, 2, epoch=1)
    state = saved(data, 3)
    assert {k: state[k] for k in ("epoch", "consumed", "segments", "offset")} == {
        "epoch": 1, "consumed": 2 * 3 * 4, "segments": [[2, 1, 4, 3]], "offset": 0}
    resumed = ShardDataModule(cfg, record, record)
    resumed.trainer = fake_trainer(2, 0, epoch=1)
    resumed.load_state_dict(state)
    assert len(list(resumed.train_dataloader())) == 10 - 3
    assert len(list(resumed.train_dataloader())) == 10  # the skip applies once
    other = ShardDataModule(DataConfig(root=str(tmp_path), batch_size=4, seed=1), record, record, resume=state)
    other.trainer = fake_trainer(2, 0, epoch=1)
    with caplog.at_level(logging.WARNING, "mmeff.data"):
        assert len(list(other.train_dataloader())) == 10
        assert "other data" in caplog.text and "starts over" in caplog.text
        data.load_state_dict(state)  # its loader was built from no position: too late to take this one
        assert "position came after the train loader was built" in caplog.text


def test_a_checkpoint_at_an_epoch_end_resumes_with_the_next_epochs_data(tmp_path):
    # Lightning builds the train loader of a run resumed from an epoch's end before it moves to the next epoch
    # (current_epoch is still the saved one): the loader must start at the next data epoch, not skip the whole saved
    # one and train the next epoch on its leftovers (what the kill-and-resume test caught: the loss moved by 0.03).
    write(tmp_path, 80, 10)
    cfg = DataConfig(root=str(tmp_path), batch_size=4, val=None, test=None)
    state = saved(world(cfg, 2, epoch=1)[0][0], 10)
    assert state["epoch"] == 2 and state["segments"] == []
    data = ShardDataModule(cfg, record, record, resume=state)
    data.trainer = fake_trainer(2, 0, epoch=1)
    loader = data.train_dataloader()
    assert loader.dataset.epoch == 2 and len(list(loader)) == 10

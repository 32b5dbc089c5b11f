"""Masked diffusion LMs: the masking process, the 1/t-weighted loss, prompts kept clean, the parallel sampler (steps,
blocks, no masks left), any bidirectional mixer, init_from an AR checkpoint with a larger vocabulary, and
fit -> export -> generate / test for text and captions."""

import math
import tarfile

import pytest
import torch
import torch.nn.functional as F
import yaml

from mmeff import checkpoint, config
from mmeff.cli import main
from mmeff.config import ConfigError
from mmeff.data import build_shards
from mmeff.data.text import write_text_shards
from mmeff.diffusion_sampling import DiffusionSampling, diffusion_sample, schedule
from mmeff.encoders.text import ByteTokenizer
from mmeff.tasks import build_model, build_task
from mmeff.tasks import diffusion as diffusion_task
from mmeff.tasks.diffusion import mask_tokens, response_mask, sample_t

TOK = ByteTokenizer()
BACKBONE = {"dim": 32, "causal": False, "pattern": ["attn", "gla"], "mixers": {"attn": {"heads": 2}, "gla": {"heads": 2, "chunk_size": 8}}}
TEXT = {"encoder": {"name": "text", "seq_len": 32}, "backbone": BACKBONE, "task": {"name": "diffusion"}}
CAPTION = {
    "encoder": {"name": "image", "image_size": 32, "patch_size": 8, "pool": "mean", "augment": False},
    "backbone": BACKBONE,
    "task": {"name": "diffusion_caption", "max_len": 48, "eval_steps": 12},
}


def test_masking_rate_matches_t():
    torch.manual_seed(0)
    t = torch.tensor([0.05, 0.3, 0.5, 0.9])
    tokens = torch.randint(0, 256, (4, 20000))
    noisy, masked = mask_tokens(tokens, torch.ones_like(tokens, dtype=torch.bool), t, TOK.mask_id)
    assert torch.allclose(masked.float().mean(1), t, atol=0.01)
    assert (noisy[masked] == TOK.mask_id).all() and torch.equal(noisy[~masked], tokens[~masked])


def test_antithetic_t_covers_eps_to_1_one_per_stratum():
    eps, B = 0.05, 16
    for seed in range(5):
        t = sample_t(B, eps, antithetic=True, device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
        assert ((t >= eps) & (t < 1)).all()
        strata = ((t - eps) / (1 - eps) * B).floor().long()
        assert sorted(strata.tolist()) == list(range(B))  # every slice of [eps, 1) of width (1 - eps) / B holds one
    plain = sample_t(10000, eps, antithetic=False, device=torch.device("cpu"))
    assert plain.min() >= eps and plain.mean().item() == pytest.approx((1 + eps) / 2, abs=0.01)


def test_loss_is_masked_cross_entropy_over_t_divided_by_eligible_positions(tmp_path):
    cfg = config.parse({**TEXT, "task": {"name": "diffusion", "tie_embeddings": False}, "run_dir": str(tmp_path)})
    model = build_model(cfg)
    torch.nn.init.zeros_(model.head.weight)  # uniform predictions: cross-entropy ln V at every position
    task = build_task(cfg, model)
    # Inputs tokens[:, :-1]: row 0 has 4 real tokens, row 1 has 3 and a pad (not eligible): 7 eligible positions.
    tokens = torch.tensor([[97, 98, 99, 100, 0], [97, 98, 99, TOK.pad_id, 0]])
    masked = torch.tensor([[True, False, True, False], [True, False, False, False]])
    t = torch.tensor([0.5, 0.25])
    seen = {}

    def corrupt(clean, eligible, stage):
        seen["eligible"] = eligible
        return clean.masked_fill(masked, TOK.mask_id), masked, t

    task.corrupt = corrupt
    task.log = lambda *a, **k: None
    loss = task.step({"tokens": tokens, "docs": torch.zeros_like(tokens)}, "train")
    assert seen["eligible"].sum() == 7
    assert float(loss.detach()) == pytest.approx(math.log(260) * (2 / 0.5 + 1 / 0.25) / 7, rel=1e-6)


def test_the_prompt_is_never_masked(monkeypatch):
    monkeypatch.setattr(diffusion_task, "sample_t", lambda B, *a, **k: torch.ones(B))  # t = 1: mask all it may
    cfg = config.parse({**TEXT, "task": {"name": "diffusion", "prompt_prob": 1.0}})
    model = build_model(cfg)
    task = build_task(cfg, model)
    task.log = lambda *a, **k: None
    seen = []
    model.forward = lambda noisy, docs=None, bounds=None: seen.append(noisy) or torch.zeros(*noisy.shape, 260, requires_grad=True)
    tokens = torch.randint(0, 256, (64, 33))
    task.step({"tokens": tokens, "docs": torch.zeros_like(tokens)}, "train")
    noisy = seen[0]
    for row, clean in zip(noisy, tokens[:, :-1]):
        first = int((row == TOK.mask_id).nonzero()[0])
        assert first >= 1 and torch.equal(row[:first], clean[:first]) and (row[first:] == TOK.mask_id).all()
    assert len({int((row == TOK.mask_id).nonzero()[0]) for row in noisy}) > 5  # prompt lengths vary
    # Captions: <bos> (position 0) is the prompt; with t = 1 everything after it is masked.
    tokens = torch.tensor([[TOK.bos_id, 104, 105, TOK.eos_id, TOK.pad_id]] * 3)
    eligible = response_mask(tokens.shape, torch.ones(3, dtype=torch.long))
    noisy, _ = mask_tokens(tokens, eligible, torch.ones(3), TOK.mask_id)
    assert (noisy[:, 0] == TOK.bos_id).all() and (noisy[:, 1:] == TOK.mask_id).all()


def test_causal_backbones_are_rejected():
    for cfg in (TEXT, CAPTION):
        with pytest.raises(ConfigError, match="backbone.causal must be false"):
            build_model(config.parse({**cfg, "backbone": {**BACKBONE, "causal": True}}))
    with pytest.raises(ConfigError, match="encoder.name must be 'text'"):
        build_model(config.parse({**TEXT, "encoder": CAPTION["encoder"]}))
    with pytest.raises(ConfigError, match="task.eps"):
        build_model(config.parse({**TEXT, "task": {"name": "diffusion", "eps": 1.0}}))
    with pytest.raises(ConfigError, match="encoder.vocab_size: 259 ids leave no row for <mask>"):
        cfg = config.parse({**TEXT, "encoder": {**TEXT["encoder"], "vocab_size": 259}})
        build_task(cfg, build_model(cfg))


@pytest.mark.parametrize("pattern", [["attn"], ["gla"], ["mamba2"], ["gated_deltanet", "attn"]])
def test_every_mixer_kind_trains_bidirectionally(pattern):
    options = {"attn": {"heads": 2}, "gla": {"heads": 2}, "gated_deltanet": {"heads": 2}, "mamba2": {"head_dim": 16, "d_state": 16}}
    mixers = {m: options[m] for m in pattern}  # options of a mixer outside the pattern are a config error
    cfg = config.parse({**TEXT, "backbone": {"dim": 32, "causal": False, "pattern": pattern, "depth": 2, "mixers": mixers}})
    model = build_model(cfg)
    task = build_task(cfg, model)
    task.log = lambda *a, **k: None
    tokens = torch.randint(0, 256, (2, 33))
    loss = task.step({"tokens": tokens, "docs": torch.zeros_like(tokens)}, "train")
    loss.backward()
    assert torch.isfinite(loss) and model.encoder.embed.weight.grad is not None
    # Bidirectional: the logits of position 0 depend on the last token.
    x = tokens[:1, :-1].clone()
    before = model(x)[0, 0]
    x[0, -1] = (x[0, -1] + 1) % 256
    assert not torch.allclose(before, model(x)[0, 0])


def tiny_text_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config.parse(TEXT)).eval()


def test_n_equal_l_steps_commit_one_token_per_step():
    prompt = torch.randint(0, 256, (3, 5))
    out = diffusion_sample(tiny_text_model(), prompt, TOK.mask_id, DiffusionSampling(gen_len=10, steps=10))
    assert out.forward_passes == 10
    for row in out.committed_at:
        assert sorted(row.tolist()) == list(range(10))
    fewer = diffusion_sample(tiny_text_model(), prompt, TOK.mask_id, DiffusionSampling(gen_len=10, steps=4))
    assert fewer.forward_passes == 4 and [int((fewer.committed_at[0] == s).sum()) for s in range(4)] == [3, 3, 2, 2]


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_blocks_are_filled_left_to_right(remasking):
    prompt = torch.randint(0, 256, (4, 3))
    s = DiffusionSampling(gen_len=14, steps=8, block_len=4, remasking=remasking, temperature=1.0, seed=0)
    out = diffusion_sample(tiny_text_model(), prompt, TOK.mask_id, s)
    assert out.forward_passes == 8 and (out.committed_at >= 0).all()
    for row in out.committed_at:
        blocks = [row[i : i + 4] for i in range(0, 14, 4)]
        for b in range(len(blocks) - 1):
            assert blocks[b].max() < blocks[b + 1].min()
    # 8 steps over 4 blocks (4, 4, 4, 2 positions): two steps each.
    assert schedule(14, 8, 4) == [(0, 4, [2, 2]), (4, 8, [2, 2]), (8, 12, [2, 2]), (12, 14, [1, 1])]
    with pytest.raises(ConfigError, match="--steps must be >= the number of blocks"):
        diffusion_sample(tiny_text_model(), prompt, TOK.mask_id, DiffusionSampling(gen_len=14, steps=3, block_len=4))


def test_the_sampler_never_leaves_or_predicts_a_mask():
    model = tiny_text_model()
    with torch.no_grad():
        model.head.weight = torch.nn.Parameter(model.head.weight.clone())
        model.head.weight[TOK.mask_id] = model.head.weight.abs().max() * 1000  # <mask> by far the most likely...
    prompt = torch.randint(0, 256, (3, 4))
    for remasking, temperature, steps in [("low_confidence", 0.0, 16), ("random", 1.0, 3), ("low_confidence", 2.0, 5)]:
        s = DiffusionSampling(gen_len=16, steps=steps, remasking=remasking, temperature=temperature, seed=1)
        ids = diffusion_sample(model, prompt, TOK.mask_id, s).ids
        assert ids.shape == (3, 16) and not (ids == TOK.mask_id).any()  # ... and never chosen


def test_init_from_an_ar_checkpoint_loads_the_shared_vocabulary_rows(tmp_path):
    backbone = {**BACKBONE, "causal": True}
    ar_cfg = config.parse({"encoder": {"name": "text", "seq_len": 16, "vocab_size": 259}, "backbone": backbone, "task": {"name": "lm"}})
    torch.manual_seed(1)
    ar = build_model(ar_cfg)
    checkpoint.export(ar, ar_cfg, tmp_path / "ar")  # a vocabulary without <mask>: 259 ids
    model = tiny_text_model(2)
    fresh_mask_row = model.encoder.embed.weight[TOK.mask_id].clone()
    report = checkpoint.init_from(model, tmp_path / "ar")
    assert not report.skipped and report.new == []  # head.weight is tied: loaded with the embedding, not new
    assert "encoder.embed.weight" in report.loaded and "encoder.embed.weight" in report.resized
    assert "rows 0-258 loaded; the checkpoint has 259 token ids, the new model 260" in str(report)
    assert torch.equal(model.encoder.embed.weight[:259], ar.encoder.embed.weight)
    assert torch.equal(model.encoder.embed.weight[TOK.mask_id], fresh_mask_row)
    assert model.head.weight is model.encoder.embed.weight
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ar.state_dict().items() if k.startswith("backbone."))


@pytest.fixture(scope="module")
def text_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    docs = [(f"doc{i}", f"def f{i}(x):\n    return x + {i}\n\nclass C{i}:\n    pass\n" * 3) for i in range(40)]
    write_text_shards(docs, root, seq_len=32, val=0.2, test=0.2)
    return root


def _write(tmp_path, cfg, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        **cfg,
        "name": name,
        "run_dir": str(tmp_path / "runs" / "${name}"),
        "trainer": {"max_epochs": 1, "max_steps": 6, "accelerator": "cpu", "enable_progress_bar": False, "logger": "csv"},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
    }))
    return path, tmp_path / "runs" / name / "export"


def test_text_fit_export_generate_and_test(tmp_path, text_shards, capsys):
    path, export = _write(tmp_path, {**TEXT, "data": {"root": str(text_shards), "batch_size": 8, "num_workers": 0}}, "dlm")
    assert main(["fit", str(path)]) == 0
    capsys.readouterr()
    flags = ["--sampler", "diffusion", "--gen-len", "12", "--steps", "6", "--block-len", "4"]
    assert main(["generate", str(export), "--prompt", "def f", *flags, "--temperature", "0.5", "--seed", "0"]) == 0
    out = capsys.readouterr()
    assert "6 forward passes for 12 tokens (0.500 per generated token)" in out.err and "tokens/s" in out.err
    assert main(["test", str(path)]) == 0
    assert {line.split(":")[0] for line in capsys.readouterr().out.splitlines()} >= {"test/loss", "test/bpb"}
    assert main(["generate", str(export), "--prompt", "x", "--steps", "4"]) == 2  # diffusion flags need --sampler diffusion
    assert main(["generate", str(export), "--prompt", "x"]) == 2
    assert "--sampler diffusion" in capsys.readouterr().err
    assert main(["generate", str(export), "--image", "x.png", "--sampler", "diffusion"]) == 2  # a text model


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    build_shards(None, root, source="digit-scenes", train=32, val=16, test=16, maxcount=32)
    return root


def test_caption_fit_export_sample_and_test(tmp_path, scene_root, capsys):
    path, export = _write(tmp_path, {**CAPTION, "data": {"root": str(scene_root), "batch_size": 16, "num_workers": 0}}, "dcap")
    assert main(["fit", str(path)]) == 0
    capsys.readouterr()
    assert main(["test", str(path)]) == 0
    out = capsys.readouterr().out
    for key in ("test/loss", "test/exact", "test/token_acc", "test/cer"):
        assert key in out
    with tarfile.open(next(scene_root.glob("test-*.tar"))) as tar:
        member = next(m for m in tar if m.name.endswith(".png"))
        image = tmp_path / "scene.png"
        image.write_bytes(tar.extractfile(member).read())
    assert main(["generate", str(export), "--image", str(image), "--sampler", "diffusion", "--steps", "8"]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 1 and "8 forward passes for 47 tokens" in out.err
    assert main(["generate", str(export), "--image", str(image)]) == 2  # the AR sampler names --sampler diffusion
    assert main(["generate", str(export), "--prompt", "x", "--sampler", "diffusion"]) == 2  # a captioner needs --image

"""The caption task: targets only at text positions, prefix masking reaching the backbone, decoding after the
prefix (stops at <eos>, cached = recomputed), init_from an LM checkpoint, and fit -> export -> generate / test."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from mmeff.blocks import Layout
from mmeff import checkpoint, config
from mmeff.cli import main
from mmeff.config import ConfigError
from mmeff.data import build_shards
from mmeff.encoders.text import ByteTokenizer
from mmeff.generate import Sampling, generate
from mmeff.tasks import build_model, build_task, caption as caption_task
from mmeff.tasks.caption import IGNORE, caption, caption_targets

TOK = ByteTokenizer()
BACKBONE = {"dim": 32, "pattern": ["attn", "gla"], "mixers": {"attn": {"heads": 2}, "gla": {"heads": 2, "chunk_size": 8}}}
CAPTION = {
    "encoder": {"name": "image", "image_size": 16, "patch_size": 8, "pool": "mean", "augment": False},
    "backbone": BACKBONE,
    "task": {"name": "caption", "max_len": 24},
}


def tiny(seed: int = 0, **task) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(config.parse({**CAPTION, "task": {**CAPTION["task"], **task}}))


def test_config_is_checked():
    with pytest.raises(ConfigError, match="backbone.causal must be true"):
        build_model(config.parse({**CAPTION, "backbone": {**BACKBONE, "causal": False}}))
    with pytest.raises(ConfigError, match="encoder.name must be 'image' or 'audio'"):
        build_model(config.parse({**CAPTION, "encoder": {"name": "text"}}))


def test_targets_ignore_the_prefix_and_padding():
    # prefix of 3 tokens; text <bos> a b <eos> <pad>: inputs <bos> a b <eos>, targets a b <eos> (pad ignored)
    a, b = TOK.encode("ab")
    tokens = torch.tensor([[TOK.bos_id, a, b, TOK.eos_id, TOK.pad_id]])
    expected = [IGNORE, IGNORE, IGNORE, a, b, TOK.eos_id, IGNORE]
    assert caption_targets(tokens, 3, TOK.pad_id).tolist() == [expected]


def test_loss_is_the_cross_entropy_of_the_text_positions_only(tmp_path):
    cfg = config.parse({**CAPTION, "run_dir": str(tmp_path)})
    model = tiny()
    task = build_task(cfg, model)
    logged = {}
    task.log = lambda name, value, **kw: logged.__setitem__(name, float(torch.as_tensor(value).detach()))
    transform = caption_task.make_transform(cfg, train=False)
    png = torch.randint(0, 255, (16, 16), dtype=torch.uint8).numpy()
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(png).save(buf, format="PNG")
    samples = [transform({"png": buf.getvalue(), "txt": t.encode()}) for t in ("one digit: 4", "417")]
    batch = {k: (torch.stack([s[k] for s in samples]) if k != "text" else [s[k] for s in samples]) for k in samples[0]}
    loss = task.step(batch, "train")
    # by hand: prefix [B, 4, D] (16x16 image, 8x8 patches), logits at the text positions predict tokens[1:]
    tokens = batch["tokens"][:, : 1 + len("one digit: 4") + 1]
    with torch.no_grad():
        prefix = model.encode_media(batch["input"])
        assert prefix.shape[1] == 4
        hidden = model.backbone(torch.cat([prefix, model.embed(tokens[:, :-1])], 1), layout=Layout(prefix=4))
        logits = model.head(hidden)
    targets = caption_targets(tokens, 4, TOK.pad_id)  # one per position of prefix + tokens[:, :-1]
    assert targets.shape == logits.shape[:2]
    assert (targets[:, :4] == IGNORE).all()  # the image prefix
    assert targets[1, 4:8].tolist() == [*TOK.encode("417"), TOK.eos_id] and (targets[1, 8:] == IGNORE).all()  # then pads
    by_hand = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    assert float(loss.detach()) == pytest.approx(float(by_hand), rel=1e-5)
    assert logged["train/loss"] == pytest.approx(float(by_hand), rel=1e-5)


def test_prefix_length_reaches_the_backbone_in_training_and_prefill_only():
    model = tiny()
    seen = []
    forward = model.backbone.forward

    def spy(x, cache=None, layout=None):
        seen.append((x.shape[1], layout.prefix if layout is not None and layout.prefix else None))
        return forward(x, cache=cache, layout=layout)

    model.backbone.forward = spy
    images = torch.randn(2, 1, 16, 16)
    model(images, torch.tensor([[TOK.bos_id, 65, 66]] * 2))
    assert seen == [(4 + 3, 4)]
    seen.clear()
    caption(model, images, TOK, Sampling(max_new_tokens=3, greedy=True))
    assert seen[0] == (4 + 1, 4)  # prefill: image tokens + <bos>, the first 4 bidirectional
    assert all(prefix is None and length == 1 for length, prefix in seen[1:])  # cached steps
    seen.clear()
    plain = tiny(prefix_lm=False)
    plain.backbone.forward = spy
    plain(images, torch.tensor([[TOK.bos_id]] * 2))
    assert seen == [(5, None)]


def test_generation_stops_at_eos_and_cached_equals_recomputed():
    model = tiny()
    images = torch.randn(3, 1, 16, 16)
    prefix = model.encode_media(images)
    s = Sampling(max_new_tokens=12, greedy=True)
    cached = generate(model, [[TOK.bos_id]] * 3, s, TOK, prefix_embeds=prefix)
    full = generate(model, [[TOK.bos_id]] * 3, s, TOK, prefix_embeds=prefix, use_cache=False)
    assert cached.tokens == full.tokens
    assert all(len(t) <= 12 for t in cached.tokens)

    class Scripted(torch.nn.Module):
        """A head that says 'h', 'i', then <eos>, then 'x' forever."""

        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, h):
            ids = [104, 105, TOK.eos_id]
            token = ids[self.calls] if self.calls < len(ids) else 120
            self.calls += 1
            return F.one_hot(torch.full(h.shape[:-1], token), 260).float()

    model.head = Scripted()
    assert caption(model, images[:1], TOK, Sampling(max_new_tokens=10, greedy=True)) == ["hi"]
    assert model.head.calls == 3  # no step after <eos>


def test_init_from_an_lm_checkpoint_reuses_backbone_and_text_embedding(tmp_path):
    lm_cfg = config.parse({"encoder": {"name": "text", "seq_len": 16}, "backbone": BACKBONE, "task": {"name": "lm"}})
    torch.manual_seed(1)
    lm = build_model(lm_cfg)
    checkpoint.export(lm, lm_cfg, tmp_path / "lm")
    model = tiny()
    report = checkpoint.init_from(model, tmp_path / "lm")
    assert "encoder.embed.weight" in report.loaded and any(k.startswith("backbone.layers.") for k in report.loaded)
    assert set(report.new) >= {"encoder.proj.weight", "encoder.media.pos"} and not report.skipped
    assert all(k.startswith(("encoder.media.", "encoder.proj.")) for k in report.new if k != "head.weight")
    assert torch.equal(model.encoder.embed.weight, lm.encoder.embed.weight)
    assert torch.equal(model.head.weight, lm.encoder.embed.weight)  # tied, as in the LM
    wide = config.parse({**CAPTION, "backbone": {**BACKBONE, "dim": 48}})
    report = checkpoint.init_from(build_model(wide), tmp_path / "lm")
    assert "shape" in report.skipped["encoder.embed.weight"]


@pytest.fixture(scope="module")
def scene_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    build_shards(None, root, source="digit-scenes", train=64, val=16, test=16, maxcount=32)
    return root


def test_fit_export_generate_and_test(tmp_path, scene_root, capsys):
    cfg = {
        **CAPTION,
        "encoder": {"name": "image", "image_size": 32, "patch_size": 8, "pool": "mean", "augment": False},
        "task": {"name": "caption", "max_len": 48},
        "name": "cap",
        "run_dir": str(tmp_path / "runs" / "${name}"),
        "data": {"root": str(scene_root), "batch_size": 16, "num_workers": 0},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False, "logger": "csv", "monitor": "val/exact"},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
    }
    path = tmp_path / "cap.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["fit", str(path)]) == 0
    export = tmp_path / "runs" / "cap" / "export"
    assert (export / "tokenizer.json").is_file()
    assert yaml.safe_load((export / "config.yaml").read_text())["task"]["vocab_size"] == 260
    capsys.readouterr()
    assert main(["test", str(path)]) == 0
    out = capsys.readouterr().out
    for key in ("test/exact", "test/bleu", "test/cer", "test/token_acc", "test/loss"):
        assert key in out
    import tarfile

    with tarfile.open(next(scene_root.glob("test-*.tar"))) as tar:
        member = next(m for m in tar if m.name.endswith(".png"))
        image = tmp_path / "scene.png"
        image.write_bytes(tar.extractfile(member).read())
    assert main(["generate", str(export), "--image", str(image), "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and len(printed[0].encode()) <= 8
    assert main(["generate", str(export), "--audio", str(image)]) == 2  # an image captioner reads no audio
    assert main(["generate", str(export)]) == 2  # neither --prompt nor a media file

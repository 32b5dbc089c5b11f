"""LoRA: config validation, identity at init, only adapters train, merge-on-export equals the adapted model and
loads with mmeff.load, and a fit with `lora:` end to end."""

import pytest
import torch
import yaml

import mmeff
from mmeff import checkpoint, config, lora
from mmeff.config import ConfigError
from mmeff.tasks import build_model, build_task

LM = {
    "encoder": {"name": "text", "seq_len": 16},
    "backbone": {"dim": 32, "pattern": ["attn", "gla"], "mixers": {"attn": {"heads": 2}, "gla": {"heads": 2}}},
    "task": {"name": "lm"},
}
TARGETS = ["backbone.layers.*.mixer.q", "backbone.layers.*.mixer.kv", "backbone.layers.*.ffn.*"]
LORA = {"targets": TARGETS, "rank": 4, "alpha": 8.0}


def lm(seed: int = 0):
    torch.manual_seed(seed)
    cfg = config.parse({**LM, "lora": LORA})
    return build_model(cfg), cfg


def tokens():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def test_config_errors_name_the_lora_key():
    model, _ = lm()
    with pytest.raises(ConfigError, match="lora.rank"):
        lora.apply(model, {**LORA, "rank": 0})
    with pytest.raises(ConfigError, match="unknown key lora.ranks"):
        lora.apply(model, {**LORA, "ranks": 4})
    with pytest.raises(ConfigError, match="lora.alpha"):
        lora.apply(model, {**LORA, "alpha": "big"})
    with pytest.raises(ConfigError, match="lora.targets: pattern 'nothing.*' matches no nn.Linear"):
        lora.apply(model, {**LORA, "targets": ["nothing.*"]})
    with pytest.raises(ConfigError, match="lora.targets: head shares its weight"):
        lora.apply(model, {**LORA, "targets": ["head"]})  # tied to the embedding


def test_adapted_model_starts_as_the_base_and_only_adapters_train():
    model, cfg = lm()
    x = tokens()
    before = model(x)
    report = lora.apply(model, cfg.lora)
    assert len(report.wrapped) == 2 + 3 + 3  # the attn layer's q and kv, and both layers' gate, up, down
    assert torch.equal(model(x), before)  # B = 0
    task = build_task(lora.task_config(cfg), model)
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(report.wrapped)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(model(x), before)


def test_merge_on_export_equals_the_adapted_model_and_loads(tmp_path):
    model, cfg = lm()
    lora.apply(model, cfg.lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                p.normal_(0, 0.05)
    model.eval()
    x = tokens()
    adapted = model(x)
    merged, merged_cfg = lora.merged(model, cfg)
    assert merged_cfg.lora == {} and cfg.lora == LORA
    assert not any(isinstance(m, lora.LoraLinear) for m in merged.modules())
    assert any(isinstance(m, lora.LoraLinear) for m in model.modules())  # the trained model is left as it was
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=0)
    checkpoint.export(merged, merged_cfg, tmp_path / "export")
    assert "lora" not in yaml.safe_load((tmp_path / "export" / "config.yaml").read_text()) or not yaml.safe_load(
        (tmp_path / "export" / "config.yaml").read_text()
    )["lora"]
    loaded = mmeff.load(tmp_path / "export")
    torch.testing.assert_close(loaded(x), adapted, atol=1e-5, rtol=0)


def test_fit_with_lora_trains_adapters_and_exports_plain_weights(tiny_config, tmp_path, capsys):
    from mmeff.cli import main

    base = tiny_config()
    assert main(["fit", str(base)]) == 0
    base_export = tmp_path / "runs" / "tiny" / "export"
    path = tiny_config(
        name="tiny_lora",
        init_from=str(base_export),
        lora={"targets": ["backbone.layers.*.mixer.q", "backbone.layers.*.ffn.down"], "rank": 2},
        train=["head.*"],
        **{"optim.groups": {"*.lora_*": 2.0}},
    )
    assert main(["fit", str(path)]) == 0
    out = capsys.readouterr().out
    assert "lora: 2 linear layers adapted" in out and "init_from:" in out
    export = tmp_path / "runs" / "tiny_lora" / "export"
    saved = yaml.safe_load((export / "config.yaml").read_text())
    assert saved["lora"] == {} and saved["train"] == ["head.*"]
    model = mmeff.load(export)
    base_model = mmeff.load(base_export)
    changed = {n for n, p in model.state_dict().items() if not torch.equal(p, base_model.state_dict()[n])}
    # only the adapted layers (merged) and the head moved; the rest of the backbone and the encoder did not
    assert changed and all(n.startswith(("head.", "backbone.layers.0.mixer.q.", "backbone.layers.0.ffn.down.")) for n in changed)

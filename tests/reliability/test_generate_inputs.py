"""`mmeff generate` inputs: a prompt that is not UTF-8 and an --image that is no image are named, not tracebacks."""

import pytest

from mmeff import checkpoint, config
from mmeff.cli import main
from mmeff.config import ConfigError
from mmeff.tasks import build_model
from mmeff.tasks.caption import media_sample

LM = {
    "encoder": {"name": "text", "seq_len": 16},
    "backbone": {"dim": 32, "pattern": ["attn"], "mixers": {"attn": {"heads": 2}}},
    "task": {"name": "lm"},
}


def test_non_utf8_prompt(tmp_path, capsys):
    cfg = config.parse(LM)
    export = checkpoint.export(build_model(cfg), cfg, tmp_path / "lm")
    prompt = b"def \xff\xfe".decode("utf-8", "surrogateescape")  # how Python passes undecodable argv bytes
    assert main(["generate", str(export), "--prompt", prompt, "--max-new-tokens", "2"]) == 2
    assert "the prompt is not UTF-8 text: byte 0xff at character 4" in capsys.readouterr().err


def test_image_that_is_not_an_image(tmp_path):
    cfg = config.parse({**LM, "encoder": {"name": "image", "image_size": 16, "patch_size": 4}, "task": {"name": "classify"}})
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ConfigError, match=f"--image {text}: not an image file"):
        media_sample(cfg, text)


def test_non_utf8_chat_line(tmp_path):
    import subprocess
    import sys

    cfg = config.parse(LM)
    export = checkpoint.export(build_model(cfg), cfg, tmp_path / "lm")
    proc = subprocess.run([sys.executable, "-m", "mmeff", "chat", str(export), "--max-new-tokens", "2"],
                          input=b"hi \xff\n", capture_output=True, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and "Traceback" not in err and "not UTF-8 text: byte 0xff" in err

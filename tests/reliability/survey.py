"""The fault and bad-input cases of issues 25 and 20, run through the command line; prints which ended cleanly.

A case ends cleanly when the command does what it should (a valid input runs) or stops with one `mmeff ...: error:`
line and no traceback, and nothing is lost (no non-finite export, last.ckpt loadable, no sentinel file).

    python tests/reliability/survey.py DIGITS_SHARDS OUT_DIR [--code CHECKOUT]

`--code` runs another checkout's mmeff (e.g. a `git worktree` of an older commit) for a before/after table.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

# 5 steps an epoch, one validation batch; no trainer.kwargs, which an older checkout may reject.
TINY = {
    "name": "s",
    "data": {"batch_size": 256, "num_workers": 0},
    "encoder": {"name": "image", "image_size": 16, "patch_size": 4},
    "backbone": {"dim": 32, "pattern": ["attn"], "depth": 1, "causal": False, "mixers": {"attn": {"heads": 2}}},
    "task": {"name": "classify", "num_classes": 10},
    "trainer": {"max_epochs": 2, "accelerator": "cpu", "enable_progress_bar": False, "logger": "csv"},
    "optim": {"lr": 0.003, "warmup_steps": 2},
}


class Survey:
    """Runs each case in its own folder under `out` with the mmeff of checkout `code` (None: the installed one)."""

    def __init__(self, digits: Path, out: Path, code: Path | None) -> None:
        self.digits, self.out, self.code = digits, out, code
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(out / "tmp")}
        if code:  # the commands run in `out`, so that `python -m mmeff` does not find the checkout it started in
            self.env["PYTHONPATH"] = str(code)
        (out / "tmp").mkdir(parents=True, exist_ok=True)
        self.rows: list[tuple[str, bool, str]] = []

    def config(self, folder: Path, text: str | None = None, **patch) -> Path:
        cfg = json.loads(json.dumps(TINY))
        cfg["run_dir"] = str(folder / "run")
        cfg["data"]["root"] = patch.pop("root", str(self.digits))
        for key, value in patch.items():
            node = cfg
            *parents, last = key.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        path = folder / "c.yaml"
        path.write_text(text if text is not None else yaml.safe_dump(cfg))
        return path

    def mmeff(self, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mmeff", *args], env=self.env, cwd=self.out, capture_output=True, text=True, timeout=timeout)

    def python(self, code: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env=self.env, cwd=self.out, capture_output=True, text=True, timeout=timeout)

    def case(self, name: str, fn: Callable[[Path], tuple[bool, str]]) -> None:
        folder = self.out / name.replace(" ", "_").replace("/", "_")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        try:
            ok, note = fn(folder)
        except Exception as e:  # noqa: BLE001 - a case the harness could not run counts as not clean
            ok, note = False, f"harness: {type(e).__name__}: {e}"
        self.rows.append((name, ok, note))
        print(f"{'clean' if ok else 'NOT  '}  {name}: {note[:150]}", flush=True)


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> tuple[bool, str]:
    """Clean when the command failed with an `mmeff ...: error:` line naming every fragment, and no traceback."""
    err = proc.stderr
    line = next((ln for ln in err.splitlines() if ln.startswith("mmeff ") and ": error:" in ln), "")
    ok = proc.returncode != 0 and "Traceback" not in err and bool(line) and all(f in line for f in fragments)
    tail = line or (err.strip().splitlines() or ["(no output)"])[-1]
    return ok, f"rc={proc.returncode} {tail}"


def finished(proc: subprocess.CompletedProcess, *fragments: str) -> tuple[bool, str]:
    out = proc.stdout + proc.stderr
    ok = proc.returncode == 0 and all(f in out for f in fragments)
    return ok, f"rc={proc.returncode} " + ((proc.stderr.strip().splitlines() or [""])[-1] if proc.returncode else "ok")


def all_finite_export(export: Path) -> tuple[bool, str]:
    import torch
    from safetensors.torch import load_file

    if not (export / "model.safetensors").is_file():
        return True, "no export"
    weights = load_file(str(export / "model.safetensors"))
    bad = sum(not bool(torch.isfinite(t).all()) for t in weights.values())
    return bad == 0, f"{bad} of {len(weights)} exported tensors non-finite"


def loadable(ckpt: Path) -> bool:
    import torch

    try:
        torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        return False
    return True


def write_labels(s: Survey, root: Path, bad: dict[int, bytes], split: str) -> None:
    """Copy the digits shards to `root`, with the `cls` of the given samples of `split` replaced."""
    import webdataset as wds

    shutil.copytree(s.digits, root)
    for shard in sorted(root.glob(f"{split}-*.tar")):
        samples = list(wds.WebDataset(str(shard), shardshuffle=False))
        with wds.TarWriter(str(shard)) as w:
            for i, sample in enumerate(samples):
                sample = {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
                if i in bad:
                    sample["cls"] = bad[i]
                w.write(sample)
        break


class Plant:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def cases(s: Survey) -> None:
    """Every case of the survey, in the order of issue 25 then issue 20."""
    # -- lost or wrong results
    def nan_run(f: Path):
        proc = s.mmeff("fit", str(s.config(f)), "--optim.lr=1000000.0", "--optim.warmup_steps=1", "--trainer.max_epochs=3")
        ok, note = all_finite_export(f / "run" / "export")
        return ok and "Traceback" not in proc.stderr, f"rc={proc.returncode}, {note}"
    s.case("NaN run exported as best", nan_run)

    def full_disk(f: Path):
        mount = f / "mnt"
        mount.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
            return False, "cannot mount a tmpfs (not root?)"
        try:
            cfg = s.config(f, trainer__max_epochs=6, trainer__logger="none", run_dir=str(mount / "run"))
            proc = subprocess.Popen([sys.executable, "-m", "mmeff", "fit", str(cfg)], env=s.env, cwd=s.out, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            last = mount / "run" / "checkpoints" / "last.ckpt"
            while not last.exists() and proc.poll() is None:
                time.sleep(0.2)
            subprocess.run(["dd", "if=/dev/zero", f"of={mount / 'filler'}", "bs=4k"], capture_output=True)
            err = proc.communicate(timeout=900)[1]
            ok = loadable(last)
            stray = list((f.parent / "tmp").glob("tmp*"))
            return ok and not stray, f"rc={proc.returncode}, last.ckpt {'loads' if ok else 'UNLOADABLE'}, {len(stray)} stray tmp files; {err.strip().splitlines()[-1][:90] if err.strip() else ''}"
        finally:
            subprocess.run(["umount", "-l", str(mount)])
    s.case("full disk during checkpoint", full_disk)

    def trained(f: Path) -> Path:
        """A config of folder `f` whose run folder holds a finished run (trained once, then copied)."""
        first = s.out / "trained"
        if not (first / "run" / "export").is_dir():
            shutil.rmtree(first, ignore_errors=True)
            first.mkdir()
            proc = s.mmeff("fit", str(s.config(first)))
            if proc.returncode:
                raise RuntimeError(proc.stderr.strip().splitlines()[-1])
        shutil.copytree(first / "run", f / "run")
        return s.config(f)

    def export_old(f: Path):
        cfg = trained(f)
        export = f / "run" / "export"
        stale = f / "run" / ".export.old"
        stale.mkdir()
        (stale / "junk").write_text("x")
        before = (export / "model.safetensors").read_bytes()
        proc = s.python(f"from mmeff import checkpoint, config\nfrom mmeff.tasks import build_model\nc = config.load({str(cfg)!r}, ['--seed=5'])\n"
                        f"import torch; torch.manual_seed(5)\ncheckpoint.export(build_model(c), c, {str(export)!r})")
        changed = (export / "model.safetensors").read_bytes() != before
        return proc.returncode == 0 and changed, f"rc={proc.returncode} export {'replaced' if changed else 'still the old model'}"
    s.case("leftover .export.old", export_old)

    def kill_between(f: Path):
        cfg = trained(f)
        os.replace(f / "run" / "export", f / "run" / ".export.old")
        return one_line_error(s.mmeff("test", str(cfg)), ".export.old")
    s.case("kill between the export renames", kill_between)

    def truncated_last(f: Path):
        cfg = trained(f)
        last = f / "run" / "checkpoints" / "last.ckpt"
        last.write_bytes(last.read_bytes()[:1000])
        shutil.rmtree(f / "run" / "export")
        proc = s.mmeff("fit", str(cfg), "--resume", "last", "--trainer.max_epochs=3")
        return finished(proc, "newest intact checkpoint")
    s.case("truncated last.ckpt on resume", truncated_last)

    def kill_resume(f: Path):
        cfg = s.config(f, trainer__max_epochs=8)
        proc = subprocess.Popen([sys.executable, "-m", "mmeff", "fit", str(cfg)], env=s.env, cwd=s.out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        last = f / "run" / "checkpoints" / "last.ckpt"
        while not last.exists() and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return finished(s.mmeff("fit", str(cfg), "--resume", "last"))
    s.case("SIGKILL mid-run then --resume last", kill_resume)

    # -- labels
    for name, bad, split, strict in [("label 99 in train, strict false", {3: b"99"}, "train", False),
                                     ("label -1 in val, strict false", {2: b"-1"}, "val", False)]:
        s.case(name, lambda f, bad=bad, split=split, strict=strict: (
            write_labels(s, f / "data", bad, split),
            finished(s.mmeff("fit", str(s.config(f, root=str(f / "data"), data__strict=strict)))))[1])

    def strict_label(f: Path):
        write_labels(s, f / "data", {3: b"99"}, "train")
        proc = s.mmeff("fit", str(s.config(f, root=str(f / "data"), data__strict=True)))
        ok, note = one_line_error(proc, "train-000000.tar")
        return ok and "skipping" not in note, note
    s.case("label 99 in train, strict true", strict_label)

    # -- config values
    bad_values = [
        ("backbone.dim=0", "backbone.dim"), ("optim.lr=-1.0", "optim.lr"), ("optim.lr=.nan", "optim.lr"),
        ("data.batch_size=0", "data.batch_size"), ("data.num_workers=-1", "data.num_workers"),
        ("encoder.patch_size=5", "patch_size"), ("task.num_classes=0", "num_classes"), ("optim.betas=[0.9]", "optim.betas"),
        ("trainer.accelerator=tpu", "accelerator"), ("backbone.depth=-1", "backbone.depth"), ("backbone.depth=0", "backbone.depth"),
        ("backbone.mixers={attn: {heads: 2}, gla: {heads: 2}}", "backbone.mixers.gla"), ("trainer.max_epochs=0", "trainer.max_epochs"),
        ("optim.lr=[1, 2", "optim.lr"),
    ]
    for override, key in bad_values:
        s.case(f"--{override}", lambda f, o=override, k=key: one_line_error(
            s.mmeff("fit", str(s.config(f)), f"--{o}", "--trainer.max_steps=2"), k))
    s.case("scalar YAML document", lambda f: one_line_error(s.mmeff("fit", str(s.config(f, text="5\n"))), "c.yaml"))
    s.case("--optim.lr=1e-3 accepted", lambda f: finished(s.mmeff("fit", str(s.config(f)), "--optim.lr=1e-3", "--trainer.max_steps=2")))
    s.case("lr: 3e-4 in the file accepted", lambda f: finished(s.mmeff("fit", str(s.config(
        f, text=yaml.safe_dump({**TINY, "run_dir": str(f / "run"), "data": {**TINY["data"], "root": str(s.digits)}}).replace("lr: 0.003", "lr: 3e-4"))))))

    def no_run_folder(f: Path):
        proc = s.mmeff("fit", str(s.config(f)), "--backbone.mixers.attn.headz=2")
        ok, note = one_line_error(proc, "headz")
        return ok and not (f / "run" / "config.yaml").exists(), note + (" (config.yaml written)" if (f / "run" / "config.yaml").exists() else "")
    s.case("config checked before config.yaml is written", no_run_folder)

    # -- checkpoint files
    def ckpt_case(change: Callable[[Path, Path], None], *fragments: str):
        def run(f: Path):
            cfg = trained(f)
            export = f / "run" / "export"
            change(f, export)
            ok, note = one_line_error(s.mmeff("test", str(cfg)), *fragments)
            return ok and not (f / "SENTINEL").exists(), note
        return run

    s.case("pickle named model.safetensors", ckpt_case(
        lambda f, e: (e / "model.safetensors").write_bytes(pickle.dumps(Plant(str(f / "SENTINEL")))), "model.safetensors"))
    s.case("truncated model.safetensors", ckpt_case(
        lambda f, e: (e / "model.safetensors").write_bytes((e / "model.safetensors").read_bytes()[:500]), "model.safetensors"))
    s.case("!!python/object config.yaml", ckpt_case(
        lambda f, e: (e / "config.yaml").write_text(f"!!python/object/apply:os.system ['touch {f / 'SENTINEL'}']\n"), "config.yaml"))
    for what, key, value in [("dim", "dim", 48), ("depth", "depth", 2), ("classes", "num_classes", 7)]:
        def mismatch(f: Path, e: Path, key=key, value=value):
            data = yaml.safe_load((e / "config.yaml").read_text())
            (data["task"] if key == "num_classes" else data["backbone"])[key] = value
            (e / "config.yaml").write_text(yaml.safe_dump(data))
        s.case(f"weights mismatch the config ({what})", ckpt_case(mismatch, "model.safetensors"))

    def pickled_ckpt(f: Path):
        import torch

        torch.save({"state_dict": Plant(str(f / "SENTINEL"))}, f / "evil.ckpt")
        ok, note = one_line_error(s.mmeff("fit", str(s.config(f)), "--resume", str(f / "evil.ckpt")), "evil.ckpt")
        return ok and not (f / "SENTINEL").exists(), note
    s.case("pickled .ckpt on --resume", pickled_ckpt)

    # -- generate, audio folders
    def non_utf8(f: Path):
        lm = {"run_dir": str(f / "run"), "encoder": {"name": "text", "seq_len": 16}, "task": {"name": "lm"},
              "backbone": {"dim": 32, "pattern": ["attn"], "mixers": {"attn": {"heads": 2}}}}
        proc = s.python(f"from mmeff import checkpoint, config\nfrom mmeff.tasks import build_model\nc = config.parse({lm!r})\n"
                        f"checkpoint.export(build_model(c), c, {str(f / 'lm')!r})")
        if proc.returncode:
            return False, "harness: " + proc.stderr.strip().splitlines()[-1]
        args = [sys.executable.encode(), b"-m", b"mmeff", b"generate", str(f / "lm").encode(), b"--prompt", b"def \xff\xfe", b"--max-new-tokens", b"2"]
        done = subprocess.run(args, env=s.env, cwd=s.out, capture_output=True, timeout=300)
        return one_line_error(subprocess.CompletedProcess(args, done.returncode, done.stdout.decode(errors="replace"), done.stderr.decode(errors="replace")), "UTF-8")
    s.case("generate with a non-UTF-8 prompt", non_utf8)

    def audio(f: Path, payload: bytes | None):
        import numpy as np
        import soundfile as sf

        for i in range(6):
            (f / "src" / str(i % 2)).mkdir(parents=True, exist_ok=True)
            sf.write(f / "src" / str(i % 2) / f"c{i}.wav", np.sin(np.arange(800) / (i + 3)).astype("float32"), 8000)
        bad = f / "src" / "1" / "bad.wav"
        if payload is None:
            sf.write(bad, np.zeros(0, dtype="float32"), 8000)
        else:
            bad.write_bytes(payload)
        return one_line_error(s.mmeff("shards", str(f / "src"), str(f / "out")), "bad.wav")
    s.case("audio folder with a corrupt .wav", lambda f: audio(f, b"RIFF\x00\x00garbage"))
    s.case("audio folder with an empty .wav", lambda f: audio(f, None))

    # -- fuzzing (the hypothesis suite in test_fuzz.py; here a seeded random sweep both checkouts can run)
    s.case("config loader fuzz (300 inputs)", lambda f: fuzz(s, f, "config"))
    s.case("shard reader fuzz (100 inputs, both strict)", lambda f: fuzz(s, f, "shards"))

    # -- issue 20 (trainer)
    def validate_metrics(f: Path):
        cfg = trained(f)
        proc = s.mmeff("validate", str(cfg))
        return proc.returncode == 0 and "val/acc:" in proc.stdout, f"rc={proc.returncode} {proc.stdout.strip()[-60:] or '(no metrics)'}"
    s.case("validate prints metrics", validate_metrics)
    for kw in ("limit_val_batches=3", "logger=false"):
        s.case(f"--trainer.kwargs.{kw}", lambda f, kw=kw: finished(s.mmeff("fit", str(s.config(f)), f"--trainer.kwargs.{kw}", "--trainer.max_steps=2")))

    def rerun(f: Path):
        cfg = trained(f)
        weights = f / "run" / "export" / "model.safetensors"
        before = weights.read_bytes()
        proc = s.mmeff("fit", str(cfg), "--trainer.max_steps=1")
        kept = weights.read_bytes() == before
        return kept and "Traceback" not in proc.stderr, f"rc={proc.returncode} earlier export {'kept' if kept else 'REPLACED'}"
    s.case("re-run keeps a finished export", rerun)

    def tied(f: Path):
        lm = {"encoder": {"name": "text", "seq_len": 16}, "task": {"name": "lm"},
              "backbone": {"dim": 32, "pattern": ["attn"], "mixers": {"attn": {"heads": 2}}}}
        proc = s.python(f"from mmeff import checkpoint, config\nfrom mmeff.tasks import build_model\nc = config.parse({lm!r})\n"
                        f"src = checkpoint.export(build_model(c), c, {str(f / 'lm')!r})\nr = checkpoint.init_from(build_model(c), src)\nprint('NEW', r.new)")
        ok = proc.returncode == 0 and "NEW []" in proc.stdout
        return ok, (proc.stdout.strip().splitlines() or [proc.stderr.strip()[-80:]])[-1]
    s.case("init_from: tied head not reported new", tied)


FUZZ_CONFIG = """
import random, yaml, sys
from mmeff import config
rng = random.Random(0)
keys = ["name", "encoder", "task", "backbone", "data", "trainer", "optim", "dim", "depth", "pattern", "mixers", "lr", "betas",
        "batch_size", "num_classes", "image_size", "patch_size", "logger", "kwargs", "attn", 1, None]
def value(d=0):
    r = rng.random()
    if d < 2 and r < 0.2: return {rng.choice(keys): value(d + 1) for _ in range(rng.randint(0, 3))}
    if d < 2 and r < 0.3: return [value(d + 1) for _ in range(rng.randint(0, 3))]
    return rng.choice([None, True, 0, -1, 7, 1e9, float("nan"), "", "x", "image", "attn", "1e-3", "[1,", "{a: 1}", "!!python/none"])
base = {"name": "t", "encoder": {"name": "image", "image_size": 16, "patch_size": 4}, "task": {"name": "classify"}, "backbone": {"dim": 32, "pattern": ["attn"]}}
foreign = {}
for i in range(300):
    data = {**base, **{rng.choice(keys): value() for _ in range(rng.randint(0, 3))}}
    path = sys.argv[1]
    open(path, "w").write(yaml.safe_dump(data))
    over = [f"--{'.'.join(str(rng.choice(keys[:20])) for _ in range(rng.randint(1, 3)))}={rng.choice(['1', '[1,', '{}', 'x: y: z', '.nan', '1e-3', ''])}" for _ in range(rng.randint(0, 2))]
    try:
        config.load(path, over)
    except config.ConfigError:
        pass
    except Exception as e:
        foreign.setdefault(f"{type(e).__name__}", 0)
        foreign[type(e).__name__] += 1
print(sum(foreign.values()), foreign)
"""

FUZZ_SHARDS = """
import random, sys, io, yaml
from pathlib import Path
from mmeff import config
from mmeff.data import make_loader
from mmeff.tasks import transforms
rng = random.Random(0)
good = Path(sys.argv[2]).read_bytes()[: 24 * 1024]
root = Path(sys.argv[1])
foreign = {}
for i in range(100):
    data = bytearray(good)
    if rng.random() < 0.5:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    else:
        data = data[: rng.randrange(len(data))]
    (root / "val-000000.tar").write_bytes(bytes(data))
    for strict in (False, True):
        cfg = config.parse(yaml.safe_load(Path(sys.argv[3]).read_text()) | {"data": {"root": str(root), "strict": strict}})
        try:
            list(make_loader(cfg.data, "val", transforms(cfg)[1], train=False))
        except Exception as e:
            if not (strict and type(e).__module__.startswith("mmeff")):
                foreign[type(e).__name__] = foreign.get(type(e).__name__, 0) + 1
print(sum(foreign.values()), foreign)
"""


def fuzz(s: Survey, f: Path, what: str) -> tuple[bool, str]:
    if what == "config":
        proc = s.python(FUZZ_CONFIG.replace("sys.argv[1]", repr(str(f / "fuzz.yaml"))), timeout=600)
    else:
        (f / "shards").mkdir()
        code = FUZZ_SHARDS.replace("sys.argv[1]", repr(str(f / "shards"))).replace("sys.argv[2]", repr(str(s.digits / "val-000000.tar")))
        proc = s.python(code.replace("sys.argv[3]", repr(str(s.config(f)))), timeout=600)
    if proc.returncode:
        return False, "harness: " + (proc.stderr.strip().splitlines() or [""])[-1]
    count = proc.stdout.strip().splitlines()[-1]
    return count.startswith("0 "), f"exceptions not of mmeff's own type: {count}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("digits", type=Path, help="folder of digits shards (mmeff shards --source digits DIR)")
    p.add_argument("out", type=Path, help="scratch folder for the cases")
    p.add_argument("--code", type=Path, help="checkout whose mmeff runs (default: the installed one)")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args()
    s = Survey(args.digits.resolve(), args.out.resolve(), args.code)
    random.seed(0)
    cases(s)
    clean = sum(ok for _, ok, _ in s.rows)
    print(f"\n{clean} of {len(s.rows)} cases ended cleanly")
    if args.json:
        args.json.write_text(json.dumps([{"case": n, "clean": ok, "note": note} for n, ok, note in s.rows], indent=1))


if __name__ == "__main__":
    main()

"""Serving throughput: requests/s and tokens/s of `mmeff serve` at 1, 8 and 32 concurrent clients, against sequential generation.

Per LM, a server (mmeff.serve.app under uvicorn on 127.0.0.1, in this process) gets `--requests` completion
requests over HTTP (httpx) from C concurrent clients; each prompt is the start of a Python standard-library
docstring (40-160 bytes), decoded greedily for `--max-tokens` tokens with <eos> disabled, so that every request
produces the same number of tokens in every mode. The baselines run the same requests one after the other without
HTTP: `mmeff.generate.generate` (what `mmeff generate` does), and for the attn LM Hugging Face transformers'
`generate` on its Llama export (`mmeff convert to-hf`), the peer a user would otherwise pick.

CPU: the python_docs_{attn,gla,mamba2} LMs (configs/text), trained weights from `--runs` when an export exists,
else untrained weights of the same config (decoding speed does not depend on the weights).
GPU (`--gpu`): the width-1024 12-layer LMs of benchmarks/decode_speed.py, bf16, untrained.

    python benchmarks/serve_speed.py --out benchmarks/results/serve_speed_cpu
    python benchmarks/serve_speed.py --gpu --out benchmarks/results/serve_speed_h200
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib
import inspect
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import torch
import uvicorn
from torch import nn

from mmeff import checkpoint, config
from mmeff.encoders.text import ByteTokenizer
from mmeff.generate import Sampling, generate
from mmeff.serve.app import create_app
from mmeff.serve.engine import Engine
from timing import save_figure, write_results  # benchmarks/timing.py, beside this script
from mmeff.tasks import build_model

MIXERS = ("attn", "gla", "mamba2")
DOC_MODULES = "json os re collections functools itertools pathlib typing argparse logging shutil csv random statistics".split()


def prompts(count: int) -> list[str]:
    """`count` starts of standard-library docstrings (modules, then their public functions), 40 to 160 characters."""
    docs = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *(getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_"))]:
            doc = inspect.getdoc(obj) if callable(obj) or obj is module else None
            if doc and len(doc) >= 160 and doc not in docs:
                docs.append(doc)
    if len(docs) < count:
        raise SystemExit(f"only {len(docs)} docstrings found for {count} requests")
    return [d[: 40 + (37 * i) % 121] for i, d in enumerate(docs[:count])]


def cpu_model(mixer: str, runs: Path) -> tuple[nn.Module, str]:
    """The python_docs LM of `mixer`: its trained export under `runs` if there is one, else untrained."""
    export = runs / f"python_docs_{mixer}" / "export"
    if (export / "model.safetensors").is_file():
        return checkpoint.load(export), "trained"
    torch.manual_seed(0)
    return build_model(config.load(f"configs/text/python_docs_{mixer}.yaml")).eval(), "untrained"


def gpu_model(mixer: str) -> tuple[nn.Module, str]:
    """The width-1024 12-layer LM of benchmarks/decode_speed.py, bf16 on CUDA."""
    sys.path.insert(0, str(Path(__file__).parent))
    from decode_speed import build

    torch.manual_seed(0)
    return build(mixer, torch.device("cuda")), "untrained"


class Server:
    """An mmeff server for `model` on a free 127.0.0.1 port while the `with` block runs."""

    def __init__(self, model: nn.Module, tokenizer: ByteTokenizer, max_batch: int) -> None:
        self.engine = Engine(model, tokenizer, max_batch=max_batch)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.engine, "bench", 1 << 20), log_level="warning"))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __enter__(self) -> Server:
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()


async def _clients(url: str, texts: list[str], clients: int, max_tokens: int) -> tuple[float, int, float]:
    """(seconds, completion tokens, mean request latency) of `texts` sent by `clients` concurrent clients."""
    work: asyncio.Queue[str] = asyncio.Queue()
    for t in texts:
        work.put_nowait(t)
    tokens, latencies = [], []

    async def client(c: httpx.AsyncClient) -> None:
        while not work.empty():
            text = work.get_nowait()
            start = time.perf_counter()
            r = await c.post("/v1/completions", json={"prompt": text, "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens.append(r.json()["usage"]["completion_tokens"])

    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as c:
        await client_warmup(c, max_tokens)
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return seconds, sum(tokens), sum(latencies) / len(latencies)


async def client_warmup(c: httpx.AsyncClient, max_tokens: int) -> None:
    """One short request, so that the first measured one pays no start-up cost."""
    (await c.post("/v1/completions", json={"prompt": "warm up", "max_tokens": min(4, max_tokens), "temperature": 0})).raise_for_status()


def sequential(model: nn.Module, tokenizer: ByteTokenizer, texts: list[str], max_tokens: int) -> tuple[float, int, float]:
    """(seconds, tokens, mean latency) of `mmeff.generate.generate` on each prompt in turn."""
    sampling = Sampling(max_new_tokens=max_tokens, temperature=0)
    generate(model, [tokenizer.encode("warm up")], Sampling(max_new_tokens=4, temperature=0), eos_id=-1)
    start, tokens = time.perf_counter(), 0
    for t in texts:
        tokens += generate(model, [tokenizer.encode(t)], sampling, eos_id=-1).decode_tokens
    seconds = time.perf_counter() - start
    return seconds, tokens, seconds / len(texts)


def hf_sequential(model: nn.Module, mixer: str, texts: list[str], max_tokens: int) -> tuple[float, int, float] | None:
    """The same through transformers' generate on the Llama export of an attn LM (None for other mixers)."""
    if mixer != "attn":
        return None
    import transformers

    from mmeff.convert import convert_to_hf

    with tempfile.TemporaryDirectory() as tmp:
        cpu = copy.deepcopy(model).float().cpu()  # a copy: the served model keeps its device and dtype
        convert_to_hf(checkpoint.export(cpu, model.run_config, Path(tmp) / "mm"), Path(tmp) / "hf")
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype).to(device).eval()
    tok = ByteTokenizer()
    kw = {"max_new_tokens": max_tokens, "min_new_tokens": max_tokens, "do_sample": False, "pad_token_id": tok.pad_id}
    with torch.inference_mode():
        hf.generate(torch.tensor([tok.encode("warm up")], device=device), **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        start, tokens = time.perf_counter(), 0
        for t in texts:
            ids = torch.tensor([tok.encode(t)], device=device)
            tokens += hf.generate(ids, **kw).shape[1] - ids.shape[1]
    seconds = time.perf_counter() - start
    return seconds, tokens, seconds / len(texts)


def best(measure: Callable[[], tuple[float, int, float] | None], repeat: int) -> tuple[float, int, float] | None:
    """The fastest of `repeat` runs of `measure` (on shared cores the others' load only ever slows a run down)."""
    runs = [measure() for _ in range(repeat)]
    return None if runs[0] is None else min(runs, key=lambda r: r[0])


def device_name(gpu: bool) -> str:
    """The GPU's name, or the CPU and its threads."""
    if gpu:
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores shared with other jobs, {torch.get_num_threads()} torch threads)"


def row(model: str, params: int, weights: str, mode: str, clients: int, requests: int, result: tuple[float, int, float]) -> dict:
    """One table row: throughput of `requests` requests that took `result` = (seconds, tokens, mean latency)."""
    seconds, tokens, latency = result
    return {"model": model, "params": params, "weights": weights, "mode": mode, "clients": clients,
            "requests_per_s": requests / seconds, "tokens_per_s": tokens / seconds, "tokens": tokens,
            "seconds": seconds, "mean_latency_s": latency}


def markdown(rows: list[dict], header: str) -> str:
    """The results table under `header`."""
    lines = [header, "", "| LM | params | weights | mode | clients | requests/s | tokens/s | x sequential | mean latency s |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    base = {r["model"]: r["tokens_per_s"] for r in rows if r["mode"] == "mmeff generate, sequential"}
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['weights']} | {r['mode']} | {r['clients']} | {r['requests_per_s']:.2f} "
            f"| {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base[r['model']]:.2f} | {r['mean_latency_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], clients: list[int], path: Path, title: str) -> None:
    """tokens/s against concurrent clients per LM, the sequential baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
        color = f"C{i}"
        served = [r for r in rows if r["model"] == name and r["mode"] == "mmeff serve"]
        ax.plot([r["clients"] for r in served], [r["tokens_per_s"] for r in served], "o-", color=color, label=f"{name}: mmeff serve")
        for r in rows:
            if r["model"] == name and r["mode"] != "mmeff serve":
                ax.axhline(r["tokens_per_s"], color=color, ls="--" if "mmeff" in r["mode"] else ":", lw=1,
                           label=f"{name}: {r['mode']}")
    ax.set(xscale="log", xlabel="concurrent clients", ylabel="tokens/s", title=title)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="the width-1024 12-layer LMs in bf16 on CUDA")
    p.add_argument("--mixers", nargs="+", default=list(MIXERS), choices=MIXERS)
    p.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=32, help="requests per measurement (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (default %(default)s)")
    p.add_argument("--runs", type=Path, default=Path("runs"), help="where trained python_docs exports are looked for")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    p.add_argument("--repeat", type=int, default=2, help="runs per measurement; the fastest is kept (default %(default)s)")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 on CPU, where the cores are shared; all on GPU)")
    p.add_argument("--out", type=Path, help="write OUT.md, OUT.json and OUT.png")
    args = p.parse_args()
    if args.threads or not args.gpu:
        torch.set_num_threads(args.threads or 1)
    texts = prompts(args.requests)
    tokenizer = ByteTokenizer()
    tokenizer.eos_id = -1  # every request generates exactly --max-tokens tokens, in every mode
    header = (
        f"Command: `python {' '.join(sys.argv)}`\n\n{device_name(args.gpu)}, torch {torch.__version__}; "
        f"fastest of {args.repeat} runs of {args.requests} requests of {args.max_tokens} greedy tokens each (<eos> off), prompts 40-160 bytes of "
        "standard-library docstrings; serve = HTTP (httpx) to an in-process uvicorn server with continuous batching; "
        "sequential = the same requests one after the other without HTTP. x sequential: tokens/s over mmeff generate's."
    )
    rows: list[dict] = []

    def save() -> None:  # after every row: a run cut short keeps what it measured
        if args.out:
            write_results(args.out, {"device": device_name(args.gpu), "torch": torch.__version__, "rows": rows}, markdown(rows, header))

    for mixer in args.mixers:
        model, weights = gpu_model(mixer) if args.gpu else cpu_model(mixer, args.runs)
        name = f"{'gpu_1024x12' if args.gpu else 'python_docs'}_{mixer}"
        params = sum(p.numel() for p in model.parameters())
        rows.append(row(name, params, weights, "mmeff generate, sequential", 1, len(texts),
                        best(lambda: sequential(model, tokenizer, texts, args.max_tokens), args.repeat)))
        save()
        hf = None if args.no_hf else best(lambda: hf_sequential(model, mixer, texts, args.max_tokens), args.repeat)
        if hf is not None:
            rows.append(row(name, params, weights, "transformers generate, sequential", 1, len(texts), hf))
            save()
        with Server(model, tokenizer, max_batch=max(args.clients)) as server:
            for clients in args.clients:
                result = best(lambda: asyncio.run(_clients(server.url, texts, clients, args.max_tokens)), args.repeat)
                rows.append(row(name, params, weights, "mmeff serve", clients, len(texts), result))
                save()
                print(f"{name} serve x{clients}: {rows[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
    print(markdown(rows, header))
    if args.out:
        plot(rows, args.clients, args.out.with_suffix(".png"), f"mmeff serve, {device_name(args.gpu).split(' (')[0]}")


if __name__ == "__main__":
    main()

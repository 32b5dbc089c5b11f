"""Masked diffusion LMs: quality against the number of sampling steps (L, L/2, L/4, L/8 forward passes for L tokens),
next to the autoregressive model of the same size.

Captions (held-out digit scenes): exact match of the diffusion captioner at each step count and of the AR captioner's
greedy decode; forward passes per generated token; tokens/s. Text (held-out python-docs sequences): the first
`--prompt-len` bytes prompt both models; the AR LM scores every continuation (NLL in bits per byte; samples that
repeat themselves score low, so the share of distinct 4-grams is shown too), and the held-out split's negative ELBO
(diffusion) and NLL (AR) in bits per byte.

    python benchmarks/diffusion_steps.py --text runs/python_docs_mdlm/export --text-ar runs/python_docs_attn/export \
        --caption runs/digit_scenes_mdlm/export --caption-ar runs/digit_scenes/export --out benchmarks/results/diffusion.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mmeff import checkpoint, metrics
from mmeff.data.pipeline import make_loader
from mmeff.diffusion_sampling import DiffusionSampling, cut_at_eos, diffusion_sample
from mmeff.encoders.text import Tokenizer, load_tokenizer
from mmeff.generate import Sampling, generate
from mmeff.tasks import transforms
from mmeff.tasks.diffusion import mask_tokens, sample_t, weighted_nll
from mmeff.tasks.lm import lm_sums, token_bytes


def step_counts(gen_len: int) -> list[int]:
    """L, L/2, L/4, L/8 (rounded down, at least 1)."""
    return [max(1, gen_len // d) for d in (1, 2, 4, 8)]


def held_out(ckpt: str, split: str, limit: int) -> list[dict]:
    """Up to `limit` samples (batches of the checkpoint's eval transform) of `split` of the checkpoint's data."""
    cfg = checkpoint.load_config(ckpt)
    cfg.data.num_workers = 0
    batches, seen = [], 0
    for batch in make_loader(cfg.data, split, transforms(cfg)[1], train=False):
        batches.append({k: v[: limit - seen] for k, v in batch.items() if not k.startswith("_")})
        seen += len(batches[-1]["tokens"])
        if seen >= limit:
            break
    return batches


def caption_table(args: argparse.Namespace) -> list[str]:
    """Exact match, forward passes per token and tokens/s of the diffusion captioner per step count, and of the AR one."""
    model, ar = checkpoint.load(args.caption), checkpoint.load(args.caption_ar)
    cfg = checkpoint.load_config(args.caption)
    tokenizer = load_tokenizer(Path(args.caption))
    gen_len = cfg.task.max_len - 1
    batches = held_out(args.caption, args.split, args.captions)
    refs = [text for b in batches for text in b["text"]]
    rows = [
        f"| model | steps | forward passes / token | {args.split} exact | tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for steps in step_counts(gen_len):
        s = DiffusionSampling(gen_len=gen_len, steps=steps, remasking="low_confidence")
        hyps, seconds = [], 0.0
        for b in tqdm(batches, desc=f"diffusion captions, {steps} steps", unit=" batches", disable=None):
            start = time.perf_counter()
            with torch.inference_mode():
                prefix = model.encode_media(b["input"])
            ids = diffusion_sample(model, b["tokens"][:, :1], tokenizer.mask_id, s, prefix).ids
            seconds += time.perf_counter() - start
            hyps += [tokenizer.decode(t) for t in cut_at_eos(ids, tokenizer.eos_id)]
        rate = len(refs) * gen_len / seconds
        rows.append(f"| diffusion | {steps} | {steps / gen_len:.3f} | {metrics.exact_match(hyps, refs):.3f} | {rate:.0f} |")
    hyps, seconds, tokens = [], 0.0, 0
    for b in tqdm(batches, desc="AR captions", unit=" batches", disable=None):
        start = time.perf_counter()
        with torch.inference_mode():
            prefix = ar.encode_media(b["input"])
        prompts = [[tokenizer.bos_id]] * len(prefix)
        result = generate(ar, prompts, Sampling(max_new_tokens=cfg.task.max_len, greedy=True), tokenizer, prefix_embeds=prefix)
        seconds += time.perf_counter() - start
        hyps += result.texts
        tokens += sum(len(t) + 1 for t in result.tokens)  # each caption and its <eos>: one forward pass each
    rows.append(f"| AR (greedy) | {tokens / len(refs):.1f} (mean) | 1.000 | {metrics.exact_match(hyps, refs):.3f} | {tokens / seconds:.0f} |")
    return [f"Captions: {len(refs)} held-out digit scenes ({args.split} split), answer canvas L = {gen_len} positions, "
            "greedy, low-confidence remasking, one block. Diffusion tokens/s counts all L positions (padding included); "
            "AR tokens/s counts the tokens it decoded (caption + <eos>) over prefill and decoding.", "", *rows]


def ar_nll(ar: torch.nn.Module, prompts: torch.Tensor, conts: list[list[int]], table: torch.Tensor) -> tuple[float, int]:
    """(summed NLL in nats, bytes) the causal LM `ar` gives the continuations `conts` of `prompts` [B, P]."""
    nll, nbytes = 0.0, 0
    with torch.inference_mode():
        for prompt, cont in zip(prompts.tolist(), conts):
            if not cont:
                continue
            ids = torch.tensor([prompt + cont])
            logp = ar(ids[:, :-1]).float().log_softmax(-1)[0, len(prompt) - 1 :]
            nll -= float(logp.gather(1, torch.tensor(cont)[:, None]).sum())
            nbytes += int(table[cont].sum())
    return nll, nbytes


def distinct_4grams(conts: list[list[int]]) -> float:
    """Share of distinct 4-grams among all 4-grams of the continuations (1.0: no repetition)."""
    grams = [tuple(c[i : i + 4]) for c in conts for i in range(len(c) - 3)]
    return len(set(grams)) / max(1, len(grams))


def bits_per_byte(nats: float, nbytes: int) -> float:
    """Nats over bytes in bits."""
    return nats / (math.log(2) * max(1, nbytes))


def held_out_bpb(model: torch.nn.Module, ar: torch.nn.Module, batches: list[dict], tokenizer: Tokenizer,
                 table: torch.Tensor, draws: int) -> tuple[float, float]:
    """(diffusion negative ELBO, AR NLL) in bits per byte over `batches`, each over its own targets (the diffusion
    model's: tokens[:-1]; the AR model's: tokens[1:]); the ELBO averages `draws` stratified masking draws."""
    elbo, ar_nats, nbytes, ar_bytes = 0.0, 0.0, 0, 0
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b in batches:
            tokens, docs = b["tokens"][:, :-1], b["docs"][:, :-1]
            eligible = tokens != tokenizer.pad_id
            for _ in range(draws):
                t = sample_t(tokens.shape[0], 1e-3, True, tokens.device, generator)
                noisy, masked = mask_tokens(tokens, eligible, t, tokenizer.mask_id, generator)
                elbo += float(weighted_nll(model(noisy, docs=docs), tokens, masked, t)) / draws
            nbytes += int(table[tokens][eligible].sum())
            nll, _, count_bytes = lm_sums(ar(tokens, docs=docs), b["tokens"][:, 1:], table, tokenizer.pad_id)
            ar_nats, ar_bytes = ar_nats + float(nll), ar_bytes + int(count_bytes)
    return bits_per_byte(elbo, nbytes), bits_per_byte(ar_nats, ar_bytes)


def text_table(args: argparse.Namespace) -> list[str]:
    """AR-scored bits per byte of diffusion samples per step count (and of AR samples and the real text); held-out bpb."""
    model, ar = checkpoint.load(args.text), checkpoint.load(args.text_ar)
    tokenizer = load_tokenizer(Path(args.text))
    table = token_bytes(tokenizer, tokenizer.vocab_size)
    batches = held_out(args.text, args.split, args.prompts)
    seqs = torch.cat([b["tokens"] for b in batches])
    P, L = args.prompt_len, args.gen_len
    prompts, real = seqs[:, :P], [row[P : P + L] for row in seqs.tolist()]
    rows = [
        "| sampler | steps | forward passes / token | AR NLL of the continuation (bits/byte) | distinct 4-grams | tokens/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for remasking in ("low_confidence", "random"):
        for steps in step_counts(L):
            s = DiffusionSampling(gen_len=L, steps=steps, block_len=args.block_len, remasking=remasking,
                                  temperature=args.temperature, seed=0)
            start = time.perf_counter()
            ids = diffusion_sample(model, prompts, tokenizer.mask_id, s).ids
            rate = ids.numel() / (time.perf_counter() - start)
            conts = ids.tolist()
            nll, nbytes = ar_nll(ar, prompts, conts, table)
            rows.append(f"| diffusion, {remasking} | {steps} | {steps / L:.3f} | {bits_per_byte(nll, nbytes):.3f} | "
                        f"{distinct_4grams(conts):.3f} | {rate:.0f} |")
    start = time.perf_counter()
    result = generate(ar, prompts.tolist(), Sampling(max_new_tokens=L, temperature=args.temperature, seed=0), tokenizer, eos_id=-1)
    rate = sum(map(len, result.tokens)) / (time.perf_counter() - start)
    nll, nbytes = ar_nll(ar, prompts, result.tokens, table)
    rows.append(f"| AR, T = {args.temperature} | {L} | 1.000 | {bits_per_byte(nll, nbytes):.3f} | {distinct_4grams(result.tokens):.3f} | {rate:.0f} |")
    nll, nbytes = ar_nll(ar, prompts, real, table)
    rows.append(f"| held-out text itself | - | - | {bits_per_byte(nll, nbytes):.3f} | {distinct_4grams(real):.3f} | - |")
    elbo, ar_bpb = held_out_bpb(model, ar, held_out(args.text, args.split, 10**9), tokenizer, table, args.elbo_draws)
    return [
        f"Text: {len(prompts)} held-out python-docs sequences ({args.split} split); the first {P} bytes prompt, L = {L} bytes "
        f"are generated (diffusion: blocks of {args.block_len}, temperature {args.temperature}); the AR LM scores them.",
        "", *rows, "",
        f"Held-out {args.split} split, bits per byte: diffusion negative ELBO {elbo:.3f} (an upper bound on its NLL, "
        f"{args.elbo_draws} stratified masking draws per sequence); AR NLL {ar_bpb:.3f}.",
    ]


def main() -> None:
    """Parse the flags, print the tables and write them with the command and device."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", help="diffusion LM checkpoint")
    p.add_argument("--text-ar", help="AR LM checkpoint of the same size")
    p.add_argument("--caption", help="diffusion captioner checkpoint")
    p.add_argument("--caption-ar", help="AR captioner checkpoint of the same size")
    p.add_argument("--split", default="test")
    p.add_argument("--captions", type=int, default=1000, help="held-out scenes")
    p.add_argument("--prompts", type=int, default=32, help="held-out text prompts")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--block-len", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--elbo-draws", type=int, default=4)
    p.add_argument("--out", help="markdown file to write")
    args = p.parse_args()
    torch.manual_seed(0)
    lines = []
    if args.caption and args.caption_ar:
        lines += [*caption_table(args), ""]
    if args.text and args.text_ar:
        lines += [*text_table(args), ""]
    if not lines:
        p.error("give --caption and --caption-ar, and/or --text and --text-ar")
    print("\n".join(lines))
    if args.out:
        device = (f"CPU ({platform.machine()}), {os.cpu_count()} cores shared with other jobs, "
                  f"{torch.get_num_threads()} torch thread(s)")
        header = ["# Masked diffusion LMs: quality against sampling steps", "",
                  f"Command: `{' '.join(['python', *sys.argv])}`", "", f"Device: {device}, torch {torch.__version__}.", ""]
        Path(args.out).write_text("\n".join(header + lines))


if __name__ == "__main__":
    main()

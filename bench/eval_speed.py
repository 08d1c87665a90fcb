"""Eval speed: the project's label scorer versus generate-and-parse and versus a per-example forward loop.

    python bench/eval_speed.py --adapter outputs/cpu-scratch/final --n 512
    python bench/eval_speed.py --adapter outputs/cpu-smollm2-lora/final --n 256

Same model, same texts (the first --n of the split), same fitted prompts, one process. Routes:
  scorer    eval/scoring.py `score_texts`: batches sorted by length, one forward per batch, LM head only at the
            label positions, log p(label word) for each class.
  generate  (a) what LLaMA-Factory / vLLM users do: batched, left-padded `model.generate` (greedy, batches in split
            order), the answer decoded and parsed back to a label. `--max_new_tokens` defaults to the longest label
            plus its end-of-turn token, the cheapest setting that can still produce a label; text matching no label
            counts as unparsed (a wrong prediction).
  loop      (b) one text at a time: `model(input_ids).logits` (every position through the LM head, the code people
            write first), label log-probs read at the answer positions. Its predictions must equal the scorer's.
  loop+head (b') the same loop with `logits_to_keep`: separates the batching gain from the LM-head gain.
  prefill   (a') generate's first step alone: the same left-padded batches in split order, one forward with the LM
            head at the last position, the label read from it (first label token). generate cannot be faster than
            this, so scorer/prefill bounds what any scorer can gain over generate-and-parse on this model and machine.
Routes are interleaved in chunks of --chunk texts so load changes on a shared machine hit all of them alike.
"""

from __future__ import annotations

import argparse
import sys

import benchlib  # noqa: F401  (puts the repo root on sys.path)
import numpy as np
import torch
from benchlib import (
    Clock,
    add_model_args,
    bar_chart,
    data_dir,
    load1,
    load_model_and_template,
    load_split,
    machine_line,
    table,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data_dir", help="ChnSentiCorp folder (default: data/chnsenticorp)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=512, help="texts to score (the first N of the split)")
    p.add_argument("--batch_size", type=int, default=32, help="scorer and generate batch size")
    p.add_argument("--chunk", type=int, default=128, help="texts per interleaving round")
    p.add_argument("--max_new_tokens", type=int, help="generate budget (default: longest label + 1)")
    p.add_argument("--skip", nargs="*", default=[], choices=["loop_head"], help="routes not to run")
    p.add_argument("--plot", help="write a bar chart of texts/s to this PNG")
    return p.parse_args(argv)


def left_pad(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with the prompts right-aligned, as generation needs them."""
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(batch):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    return ids, mask


def generate_and_parse(model, tokenizer, template, prompts, batch_size, max_new_tokens):
    """(predictions, raw answers): -1 where the answer matches no verbalizer."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    preds, answers = [], []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size], pad)
        width = ids.shape[1]
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        for row in out[:, width:].tolist():
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            answers.append(text)
            hits = [(text.find(v), c) for c, v in enumerate(template.verbalizers) if v in text]
            preds.append(min(hits)[1] if hits else -1)
    return np.array(preds), answers


def prefill_only(model, tokenizer, labels, prompts, batch_size) -> np.ndarray:
    """Predictions from one left-padded forward per batch (split order), LM head at the last position only."""
    device = next(model.parameters()).device
    first = [ids[0] for ids in labels]
    preds = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size], tokenizer.pad_token_id)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1).logits
        preds += logits[:, -1, first].argmax(-1).tolist()
    return np.array(preds)


def per_example_loop(model, labels, prompts, all_positions: bool) -> np.ndarray:
    """Log-probs (n, classes), one forward per text (per text and label prefix for multi-token labels)."""
    device = next(model.parameters()).device
    feeds = sorted({tuple(ids[:-1]) for ids in labels})
    out = np.zeros((len(prompts), len(labels)))
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            for feed in feeds:
                ids = torch.tensor([prompt + list(feed)], device=device)
                if all_positions:
                    logits = model(input_ids=ids).logits[0, len(prompt) - 1 :]
                else:
                    logits = model(input_ids=ids, logits_to_keep=len(feed) + 1).logits[0]
                logp = torch.log_softmax(logits.float(), dim=-1)
                for c, ids_c in enumerate(labels):
                    if tuple(ids_c[:-1]) == feed:
                        out[i, c] = sum(logp[j, t].item() for j, t in enumerate(ids_c))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from eval.scoring import label_token_ids, score_texts

    print(machine_line())
    texts, gold = load_split(data_dir(args.data_dir), args.split, args.n)
    model, tokenizer, template, what = load_model_and_template(args)
    labels = label_token_ids(template, tokenizer)
    max_new = args.max_new_tokens or max(len(ids) for ids in labels) + 1
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {what}, {params / 1e6:.1f}M parameters, device {next(model.parameters()).device}; template "
          f"max_length {template.max_length}, verbalizers {list(template.verbalizers)} -> token ids {labels}")
    prompts = [template.inference_ids(t, tokenizer) for t in texts]
    lengths = np.array([len(p) for p in prompts])
    print(f"texts: {len(texts)} from {args.split}; prompt tokens median {np.median(lengths):.0f}, "
          f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}; batch size {args.batch_size}; generate "
          f"max_new_tokens {max_new}")

    routes = ["scorer", "generate", "prefill", "loop"] + ([] if "loop_head" in args.skip else ["loop_head"])
    clocks = {r: Clock() for r in routes}
    # warm-up (allocator, kernels, generation config) on two texts, not timed
    score_texts(model, tokenizer, template, texts[:2], batch_size=2, progress=False)
    generate_and_parse(model, tokenizer, template, prompts[:2], 2, max_new)
    per_example_loop(model, labels, prompts[:1], True)
    prefill_only(model, tokenizer, labels, prompts[:2], 2)

    score_lp, loop_lp, head_lp, gen_pred, prefill_pred, answers = [], [], [], [], [], []
    load_before = load1()
    for start in range(0, len(texts), args.chunk):
        sl = slice(start, start + args.chunk)
        with clocks["scorer"]:
            score_lp.append(score_texts(model, tokenizer, template, texts[sl], batch_size=args.batch_size,
                                        progress=False).logprobs)
        with clocks["generate"]:
            p, a = generate_and_parse(model, tokenizer, template, prompts[sl], args.batch_size, max_new)
        gen_pred.append(p)
        answers += a
        with clocks["prefill"]:
            prefill_pred.append(prefill_only(model, tokenizer, labels, prompts[sl], args.batch_size))
        with clocks["loop"]:
            loop_lp.append(per_example_loop(model, labels, prompts[sl], all_positions=True))
        if "loop_head" in clocks:
            with clocks["loop_head"]:
                head_lp.append(per_example_loop(model, labels, prompts[sl], all_positions=False))
        done = min(start + args.chunk, len(texts))
        print(f"  {done}/{len(texts)} texts; " + ", ".join(f"{r} {done / c.wall:.1f}/s" for r, c in clocks.items()),
              flush=True)

    score_lp, loop_lp = np.concatenate(score_lp), np.concatenate(loop_lp)
    gen_pred, gold = np.concatenate(gen_pred), np.array(gold)
    s_pred, l_pred = score_lp.argmax(1), loop_lp.argmax(1)
    identical = int((s_pred == l_pred).sum())
    max_diff = float(np.abs(score_lp - loop_lp).max())
    unparsed = int((gen_pred < 0).sum())
    n = len(texts)
    rate = {r: n / c.wall for r, c in clocks.items()}
    rows = []
    for r, c in clocks.items():
        acc = {"scorer": (s_pred == gold).mean(), "generate": (gen_pred == gold).mean(),
               "loop": (l_pred == gold).mean(), "prefill": (np.concatenate(prefill_pred) == gold).mean()}.get(r)
        if r == "loop_head":
            acc = (np.concatenate(head_lp).argmax(1) == gold).mean()
        rows.append([r, f"{rate[r]:.2f}", f"{rate['scorer'] / rate[r]:.1f}x", f"{c.wall:.2f}", f"{c.cpu:.2f}",
                     f"{c.cores_used:.2f}", f"{n / c.cpu:.2f}", f"{acc:.4f}"])
    print()
    print(table(rows, ["route", "texts/s", "scorer speed-up", "wall s", "CPU s", "cores used", "texts per CPU-s",
                       "accuracy"]))
    print(f"load avg (1 min) before {load_before:.2f}, after {load1():.2f}")
    print(f"scorer vs loop: identical predictions {identical}/{n}, max |log-prob difference| {max_diff:.2e}")
    agree = int((gen_pred == s_pred).sum())
    print(f"generate: unparsed answers {unparsed}/{n}, agrees with scorer {agree}/{n}; "
          f"first answers {answers[:3]}")
    speed_gen, speed_loop = rate["scorer"] / rate["generate"], rate["scorer"] / rate["loop"]
    if args.plot:
        names = {"scorer": "label scorer", "generate": "(a) generate + parse",
                 "prefill": "(a') generate's prefill alone", "loop": "(b) per-example loop",
                 "loop_head": "(b') loop, head at last position"}
        bar_chart(args.plot, [names[r] for r in clocks], [rate[r] for r in clocks], "texts/s (higher is better)",
                  f"{what}, {n} test texts, batch {args.batch_size}")
        print(f"chart written to {args.plot}")
    goals = (f"goals: >=8x over generate {'met' if speed_gen >= 8 else 'MISSED'}, >=20x over loop "
             f"{'met' if speed_loop >= 20 else 'MISSED'}, identical predictions "
             f"{'met' if identical == n else 'MISSED'}")
    print(goals)
    print(f"bound: generate's prefill alone runs at {rate['prefill']:.2f} texts/s; both it and the scorer run one "
          f"forward over the same prompt tokens, so against a generate that decodes just the label the scorer's "
          f"speed-up cannot exceed {rate['scorer'] / rate['prefill']:.1f}x here (measured {speed_gen:.1f}x)")
    print(f"SUMMARY eval_speed: scorer {rate['scorer']:.2f} texts/s, {speed_gen:.1f}x generate-and-parse "
          f"({rate['generate']:.2f}/s), {speed_loop:.1f}x per-example loop ({rate['loop']:.2f}/s), identical "
          f"predictions {identical}/{n}, n={n}, load {load_before:.1f}->{load1():.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

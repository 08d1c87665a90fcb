"""Eval speed: the project's label scorer versus generate-and-parse and versus a per-example forward loop.

    python bench/eval_speed.py --adapter outputs/cpu-scratch/final --n 512
    python bench/eval_speed.py --adapter outputs/cpu-smollm2-lora/final --n 256

Same model, same texts (the first --n of the split), same fitted prompts, one process. Routes:
  scorer    sft/scoring.py `score_texts`: batches sorted by length, one forward per batch, LM head only at the
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
from types import SimpleNamespace

import benchlib as bench
import numpy as np
import torch

ROUTE_NAMES = {"scorer": "label scorer", "generate": "(a) generate + parse", "prefill": "(a') generate's prefill alone",
               "loop": "(b) per-example loop", "loop_head": "(b') loop, head at last position"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_model_args(p)
    p.add_argument("--data_dir", help="ChnSentiCorp folder (default: data/chnsenticorp)")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=512, help="texts to score (the first N of the split)")
    p.add_argument("--batch_size", type=int, default=32, help="scorer and generate batch size")
    p.add_argument("--chunk", type=int, default=128, help="texts per interleaving round")
    p.add_argument("--max_new_tokens", type=int, help="generate budget (default: longest label + 1)")
    p.add_argument("--skip", nargs="*", default=[], choices=["loop_head"], help="routes not to run")
    p.add_argument("--plot", help="write a bar chart of texts/s to this PNG")
    return p.parse_args(argv)


def left_padded(model, prompts, batch_size: int, pad_id: int):
    """Batches of prompts in split order, left-padded (as generation needs them), on the model's device."""
    from sft.scoring import pad_batch

    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        ids, mask = pad_batch(prompts[start : start + batch_size], pad_id, side="left")
        yield ids.to(device), mask.to(device)


@torch.inference_mode()
def generate_and_parse(model, tokenizer, template, prompts, batch_size, max_new_tokens):
    """(predictions, raw answers): -1 where the answer matches no verbalizer."""
    preds, answers = [], []
    for ids, mask in left_padded(model, prompts, batch_size, tokenizer.pad_token_id):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id)
        for row in out[:, ids.shape[1] :].tolist():
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            hits = [(answers[-1].find(v), c) for c, v in enumerate(template.verbalizers) if v in answers[-1]]
            preds.append(min(hits)[1] if hits else -1)
    return np.array(preds), answers


@torch.inference_mode()
def prefill_only(model, tokenizer, labels, prompts, batch_size) -> np.ndarray:
    """Predictions from one left-padded forward per batch (split order), LM head at the last position only."""
    first = [ids[0] for ids in labels]
    preds = []
    for ids, mask in left_padded(model, prompts, batch_size, tokenizer.pad_token_id):
        preds += model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1, first].argmax(-1).tolist()
    return np.array(preds)


@torch.inference_mode()
def per_example_loop(model, labels, prompts, all_positions: bool) -> np.ndarray:
    """Log-probs (n, classes), one forward per text (per text and label prefix for multi-token labels)."""
    device = next(model.parameters()).device
    feeds = sorted({tuple(ids[:-1]) for ids in labels})
    out = np.zeros((len(prompts), len(labels)))
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


def setup(args) -> SimpleNamespace:
    """Texts, model, template, label token ids and fitted prompts, described on stdout."""
    from sft.data import DataArguments, load_splits
    from sft.scoring import label_token_ids

    rows = load_splits(DataArguments(data_dir=bench.data_dir(args.data_dir)), (args.split,))[args.split]
    rows = rows.select(range(min(args.n, len(rows))))
    texts, gold = list(rows["text"]), np.array(rows["label"])
    model, tokenizer, template, what = bench.load_model_and_template(args)
    labels = label_token_ids(template, tokenizer)
    max_new = args.max_new_tokens or max(len(ids) for ids in labels) + 1
    params, device = sum(p.numel() for p in model.parameters()), next(model.parameters()).device
    print(f"model: {what}, {params / 1e6:.1f}M parameters, device {device}; template "
          f"max_length {template.max_length}, verbalizers {list(template.verbalizers)} -> token ids {labels}")
    prompts = [template.inference_ids(t, tokenizer) for t in texts]
    lengths = np.array([len(p) for p in prompts])
    print(f"texts: {len(texts)} from {args.split}; prompt tokens median {np.median(lengths):.0f}, "
          f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}; batch size {args.batch_size}; generate "
          f"max_new_tokens {max_new}")
    return SimpleNamespace(texts=texts, gold=gold, model=model, tokenizer=tokenizer, template=template,
                           what=what, labels=labels, max_new=max_new, prompts=prompts)


def routes(args, s: SimpleNamespace) -> dict:
    """route -> f(texts, prompts, batch size) -> (log-probs (n, classes) or predictions, generated answers)."""
    from sft.scoring import score_texts

    m, tok, labels = s.model, s.tokenizer, s.labels
    fns = {
        "scorer": lambda t, p, bs: (score_texts(m, tok, s.template, t, batch_size=bs, progress=False).logprobs, []),
        "generate": lambda t, p, bs: generate_and_parse(m, tok, s.template, p, bs, s.max_new),
        "prefill": lambda t, p, bs: (prefill_only(m, tok, labels, p, bs), []),
        "loop": lambda t, p, bs: (per_example_loop(m, labels, p, all_positions=True), []),
        "loop_head": lambda t, p, bs: (per_example_loop(m, labels, p, all_positions=False), []),
    }
    return {r: f for r, f in fns.items() if r not in args.skip}


def run_interleaved(args, s: SimpleNamespace, fns: dict) -> tuple[dict, dict, list[str]]:
    """({route: Clock}, {route: outputs over all texts}, generated answers), in chunks of --chunk texts."""
    for f in fns.values():  # warm-up (allocator, kernels, generation config) on two texts, not timed
        f(s.texts[:2], s.prompts[:2], 2)
    s.load_before = bench.load1()
    clocks, outs, answers = {r: bench.Clock() for r in fns}, {r: [] for r in fns}, []
    for start in range(0, len(s.texts), args.chunk):
        sl = slice(start, start + args.chunk)
        for r, f in fns.items():
            with clocks[r]:
                out, said = f(s.texts[sl], s.prompts[sl], args.batch_size)
            outs[r].append(out)
            answers += said
        done = min(start + args.chunk, len(s.texts))
        print(f"  {done}/{len(s.texts)} texts; " + ", ".join(f"{r} {done / c.wall:.1f}/s" for r, c in clocks.items()),
              flush=True)
    return clocks, {r: np.concatenate(o) for r, o in outs.items()}, answers


def report(args, s: SimpleNamespace, clocks: dict, outs: dict, answers: list[str]) -> None:
    n = len(s.texts)
    preds = {r: o.argmax(1) if o.ndim == 2 else o for r, o in outs.items()}
    rate = {r: n / c.wall for r, c in clocks.items()}
    rows = [[r, f"{rate[r]:.2f}", f"{rate['scorer'] / rate[r]:.1f}x", f"{c.wall:.2f}", f"{c.cpu:.2f}",
             f"{c.cpu / c.wall:.2f}", f"{n / c.cpu:.2f}", f"{(preds[r] == s.gold).mean():.4f}"]
            for r, c in clocks.items()]
    print()
    print(bench.table(rows, ["route", "texts/s", "scorer speed-up", "wall s", "CPU s", "cores used", "texts per CPU-s",
                             "accuracy"]))
    print(f"load avg (1 min) before {s.load_before:.2f}, after {bench.load1():.2f}")
    identical = int((preds["scorer"] == preds["loop"]).sum())
    print(f"scorer vs loop: identical predictions {identical}/{n}, max |log-prob difference| "
          f"{float(np.abs(outs['scorer'] - outs['loop']).max()):.2e}")
    print(f"generate: unparsed answers {int((preds['generate'] < 0).sum())}/{n}, agrees with scorer "
          f"{int((preds['generate'] == preds['scorer']).sum())}/{n}; first answers {answers[:3]}")
    speed_gen, speed_loop = rate["scorer"] / rate["generate"], rate["scorer"] / rate["loop"]
    bench.bar_chart(args.plot, [ROUTE_NAMES[r] for r in clocks], list(rate.values()), "texts/s (higher is better)",
                    f"{s.what}, {n} test texts, batch {args.batch_size}")
    print(f"goals: >=8x over generate {'met' if speed_gen >= 8 else 'MISSED'}, >=20x over loop "
          f"{'met' if speed_loop >= 20 else 'MISSED'}, identical predictions {'met' if identical == n else 'MISSED'}")
    print(f"bound: generate's prefill alone runs at {rate['prefill']:.2f} texts/s; both it and the scorer run one "
          f"forward over the same prompt tokens, so against a generate that decodes just the label the scorer's "
          f"speed-up cannot exceed {rate['scorer'] / rate['prefill']:.1f}x here (measured {speed_gen:.1f}x)")
    print(f"SUMMARY eval_speed: scorer {rate['scorer']:.2f} texts/s, {speed_gen:.1f}x generate-and-parse "
          f"({rate['generate']:.2f}/s), {speed_loop:.1f}x per-example loop ({rate['loop']:.2f}/s), identical "
          f"predictions {identical}/{n}, n={n}, load {s.load_before:.1f}->{bench.load1():.1f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    print(bench.machine_line())
    s = setup(args)
    clocks, outs, answers = run_interleaved(args, s, routes(args, s))
    report(args, s, clocks, outs, answers)
    return 0


if __name__ == "__main__":
    sys.exit(main())

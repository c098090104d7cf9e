"""Associative recall: can a decoder of a given shape learn to look a value up by its key, and in how many steps?
`python -m mm.eval.recall [--forms easy,reversed,filler,both] [--steps 1500] [--device cuda]`.

The shipped model answers questions that find an object by its colour ("what shape is red?": the answer follows the
named word in the scene's caption) but not by its shape or place (the answer stands before the named word). This
puts the two forms of lookup to a decoder trained from scratch on random tokens, nothing else to learn:

    easy      k1 v1 k2 v2 ... kn vn | k  -> the v after k      (the value after its key, the query key last)
    reversed  v1 k1 v2 k2 ... vn kn | k  -> the v before k     (the value before its key)
    filler    k1 v1 ... kn vn | k f1 f2 f3 -> the v after k    (three fixed tokens after the query key, as "? =")
    both      reversed and filler

Keys are distinct within a sequence, values are not; the loss is on the answer only. Measured with the shipped
decoder's shape (4 layers x 256, 4 heads, 2 kv heads; 6 pairs of 32 keys / 32 values, 64 sequences a step, AdamW
lr 1e-3, one CPU thread): easy jumps from chance to 95-99% between steps 200 and 400 (seeds 0-2); the other three
stay at chance through 800-1500 steps, reversed through 5000. Short contexts first form them all: reversed is learnt
on 2 pairs (92% at step 250) and `--curriculum 2:500` (the first 500 steps on 2 pairs) then reads 6 pairs at 98% by
step 1000; filler with `--curriculum 2:0:300,2:1:300,2:3:400` (fillers added one phase at a time) 99.6% at 1250;
both with `2:0:300,2:1:300,2:3:400,3:3:300,4:3:300` (pairs widened in steps: a jump from 2 to 6 undid it) 97.8% at
1750 (README, The shipped model). Each form prints its held-out accuracy every `--every` steps.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from decoders import LlamaConfig, LlamaForCausalLM

FORMS = {"easy": (False, 0), "reversed": (True, 0), "filler": (False, 3), "both": (True, 3)}  # value first, fillers
KEYS = VALUES = 32
FIRST_KEY, FIRST_VALUE = 3, 3 + KEYS  # token ids (0-2 left to pad / bos / eos)
SEP, FILLER = FIRST_VALUE + VALUES, FIRST_VALUE + VALUES + 1  # query marker, then the filler tokens
VOCAB = FILLER + 4  # up to 4 fillers


def recall_batch(n: int, pairs: int, value_first: bool, fillers: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [n, 2 pairs + 2 + fillers], y [n]): `pairs` (key, value) pairs (keys distinct), SEP, a query key, fillers;
    y: the value paired with the query key."""
    keys = torch.stack([torch.randperm(KEYS, generator=generator)[:pairs] for _ in range(n)]) + FIRST_KEY
    values = torch.randint(0, VALUES, (n, pairs), generator=generator) + FIRST_VALUE
    q = torch.randint(0, pairs, (n, 1), generator=generator)
    body = torch.stack([values, keys] if value_first else [keys, values], dim=2).flatten(1)  # [n, 2 pairs]
    tail = torch.arange(FILLER, FILLER + fillers).expand(n, fillers)
    x = torch.cat([body, torch.full((n, 1), SEP), keys.gather(1, q), tail], dim=1)
    return x, values.gather(1, q)[:, 0]


def train_recall(form: str, steps: int, pairs: int = 6, batch: int = 64, lr: float = 1e-3, layers: int = 4,
                 hidden: int = 256, heads: int = 4, kv_heads: int = 2, every: int = 100, device: str = "cpu",
                 seed: int = 0, curriculum: list[tuple[int, int | None, int]] = ()) -> list[dict]:
    """Train a decoder from scratch on one form; [{step, loss, accuracy}] every `every` steps (accuracy: greedy, on
    500 held-out sequences of the form with `pairs` pairs). curriculum: phases (pairs, fillers or None for the
    form's, steps) that take the first of the steps, in order; the rest on the form itself."""
    value_first, fillers = FORMS[form]
    phases = [(p, fillers if f is None else f, n) for p, f, n in curriculum]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 21 // 8,
                                         num_hidden_layers=layers, num_attention_heads=heads,
                                         num_key_value_heads=kv_heads, head_dim=hidden // heads,
                                         max_position_embeddings=2 * max([pairs] + [p for p, _, _ in phases]) + 8,
                                         tie_word_embeddings=False)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    x_test, y_test = (t.to(device) for t in recall_batch(500, pairs, value_first, fillers,
                                                         torch.Generator().manual_seed(seed + 2)))
    log = []
    for step in range(1, steps + 1):
        n, f, end = pairs, fillers, 0
        for p, pf, steps_of in phases:
            end += steps_of
            if step <= end:
                n, f = p, pf
                break
        x, y = (t.to(device) for t in recall_batch(batch, n, value_first, f, g))
        loss = F.cross_entropy(model(x)[:, -1].float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                accuracy = (model(x_test)[:, -1].argmax(-1) == y_test).float().mean().item()
            log.append({"step": step, "loss": round(loss.item(), 4), "accuracy": round(accuracy, 4)})
    return log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm.eval.recall", description=__doc__.split("\n\n")[0])
    p.add_argument("--forms", default="easy,reversed,filler,both", help=f"comma-separated, of {', '.join(FORMS)}")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--curriculum", default=None, metavar="P[:F]:S,...",
                   help="phases first: S steps on P pairs (and F fillers), e.g. 2:500 or 2:0:300,2:3:400; "
                        "then the form")
    p.add_argument("--json", default=None, help="write {form: [{step, loss, accuracy}]} here")
    a = p.parse_args(argv)
    curriculum = []
    for phase in a.curriculum.split(",") if a.curriculum else []:
        try:
            v = [int(x) for x in phase.split(":")]
            n, f, steps = (v[0], None, v[1]) if len(v) == 2 else v  # ValueError unless 2 or 3 numbers
            assert 1 <= n <= KEYS and (f is None or 0 <= f <= 4) and steps >= 0
            curriculum.append((n, f, steps))
        except (ValueError, AssertionError):
            p.error(f"--curriculum takes phases P:S or P:F:S (P pairs, 1 to {KEYS}; F fillers, 0 to 4; S steps), "
                    f"got {phase!r}")
    forms = a.forms.split(",")
    if bad := [f for f in forms if f not in FORMS]:
        p.error(f"unknown form {bad[0]!r}; forms: {', '.join(FORMS)}")
    if a.pairs > KEYS or a.pairs < 1:
        p.error(f"--pairs must be 1 to {KEYS}")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {}
    for form in forms:
        out[form] = train_recall(form, a.steps, a.pairs, a.batch, a.lr, a.layers, a.hidden, a.heads, a.kv_heads,
                                 a.every, a.device, a.seed, curriculum)
        print(f"{form:9s} " + " ".join(f"{r['step']}:{100 * r['accuracy']:.0f}%" for r in out[form]), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

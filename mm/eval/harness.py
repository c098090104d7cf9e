"""`mm eval --data FILE.jsonl --task TASK`: a model measured on the user's own data, the seed's recipe: a metric by
task type, a prompt template per data set, answer extraction, scoring, with bootstrap confidence intervals.

One JSON object per line. `answer` is the reference (a string, or a list of acceptable strings); `image` / `audio`
are paths relative to the JSONL file; any other field can be named by the template.
    task       needs                                    figures
    long-qa    question, answer                         ROUGE-L (rouge-score)
    short-qa   question, answer                         exact match, token F1 (SQuAD normalisation)
    choice     question, choices (list), answer         accuracy by answer extraction (a letter or an option's
               (index, letter or the option's text)     text in the reply) and by log-likelihood (the option the
                                                        model finds likeliest as the answer)
    caption    image, answer (caption or captions)      BLEU-4 (sacrebleu), ROUGE-L
    asr        audio, answer (transcript)               WER, CER (jiwer, normalised text); zero-shot with the
                                                        default prompt, the model's own `transcribe` (joint search)
The template (a format string, or a file holding one) turns an item into the question put to the model; `{choices}`
is the lettered option list. K-shot prompts (GPT-3 style) put K solved items drawn from the file, never the item
itself, before it: earlier turns of the conversation for a chat model, "QUESTION ANSWER" blocks for a base model.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import string
import sys
from pathlib import Path

import jiwer

from mm.eval.metrics import bleu4, exact_match, normalize_answer, normalize_text, rouge_l, token_f1
from mm.eval.scorer import Prompt
from mm.models.fusion import CAPTION_PROMPT
from mm.models.fusion_speech import TRANSCRIBE_PROMPT

TASKS = ("long-qa", "short-qa", "choice", "caption", "asr")
REQUIRED = {"long-qa": ("question", "answer"), "short-qa": ("question", "answer"),
            "choice": ("question", "choices", "answer"), "caption": ("image", "answer"), "asr": ("audio", "answer")}
# per task: (template for a chat model, template for a base model that needs the cue "Answer:")
TEMPLATES = {"long-qa": ("{question}", "Question: {question}\nAnswer:"),
             "short-qa": ("{question}", "Question: {question}\nAnswer:"),
             "choice": ("{question}\n{choices}", "Question: {question}\n{choices}\nAnswer:"),
             "caption": (CAPTION_PROMPT, CAPTION_PROMPT), "asr": (TRANSCRIBE_PROMPT, TRANSCRIBE_PROMPT)}
FIGURES = {"long-qa": ("rouge_l",), "short-qa": ("exact_match", "token_f1"), "choice": ("accuracy", "accuracy_ll"),
           "caption": ("bleu4", "rouge_l"), "asr": ("wer", "cer")}
LETTERS = string.ascii_uppercase


class DataError(ValueError):
    """A data file the harness cannot read; the text names the file and line."""


def read_items(path: str | Path, task: str) -> list[dict]:
    """The items of a JSONL file, checked for `task`; media paths made absolute. Errors name file and line."""
    path = Path(path)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
        missing = [k for k in REQUIRED[task] if k not in item]
        if missing:
            raise DataError(f"{where}: task {task} needs field(s) {', '.join(missing)}")
        item["references"] = _references(item, task, where)
        for key in ("image", "audio"):
            if key in item:
                media = path.parent / str(item[key])
                if not media.is_file():
                    raise DataError(f"{where}: {key} {item[key]!r} not found (looked for {media})")
                item[key] = str(media)
        item["_line"] = n
        items.append(item)
    if not items:
        raise DataError(f"{path}: no items")
    return items


def _references(item: dict, task: str, where: str) -> list[str]:
    answer = item["answer"]
    if task == "choice":
        choices = item["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: choices must be a list of at least two strings")
        if len(choices) > len(LETTERS):
            raise DataError(f"{where}: {len(choices)} choices; at most {len(LETTERS)}")
        if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
            index = answer
        elif isinstance(answer, str) and answer in choices:
            index = choices.index(answer)
        elif isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS[:len(choices)]:
            index = LETTERS.index(answer.upper())
        else:
            raise DataError(f"{where}: answer {answer!r} is not an index, letter or text of one of the "
                            f"{len(choices)} choices")
        item["answer_index"] = index
        return [choices[index]]
    refs = [answer] if isinstance(answer, str) else answer
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise DataError(f"{where}: answer must be a string or a non-empty list of strings, got {answer!r:.100}")
    if task == "asr" and not normalize_text(refs[0]):
        raise DataError(f"{where}: the transcript is empty after normalisation: {refs[0]!r}")
    return refs


def read_template(template: str | None, task: str, chat: bool) -> str:
    """The template: the task's default, a file's text, or the string itself."""
    if template is None:
        return TEMPLATES[task][0 if chat else 1]
    if len(template) < 256 and Path(template).is_file():
        return Path(template).read_text(encoding="utf-8").rstrip("\n")
    return template


def render(item: dict, template: str, source: str = "") -> str:
    """The question put to the model for one item; media placeholders first unless the template places them."""
    fields = {k: v for k, v in item.items() if not k.startswith("_")}
    if "choices" in item:
        fields["choices"] = "\n".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(item["choices"]))
    try:
        text = template.format(**fields)
    except KeyError as e:
        raise DataError(f"{source}:{item['_line']}: the template names field {e.args[0]!r}, "
                        "which the item lacks") from None
    except (IndexError, ValueError) as e:
        raise ValueError(f"template {template!r}: not a valid format string ({e})") from None
    if "<image>" not in template and "<audio>" not in template:
        media = "<image>" * ("image" in item) + "<audio>" * ("audio" in item)
        text = media + "\n" + text if media else text
    return text


def shots_for(index: int, n_items: int, k: int, seed: int) -> list[int]:
    """K distinct item indices other than `index`, drawn by a generator seeded by (seed, index)."""
    if k and n_items <= k:
        raise ValueError(f"--shots {k} needs more than {k} items (the examples exclude the item); "
                         f"the file has {n_items}")
    rng = random.Random(seed * 1_000_003 + index)
    return rng.sample([j for j in range(n_items) if j != index], k)


def build_prompt(items: list[dict], index: int, template: str, shots: int = 0, seed: int = 0,
                 source: str = "") -> Prompt:
    """The prompt of item `index`: its `shots` solved examples as earlier turns, then the item's question."""
    turns, images, audios = [], [], []
    for j in shots_for(index, len(items), shots, seed) + [index]:
        it = items[j]
        turns.append((render(it, template, source), it["references"][0] if j != index else None))
        images += [it["image"]] if "image" in it else []
        audios += [it["audio"]] if "audio" in it else []
    return Prompt(turns, images, audios)


def extract_choice(reply: str, choices: list[str]) -> int | None:
    """The option a reply picks: its text, a letter ("B", "(b)", "B. ...", "the answer is B"), or the one option
    named in it; None when it picks none."""
    norm = normalize_answer(reply)
    texts = [normalize_answer(c) for c in choices]
    if norm in texts:
        return texts.index(norm)
    letters = LETTERS[:len(choices)]
    # "B", "B.", "(B)" in capitals (so the article in "a red star" is no "A"), "(b)", "the answer is b"
    m = (re.match(rf"^\s*\(?([{letters}])(?:[).:]|\s*$)", reply)
         or re.match(rf"^\s*\(([{letters.lower()}])\)", reply)
         or re.search(rf"answer is:?\s*\(?([{letters}])\b", reply, re.I))
    if m:
        return letters.index(m.group(1).upper())
    named = [k for k, t in enumerate(texts) if t and re.search(rf"\b{re.escape(t)}\b", norm)]
    return named[0] if len(named) == 1 else None


def score_items(task: str, preds: list[str], refs: list[list[str]], picks=None, ll_picks=None, gold=None):
    """(per-item scores {name: [values]}, corpus figure function(indices) per figure name)."""
    if task == "long-qa":
        per = {"rouge_l": [rouge_l([p], [r]) for p, r in zip(preds, refs)]}
    elif task == "short-qa":
        per = {"exact_match": [exact_match([p], [r]) for p, r in zip(preds, refs)],
               "token_f1": [token_f1([p], [r]) for p, r in zip(preds, refs)]}
    elif task == "choice":
        per = {"accuracy": [100.0 * (p == g) for p, g in zip(picks, gold)],
               "accuracy_ll": [100.0 * (p == g) for p, g in zip(ll_picks, gold)]}
    elif task == "caption":
        per = {"rouge_l": [rouge_l([p], [r]) for p, r in zip(preds, refs)]}
        return per, {"bleu4": lambda ix: bleu4([preds[i] for i in ix], [refs[i] for i in ix]),
                     "rouge_l": _mean(per["rouge_l"])}
    else:  # corpus rates: edits summed over items / reference length summed (as jiwer's corpus WER and CER)
        words = [_edits(p, r[0], jiwer.process_words) for p, r in zip(preds, refs)]
        chars = [_edits(p, r[0], jiwer.process_characters) for p, r in zip(preds, refs)]
        return {}, {"wer": _rate(words), "cer": _rate(chars)}
    return per, {name: _mean(values) for name, values in per.items()}


def _edits(prediction: str, reference: str, process) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference length) after `normalize_text`, as `metrics.wer` scores."""
    o = process(normalize_text(reference), normalize_text(prediction))
    return o.substitutions + o.deletions + o.insertions, o.substitutions + o.deletions + o.hits


def _rate(counts: list[tuple[int, int]]):
    return lambda ix: 100.0 * sum(counts[i][0] for i in ix) / sum(counts[i][1] for i in ix)


def _mean(values: list[float]):
    return lambda ix: sum(values[i] for i in ix) / len(ix)


def bootstrap(figure, n: int, resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of figure(indices) over `resamples` draws of n item indices with replacement."""
    if resamples <= 0:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    values = sorted(figure([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    tail = (1 - confidence) / 2
    return values[int(tail * (resamples - 1))], values[int(round((1 - tail) * (resamples - 1)))]


def evaluate(scorer, items: list[dict], task: str, template: str | None = None, shots: int = 0, seed: int = 0,
             resamples: int = 1000, source: str = "", progress: bool = False) -> tuple[list[dict], dict]:
    """(per-item records, summary {figure: {value, low, high}} with n) of `scorer` (a TextLM/ChatLM) on items."""
    from tqdm import tqdm

    # speech recognition as the model itself does it (the multimodal model: joint CTC/decoder beam search), unless
    # the prompt is the user's
    own_transcript = task == "asr" and shots == 0 and template is None and hasattr(scorer, "transcribe")
    template = read_template(template, task, getattr(scorer, "chat", True))
    records = []
    for i in tqdm(range(len(items)), desc=f"eval {task}", unit="item", disable=not progress, file=sys.stderr):
        item = items[i]
        prompt = build_prompt(items, i, template, shots, seed, source)
        pred = scorer.transcribe(item["audio"]) if own_transcript else scorer.generate(prompt)
        rec = {"line": item["_line"], "id": item.get("id"), "prompt": prompt.turns[-1][0],
               "shots": len(prompt.turns) - 1, "prediction": pred, "references": item["references"]}
        if task == "choice":
            rec["pick"] = extract_choice(pred, item["choices"])
            rec["logliks"] = [scorer.loglikelihood(prompt, c)[0] for c in item["choices"]]
            rec["pick_ll"] = max(range(len(item["choices"])), key=rec["logliks"].__getitem__)
            rec["gold"] = item["answer_index"]
        records.append(rec)
    per, figures = score_items(task, [r["prediction"] for r in records], [r["references"] for r in records],
                               *([r.get(k) for r in records] for k in ("pick", "pick_ll", "gold")))  # choice only
    for name, values in per.items():
        for rec, v in zip(records, values):
            rec[name] = v
    everything = list(range(len(records)))
    summary = {"task": task, "n": len(records), "shots": shots, "template": template, "figures": {}}
    for name in FIGURES[task]:
        low, high = bootstrap(figures[name], len(records), resamples, seed=seed)
        summary["figures"][name] = {"value": figures[name](everything), "low": low, "high": high}
    return records, summary


def format_summary(summary: dict, confidence: float = 0.95) -> str:
    """The summary as a table: figure, value, bootstrap interval."""
    lines = [f"task {summary['task']}, {summary['n']} items, {summary['shots']}-shot",
             f"  {'figure':<12} {'value':>8}   {int(confidence * 100)}% bootstrap interval"]
    for name, f in summary["figures"].items():
        lines.append(f"  {name:<12} {f['value']:8.2f}   [{f['low']:.2f}, {f['high']:.2f}]")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `mm eval --data`."""
    p = argparse.ArgumentParser(prog="mm eval", description="Measure a model on a JSONL file of your own.")
    p.add_argument("--data", required=True, help="JSONL file, one item per line")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--shots", type=int, default=0, help="solved examples before each item (drawn from the file)")
    p.add_argument("--template", default=None, help="prompt template: a format string over item fields, or a file")
    p.add_argument("--model", default=None, help="model directory (default: the shipped multimodal model)")
    p.add_argument("--out", default=None, help="per-item results as JSONL")
    p.add_argument("--json", default=None, help="the summary as JSON")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the few-shot draws and the bootstrap")
    p.add_argument("--max-new-tokens", type=int, default=64)
    return p


def run_harness(argv: list[str] | None = None) -> int:
    """`mm eval --data FILE.jsonl --task TASK ...`."""
    from mm.eval.scorer import load_scorer

    args = build_parser().parse_args(argv)
    if args.shots < 0:
        raise ValueError(f"--shots must be >= 0, got {args.shots}")
    items = read_items(args.data, args.task)
    scorer = load_scorer(args.model, args.max_new_tokens)
    records, summary = evaluate(scorer, items, args.task, args.template, args.shots, args.seed, args.bootstrap,
                                source=args.data, progress=True)
    summary["model"], summary["data"] = str(args.model or "shipped"), args.data
    print(format_summary(summary))
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0

"""`mm eval`: held-out figures of a multimodal model on the project's own data.

Held-out means unseen in training twice over: scenes no training step draws (`mm.data.scenes`, split `heldout`: new
combinations of objects; or `novel-pairs`: scenes holding a (shape, colour) pair that no training image or
sentence shows), spoken by voices no training clip uses (`mm.data.speech_data`). Figures:
    caption      BLEU-4 (sacrebleu) and ROUGE-L (rouge-score) against the scene's caption, and object-level
                 precision/recall/F1: each object the caption names (shape, colour, size and place, parsed by
                 `mm.data.scenes.parse_objects`) against the scene's objects
    question     exact-match accuracy of the answer, overall, per kind (colour, shape, count, position) and by
                 the number of objects in the scene (with one there is nothing to look up)
    transcribe   WER and CER (jiwer) against what was said, on noisy held-out voices: `model.transcribe` (joint
                 CTC/LLM beam search), and the WER of the decoder alone (greedy)
    spoken       accuracy of the answer to a spoken question about an image
    open-speech  WER and CER on word sequences from a general English word list (`mm.data.words`), outside the
                 scene grammar, from the CTC head alone and from `model.transcribe` (joint decode); then both
                 searches again with the words the sequences are drawn from as their lexicon (`decoders.lexicon`:
                 a closed vocabulary, as a decoder with a pronunciation lexicon has)
    common-speech  the same on sequences of everyday English words (`common_words`: the list's words among the
                 5000 most frequent, 4251 words)
    silence      on clips of silence and noise: the share with an empty transcript and the words per clip
    cot          questions asked with `COT_INSTRUCTION` (Multimodal-CoT: rationale, then answer): accuracy with the
                 rationale beside the direct answer's on the same items, and how often the rationale names
                 exactly the objects the question is about
    read         text only: questions about held-out scenes given in words (`told`: the caption, then the
                 question), by the number of objects, and texts to repeat word for word (held-out captions and
                 numbers); what the decoder does with its context when nothing has to be seen or heard
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from tqdm import tqdm

from decoders.lexicon import Lexicon
from mm.eval.metrics import bleu4, cer, exact_match, normalize_answer, object_f1, rouge_l, wer
from mm.models.fusion import CAPTION_PROMPT
from mm.models.fusion_speech import TRANSCRIBE_PROMPT
from mm.data.scenes import (COT_INSTRUCTION, QUESTION_KINDS, REPEAT_PROMPT, SPLITS, describe, item_rng,
                            parse_objects, question_form, sample_question, sample_split_scene, scene_examples,
                            split_cot, told)
from mm.data.speech_data import speech_examples, spoken_questions, transcript
from mm.data.words import SCENE_WORDS, common_words, non_speech, open_speech_examples, word_list

HELDOUT_SPLITS = tuple(s for s in SPLITS if s != "train")  # ('heldout', 'novel-pairs')
EVAL_SEED = 1  # the recipe trains on seed 0; the held-out split is disjoint from training whatever the seed
LEXICON_BEAM = 16  # the lexicon searches' beam (60 clips of seed 2, CTC head: WER 29.2 / 28.5 / 27.6% at 8 / 16 / 32)
TASKS = ("caption", "question", "transcribe", "spoken", "open-speech", "common-speech", "silence", "cot", "read")
DEFAULT_TASKS = ("caption", "question", "transcribe", "spoken")


def accuracy_by(right: list[bool], keys: list[str], groups) -> dict[str, float]:
    """Percent right within each group (items whose key is the group); 0 for a group with no items."""
    return {g: 100 * sum(r for r, k in zip(right, keys) if k == g) / max(1, keys.count(g)) for g in groups}


def by_form(right: list[bool], qas: list, scenes: list) -> dict[str, dict]:
    """Accuracy by the question's form (`question_form`) on scenes of two or three objects, where a question must
    pick one object out: {form: {"accuracy": percent, "n": items}}, most frequent form first."""
    pairs = [(r, question_form(qa.question)) for r, qa, s in zip(right, qas, scenes) if len(s) > 1]
    right, forms = [r for r, _ in pairs], [f for _, f in pairs]
    counts = Counter(forms).most_common()
    accuracy = accuracy_by(right, forms, [f for f, _ in counts])
    return {f: {"accuracy": accuracy[f], "n": k} for f, k in counts}


def format_forms(forms: dict[str, dict]) -> str:
    """'"what colour is the <shape>?" 56% (16), ...'."""
    return ", ".join(f"\"{f}\" {v['accuracy']:.0f}% ({v['n']})" for f, v in forms.items())


def evaluate(model, n: int = 300, batch_size: int = 32, cache_dir: str | Path | None = None, seed: int = EVAL_SEED,
             tasks: tuple[str, ...] = DEFAULT_TASKS, split: str = "heldout") -> dict:
    """Held-out figures of `model` (an image + speech FusionModel) on `n` items per task of `split`, all in percent."""
    if split not in HELDOUT_SPLITS:
        raise ValueError(f"split must be {' or '.join(map(repr, HELDOUT_SPLITS))}, got {split!r}")
    size = model.config.vision.image_size
    results: dict = {"n": n, "seed": seed, "split": split}
    if "caption" in tasks or "question" in tasks:
        scenes = scene_examples(n, split, seed=seed, size=size)
    if "caption" in tasks:
        preds = model.replies([(f"<image>\n{CAPTION_PROMPT}", [s.image], []) for s in scenes], batch_size, 64, "caption")
        refs = [s.caption for s in scenes]
        results["caption"] = {"bleu4": bleu4(preds, refs), "rouge_l": rouge_l(preds, refs),
                              "objects": object_f1([parse_objects(p) for p in preds], [s.scene for s in scenes]),
                              "examples": [{"prediction": p, "reference": r} for p, r in zip(preds[:3], refs[:3])]}
    if "question" in tasks:
        qas = [sample_question(s.scene, item_rng(seed, split, "eval-question", i)) for i, s in enumerate(scenes)]
        preds = model.replies([(f"<image>\n{qa.question}", [s.image], []) for s, qa in zip(scenes, qas)],
                         batch_size, 8, "question")
        right = [normalize_answer(p) == normalize_answer(qa.answer) for p, qa in zip(preds, qas)]
        objects = [str(len(s.scene)) for s in scenes]
        results["question"] = {"accuracy": 100 * sum(right) / len(right),
                               "by_kind": accuracy_by(right, [qa.kind for qa in qas], QUESTION_KINDS),
                               "by_objects": accuracy_by(right, objects, sorted(set(objects))),
                               "by_form": by_form(right, qas, [s.scene for s in scenes])}
    if "transcribe" in tasks:
        speech = speech_examples(n, split, seed=seed, cache_dir=cache_dir, workers=4)
        refs = [transcript(e.text) for e in speech]
        preds = [model.transcribe((e.waveform, 16000)) for e in tqdm(speech, desc="transcribe", unit="clip",
                                                                      file=sys.stderr, leave=False)]
        alone = model.replies([(f"<audio>\n{TRANSCRIBE_PROMPT}", [], [e.waveform]) for e in speech],
                         batch_size, 96, "transcribe (decoder alone)")
        results["transcribe"] = {"wer": wer(preds, refs), "cer": cer(preds, refs), "decoder_alone_wer": wer(alone, refs),
                                 "examples": [{"prediction": p, "reference": r} for p, r in zip(preds[:3], refs[:3])]}
    if "spoken" in tasks:
        items = spoken_questions(n, split, seed=seed, size=size, cache_dir=cache_dir, workers=4)
        preds = model.replies([("<image><audio>", [q.image], [q.waveform]) for q in items], batch_size, 8, "spoken")
        results["spoken"] = {"accuracy": exact_match(preds, [q.answer for q in items])}
    if "open-speech" in tasks:
        results["open-speech"] = open_speech(model, n, seed, cache_dir)
    if "common-speech" in tasks:
        results["common-speech"] = open_speech(model, n, seed, cache_dir, common_words())
    if "silence" in tasks:
        clips = non_speech(n, seed)
        joint = [model.transcribe((c, 16000)) for c in tqdm(clips, desc="silence", file=sys.stderr, leave=False)]
        ctc = [model.ctc_transcribe((c, 16000)) for c in clips]
        results["silence"] = {"empty": 100 * sum(not t.split() for t in joint) / n,
                              "words_per_clip": sum(len(t.split()) for t in joint) / n,
                              "ctc_empty": 100 * sum(not t.split() for t in ctc) / n, "examples": joint[:3]}
    if "cot" in tasks:
        results["cot"] = chain_of_thought(model, n, batch_size, seed, split, size)
    if "read" in tasks:
        results["read"] = reading(model, n, batch_size, seed, split)
    return results


def open_speech(model, n: int, seed: int, cache_dir, words: tuple[str, ...] | None = None) -> dict:
    """WER/CER of the CTC head alone (greedy) and of the joint decode on word sequences outside the scene grammar,
    from `words` (by default the whole word list); then of both with those words and the scene words as lexicon
    (beam LEXICON_BEAM; the CTC head alone: ctc_weight 1)."""
    words = words or word_list()
    speech = open_speech_examples(n, "heldout", seed=seed, cache_dir=cache_dir, workers=4, words=words)
    refs = [transcript(e.text) for e in speech]
    clips = [(e.waveform, 16000) for e in speech]

    def decode(desc, **search):
        return [model.transcribe(c, **search)
                for c in tqdm(clips, desc=desc, unit="clip", file=sys.stderr, leave=False)]

    joint = decode("open speech")
    ctc = [model.ctc_transcribe(c) for c in clips]
    lexicon = Lexicon(list(words) + list(SCENE_WORDS))
    lex_ctc = decode("open speech, CTC + lexicon", ctc_weight=1.0, beam_size=LEXICON_BEAM, lexicon=lexicon)
    lex_joint = decode("open speech, joint + lexicon", beam_size=LEXICON_BEAM, lexicon=lexicon)
    return {"wer": wer(joint, refs), "cer": cer(joint, refs), "ctc_wer": wer(ctc, refs), "ctc_cer": cer(ctc, refs),
            "lexicon_words": len(lexicon), "lexicon_wer": wer(lex_joint, refs), "lexicon_cer": cer(lex_joint, refs),
            "lexicon_ctc_wer": wer(lex_ctc, refs), "lexicon_ctc_cer": cer(lex_ctc, refs),
            "examples": [{"prediction": p, "ctc": c, "lexicon_ctc": x, "reference": r}
                         for p, c, x, r in zip(joint[:3], ctc[:3], lex_ctc[:3], refs[:3])]}


def chain_of_thought(model, n: int, batch_size: int, seed: int, split: str, size: int) -> dict:
    """Accuracy with the rationale first and without it (same items), and the rationale's own correctness."""
    scenes = scene_examples(n, split, seed=seed, size=size)
    qas = [sample_question(s.scene, item_rng(seed, split, "eval-cot", i)) for i, s in enumerate(scenes)]
    direct = model.replies([(f"<image>\n{qa.question}", [s.image], []) for s, qa in zip(scenes, qas)],
                           batch_size, 8, "question")
    replies = model.replies([(f"<image>\n{qa.question} {COT_INSTRUCTION}", [s.image], []) for s, qa in zip(scenes, qas)],
                            batch_size, 64, "question with rationale")
    cots = [split_cot(r) for r in replies]
    right = [normalize_answer(a) == normalize_answer(qa.answer) for (_, a), qa in zip(cots, qas)]
    named = [bool(r) and Counter(parse_objects(r)) == Counter(parse_objects(qa.rationale)) for (r, _), qa in zip(cots, qas)]
    return {"accuracy": 100 * sum(right) / n, "rationale_right": 100 * sum(named) / n,
            "direct_accuracy": exact_match(direct, [qa.answer for qa in qas]),
            "examples": [{"prediction": r, "reference": f"{qa.rationale} answer: {qa.answer}"}
                         for r, qa in zip(replies[:3], qas[:3])]}


def reading(model, n: int, batch_size: int, seed: int, split: str) -> dict:
    """Text only: accuracy of questions about scenes told in words (overall and by objects in the scene), and how
    often a text to repeat (a held-out caption or a number, half and half) comes back exactly."""
    scenes = [sample_split_scene(item_rng(seed, split, "scene", i), split) for i in range(n)]
    qas = [sample_question(s, item_rng(seed, split, "eval-read", i)) for i, s in enumerate(scenes)]
    preds = model.replies([(told(s, qa.question), [], []) for s, qa in zip(scenes, qas)], batch_size, 8, "read")
    right = [normalize_answer(p) == normalize_answer(qa.answer) for p, qa in zip(preds, qas)]
    objects = [str(len(s)) for s in scenes]
    texts = [describe(s) if i % 2 else str(item_rng(seed, split, "eval-repeat", i).randint(0, 10 ** 6))
             for i, s in enumerate(scenes)]
    echoed = model.replies([(REPEAT_PROMPT + t, [], []) for t in texts], batch_size, 64, "repeat")
    return {"accuracy": 100 * sum(right) / n, "by_objects": accuracy_by(right, objects, sorted(set(objects))),
            "by_form": by_form(right, qas, scenes), "repeat": exact_match(echoed, texts),
            "examples": [{"prediction": p, "reference": qa.answer} for p, qa in zip(preds[:3], qas[:3])]}


def format_results(r: dict) -> str:
    """The figures as a small table."""
    lines = [f"held-out figures, split {r.get('split', 'heldout')} ({r['n']} items per task, seed {r['seed']})"]
    if "caption" in r:
        c = r["caption"]
        lines.append(f"  caption      BLEU-4 {c['bleu4']:.1f}   ROUGE-L {c['rouge_l']:.1f}   objects P/R/F1 "
                     + "/".join(f"{c['objects'][k]:.1f}" for k in ("precision", "recall", "f1")))
    if "question" in r:
        kinds = ", ".join(f"{k} {v:.1f}%" for k, v in r["question"]["by_kind"].items())
        lines.append(f"  question     accuracy {r['question']['accuracy']:.1f}%  ({kinds})")
        if "by_objects" in r["question"]:
            objs = ", ".join(f"{k}: {v:.1f}%" for k, v in r["question"]["by_objects"].items())
            lines.append(f"               by objects in the scene  {objs}")
        if "by_form" in r["question"]:
            lines.append(f"               by form, 2-3 objects  {format_forms(r['question']['by_form'])}")
    if "transcribe" in r:
        t = r["transcribe"]
        lines.append(f"  transcribe   WER {t['wer']:.2f}%   CER {t['cer']:.2f}%   (decoder alone: WER {t['decoder_alone_wer']:.2f}%)")
    if "spoken" in r:
        lines.append(f"  spoken       accuracy {r['spoken']['accuracy']:.1f}%")
    for task, label in (("open-speech", "open speech "), ("common-speech", "common words")):
        if task in r:
            o = r[task]
            lines.append(f"  {label} WER {o['wer']:.2f}%   CER {o['cer']:.2f}%   (CTC head alone: WER {o['ctc_wer']:.2f}%"
                         f"   CER {o['ctc_cer']:.2f}%)")
            lines.append(f"    with its {o['lexicon_words']} words as lexicon: WER {o['lexicon_wer']:.2f}%   CER "
                         f"{o['lexicon_cer']:.2f}%   (CTC head alone: WER {o['lexicon_ctc_wer']:.2f}%   CER "
                         f"{o['lexicon_ctc_cer']:.2f}%)")
    if "silence" in r:
        z = r["silence"]
        lines.append(f"  silence      empty {z['empty']:.1f}%   words per clip {z['words_per_clip']:.2f}   "
                     f"(CTC head alone: empty {z['ctc_empty']:.1f}%)")
    if "cot" in r:
        t = r["cot"]
        lines.append(f"  cot          accuracy {t['accuracy']:.1f}% with the rationale, {t['direct_accuracy']:.1f}% "
                     f"without; rationale right {t['rationale_right']:.1f}%")
    if "read" in r:
        t = r["read"]
        objs = ", ".join(f"{k}: {v:.1f}%" for k, v in t["by_objects"].items())
        lines.append(f"  read         scene in words: accuracy {t['accuracy']:.1f}% (by objects {objs}); repeat "
                     f"{t['repeat']:.1f}%")
        if "by_form" in t:
            lines.append(f"               by form, 2-3 objects  {format_forms(t['by_form'])}")
    return "\n".join(lines)


# bits, group size (32: the shipped decoder's 672 wide MLP, Q4_0's), int8 activations too
QUANTIZE = {"int8": (8, None, False), "int4": (4, 32, False), "w8a8": (8, None, True), "w4a8": (4, 32, True)}


def quantize_in_memory(model, kind: str):
    """The model with its decoder's and projector's linears quantized in place (`decoders.quantize`, round to nearest:
    int8 per output channel, int4 in groups of 32, weight-only or with int8 activations: w8a8 per token, w4a8 per
    block of 32 inputs); the encoders stay as they are. Returns it."""
    from decoders.quantize import quantize_model

    bits, group, activations = QUANTIZE[kind]
    for part in (model.language_model, getattr(model, "projector", None)):
        if part is not None:
            quantize_model(part, "rtn", bits, group, activations=activations)
    return model


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `mm eval`."""
    p = argparse.ArgumentParser(prog="mm eval", description="Held-out figures of a multimodal model; with --data FILE.jsonl "
                                "--task TASK, figures on your own data (mm eval --data X --task short-qa --help).")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--n", type=int, default=300, help="items per task")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, of: {', '.join(TASKS)}")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=EVAL_SEED)
    p.add_argument("--split", default="heldout", choices=HELDOUT_SPLITS,
                   help="heldout: unseen scenes; novel-pairs: scenes with (shape, colour) pairs never seen in training")
    p.add_argument("--cache-dir", default=None, help="where synthesized speech is cached (default: none)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quantize", choices=tuple(QUANTIZE), default=None,
                   help="first quantize the decoder and projector in memory (RTN: int8 per channel, int4 in groups of "
                        "32; w8a8, w4a8: the same with int8 activations)")
    return p


def run_eval(argv: list[str] | None = None) -> int:
    """`mm eval [--model DIR] [--n N] [--json FILE]`; with `--data FILE.jsonl` the harness (`mm.eval.harness`)."""
    from mm.models.formats import load

    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--data" or a.startswith("--data=") for a in argv):  # the user's own JSONL file: mm.eval.harness
        from mm.eval.harness import run_harness

        return run_harness(argv)
    args = build_parser().parse_args(argv)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = tuple(t for t in args.tasks.split(",") if t)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
    model = load(args.model, expect=("mm-multimodal",))
    if args.quantize:
        quantize_in_memory(model, args.quantize)
    t0 = time.time()
    results = evaluate(model, args.n, args.batch_size, args.cache_dir, args.seed, tasks, args.split)
    results["model"] = str(args.model or "shipped") + (f" ({args.quantize})" if args.quantize else "")
    results["seconds"] = round(time.time() - t0, 1)
    print(format_results(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0

"""The data of `mm train --recipe tiny`: each task's rows, drawn afresh or from speech built once, and the tokenizer's
corpus. Deterministic from the recipe's seed; nothing downloaded.

Besides the four tasks of the shipped recipe (module docstring of mm.train.recipe_tiny), a recipe can mix in
(all off in the shipped recipe, whose rows stay exactly as they were):
    open speech   word sequences from a general English word list (mm.data.words), training voices, in the
                  transcribe task (`open_share` of its rows): listening, not the scene grammar
    silence       clips of silence and noise whose transcript is empty (`silence_share` of the transcribe rows)
    padding       up to `pad_silence` seconds of quiet before and after each training clip (`padded`)
    rationales    questions asked with COT_INSTRUCTION answered "i see <the objects it is about>. answer: <a>"
                  (`cot_share` of the question turns): Multimodal-CoT's rationale, then the answer
    agent         ReAct episodes in text (mm.data.react_episodes: call a tool, read its observation, answer), built
                  from the scenes' questions, captions and transcripts (`agent_share` of the joint steps)
    read          text only (`read_share` of the joint steps): questions about a scene given in words (`told`), and
                  texts to repeat word for word (captions, transcripts, numbers): looking things up in the context
                  and copying from it, which the agent's final answers and questions about several objects need
    lookup        text only, the first joint steps (`lookup_warmup`): bare told items ("red star, blue circle" /
                  "what colour is the star?" -> "red"), one lookup direction after another, each with the question's
                  tail added in thirds (none, "?", then the chat turn), a quarter of the rows rehearsing the
                  directions before it (`lookup_rows`; measured with `python -m mm.eval.lookup`)
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from decoders.loss import IGNORE_INDEX
from encoders.audio import SAMPLE_RATE
from mm.data.scenes import (COLOURS, COLS, COT_INSTRUCTION, COUNT_WORDS, NUMBERS, REPEAT_PROMPT, ROWS, SHAPES, SIZES,
                            cot_target, describe, heldout_pairs, item_rng, lookup_item, lookup_phases, questions,
                            render, sample_question, sample_split_scene, told)
from mm.data.react_episodes import episode
from mm.data.speech_data import speech_examples, spoken_questions, transcript
from mm.data.words import common_words, non_speech, open_speech_examples, word_list
from mm.models.fusion import CAPTION_PROMPT
from mm.models.fusion_speech import TRANSCRIBE_PROMPT
from mm.train.grid_probe import grid_labels

if TYPE_CHECKING:
    from mm.train.recipe_tiny import TinyRecipe

def make_data(r: TinyRecipe, cache_dir: Path, log=print) -> dict:
    """Text and speech of the four tasks, built once (speech is cached on disk under cache_dir). Images are not
    here: each step renders new scenes (`scene_rows`)."""
    t0 = time.time()
    scenes = [sample_split_scene(item_rng(r.seed, "train", "text", i), "train") for i in range(r.n_text)]
    speech = speech_examples(r.n_speech, "train", seed=r.seed, cache_dir=cache_dir, workers=4)
    spoken = spoken_questions(r.n_spoken, "train", seed=r.seed, size=r.image_size, cache_dir=cache_dir, workers=4)
    words = open_speech_examples(r.n_open, "train", seed=r.seed, cache_dir=cache_dir, workers=4,
                                 words=common_words(r.open_words) if r.open_words else None) if r.n_open else []
    log(f"data: {len(scenes)} scene texts, {len(speech)} spoken sentences, {len(spoken)} spoken questions, "
        f"{len(words)} spoken word sequences, {r.n_silence} clips without speech ({time.time() - t0:.0f} s)")
    qas = [qa for s in scenes for qa in questions(s)]
    return {
        "caption": [describe(s) for s in scenes],
        "question": [(qa.question, qa.answer) for qa in qas],
        "transcribe": [(e.waveform, transcript(e.text)) for e in speech],
        "spoken": [(q.image, grid_labels(q.scene), q.waveform, q.answer, transcript(q.question)) for q in spoken],
        "open": [(e.waveform, transcript(e.text)) for e in words],
        "silence": [(clip, "") for clip in non_speech(r.n_silence, seed=1000 + r.seed)],
        "rationale": [f"{qa.question} {COT_INSTRUCTION} {cot_target(qa)}" for qa in qas] if r.cot_share else [],
    }


def scene_rows(r: TinyRecipe, n: int, rng: random.Random) -> list[tuple[list, object, torch.Tensor]]:
    """`n` new training scenes drawn from `rng`: (scene, image, grid labels)."""
    out = []
    for _ in range(n):
        scene = sample_split_scene(rng, "train")
        out.append((scene, render(scene, r.image_size, rng), grid_labels(scene)))
    return out


def corpus_lines(data: dict) -> list[str]:
    """Every text the model reads or writes, and each vocabulary word, for the tokenizer."""
    lines = data["caption"] + [f"{q} {a}" for q, a in data["question"]]
    lines += [t for _, t in data["transcribe"]] + [f"{t} {a}" for *_, a, t in data["spoken"]]
    lines += [t for _, t in data.get("open", [])] + data.get("rationale", [])
    words = SHAPES + COLOURS + SIZES + ROWS + COLS + NUMBERS + COUNT_WORDS
    lines += [CAPTION_PROMPT, TRANSCRIBE_PROMPT, "USER: ASSISTANT:"] + words + [w + "s" for w in SHAPES]
    return lines


def user(content: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


TASKS = ("caption", "question", "transcribe", "spoken")
TASK_CYCLE = ("question", "transcribe", "spoken", "caption", "question", "spoken", "question")


def sample_batch(r: TinyRecipe, data: dict, task: str, size: int, rng: random.Random):
    """(conversations, images, their grid labels, audios, transcripts of the audios) of `size` rows of one task."""
    convs, images, grids, audios, texts = [], [], [], [], []
    if task in ("caption", "question"):
        for scene, image, grid in scene_rows(r, size, rng):
            if task == "caption":
                convs.append(user(f"<image>\n{CAPTION_PROMPT}", describe(scene)))
            else:  # several turns about one image: more answers per image and step, as in LLaVA's instruction data
                conv = []
                for turn in range(r.question_turns):
                    qa = sample_question(scene, rng)
                    question, answer = qa.question, qa.answer
                    if r.cot_share and rng.random() < r.cot_share:
                        question, answer = f"{qa.question} {COT_INSTRUCTION}", cot_target(qa)
                    conv += user(f"<image>\n{question}" if turn == 0 else question, answer)
                convs.append(conv)
            images.append(image)
            grids.append(grid)
    elif task == "agent":  # text only: the tools do the looking and listening
        for _ in range(size):
            heard = heard_text(data, rng)  # drawn first, as the recipes' rows were
            convs.append(episode(rng, word_list(), rng.choice(data["question"]), rng.choice(data["caption"]), heard))
    elif task == "read":
        for _ in range(size):
            convs.append(read_conversation(r, data, rng))
    elif task == "transcribe":
        for _ in range(size):
            wave, t = rng.choice(transcribe_pool(r, data, rng))
            convs.append(user(f"<audio>\n{TRANSCRIBE_PROMPT}", t))
            audios.append(padded(r, wave, rng))
            texts.append(t)
    else:
        for _ in range(size):
            im, grid, wave, a, t = rng.choice(data["spoken"])
            convs.append(user("<image><audio>", a))
            images.append(im)
            grids.append(grid)
            audios.append(padded(r, wave, rng))
            texts.append(t)
    return convs, images, grids, audios, texts


def heard_text(data: dict, rng: random.Random) -> str:
    """A transcript of training speech for a text-only row: a word sequence half the time (when there are any), else a
    scene sentence."""
    return rng.choice(data["open"] if data["open"] and rng.random() < 0.5 else data["transcribe"])[1]


def read_conversation(r: TinyRecipe, data: dict, rng: random.Random) -> list[dict]:
    """A text-only row: half the time `question_turns` questions about a new training scene told in words (the
    first turn holds the scene), else a text to repeat: a caption, a transcript or a number."""
    if rng.random() < 0.5:
        scene, conv = sample_split_scene(rng, "train"), []
        for turn in range(r.question_turns):
            qa = sample_question(scene, rng)
            conv += user(told(scene, qa.question) if turn == 0 else qa.question, qa.answer)
        return conv
    kind = rng.random()
    if kind < 1 / 3:
        text = rng.choice(data["caption"])
    elif kind < 2 / 3:
        text = heard_text(data, rng)
    else:
        text = str(rng.randint(0, 10 ** rng.randint(1, 6)))
    return user(REPEAT_PROMPT + text, text)


def lookup_rows(r: TinyRecipe, processor, step: int, size: int, rng: random.Random) -> list[tuple[list, list]]:
    """(ids, labels) of `size` bare told items for joint step `step` of the lookup warm-up (`r.lookup_warmup`): the
    phase's direction, its question's tail by the third of the phase ("" and "?" as plain text after BOS, then the
    chat turn), a quarter of the rows (after the first phase) an earlier direction as a chat turn. No item shows a
    held-out (shape, colour) pair."""
    done, start = [], 0
    for direction, steps, objects in lookup_phases(r.lookup_warmup):
        if step < start + steps:
            break
        done.append(direction)
        start += steps
    else:
        raise ValueError(f"step {step} is past the lookup warm-up {r.lookup_warmup!r}")
    third = min(2, 3 * (step - start) // steps)
    rows = []
    for _ in range(size):
        rehearse = bool(done) and rng.random() < 0.25
        items, question, answer = lookup_item(rng, rng.choice(done) if rehearse else direction,
                                              (2, 3) if rehearse else objects, avoid=heldout_pairs())
        if rehearse or third == 2:
            ids, labels, _ = processor.encode(user(f"{items}\n{question}?", answer), [], add_generation_prompt=False)
        else:
            tok = processor.tokenizer
            prompt, reply = tok.encode(f"{items}\n{question}{'?' * third}", bos=True), tok.encode(answer, eos=True)
            ids, labels = prompt + reply, [IGNORE_INDEX] * len(prompt) + reply
        rows.append((ids, labels))
    return rows


def padded(r: TinyRecipe, wave: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """wave [S] with up to `r.pad_silence` seconds of quiet before and after it (each length uniform; digital silence
    or faint noise, half and half), as a recording's speech runs start and end; unchanged (no draw) when 0."""
    if not r.pad_silence:
        return wave
    parts = []
    for _ in range(2):
        n = int(rng.uniform(0, r.pad_silence) * SAMPLE_RATE)
        level = 0.0 if rng.random() < 0.5 else 10 ** rng.uniform(-4, -2.5)
        parts.append(torch.randn(n, generator=torch.Generator().manual_seed(rng.getrandbits(32))) * level)
    return torch.cat([parts[0], wave, parts[1]])


def transcribe_pool(r: TinyRecipe, data: dict, rng: random.Random) -> list:
    """Where a transcribe row comes from: clips without speech (`silence_share`), word sequences (`open_share`) or
    spoken scene sentences. Draws from `rng` only when a share is set, so the shipped recipe's rows stay the same."""
    if not (r.silence_share or r.open_share):
        return data["transcribe"]
    u = rng.random()
    if u < r.silence_share and data["silence"]:
        return data["silence"]
    if u < r.silence_share + r.open_share and data["open"]:
        return data["open"]
    return data["transcribe"]


def ctc_targets(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Transcripts as Llama ids [A, L] padded with -1, and their lengths [A] (id 0, the blank, never occurs)."""
    ids = [tokenizer.encode(t) for t in texts]
    L = max(1, max(len(i) for i in ids))  # an empty transcript (no speech) is a target of length 0
    out = torch.full((len(ids), L), -1, dtype=torch.long)
    for k, i in enumerate(ids):
        out[k, : len(i)] = torch.tensor(i)
    return out, torch.tensor([len(i) for i in ids])

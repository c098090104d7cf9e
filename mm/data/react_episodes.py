"""The ReAct text format (Yao et al. 2022) and training episodes written in it, so that a small model learns to use
tools: the agent (mm.agent.react) and the recipe (mm.train) read the format from here, one definition for both.

A conversation: a system message naming the tools, the task as the first user message (its files appended by
name, `Files: image1 = scene.png; audio1 = question.wav`, `files_line`; the tools take the name or a path), then
each assistant reply and the tool's result as the next user message:

    Thought: i need the question first.
    Action: transcribe
    Action Input: {"audio": "audio1"}
    Observation: what colour is the shape at the bottom     <- written by the agent, never by the model
    Thought: now i look at the image.
    Action: ask_image
    Action Input: {"image": "image1", "question": "what colour is the shape at the bottom"}
    Observation: yellow
    Thought: i know the answer.
    Final Answer: yellow

`SYSTEM` (tools with their descriptions and the format spelt out: about 700 tokens with the shipped model's
tokenizer) is for chat models with room; `BRIEF` (tool signatures only) is what a small model reads and what the
shipped model was trained on (`episode`). The tasks of `episode`: a spoken question about an image (transcribe,
then ask_image), a written question (ask_image), a caption (caption), a transcript (transcribe) and arithmetic
(calculator). Files go by their names (image1, audio1) rather than their paths: a small model that has to copy an
arbitrary path letter by letter gets it wrong (measured: 0 of 3 paths copied after 3,600 episodes), and engines name
attachments by handle too; the file names in the task are drawn from a general word list so that nothing is learnt
from them. The task shows each file's name without its folder: where a file lies (a checkout, a temporary upload) is
no business of the model's, and with whole paths the shipped model's choice of tools changed with the folder (an
unseen task sentence: 4 of 8 folders right).
"""
from __future__ import annotations

import json
import random
from pathlib import PureWindowsPath

from mm.data.speech_data import transcript

SYSTEM = """Answer the task as well as you can. You can use these tools:
{tools}

Use this format:
Thought: what to do next
Action: the tool to use, one of [{names}]
Action Input: the tool's arguments as a JSON object, e.g. {example}
Observation: the tool's result (written for you)
... (Thought / Action / Action Input / Observation repeat as needed)
Thought: I know the answer
Final Answer: the answer to the task"""

BRIEF = "Tools: {signatures}.\nReply with Thought and Action with Action Input (JSON), or Final Answer."

# The tools of the shipped model as `mm.agent.tools.Tool.signature()` writes them (a test keeps the two equal).
SHIPPED_TOOLS = ("calculator(expression: str)", "caption(image: str)", "ask_image(image: str, question: str)",
                 "transcribe(audio: str)")


def brief_system(signatures: list[str] | tuple[str, ...]) -> str:
    """The short system message: the tools' signatures and one line of format."""
    return BRIEF.format(signatures=", ".join(signatures))


def attachments(image: str | None = None, audio: str | None = None) -> dict[str, str]:
    """The files of a task by the names the agent uses for them (image1, audio1) -> their paths."""
    return {k: v for k, v in (("image1", image), ("audio1", audio)) if v}


def files_line(task: str, image: str | None = None, audio: str | None = None) -> str:
    """The task as the agent's first user message: `task`, then its files by handle and file name (no folder) on a line
    of their own."""
    files = [f"{k} = {PureWindowsPath(v).name}" for k, v in attachments(image, audio).items()]  # at / and \ alike
    return task + ("\nFiles: " + "; ".join(files) if files else "")


def action(thought: str, tool: str, args: dict) -> str:
    """A reply that calls a tool."""
    return f"Thought: {thought}\nAction: {tool}\nAction Input: {json.dumps(args)}"


def final(answer: str, thought: str = "i know the answer.") -> str:
    """A reply that ends the task."""
    return f"Thought: {thought}\nFinal Answer: {answer}"


# ------------------------------------------------------------------------------------------------ training episodes

SPOKEN_TASKS = ("answer the spoken question about the image.", "answer the question in the audio about the image.",
                "listen to the question and answer it from the image.", "what is the answer to the spoken question?")
IMAGE_TASKS = ("describe the image.", "what is in the image?", "caption the image.", "what does the picture show?")
AUDIO_TASKS = ("transcribe the audio.", "what is said in the audio?", "write down what the recording says.")
MATH_TASKS = ("what is {e}?", "compute {e}.", "calculate {e}", "{e} = ?")
DIRS = ("", "", "", "data/", "mm/examples/", "photos/", "/tmp/", "clips/2024/", "../shared/", "C:/Users/me/")
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp")
AUDIO_EXT = (".wav", ".flac", ".mp3", ".ogg")
KINDS = ("spoken", "question", "caption", "transcribe", "math")
SHARES = (0.35, 0.2, 0.15, 0.1, 0.2)


def file_name(rng: random.Random, words: tuple[str, ...], ext: tuple[str, ...]) -> str:
    """A path a user might give: an optional folder, one or two words, maybe a number, an extension."""
    name = rng.choice(words) + (rng.choice("_-") + rng.choice(words) if rng.random() < 0.3 else "")
    if rng.random() < 0.3:
        name += str(rng.randint(0, 999))
    return rng.choice(DIRS) + name + rng.choice(ext)


def expression(rng: random.Random) -> tuple[str, str]:
    """(an arithmetic expression of two or three integers, its value as the calculator writes it)."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    a, b = rng.randint(0, 999), rng.randint(0, 99)
    op1 = rng.choice("+-*")
    if rng.random() < 0.5:
        return f"{a} {op1} {b}", str(ops[op1](a, b))
    c, op2 = rng.randint(0, 99), rng.choice("+-")  # a op1 b op2 c, with * binding first as Python's
    return f"{a} {op1} {b} {op2} {c}", str(ops[op2](ops[op1](a, b), c))


def episode(rng: random.Random, words: tuple[str, ...], qa: tuple[str, str], caption: str, heard: str,
            signatures: tuple[str, ...] = SHIPPED_TOOLS) -> list[dict]:
    """One training conversation (system, task, replies, observations) of a kind drawn by SHARES: `qa` is a question
    about a scene with its answer, `caption` a scene's description, `heard` a transcript of some speech."""
    kind = rng.choices(KINDS, SHARES)[0]
    image, audio = file_name(rng, words, IMAGE_EXT), file_name(rng, words, AUDIO_EXT)
    question, answer = qa
    if kind == "spoken":
        spoken = transcript(question)  # what the transcribe tool returns: lower case, no punctuation
        task = files_line(rng.choice(SPOKEN_TASKS), image, audio)
        steps = [(action("i need the question first.", "transcribe", {"audio": "audio1"}), spoken),
                 (action("now i look at the image.", "ask_image", {"image": "image1", "question": spoken}), answer)]
        end = answer
    elif kind == "question":
        task = files_line(question, image)
        steps = [(action("i look at the image.", "ask_image", {"image": "image1", "question": question}), answer)]
        end = answer
    elif kind == "caption":
        task = files_line(rng.choice(IMAGE_TASKS), image)
        steps, end = [(action("i look at the image.", "caption", {"image": "image1"}), caption)], caption
    elif kind == "transcribe":
        task = files_line(rng.choice(AUDIO_TASKS), audio=audio)
        steps, end = [(action("i listen to the audio.", "transcribe", {"audio": "audio1"}), heard)], heard
    else:
        e, value = expression(rng)
        task = rng.choice(MATH_TASKS).format(e=e)
        steps, end = [(action("i use the calculator.", "calculator", {"expression": e}), value)], value
    conv = [{"role": "system", "content": brief_system(signatures)}, {"role": "user", "content": task}]
    for reply, observation in steps:
        conv += [{"role": "assistant", "content": reply}, {"role": "user", "content": f"Observation: {observation}"}]
    return conv + [{"role": "assistant", "content": final(end)}]

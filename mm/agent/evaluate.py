"""How well a model works as a ReAct agent over its own tools, end to end: `python -m mm.agent.evaluate [--n 50]`.

Tasks, on held-out data (scenes no training step drew, voices no training clip used), as files on disk:
    spoken     a spoken question about an image: right when the final answer is the scene's answer (the agent has
               to transcribe, then ask about the image with what it heard)
    caption    "describe the image.": right when the final answer is the model's own caption of that image
    math       "what is 417 * 23 + 5?": right when the final answer is the value
Each is asked with a task sentence the training episodes use and with one they never use (`unseen`). Reported per
task: success rate, how often the final answer repeats the last tool result (as it should), replies the parser
could not read, mean model replies per task.
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import soundfile as sf

from mm.agent.react import for_model
from mm.agent.tools import calculator, model_tools, registry
from mm.data.react_episodes import MATH_TASKS, SPOKEN_TASKS, attachments, expression, files_line
from mm.data.speech_data import spoken_questions
from mm.eval.metrics import normalize_answer

UNSEEN = {"spoken": "please answer the question that is asked in the recording, about the picture.",
          "caption": "tell me what this picture shows.", "math": "how much is {e}?"}


def run_task(agent, task: str) -> tuple[str | None, int, int, bool]:
    """(final answer or None, model replies, unreadable replies, whether the answer repeats the last observation) of
    one agent run; a run that outgrows the context window has no answer."""
    try:
        answer, events = agent.run(task)
    except ValueError as e:
        if "context window" not in str(e):
            raise
        return None, agent.max_steps, 0, False
    seen = [e.text for e in events if e.kind == "observation"]
    copied = answer is not None and bool(seen) and answer.strip() == seen[-1].strip()
    return answer, max((e.step for e in events), default=0), sum(e.kind == "error" for e in events), copied


def evaluate(model, n: int = 50, seed: int = 7, progress=None, tasks: tuple[str, ...] = ("spoken", "caption", "math"),
             phrasings: tuple[str, ...] = ("seen", "unseen")) -> dict:
    """{task: {phrasing: {"success": %, "errors": count, "replies": mean}}} over `n` items a task and phrasing."""
    items = spoken_questions(n, "heldout", seed=seed, size=model.config.vision.image_size)
    rng = random.Random(seed)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, item in enumerate(items):
            image, audio = Path(tmp) / f"scene{i}.png", Path(tmp) / f"question{i}.wav"
            item.image.save(image)
            sf.write(audio, item.waveform.numpy(), 16000)
            e, value = expression(rng)
            cases = {
                "spoken": ((rng.choice(SPOKEN_TASKS), UNSEEN["spoken"]), dict(image=str(image), audio=str(audio)),
                           lambda a, item=item: normalize_answer(a) == normalize_answer(item.answer)),
                "caption": (("describe the image.", UNSEEN["caption"]), dict(image=str(image)),
                            lambda a, image=image: a.strip() == model.caption(str(image)).strip()),
                "math": ((rng.choice(MATH_TASKS).format(e=e), UNSEEN["math"].format(e=e)), {},
                         lambda a, value=value: a.strip() == value),
            }
            for kind in tasks:
                texts, files, right = cases[kind]
                for phrasing, task in zip(("seen", "unseen"), texts):
                    if phrasing not in phrasings:
                        continue
                    tools = registry(calculator, *model_tools(model, attachments(**files)))
                    agent = for_model(model, tools, max_steps=6, max_seconds=600)
                    answer, replies, errors, copied = run_task(agent, files_line(task, **files))
                    r = results.setdefault(kind, {}).setdefault(phrasing, dict.fromkeys(
                        ("right", "errors", "replies", "copied"), 0))
                    r["right"] += answer is not None and right(answer)
                    r["copied"] += copied
                    r["errors"] += errors
                    r["replies"] += replies
            if progress:
                progress(i + 1, n)
    return {k: {p: {"success": 100.0 * r["right"] / n, "copied": 100.0 * r["copied"] / n, "errors": r["errors"],
                    "replies": r["replies"] / n} for p, r in v.items()} for k, v in results.items()}


def main(argv: list[str] | None = None) -> int:
    import mm
    from tqdm import tqdm

    p = argparse.ArgumentParser(prog="python -m mm.agent.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--n", type=int, default=50, help="items per task and phrasing")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--tasks", default="spoken,caption,math", help="comma-separated, of: spoken, caption, math")
    p.add_argument("--phrasings", default="seen,unseen", help="seen: a task sentence of training; unseen: another")
    args = p.parse_args(argv)
    bar = tqdm(total=args.n, desc="agent tasks", unit="item")
    out = evaluate(mm.load(args.model), args.n, args.seed, progress=lambda i, n: bar.update(1),
                   tasks=tuple(args.tasks.split(",")), phrasings=tuple(args.phrasings.split(",")))
    bar.close()
    print("| task | phrasing | success | answer = last observation | unreadable replies | replies per task |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for kind, v in out.items():
        for phrasing, r in v.items():
            print(f"| {kind} | {phrasing} | {r['success']:.0f}% | {r['copied']:.0f}% | {r['errors']} | {r['replies']:.2f} |")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

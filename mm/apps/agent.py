"""`mm agent TASK`: a ReAct agent over a model and tools (calculator, caption, ask_image, transcribe, search with
--db), or with --sop FILE a fixed procedure of tool calls; every step is printed as it happens.

    mm agent "what is 17 * 23 + 4?"
    mm agent --sop spoken_question.yaml --audio question.wav --image scene.png
    mm agent "what do my notes say about the launch?" --db notes.db
"""
from __future__ import annotations

import argparse
import json
import sys

from mm.agent.react import MAX_NEW_TOKENS, MAX_SECONDS, MAX_STEPS, for_model
from mm.agent.sop import load_sop, run_sop
from mm.agent.tools import calculator, index_search, model_tools, registry, search_tool
from mm.data.react_episodes import attachments, files_line

MODEL_TOOLS = {"caption", "ask_image", "transcribe"}
LINES = {"observation": "\nObservation: {}\n", "error": "\n(error: {})\n", "final": "\nFinal Answer: {}\n",
         "stop": "\n(stopped: {})\n"}  # how print_event shows the events on lines of their own


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `mm agent`."""
    p = argparse.ArgumentParser(prog="mm agent", description="A ReAct agent with tools, or a fixed procedure (--sop).")
    p.add_argument("task", nargs="?", default="", help="what to do (optional with --sop)")
    p.add_argument("--db", default=None, help="an `mm rag index` directory: adds the search tool")
    p.add_argument("--image", default=None, help="an image file the task is about")
    p.add_argument("--audio", default=None, help="an audio file the task is about")
    p.add_argument("--sop", default=None, help="a YAML file of steps to run instead of letting the model choose")
    p.add_argument("--model", default=None, help="model directory (default: the shipped multimodal model)")
    p.add_argument("--max-steps", type=int, default=MAX_STEPS, help="model replies before giving up")
    p.add_argument("--max-seconds", type=float, default=MAX_SECONDS, help="time limit, checked between steps")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="tokens per model reply")
    p.add_argument("--prompt", default="auto", choices=["auto", "brief", "full"],
                   help="the system prompt: brief (tool signatures; what the shipped model was trained on), full (tools "
                        "described and the format spelt out), auto: brief for contexts under 2048 tokens")
    p.add_argument("--json", action="store_true", help="print the events as JSON lines")
    return p


def build_tools(model, db: str | None, files: dict[str, str] | None = None) -> dict:
    """calculator, the model's tools (if a model; taking the task's `files` by name), search over `db` (if given)."""
    tools = [calculator] + (model_tools(model, files) if model is not None else [])
    if db:
        tools.append(search_tool(index_search(db)))
    return registry(*tools)


def print_event(e, as_json: bool) -> None:
    """One event on stdout: streamed text as it comes, other events on lines of their own."""
    if as_json:
        if e.kind != "text":
            print(json.dumps({"kind": e.kind, "text": e.text, "step": e.step, **e.data}), flush=True)
        return
    if e.kind == "text":
        sys.stdout.write(e.text)
    elif e.kind == "action" and isinstance(e.data.get("input"), dict):  # SOP steps
        sys.stdout.write(f"[{e.step}] {e.text} {json.dumps(e.data['input'])}\n")
    elif e.kind in LINES:
        sys.stdout.write(LINES[e.kind].format(e.text))
    sys.stdout.flush()


def run_agent(argv: list[str] | None = None) -> int:
    """`mm agent TASK [--db DIR] [--image F] [--audio F] [--sop FILE] [--max-steps N]`; 0 when there is an answer."""
    import mm

    args = build_parser().parse_args(argv)
    if args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    inputs = {"task": args.task, "image": args.image, "audio": args.audio, "db": args.db}
    if args.sop:
        sop = load_sop(args.sop)
        needs_model = any(s.tool in MODEL_TOOLS for s in sop.steps)
        tools = build_tools(mm.load(args.model) if needs_model else None, args.db)
        events = run_sop(sop, tools, inputs)
    else:
        if not args.task:
            raise ValueError("give a TASK (or --sop FILE)")
        model = mm.load(args.model)
        if not hasattr(model, "chat"):
            raise ValueError(f"{args.model}: the agent needs a chat model (the multimodal model, LLaVA)")
        tools = build_tools(model, args.db, attachments(args.image, args.audio))
        agent = for_model(model, tools, args.max_steps, args.max_seconds, args.max_new_tokens, args.prompt)
        events = agent.stream(files_line(args.task, args.image, args.audio))
    final = None
    try:
        for e in events:
            print_event(e, args.json)
            final = e.text if e.kind == "final" else final
    except ValueError as e:
        if "context window" in str(e) and not args.sop:  # a model with a short context and a long task
            raise ValueError(f"{e}: this model's context is too short for the ReAct prompt; give a model with a longer "
                             "context (--model DIR), or a fixed procedure (--sop FILE)") from None
        raise
    return 0 if final is not None else 1

"""SOP mode: a standard operating procedure, a fixed sequence of tool calls written as a small YAML file, each step's
arguments templated from the inputs and earlier results. No model decides what to do next; the tools do the work.

    name: spoken question about an image
    steps:
      - tool: transcribe
        args: {audio: "{audio}"}
        save: question
      - tool: ask_image
        args: {image: "{image}", question: "{question}"}
        save: answer
    answer: "{answer}"

`{name}` is an input (the CLI gives `task`, `image`, `audio`, `db`) or the result of an earlier step saved under that
name; `answer` (default: the last step's result) is the final answer. Runs stream the same `Event`s as ReAct.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from mm.agent.react import Event
from mm.agent.tools import Tool, ToolError


class SopError(ValueError):
    """An SOP file that cannot run; the text names the file and the step."""


@dataclass
class SopStep:
    """One tool call: the tool's name, argument templates, and the name its result is saved under (or None)."""

    tool: str
    args: dict[str, str]
    save: str | None = None


@dataclass
class Sop:
    """A named sequence of steps and the template of the final answer."""

    name: str
    steps: list[SopStep]
    answer: str
    source: str = "<sop>"


def fields(template: str) -> list[str]:
    """The names a template refers to ("{question} at {time}" -> ["question", "time"])."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as e:
        raise SopError(f"not a valid template {template!r}: {e}") from None


def parse_sop(data, source: str = "<sop>") -> Sop:
    """A Sop from parsed YAML; every error names `source` and the step."""
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
        raise SopError(f"{source}: an SOP is a mapping with a non-empty list 'steps'")
    unknown = set(data) - {"name", "steps", "answer", "description"}
    if unknown:
        raise SopError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; keys are name, steps, answer")
    steps = []
    for n, s in enumerate(data["steps"], 1):
        where = f"{source}: step {n}"
        if not isinstance(s, dict) or not isinstance(s.get("tool"), str):
            raise SopError(f"{where}: a step is a mapping with a 'tool' name, got {s!r:.100}")
        extra = set(s) - {"tool", "args", "save"}
        if extra:
            raise SopError(f"{where}: unknown key(s) {', '.join(sorted(extra))}; keys are tool, args, save")
        args = s.get("args") or {}
        if not isinstance(args, dict):
            raise SopError(f"{where}: args must be a mapping of argument name to template, got {args!r:.100}")
        save = s.get("save")
        if save is not None and (not isinstance(save, str) or not save.isidentifier()):
            raise SopError(f"{where}: save must be a name (letters, digits, _), got {save!r}")
        steps.append(SopStep(s["tool"], {str(k): str(v) for k, v in args.items()}, save))
    answer = data.get("answer") or "{_last}"
    return Sop(str(data.get("name", Path(source).stem)), steps, str(answer), source)


def load_sop(path: str | Path) -> Sop:
    """Read and check an SOP YAML file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SOP file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SopError(f"{path}: not valid YAML ({e})") from None
    return parse_sop(data, str(path))


def check(sop: Sop, tools: dict[str, Tool], inputs: dict) -> None:
    """Before running: every tool exists and every template names an input or an earlier step's result."""
    known = set(inputs) | {"_last"}
    for n, s in enumerate(sop.steps, 1):
        where = f"{sop.source}: step {n}"
        if s.tool not in tools:
            raise SopError(f"{where}: no tool {s.tool!r}; the tools here are: {', '.join(tools) or 'none'}")
        for arg, template in s.args.items():
            for f in fields(template):
                if f not in known:
                    raise SopError(f"{where}: argument {arg!r} uses {{{f}}}, which is neither an input "
                                   f"({', '.join(sorted(inputs)) or 'none'}) nor saved by an earlier step")
        if s.save:
            known.add(s.save)
    for f in fields(sop.answer):
        if f not in known:
            raise SopError(f"{sop.source}: the answer uses {{{f}}}, which no step saves")


def run_sop(sop: Sop, tools: dict[str, Tool], inputs: dict) -> Iterator[Event]:
    """Run the steps in order; events action / observation per step, then final (or error and stop)."""
    values = {k: "" if v is None else str(v) for k, v in inputs.items()}
    check(sop, tools, values)
    for n, s in enumerate(sop.steps, 1):
        args = {k: t.format(**values) for k, t in s.args.items()}
        yield Event("action", s.tool, n, {"input": args})
        try:
            result = tools[s.tool](args)
        except (ToolError, ValueError, OSError) as e:
            yield Event("error", f"step {n} ({s.tool}): {e}", n)
            yield Event("stop", f"step {n} failed", n, {"reason": "error"})
            return
        yield Event("observation", result, n)
        values["_last"] = result
        if s.save:
            values[s.save] = result
    yield Event("final", sop.answer.format(**values), len(sop.steps))

"""ReAct (Yao et al. 2022): the model thinks, calls a tool, reads the observation, and repeats until it gives a final
answer. The model is any chat callable, messages -> text or an iterator of text pieces; its replies are parsed
forgivingly, and every step comes out as an `Event` while it happens.

    Thought: I need the transcript first.
    Action: transcribe
    Action Input: {"audio": "question.wav"}
    Observation: what colour is the star        <- written by the agent, never by the model
    ...
    Final Answer: yellow

The conversation: a system message with the tools and the format (mm.data.react_episodes: the full prompt, or the
brief one that small models read and the shipped model was trained on), the task as the first user message, then each
model reply (cut before any "Observation:" the model invents) as an assistant message and its observation as the next
user message. Stops at a final answer, after `max_steps` model replies, or once `max_seconds` have passed (checked
between calls; a call under way is not interrupted).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from mm.agent.tools import Tool, ToolError, describe
from mm.data.react_episodes import SYSTEM, brief_system

BRIEF_BELOW = 2048  # a model whose context window is shorter reads the brief system prompt (`for_model`)
MAX_STEPS, MAX_SECONDS = 8, 120.0  # model replies and seconds an agent gets by default (`mm agent`, the chat's tab)
MAX_NEW_TOKENS = 128  # tokens per model reply: a thought, an action and its input

_FIELD = re.compile(r"^\s*(Thought|Action Input|Action|Observation|Final Answer)\s*:", re.I | re.M)
_NAMES = {"thought": "thought", "action": "action", "action input": "input", "observation": "observation",
          "final answer": "final"}


@dataclass
class Step:
    """What one model reply says: a thought, and either an action with its input or a final answer. `error` says
    what was wrong with a reply that has neither (or an action without a name)."""

    thought: str = ""
    action: str | None = None
    action_input: str | None = None
    final: str | None = None
    error: str | None = None


@dataclass
class Event:
    """One thing that happened: kind is text (a piece of the model's reply as it streams), thought, action,
    observation, error, final or stop; step counts model replies from 1."""

    kind: str
    text: str
    step: int
    data: dict = field(default_factory=dict)


def parse(text: str) -> Step:
    """A model reply -> Step. Forgiving: field names in any case, text before the first field taken as the thought,
    "Action: tool(args)" and "Action: tool[args]" forms, code fences around the input, anything after an invented
    "Observation:" dropped; whichever of action and final answer comes first wins."""
    fields, first = {}, None
    matches = list(_FIELD.finditer(text))
    for k, m in enumerate(matches):
        name = _NAMES[m.group(1).lower()]
        if name == "observation":  # the model wrote an observation of its own: everything from here is invented
            break
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        fields.setdefault(name, text[m.end():end].strip())
        if name in ("action", "final") and first is None:
            first = name
    head = text[:matches[0].start()] if matches else text
    step = Step(thought=fields.get("thought", head.strip()))
    if first == "final" or (first is None and "final" in fields):
        step.final = fields["final"]
        return step
    if first != "action":
        step.error = ("no Action and no Final Answer in the reply; answer with 'Action:' and 'Action Input:' lines, "
                      "or with 'Final Answer:'")
        return step
    action = fields["action"].split("\n")[0].strip().strip("`'\"*").strip()
    inline = re.fullmatch(r"([\w.-]+)\s*[\(\[](.*)[\)\]]", action, re.S)
    if inline:
        action, step.action_input = inline.group(1), inline.group(2).strip()
    if not action:
        step.error = "the Action line names no tool"
        return step
    step.action = action
    if "input" in fields:
        step.action_input = _unfence(fields["input"])
    return step


def _unfence(text: str) -> str:
    """The inside of a code fence that opens the text (anything after the fence dropped), else the text."""
    m = re.match(r"```\w*\s*(.*?)\s*```", text.strip(), re.S)
    return (m.group(1) if m else text).strip()


def arguments(text: str | None):
    """Action Input text -> a dict (a JSON object, even with text after it), a bare value (a JSON string or number,
    or the plain text), or None."""
    if text is None or not text.strip():
        return None
    text = text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if text.startswith("{"):  # a JSON object followed by chatter: the object
            try:
                return json.JSONDecoder().raw_decode(text)[0]
            except json.JSONDecodeError:
                pass
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return text[1:-1]
        return text
    return value if isinstance(value, (dict, str, int, float)) else text


def call_tool(tools: dict[str, Tool], step: Step) -> str:
    """The observation for an action: the tool's result, or what went wrong (unknown tool, bad arguments, the tool's
    own error) so that the model can correct itself."""
    tool = tools.get(step.action) or next((t for n, t in tools.items() if n.lower() == step.action.lower()), None)
    if tool is None:
        return f"Error: there is no tool {step.action!r}; the tools are: {', '.join(tools)}"
    try:
        return tool(arguments(step.action_input))
    except ToolError as e:
        return f"Error: {e}"
    except (ValueError, OSError) as e:  # the tool's own clear errors (a missing file, an unreadable image...)
        return f"Error: {tool.name} failed: {e}"


class ReAct:
    """The loop over a chat callable and tools; `stream(task)` yields Events, `run(task)` returns the final answer."""

    def __init__(self, chat: Callable[[list[dict]], str | Iterable[str]], tools: dict[str, Tool],
                 max_steps: int = MAX_STEPS, max_seconds: float = MAX_SECONDS, clock: Callable[[], float] = time.monotonic, brief: bool = False):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.chat, self.tools, self.max_steps, self.max_seconds, self.clock = chat, tools, max_steps, max_seconds, clock
        self.brief = brief

    def system(self) -> str:
        """The system message: the tools and the format (brief: the tools' signatures and one line of format)."""
        if self.brief:
            return brief_system([t.signature() for t in self.tools.values()])
        params = next(iter(self.tools.values())).params if self.tools else {}  # the first tool's, as the example
        example = json.dumps(dict.fromkeys(params, "..."))
        return SYSTEM.format(tools=describe(self.tools), names=", ".join(self.tools), example=example)

    def stream(self, task: str) -> Iterator[Event]:
        """Events as they happen, ending with one `final` or `stop` event."""
        start = self.clock()
        messages = [{"role": "system", "content": self.system()}, {"role": "user", "content": task}]
        for n in range(1, self.max_steps + 1):
            if self.clock() - start > self.max_seconds:
                yield Event("stop", f"time limit of {self.max_seconds:g} s reached", n, {"reason": "time"})
                return
            reply = ""
            pieces = self.chat(messages)
            for piece in [pieces] if isinstance(pieces, str) else pieces:
                reply += piece
                yield Event("text", piece, n)
            step = parse(reply)
            if step.thought:
                yield Event("thought", step.thought, n)
            if step.final is not None:
                yield Event("final", step.final, n)
                return
            messages.append({"role": "assistant", "content": _kept(reply)})
            if step.error:
                observation = f"Error: {step.error}"
                yield Event("error", step.error, n)
            else:
                yield Event("action", step.action, n, {"input": step.action_input})
                if self.clock() - start > self.max_seconds:
                    yield Event("stop", f"time limit of {self.max_seconds:g} s reached", n, {"reason": "time"})
                    return
                observation = call_tool(self.tools, step)
            yield Event("observation", observation, n)
            messages.append({"role": "user", "content": f"Observation: {observation}"})
        yield Event("stop", f"no final answer after {self.max_steps} steps", self.max_steps, {"reason": "steps"})

    def run(self, task: str) -> tuple[str | None, list[Event]]:
        """(the final answer or None, all events but the streamed text pieces)."""
        events = [e for e in self.stream(task) if e.kind != "text"]
        return (events[-1].text if events[-1].kind == "final" else None), events


def _kept(reply: str) -> str:
    """The reply up to any observation the model wrote itself."""
    m = re.search(r"^\s*Observation\s*:", reply, re.I | re.M)
    return (reply[:m.start()] if m else reply).rstrip()


def for_model(model, tools: dict[str, Tool], max_steps: int = MAX_STEPS, max_seconds: float = MAX_SECONDS,
              max_new_tokens: int = MAX_NEW_TOKENS, prompt: str = "auto") -> ReAct:
    """The agent over one of our chat models; prompt 'auto' gives models with a context under BRIEF_BELOW tokens
    (the shipped model: 1024) the brief system prompt, others the full one ('brief', 'full': as said)."""
    if prompt not in ("auto", "brief", "full"):
        raise ValueError(f"prompt must be auto, brief or full, got {prompt!r}")
    config = getattr(model, "config", None)
    context = getattr(getattr(config, "text", config), "max_position_embeddings", None)  # None: not known (a server)
    brief = prompt == "brief" or (prompt == "auto" and context is not None and context < BRIEF_BELOW)
    return ReAct(lambda messages: model.chat(messages, stream=True, max_new_tokens=max_new_tokens), tools, max_steps,
                 max_seconds, brief=brief)

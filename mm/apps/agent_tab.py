"""The chat's "agent" tab: a task, and optionally an image and an audio file it is about, handed to a ReAct agent
over the chat's model and tools (calculator; caption, ask_image and transcribe when the model has them; search over
`mm chat --docs-db` once it holds documents). Every step shows as it happens, in the order the agent works:

    user        what colour is the star?\\nFiles: image1 = scene.png   the task as the agent reads it (`files_line`)
    step 1 ...  Thought: I should look.\\nAction: ask_image\\n...     the model's reply as it streams, folded once read
    Thought: I should look.
    Action: ask_image\\nAction Input: {"image": "...", "question": "what colour is the star?"}
    Observation: red                                                what the tool returned (the model reads it next)
    step 2 ...
    Final Answer: red

A reply the agent cannot read, the step or time limit, and a failure of the model show as messages starting with
ERROR_MARK. Uploads pass the chat's own checks (size, type, readable, audio length) before the agent starts.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable, Iterator

from mm.agent.react import MAX_NEW_TOKENS, MAX_SECONDS, MAX_STEPS, Event, for_model
from mm.apps.agent import build_tools
from mm.data.react_episodes import attachments, files_line

ERROR_MARK = "⚠️"  # starts every reply that says what went wrong, in this tab and the chat's (mm.apps.chat)
STEP_CAP, SECONDS_CAP = 32, 600.0  # the most a user may ask for: one run holds the app's one model
SAID = {"thought": "Thought: ", "final": "Final Answer: ", "stop": f"{ERROR_MARK} stopped: "}  # shown as they are

log = logging.getLogger(__name__)


class Transcript:
    """The chatbot's messages for one run, grown event by event (`add`): the task, then per step a folded "step N"
    message holding the model's reply as it streams (pending while it streams, done once read) and one message for
    each of thought, action, observation, error, final answer and stop."""

    def __init__(self, task: str):
        self.messages: list[dict] = [{"role": "user", "content": task}]
        self.error = None  # the last unreadable reply's error: the observation that repeats it is not shown
        self.streamed = 0  # the last step whose reply had text

    def say(self, text: str) -> None:
        """An assistant message of its own (and the streaming reply, if any, marked done)."""
        self.done()
        self.messages.append({"role": "assistant", "content": text})

    def done(self) -> None:
        """Mark the reply streaming into the last message (if any) as read."""
        meta = self.messages[-1].get("metadata") or {}
        if meta.get("status") == "pending":
            meta["status"] = "done"

    def add(self, e: Event) -> None:
        """Show one event of `ReAct.stream`."""
        if e.kind == "text":
            last = self.messages[-1]
            if (last.get("metadata") or {}).get("id") != f"step {e.step}":
                self.done()
                last = {"role": "assistant", "content": "",
                        "metadata": {"title": f"step {e.step}: the model's reply", "id": f"step {e.step}",
                                     "status": "pending"}}
                self.messages.append(last)
            last["content"] += e.text
            self.streamed = e.step if e.text.strip() else self.streamed
        elif e.kind in SAID:
            self.say(SAID[e.kind] + e.text)
        elif e.kind == "action":
            given = e.data.get("input")
            self.say(f"Action: {e.text}" + ("" if given is None else f"\nAction Input: {given}"))
        elif e.kind == "error":
            self.error = e.text
            reason = f"the reply cannot be used: {e.text}" if self.streamed == e.step else "the model's reply is empty"
            self.say(f"{ERROR_MARK} step {e.step}: {reason}")
        elif e.kind == "observation":
            if self.error is not None and e.text == f"Error: {self.error}":  # told to the model, shown just above
                self.done()
            else:
                self.say(f"Observation: {e.text}")
            self.error = None

    def snapshot(self) -> list[dict]:
        """The messages as they are now (a copy: later events do not change what was handed out)."""
        return copy.deepcopy(self.messages)


def _path(upload) -> str | None:
    """A file path from what Gradio hands over (a path, a file object, a FileData dict) or None."""
    if upload is None or upload == "":
        return None
    if isinstance(upload, dict):
        return upload.get("path")
    return str(getattr(upload, "name", upload))


def make_run(model, check: Callable[[str], str | None], kind: Callable[[str], str | None],
             docs_db: str | Path | None = None, max_new_tokens: int = MAX_NEW_TOKENS):
    """The tab's handler `run(task, image, audio, max_steps, max_seconds)` -> iterator of the chatbot's messages.

    `check(path)` says why an upload cannot be used (the chat's `check_file` with its limits) and `kind(path)` is
    "image", "audio" or None; problems are messages starting with ERROR_MARK, never exceptions."""
    def run(task: str, image=None, audio=None, max_steps: float = MAX_STEPS,
            max_seconds: float = MAX_SECONDS) -> Iterator[list[dict]]:
        """Stream the agent's steps on `task` (about the uploaded image and audio)."""
        task = (task or "").strip()
        image, audio = _path(image), _path(audio)
        shown = Transcript(files_line(task, image, audio))  # the task as the agent reads it: file names, no folders
        problems = [] if task else ["The task is empty: type what the agent should do."]
        if max_steps is None or not 1 <= max_steps <= STEP_CAP or max_steps != int(max_steps):
            problems.append(f"The step limit must be a whole number from 1 to {STEP_CAP}, got {max_steps}.")
        if max_seconds is None or not 0 < max_seconds <= SECONDS_CAP:
            problems.append(f"The time limit must be over 0 and at most {SECONDS_CAP:g} s, got {max_seconds}.")
        for slot, path in (("image", image), ("audio", audio)):
            if path:
                problem = check(path)
                if problem is None and kind(path) != slot:
                    problem = f"{Path(path).name} is given as the {slot} but is not an {slot} file"
                problems += [problem] if problem else []
        if problems:
            shown.say(f"{ERROR_MARK} " + "\n".join(problems))
            yield shown.snapshot()
            return
        yield shown.snapshot()
        try:
            db = docs_db if docs_db is not None and (Path(docs_db) / "chunks.sqlite").exists() else None
            tools = build_tools(model, db, attachments(image, audio))
            agent = for_model(model, tools, int(max_steps), float(max_seconds), max_new_tokens)
            for e in agent.stream(files_line(task, image, audio)):
                shown.add(e)
                yield shown.snapshot()
        except ValueError as e:  # a prompt past the context window, an unreadable file, ...
            hint = ("; the agent's prompt does not fit this model's context: start the chat with a model with a "
                    "longer context (mm chat --model DIR)") if "context window" in str(e) else ""
            shown.say(f"{ERROR_MARK} {e}{hint}")
            yield shown.snapshot()
        except Exception as e:  # the server must keep serving; the log has the traceback
            log.exception("agent failed")
            shown.say(f"{ERROR_MARK} The agent failed: {type(e).__name__}: {e}")
            yield shown.snapshot()

    return run


def tool_names(model, docs_db: str | Path | None) -> list[str]:
    """The tools the agent has, for the tab's text (search with a `docs_db`: the agent gets it once that holds
    documents)."""
    return list(build_tools(model, None)) + (["search"] if docs_db is not None else [])


def agent_tab(model, docs_db: str | Path | None = None, *, check: Callable[[str], str | None],
              kind: Callable[[str], str | None], max_new_tokens: int = MAX_NEW_TOKENS) -> None:
    """The chat's "agent" tab (inside a gr.Blocks): a task, an image and an audio file (optional), step and time
    limits, run and stop buttons, and the steps as a chatbot; `run` is the app's "/agent" endpoint."""
    import gradio as gr

    run = make_run(model, check, kind, docs_db, max_new_tokens)
    gr.Markdown("Give the agent a task, and if it is about an image or a recording, the file: the model thinks, "
                f"calls tools ({', '.join(tool_names(model, docs_db))}), reads what they return and answers. "
                "Each step shows as it happens; the folded \"step\" messages hold the model's own words.")
    task = gr.Textbox(label="task", placeholder="what is 17 * 23 + 4?", elem_id="agent-task")
    with gr.Row():
        image = gr.File(label="image (optional)", file_types=["image"], type="filepath", elem_id="agent-image")
        audio = gr.Audio(label="audio (optional)", sources=["upload", "microphone"], type="filepath",
                         elem_id="agent-audio")
    with gr.Row():
        max_steps = gr.Number(MAX_STEPS, label="step limit (model replies)", precision=0, minimum=1,
                              maximum=STEP_CAP, elem_id="agent-max-steps")
        max_seconds = gr.Number(MAX_SECONDS, label="time limit (s)", minimum=1, maximum=SECONDS_CAP,
                                elem_id="agent-max-seconds")
        start = gr.Button("run", variant="primary", elem_id="agent-run")
        stop = gr.Button("stop", elem_id="agent-stop")
    steps = gr.Chatbot(elem_id="agent-steps", render_markdown=False, height=520, label="steps")
    inputs = [task, image, audio, max_steps, max_seconds]
    runs = [start.click(run, inputs, steps, api_name="agent"),
            task.submit(run, inputs, steps, api_visibility="private")]
    stop.click(None, cancels=runs)

"""The ReAct training episodes (mm.data.react_episodes) are exactly what the agent loop shows the model and accepts
from it: replayed through `ReAct` with tools that check their arguments, every episode gives the same messages,
the same tool calls and its final answer; the brief system prompt names the shipped model's real tools; the
arithmetic of the calculator episodes agrees with the calculator tool."""
import json
import random

import pytest

from mm.agent.react import BRIEF_BELOW, ReAct, for_model
from mm.agent.tools import Tool, calculator, evaluate, model_tools, registry
from mm.data.react_episodes import SHIPPED_TOOLS, attachments, brief_system, episode, expression, files_line

WORDS = ("apple", "river", "stone", "x", "meeting", "notes")


def sample(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    return [episode(rng, WORDS, (f"what colour is the star{i}?", f"red{i}"), f"there is a star {i}.", f"heard {i}")
            for i in range(n)]


class Replay:
    """Tools and a chat model that replay one episode: the chat answers with the episode's assistant replies after
    checking that it was shown the episode's messages so far; each tool checks its arguments against the episode's
    Action Input and returns the recorded observation."""

    def __init__(self, conv: list[dict]):
        self.conv, self.turn, self.calls = conv, 0, []

    def chat(self, messages):
        k = [i for i, m in enumerate(self.conv) if m["role"] == "assistant"][self.turn]
        assert messages == self.conv[:k]
        self.turn += 1
        return self.conv[k]["content"]

    def tools(self) -> dict[str, Tool]:
        def make(signature: str) -> Tool:
            name, params = signature[:-1].split("(")
            names = [p.split(":")[0] for p in params.split(", ")]

            def fn(**kw):
                self.calls.append((name, kw))
                k = [i for i, m in enumerate(self.conv) if m["role"] == "assistant"][len(self.calls) - 1]
                sent = json.loads(self.conv[k]["content"].split("Action Input: ", 1)[1])
                assert kw == sent
                return self.conv[k + 1]["content"].removeprefix("Observation: ")
            return Tool(name, "", {n: str for n in names}, tuple(names), fn)
        return registry(*(make(s) for s in SHIPPED_TOOLS))


@pytest.mark.parametrize("conv", sample(60), ids=lambda c: c[1]["content"][:30])
def test_episode_replays_through_the_agent_loop(conv):
    replay = Replay(conv)
    agent = ReAct(replay.chat, replay.tools(), brief=True)
    answer, events = agent.run(conv[1]["content"])
    assert conv[0] == {"role": "system", "content": agent.system()}
    assert answer == conv[-1]["content"].split("Final Answer: ")[1]
    assert len(replay.calls) == sum(m["role"] == "user" for m in conv) - 1  # one call per observation
    assert [e.kind for e in events if e.kind in ("action", "error")] == ["action"] * len(replay.calls)


def test_every_kind_of_task_occurs_with_its_tool_sequence():
    seqs = {tuple(m["content"].split("Action: ")[1].split("\n")[0] for m in c if "Action: " in m["content"])
            for c in sample(200)}
    assert seqs == {("transcribe", "ask_image"), ("ask_image",), ("caption",), ("transcribe",), ("calculator",)}


def test_spoken_question_is_passed_on_as_heard_and_answered():
    conv = next(c for c in sample(100) if "transcribe" in c[2]["content"] and len(c) == 7)
    heard = conv[3]["content"].removeprefix("Observation: ")
    assert heard == "what colour is the star" + heard[len("what colour is the star"):]
    assert "?" not in heard  # the transcribe tool returns no punctuation
    assert json.loads(conv[4]["content"].split("Action Input: ")[1])["question"] == heard
    assert conv[-1]["content"].endswith("Final Answer: " + conv[5]["content"].removeprefix("Observation: "))


def test_files_are_named_on_their_own_line_and_passed_by_name():
    assert files_line("describe it.", "a.png", "b.wav") == "describe it.\nFiles: image1 = a.png; audio1 = b.wav"
    assert files_line("hi", audio="x.flac") == "hi\nFiles: audio1 = x.flac" and files_line("hi") == "hi"
    # the folder is not shown: the model's choices must not change with where a checkout or an upload lies
    assert files_line("hi", "/home/runner/work/mm/examples/a.png", "C:\\Users\\me\\b.wav") == \
        "hi\nFiles: image1 = a.png; audio1 = b.wav"
    assert attachments("a.png", "b.wav") == {"image1": "a.png", "audio1": "b.wav"}
    for conv in sample(50):
        for m in conv:
            if m["role"] == "assistant" and "Action Input: " in m["content"]:
                args = json.loads(m["content"].split("Action Input: ")[1])
                for kind in set(args) & {"image", "audio"}:  # the name the task gives the file
                    assert f"{kind}1 = " in conv[1]["content"].split("\nFiles: ")[1] and args[kind] == f"{kind}1"


def test_model_tools_take_a_files_name_or_a_path():
    class Model:
        modalities = ("image", "speech")
        caption = staticmethod(lambda path: f"caption of {path}")
        transcribe = staticmethod(lambda path: f"words of {path}")
        chat = staticmethod(lambda messages: f"answer about {messages[0]['content'][0]['image']}")

    tools = registry(*model_tools(Model(), attachments("/data/scene.png", "/data/q.wav")))
    assert tools["caption"]({"image": "image1"}) == "caption of /data/scene.png"
    assert tools["transcribe"]({"audio": " audio1 "}) == "words of /data/q.wav"
    assert tools["ask_image"]({"image": "image1", "question": "what?"}) == "answer about /data/scene.png"
    assert tools["caption"]({"image": "other.png"}) == "caption of other.png"  # a path stays a path


def test_calculator_episodes_agree_with_the_calculator():
    rng = random.Random(1)
    for _ in range(300):
        e, value = expression(rng)
        assert calculator({"expression": e}) == value
        assert evaluate(e) == int(value)


class Shipped:
    """Stands in for the shipped model where only its modalities and context matter."""
    modalities = ("image", "speech")

    class config:
        class text:
            max_position_embeddings = 1024


def test_brief_prompt_names_the_shipped_models_real_tools():
    tools = registry(calculator, *model_tools(Shipped()))
    assert tuple(t.signature() for t in tools.values()) == SHIPPED_TOOLS
    agent = for_model(Shipped(), tools)
    assert agent.brief and agent.system() == brief_system(SHIPPED_TOOLS)
    Shipped.config.text.max_position_embeddings = BRIEF_BELOW
    assert not for_model(Shipped(), tools).brief  # a longer context reads the full prompt
    assert for_model(Shipped(), tools, prompt="brief").brief
    with pytest.raises(ValueError, match="prompt must be auto, brief or full, got 'short'"):
        for_model(Shipped(), tools, prompt="short")

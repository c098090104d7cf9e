"""The chat's agent tab: a ReAct agent over a scripted model (its replies written here), each step shown in the
chatbot as it happens (the reply streaming into a folded "step" message, then thought, action, observation, final
answer), unreadable replies and limits shown as errors, uploads refused by the chat's own checks, and the served
app's "/agent" endpoint streaming the same messages."""
import socket
import time
from types import SimpleNamespace

import numpy as np
import soundfile as sf
from PIL import Image

from mm.apps.agent_tab import make_run
from mm.apps.chat import MB, check_file, file_kind

CALC = ['Thought: multiply first\nAction: calculator\nAction Input: {"expression": "17 * 23 + 4"}',
        "Thought: I know it\nFinal Answer: 395"]
UNREADABLE = "no Action and no Final Answer in the reply; answer with 'Action:' and 'Action Input:' lines, or with " \
             "'Final Answer:'"


class ScriptedModel:
    """A chat model that streams prepared replies in order (each in `pieces` parts) and records what it was shown;
    `caption`/`transcribe`/a plain `chat` (ask_image) give fixed answers, so the model's tools are there too."""

    config = SimpleNamespace(max_audio_seconds=1.0, max_position_embeddings=4096)  # a context for the full prompt
    modalities = ("image", "speech")

    def __init__(self, *replies, pieces: int = 3, seconds: float = 0.0):
        self.replies, self.pieces, self.seconds, self.seen = list(replies), pieces, seconds, []

    def chat(self, messages, stream=False, max_new_tokens=64):
        if not stream:  # ask_image
            return "red"
        self.seen.append([dict(m) for m in messages])  # a copy: the agent grows its list
        time.sleep(self.seconds)
        reply = self.replies[min(len(self.seen), len(self.replies)) - 1]
        size = max(1, -(-len(reply) // self.pieces))
        return iter([reply[i:i + size] for i in range(0, len(reply), size)])

    def caption(self, image):
        return "a red star"

    def transcribe(self, audio):
        return "what colour is the star"


def accept(path):
    return None


def step(n, text, status="done"):
    return {"role": "assistant", "content": text,
            "metadata": {"title": f"step {n}: the model's reply", "id": f"step {n}", "status": status}}


def say(text):
    return {"role": "assistant", "content": text}


def test_each_step_streams_into_the_chatbot():
    model = ScriptedModel(*CALC)
    shown = list(make_run(model, accept, file_kind)("what is 17 * 23 + 4?"))
    task = {"role": "user", "content": "what is 17 * 23 + 4?"}
    assert shown[0] == [task]
    # the first reply in three pieces, each snapshot the reply so far, pending
    cuts = [k * -(-len(CALC[0]) // 3) for k in (1, 2)] + [len(CALC[0])]
    for k, cut in enumerate(cuts, start=1):
        assert shown[k] == [task, step(1, CALC[0][:cut], "pending")]
    want = [task, step(1, CALC[0]), say("Thought: multiply first"),
            say('Action: calculator\nAction Input: {"expression": "17 * 23 + 4"}'),
            say("Observation: 395"),  # 17 * 23 + 4, by the calculator tool
            step(2, CALC[1]), say("Thought: I know it"), say("Final Answer: 395")]
    assert shown[4:7] == [want[:3], want[:4], want[:5]]
    assert [s[-1]["content"] for s in shown[7:10]] == ["Thought: I k", "Thought: I know it\nFinal", CALC[1]]
    assert shown[7][:-1] == want[:5] and shown[9][-1] == step(2, CALC[1], "pending")
    assert shown[-1] == want and len(shown) == 12
    # the model read the tools in the system message and the calculator's result as the next user message
    assert "calculator(expression: str)" in model.seen[0][0]["content"]
    assert "caption(image: str)" in model.seen[0][0]["content"] and "search(" not in model.seen[0][0]["content"]
    assert model.seen[1][-1] == {"role": "user", "content": "Observation: 395"}


def test_unreadable_replies_and_tool_errors_are_shown():
    model = ScriptedModel("The answer is probably 5.", "Action: multiply\nAction Input: 2, 3", "Final Answer: 5",
                          pieces=1)
    shown = list(make_run(model, accept, file_kind)("add 2 and 3"))[-1]
    assert shown[1:] == [
        step(1, "The answer is probably 5."), say("Thought: The answer is probably 5."),
        say(f"⚠️ step 1: the reply cannot be used: {UNREADABLE}"),  # the observation repeating it is not shown
        step(2, "Action: multiply\nAction Input: 2, 3"), say("Action: multiply\nAction Input: 2, 3"),
        say("Observation: Error: there is no tool 'multiply'; the tools are: calculator, caption, ask_image, "
            "transcribe"),
        step(3, "Final Answer: 5"), say("Final Answer: 5")]
    assert model.seen[1][-1] == {"role": "user", "content": f"Observation: Error: {UNREADABLE}"}  # told to the model


def test_an_empty_reply_is_said_to_be_empty():
    model = ScriptedModel("", "Final Answer: 4")
    shown = list(make_run(model, accept, file_kind)("what is 2 + 2?"))[-1]
    assert shown[1:] == [say("⚠️ step 1: the model's reply is empty"), step(2, "Final Answer: 4"),
                         say("Final Answer: 4")]
    assert model.seen[1][-2:] == [{"role": "assistant", "content": ""},
                                  {"role": "user", "content": f"Observation: Error: {UNREADABLE}"}]


def test_step_and_time_limits_stop_the_run():
    loop = 'Action: calculator\nAction Input: "1 + 1"'
    shown = list(make_run(ScriptedModel(loop, pieces=1), accept, file_kind)("loop", max_steps=2))[-1]
    assert [m["content"] for m in shown[1:]] == [loop, "Action: calculator\nAction Input: \"1 + 1\"",
                                                 "Observation: 2"] * 2 + ["⚠️ stopped: no final answer after 2 steps"]
    slow = ScriptedModel(loop, pieces=1, seconds=0.3)  # each reply takes 0.3 s: past the 0.1 s limit
    shown = list(make_run(slow, accept, file_kind)("loop", max_seconds=0.1))[-1]
    assert shown[1:] == [step(1, loop), say("Action: calculator\nAction Input: \"1 + 1\""),
                         say("⚠️ stopped: time limit of 0.1 s reached")]
    assert len(slow.seen) == 1


def test_files_go_to_the_task_as_mm_agent_gives_them(tmp_path, monkeypatch):
    """The tab and `mm agent` hand the agent one task text: "<task>\\nFiles: image1 = NAME; audio1 = NAME", the files'
    names without their folders (not the server's cache paths), as the chatbot shows them; the tools get the paths."""
    import mm
    from mm.apps.agent import run_agent

    image, audio = tmp_path / "scene.png", tmp_path / "question.wav"
    Image.new("RGB", (8, 8), "red").save(image)
    sf.write(audio, np.zeros(800, np.float32), 16000)
    script = ('Action: transcribe\nAction Input: {"audio": "%s"}' % audio, "Final Answer: red")
    model = ScriptedModel(*script)
    shown = list(make_run(model, accept, file_kind)("answer the question", str(image), str(audio)))[-1]
    asked = "answer the question\nFiles: image1 = scene.png; audio1 = question.wav"
    assert model.seen[0][1] == {"role": "user", "content": asked} and shown[0] == model.seen[0][1]
    assert say("Observation: what colour is the star") in shown  # the model's transcribe tool ran

    cli = ScriptedModel(*script)
    monkeypatch.setattr(mm, "load", lambda path=None: cli)
    assert run_agent(["answer the question", "--image", str(image), "--audio", str(audio)]) == 0
    assert cli.seen[0][1] == model.seen[0][1]
    assert run_agent(["answer the question", "--image", str(image)]) == 0
    assert cli.seen[-1][1]["content"] == "answer the question\nFiles: image1 = scene.png"


def test_uploads_are_refused_with_the_chats_checks(tmp_path):
    big, long, fake = tmp_path / "big.png", tmp_path / "long.wav", tmp_path / "notes.png"
    noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(big)  # about 120 kB: noise does not compress
    sf.write(long, np.zeros(32000, np.float32), 16000)  # 2 s, 64 kB
    fake.write_text("not an image\n")
    model = ScriptedModel(*CALC)
    run = make_run(model, lambda f: check_file(f, 0.1, 1.0), file_kind)
    size = big.stat().st_size / MB
    assert list(run("what is in the picture?", str(big), str(long))) == [[
        {"role": "user", "content": "what is in the picture?\nFiles: image1 = big.png; audio1 = long.wav"},
        say(f"⚠️ big.png is {size:.2f} MB, over the upload limit of 0.1 MB; upload a smaller file\n"
            "long.wav: 2.0 s is longer than the limit of 1 s")]]
    small = tmp_path / "small.wav"
    sf.write(small, np.zeros(1600, np.float32), 16000)
    refusals = {("", None): "The task is empty: type what the agent should do.",
                ("look", str(small)): "small.wav is given as the image but is not an image file",
                ("look", str(fake)): "notes.png: not an image file"}
    for (task, image), why in refusals.items():
        reply = list(run(task, image))[-1][-1]["content"]
        assert reply.startswith(f"⚠️ {why}"), reply
    assert list(run("x", max_steps=0))[-1][-1]["content"] == (
        "⚠️ The step limit must be a whole number from 1 to 32, got 0.")
    assert list(run("x", max_seconds=0))[-1][-1]["content"] == (
        "⚠️ The time limit must be over 0 and at most 600 s, got 0.")
    assert model.seen == []  # nothing reached the model


def test_search_over_the_documents_index(tmp_path):
    """With `mm chat --docs-db DIR`, the agent gets the search tool once DIR holds an index."""
    from mm.rag.index import Index

    db = tmp_path / "db"
    model = ScriptedModel('Action: search\nAction Input: {"query": "rocket launch", "k": 1}', "Final Answer: March 3",
                          pieces=1)
    run = make_run(model, accept, file_kind, docs_db=str(db))
    list(run("when is the launch?"))
    assert "search(" not in model.seen[0][0]["content"]  # no index yet
    (tmp_path / "notes.txt").write_text("The launch of the rocket is planned for March 3.")
    index = Index.open(db)
    index.add([tmp_path / "notes.txt"])
    index.close()
    model.seen.clear()
    shown = list(run("when is the launch?"))[-1]
    assert "search(query: str, k: int = 3)" in model.seen[0][0]["content"]
    observation = next(m["content"] for m in shown if m["content"].startswith("Observation:"))
    assert observation.startswith(f"Observation: [1] {tmp_path / 'notes.txt'} ")  # the source, then its location
    assert observation.endswith(": The launch of the rocket is planned for March 3.")


def test_a_model_error_is_a_message_not_a_crash():
    class TooShort(ScriptedModel):
        def chat(self, messages, stream=False, max_new_tokens=64):
            raise ValueError("the prompt has 900 tokens, past the context window of 512")

    shown = list(make_run(TooShort(), accept, file_kind)("what is 2 + 2?"))[-1]
    assert shown[-1]["content"] == ("⚠️ the prompt has 900 tokens, past the context window of 512; the agent's prompt "
                                    "does not fit this model's context: start the chat with a model with a longer "
                                    "context (mm chat --model DIR)")


# --------------------------------------------------------------------------------------------- the served app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_served_app_streams_the_agent(tmp_path):
    """`launch(...)` serves the agent tab's "/agent" endpoint: a client gets every step as it happens, and a too long
    recording is refused by the chat's limit (the model's max_audio_seconds)."""
    from gradio_client import Client, handle_file

    from mm.apps.chat import launch

    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(32000, np.float32), 16000)  # 2 s, over the model's 1 s
    model = ScriptedModel(*CALC)
    port = free_port()
    demo = launch(model, port=port, max_upload_mb=1, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        job = client.submit("what is 17 * 23 + 4?", None, None, 8, 120, api_name="/agent")
        job.result(timeout=60)
        # every snapshot the handler yields in-process arrives, in order (Gradio sends the content as text parts)
        want = list(make_run(ScriptedModel(*CALC), accept, file_kind)("what is 17 * 23 + 4?"))
        assert [[(m["role"], m["content"][0]["text"], m["metadata"]) for m in s] for s in job.outputs()] == [
            [(m["role"], m["content"], m.get("metadata")) for m in s] for s in want]
        assert want[-1][-1]["content"] == "Final Answer: 395"
        refused = client.predict("what is said?", None, handle_file(str(long)), 8, 120, api_name="/agent")
        assert [m["content"][0]["text"] for m in refused] == [
            "what is said?\nFiles: audio1 = long.wav", "⚠️ long.wav: 2.0 s is longer than the limit of 1 s"]
        assert len(model.seen) == 2  # the refused run never reached the model
    finally:
        demo.close()

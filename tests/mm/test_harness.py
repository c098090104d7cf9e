"""`mm eval --data`: figures on small JSONL files against values worked out by hand, few-shot prompts, bootstrap
intervals, clear errors on bad files, and the scorers' log-likelihoods against a direct forward pass."""
import json
import math
from pathlib import Path

import pytest
import torch

from mm.eval.harness import (DataError, bootstrap, build_prompt, evaluate, extract_choice, read_items, render,
                             run_harness)
from mm.eval.scorer import ChatLM, Prompt, TextLM


class Scripted:
    """A model whose reply to each question and log-likelihood of each option are written down in advance."""

    chat = True

    def __init__(self, replies: dict, logliks: dict | None = None):
        self.replies, self.logliks, self.prompts = replies, logliks or {}, []

    def key(self, prompt):
        return prompt.turns[-1][0].split("\n")[0]  # the question (first line of the rendered turn)

    def generate(self, prompt):
        self.prompts.append(prompt)
        return self.replies[self.key(prompt)]

    def loglikelihood(self, prompt, continuation):
        return self.logliks[self.key(prompt)][continuation], False


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(tmp_path, task, rows, replies, logliks=None, **kw):
    items = read_items(write_jsonl(tmp_path / f"{task}.jsonl", rows), task)
    return evaluate(Scripted(replies, logliks), items, task, resamples=200, **kw)


def figure(summary, name):
    return summary["figures"][name]["value"]


def test_short_qa_exact_match_and_token_f1_by_hand(tmp_path):
    rows = [{"question": "q1", "answer": "Red car"}, {"question": "q2", "answer": "red car"},
            {"question": "q3", "answer": ["blue", "navy"]}, {"question": "q4", "answer": "green"}]
    replies = {"q1": "the red car.", "q2": "big red car", "q3": "Navy", "q4": "yellow"}
    records, summary = run(tmp_path, "short-qa", rows, replies)
    # EM: q1 (articles, case, punctuation dropped) and q3 (second reference) match: 2 of 4
    assert figure(summary, "exact_match") == pytest.approx(50.0)
    # F1: q2 has precision 2/3, recall 1 -> 0.8; the others 1, 1, 0
    assert figure(summary, "token_f1") == pytest.approx(100 * (1 + 0.8 + 1 + 0) / 4)
    assert [r["token_f1"] for r in records] == pytest.approx([100, 80, 100, 0])


def test_long_qa_rouge_l_by_hand(tmp_path):
    rows = [{"question": "q1", "answer": "the cat lay on the mat"}, {"question": "q2", "answer": "the cat"}]
    replies = {"q1": "the cat sat on the mat", "q2": "a dog"}
    _, summary = run(tmp_path, "long-qa", rows, replies)
    # q1: longest common subsequence "the cat on the mat" = 5 of 6 words each side -> F = 5/6; q2: 0
    assert figure(summary, "rouge_l") == pytest.approx(100 * (5 / 6 + 0) / 2)


def test_choice_accuracy_by_extraction_and_by_log_likelihood(tmp_path):
    rows = [{"question": "q1", "choices": ["red", "yellow", "blue"], "answer": 1},
            {"question": "q2", "choices": ["white", "green"], "answer": "A"},
            {"question": "q3", "choices": ["one", "two", "three"], "answer": "three"},
            {"question": "q4", "choices": ["cat", "dog"], "answer": 0}]
    replies = {"q1": "B", "q2": "green", "q3": "I think the answer is (c)", "q4": "purple"}
    logliks = {"q1": {"red": -3.0, "yellow": -1.0, "blue": -2.0}, "q2": {"white": -0.5, "green": -2.0},
               "q3": {"one": -1.0, "two": -2.0, "three": -3.0}, "q4": {"cat": -0.1, "dog": -0.2}}
    records, summary = run(tmp_path, "choice", rows, replies, logliks)
    assert [r["pick"] for r in records] == [1, 1, 2, None]
    assert [r["pick_ll"] for r in records] == [1, 0, 0, 0]
    assert figure(summary, "accuracy") == pytest.approx(50.0)  # q1, q3 right
    assert figure(summary, "accuracy_ll") == pytest.approx(75.0)  # q1, q2, q4 right


def test_extract_choice_forms():
    choices = ["red", "yellow", "blue"]
    assert extract_choice("Yellow.", choices) == 1
    assert extract_choice("(c) because", choices) == 2
    assert extract_choice("A. red", choices) == 0
    assert extract_choice("the star is blue", choices) == 2
    assert extract_choice("red or blue", choices) is None  # names two options: picks none
    assert extract_choice("D", choices) is None  # a letter past the options
    assert extract_choice("a red one", choices) == 0  # "a" is an article here, not option A
    assert extract_choice("a", ["x", "y"]) is None


def test_caption_bleu4_by_hand(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    rows = [{"image": "a.png", "answer": "the cat sat on a mat"}, {"image": "b.png", "answer": "a dog runs fast today"}]
    items = read_items(write_jsonl(tmp_path / "c.jsonl", rows), "caption")
    captions = {str(tmp_path / "a.png"): "the cat sat on the mat", str(tmp_path / "b.png"): "a dog runs fast today"}
    model = Scripted({})
    model.generate = lambda p: model.prompts.append(p) or captions[p.images[-1]]
    _, summary = evaluate(model, items, "caption", resamples=50)
    # clipped n-gram matches / n-grams, summed over the corpus (6+5 words, same lengths as the references: no penalty):
    # 1-grams (5+5)/(6+5), 2-grams (3+4)/(5+4), 3-grams (2+3)/(4+3), 4-grams (1+2)/(3+2)
    expected = 100 * ((10 / 11) * (7 / 9) * (5 / 7) * (3 / 5)) ** 0.25
    assert figure(summary, "bleu4") == pytest.approx(expected, abs=1e-6)
    assert model.prompts[0].images == [str(tmp_path / "a.png")]
    assert model.prompts[0].turns[-1][0] == "<image>\ndescribe the image."


def test_asr_wer_and_cer_by_hand(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "b.wav").write_bytes(b"")
    rows = [{"audio": "a.wav", "answer": "what colour is the star", "id": "a"},
            {"audio": "b.wav", "answer": "two shapes", "id": "b"}]
    items = read_items(write_jsonl(tmp_path / "asr.jsonl", rows), "asr")
    hyps = {str(tmp_path / "a.wav"): "what color is star", str(tmp_path / "b.wav"): "two shapes here"}
    model = Scripted({})
    model.transcribe = lambda audio: hyps[audio]  # zero-shot, default prompt: the model's own transcribe
    _, summary = evaluate(model, items, "asr", resamples=50)
    # words: a has 1 substitution + 1 deletion of 5, b 1 insertion of 2 -> 3/7
    assert figure(summary, "wer") == pytest.approx(100 * 3 / 7)
    # characters: a drops "u" and "the " (5 of 23), b adds " here" (5 of 10) -> 10/33
    assert figure(summary, "cer") == pytest.approx(100 * 10 / 33)
    # with a prompt of one's own the model is asked through its chat
    model.generate = lambda p: hyps[p.audios[-1]].upper()
    records, _ = evaluate(model, items, "asr", template="transcribe this.", resamples=0)
    assert [r["prediction"] for r in records] == ["WHAT COLOR IS STAR", "TWO SHAPES HERE"]


def test_few_shot_prompt_takes_other_items_and_their_answers(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)]
    items = read_items(write_jsonl(tmp_path / "f.jsonl", rows), "short-qa")
    for i in range(5):
        p = build_prompt(items, i, "Question: {question}\nAnswer:", shots=3, seed=7)
        assert len(p.turns) == 4 and p.turns[-1] == (f"Question: q{i}\nAnswer:", None)
        shots = [u.split()[1] for u, _ in p.turns[:-1]]
        assert f"q{i}" not in shots and len(set(shots)) == 3
        assert all(a == "a" + u.split()[1][1:] for u, a in p.turns[:-1])  # each example with its own answer
        assert p == build_prompt(items, i, "Question: {question}\nAnswer:", shots=3, seed=7)  # reproducible
    # a base model reads it GPT-3 style: solved blocks, a blank line apart, the last one open
    text = TextLM.render(None, Prompt([("Question: q1\nAnswer:", "a1"), ("Question: q0\nAnswer:", None)]))
    assert text == "Question: q1\nAnswer: a1\n\nQuestion: q0\nAnswer:"
    with pytest.raises(ValueError, match="--shots 5 needs more than 5 items"):
        build_prompt(items, 0, "{question}", shots=5)


def test_few_shot_media_follow_the_turns(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"")
    rows = [{"image": n, "question": f"q{k}", "answer": f"a{k}"} for k, n in enumerate(("a.png", "b.png", "c.png"))]
    items = read_items(write_jsonl(tmp_path / "m.jsonl", rows), "short-qa")
    p = build_prompt(items, 2, "{question}", shots=2, seed=0)
    question_of = {"a.png": "q0", "b.png": "q1", "c.png": "q2"}
    assert [u.split("\n")[1] for u, _ in p.turns] == [question_of[Path(im).name] for im in p.images]
    assert p.turns[-1][0] == "<image>\nq2" and p.images[-1] == str(tmp_path / "c.png")
    assert all(u.startswith("<image>\n") for u, _ in p.turns)


def test_template_file_and_missing_field(tmp_path):
    items = read_items(write_jsonl(tmp_path / "t.jsonl", [{"question": "why?", "answer": "x"}]), "short-qa")
    assert render(items[0], "Q: {question} A:") == "Q: why? A:"
    with pytest.raises(DataError, match=r"t.jsonl:1: the template names field 'context'"):
        render(items[0], "{context} {question}", str(tmp_path / "t.jsonl"))


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_n():
    widths = []
    for n in (20, 200, 2000):
        values = [100.0 * (i % 10 < 3) for i in range(n)]  # 30% right
        mean = lambda ix: sum(values[i] for i in ix) / len(ix)  # noqa: E731
        lo, hi = bootstrap(mean, n, resamples=500, seed=1)
        assert lo <= 30.0 <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # a binomial proportion: the 95% interval is about 2 * 1.96 * sqrt(p(1-p)/n)
    assert widths[2] == pytest.approx(2 * 1.96 * 100 * math.sqrt(0.3 * 0.7 / 2000), rel=0.2)


@pytest.mark.parametrize("rows,task,message", [
    (['{"question": "q", "answer": "a"}', '{"question": "q", "answer": '], "short-qa", r"bad.jsonl:2: not valid JSON"),
    (['{"question": "q"}'], "short-qa", r"bad.jsonl:1: task short-qa needs field\(s\) answer"),
    (['[1, 2]'], "long-qa", r"bad.jsonl:1: expected a JSON object"),
    (['{"question": "q", "choices": ["x", "y"], "answer": "z"}'], "choice", r"bad.jsonl:1: answer 'z' is not"),
    (['{"question": "q", "choices": ["x"], "answer": 0}'], "choice",
     r"bad.jsonl:1: choices must be a list of at least two"),
    (['{"image": "nope.png", "answer": "a"}'], "caption", r"bad.jsonl:1: image 'nope.png' not found"),
    (['{"audio": "x.wav", "answer": "a"}'], "asr", r"bad.jsonl:1: audio 'x.wav' not found"),
    (['{"question": "q", "answer": 3}'], "short-qa", r"bad.jsonl:1: answer must be a string or a non-empty list"),
    (['{"audio": "bad.jsonl", "answer": "?!"}'], "asr", r"bad.jsonl:1: the transcript is empty after normalisation"),
    ([''], "asr", r"bad.jsonl: no items"),
])
def test_bad_files_name_file_and_line(tmp_path, rows, task, message):
    with pytest.raises(DataError, match=message):
        read_items(write_jsonl(tmp_path / "bad.jsonl", rows), task)


def test_cli_reports_missing_file_and_unknown_task(tmp_path, capsys):
    from mm.apps.cli import main

    assert main(["eval", "--data", str(tmp_path / "none.jsonl"), "--task", "short-qa"]) == 2
    assert "none.jsonl: no such data file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_harness(["--data", "x.jsonl", "--task", "summary"])


@pytest.fixture(scope="module")
def text_model():
    import mm
    from decoders.tokenizer import load_tokenizer
    from mm.assets import default_model_dir

    return TextLM(mm.load(default_model_dir()), load_tokenizer(default_model_dir()))


def test_text_loglikelihood_is_the_sum_over_the_continuation_tokens(text_model):
    tok, model = text_model.tokenizer, text_model.model
    prompt = Prompt([("the cat", None)])
    ctx, whole = tok.encode("the cat", bos=True), tok.encode("the cat sat down", bos=True)
    assert whole[:len(ctx)] == ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole]))[0].double(), -1)
    expected = sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))
    got, greedy = text_model.loglikelihood(prompt, "sat down")
    assert got == pytest.approx(expected, abs=1e-4)
    assert greedy == all(int(logp[t - 1].argmax()) == whole[t] for t in range(len(ctx), len(whole)))


def test_chat_loglikelihood_scores_the_reply_and_its_turn_end():
    import mm
    from mm.assets import example

    model = mm.load()
    scorer = ChatLM(model)
    prompt = Prompt([("<image>\nwhat colour is the star?", None)], images=[str(example("scene.png"))])
    reply = scorer.generate(prompt)
    inputs = model.processor()([{"role": "user", "content": prompt.turns[0][0]}], images=prompt.images)
    ctx = inputs["input_ids"][0].tolist()
    answer = model.tokenizer.encode(reply) + [model.tokenizer.eos_id]  # llava_v1: " ANSWER</s>"
    with torch.no_grad():
        out = model(torch.tensor([ctx + answer]), inputs["pixel_values"])
    logp = torch.log_softmax(out.logits[0].double(), -1)
    expected = sum(float(logp[len(ctx) + k - 1, t]) for k, t in enumerate(answer))
    got, greedy = scorer.loglikelihood(prompt, reply)
    assert got == pytest.approx(expected, abs=1e-3)
    assert greedy  # the model's own greedy reply is its argmax token by token
    other = "blue" if reply != "blue" else "red"
    assert scorer.loglikelihood(prompt, other)[0] < got

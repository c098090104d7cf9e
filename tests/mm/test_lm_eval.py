"""lm-evaluation-harness runs local task files on a tiny random Llama through our adapter; its log-likelihoods are
checked against a direct forward pass of our model."""
import json
import shutil

import lm_eval  # a development dependency
import pytest
import torch
from lm_eval.tasks import TaskManager

import mm.eval.lm_eval_adapter  # registers the model "mm"
from decoders import LlamaConfig, LlamaForCausalLM
from decoders.tokenizer import load_tokenizer
from mm.assets import default_model_dir

DOCS = [{"question": "the cat", "choices": ["sat down", "ran off", "is"], "answer": 0},
        {"question": "a red star", "choices": ["on the left", "big"], "answer": 1},
        {"question": "how many shapes", "choices": ["three", "two shapes", "one"], "answer": 2}]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A random 2-layer Llama in the Hugging Face format, with the shipped text model's sentencepiece tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok_file = default_model_dir() / "tokenizer.model"
    tok = load_tokenizer(tok_file)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)  # spread the logits so the choices differ clearly
    model.save_pretrained(path)
    shutil.copy(tok_file, path / "tokenizer.model")
    return path, LlamaForCausalLM.from_pretrained(path).eval(), tok


def direct_logprob(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | BOS context), summed over the continuation's tokens, from one forward pass."""
    ctx, whole = tok.encode(context, bos=True), tok.encode(context + continuation, bos=True)
    assert whole[:len(ctx)] == ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole]))[0].double(), -1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole)))


def write_task(tmp_path, name: str, body: str) -> TaskManager:
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tmp_path / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                           f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\n" + body)
    return TaskManager(include_path=str(tmp_path))


def test_multiple_choice_task_scores_match_our_forward(tiny_llama, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # the JSON file's Arrow copy
    path, model, tok = tiny_llama
    tasks = write_task(tmp_path, "mm_tiny_choice", "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
                       "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
                       "metric_list:\n  - metric: acc\n")
    out = lm_eval.simple_evaluate(model="mm", model_args=f"pretrained={path}", tasks=["mm_tiny_choice"],
                                  task_manager=tasks, log_samples=True, num_fewshot=0, bootstrap_iters=0)
    samples = sorted(out["samples"]["mm_tiny_choice"], key=lambda s: s["doc_id"])
    right = 0
    for doc, sample in zip(DOCS, samples):
        got = [r[0][0] for r in sample["resps"]]  # (logprob, greedy) per choice
        want = [direct_logprob(model, tok, doc["question"], " " + c) for c in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-4)
        right += max(range(len(want)), key=want.__getitem__) == doc["answer"]
    assert out["results"]["mm_tiny_choice"]["acc,none"] == pytest.approx(right / len(DOCS))


def test_rolling_loglikelihood_and_generation(tiny_llama):
    path, model, tok = tiny_llama
    lm = mm.eval.lm_eval_adapter.MMLM(pretrained=str(path))

    class Req:
        def __init__(self, *args):
            self.args = args

    text = "the cat sat on the mat"
    ids = [tok.bos_id] + tok.encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), -1)
    assert lm.loglikelihood_rolling([Req(text)], disable_tqdm=True)[0] == pytest.approx(
        sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids))), abs=1e-4)
    # longer than the 64-token window: every token still predicted once, so the sum grows with the text
    long_text = " ".join(["the cat sat on the mat"] * 20)
    assert len(tok.encode(long_text)) > 64
    long = lm.loglikelihood_rolling([Req(long_text)], disable_tqdm=True)[0]
    assert long < lm.loglikelihood_rolling([Req(" ".join(["the cat sat on the mat"] * 10))], disable_tqdm=True)[0]
    # greedy generation: the argmax token by token from our model, cut at the stop string
    prompt = tok.encode("the cat", bos=True)
    greedy = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            greedy.append(int(model(torch.tensor([greedy]))[0, -1].argmax()))
    text = tok.decode(greedy[len(prompt):])
    got = lm.generate_until([Req("the cat", {"until": [], "max_gen_toks": 8})], disable_tqdm=True)[0]
    assert got.lstrip(" ") == text.lstrip(" ")
    # the continuation keeps the space its first piece carries ("▁word" after "the cat" is " word")
    assert got.startswith(" ") == tok.id_to_token(greedy[len(prompt)]).startswith("\u2581")
    stop = text.strip()[:2]
    cut = lm.generate_until([Req("the cat", {"until": [stop], "max_gen_toks": 8})], disable_tqdm=True)[0]
    assert cut == got.split(stop)[0]

"""Hugging Face `tokenizer.json` directories (only that file, as most current Llama-architecture repositories ship)
against transformers' AutoTokenizer on the same directory: byte-level BPE (Llama 3 style, written by `tokenizers`)
and sentencepiece-style byte fallback (Llama 2 style, converted by transformers from a sentencepiece model)."""
import json
import shutil

import pytest
import sentencepiece as spm
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from decoders.stream_decoder import StreamDecoder
from decoders.tokenizer import TokenizerError, load_tokenizer
from decoders.tokenizer_json import JsonTokenizer

# Meta-Llama-3-Instruct's chat template (with <|end_of_text|> in the place of its bos <|begin_of_text|> test token)
LLAMA3_JINJA = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CORPUS = "Hello world. The cat sat on the mat. 東京は日本の首都です。 emoji 😀🎉 def f(x): return x * 2\n" * 50
TEXTS = ["Hello world", "東京は 😀🎉 naïve café", "def g(y):\n\treturn y * 2  # code", "Ünïcödé ß Ж 한국어 𐍈",
         "  two  spaces  ", "<|eot_id|> and <s> typed by a user", "x", ""]


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    d = tmp_path_factory.mktemp("bytelevel")
    (d / "c.txt").write_text(CORPUS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    tok.train([str(d / "c.txt")], trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1])
    fast.chat_template = LLAMA3_JINJA
    fast.save_pretrained(d / "model")
    eot = fast.convert_tokens_to_ids("<|eot_id|>")
    (d / "model" / "generation_config.json").write_text(json.dumps({"eos_token_id": [fast.eos_token_id, eot]}))
    return d / "model"


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory):
    d = tmp_path_factory.mktemp("metaspace")
    (d / "c.txt").write_text(CORPUS)
    spm.SentencePieceTrainer.train(input=str(d / "c.txt"), model_prefix=str(d / "sp"), vocab_size=400, model_type="bpe",
                                   byte_fallback=True, character_coverage=1.0, minloglevel=2)
    (d / "src").mkdir()
    shutil.copy(d / "sp.model", d / "src" / "tokenizer.model")
    (d / "src" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                                "eos_token": "</s>"}))
    transformers.AutoTokenizer.from_pretrained(d / "src").save_pretrained(d / "model")
    assert not (d / "model" / "tokenizer.model").exists()
    return d / "model"


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_ids_text_and_stream_equal_transformers(kind, request):
    path = request.getfixturevalue(kind)
    ours, ref = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    assert isinstance(ours, JsonTokenizer) and ours.vocab_size == len(ref)
    for text in TEXTS:
        ids = ours.encode(text, allowed_special="all")  # transformers parses special strings in text
        assert ids == ref(text, add_special_tokens=False).input_ids, text
        assert ours.decode(ids) == ref.decode(ids), text
        stream = StreamDecoder(ours)
        assert "".join(stream.push(i) for i in ids) + stream.flush() == ours.decode(ids), text
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)
    plain = ref("Hello", add_special_tokens=False).input_ids
    assert ours.encode("Hello", bos=True, eos=True) == [ref.bos_token_id] + plain + [ref.eos_token_id]


def test_special_strings_typed_by_users_stay_text(byte_level):
    tok = load_tokenizer(byte_level)
    eot = tok.token_to_id("<|eot_id|>")
    assert eot not in tok.encode("<|eot_id|>")
    assert tok.decode(tok.encode("<|eot_id|>")) == "<|eot_id|>"
    assert tok.encode("a<|eot_id|>b", allowed_special={"<|eot_id|>"}) == tok.encode("a") + [eot] + tok.encode("b")


def test_stop_ids_come_from_generation_config(byte_level):
    tok = load_tokenizer(byte_level)
    assert tok.stop_ids == {tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")}


def test_broken_tokenizer_json_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer.json: not a readable tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/tokenizer.model \(nor .*empty/tokenizer.json\)"):
        load_tokenizer(tmp_path / "empty")


def test_the_directorys_chat_template_gives_transformers_ids(byte_level):
    from decoders.chat_template import encode_chat

    tok, ref = load_tokenizer(byte_level), transformers.AutoTokenizer.from_pretrained(byte_level)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hello 😀 world "},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "東京は?"}]
    want = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert encode_chat(tok, messages, template=None) == list(want)
    with pytest.raises(ValueError, match="message 0 contains the special token text '<|eot_id|>'"):
        encode_chat(tok, [{"role": "user", "content": "fake <|eot_id|> turn"}], template=None)

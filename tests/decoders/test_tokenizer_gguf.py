"""The tokenizer stored in a GGUF file: ids equal llama.cpp's own tokenizer (llama-tokenize, built from the pinned
sdist) and transformers' GGUF tokenizer on the real SmolLM2-135M-Instruct file (byte-level BPE, pre-tokenizer
"smollm") and on its vocabulary under the other pre-tokenizers; a sentencepiece model trained here and written as a
GGUF (by this test, with gguf.GGUFWriter) gives the sentencepiece library's ids and llama.cpp's; `mm generate` runs
on a GGUF alone and prints what llama.cpp's llama-simple prints; bad files are refused by name and key."""
import subprocess

import gguf
import pytest
import torch
from sentencepiece import sentencepiece_model_pb2

from decoders import LlamaConfig, LlamaForCausalLM
from decoders.chat_template import encode_chat
from decoders.gguf import save_gguf
from decoders.tokenizer import TokenizerError, load_tokenizer
from decoders.tokenizer_gguf import GGUFTokenizer
from decoders.tokenizer_train import train_sentencepiece
from mm.apps.cli import main

from tests.decoders.test_gguf import smollm2_gguf  # noqa: F401  (the real model's fixture, shared)
from tests.decoders.test_tokenizer import CORPUS
from tests.mm.wheels import llama_cpp_build

TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "Le cœur a ses raisons que la raison ne connaît point. Größe, Straße und Übermut.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. ⅷ 𝔘",
    "Emoji 😀 🎉 🚀 and a family 👨‍👩‍👧.",
    "def f(x):\n\treturn x * 2  # a tab, two spaces\n\n\nclass A: pass   \n",
    "In 2024 we read 12345 images; 3.14159 per second, it's 'quoted', I'LL—go. $a+b<=c^d~e|f",
    "\u00a0no-break\u2003em\u3000ideographic \u200bzero-width",
    "\n\n  \t ",
    "",
]
SMOLLM_SPECIAL = ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "x<|im_end|>y <|endoftext|> z"]
SPM_SPECIAL = ["<s>a <image> b<sep>c </s>", "<image>\n<image> two", "x<sep><sep> y"]


def llama_tokenize(path, text: str, special: bool, bos: bool = False) -> list[int]:
    """llama.cpp's ids of text (read from a file byte for byte), parsing special tokens or not, BOS as the file says."""
    exe = llama_cpp_build() / "bin" / "llama-tokenize"
    src = path.parent / "llama_tokenize_input.txt"
    src.write_bytes(text.encode("utf-8"))
    flags = ([] if special else ["--no-parse-special"]) + ([] if bos else ["--no-bos"])
    out = subprocess.run([str(exe), "-m", str(path), "-f", str(src), "--ids", "--no-escape", "--log-disable", *flags],
                         capture_output=True, text=True, check=True).stdout
    return [int(i) for i in out.strip().splitlines()[-1].strip("[]").split(",") if i.strip()]


# ---------------------------------------------------------------------------------------- byte-level BPE (gpt2)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):  # noqa: F811
    """(our tokenizer, transformers' GGUF tokenizer, the file) for the real SmolLM2 GGUF."""
    import transformers

    d = tmp_path_factory.mktemp("smollm2_tok")
    (d / smollm2_gguf.name).symlink_to(smollm2_gguf)
    ref = transformers.AutoTokenizer.from_pretrained(d, gguf_file=smollm2_gguf.name)
    return GGUFTokenizer(d / smollm2_gguf.name), ref, d / smollm2_gguf.name


def test_smollm2_ids_equal_llama_cpp_and_transformers(smollm2):
    ours, ref, path = smollm2
    assert (ours.model, ours.pre, ours.add_bos) == ("gpt2", "smollm", False)
    for text in TEXTS + SMOLLM_SPECIAL:
        plain = ours.encode(text)  # special-token text typed by a user stays text
        parsed = ours.encode(text, allowed_special="all")
        assert plain == llama_tokenize(path, text, special=False), text
        assert parsed == llama_tokenize(path, text, special=True), text
        # transformers has no split regex for "smollm" and falls back to GPT-2's, which keeps " ⅷ" (a letter-number,
        # \p{N}) with its space; llama.cpp (and we) cut every \p{N} off first. ASCII digits end the same either way.
        same = "ⅷ" not in text
        assert (plain == ref.encode(text, add_special_tokens=False, split_special_tokens=True)) == same, text
        assert (parsed == ref.encode(text, add_special_tokens=False)) == same, text
        assert ours.encode(text, bos=True) == llama_tokenize(path, text, special=False, bos=True)  # no BOS: the file
        assert ours.decode(plain) == ours.decode(parsed) == ref.decode(parsed) == text
    assert ours.encode("<|im_end|>") != [2] and ours.encode("<|im_end|>", allowed_special={"<|im_end|>"}) == [2]


def test_smollm2_specials_and_chat_template_equal_transformers(smollm2):
    ours, ref, _ = smollm2
    assert ours.vocab_size == len(ref) == 49152
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert ours.stop_ids == {ref.convert_tokens_to_ids("<|im_end|>"), ref.convert_tokens_to_ids("<|endoftext|>")}
    assert ours.chat_template == ref.chat_template
    messages = [{"role": "user", "content": "What is 2+2? Answer in a word."},
                {"role": "assistant", "content": "Four."},
                {"role": "user", "content": "And 3+3, in émoji 🙂?"}]
    expected = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert encode_chat(ours, messages, template=None) == list(getattr(expected, "input_ids", expected))
    assert [ours.id_to_token(i) for i in ours.encode(" the")] == ["Ġthe"] and ours.token_to_id("Ġthe") == 260


def vocabulary_gguf(path, metadata: dict, **override) -> None:
    """A GGUF that llama.cpp opens for its vocabulary: a few llama.* keys, `metadata` and `override` (no tensors)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for add in (w.add_block_count, w.add_context_length, w.add_embedding_length, w.add_feed_forward_length,
                w.add_head_count):
        add(64)
    for key, (value, vtype, sub) in metadata.items():
        w.add_key_value(key, override.pop(key, value), vtype, sub_type=sub)
    for key, value in override.items():
        w.add_string(key, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


CODE = "x = [1, 2];\n    return it's\n\ny"  # splits differently under the default, gpt-2 and llama3 regexes


@pytest.mark.parametrize("pre", ["default", "gpt-2", "llama-bpe", "qwen2"])
def test_other_pre_tokenizers_equal_llama_cpp(smollm2, tmp_path, pre):
    """SmolLM2's vocabulary and merges under each pre-tokenizer's split regexes (digits, punctuation, spaces, case)."""
    ours, _, _ = smollm2
    path = tmp_path / f"{pre}.gguf"
    metadata = {**ours.metadata, "tokenizer.ggml.pre": (pre, gguf.GGUFValueType.STRING, None)}
    vocabulary_gguf(path, metadata)
    tok = GGUFTokenizer(path, metadata)  # the metadata just written, not read back (seconds per file)
    for text in TEXTS + SMOLLM_SPECIAL + [CODE]:
        assert tok.encode(text) == llama_tokenize(path, text, special=False), (pre, text)
        assert tok.decode(tok.encode(text)) == text
    family = {"default": 0, "gpt-2": 1, "llama-bpe": 2, "qwen2": 2}[pre]
    assert (tok.encode(CODE) == ours.encode(CODE)) == (family == 1)  # smollm splits as gpt-2 (plus single digits)


def test_digit_splits_equal_llama_cpp(tmp_path):
    """A small vocabulary with digit merges: Llama 3 (and llama.cpp's default) keeps up to 3 digits together, Qwen2 and
    SmolLM none, GPT-2 all."""
    tokens = ["1", "2", "3", "4", "a", "b", "Ġ", "12", "123", "1234", "Ġ1", "Ġ12", "ab"]
    merges = ["1 2", "12 3", "123 4", "Ġ 1", "Ġ1 2", "a b"]
    metadata = {"tokenizer.ggml.model": ("gpt2", gguf.GGUFValueType.STRING, None),
                "tokenizer.ggml.tokens": (tokens, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
                "tokenizer.ggml.token_type": ([1] * len(tokens), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
                "tokenizer.ggml.merges": (merges, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)}
    text, got = "1234 12ab 123", {}
    for pre in ("default", "gpt-2", "llama-bpe", "qwen2", "smollm"):
        path = tmp_path / f"{pre}.gguf"
        vocabulary_gguf(path, {**metadata, "tokenizer.ggml.pre": (pre, gguf.GGUFValueType.STRING, None)})
        got[pre] = [tokens[i] for i in GGUFTokenizer(path).encode(text)]
        assert [tokens[i] for i in llama_tokenize(path, text, special=False)] == got[pre], pre
    assert got["gpt-2"] == ["1234", "Ġ", "12", "ab", "Ġ", "123"]  # " 12" is one piece; "1 2" outranks "Ġ 1"
    assert got["llama-bpe"] == got["default"] == ["123", "4", "Ġ", "12", "ab", "Ġ", "123"]
    assert got["qwen2"] == got["smollm"] == ["1", "2", "3", "4", "Ġ", "1", "2", "ab", "Ġ", "1", "2", "3"]


# ---------------------------------------------------------------------------------------- sentencepiece (llama)


def spm_gguf(model_file, path) -> None:
    """Write a sentencepiece model's pieces, scores and types as a GGUF tokenizer (as llama.cpp's converter does)."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    kinds = {1: gguf.TokenType.NORMAL, 2: gguf.TokenType.UNKNOWN, 3: gguf.TokenType.CONTROL,
             4: gguf.TokenType.USER_DEFINED, 5: gguf.TokenType.UNUSED, 6: gguf.TokenType.BYTE}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([p.piece for p in proto.pieces])
    w.add_token_scores([p.score for p in proto.pieces])
    w.add_token_types([kinds[p.type] for p in proto.pieces])
    w.add_bos_token_id(proto.trainer_spec.bos_id)
    w.add_eos_token_id(proto.trainer_spec.eos_id)
    w.add_unk_token_id(proto.trainer_spec.unk_id)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    w.add_chat_template("{% for m in messages %}<s>[INST] {{ m['content'] }} [/INST]{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    """(sentencepiece processor, our tokenizer, a tiny random Llama GGUF carrying it, that model)."""
    d = tmp_path_factory.mktemp("spm_gguf")
    (d / "corpus.txt").write_text(CORPUS * 2, encoding="utf-8")
    sp = train_sentencepiece([d / "corpus.txt"], d, 480, "bpe", special_tokens=["<image>"],
                             user_defined_symbols=["<sep>"]).sp
    spm_gguf(d / "tokenizer.model", d / "tokenizer.gguf")
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=480, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                         rope_theta=500.0, max_position_embeddings=256))
    with torch.no_grad():  # wide weights: the top two logits stay apart, so greedy tokens are a clear choice
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    path = save_gguf(model.eval(), d / "tiny.gguf", "F32", tokenizer=GGUFTokenizer(d / "tokenizer.gguf"))
    return sp, load_tokenizer(path), path, model


def test_spm_ids_equal_sentencepiece_and_llama_cpp(spm):
    sp, ours, path, _ = spm
    assert isinstance(ours, GGUFTokenizer)
    assert (ours.model, ours.add_bos, ours.add_space_prefix) == ("llama", True, True)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == sp.encode(text) == llama_tokenize(path, text, special=False), text
        assert ours.encode(text, bos=True) == [1] + ids == llama_tokenize(path, text, special=False, bos=True)
        assert ours.decode(ids) == sp.decode(ids) == text
    assert any(sp.is_byte(i) for i in ours.encode(TEXTS[4]))  # byte fallback reached: 𝔘 is not in the corpus
    # control tokens parsed only when allowed; a user-defined one always; after either, llama.cpp starts a new
    # "▁"-prefixed run (sentencepiece does not, so only llama.cpp is the reference here)
    for text in SPM_SPECIAL:
        assert ours.encode(text) == llama_tokenize(path, text, special=False), text
        assert ours.encode(text, allowed_special="all") == llama_tokenize(path, text, special=True), text
        assert ours.decode(ours.encode(text, allowed_special="all")) == text
    assert ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3}
    assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.pad_id, ours.stop_ids) == (1, 2, 0, None, {2})


def test_spm_save_and_load_tokenizer(spm, tmp_path):
    _, ours, _, _ = spm
    again = load_tokenizer(ours.save(tmp_path))  # tmp_path/tokenizer.gguf: the tokenizer keys, no tensors
    assert (tmp_path / "tokenizer.gguf").is_file() and isinstance(again, GGUFTokenizer)
    for text in TEXTS + SPM_SPECIAL:
        assert again.encode(text, allowed_special="all") == ours.encode(text, allowed_special="all")
    assert again.chat_template == ours.chat_template and "[INST]" in again.chat_template


def test_mm_generate_runs_on_a_gguf_alone_as_llama_cpp_does(spm, capsys):
    """`mm generate --model tiny.gguf`: our greedy continuation of the prompt, with the GGUF's tokenizer, prints
    exactly what llama.cpp's llama-simple prints for the same file (it also shows the BOS piece "<s>")."""
    _, ours, path, _ = spm
    prompt = "The quick brown fox"
    assert main(["generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", "16"]) == 0
    body, summary = capsys.readouterr().out.rsplit("\n[", 1)
    exe = llama_cpp_build() / "bin" / "llama-simple"
    theirs = subprocess.run([str(exe), "-m", str(path), "-n", "16", prompt], capture_output=True, check=True).stdout
    assert theirs.decode("utf-8", errors="replace") == "<s> " + body + "\n"
    assert body.startswith(prompt) and len(body) > len(prompt) + 10  # a real continuation
    assert summary.startswith(f"prompt tokens: {len(ours.encode(prompt, bos=True))}, new tokens: ")


# ---------------------------------------------------------------------------------------- bad files


def test_bad_files_are_refused_by_name_and_key(spm, tmp_path):
    _, ours, _, _ = spm
    bare = tmp_path / "bare.gguf"
    vocabulary_gguf(bare, {})
    with pytest.raises(TokenizerError, match=r"bare\.gguf.*tokenizer\.ggml\.model is missing"):
        load_tokenizer(bare)
    tokens = ["a", "b", "ab"]
    gpt2 = {"tokenizer.ggml.model": ("gpt2", gguf.GGUFValueType.STRING, None),
            "tokenizer.ggml.tokens": (tokens, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
            "tokenizer.ggml.merges": (["a b"], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)}
    vocabulary_gguf(tmp_path / "pre.gguf", gpt2, **{"tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(TokenizerError, match=r"pre\.gguf: tokenizer\.ggml\.pre 'no-such-pre' is not a supported"):
        GGUFTokenizer(tmp_path / "pre.gguf")
    assert GGUFTokenizer(tmp_path / "pre.gguf", {**gpt2}).encode("abba") == [2, 1, 0]  # no pre: llama.cpp's default
    no_merges = {k: v for k, v in gpt2.items() if k != "tokenizer.ggml.merges"}
    with pytest.raises(TokenizerError, match=r"x\.gguf.*tokenizer\.ggml\.merges is missing"):
        GGUFTokenizer(tmp_path / "x.gguf", no_merges)
    with pytest.raises(TokenizerError, match=r"x\.gguf: tokenizer\.ggml\.model is 't5'"):
        GGUFTokenizer(tmp_path / "x.gguf", {**gpt2, "tokenizer.ggml.model": ("t5", gguf.GGUFValueType.STRING, None)})
    with pytest.raises(TokenizerError, match=r"x\.gguf: tokenizer\.ggml\.eos_token_id = 7 is outside"):
        GGUFTokenizer(tmp_path / "x.gguf", {**gpt2, "tokenizer.ggml.eos_token_id": (7, gguf.GGUFValueType.UINT32,
                                                                                      None)})
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(TokenizerError, match=r"junk\.gguf: not a readable GGUF file"):
        load_tokenizer(tmp_path / "junk.gguf")
    with pytest.raises(ValueError, match="the tokenizer has 480 tokens, the model's vocabulary 96"):
        save_gguf(LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2)), tmp_path / "m.gguf", tokenizer=ours)


class NoTokenizer:
    """Stands in for a tokenizer in save_gguf and writes none: a model file without tokenizer keys."""
    vocab_size = 480

    def write_metadata(self, writer):
        pass


def test_mm_generate_names_the_missing_tokenizer(spm, tmp_path, capsys):
    _, _, _, model = spm
    path = save_gguf(model, tmp_path / "untokenized.gguf", "F32", tokenizer=NoTokenizer())
    assert main(["generate", "--model", str(path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "untokenized.gguf" in err and "tokenizer.ggml.model is missing" in err, err


def test_mm_quantize_of_a_gguf_keeps_its_tokenizer(spm, tmp_path, capsys):
    """AWQ calibration text is tokenized with the GGUF's tokenizer, and the output directory carries it
    (tokenizer.gguf), so `mm generate` on the quantized directory encodes the prompt as on the file."""
    _, ours, path, _ = spm
    out = tmp_path / "q"
    assert main(["quantize", str(path), "--method", "awq", "--bits", "4", "--group-size", "32", "--calib-samples", "2",
                 "--calib-tokens", "16", "--skip", "lm_head", "--out", str(out)]) == 0
    assert isinstance(load_tokenizer(out), GGUFTokenizer) and (out / "tokenizer.gguf").is_file()
    capsys.readouterr()
    prompt = "The quick brown fox"
    assert main(["generate", "--model", str(out), "--prompt", prompt, "--max-new-tokens", "4"]) == 0
    assert f"prompt tokens: {len(ours.encode(prompt, bos=True))}, new tokens: 4" in capsys.readouterr().out

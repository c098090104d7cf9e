"""The LLaVA processor (placeholder expansion, several images, left padding, mismatches), templates, and captioning
(`caption`, `model.caption`, `run_caption`) against a greedy loop written here."""
import numpy as np
import pytest
import torch
from PIL import Image

from decoders.chat_template import encode_chat
from decoders.tokenizer import TiktokenTokenizer, llama3_special_tokens
from decoders.tokenizer_train import train_bpe_ranks
from encoders.image import ImageProcessor
from mm.apps.caption import run_caption
from mm.models.llava import DEFAULT_PROMPT
from mm.models.conversation import LLAVA_V1_SYSTEM, format_prompt
from mm.models.processor import LlavaProcessor
from mm.models.llava import LlavaForConditionalGeneration
from tests.mm.llava_fixtures import CORPUS, IMAGE_SIZE, make_our_llava


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_caption")
    make_our_llava(path, seed=3)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return LlavaForConditionalGeneration.from_pretrained(model_dir)


def images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (30 + 5 * i, 40, 3), dtype=np.uint8)) for i in range(n)]


def colour_images(n):
    """Plain colours: they differ more, after a random ViT, than noise images do."""
    sizes = [(40, 30), (30, 40), (28, 28), (50, 33)]
    return [Image.new("RGB", sizes[k], c) for k, c in enumerate(["black", "white", "red", "blue"][:n])]


def test_processor_expands_placeholders(model):
    tok, img, tpi = model.tokenizer, model.config.image_token_index, model.config.tokens_per_image()
    assert tpi == 4
    proc = model.processor()
    out = proc("USER: <image>\nWhat is this? <image> And this?", images(2))
    want = [tok.bos_id] + tok.encode("USER: ") + [img] * tpi + tok.encode("\nWhat is this? ") + [img] * tpi + tok.encode(" And this?")
    assert out["input_ids"].tolist() == [want]
    assert out["attention_mask"].tolist() == [[1] * len(want)]
    pix = ImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE)(images(2))
    assert torch.equal(out["pixel_values"], pix)


def test_processor_left_pads_a_batch(model):
    proc = model.processor()
    texts = ["<image>\nA long question about the boat on the lake?", "<image> <image>\nHi"]
    out = proc(texts, [images(1), images(2, seed=1)])  # one image list per prompt
    single = [proc(t, im)["input_ids"][0].tolist() for t, im in zip(texts, [images(1), images(2, seed=1)])]
    T = out["input_ids"].shape[1]
    for b, ids in enumerate(single):
        pad = T - len(ids)
        assert out["input_ids"][b, pad:].tolist() == ids
        assert out["attention_mask"][b].tolist() == [0] * pad + [1] * len(ids)
    assert max(len(s) for s in single) == T and min(len(s) for s in single) < T
    # the padded batch gives each prompt's own logits at its real positions
    with torch.no_grad():
        batch_logits = model(**out).logits
        for b, (t, im) in enumerate(zip(texts, [images(1), images(2, seed=1)])):
            one = proc(t, im)
            ref = model(**one).logits
            assert (batch_logits[b, T - ref.shape[1]:] - ref[0]).abs().max() < 1e-4


def test_processor_mismatch_errors(model):
    proc = model.processor()
    with pytest.raises(ValueError, match=r"2 '<image>' placeholder\(s\) .* but 1 image\(s\)"):
        proc("<image> and <image>", images(1))
    with pytest.raises(ValueError, match=r"1 '<image>' placeholder\(s\) .* but 0 image\(s\)"):
        proc("<image> alone")
    with pytest.raises(ValueError, match=r"prompt 1 has 1 '<image>' placeholder\(s\) but 2 image\(s\)"):
        proc(["<image> a", "<image> b"], [images(1), images(2)])


def test_llava_v1_and_llama3_templates(model, tmp_path):
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}]
    assert format_prompt(messages, "llava_v1") == f"{LLAVA_V1_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:"
    # Llama 3: without images the ids are exactly decoders' chat encoding; <image> expands in place
    specials = llama3_special_tokens(16)
    tok = TiktokenTokenizer(train_bpe_ranks(CORPUS, 300), special_tokens=specials)
    proc = LlavaProcessor(tok, ImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE), 999, 4, template="llama3")
    plain = [{"role": "user", "content": "What is it?"}]
    assert proc(plain)["input_ids"][0].tolist() == encode_chat(tok, plain, "llama3")
    with_image = proc(messages, images(1))["input_ids"][0].tolist()
    head = encode_chat(tok, [{"role": "user", "content": ""}], "llama3", add_generation_prompt=False)[:-1]
    assert with_image[:len(head) + 4] == head + [999] * 4
    assert tok.decode([t for t in with_image if t != 999]) == format_prompt(messages, "llama3").replace("<image>", "")


def greedy_caption(model, image, prompt, max_new_tokens):
    """The expected caption: the llava_v1 prompt built by hand, greedy argmax of full forward passes, until EOS."""
    tok, img = model.tokenizer, model.config.image_token_index
    ids = [tok.bos_id] + tok.encode(f"{LLAVA_V1_SYSTEM} USER: ") + [img] * 4 + tok.encode(f"\n{prompt} ASSISTANT:")
    pixels = ImageProcessor(size=IMAGE_SIZE, crop_size=IMAGE_SIZE)([image])
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + new]), pixels).logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            new.append(nxt)
    return tok.decode(new).strip(), len(new)


def test_caption_matches_greedy_loop(model):
    ims = colour_images(3)
    want = [greedy_caption(model, im, DEFAULT_PROMPT, 12) for im in ims]
    assert all(n > 0 for _, n in want)  # random weights still say something
    assert len({w for w, _ in want}) > 1  # and the image matters
    got = model.captions(ims, batch_size=2, max_new_tokens=12)
    assert got == [w for w, _ in want]
    assert model.caption(ims[1], max_new_tokens=12) == want[1][0]
    assert model.caption(ims[0], prompt="What color is it?", max_new_tokens=12) == \
        greedy_caption(model, ims[0], "What color is it?", 12)[0]


def test_caption_progress_bar(model, capsys):
    model.captions(images(3), batch_size=1, max_new_tokens=2)
    assert "captioning" in capsys.readouterr().err  # more than one batch: a bar
    model.captions(images(1), batch_size=1, max_new_tokens=2)
    assert "captioning" not in capsys.readouterr().err


def test_run_caption(model, model_dir, tmp_path, capsys):
    paths = []
    for k, im in enumerate(colour_images(4)[2:]):
        paths.append(str(tmp_path / f"im{k}.png"))
        im.save(paths[-1])
    assert run_caption([*paths, "--model", str(model_dir), "--max-new-tokens", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = [greedy_caption(model, Image.open(p), DEFAULT_PROMPT, 8)[0] for p in paths]
    assert lines == [f"{p}\t{w}" for p, w in zip(paths, want)]
    assert run_caption([paths[0], "--model", str(model_dir), "--prompt", "Where?", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == greedy_caption(model, Image.open(paths[0]), "Where?", 8)[0] + "\n"
    # streaming yields the same tokens as generate
    proc = model.processor()
    inputs = proc([[{"role": "user", "content": "<image>\nWhere?"}]], [Image.open(paths[0])])
    streamed = [int(t[0]) for t in model.stream_tokens(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=6,
                                                        eos_token_id=None)]
    generated = model.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=6, eos_token_id=None)
    assert streamed == generated[0, inputs["input_ids"].shape[1]:].tolist()
    with pytest.raises(FileNotFoundError, match="nope.png"):
        run_caption([str(tmp_path / "nope.png"), "--model", str(model_dir)])


def test_chat_equals_the_hand_built_greedy_caption_and_streams_it(model):
    image = images(1, seed=5)[0]
    want, _ = greedy_caption(model, image, "What is this?", 10)
    messages = [{"role": "user", "content": "<image>\nWhat is this?"}]
    assert model.chat(messages, images=[image], max_new_tokens=10) == want
    assert "".join(model.chat(messages, images=[image], max_new_tokens=10, stream=True)) == want
    assert "".join(model.caption(image, "What is this?", stream=True, max_new_tokens=10)) == want
    assert model.caption(image, "What is this?", max_new_tokens=10) == want
    with pytest.raises(ValueError, match="this LLaVA model has no speech encoder, so it cannot transcribe"):
        model.transcribe("speech.wav")

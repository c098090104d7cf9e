"""Parity of the ASR attention decoder with ESPnet's TransformerDecoder (random weights, real .pth format)."""
import pytest
import torch
from espnet2.asr.decoder.transformer_decoder import TransformerDecoder as EspnetDecoder

from decoders.asr_decoder import (
    ASRDecoderConfig,
    TransformerDecoder,
    add_sos_eos,
    convert_espnet_decoder_state_dict,
    label_smoothing_loss,
)
from decoders.checkpoint import CheckpointError, load_state_dict_strict, read_torch

V, D = 37, 48
CONF = {"attention_heads": 4, "linear_units": 96, "num_blocks": 2, "dropout_rate": 0.1}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random ESPnet decoder saved as an ESPnet model `.pth`, and ours loaded from that file."""
    torch.manual_seed(0)
    ref = EspnetDecoder(V, D, **CONF).eval()
    path = tmp_path_factory.mktemp("espnet") / "valid.acc.ave.pth"
    model_sd = {f"decoder.{k}": v for k, v in ref.state_dict().items()}
    model_sd["ctc.ctc_lo.weight"] = torch.randn(V, D)  # other parts of the model are ignored
    torch.save(model_sd, path)
    ours = TransformerDecoder(ASRDecoderConfig.from_espnet(CONF, V, D)).eval()
    load_state_dict_strict(ours, convert_espnet_decoder_state_dict(read_torch(path)), str(path))
    return ref, ours


def test_config_from_espnet_and_round_trip():
    cfg = ASRDecoderConfig.from_espnet(CONF, V, D)
    assert (cfg.n_heads, cfg.ffn_dim, cfg.n_layers, cfg.vocab_size, cfg.d_model) == (4, 96, 2, V, D)
    assert ASRDecoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="concat_after"):
        ASRDecoderConfig.from_espnet({"concat_after": True}, V, D)
    with pytest.raises(ValueError, match="kernel_size"):
        ASRDecoderConfig.from_espnet({"kernel_size": 3}, V, D)
    with pytest.raises(ValueError, match="divisible"):
        ASRDecoderConfig(vocab_size=V, d_model=50, n_heads=4)


def test_forward_matches_espnet_on_padded_batch(models):
    ref, ours = models
    torch.manual_seed(1)
    B, T, L = 3, 11, 7
    enc = torch.randn(B, T, D)
    enc_lengths = torch.tensor([11, 6, 9])
    ys = torch.randint(0, V, (B, L))
    ys_lengths = torch.tensor([7, 3, 5])
    with torch.no_grad():
        expected, _ = ref(enc, enc_lengths, ys, ys_lengths)
        got = ours(enc, enc_lengths, ys, ys_lengths)
    valid = torch.arange(L)[None, :] < ys_lengths[:, None]
    err = (expected - got)[valid].abs().max().item()
    assert err < 1e-4, err
    assert expected[valid].std() > 0.1  # a non-degenerate comparison


def test_incremental_step_matches_espnet_batch_score(models):
    ref, ours = models
    torch.manual_seed(2)
    N, T = 3, 9
    x = torch.randn(1, T, D)
    ys = torch.randint(0, V, (N, 6))
    states = [None] * N
    cache = ours.init_cache(x)
    with torch.no_grad():
        for i in range(1, 7):
            expected, states = ref.batch_score(ys[:, :i], states, x.expand(N, -1, -1))
            got, cache = ours.step(ys[:, i - 1: i], cache)
            assert (expected - got).abs().max().item() < 1e-4
        # feeding the whole prefix at once gives the same next-token log-probs
        got_all, _ = ours.step(ys, ours.init_cache(x))
        assert (expected - got_all).abs().max().item() < 1e-4
        # and equals ESPnet's single-hypothesis `score`
        one, _ = ref.score(ys[1], None, x[0])
        assert (one - got_all[1]).abs().max().item() < 1e-4


def test_cache_select_reorders_hypotheses(models):
    _, ours = models
    torch.manual_seed(3)
    x = torch.randn(1, 8, D)
    ys = torch.randint(0, V, (3, 4))
    with torch.no_grad():
        _, cache = ours.step(ys[:, :3], ours.init_cache(x))
        order = torch.tensor([2, 2, 0])
        got, _ = ours.step(ys[order, 3:], cache.select(order))
        expected, _ = ours.step(ys[order], ours.init_cache(x))
    assert (got - expected).abs().max().item() < 1e-5


def test_add_sos_eos_matches_espnet():
    from espnet.nets.pytorch_backend.transformer.add_sos_eos import add_sos_eos as ref_add

    ys = torch.tensor([[5, 6, 7, -1], [8, -1, -1, -1], [1, 2, 3, 4]])
    lengths = torch.tensor([3, 1, 4])
    ys_in, ys_out, ys_in_lengths = add_sos_eos(ys, lengths, sos=36, eos=36, ignore_id=-1)
    ref_in, ref_out = ref_add(ys, 36, 36, -1)
    assert torch.equal(ys_in, ref_in) and torch.equal(ys_out, ref_out)
    assert ys_in_lengths.tolist() == [4, 2, 5]


@pytest.mark.parametrize("normalize_length", [False, True])
def test_label_smoothing_loss_matches_espnet(normalize_length):
    from espnet.nets.pytorch_backend.transformer.label_smoothing_loss import LabelSmoothingLoss

    torch.manual_seed(4)
    logits = torch.randn(3, 5, V) * 3
    target = torch.randint(0, V, (3, 5))
    target[1, 2:] = -1
    target[2, 4] = -1
    ref = LabelSmoothingLoss(V, -1, 0.1, normalize_length)(logits, target)
    got = label_smoothing_loss(logits, target, 0.1, -1, normalize_length)
    assert abs(ref.item() - got.item()) < 1e-5 * max(1.0, abs(ref.item()))


def test_converter_and_loader_errors(models):
    ref, ours = models
    with pytest.raises(KeyError, match="decoder"):
        convert_espnet_decoder_state_dict({"encoder.x": torch.zeros(1)})
    sd = convert_espnet_decoder_state_dict({f"decoder.{k}": v for k, v in ref.state_dict().items()})
    sd["output_layer.weight"] = torch.zeros(V + 1, D)
    del sd["after_norm.bias"]
    with pytest.raises(CheckpointError, match=r"after_norm.bias.*output_layer.weight: expected \(37, 48\)"):
        load_state_dict_strict(TransformerDecoder(ours.cfg), sd, "model.pth")


def test_bad_inputs_are_named(models):
    _, ours = models
    with pytest.raises(ValueError, match="enc must be"):
        ours(torch.randn(1, 4, D + 1), torch.tensor([4]), torch.zeros(1, 2, dtype=torch.long), torch.tensor([2]))
    with pytest.raises(ValueError, match="enc_lengths"):
        ours(torch.randn(1, 4, D), torch.tensor([5]), torch.zeros(1, 2, dtype=torch.long), torch.tensor([2]))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 37\)"):
        ours(torch.randn(1, 4, D), torch.tensor([4]), torch.tensor([[1, -1]]), torch.tensor([2]))

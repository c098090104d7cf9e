"""FSDP2 and DDP over two gloo processes: the loss curve of one process on the same global batch, sharded checkpoints
that resume to the same next losses."""
import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from decoders import LlamaConfig, LlamaForCausalLM, next_token_loss
from mm.train.distributed import lr_factor, train

CFG = dict(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=32)
STEPS, BATCH, LENGTH, LR, WARMUP = 6, 8, 12, 1e-2, 2


def tiny_model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CFG))


def global_batches():
    g = torch.Generator().manual_seed(1)
    while True:
        yield torch.randint(0, CFG["vocab_size"], (BATCH, LENGTH), generator=g)


def reference_losses() -> list[float]:
    """One process, whole batches, the recipe's AdamW, schedule and clipping written out here."""
    model, batches = tiny_model(), global_batches()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    losses = []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = LR * lr_factor(step, STEPS, WARMUP)
        x = next(batches)
        loss = next_token_loss(model(x), x)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def worker(rank, world, port, ckpt, result):
    """One rank: FSDP2 for 3 steps with a checkpoint, FSDP2 resumed from it to the end, then DDP from the start."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    out = {}
    for name, strategy, stop_after in (("fsdp-first", "fsdp", 3), ("fsdp-resumed", "fsdp", None), ("ddp", "ddp", None)):
        model = tiny_model()
        full = sum(p.numel() for p in model.parameters())
        wrapped, losses = train(model, global_batches(), STEPS, strategy, LR, WARMUP,
                                checkpoint=ckpt if strategy == "fsdp" else None, stop_after=stop_after)
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in wrapped.parameters())
        out[name] = {"losses": losses, "local_params": local, "full_params": full}
        if name == "fsdp-first":  # keep the 3-step checkpoint for the one-process resume
            torch.distributed.barrier()
            if rank == 0:
                shutil.copytree(ckpt, ckpt + "-step3")
            torch.distributed.barrier()
    with open(f"{result}.{rank}", "w") as f:
        json.dump(out, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The results of each rank of one launch of two gloo processes, and the checkpoint directory."""
    tmp = tmp_path_factory.mktemp("dist")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ckpt, result = tmp / "ckpt", str(tmp / "result")
    mp.start_processes(worker, args=(2, port, str(ckpt), result), nprocs=2, start_method="spawn")
    return [json.loads(open(f"{result}.{r}").read()) for r in range(2)], ckpt


@pytest.fixture(scope="module")
def reference():
    return reference_losses()


def test_fsdp2_matches_one_process_and_resumes_from_its_sharded_checkpoint(runs, reference):
    (r0, r1), ckpt = runs
    first, resumed = r0["fsdp-first"], r0["fsdp-resumed"]
    assert first["losses"] == r1["fsdp-first"]["losses"]  # every rank logs the global mean
    assert first["losses"] == pytest.approx(reference[:3], rel=1e-5, abs=1e-6)
    assert resumed["losses"] == pytest.approx(reference[3:], rel=1e-5, abs=1e-6)  # steps 4-6 only: it resumed
    # each rank holds about half of every parameter (dim 0 split, the odd row on rank 0)
    local = [r["fsdp-first"]["local_params"] for r in (r0, r1)]
    assert sum(local) == first["full_params"] and max(local) < 0.55 * first["full_params"]
    shards = sorted(p.name for p in ckpt.glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"] and (ckpt / ".metadata").is_file()
    sizes = [(ckpt / s).stat().st_size for s in shards]
    assert min(sizes) > 0.4 * max(sizes)  # each rank wrote its own half


def test_ddp_matches_one_process(runs, reference):
    (r0, r1), _ = runs
    assert r0["ddp"]["losses"] == pytest.approx(reference, rel=1e-5, abs=1e-6)
    assert r0["ddp"]["local_params"] == r0["ddp"]["full_params"]  # a replica per rank


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_checkpoint_resumes_in_one_process(runs, reference):
    _, ckpt = runs
    step3 = ckpt.with_name("ckpt-step3")
    _, losses = train(tiny_model(), global_batches(), STEPS, "fsdp", LR, WARMUP, checkpoint=step3)  # no process group
    assert losses == pytest.approx(reference[3:], rel=1e-5, abs=1e-6)

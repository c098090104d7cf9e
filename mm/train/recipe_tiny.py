"""`mm train --recipe tiny`: the shipped multimodal model, trained from nothing on the project's own data.

Data (deterministic from the seed, nothing downloaded): procedural scenes with captions and questions
(`mm.data.scenes`, rendered afresh for every step: 48 px, one 16 px patch per grid cell), scene sentences spoken by
espeak-ng voices with noise (`mm.data.speech_data`, cached), and spoken questions about images. Every training row is
one chat turn of one of four tasks:
    caption      <image>\\ndescribe the image.           -> the scene's caption
    question     <image>\\nwhat colour is the star?      -> red       (then more questions about it, one per turn)
    transcribe   <audio>\\ntranscribe the audio.         -> the spoken sentence (lower case, no punctuation)
    spoken       <image><audio>                          -> the answer to the spoken question
A step trains on one task (rows of one task pad alike), the tasks taking turns in the order of `TASK_CYCLE`.

Stages (LLaVA's two, preceded by the encoders' own pretraining, which LLaVA takes from CLIP and Dolphin from ESPnet):
    0  the ViT alone learns to tell what is in each grid cell (`GridHead`, a training-only probe: shape, colour,
       size, row and column of each patch), on new scenes every step; on its first `speech_steps` steps the
       speech encoder and its CTC head learn to transcribe;
    1  decoder frozen; ViT, projector, speech encoder, CTC head and speech adapter learn to feed it;
    2  everything jointly.
In stages 1 and 2 the speech encoder keeps its CTC loss (`ctc_weight`) and the ViT its probe (`grid_weight`).
The decoder starts from random weights, as no pretrained Llama is at hand. It is not pretrained on the domain's
text either, and stage 1 is short: a decoder that first learns to answer from text alone, or adapters fitted to a
decoder that cannot read them yet, settle into answering from the language prior and ignoring the media tokens
(measured: the answer's distribution barely changes when the image is removed).

Runs under `torchrun --nproc_per_node N` with DistributedDataParallel (gloo on CPU, NCCL on GPU): each rank
draws its own rows, gradients are averaged, rank 0 logs, plots and saves. `out/checkpoint.pt` (written every
`save_every` steps and at the end of each stage) resumes an interrupted run where it stopped; batches and
dropout are seeded by (seed, step, rank), so a resumed run continues exactly as an uninterrupted one would.
Outputs in `out/`: the model directory `model/`, `train.log`, `losses.jsonl`, `loss.png`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from mm.data.scenes import lookup_phases
from mm.models.fusion import FusionModel
from mm.train.grid_probe import GridHead, vit_grid_loss
from mm.train.loop import adamw, plot_losses, save_atomic, schedule, weights_digest
from mm.train.tiny_data import (TASK_CYCLE, TASKS, ctc_targets, lookup_rows, make_data, padded, sample_batch,
                                scene_rows, transcribe_pool)
from mm.train.tiny_model import new_model, tokenizer_for, trainable


def parse_bool(text: str) -> bool:
    """1/true/yes or 0/false/no (any case); ValueError otherwise."""
    if text.lower() in ("1", "true", "yes", "0", "false", "no"):
        return text.lower() in ("1", "true", "yes")
    raise ValueError(text)


@dataclass
class TinyRecipe:
    """Sizes of data, model and schedule; the defaults make the shipped model (about 55 minutes on 2 CPU cores)."""

    seed: int = 0
    n_text: int = 4000  # scenes whose captions and questions make the tokenizer's corpus
    n_speech: int = 4000  # spoken captions and questions for transcription
    n_spoken: int = 3000  # images with a spoken question
    image_size: int = 48  # 3x3 grid of 16 px cells: one patch per cell
    patch_size: int = 16
    vocab_size: int = 384
    # Stage 1 is short: a decoder that has only read text cannot yet read image features, so there the ViT learns
    # from its grid loss and the speech encoder from CTC; the joint stage is where the decoder learns to read them.
    steps: tuple[int, int, int] = (3000, 100, 1800)  # stages 0, 1, 2
    lr: tuple[float, float, float] = (1e-3, 1e-3, 1e-3)
    batch: tuple[int, int, int, int] = (24, 32, 16, 16)  # rows per step of each task: caption, question, transcribe, spoken
    question_turns: int = 4  # questions asked about each image of a question row, one chat turn each
    grid_batch: int = 64  # stage 0 images per step (0: the ViT is not trained in stage 0)
    speech_steps: int = 300  # stage 0 steps that also train the speech encoder by CTC, `batch[2]` clips each
    ctc_weight: float = 0.3
    grid_weight: float = 0.5  # the ViT's auxiliary loss (GridHead) in stages 1 and 2
    save_every: int = 100
    # beyond the scene grammar (mm.train.tiny_data; all off in the shipped recipe)
    n_open: int = 0  # word sequences from a general English word list, spoken by training voices
    open_words: int = 0  # 0: from the whole list; N: from its words among the N most frequent (mm.data.words)
    n_silence: int = 0  # clips of silence and noise, transcribed as nothing
    open_share: float = 0.0  # of the transcribe rows, word sequences
    silence_share: float = 0.0  # of the transcribe rows, clips without speech
    pad_silence: float = 0.0  # seconds: quiet before and after each training clip, up to this (tiny_data.padded)
    specaug: bool = False  # SpecAugment masks on the speech encoder's features while training (tiny_model.SPEC_AUGMENT)
    cot_share: float = 0.0  # of the question turns, asked for the rationale first (COT_INSTRUCTION)
    agent_share: float = 0.0  # of the joint steps, ReAct tool-use episodes (mm.data.react_episodes), text only
    agent_batch: int = 8  # episodes per agent step
    read_share: float = 0.0  # of the joint steps, text-only rows (tiny_data.read_conversation), `batch[1]` each
    lookup_warmup: str = ""  # "DIRECTION:STEPS[:OBJECTS],...": the first joint steps, bare told lookups (tiny_data.lookup_rows)
    fresh_decoder: bool = False  # with `init`: the decoder starts again from random weights, the rest is init's
    context: int = 0  # the decoder's context window if not the init's (0: keep); episodes need about 620 tokens
    name: str = "tiny"  # the recipe's name on its plot
    init: str = ""  # a model directory to continue from (weights and tokenizer), e.g. the tiny recipe's `model/`
    # model (ignored with `init`: the model is the one in that directory)
    vit_dim: int = 128
    vit_depth: int = 4
    speech_dim: int = 128
    speech_blocks: int = 4
    llama_dim: int = 256
    llama_layers: int = 4

    @classmethod
    def open_vocab(cls, init: str) -> "TinyRecipe":
        """Issue 22's direction: the tiny recipe's model (`init`) trained on beyond the scene grammar. Stage 0 retrains
        the speech encoder by CTC on word sequences from a general English word list, scene sentences and clips
        without speech (and fits a new grid probe on the ViT); stage 2 trains everything jointly with rationale
        turns mixed into the questions. Made the shipped weights: about 1 h 55 min on the loaded 2-core CPU machine."""
        return cls(init=init, n_speech=6000, n_open=12000, n_silence=300, open_share=0.5, silence_share=0.05,
                   cot_share=0.25, steps=(2000, 0, 1500), lr=(1e-3, 1e-3, 5e-4), grid_batch=16, speech_steps=2000,
                   name="tiny-open")

    @classmethod
    def agent(cls, init: str) -> "TinyRecipe":
        """Issue 21's tool use: the tiny-open model (`init`) trained on in stage 2 only, with 30% of the steps
        ReAct episodes (transcribe, then ask_image; caption; calculator...) in the brief prompt its context now holds
        (1024 tokens), the other steps the tiny-open mix so that nothing is forgotten. The grid probe is not
        refitted (grid_weight 0): a fresh probe would only pull the ViT towards noise."""
        return dataclasses.replace(cls.open_vocab(init), steps=(0, 0, 1000), lr=(1e-3, 1e-3, 5e-4), speech_steps=0,
                                   agent_share=0.3, agent_batch=12, context=1024, grid_weight=0.0,
                                   name="tiny-agent")

    @property
    def lookup_steps(self) -> int:
        """Joint steps of the lookup warm-up (a malformed `lookup_warmup` is a ValueError naming it)."""
        return sum(steps for _, steps, _ in lookup_phases(self.lookup_warmup))

    def overridden(self, settings: list[str]) -> "TinyRecipe":
        """The recipe with `key=value` settings (`mm train --set`): numbers, strings, and comma-separated tuples such
        as steps=0,0,600; an unknown key or a value of the wrong kind is a ValueError naming it."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes = {}
        for setting in settings:
            key, sep, value = setting.partition("=")
            if not sep or key not in fields:
                raise ValueError(f"--set {setting!r}: give KEY=VALUE with KEY one of {', '.join(fields)}")
            current = getattr(self, key)
            kinds = [type(v) for v in current] if isinstance(current, tuple) else [type(current)]
            parts = value.split(",") if isinstance(current, tuple) else [value]
            if len(parts) != len(kinds):
                raise ValueError(f"--set {setting!r}: {key} takes {len(kinds)} comma-separated values")
            try:
                values = [parse_bool(part) if kind is bool else kind(part) for kind, part in zip(kinds, parts)]
            except ValueError:
                raise ValueError(f"--set {setting!r}: {key} takes {', '.join(k.__name__ for k in kinds)}") from None
            changes[key] = tuple(values) if isinstance(current, tuple) else values[0]
        return dataclasses.replace(self, **changes)

    @classmethod
    def smoke(cls, init: str = "") -> "TinyRecipe":
        """A few steps on a handful of examples: checks that the whole recipe runs (tests, `--smoke`)."""
        return cls(init=init, n_text=24, n_speech=12, n_spoken=12, steps=(3, 7, 7), batch=(2, 2, 2, 2),
                   grid_batch=4, save_every=2, vit_dim=32, vit_depth=1, speech_dim=32, speech_blocks=1, llama_dim=64, llama_layers=1, speech_steps=2)


def encoder_loss(r: TinyRecipe, model: FusionModel, grid_head: GridHead, tokenizer, data: dict, step: int,
                 rng: random.Random, device: torch.device, row: dict) -> torch.Tensor:
    """Stage 0: the ViT's grid probe on new scenes (none with grid_batch 0), and for the first `speech_steps` steps
    CTC on transcribe clips."""
    loss = torch.zeros((), device=device)
    if r.grid_batch:
        rows = scene_rows(r, r.grid_batch, rng)
        loss = vit_grid_loss(model, grid_head, model.image_processor([im for _, im, _ in rows]).to(device),
                             torch.stack([g for *_, g in rows]))
        row["grid_loss"] = loss.item()
    if step < r.speech_steps:
        clips = [rng.choice(transcribe_pool(r, data, rng)) for _ in range(r.batch[2])]
        waves = [padded(r, w, rng) for w, _ in clips]
        lengths = torch.tensor([w.shape[0] for w in waves])
        enc, enc_lengths = model.speech_encoder.encode(
            torch.nn.utils.rnn.pad_sequence(waves, batch_first=True).to(device), lengths.to(device))
        ys, ys_len = ctc_targets(tokenizer, [t for _, t in clips])
        ctc = model.ctc.loss(enc, enc_lengths, ys.to(device), ys_len.to(device)) / ys_len.float().mean().clamp_min(1)
        loss = loss + ctc
        row["ctc_loss"] = ctc.item()
    return loss


def joint_loss(r: TinyRecipe, model: FusionModel, ddp: torch.nn.Module, grid_head: GridHead, processor, tokenizer,
               data: dict, stage: int, step: int, rng: random.Random, device: torch.device, row: dict) -> torch.Tensor:
    """Stages 1 and 2: one task's rows (TASK_CYCLE; in stage 2 an `agent_share` of ReAct episodes and a `read_share`
    of text-only rows, after the `lookup_warmup` steps of bare lookups), next-token loss + CTC (speech) + the grid
    probe (images)."""
    if stage == 2 and step < r.lookup_steps:
        ids, mask, labels = processor.pad(lookup_rows(r, processor, step, 2 * r.batch[1], rng))
        o = ddp(ids.to(device), None, mask.to(device), labels=labels.to(device))
        row.update(task="lookup", lm_loss=o.lm_loss.item())
        return o.loss
    task = TASK_CYCLE[step % len(TASK_CYCLE)]
    if stage == 2 and r.agent_share and rng.random() < r.agent_share:  # draws only when set: other recipes' rows stay
        task = "agent"
    elif stage == 2 and r.read_share and rng.random() < r.read_share / (1 - r.agent_share):  # of all joint steps
        task = "read"
    size = r.agent_batch if task == "agent" else r.batch[1] if task == "read" else r.batch[TASKS.index(task)]
    convs, images, grids, audios, texts = sample_batch(r, data, task, size, rng)
    inputs = processor(convs, images, audios, add_generation_prompt=False, labels=True)
    speech = inputs["speech"]
    ys = ys_len = None
    w = 0.0
    if texts:  # CTC per target token (ESPnet sums over each utterance), so it weighs like next-token loss
        ys, ys_len = ctc_targets(tokenizer, texts)
        w = r.ctc_weight / ys_len.float().mean().clamp_min(1).item()
    o = ddp(inputs["input_ids"].to(device), inputs["pixel_values"], inputs["attention_mask"].to(device),
            speech=None if speech is None else speech.to(device), speech_lengths=inputs["speech_lengths"],
            labels=inputs["labels"].to(device), ctc_targets=ys, ctc_target_lengths=ys_len, ctc_weight=w)
    loss = o.loss
    row.update(task=task, lm_loss=o.lm_loss.item())
    if images and r.grid_weight:
        grid = vit_grid_loss(model, grid_head, inputs["pixel_values"].to(device), torch.stack(grids))
        loss = loss + r.grid_weight * grid
        row["grid_loss"] = grid.item()
    if o.ctc_loss is not None:
        row["ctc_loss"] = o.ctc_loss.item() * w / r.ctc_weight
    return loss


def setup(device: str | None) -> tuple[int, int, torch.device]:
    """(world size, rank, device) of this process; under torchrun, joins the process group (each rank on its local
    GPU when CUDA is there)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = torch.device(device or "cpu")
    if world > 1:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def train_tiny(out_dir: str | Path, recipe: TinyRecipe | None = None, resume: bool = True, threads: int | None = None,
               progress: bool = True, stop_after: int | None = None, device: str | None = None) -> Path | None:
    """Run the recipe (all stages; under torchrun, data parallel); returns the saved model directory. The loop over
    stages and steps with its checkpointing is one piece (about 100 lines) so that resuming reads in one place.

    device: 'cuda' trains one process on the GPU (under torchrun each rank takes its local GPU when CUDA is there).

    stop_after: leave after that many steps in all (counting from the first step of stage 0) with a checkpoint
    saved, returning None; a later call resumes from it."""
    r = recipe or TinyRecipe()
    if r.lookup_steps > r.steps[2]:  # a malformed or too long warm-up fails here, not after the first stages
        raise ValueError(f"lookup_warmup={r.lookup_warmup!r} is longer than stage 2 ({r.steps[2]} steps)")
    if r.grid_batch == 0 and r.speech_steps < r.steps[0]:
        raise ValueError(f"grid_batch=0 leaves stage 0 nothing to train after speech_steps={r.speech_steps}; set "
                         f"speech_steps to steps[0]={r.steps[0]}")
    out = Path(out_dir)
    world, rank, device = setup(device)
    if threads:
        torch.set_num_threads(threads)
    main = rank == 0
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "train.log", "a") if main else None

    def log(msg: str) -> None:
        if main:
            line = f"[{time.strftime('%H:%M:%S')}] {msg}"
            tqdm.write(line, file=sys.stderr)
            log_file.write(line + "\n")
            log_file.flush()

    log(f"recipe {r.name}: {json.dumps(asdict(r))}, world size {world}, device {device}")
    data = make_data(r, out / "cache" / "speech", log)
    tokenizer = tokenizer_for(r, data, out, main, world)
    model = new_model(r, data, tokenizer)
    grid_head = GridHead(model.config.vision.dim)
    processor = model.processor()

    ckpt = out / "checkpoint.pt"
    history: list[dict] = []
    start_stage, start_step, state = 0, 0, None
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        grid_head.load_state_dict(state["grid_head"])
        start_stage, start_step, history = int(state["stage"]), int(state["step"]), json.loads(state["history"])
        log(f"resumed from {ckpt}: stage {start_stage}, step {start_step}")
    model.to(device)
    grid_head.to(device)

    offsets = [0, r.steps[0], r.steps[0] + r.steps[1]]
    stopping = False
    for stage in range(start_stage, 3):
        params = trainable(model, stage, vision=r.grid_batch > 0) + list(grid_head.parameters())
        opt = adamw(params, r.lr[stage])
        first = start_step if stage == start_stage else 0
        if state is not None and stage == start_stage and first > 0:
            opt.load_state_dict(state["optimizer"])
        ddp = model
        if world > 1 and stage > 0:
            ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        model.train()
        bar = tqdm(range(first, r.steps[stage]), desc=f"stage {stage}", unit="step", disable=not (main and progress),
                   file=sys.stderr, initial=first, total=r.steps[stage])
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = r.lr[stage] * schedule(step, r.steps[stage])
            rng = random.Random(f"{r.seed}/{stage}/{step}/{rank}")
            torch.manual_seed(hash((r.seed, stage, step, rank)) % 2**31)
            row = {"stage": stage, "step": offsets[stage] + step}
            if stage == 0:
                loss = encoder_loss(r, model, grid_head, tokenizer, data, step, rng, device, row)
            else:
                loss = joint_loss(r, model, ddp, grid_head, processor, tokenizer, data, stage, step, rng, device, row)
            row["loss"] = loss.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # what DDP does not see (the probe; all of stage 0) is averaged by hand
                for p in params if stage == 0 else grid_head.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            done_stage = step + 1 == r.steps[stage]
            stopping = stop_after is not None and offsets[stage] + step + 1 >= stop_after
            if main and ((step + 1) % r.save_every == 0 or done_stage or stopping):
                save_atomic({"model": model.state_dict(), "grid_head": grid_head.state_dict(),
                             "optimizer": opt.state_dict(), "history": json.dumps(history),
                             "stage": stage + 1 if done_stage else stage, "step": 0 if done_stage else step + 1}, ckpt)
                recent = [h for h in history[-r.save_every:] if h["stage"] == stage]
                log(f"stage {stage} step {step + 1}/{r.steps[stage]}: loss "
                    f"{sum(h['loss'] for h in recent) / len(recent):.4f} (mean of the last {len(recent)} steps)")
            if stopping:
                break
        bar.close()
        state = None
        if stopping:
            break
    model_dir = None if stopping else finish(r, model, history, out, main, log)
    if world > 1:
        if model_dir is not None:
            (out / f"weights-rank{rank}.sha256").write_text(weights_digest(model) + "\n")
        dist.barrier()
        dist.destroy_process_group()
    if log_file:
        log_file.close()
    return model_dir


def finish(r: TinyRecipe, model: FusionModel, history: list[dict], out: Path, main: bool, log) -> Path:
    """The end of a run: `model/`, `losses.jsonl` and `loss.png` (written by rank 0)."""
    model.eval()
    model_dir = out / "model"
    if main:
        with open(out / "losses.jsonl", "w") as f:
            f.writelines(json.dumps(h) + "\n" for h in history)
        extra = ("agent",) * bool(r.agent_share) + ("read",) * bool(r.read_share) + ("lookup",) * bool(r.lookup_warmup)
        plot_losses(history, out / "loss.png", TASKS + extra, f"mm train --recipe {r.name}")
        model.to("cpu").save_pretrained(model_dir)
        log(f"saved {model_dir} and {out / 'loss.png'}")
    return model_dir

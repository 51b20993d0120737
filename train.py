"""Train a VLM: LLaVA's two stages (Liu et al. 2023, 2024), from a laptop CPU to torchrun on many GPUs.

Stage 1, pretrain, teaches the projector to turn image features into words (captions, `plain` template).
Stage 2, finetune, teaches the model to answer (conversations, `vicuna_v1` template). With no arguments,
`python train.py` is the main job: a tiny model trained from scratch on ShapesWorld, both stages, then scored
on held-out questions with and without the images. The training loop follows nanoGPT's train.py.

    python train.py                                                    # the main job
    python train.py --stage pretrain --init ckpt/llava-7b-init --data blip_laion_cc_sbu_558k.json ...
    torchrun --nproc_per_node=8 train.py --stage finetune --data llava_v1_5_mix665k.json --lora-rank 128 ...
"""

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from data import DataError, GlobalBatchSampler, LlavaDataset, ShapesDataset, ShapesWorld, collate
from eval import category_table, evaluate_qa, shapes_records, shapes_scores, write_predictions
from lora import apply_lora, lora_state_dict, merge_lora
from model import PRESETS, VLM, VLMConfig, preset, tiny_config
from plots import line_chart
from tokenizer import TEMPLATES, Tokenizer, check_template, load_tokenizer, train_tokenizer

PARTS = ("vision", "projector", "lm")

# The main job: tuned so that both stages and the evaluation finish in under 10 minutes on 2 CPU cores.
# Each stage's flags are parsed like a command line; flags given to `python train.py` are appended, so they win.
MAIN_JOB = {
    # The tiny preset with one image token per 3x3 cell (16 px patches, the patch embedding alone: a tower block
    # mixes the few object tokens into each other) and, in the LM, a Canon layer and QK-norm from the first step
    # (issue #9): 4x fewer image tokens bring the job under 10 minutes (8.2 on 2 cores, against 11.6); accuracy is
    # the plain preset's within run-to-run spread (0.663 on 2 threads, 0.733 on 1; the plain preset 0.658).
    "pretrain": ["--init", "tiny", "--max-steps", "900", "--batch-size", "32", "--lr", "2e-3", "--warmup-ratio",
                 "0.05", "--set", "vision.patch_size=16", "--set", "vision.depth=0", "--set", "lm.conv_kernel=3",
                 "--set", "lm.qk_norm=true"],
    # A greedy score of 100 held-out questions every 100 steps draws learning_curve.png (~1 CPU-s each). The
    # grounding loss tells head 0 of each layer where the asked object is (model.grounding_loss), at 4x the weight
    # of the token loss, annealed to 0, and the first layer's head 0 which of the question's words name it
    # (--ground-words); the tower and projector stay as the captions taught them (--train lm). Issue #9, one thread,
    # seeds 1337 / 1 / 2 / 3 / 4: 0.957 / 0.807 / 0.973 / 0.948 / 0.907; without the words and training every part
    # 0.773 / 0.622 for the first two (same machine). Quiet, 2 threads: 0.959 held-out / 0.224 blind in 5.4 min.
    "finetune": ["--max-steps", "1000", "--batch-size", "32", "--lr", "1e-3", "--warmup-ratio", "0.05",
                 "--eval-every", "100", "--eval-samples", "100", "--ground", "4", "--ground-words", "--train", "lm"],
}
MAIN_JOB_EVAL = 1000  # held-out ShapesWorld questions scored at the end
SHAPES_WORLD = dict(image_size=48)  # ShapesWorld as the main job draws it, at the tiny preset's image size
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # "stop soon", from Slurm, Kubernetes and spot instances
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by a STOP_SIGNAL with a checkpoint saved; rerun with --resume


# ----------------------------------------------------------------------------- distributed setup


@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str | None) -> Dist:
    """torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; without them this is a single process. NCCL on CUDA, gloo on CPU."""
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # the main job runs two stages in one process group
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world_size, device)


def all_reduce_sum(value: float, d: Dist) -> float:
    if d.world_size == 1:
        return value
    t = torch.tensor(value, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.item()


def barrier(d: Dist):
    if d.world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- model and tokenizer


def stage_texts(args, n_shapes=2000) -> list[str]:
    """Tokenizer-training text: the user's data, or ShapesWorld captions and questions."""
    if args.data:
        try:
            dataset = LlavaDataset(args.data, args.image_folder, None, None)
        except DataError as err:
            raise SystemExit(f"error: {err}") from None
        if len(dataset) == 0:  # checked before sentencepiece, which has no words for an empty corpus
            raise SystemExit(f"error: {args.data}: no usable records ({dataset.skip_report()})")
        return dataset.texts()
    return shapes_world(args).texts(n_shapes)


def shapes_world(args, image_size=None) -> ShapesWorld:
    """ShapesWorld drawn at image_size (the tower's), unless --set world.image_size asks for its own size: larger
    scenes are then tiled by an anyres model, squashed by a plain one (experiments.py anyres)."""
    own = "image_size" in args.world_sets
    try:
        return ShapesWorld(**(world_settings(args) | ({"image_size": image_size} if image_size and not own else {})))
    except ValueError as err:  # a bad --set world.KEY
        raise SystemExit(f"error: ShapesWorld: {err}") from None


def world_settings(args) -> dict:
    """ShapesWorld's fields as this run draws it: the main job's, then the user's --set world.KEY=VALUE."""
    return SHAPES_WORLD | args.world_sets


def parse_sets(items: list[str]) -> tuple[dict, dict]:
    """--set KEY=VALUE items -> (model fields, ShapesWorld fields). Values are JSON where they parse (16, 0.5,
    [1, 2]), else strings (linear); a JSON list becomes a tuple, as the configs hold them."""
    model, world = {}, {}
    known = {f.name for f in dataclasses.fields(ShapesWorld)}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        value = tuple(value) if isinstance(value, list) else value
        if key.startswith("world."):
            if key[6:] not in known:
                raise SystemExit(f"error: --set {key}: ShapesWorld has no field {key[6:]!r}")
            world[key[6:]] = value
        else:
            model[key] = value
    return model, world


def override(cfg, key: str, value):
    """cfg with the field at the dotted path `key` replaced: "vision.patch_size" is cfg.vision.patch_size."""
    head, _, rest = key.partition(".")
    if not dataclasses.is_dataclass(cfg) or head not in {f.name for f in dataclasses.fields(cfg)}:
        raise SystemExit(f"error: --set {key}: {type(cfg).__name__} has no field {head!r}")
    return dataclasses.replace(cfg, **{head: override(getattr(cfg, head), rest, value) if rest else value})


def configure(cfg: VLMConfig, sets: dict) -> VLMConfig:
    """cfg with every --set model field applied; a value the config rejects is a one-line error."""
    for key, value in sets.items():
        try:
            cfg = override(cfg, key, value)
        except (ValueError, TypeError) as err:
            raise SystemExit(f"error: --set {key}={value}: {err}") from None
    return cfg


def init_model(args, out: Path, d: Dist) -> tuple[VLM, Path, dict]:
    """-> (model, where its tokenizer is, facts about the init). A preset starts from scratch with a new
    sentencepiece tokenizer; a checkpoint brings its own (tokenizer.json or tokenizer.model)."""
    if args.init in PRESETS:
        tokenizer_path = out / "tokenizer.model"
        if d.master and not (args.resume and tokenizer_path.is_file()):
            cfg = preset(args.init)
            # The tokenizer is trained on the data; "tiny" is then sized to its exact vocabulary.
            tokenizer = train_tokenizer(stage_texts(args), cfg.image_token_id, tokenizer_path)
            if tokenizer.vocab_size > cfg.image_token_id:
                raise SystemExit(f"error: the tokenizer has {tokenizer.vocab_size} ids, but {args.init} reserves "
                                 f"id {cfg.image_token_id} for images")
        barrier(d)
        vocab = load_tokenizer(tokenizer_path).vocab_size
        cfg = configure(tiny_config(vocab) if args.init == "tiny" else preset(args.init), args.model_sets)
        if not args.data and world_settings(args).get("frames"):  # ShapesWorld clips: the model takes video
            cfg = with_video(cfg)
        torch.manual_seed(args.seed)  # the initial weights are a function of the seed: resume rebuilds them
        model = VLM(cfg)
        return model, tokenizer_path, {"init": args.init, "from_scratch": True}
    init = Path(args.init)
    try:
        model = VLM.from_pretrained(init)
    except (FileNotFoundError, ValueError, KeyError, SafetensorError) as err:  # a truncated file: SafetensorError
        where = f"{init / 'model.safetensors'}: " if isinstance(err, SafetensorError) else ""
        raise SystemExit(f"error: --init {args.init}: {where}{err}") from None
    # The main job's finetune repeats pretrain's --set; compared as JSON, where a --set list (a tuple) and the
    # checkpoint's list are equal
    if json.dumps(configure(model.cfg, args.model_sets).to_dict()) != json.dumps(model.cfg.to_dict()):
        raise SystemExit(f"error: --set {' '.join(args.model_sets)}: a checkpoint's model keeps its config; "
                         "model fields can only be set with a preset --init")
    info = json.loads((init / "training.json").read_text()) if (init / "training.json").is_file() else {}
    return model, init, {"init": str(init.resolve()), "from_scratch": info.get("from_scratch", False)}


def with_video(cfg: VLMConfig) -> VLMConfig:
    """cfg with OneVision's video placeholder in a new last row of the vocabulary. The video path lives in the
    anyres code, so anyres is switched on with a one-tile canvas if it was off."""
    lm = dataclasses.replace(cfg.lm, vocab_size=cfg.lm.vocab_size + 1)
    pinpoints = cfg.grid_pinpoints or [[cfg.vision.image_size, cfg.vision.image_size]]
    return dataclasses.replace(cfg, lm=lm, video_token_id=cfg.lm.vocab_size, grid_pinpoints=pinpoints)


def choose_trainable(args, from_scratch: bool) -> list[str]:
    """The parts that train: --train, else LLaVA's defaults per stage; a from-scratch model trains everything."""
    if args.train:
        parts = [p.strip() for p in args.train.split(",") if p.strip()]
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise SystemExit(f"error: --train: unknown part {unknown[0]!r}; choose from {', '.join(PARTS)}")
        return parts
    if from_scratch:
        return list(PARTS)
    if args.lora_rank:
        return ["projector"]  # plus the adapters
    return ["projector"] if args.stage == "pretrain" else ["projector", "lm"]


def set_trainable(model: VLM, parts: list[str], args) -> None:
    """Freeze everything, unfreeze `parts`, then add LoRA adapters (which are trainable) to the LM if asked.

    A frozen vision tower fed by pixels that need no gradient builds no autograd graph: it runs as inference.
    """
    model.requires_grad_(False)
    for part in parts:
        getattr(model, part).requires_grad_(True)
    if args.lora_rank:
        if "lm" in parts:
            raise SystemExit("error: --lora-rank trains adapters instead of the LM; drop lm from --train")
        apply_lora(model.lm, args.lora_targets.split(","), args.lora_rank, args.lora_alpha, args.lora_dropout)


def default_lr(args, from_scratch: bool) -> float:
    """LLaVA-1.5: pretrain 1e-3; finetune 2e-5, or 2e-4 with LoRA. From scratch: 1e-3."""
    if from_scratch or args.stage == "pretrain":
        return 1e-3
    return 2e-4 if args.lora_rank else 2e-5


def make_optimizer(model: VLM, args) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only. Matrices decay, norms and biases do not (nanoGPT).
    LoRA's projector gets its own lr (LLaVA-1.5: 2e-5 next to the adapters' 2e-4)."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = args.projector_lr if name.startswith("projector.") and args.projector_lr else args.lr
        decay = args.weight_decay if p.dim() >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(p)
    param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    fused = next(model.parameters()).device.type == "cuda"
    betas = (0.9, 0.95) if args.init in PRESETS else (0.9, 0.999)  # nanoGPT's from scratch; HF's (LLaVA) else
    return torch.optim.AdamW(param_groups, betas=betas, fused=fused)


def cosine_schedule(warmup: int, total: int):
    """Linear warmup, then cosine decay to zero: LLaVA's (and HF Trainer's) `cosine` schedule."""

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return factor


def parameter_summary(model: VLM) -> str:
    lines = []
    for part in PARTS:
        params = list(getattr(model, part).parameters())
        total = sum(p.numel() for p in params)
        trainable = sum(p.numel() for p in params if p.requires_grad)
        lines.append(f"  {part:<10} {total / 1e6:9.3f}M params, {trainable / 1e6:9.3f}M trainable")
    return "\n".join(lines)


def trainable_names(model: VLM) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- data


def build_dataset(args, tokenizer: Tokenizer, model: VLM):
    """-> (dataset, number of samples per epoch, shuffle). ShapesWorld is an endless stream, read in order."""
    cfg = model.cfg
    if args.data:
        try:
            dataset = LlavaDataset(args.data, args.image_folder, tokenizer, cfg, args.template, args.max_len,
                                   cfg.image_mode, args.frames)
        except DataError as err:
            raise SystemExit(f"error: {err}") from None
        if len(dataset) == 0:
            raise SystemExit(f"error: {args.data}: no usable records ({dataset.skip_report()})")
        return dataset, len(dataset), True
    task = "caption" if args.stage == "pretrain" else "qa"
    world = shapes_world(args, cfg.vision.image_size)
    dataset = ShapesDataset(world, tokenizer, cfg, task, template=args.template, max_len=args.max_len,
                            image_mode=cfg.image_mode, ground=args.ground > 0, ground_words=args.ground_words)
    if args.ground:
        try:
            dataset[0]
        except ValueError as err:  # e.g. patches too coarse to tell the world's cells apart
            raise SystemExit(f"error: --ground: {err}") from None
    if task == "qa" and args.shapes_captions > 0:
        captions = ShapesDataset(world, tokenizer, cfg, "caption", template=args.template, max_len=args.max_len,
                                 image_mode=cfg.image_mode)
        dataset = Interleave(dataset, captions, round(1 / args.shapes_captions))
    return dataset, args.max_steps * args.global_batch, False


class Interleave(torch.utils.data.Dataset):
    """Sample i is from `other` when i is a multiple of `every`, else from `main`: a fixed mix, any world size."""

    def __init__(self, main, other, every: int):
        self.main, self.other, self.every = main, other, every

    def __len__(self):
        return len(self.main)

    def __getitem__(self, i):
        return self.other[i] if i % self.every == 0 else self.main[i]


def batches(dataset, num_samples: int, shuffle: bool, args, d: Dist, step: int, pad_id: int):
    """Yield each remaining optimizer step's list of this rank's micro-batches, starting at `step`.

    The order of global batches depends on (seed, epoch) only, so any world size and accumulation see the
    same samples per step, and resuming at `step` continues the exact sequence.
    """
    steps_per_epoch = num_samples // args.global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {num_samples} samples do not fill one global batch of {args.global_batch}")
    while True:
        epoch, start = divmod(step, steps_per_epoch)
        sampler = GlobalBatchSampler(num_samples, args.global_batch, args.seed, d.rank, d.world_size,
                                     args.batch_size, epoch, start, shuffle)
        pack_len = args.max_len if args.pack else None
        # The loader's own generator (worker seeds): one drawn from the global RNG would shift dropout on resume.
        loader = DataLoader(dataset, batch_sampler=sampler,
                            collate_fn=partial(collate, pad_id=pad_id, pack_len=pack_len),
                            num_workers=args.workers, persistent_workers=False, worker_init_fn=ignore_stop_signals,
                            generator=torch.Generator().manual_seed(args.seed + epoch))
        micro = []
        for batch in loader:
            micro.append(batch)
            if len(micro) == args.grad_accum:
                yield micro
                micro = []
                step += 1


# ----------------------------------------------------------------------------- checkpoints


def rng_state() -> dict:
    """Every RNG as tensors and plain types, so train_state.pt loads with weights_only=True."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_tensors(named) -> dict[str, torch.Tensor]:
    """name -> whole tensor on CPU. An FSDP shard (a DTensor) is gathered first: every rank must call this."""
    return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().contiguous()
            for name, t in named}


CHECKPOINT_FILES = ("trainable.safetensors", "train_state.pt", "init.json")  # each listed in SHA256SUMS


def save_checkpoint(out: Path, step: int, model: VLM, optimizer, scheduler, scaler, skipped: dict, args,
                    init_info: dict, d: Dist):
    """Save OUT/checkpoints/step_000123/ on every rank's call (FSDP gathers), written by rank 0. Holds the
    trainable weights only, plus a reference to --init. A disk that refuses the write (full, read-only) stops
    every rank with one line; the previous checkpoint stays as it was."""
    trainable = full_tensors((name, p) for name, p in model.named_parameters() if p.requires_grad)
    rngs = [rng_state()]  # every rank's: each draws its own dropout masks, as many as its batch's shape needs
    if d.world_size > 1:
        rngs = [None] * d.world_size
        dist.all_gather_object(rngs, rng_state())
    failed = None
    if d.master:
        # FSDP's optimizer state is sharded: its checkpoints keep weights and schedule, and cannot be resumed.
        state = {"step": step, "optimizer": None if args.fsdp else optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
                 "skipped": skipped, "global_batch": args.global_batch, "max_steps": args.max_steps}
        path = out / "checkpoints" / f"step_{step:06d}"
        try:
            write_checkpoint(path, trainable, state, init_info | {"seed": args.seed}, args.keep)
        except (OSError, SafetensorError) as err:
            previous = latest_checkpoint(out)
            failed = (f"error: cannot save {path}: {err}; "
                      + (f"{previous} is intact" if previous else "no earlier checkpoint"))
    if all_reduce_sum(float(failed is not None), d):  # every rank stops, none waits for a save that never comes
        raise SystemExit(failed if d.master else 1)


def write_checkpoint(path: Path, trainable: dict, state: dict, init: dict, keep: int):
    """Write into a temporary dir, fsync, then rename: a kill never leaves a checkpoint that looks complete but
    is not. SHA256SUMS (`sha256sum -c` reads it) lets --resume tell a damaged checkpoint from a good one."""
    root = path.parent
    tmp = root / f".tmp_{path.name}"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_step_*"):  # left by a killed save
        shutil.rmtree(stale)
    try:
        tmp.mkdir()
        save_file(trainable, tmp / "trainable.safetensors")
        buffer = io.BytesIO()  # torch.save to a path hides the OS error (ENOSPC) behind a RuntimeError
        torch.save(state, buffer)
        (tmp / "train_state.pt").write_bytes(buffer.getbuffer())
        (tmp / "init.json").write_text(json.dumps(init, indent=2) + "\n")
        sums = "".join(f"{sha256(tmp / name)}  {name}\n" for name in CHECKPOINT_FILES)
        (tmp / "SHA256SUMS").write_text(sums)
        for name in CHECKPOINT_FILES + ("SHA256SUMS", "."):
            fsync(tmp / name)
    except (OSError, SafetensorError):
        shutil.rmtree(tmp, ignore_errors=True)  # free the space; a .tmp_ dir is never resumed from anyway
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # atomic on POSIX: the checkpoint appears complete or not at all
    fsync(root)
    for old in sorted(root.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync(path: Path):
    """Flush a file or a directory (its entries) to the disk, so a power cut keeps what the rename promised."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted((out / "checkpoints").glob("step_*"))  # a partial save is still a .tmp_ dir
    return done[-1] if done else None


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (a file missing, truncated or changed), or None."""
    try:
        lines = (path / "SHA256SUMS").read_text().splitlines()
    except FileNotFoundError:
        return "SHA256SUMS is missing"
    except (OSError, UnicodeDecodeError) as err:
        return f"SHA256SUMS is unreadable ({err})"
    listed = {}  # name -> sha256, from "digest  name" lines
    for line in lines:
        digest, _, name = line.partition("  ")
        listed[name] = digest
    for name in CHECKPOINT_FILES:
        if name not in listed:
            return f"SHA256SUMS does not list {name}"
        try:
            if sha256(path / name) != listed[name]:
                return f"{name} does not match its checksum"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as err:
            return f"{name} is unreadable ({err})"
    return None


def resume_checkpoint(out: Path, d: Dist) -> Path | None:
    """The newest checkpoint whose files match SHA256SUMS. Each damaged one is named in one line and the one
    before it is tried; when every one is damaged, stop rather than silently start over. Rank 0 decides."""
    chosen, error = None, None
    if d.master:
        problems = []
        for path in reversed(sorted((out / "checkpoints").glob("step_*"))):
            problem = checkpoint_problem(path)
            if problem is None:
                chosen = path
                break
            problems.append(f"{path.name}: {problem}")
            print(f"--resume: {path} is damaged ({problem}); falling back to the one before it", file=sys.stderr)
        if problems and chosen is None:
            error = (f"error: --resume: no intact checkpoint in {out / 'checkpoints'} ({'; '.join(problems)}); "
                     "move them away to start over")
    if d.world_size > 1:
        box = [chosen, error]
        dist.broadcast_object_list(box)
        chosen, error = box
    if error:
        raise SystemExit(error if d.master else 1)
    return chosen


def load_checkpoint(path: Path, model: VLM, optimizer, scheduler, scaler, args, d: Dist) -> tuple[int, dict]:
    """Restore trainable weights, optimizer, schedule and RNGs in place. -> (step, skipped records)"""
    weights = load_file(path / "trainable.safetensors")
    names = set(trainable_names(model))
    if set(weights) != names:
        extra = sorted(set(weights) ^ names)[0]
        raise SystemExit(f"error: {path}: its trainable tensors differ from this run's (first: {extra}); "
                         "resume with the same --init, --train and LoRA flags")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in weights:
                p.copy_(weights[name])
    state = torch.load(path / "train_state.pt", weights_only=True)
    if (state["global_batch"], state["max_steps"]) != (args.global_batch, args.max_steps):
        raise SystemExit(f"error: {path} was made with global batch {state['global_batch']} and "
                         f"{state['max_steps']} steps; this run has {args.global_batch} and {args.max_steps}")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][d.rank % len(state["rng"])])  # its own; another world size cannot be exact anyway
    return state["step"], state["skipped"]


def save_final(out: Path, model: VLM, tokenizer: Tokenizer, args, init_info: dict):
    """OUT/ as a standalone checkpoint: config.json, model.safetensors, the tokenizer (+ projector, adapter)."""
    if args.lora_rank:
        save_file({k: v.contiguous() for k, v in lora_state_dict(model).items()}, out / "adapter.safetensors")
        merge_lora(model.lm)
    if args.stage == "finetune":
        model.cfg = dataclasses.replace(model.cfg, template=args.template)  # what sample.py will prompt with
    model.save_pretrained(out, tokenizer)
    if args.stage == "pretrain":  # like LLaVA's mm_projector.bin: enough to start a finetune from the init
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k.startswith("projector.")},
                  out / "projector.safetensors")
    training = init_info | {"stage": args.stage, "template": args.template, "steps": args.max_steps,
                            "global_batch": args.global_batch, "lr": args.lr}
    if args.ground:  # the grounding loss's starting weight, and whether it points at the question's words
        training["ground"], training["ground_words"] = args.ground, args.ground_words
    if not args.data:  # eval.py --shapes then scores the same world
        training["shapes_world"] = world_settings(args)
    (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")


# ----------------------------------------------------------------------------- the loop


def estimate_mfu(model: VLM, tokens_per_s: float, device: torch.device) -> float | None:
    """nanoGPT's MFU: 6 N flops per token (plus attention), over the GPU's bf16 peak. None on CPU."""
    if device.type != "cuda":
        return None
    n = sum(p.numel() for p in model.lm.parameters())
    cfg = model.cfg.lm
    flops_per_token = 6 * n + 12 * cfg.n_layers * cfg.dim * cfg.max_seq_len
    name = torch.cuda.get_device_name(device)
    peak = 989e12 if "H100" in name or "H200" in name else 312e12  # dense bf16: H100/H200, else A100
    return flops_per_token * tokens_per_s / peak


def run_eval(model: VLM, tokenizer: Tokenizer, args, step: int) -> dict:
    """Held-out accuracy on --eval-data or ShapesWorld's test split (finetune; pretrain has no questions)."""
    if args.eval_data:
        from eval import file_records  # only needed here

        records, _, _ = file_records(args.eval_data, args.image_folder)
    else:
        world = shapes_world(args, model.cfg.vision.image_size)
        records = shapes_records(min(args.eval_samples, world.test_size), world)
    result = evaluate_qa(model, tokenizer, records, template=args.template)
    return {"step": step, "eval_accuracy": result["accuracy"], "eval_correct": result["correct"],
            "eval_total": result["total"],
            "eval_by_category": {k: c / t for k, (c, t) in result["by_category"].items()}}


def plot_learning_curve(evals: list[dict], path: Path):
    """Held-out accuracy against step, one line per question category: when each skill appears."""
    curves = {"all": [(e["step"], e["eval_accuracy"]) for e in evals]}
    for category in evals[0]["eval_by_category"]:
        curves[category] = [(e["step"], e["eval_by_category"].get(category, 0.0)) for e in evals]
    line_chart(curves, "held-out accuracy by question category", path)


def train(args) -> Path:
    """One stage. -> the output directory, a standalone checkpoint."""
    d = setup_distributed(args.device)
    out = Path(args.out or f"out/{args.stage}")
    args.global_batch = args.batch_size * args.grad_accum * d.world_size
    if args.fsdp and (d.world_size == 1 or args.lora_rank or args.resume):
        raise SystemExit("error: --fsdp needs torchrun with 2+ processes, and supports neither LoRA nor --resume")
    if d.master:
        out.mkdir(parents=True, exist_ok=True)
    barrier(d)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32

    model, tokenizer_path, init_info = init_model(args, out, d)
    try:
        tokenizer = load_tokenizer(tokenizer_path)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    args.template = args.template or ("plain" if args.stage == "pretrain" else model.cfg.template)
    try:
        check_template(tokenizer, args.template)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    parts = choose_trainable(args, init_info["from_scratch"])
    torch.manual_seed(args.seed)  # LoRA's initial adapters follow --seed, whatever ran before in this process
    set_trainable(model, parts, args)
    model.to(d.device)
    model.lm.grad_checkpointing = args.grad_checkpointing
    args.lr = args.lr or default_lr(args, init_info["from_scratch"])
    if args.projector_lr is None and args.lora_rank and not init_info["from_scratch"]:
        args.projector_lr = 2e-5
    args.max_len = args.max_len or model.cfg.lm.max_seq_len

    if args.max_steps is None and args.data is None:
        args.max_steps = int(MAIN_JOB[args.stage][MAIN_JOB[args.stage].index("--max-steps") + 1])
    dataset, num_samples, shuffle = build_dataset(args, tokenizer, model)
    if args.max_steps is None:
        args.max_steps = args.epochs * (num_samples // args.global_batch)

    if args.fsdp:  # before the optimizer: sharding replaces every parameter with its DTensor shard
        shard_fsdp(model)
    optimizer = make_optimizer(model, args)
    warmup = max(1, round(args.warmup_ratio * args.max_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(warmup, args.max_steps))
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    autocast = (torch.autocast(d.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())

    step, skipped = 0, dict(getattr(dataset, "skipped", {}))
    checkpoint = resume_checkpoint(out, d) if args.resume else None
    if checkpoint is not None:
        step, skipped = load_checkpoint(checkpoint, model, optimizer, scheduler, scaler, args, d)
    elif args.resume and d.master:
        print(f"--resume: no checkpoint in {out / 'checkpoints'}, starting at step 0")

    train_model = model
    if d.world_size > 1 and not args.fsdp:
        # User data may hold text-only batches, which leave the vision tower and projector unused.
        train_model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                          find_unused_parameters=args.data is not None)
    if args.compile:
        train_model = torch.compile(train_model)

    if d.master:
        origin = "from scratch" if init_info["from_scratch"] else "weights"
        lora = " + LoRA adapters" if args.lora_rank else ""
        print(f"stage {args.stage}: init {init_info['init']} ({origin}), training {', '.join(parts)}{lora}")
        print(parameter_summary(model))
        print(f"  global batch {args.global_batch} = {args.batch_size} x accum {args.grad_accum} x world "
              f"{d.world_size}; {args.max_steps} steps from step {step}; lr {args.lr:g}; dtype {args.dtype}; "
              f"compile {args.compile}; device {d.device}; data {args.data or 'ShapesWorld'} ({args.template})")

    metrics = open(out / "metrics.jsonl", "a") if d.master else None
    bar = tqdm(total=args.max_steps, initial=step, disable=not d.master, dynamic_ncols=True)
    t_start, tokens_seen, last_eval, evals = time.time(), 0, None, []
    t_log, tokens_log = time.time(), 0
    model.train()
    stop = StopRequest()  # from here on, SIGTERM and SIGUSR1 wait for the step to finish
    try:
        for micro in batches(dataset, num_samples, shuffle, args, d, step, tokenizer.pad_id):
            if step >= args.max_steps:
                break
            ground = args.ground * (1 - step / args.max_steps)  # the grounding loss's weight, annealed to 0
            loss, n_tokens = train_step(train_model, model, micro, optimizer, scaler, autocast, args, d, ground)
            if not math.isfinite(loss):
                raise SystemExit(f"error: loss is {loss} at step {step + 1}; stopping. The last good checkpoint "
                                 f"is {latest_checkpoint(out) or 'none'}")
            scheduler.step()
            step += 1
            for batch in micro:
                skipped.update(batch["skipped"])
            tokens_seen += n_tokens
            tokens_log += n_tokens
            bar.update(1)
            if step % args.log_every == 0 or step == args.max_steps:
                tokens_per_s = tokens_log / (time.time() - t_log)
                t_log, tokens_log = time.time(), 0
                mfu = estimate_mfu(model, tokens_per_s, d.device)
                lr = optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                                **({"mfu": f"{mfu:.1%}"} if mfu is not None else {}))
                if metrics:
                    metrics.write(json.dumps({"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens_per_s,
                                              "time": time.time() - t_start} | ({"mfu": mfu} if mfu else {})) + "\n")
                    metrics.flush()
            if args.eval_every and step % args.eval_every == 0 and args.stage == "finetune" and d.master:
                last_eval = run_eval(model, tokenizer, args, step)
                evals.append(last_eval)
                bar.write(f"step {step}: held-out accuracy {last_eval['eval_accuracy']:.3f}")
                metrics.write(json.dumps(last_eval) + "\n")
                metrics.flush()
            saved = step % args.save_every == 0 or step == args.max_steps
            if saved:
                save_checkpoint(out, step, model, optimizer, scheduler, scaler, skipped, args, init_info, d)
            if step < args.max_steps and all_reduce_sum(float(stop.signal is not None), d):  # any rank's signal
                if not saved:
                    save_checkpoint(out, step, model, optimizer, scheduler, scaler, skipped, args, init_info, d)
                if d.master:
                    bar.write(f"{stop.signal or 'a signal to another rank'}: stopped after step {step}, saved "
                              f"{out / 'checkpoints' / f'step_{step:06d}'}; the same command with --resume "
                              f"continues (exit code {EXIT_PREEMPTED})")
                stop.preempted = True
                ignore_stop_signals()
                raise SystemExit(EXIT_PREEMPTED)
    finally:
        if not stop.preempted:
            stop.restore()
        # Free DDP now, on every way out: kept alive by an exception's traceback until after the process group is
        # destroyed, its destructor waits on gloo's thread, which waits for the GIL: the rank hangs at exit.
        train_model = None  # noqa: F841
        bar.close()
        if metrics:
            metrics.close()
        if evals:
            plot_learning_curve(evals, out / "learning_curve.png")

    skipped = gather_skipped(skipped, d)
    if args.fsdp:  # gather the shards into an ordinary model on rank 0
        state = full_tensors(model.state_dict().items())
        model = VLM(model.cfg) if d.master else model
        if d.master:
            model.load_checked({k: v for k, v in state.items() if k not in model.tied_keys()})
    if d.master:
        save_final(out, model, tokenizer, args, init_info)
        elapsed = time.time() - t_start
        print(f"stage {args.stage} done: {step} steps in {elapsed / 60:.1f} min, {tokens_seen * d.world_size:,} tokens"
              + (f", held-out accuracy {last_eval['eval_accuracy']:.3f}" if last_eval else ""))
        if args.data:
            print(dataset.skip_report(skipped))
        elif skipped:
            print(f"skipped {len(skipped)} samples")
        print(f"  model: {out}/ (config.json, model.safetensors, {tokenizer.path.name}"
              + (", projector.safetensors" if args.stage == "pretrain" else "")
              + (", adapter.safetensors" if args.lora_rank else "") + f"), checkpoints in {out / 'checkpoints'}")
    barrier(d)
    return out


class StopRequest:
    """Remembers a STOP_SIGNAL instead of dying of it, so the loop can finish its step and save first."""

    def __init__(self):
        self.signal = None  # the name of the first signal received
        self.preempted = False  # the loop stopped for a signal (this rank's or another's) and saved
        self.previous = {s: signal.signal(s, self.receive) for s in STOP_SIGNALS}

    def receive(self, signum, frame):
        self.signal = self.signal or signal.Signals(signum).name

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id: int | None = None):
    """Ignore the stop signals from here on. In DataLoader workers: Slurm signals every process of a job, and a
    worker killed by SIGTERM would crash the loader before the main process could save. In a rank that has saved
    and exits 75: Python's shutdown resets its own handlers, so a second SIGTERM (torchrun sends one to the other
    ranks when one exits) would turn 75 into a kill."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def train_step(train_model, model: VLM, micro: list[dict], optimizer, scaler, autocast, args, d: Dist,
               ground=0.0):
    """One optimizer step over this rank's micro-batches. -> (mean loss per supervised token, tokens seen)

    The loss is normalised by the supervised tokens of the whole global batch (all micro-batches, all ranks),
    known before any backward pass. DDP and FSDP average gradients over ranks, so each rank scales its loss by
    the world size: the sum is then exactly the one-big-batch gradient. ground weighs the grounding loss, per
    grounded answer of the global batch.
    """
    global_tokens = max(all_reduce_sum(sum(b["num_tokens"] for b in micro), d), 1.0)
    if ground:
        ground = ground * d.world_size / max(all_reduce_sum(sum(b["num_grounds"] for b in micro), d), 1.0)
    loss_sum = 0.0
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        with no_sync(train_model, args, last), autocast:
            if batch["input_ids"].size(0) == 0:  # every record of this micro-batch was skipped
                loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            else:
                pixel_values = batch["pixel_values"]
                segment_ids = batch["segment_ids"]
                _, loss = train_model(batch["input_ids"].to(d.device),
                                      pixel_values.to(d.device) if pixel_values is not None else None,
                                      batch["labels"].to(d.device), num_tokens=global_tokens / d.world_size,
                                      segment_ids=segment_ids.to(d.device) if segment_ids is not None else None,
                                      image_sizes=batch["image_sizes"],  # anyres: each image's (h, w)
                                      image_tiled=batch["image_tiled"],  # anyres: which images were tiled
                                      videos=batch["videos"].to(d.device) if batch["videos"] is not None else None,
                                      ground=batch["ground"].to(d.device) if batch["ground"] is not None else None,
                                      ground_weight=ground)
            scaler.scale(loss).backward()
        loss_sum += loss.item() / d.world_size
    loss = all_reduce_sum(loss_sum, d)
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        return loss, 0
    scaler.unscale_(optimizer)
    if args.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    return loss, tokens


def no_sync(train_model, args, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch: one communication per step."""
    inner = getattr(train_model, "_orig_mod", train_model)  # under torch.compile
    if last:
        return contextlib.nullcontext()
    if isinstance(inner, DDP):
        return inner.no_sync()
    if args.fsdp:
        return fsdp_no_sync(inner)
    return contextlib.nullcontext()


@contextlib.contextmanager
def fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def shard_fsdp(model: VLM):
    """FSDP2: shard each transformer block, then the rest, across ranks (for models too big for one GPU)."""
    from torch.distributed.fsdp import fully_shard

    for block in list(model.lm.blocks) + list(model.vision.blocks):
        fully_shard(block)
    return fully_shard(model)


def gather_skipped(skipped: dict, d: Dist) -> dict:
    if d.world_size == 1:
        return skipped
    everyone = [None] * d.world_size
    dist.all_gather_object(everyone, skipped)
    return {k: v for part in everyone for k, v in part.items()}


# ----------------------------------------------------------------------------- the main job


def main_job(argv: list[str]):
    """Both stages of the tiny model on ShapesWorld, then held-out accuracy with and without the images."""
    user = parse_args(argv)
    out = Path(user.out or "out")
    t0 = time.time()
    pretrain = train(parse_args(["--stage", "pretrain"] + MAIN_JOB["pretrain"] + argv
                                + ["--out", str(out / "pretrain")]))
    finetune = train(parse_args(["--stage", "finetune", "--init", str(pretrain)] + MAIN_JOB["finetune"] + argv
                                + ["--out", str(out / "finetune")]))
    if int(os.environ.get("RANK", 0)) != 0:
        return
    normal, blind = shapes_scores(finetune, user.eval_samples)
    write_predictions(normal, finetune / "predictions.jsonl")
    write_predictions(blind, finetune / "predictions_blind.jsonl")
    print(f"main job: {(time.time() - t0) / 60:.1f} min; predictions in {finetune}/predictions*.jsonl, accuracy "
          f"by category against step in {finetune}/learning_curve.png")
    print(category_table(normal))
    print(f"heldout accuracy: {normal['accuracy']:.3f}")
    print(f"blind accuracy: {blind['accuracy']:.3f}")


# ----------------------------------------------------------------------------- command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show "(default: ...)" except where the default is None: those helps say in words what happens."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--stage", choices=("pretrain", "finetune"),
                   help="run one stage; without it, run the main job (tiny model, ShapesWorld, both stages, eval)")
    p.add_argument("--init", help=f"a preset name (from scratch: {', '.join(PRESETS)}) or a checkpoint dir; "
                   "default: tiny for pretrain, out/pretrain for finetune")
    p.add_argument("--data", help="LLaVA-format JSON/JSONL; default: ShapesWorld captions (pretrain) or "
                   "questions (finetune)")
    p.add_argument("--image-folder", help="image paths in --data are relative to this (default: its folder)")
    p.add_argument("--out", help="output dir (default: out/<stage>; the main job: out/)")
    p.add_argument("--template", choices=TEMPLATES, help="default: plain for pretrain; for finetune the "
                   "--init checkpoint's own (vicuna_v1 from scratch, chatml for SmolLM2, llama3 for Llama-3)")
    p.add_argument("--max-len", type=int, help="longest sample in tokens (default: the LM's max_seq_len)")
    p.add_argument("--frames", type=int, default=8, help="frames sampled uniformly from each video in --data "
                   "(a OneVision-style model's video_tokens grow with them); a shorter video is skipped")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="repeatable. With a preset --init, change a model field: vision.patch_size=16, "
                   "projector.kind=linear, lm.n_layers=2. world.KEY changes ShapesWorld: world.train_size=2000 "
                   "(experiments.py sweeps these)")
    g = p.add_argument_group("length and batch")
    g.add_argument("--epochs", type=int, default=1, help="passes over --data (ignored with --max-steps)")
    g.add_argument("--max-steps", type=int, help="optimizer steps (ShapesWorld default: the main job's)")
    g.add_argument("--batch-size", type=int, default=16, help="micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--ground", type=float, default=0.0, metavar="WEIGHT",
                   help="ShapesWorld finetune: add WEIGHT x model.grounding_loss, annealed linearly to 0 by the last "
                        "step, which tells one attention head per layer where the object each answer is about lies "
                        "(the main job: 4; issue #9)")
    g.add_argument("--ground-words", action=argparse.BooleanOptionalAction, default=False,
                   help="with --ground: also tell the first layer's head 0 to look, from the same position, at the "
                        "question's words that name that object (its colour and shape; the main job does)")
    g.add_argument("--shapes-captions", type=float, default=0.0, help="ShapesWorld finetune: share of samples "
                   "that are captions instead of questions (dense supervision of every object)")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (0: load in the main one)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help="peak lr (default: 1e-3 pretrain or from scratch; finetune 2e-5, "
                   "2e-4 with LoRA)")
    g.add_argument("--projector-lr", type=float, help="projector lr (default: --lr; 2e-5 with LoRA)")
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="linear warmup share, then cosine to 0")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay of matrices")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--seed", type=int, default=1337, help="init, data order and dropout")
    g = p.add_argument_group("what trains")
    g.add_argument("--train", help="comma list of vision,projector,lm (default: pretrain projector; finetune "
                   "projector,lm; from scratch all; LoRA projector + adapters)")
    g.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank on the LM (0: off)")
    g.add_argument("--lora-alpha", type=float, default=256.0, help="LoRA scale numerator (scale = alpha / rank)")
    g.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the adapters' input")
    g.add_argument("--lora-targets", default="qkv,proj,gate_up,down", help="LM Linear layers that get adapters")
    g = p.add_argument_group("performance and precision")
    g.add_argument("--device", help="default: cuda if available, else cpu")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=torch.cuda.is_available(),
                   help="torch.compile the model (default: on with CUDA)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   default="bfloat16" if torch.cuda.is_available() else "float32",
                   help="autocast dtype; float16 adds a GradScaler")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on CUDA")
    g.add_argument("--pack", action="store_true", help="pack several samples into each row of --max-len tokens "
                   "(block-diagonal attention, positions restart per sample): less compute spent on padding")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute LM blocks in backward: less memory")
    g.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP (under torchrun)")
    g = p.add_argument_group("checkpoints, logging and eval")
    g.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept (0: all)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in OUT/checkpoints")
    g.add_argument("--log-every", type=int, default=10, help="metrics.jsonl and progress bar every N steps")
    g.add_argument("--eval-every", type=int, default=0, help="held-out accuracy every N finetune steps (0: off)")
    g.add_argument("--eval-data", help="QA records for --eval-every (default: ShapesWorld's held-out split)")
    g.add_argument("--eval-samples", type=int, default=MAIN_JOB_EVAL, help="ShapesWorld held-out questions scored")
    args = p.parse_args(argv)
    if args.frames < 1:
        p.error("--frames must be at least 1")
    if args.ground_words and not args.ground:
        p.error("--ground-words adds to the grounding loss: give --ground WEIGHT too")
    if args.ground < 0 or args.ground and (args.data or args.grad_checkpointing or args.stage == "pretrain"):
        p.error("--ground needs a ShapesWorld finetune (it knows where each object is), a weight >= 0 and no "
                "--grad-checkpointing (which keeps no attention weights)")
    args.model_sets, args.world_sets = parse_sets(args.set)
    for key, value in args.model_sets.items():  # unknown fields fail now, not after the tokenizer is trained
        with contextlib.suppress(ValueError, TypeError):  # values are checked against the chosen preset later
            override(tiny_config(), key, value)
    if args.stage == "finetune" and args.init is None:
        args.init = "out/pretrain" if Path("out/pretrain/config.json").is_file() else "tiny"
    args.init = args.init or "tiny"
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        main_job(argv) if args.stage is None else train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

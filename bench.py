"""Benchmark: our VLM against transformers' LLaVA on the same weights and inputs, as a ratio.

Absolute times on shared machines mean little, so both implementations run in one process, interleaved
step by step, on identical random weights (ours exported with convert_weights.to_hf) and identical inputs.

    python bench.py --config small --what all --compare-hf
    python bench.py --config tinyllava-1.1b --what train --device cuda --batch-size 16 --text-tokens 200
    python bench.py --what anyres --threads 2    # tokens and prefill per image size, 16-frame video vs transformers

MFU (CUDA only) = model FLOPs per step / step time / the GPU's peak bf16 FLOP/s, where model FLOPs count
6 N_trained + 2 N_frozen per token through each part (ViT per patch, projector per image token, LM per token)
plus attention, 12 L T d per LM token for a trained LM (forward + backward) and 4 L T d per ViT patch.
"""

import argparse
import copy
import dataclasses
import json
import statistics
import subprocess
import tempfile
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from model import VLM, preset

COPY_MB = 512  # the bandwidth benchmark's buffer, 16x the L3
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core peak


def make_batch(model: VLM, batch_size: int, text_tokens: int, device, seed=0):
    """BOS, one image block, then text; the second half of the text is the supervised answer."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, cfg.image_token_id, (batch_size, text_tokens), generator=g)
    ids = torch.cat([torch.ones(batch_size, 1, dtype=torch.long),
                     torch.full((batch_size, cfg.num_image_tokens), cfg.image_token_id), text], dim=1)
    labels = ids.clone()
    labels[:, : ids.size(1) - text_tokens // 2] = -100
    pixels = torch.randn(batch_size, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ids.to(device), pixels.to(device), labels.to(device)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def interleave(fns: dict, repeats: int, warmup: int, device) -> dict:
    """Run each callable in turn, `repeats` times after `warmup` rounds; return {name: [seconds]}."""
    times = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            t = timed(fn, device)
            if i >= warmup:
                times[name].append(t)
    return times


# ----------------------------------------------------------------------------- the two implementations


def our_train_step(model, batch, optimizer, autocast):
    ids, pixels, labels = batch

    def step():
        with autocast:
            _, loss = model(ids, pixels, labels=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def hf_train_step(model, batch, optimizer, autocast):
    ids, pixels, labels = batch

    def step():
        with autocast:
            loss = model(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def freeze_like_finetune(vision, trained_parts):
    """Finetune stage: vision frozen, projector + LM trained."""
    vision.requires_grad_(False)
    params = [p for part in trained_parts for p in part.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def train_flops(model: VLM, batch_size: int, seq_len: int) -> float:
    cfg = model.cfg
    n_vit = sum(p.numel() for p in model.vision.parameters())
    n_proj = sum(p.numel() for p in model.projector.parameters())
    n_lm = sum(p.numel() for p in model.lm.parameters()) - model.lm.tok_embed.weight.numel() * (
        not cfg.lm.tie_embeddings)
    patches = cfg.vision.num_patches + cfg.vision.class_token
    vit = 2 * n_vit * patches + 4 * cfg.vision.depth * patches * patches * cfg.vision.width
    proj = 6 * n_proj * cfg.num_image_tokens
    attn_lm = 12 * cfg.lm.n_layers * seq_len * cfg.lm.n_heads * cfg.lm.head_dim
    lm = (6 * n_lm + attn_lm) * seq_len
    return batch_size * (vit + proj + lm)


def bench_train(ours, hf, args, device, dtype, report):
    batch = make_batch(ours, args.batch_size, args.text_tokens, device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    fused = device.type == "cuda"
    steps = {}
    params = freeze_like_finetune(ours.vision, [ours.projector, ours.lm])
    steps["ours"] = our_train_step(ours, batch, torch.optim.AdamW(params, lr=1e-5, fused=fused), autocast)
    if hf is not None:
        params = freeze_like_finetune(hf.model.vision_tower, [hf.model.multi_modal_projector,
                                                              hf.model.language_model, hf.lm_head])
        steps["transformers"] = hf_train_step(hf, batch, torch.optim.AdamW(params, lr=1e-5, fused=fused), autocast)
    times = interleave(steps, args.repeats, args.warmup, device)
    tokens = batch[0].numel()
    for name, ts in times.items():
        step = statistics.median(ts)
        row = {"step_s": step, "tokens_per_s": tokens / step, "samples_per_s": args.batch_size / step}
        if device.type == "cuda":
            row["mfu"] = train_flops(ours, args.batch_size, batch[0].size(1)) / step / peak_flops()
        report.setdefault("train", {})[name] = row
    if device.type == "cuda":  # peak memory, one implementation at a time
        for name, step in steps.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            step()
            report["train"][name]["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9


def generate_fns(ours, hf, ids, pixels, new_tokens: int, compiled=None, state=None) -> dict:
    """{name: callable} generating exactly `new_tokens` greedy tokens with each implementation.

    compiled: a copy of ours with compile_decode_step(), run over `state`, one fixed-size cache for every call."""
    fns = {"ours": lambda: ours.generate(ids, pixels, max_new_tokens=new_tokens)}
    if compiled is not None:
        fns["ours compiled"] = lambda: (state.reset(), compiled.generate(ids, pixels, max_new_tokens=new_tokens,
                                                                         state=state))[1]
    if hf is not None:
        kw = dict(input_ids=ids, pixel_values=pixels, do_sample=False, pad_token_id=0, eos_token_id=None,
                  max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        fns["transformers"] = lambda: hf.generate(**kw)
        fns["transformers static"] = lambda: hf.generate(**kw, cache_implementation="static")
    return fns


def bench_decode(ours, hf, args, device, dtype, report):
    """Batch 1 and 8: ours eager and compiled, transformers with its default (dynamic) and its static cache."""
    compiled = copy.deepcopy(ours)
    compiled.compile_decode_step()
    for batch_size in (1, 8):
        ids, pixels, _ = make_batch(ours, batch_size, args.text_tokens, device)
        pixels = pixels.to(dtype)
        state = compiled.new_state(batch_size, ids.size(1) + args.new_tokens)
        make_fns = partial(generate_fns, ours, hf, ids, pixels, compiled=compiled, state=state)  # (n) -> fns
        rows = decode_rates(make_fns, batch_size, args.new_tokens, args, device)
        for row in rows.values():
            row |= {"weight_mb": decode_bytes(ours) / 1e6, "batch_size": batch_size}  # transformers: the same
        report[f"decode_b{batch_size}"] = rows


def decode_bytes(model: VLM) -> int:
    """Weight bytes one decode step reads: the blocks and the head (tied or not, int8 with its scales). Of the
    embedding table it reads one row. An int4 layer's kernel reads its packed copy and bf16 scales and zeros,
    not the stored nibbles and float scales."""
    from quantize import Int4Linear

    tensors = {}
    for module in [*model.lm.blocks.modules(), *model.lm.head.modules()]:
        own = [module.packed, module.scales_and_zeros, module.bias] if isinstance(module, Int4Linear) else \
            [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        tensors |= {id(t): t for t in own if t is not None}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def copy_bandwidth(mb: int = COPY_MB, repeats: int = 5) -> float:
    """The machine's memory bandwidth in GB/s from a plain large copy: bytes read plus bytes written over the
    best time. Far larger than the 32 MB L3, so it measures DRAM, the ceiling for weights that do not fit."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    best = min(timed(lambda: dst.copy_(src), torch.device("cpu")) for _ in range(repeats))
    return 2 * src.numel() * 4 / best / 1e9


def decode_rates(make_fns, batch_size: int, new_tokens: int, args, device) -> dict:
    """{name: {tokens_per_s, prefill_s}} for make_fns(n) -> {name: callable that generates n tokens}, timed
    interleaved. Decode speed excludes the prompt: (total time - time to the first token) over the later tokens."""
    with torch.inference_mode():
        times = interleave(make_fns(new_tokens), args.repeats, args.warmup, device)
        first = interleave(make_fns(1), args.repeats, args.warmup, device)
    rows = {}
    for name in times:
        total, prefill = statistics.median(times[name]), statistics.median(first[name])
        rows[name] = {"tokens_per_s": batch_size * (new_tokens - 1) / max(total - prefill, 1e-9), "prefill_s": prefill}
    return rows


def load_hf_lm(path: Path, device, dtype):
    """transformers' own model for an HF LM dir, or for a GGUF file, which it dequantizes itself."""
    import transformers  # only the benchmark's oracle, never a runtime dependency

    where, kw = (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})
    hf = transformers.AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa", **kw)
    return hf.to(device).eval()


def our_paths(args, device, dtype, max_len: int) -> dict:
    """--paths: {name: (model, state)} for each of our decode paths on --checkpoint, e.g. "bf16", "int8",
    "int4 compiled". A compiled path decodes over one fixed-size state, reset before each call."""
    paths = {}
    for path in filter(None, args.paths.split(",")):
        kind, _, compiled = path.strip().partition(" ")
        if kind not in ("fp32", "bf16", "int8", "int4") or compiled not in ("", "compiled"):
            raise SystemExit(f"--paths: {path!r} is not fp32, bf16, int8 or int4, optionally followed by ' compiled'")
        model = VLM.from_pretrained(args.checkpoint, device=device,
                                    dtype=torch.bfloat16 if kind == "bf16" else dtype).eval()
        if kind in ("int8", "int4") and model.cfg.quantize is None:
            model.quantize(kind)
        state = None
        if compiled:
            model.compile_decode_step()
            state = model.new_state(1, max_len)
        paths[f"ours {path.strip()}"] = (model, state)
    return paths


def generate_over(model: VLM, state, ids, n: int):
    if state is not None:
        state.reset()
    return model.generate(ids, max_new_tokens=n, state=state)


def llama_bench(binary: str, gguf: Path, n: int, repeats: int) -> dict:
    """llama.cpp's own benchmark on the same GGUF file: `llama-bench -p 0 -n n`, the decode rate of n tokens, with
    torch's thread count. A benchmark-only yardstick, run as a separate program; never a dependency."""
    cmd = [binary, "-m", str(gguf), "-p", "0", "-n", str(n), "-r", str(repeats), "-t", str(torch.get_num_threads()),
           "-o", "json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise SystemExit(f"--llama-cpp: no llama-bench at {binary!r} (build llama.cpp's llama-bench target and "
                         "pass --llama-bench PATH; docs/perf.md gives the build flags)") from None
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"--llama-cpp: {binary} failed on {gguf}: {err.stderr.strip().splitlines()[-1:]}") from None
    (run,) = json.loads(out)
    return {"tokens_per_s": run["avg_ts"], "prefill_s": float("nan"), "build": run.get("build_commit", "?")}


def gguf_decode_bytes(gguf: Path) -> int:
    """Bytes of a GGUF file's tensors that one decode step reads: all of them (a tied model's token table is
    also its head, read in full)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(gguf).tensors)


QUALITY_TEXT = Path(__file__).parent / "docs" / "quality_text.txt"


@torch.inference_mode()
def bench_quality(args, device) -> dict:
    """Each reduced-precision path against fp32, teacher-forced on docs/quality_text.txt (~2,600 SmolLM2 tokens):
    top-1 agreement, the largest logit difference, and perplexity. The variants say whether the LM head and the
    embedding table need full precision: "fp32 head" keeps the head, "int8 + int8 embeddings" also rounds the
    table that the prompt's tokens are looked up in; "fp32 activations" is the plain path, without the fused
    kernel's bf16. int4 keeps its head int8 (quantize_lm); "int4, int4 head" says why."""
    from quantize import Int4Linear, Int8Linear, quantize_int4, quantize_int8, quantize_lm, quantize_weight
    from tokenizer import load_tokenizer

    ids = torch.tensor([load_tokenizer(args.checkpoint).encode(QUALITY_TEXT.read_text())], device=device)
    fp32 = VLM.from_pretrained(args.checkpoint, device=device).eval()

    def load(quantize=None, dtype=None, embed_int8=False, fused=True):
        model = VLM.from_pretrained(args.checkpoint, device=device, dtype=dtype).eval()
        if quantize:
            quantize(model.lm)
            for layer in model.modules():
                if isinstance(layer, (Int8Linear, Int4Linear)):
                    layer.fused = fused
        if embed_int8:
            q, scales = quantize_weight(model.lm.tok_embed.weight)
            model.lm.tok_embed.weight.copy_(q * scales[:, None])
        return model

    int4 = partial(quantize_lm, kind="int4")
    variants = {"bf16": lambda: load(dtype=torch.bfloat16), "int8": lambda: load(quantize_int8),
                "int8, fp32 activations (plain path)": lambda: load(quantize_int8, fused=False),
                "int8, fp32 head": lambda: load(partial(quantize_int8, skip=("head",))),
                "int8 + int8 embeddings": lambda: load(quantize_int8, embed_int8=True),
                "int4 (int8 head)": lambda: load(int4),
                "int4, fp32 activations (plain path)": lambda: load(int4, fused=False),
                "int4, fp32 head": lambda: load(partial(quantize_int4, skip=("head",))),
                "int4, int4 head": lambda: load(quantize_int4)}
    targets = ids[0, 1:]
    ref = fp32(ids)[0][0, :-1].float()  # (T - 1, V)
    ref_ppl = F.cross_entropy(ref, targets).exp().item()
    rows = {"fp32": {"tokens": len(targets), "ppl": ref_ppl}}
    for name, make in variants.items():
        logits = make()(ids)[0][0, :-1].float()
        ppl = F.cross_entropy(logits, targets).exp().item()
        rows[name] = {"top1_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                      "max_logit_error": (logits - ref).abs().max().item(), "ppl": ppl,
                      "ppl_change": ppl / ref_ppl - 1}
    rows["fp32"]["logit_scale"] = ref.abs().max().item()
    return rows


def print_quality(rows: dict):
    fp32 = rows["fp32"]
    print(f"teacher-forced on {fp32['tokens']} tokens of {QUALITY_TEXT.name}; fp32 perplexity {fp32['ppl']:.3f}, "
          f"largest |logit| {fp32['logit_scale']:.1f}")
    print(f"{'path':<38}{'top-1 agreement':>16}{'max logit error':>17}{'perplexity':>12}{'vs fp32':>9}")
    for name, row in rows.items():
        if name != "fp32":
            print(f"{name:<38}{row['top1_agreement']:>16.2%}{row['max_logit_error']:>17.3f}{row['ppl']:>12.3f}"
                  f"{row['ppl_change']:>+9.2%}")


def bench_lm_decode(args, device, dtype, report):
    """Batch-1 greedy decode of a converted real LM (text only, a chat prompt) against transformers' generate on
    the same weights (--hf-lm: the HF dir or GGUF file it was converted from), in one run."""
    from tokenizer import build_prompt, encode_prompt, load_tokenizer

    ours = VLM.from_pretrained(args.checkpoint, device=device, dtype=dtype).eval()
    cfg, tokenizer = ours.cfg, load_tokenizer(args.checkpoint)
    prompt = build_prompt([{"from": "human", "value": "Tell me about the history of Lisbon."}], cfg.template,
                          tokenizer, cfg.system)
    ids = torch.tensor([encode_prompt(tokenizer, prompt, cfg.template, cfg.image_token_id, 0)], device=device)
    peers = {"transformers": load_hf_lm(args.hf_lm, device, dtype)} if args.hf_lm else {}

    paths = our_paths(args, device, dtype, ids.size(1) + args.new_tokens)  # {name: (model, state or None)}

    def make_fns(n: int) -> dict:  # exactly n greedy tokens each: no eos stops either early
        fns = {"ours": lambda: ours.generate(ids, max_new_tokens=n)}
        fns |= {name: partial(generate_over, model, state, ids, n) for name, (model, state) in paths.items()}
        for name, hf in peers.items():
            fns[name] = lambda hf=hf: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                  max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                                  pad_token_id=tokenizer.pad_id)[:, ids.size(1):]
        return fns

    report["lm_decode_b1"] = decode_rates(make_fns, 1, args.new_tokens, args, device)
    if args.llama_cpp:  # its own timer, right after ours; it feeds tokens without sampling, so no token check
        report["lm_decode_b1"]["llama.cpp"] = llama_bench(args.llama_bench, args.llama_cpp, args.new_tokens,
                                                          args.repeats)
    models = {"ours": ours, "transformers": ours} | {name: model for name, (model, _) in paths.items()}
    for name, row in report["lm_decode_b1"].items():  # transformers reads the same weights as ours
        row["weight_mb"] = (decode_bytes(models[name]) if name in models else gguf_decode_bytes(args.llama_cpp)) / 1e6
    with torch.inference_mode():
        outputs = {name: torch.as_tensor(fn()).view(-1).tolist() for name, fn in make_fns(args.new_tokens).items()}
    ours_tokens = outputs.pop("ours")
    for name, tokens in outputs.items():  # fp32 peers must agree, or the comparison is not like for like
        report["lm_decode_b1"][name]["same_tokens"] = tokens == ours_tokens
    report["config"] = f"{args.checkpoint} (prompt {ids.size(1)} tokens, {args.new_tokens} new)"


def bench_tokenize(args, report):
    """encode_conversation (ids + assistant-only labels) over ShapesWorld conversations in LLaVA's layout (an image
    tag, then questions and answers), samples/s: a ShapesWorld sentencepiece tokenizer trained here, and with
    --checkpoint its own tokenizer (e.g. SmolLM2's tokenizer.json) in vicuna_v1 and in its own template, and with
    --compare-hf transformers' apply_chat_template on the same conversations. Each pass over --samples
    conversations is timed in turn, --repeats rounds, so shared-machine noise hits all alike."""
    from data import ShapesWorld
    from tokenizer import detect_template, encode_conversation, load_tokenizer, train_tokenizer

    world = ShapesWorld()
    unique = [world.conversation(world.scene(i), i)[0] for i in range(min(args.samples, 2000))]
    conversations = [unique[i % len(unique)] for i in range(args.samples)]
    with tempfile.TemporaryDirectory() as tmp:
        peers = {"sentencepiece vicuna_v1": (train_tokenizer(world.texts(500), 400, Path(tmp) / "t.model"),
                                             "vicuna_v1")}
    if args.checkpoint:
        tok = load_tokenizer(args.checkpoint)
        kind = "bpe" if tok.path.suffix == ".json" else "sentencepiece"
        for template in dict.fromkeys(("vicuna_v1", detect_template(args.checkpoint))):
            peers[f"{kind} {template}"] = (tok, template)

    encoders = {name: lambda c, tok=tok, template=template: encode_conversation(tok, c, template, 10**9, 1)[0]
                for name, (tok, template) in peers.items()}
    if args.checkpoint and args.compare_hf:  # ids only, no labels: less work than encode_conversation does
        import transformers  # only the benchmark's peer, never a runtime dependency

        hf = transformers.AutoTokenizer.from_pretrained(args.checkpoint)
        roles = {"human": "user", "gpt": "assistant"}
        encoders["transformers apply_chat_template"] = lambda c: hf.apply_chat_template(
            [{"role": roles[t["from"]], "content": t["value"]} for t in c], tokenize=True)["input_ids"]
    times = interleave({name: lambda encode=encode: [encode(c) for c in conversations]
                        for name, encode in encoders.items()}, args.repeats, 0, torch.device("cpu"))
    base = args.samples / statistics.median(times["sentencepiece vicuna_v1"])
    report["tokenize"] = {}
    for name, encode in encoders.items():
        rate = args.samples / statistics.median(times[name])
        tokens = sum(len(encode(c)) for c in unique) / len(unique)
        report["tokenize"][name] = {"samples_per_s": rate, "tokens_per_sample": tokens, "vs_sentencepiece": rate / base}
    report["config"] = f"{args.samples:,} ShapesWorld conversations, {args.repeats} rounds" + (
        f", {args.checkpoint}" if args.checkpoint else "")


ANYRES_SIZES = [(112, 112), (336, 448), (768, 1024)]  # (h, w): one tile's worth, a photo, a large photo
VIDEO_FRAMES = 16


@torch.inference_mode()
def bench_anyres(args, device, report):
    """Image tokens and prefill (one forward over image + --text-tokens) at base resolution vs anyres, on the small
    preset with LLaVA-NeXT's pinpoints scaled to its 112 px tower (the same weights: anyres adds the newline);
    then a VIDEO_FRAMES-frame video through the OneVision path, ours vs transformers on the same random weights.
    Each pair runs interleaved, so load from other processes hits both alike."""
    from PIL import Image

    from data import images_to_pixels

    cfg = preset("small")
    S = cfg.vision.image_size
    pinpoints = [[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]]
    torch.manual_seed(0)
    base = VLM(cfg).to(device).eval()
    tiled = VLM(dataclasses.replace(cfg, grid_pinpoints=pinpoints)).to(device).eval()
    tiled.load_checked(base.state_dict() | {"image_newline": tiled.image_newline.detach()})
    text = torch.randint(3, cfg.image_token_id, (1, args.text_tokens), generator=torch.Generator().manual_seed(0))
    report["anyres"] = {}
    for h, w in ANYRES_SIZES:
        image, runs = Image.new("RGB", (w, h), (120, 60, 30)), {}
        for name, model in (("base", base), ("anyres", tiled)):
            n = model.cfg.image_tokens((h, w))
            ids = torch.cat([torch.ones(1, 1, dtype=torch.long), torch.full((1, n), cfg.image_token_id), text], 1)
            px = images_to_pixels([image], model.cfg, "pad").to(device)
            runs[name] = (n, len(px), partial(model, ids.to(device), px, image_sizes=torch.tensor([[h, w]])))
        times = interleave({name: run[2] for name, run in runs.items()}, args.repeats, args.warmup, device)
        t = {name: statistics.median(v) for name, v in times.items()}
        report["anyres"][f"{w} x {h}"] = {"base_tokens": runs["base"][0], "anyres_tokens": runs["anyres"][0],
                                          "anyres_views": runs["anyres"][1], "base_s": t["base"],
                                          "anyres_s": t["anyres"]}
    report["video"] = bench_video(args, device, S)


def bench_video(args, device, S: int) -> dict:
    """Encoding a VIDEO_FRAMES-frame video (SigLIP at the small preset's size, 2x2 pooling, newline): s/video,
    ours against transformers' LlavaOnevision get_video_features on the same weights, and their max rel err."""
    import transformers  # only the benchmark's peer, never a runtime dependency

    import convert_weights

    vision = transformers.SiglipVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=5,
                                             num_attention_heads=4, image_size=S, patch_size=14)
    text = transformers.Qwen2Config(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2)
    hf_cfg = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=999,
                                               video_token_index=998, image_grid_pinpoints=[[S, S], [S, 2 * S]],
                                               vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(0)
    hf = transformers.LlavaOnevisionForConditionalGeneration(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(Path(tmp) / "hf")
        convert_weights.main(["--llava", str(Path(tmp) / "hf"), "--out", str(Path(tmp) / "ours")])
        ours = VLM.from_pretrained(Path(tmp) / "ours").eval().to(device)
    hf = hf.to(device)
    videos = torch.randn(1, VIDEO_FRAMES, 3, S, S, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        want = hf.model.get_video_features(pixel_values_videos=videos).pooler_output
        got = ours.video_features(videos)
        times = interleave({"ours": partial(ours.video_features, videos),
                            "transformers": partial(hf.model.get_video_features, pixel_values_videos=videos)},
                           args.repeats, args.warmup, device)
    return {"frames": VIDEO_FRAMES, "tokens": len(got), "max_rel_err": ((got - want.reshape(got.shape)).abs().max()
                                                                          / want.abs().max()).item(),
            "ours_s": statistics.median(times["ours"]), "transformers_s": statistics.median(times["transformers"])}


def print_anyres(report: dict):
    print(f"{'image (w x h)':<14}{'base tokens':>12}{'anyres tokens':>15}{'views':>7}{'base s':>9}{'anyres s':>10}"
          f"{'anyres/base':>13}")
    for size, row in report["anyres"].items():
        print(f"{size:<14}{row['base_tokens']:>12}{row['anyres_tokens']:>15}{row['anyres_views']:>7}"
              f"{row['base_s']:>9.3f}{row['anyres_s']:>10.3f}{row['anyres_s'] / row['base_s']:>12.2f}x")
    v = report["video"]
    print(f"{v['frames']}-frame video ({v['tokens']} tokens, max rel err {v['max_rel_err']:.1e}): ours "
          f"{v['ours_s']:.3f} s, transformers {v['transformers_s']:.3f} s per video, "
          f"{v['transformers_s'] / v['ours_s']:.2f}x (> 1: ours faster)")


def llava_mix_samples(model: VLM, n: int, seed=0) -> list[dict]:
    """Finetuning samples with LLaVA-mix-like lengths: one image, a ~40-token prompt, and an answer that is a
    short phrase half the time (VQA-style) and a long-tailed paragraph otherwise (lognormal, median ~90)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        short = torch.rand(1, generator=g).item() < 0.5
        answer = int(torch.randint(2, 9, (1,), generator=g)) if short else \
            int(min(512, torch.empty(1).log_normal_(4.5, 0.7, generator=g).item()))
        prompt = torch.randint(3, cfg.image_token_id, (40,), generator=g)
        text = torch.randint(3, cfg.image_token_id, (answer,), generator=g)
        ids = torch.cat([torch.tensor([1]), torch.full((cfg.num_image_tokens,), cfg.image_token_id), prompt, text])
        labels = torch.cat([torch.full((len(ids) - answer,), -100), text])
        pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
        samples.append({"id": i, "input_ids": ids, "labels": labels, "pixel_values": pixels})
    return samples


def bench_pack(model, args, device, dtype, report):
    """Padded vs packed finetuning batches of the same samples: real (non-padding) tokens per second."""
    from data import collate

    samples = llava_mix_samples(model, args.batch_size)
    longest = max(len(s["input_ids"]) for s in samples)
    batches = {"padded": collate(samples, pad_id=0), "packed": collate(samples, pad_id=0, pack_len=longest)}
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    params = freeze_like_finetune(model.vision, [model.projector, model.lm])
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")

    def step_fn(batch):
        def step():
            with autocast:
                _, loss = model(batch["input_ids"].to(device), batch["pixel_values"].to(device),
                                labels=batch["labels"].to(device), segment_ids=None if batch["segment_ids"] is None
                                else batch["segment_ids"].to(device))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    times = interleave({k: step_fn(b) for k, b in batches.items()}, args.repeats, args.warmup, device)
    real = sum(len(s["input_ids"]) for s in samples)
    for name, batch in batches.items():
        step = statistics.median(times[name])
        rows, row_len = batch["input_ids"].shape
        report.setdefault("pack", {})[name] = {"rows": rows, "row_len": row_len, "step_s": step,
                                               "real_tokens_per_s": real / step}


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 989e12)


def load_hf_twin(model: VLM, device, dtype):
    """The same weights in transformers' LLaVA (SDPA attention), through our exporter."""
    import transformers  # only the benchmark's oracle, never a runtime dependency

    import convert_weights

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "ours")
        convert_weights.to_hf(Path(tmp) / "ours", Path(tmp) / "hf")
        hf = transformers.LlavaForConditionalGeneration.from_pretrained(
            Path(tmp) / "hf", dtype=dtype, attn_implementation="sdpa")
    return hf.to(device).train(False)


def print_roofline(report: dict):
    """Each decode path's tokens/s, its ratio to transformers' default generate, and the weight bytes it streams
    per second (weight bytes per step x steps/s) as a fraction of the measured copy bandwidth."""
    bandwidth = report.get("copy_gb_s")
    for section, rows in report.items():
        if not (isinstance(rows, dict) and "ours" in rows and "weight_mb" in rows["ours"]):
            continue
        batch = rows["ours"].get("batch_size", 1)
        base = rows.get("transformers", {}).get("tokens_per_s")
        print(f"{section:<24}{'tokens/s':>10}{'vs transformers':>17}{'weights MB':>12}{'GB/s':>8}"
              f"{'of copy bw' if bandwidth else '':>12}")
        for name, row in rows.items():
            gb_s = row["weight_mb"] / 1e3 * row["tokens_per_s"] / batch
            ratio = f"{row['tokens_per_s'] / base:.2f}x" if base else ""
            share = f"{gb_s / bandwidth:.0%}" if bandwidth else ""
            print(f"  {name:<22}{row['tokens_per_s']:>10,.1f}{ratio:>17}{row['weight_mb']:>12.1f}{gb_s:>8.1f}"
                  f"{share:>12}")
    if bandwidth:
        print(f"copy bandwidth (plain {COPY_MB} MB copy, read + write): {bandwidth:.1f} GB/s")


def print_table(report: dict):
    if "pack" in report:
        padded, packed = report["pack"]["padded"], report["pack"]["packed"]
        for name, row in report["pack"].items():
            print(f"{name:<8} {row['rows']:>3} rows x {row['row_len']:>4} tokens  {row['step_s']:.3f} s/step  "
                  f"{row['real_tokens_per_s']:,.0f} real tokens/s")
        print(f"packing gain: {packed['real_tokens_per_s'] / padded['real_tokens_per_s']:.2f}x")
    print_roofline(report)
    sections = {k: rows for k, rows in report.items() if isinstance(rows, dict) and "ours" in rows
                and "weight_mb" not in rows["ours"]}  # decode sections: print_roofline's table
    if not sections:
        return
    print(f"{'measure':<28}{'ours':>14}{'transformers':>16}{'ratio':>10}")
    for section, rows in sections.items():
        for metric, value in rows["ours"].items():
            ref = rows.get("transformers", {}).get(metric)
            better_low = metric.endswith(("_s", "_gb")) and not metric.endswith("per_s")
            ratio = "" if ref is None else f"{(ref / value if better_low else value / ref):.2f}x"
            fmt = lambda x: "" if x is None else (f"{x:.3f}" if x < 100 else f"{x:,.0f}")
            print(f"{section + ' ' + metric:<28}{fmt(value):>14}{fmt(ref):>16}{ratio:>10}")
    print("ratio > 1 means ours is better (faster, or less memory)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="small", help="a preset from model.py: tiny, small, tinyllava-1.1b, ...")
    p.add_argument("--what", choices=["train", "decode", "pack", "lm-decode", "quality", "tokenize", "anyres",
                                      "all"],
                   default="all",
                   help="pack: padded vs packed finetuning batches with LLaVA-mix-like lengths (ours only); "
                   "lm-decode: batch-1 text decode of a converted real LM (--checkpoint) against transformers "
                   "(--hf-lm); tokenize: encode_conversation samples/s, sentencepiece against --checkpoint's "
                   "tokenizer (--samples); quality: bf16, int8 and int4 against fp32, teacher-forced on "
                   "docs/quality_text.txt (--checkpoint); anyres: image tokens and prefill, base resolution vs "
                   "anyres tiles, 3 sizes, and a 16-frame video's encoding against transformers' OneVision; none "
                   "of these is part of all")
    p.add_argument("--checkpoint", type=Path, help="lm-decode: our checkpoint, e.g. converted from SmolLM2")
    p.add_argument("--hf-lm", type=Path, help="lm-decode: the HF dir or .gguf file it was converted from, run by "
                   "transformers on the same weights (omit to time ours alone)")
    p.add_argument("--paths", default="", help="lm-decode, quality: more of our decode paths on --checkpoint, "
                   "comma-separated: fp32, bf16, int8, int4, each optionally followed by ' compiled' (e.g. "
                   "'bf16,int4 compiled')")
    p.add_argument("--llama-cpp", type=Path, metavar="FILE.gguf", help="lm-decode: also time llama.cpp on this "
                   "GGUF file (the one --checkpoint was converted from), with its llama-bench and the same threads")
    p.add_argument("--llama-bench", default="llama-bench", help="lm-decode: path of llama.cpp's llama-bench binary")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers on the same weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights for decode, autocast for training (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="training micro-batch")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens after the image block")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to decode")
    p.add_argument("--samples", type=int, default=100_000, help="tokenize: conversations per timed pass")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per implementation")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    report = measure(args, p, device, dtype)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def measure(args, p, device, dtype) -> dict:
    """Run the --what benchmark, print its table and return its report."""
    if args.what == "tokenize":
        report = {}
        bench_tokenize(args, report)
        print(f"{report['config']}; cpu, one process")
        for name, row in report["tokenize"].items():
            print(f"{name:<34}{row['samples_per_s']:>8,.0f} samples/s{row['tokens_per_sample']:>8.1f} tokens/sample"
                  f"{row['vs_sentencepiece']:>8.2f}x")
        return report
    if args.what == "anyres":
        report = {"config": "small", "device": str(device), "threads": torch.get_num_threads()}
        bench_anyres(args, device, report)
        print(f"small preset (112 px tower, LM dim 256 x 4) + {args.text_tokens} text tokens on {device} "
              f"({report['threads']} threads), fp32, median of {args.repeats}")
        print_anyres(report)
        return report
    if args.what == "quality":
        if args.checkpoint is None:
            p.error("--what quality needs --checkpoint (a converted real LM, e.g. SmolLM2)")
        report = {"quality": bench_quality(args, device)}
        print_quality(report["quality"])
        return report
    if args.what == "lm-decode":
        if args.checkpoint is None:
            p.error("--what lm-decode needs --checkpoint (and --hf-lm for the ratio)")
        report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch.")}
        report["copy_gb_s"] = copy_bandwidth() if device.type == "cpu" else None
        bench_lm_decode(args, device, dtype, report)
        print(f"{report['config']} on {report['device']} ({report['threads']} threads), {report['dtype']}")
        print_table(report)
        for name, row in report["lm_decode_b1"].items():
            if "same_tokens" in row:
                print(f"{name}: {'the same' if row['same_tokens'] else 'DIFFERENT'} greedy tokens as ours")
        return report
    torch.manual_seed(0)
    ours = VLM(preset(args.config)).to(device)
    hf = load_hf_twin(ours, device, torch.float32) if args.compare_hf else None
    report = {"config": args.config, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "dtype": str(dtype).removeprefix("torch.")}
    if args.what in ("train", "all"):
        bench_train(ours, hf, args, device, dtype, report)
    if args.what == "pack":
        bench_pack(ours, args, device, dtype, report)
    if args.what in ("decode", "all"):
        report["copy_gb_s"] = copy_bandwidth() if device.type == "cpu" else None
        ours_dec, hf_dec = ours.to(dtype).eval(), hf.to(dtype).eval() if hf is not None else None
        bench_decode(ours_dec, hf_dec, args, device, dtype, report)
    print(f"config {args.config} on {report['device']} ({report['threads']} threads), {report['dtype']}")
    print_table(report)
    return report


if __name__ == "__main__":
    main()

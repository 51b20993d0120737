"""Benchmark: our VLM against transformers' LLaVA on the same weights and inputs, as a ratio.

Absolute times on shared machines mean little, so both implementations run in one process, interleaved
step by step, on identical random weights (ours exported with convert_weights.to_hf) and identical inputs.

    python bench.py --config small --what all --compare-hf
    python bench.py --config tinyllava-1.1b --what train --device cuda --batch-size 16 --text-tokens 200

MFU (CUDA only) = model FLOPs per step / step time / the GPU's peak bf16 FLOP/s, where model FLOPs count
6 N_trained + 2 N_frozen per token through each part (ViT per patch, projector per image token, LM per token)
plus attention, 12 L T d per LM token for a trained LM (forward + backward) and 4 L T d per ViT patch.
"""

import argparse
import json
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from model import VLM, preset

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


def generate_fns(ours, hf, ids, pixels, new_tokens: int) -> dict:
    """{name: callable} generating exactly `new_tokens` greedy tokens with each implementation."""
    fns = {"ours": lambda: ours.generate(ids, pixels, max_new_tokens=new_tokens)}
    if hf is not None:
        kw = dict(input_ids=ids, pixel_values=pixels, do_sample=False, pad_token_id=0, eos_token_id=None)
        fns["transformers"] = lambda: hf.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return fns


def bench_decode(ours, hf, args, device, dtype, report):
    """Decode speed excludes the prompt: (total time - time to the first token) over the later tokens."""
    for batch_size in (1, 8):
        ids, pixels, _ = make_batch(ours, batch_size, args.text_tokens, device)
        pixels = pixels.to(dtype)
        with torch.inference_mode():
            times = interleave(generate_fns(ours, hf, ids, pixels, args.new_tokens), args.repeats, args.warmup, device)
            first = interleave(generate_fns(ours, hf, ids, pixels, 1), args.repeats, args.warmup, device)
        for name in times:
            total, prefill = statistics.median(times[name]), statistics.median(first[name])
            report.setdefault(f"decode_b{batch_size}", {})[name] = {
                "tokens_per_s": batch_size * (args.new_tokens - 1) / max(total - prefill, 1e-9), "prefill_s": prefill}


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


def print_table(report: dict):
    if "pack" in report:
        padded, packed = report["pack"]["padded"], report["pack"]["packed"]
        for name, row in report["pack"].items():
            print(f"{name:<8} {row['rows']:>3} rows x {row['row_len']:>4} tokens  {row['step_s']:.3f} s/step  "
                  f"{row['real_tokens_per_s']:,.0f} real tokens/s")
        print(f"packing gain: {packed['real_tokens_per_s'] / padded['real_tokens_per_s']:.2f}x")
    sections = {k: rows for k, rows in report.items() if isinstance(rows, dict) and "ours" in rows}
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
    p.add_argument("--what", choices=["train", "decode", "pack", "all"], default="all",
                   help="pack: padded vs packed finetuning batches with LLaVA-mix-like lengths (ours only)")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers on the same weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights for decode, autocast for training (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="training micro-batch")
    p.add_argument("--text-tokens", type=int, default=64, help="text tokens after the image block")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to decode")
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
        ours_dec, hf_dec = ours.to(dtype).eval(), hf.to(dtype).eval() if hf is not None else None
        bench_decode(ours_dec, hf_dec, args, device, dtype, report)
    print(f"config {args.config} on {report['device']} ({report['threads']} threads), {report['dtype']}")
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

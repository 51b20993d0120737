"""Sample from a trained VLM: a streamed answer, a batch of samples, a multi-turn chat, or an attention map.

    python sample.py --image photo.jpg                                  # out/finetune, "Describe the image."
    python sample.py --image a.png --image b.png --prompt "<image> vs <image>: what changed?"
    python sample.py --image photo.jpg --chat                           # /image PATH and /reset in the chat
    python sample.py --image photo.jpg --attention-map attn.png         # + attn_tokens.png, one map per word
    python sample.py --video clip.mp4 --frames 8 --prompt "What happens?"  # a OneVision-style checkpoint

Decoding follows LLaVA's: the prompt goes through the checkpoint's chat template, each `<image>` becomes a block
of placeholder tokens, and tokens are decoded one by one from a KV cache until a stop token (eos, or the template's
end of turn such as <|im_end|>). Without --image the prompt is text only. --compile compiles the
one-token step over a static cache (gpt-fast); --attention-map re-reads prompt + answer once with explicit
attention weights, so ordinary generation never pays for them.
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import SafetensorError

import anyres
from data import DataError, expand_images, images_to_pixels, load_image, preprocess_video
from model import VLM
from tokenizer import (
    IMAGE,
    OWN_BOS,
    TEMPLATES,
    TextStream,
    Tokenizer,
    build_prompt,
    check_template,
    end_of_turn_id,
    load_tokenizer,
    template_kw,
    template_pieces,
    tokenize_prompt,
)
from video import VideoError, read_video

DEFAULT_PROMPT = "Describe the image."


# ----------------------------------------------------------------------------- loading


def load(checkpoint, device, dtype) -> tuple[VLM, Tokenizer]:
    """The model and its tokenizer; a missing or broken file is a one-line error naming it."""
    if not Path(checkpoint).is_dir():
        raise SystemExit(f"error: {checkpoint}: no such checkpoint directory (python train.py writes out/finetune)")
    try:
        model = VLM.from_pretrained(checkpoint, device=device, dtype=dtype).eval()
        tokenizer = load_tokenizer(checkpoint)
        tokenizer.check_fits(model.cfg.lm.vocab_size)
    except (FileNotFoundError, ValueError, KeyError, SafetensorError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err  # str(KeyError) adds quotes
        if isinstance(err, SafetensorError):
            message = f"{Path(checkpoint) / 'model.safetensors'}: {err}"
        raise SystemExit(f"error: {message}") from None
    return model, tokenizer


def load_images(paths) -> list[Image.Image]:
    try:
        return [load_image(p) for p in paths]
    except (FileNotFoundError, DataError) as err:
        raise SystemExit(f"error: {err}") from None


def pixels(model: VLM, images: list[Image.Image]) -> torch.Tensor | None:
    """PIL images -> (views, 3, S, S) on the model's device and dtype (with anyres: base view and tiles of each),
    or None without images."""
    if not images:
        return None
    weight = model.lm.tok_embed.weight
    tiled = model.cfg.tiles(len(images))
    return images_to_pixels(images, model.cfg, model.cfg.image_mode, tiled).to(weight.device, weight.dtype)


def image_sizes(images: list[Image.Image]) -> torch.Tensor | None:
    """(N, 2): each image's (height, width), by which an anyres model lays its tiles back out."""
    return torch.tensor([(im.height, im.width) for im in images]) if images else None


def image_tiled(model: VLM, images: list[Image.Image]) -> torch.Tensor | None:
    """(N,) bool: whether the prompt's images are tiled (OneVision tiles a lone image only, see VLMConfig.tiles)."""
    return torch.full((len(images),), model.cfg.tiles(len(images))) if images else None


def load_video(model: VLM, path, frames: int) -> torch.Tensor:
    """(1, frames, 3, S, S): frames sampled uniformly from a video file, a folder of frames or a GIF/WebP."""
    if model.cfg.video_token_id is None:
        raise SystemExit("error: this checkpoint takes no video (it has no video_token_id, as OneVision does)")
    try:
        clip = preprocess_video(read_video(path, frames), model.cfg.vision)
    except (FileNotFoundError, VideoError) as err:
        raise SystemExit(f"error: {err}") from None
    weight = model.lm.tok_embed.weight
    return clip[None].to(weight.device, weight.dtype)


def with_image_tags(prompt: str, num_images: int) -> str:
    """LLaVA's layout: without explicit `<image>` tags, the images go first, one line each."""
    tags = prompt.count(IMAGE)
    if tags == 0:
        return IMAGE * num_images + "\n" * bool(num_images) + prompt
    if tags != num_images:
        raise ValueError(f"the prompt has {tags} {IMAGE} tags but {num_images} images were given")
    return prompt


def encode(tokenizer: Tokenizer, model: VLM, text: str, template: str, first=True, sizes=None,
           frames: int | None = None) -> list[int]:
    """Prompt text to ids; a conversation's first piece starts with bos, unless the template writes its own.

    The k-th `<image>` grows to cfg.image_tokens(sizes[k]) placeholders (with anyres, a count that depends on
    the image's (height, width), so sizes are required; without, sizes may be left out). With `frames`, the one
    tag stands for a video of that many frames instead.
    """
    bos = first and template not in OWN_BOS
    cfg = model.cfg
    ids = tokenize_prompt(tokenizer, text, cfg.image_token_id, 1, bos=bos)
    if frames is not None:
        ids = [cfg.video_token_id if i == cfg.image_token_id else i for i in ids]
        return expand_images(ids, ids, [cfg.video_tokens(frames)], cfg.video_token_id)[0]  # ids as their own labels
    tags = ids.count(cfg.image_token_id)
    tiled = cfg.tiles(tags)
    counts = [cfg.image_tokens(size, tiled) for size in sizes] if sizes is not None else [cfg.image_tokens()] * tags
    return expand_images(ids, ids, counts, cfg.image_token_id)[0]


# ----------------------------------------------------------------------------- answers


def answer_text(tokenizer: Tokenizer, tokens) -> str:
    """Decoded tokens up to (not including) the first stop token."""
    return tokenizer.decode(tokenizer.until_stop(tokens))


# ----------------------------------------------------------------------------- one prompt


def decoding(args, model: VLM) -> dict:
    """The keyword arguments VLM.stream takes from the command line."""
    device = model.lm.tok_embed.weight.device
    generator = torch.Generator(device).manual_seed(args.seed)
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, generator=generator)


def generate(model: VLM, tokenizer: Tokenizer, input_ids: list[int], px, args, out=None, sizes=None,
             videos=None, tiled=None) -> torch.Tensor:
    """Decode args.num_samples answers as one batch; one sample streams to `out` (stdout). -> (N, <= max_new).

    Answers stop at the model's context length, as they do in a chat.
    """
    out = out or sys.stdout
    device = model.lm.tok_embed.weight.device
    ids = torch.tensor([input_ids], device=device).expand(args.num_samples, -1)  # (N, T)
    if px is not None:
        px = px.repeat(args.num_samples, 1, 1, 1)  # (N * views, 3, S, S)
        sizes = sizes.repeat(args.num_samples, 1) if sizes is not None else None  # (N * images, 2)
        tiled = tiled.repeat(args.num_samples) if tiled is not None else None  # (N * images,)
    if videos is not None:
        videos = videos.repeat(args.num_samples, 1, 1, 1, 1)  # (N, F, 3, S, S)
    context = model.cfg.lm.max_seq_len
    if len(input_ids) >= context:
        raise SystemExit(f"error: the prompt is {len(input_ids)} tokens, the model's context only {context}")
    kw = decoding(args, model) | {"max_new_tokens": min(args.max_new_tokens, context - len(input_ids))}
    state = model.new_state(args.num_samples) if args.compile else None  # the whole context: one static shape
    stream = TextStream(tokenizer) if args.num_samples == 1 else None
    steps = []
    for token in model.stream(ids, px, eos_id=tokenizer.stop_ids, state=state, image_sizes=sizes, videos=videos,
                              image_tiled=tiled, **kw):
        steps.append(token)
        if stream is not None and int(token[0]) not in tokenizer.stop_ids:
            print(stream.push(int(token[0])), end="", file=out, flush=True)
    tokens = torch.stack(steps, dim=1) if steps else ids.new_empty(args.num_samples, 0)
    if stream is not None:
        print(stream.flush(), file=out, flush=True)
    else:
        for i, row in enumerate(tokens.tolist(), 1):
            print(f"[{i}] {answer_text(tokenizer, row)}", file=out, flush=True)
    return tokens


# ----------------------------------------------------------------------------- chat


class Chat:
    """A conversation whose KV cache persists across turns: each turn prefills only its new tokens.

    The cache holds everything but the last generated token, so the next turn starts with that token, then the
    template's end of turn ("</s>", <|im_end|>, ...) if the answer did not end with it, then the template's
    pieces that follow the answer ("USER: ... ASSISTANT:"). template: None = the checkpoint's own.
    """

    def __init__(self, model: VLM, tokenizer: Tokenizer, images: list[Image.Image], template: str | None = None,
                 **decode_kw):
        self.model, self.tokenizer, self.decode_kw = model, tokenizer, decode_kw
        self.template = template or model.cfg.template
        self.state = model.new_state(1)  # the LM's whole context, allocated once
        self.images = images
        self.reset()

    def reset(self, images: list[Image.Image] | None = None):
        if images is not None:
            self.images = images
        self.state.reset()
        self.messages, self.pending = [], []

    def ask(self, question: str, out=None) -> str:
        """Answer one question, streaming "ASSISTANT: answer" to `out` if given; the exchange joins the
        conversation. A question that cannot be asked (no room left, wrong image tags) is a ValueError."""
        first = not self.messages
        value = with_image_tags(question, len(self.images)) if first else question
        self.messages.append({"from": "human", "value": value})
        pieces = template_pieces(self.messages, self.template,
                                 **template_kw(self.tokenizer, self.template, self.model.cfg.system))
        answered = max((k for k, (_, supervised) in enumerate(pieces) if supervised), default=-1)
        text = "".join(piece for piece, _ in pieces[answered + 1:])  # the first turn: system and all
        sizes = [(im.height, im.width) for im in self.images] if first else []
        new_ids = self.pending + encode(self.tokenizer, self.model, text, self.template, first, sizes)
        room = self.state.valid.size(1) - self.state.length - len(new_ids)
        if room < 1:
            self.messages.pop()
            raise ValueError(f"the conversation no longer fits the context of {self.state.valid.size(1)} tokens: "
                             "/reset to start over")
        device = self.model.lm.tok_embed.weight.device
        px = pixels(self.model, self.images) if first else None
        kw = self.decode_kw | {"max_new_tokens": min(self.decode_kw.get("max_new_tokens", 256), room)}
        stream, tokens = TextStream(self.tokenizer), []
        if out is not None:
            print("ASSISTANT: ", end="", file=out, flush=True)
        stops = self.tokenizer.stop_ids
        for token in self.model.stream(torch.tensor([new_ids], device=device), px, eos_id=stops,
                                       state=self.state, image_sizes=image_sizes(self.images) if first else None,
                                       image_tiled=image_tiled(self.model, self.images) if first else None, **kw):
            tokens.append(int(token[0]))
            if out is not None and tokens[-1] not in stops:
                print(stream.push(tokens[-1]), end="", file=out, flush=True)
        if out is not None:
            print(stream.flush(), file=out, flush=True)
        end = end_of_turn_id(self.tokenizer, self.template)
        self.pending = tokens[-1:] + [end] * (not tokens or tokens[-1] not in stops)
        answer = answer_text(self.tokenizer, tokens)
        self.messages.append({"from": "gpt", "value": answer})
        return answer


def chat(model: VLM, tokenizer: Tokenizer, images: list[Image.Image], args):
    """The interactive loop: read questions from stdin until EOF; /image PATH and /reset start over."""
    session = Chat(model, tokenizer, images, args.template, **decoding(args, model))
    print("chat: /image PATH starts over with a new image, /reset starts over, Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("USER: ").strip()
        except EOFError:
            print()
            return
        if line == "/reset":
            session.reset()
            print("(conversation reset)")
        elif line.startswith("/image "):
            try:
                session.reset([load_image(line.removeprefix("/image ").strip())])
                print("(new image; conversation reset)")
            except (FileNotFoundError, DataError) as err:
                print(f"error: {err}")
        elif line:
            try:
                session.ask(line, out=sys.stdout)
            except ValueError as err:
                print(f"error: {err}")


# ----------------------------------------------------------------------------- attention maps


@torch.inference_mode()
def answer_attention(model: VLM, input_ids: list[int], px, answer: list[int], layers, sizes=None):
    """How much each answer token attended to each image placeholder: (n_answer, n_image_tokens).

    One forward pass over prompt + answer with explicit attention weights; the row that *predicted* answer
    token k is the query at position T - 1 + k. Averaged over the chosen layers and all heads.
    """
    device = model.lm.tok_embed.weight.device
    ids = torch.tensor([input_ids + answer[:-1]], device=device)  # (1, T + n - 1)
    x = model.embed(ids, px, sizes)
    positions = torch.arange(ids.size(1), device=device)[None]
    _, attentions = model.lm(x, positions, need_weights=True)  # per layer (1, nh, L, L)
    T, n = len(input_ids), len(answer)
    att = torch.stack([attentions[i][0, :, T - 1 : T - 1 + n].float() for i in layers]).mean((0, 1))  # (n, L)
    return att[:, ids[0] == model.cfg.image_token_id]  # (n, image tokens)


def attention_to_images(model: VLM, input_ids: list[int], px, answer: list[int], layers) -> torch.Tensor:
    """How much each answer token attended to each image patch: (n_answer, n_images, grid, grid)."""
    att = answer_attention(model, input_ids, px, answer, layers)
    n = att.size(0)
    per_image = att.view(n, -1, model.cfg.num_image_tokens)  # (n, n_images, P)
    if model.cfg.vision.class_token and not model.cfg.drop_cls:
        per_image = per_image[..., 1:]  # the CLS token has no place on the image
    grid = math.isqrt(per_image.size(-1))
    return per_image.reshape(n, -1, grid, grid).cpu()


def attention_to_tiles(model: VLM, input_ids: list[int], px, answer: list[int], layers, sizes) -> list:
    """anyres: for each image, the answer's attention to its tiled map, (n_answer, rows, cols): the tiles laid
    back side by side with the padding cut (as the model merged them), newlines and base view left out."""
    att = answer_attention(model, input_ids, px, answer, layers, sizes)
    cfg, maps, start = model.cfg, [], 0
    for size in sizes.tolist():
        rows, cols = anyres.feature_shape(size, cfg.grid_pinpoints, cfg.vision.image_size, cfg.vision.grid,
                                          cfg.anyres_max)
        block = att[:, start + cfg.vision.grid**2 : start + cfg.image_tokens(size)]  # (n, rows * (cols + 1))
        maps.append(block.reshape(-1, rows, cols + 1)[..., :cols].cpu())  # the newline column dropped
        start += cfg.image_tokens(size)
    return maps


def heat_on_image(heat: np.ndarray, image: Image.Image, mode: str) -> np.ndarray:
    """A (grid, grid) patch map -> (h, w) over the original image, undoing the preprocessing.

    pad: the grid covers the image padded to a centred square; crop: only the centred square was seen;
    anyres: the unpadded tile map covers exactly the image.
    """
    w, h = image.size
    if mode == "anyres":
        return np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((w, h), Image.NEAREST))
    side = max(w, h) if mode == "pad" else min(w, h)
    square = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((side, side), Image.NEAREST))
    if mode == "pad":
        left, top = (side - w) // 2, (side - h) // 2
        return square[top : top + h, left : left + w]
    full = np.zeros((h, w), dtype=np.float32)  # cropped-away borders were never seen
    left, top = (w - side) // 2, (h - side) // 2
    full[top : top + side, left : left + side] = square
    return full


def colorize(heat: np.ndarray) -> np.ndarray:
    """Values in 0..1 -> RGB uint8 on a black-red-yellow-white ("hot") scale."""
    rgb = np.stack([heat * 3, heat * 3 - 1, heat * 3 - 2], axis=-1).clip(0, 1)
    return (rgb * 255).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, mode: str, width: int) -> Image.Image:
    """The image under its heat map (least to most attention: black, red, yellow, white), `width` pixels wide
    with the image's aspect ratio."""
    span = heat.max() - heat.min()
    full = heat_on_image((heat - heat.min()) / span if span > 0 else np.zeros_like(heat), image, mode)
    height = max(1, round(width * image.height / image.width))
    colors = Image.fromarray(colorize(full)).resize((width, height), Image.NEAREST)
    return Image.blend(image.resize((width, height), Image.BICUBIC), colors, 0.55)


def words(tokenizer: Tokenizer, tokens: list[int]) -> list[tuple[str, list[int]]]:
    """Group answer tokens into words: (text, indices); a piece starting with a space ("▁", "Ġ") opens one."""
    groups = []
    for i, token in enumerate(tokens):
        if not groups or tokenizer.starts_word(token):
            groups.append([])
        groups[-1].append(i)
    return [(tokenizer.decode([tokens[i] for i in g]).strip(), g) for g in groups]


def write_attention_map(path, model: VLM, tokenizer: Tokenizer, input_ids, px, images, answer: list[int], layers,
                        width=512, tile=96, per_row=8) -> list[Path]:
    """path: each image under the answer's mean attention (image k > 1 goes to path_k.png), with the image's
    aspect ratio; path_tokens.png: one small map per answer word and image. With anyres, the tiles' map."""
    answer = tokenizer.until_stop(answer)
    if not answer:
        raise SystemExit("error: the answer is empty, so there is no attention to draw")
    if model.cfg.grid_pinpoints:
        heat = [m.numpy() for m in attention_to_tiles(model, input_ids, px, answer, layers, image_sizes(images))]
        mode = "anyres"
    else:
        heat = attention_to_images(model, input_ids, px, answer, layers).numpy().swapaxes(0, 1)  # (images, n, g, g)
        mode = model.cfg.image_mode
    path, written = Path(path), []
    for k, image in enumerate(images):
        out = path if k == 0 else path.with_name(f"{path.stem}_{k + 1}{path.suffix}")
        overlay(image, heat[k].mean(0), mode, width).save(out)
        written.append(out)
    groups = words(tokenizer, answer)
    tile_h = max(1, round(tile * images[0].height / images[0].width)) if images else tile
    label_h, rows = 14, math.ceil(len(groups) / per_row)
    strip = Image.new("RGB", (min(len(groups), per_row) * (tile + 4), rows * len(images) * (tile_h + label_h + 4)),
                      "white")
    draw = ImageDraw.Draw(strip)
    for j, (text, indices) in enumerate(groups):
        for k, image in enumerate(images):
            x = (j % per_row) * (tile + 4)
            y = ((j // per_row) * len(images) + k) * (tile_h + label_h + 4)
            strip.paste(overlay(image, heat[k][indices].mean(0), mode, tile), (x, y))
            draw.text((x + 2, y + tile_h + 1), text[:14], fill="black")
    tokens_path = path.with_name(f"{path.stem}_tokens{path.suffix}")
    strip.save(tokens_path)
    return written + [tokens_path]


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """"all", or comma-separated layer indices (negative counts from the end): "-1", "0,2,3"."""
    if spec == "all":
        return list(range(n_layers))
    try:
        layers = [int(s) for s in spec.split(",")]
    except ValueError:
        raise SystemExit(f"error: --attention-layers {spec!r}: give 'all' or comma-separated integers") from None
    if not all(-n_layers <= i < n_layers for i in layers):
        raise SystemExit(f"error: --attention-layers {spec!r}: the LM has layers 0..{n_layers - 1}")
    return [i % n_layers for i in layers]


# ----------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    images = load_images(args.image)
    model, tokenizer = load(args.checkpoint, device, dtype)
    try:
        check_template(tokenizer, args.template or model.cfg.template)
        model.prepare_decoding(args.quantize, args.compile)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.chat:
        return chat(model, tokenizer, images, args)
    if args.attention_map and args.num_samples != 1:
        raise SystemExit("error: --attention-map draws one answer: use it with --num-samples 1")
    if args.attention_map and args.video:
        raise SystemExit("error: --attention-map does not yet draw video frames")
    if images and args.video:
        raise SystemExit("error: give --image or --video, not both (records mixing them train through train.py)")
    videos = load_video(model, args.video, args.frames) if args.video else None
    template = args.template or model.cfg.template
    try:
        value = with_image_tags(args.prompt, len(images) + (videos is not None))  # a video takes one tag too
        prompt = build_prompt([{"from": "human", "value": value}], template, tokenizer, model.cfg.system)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    sizes = [(im.height, im.width) for im in images]
    input_ids = encode(tokenizer, model, prompt, template, sizes=sizes, frames=args.frames if args.video else None)
    px = pixels(model, images)
    tokens = generate(model, tokenizer, input_ids, px, args, sizes=image_sizes(images), videos=videos,
                      tiled=image_tiled(model, images))
    if args.attention_map:
        if not images:
            raise SystemExit("error: --attention-map needs an --image")
        if model.cfg.grid_pinpoints and not model.cfg.tiles(len(images)):
            raise SystemExit("error: --attention-map draws tiled images; this checkpoint does not tile several")
        layers = parse_layers(args.attention_layers, model.cfg.lm.n_layers)
        written = write_attention_map(args.attention_map, model, tokenizer, input_ids, px, images,
                                      tokens[0].tolist(), layers)
        print(f"attention map: {', '.join(map(str, written))}", file=sys.stderr)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default="out/finetune",
                   help="checkpoint dir with config.json, model.safetensors and tokenizer.json or tokenizer.model")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an image; repeat for several images in one prompt (placed at the <image> tags, or first)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the question; may hold one <image> tag per --image")
    p.add_argument("--video", metavar="PATH", default=None,
                   help="a video (needs PyAV: pip install av), a folder of frames or an animated GIF/WebP, for a "
                   "checkpoint that takes video (LLaVA-OneVision); its <image> tag, if any, marks where it goes")
    p.add_argument("--frames", type=int, default=8, help="frames sampled uniformly from --video")
    p.add_argument("--template", choices=TEMPLATES, default=None,
                   help="chat template; None = the checkpoint's own (the one it was finetuned with)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; higher = more random")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens "
                   "covering this much probability (1 = off)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens; None = from all")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--num-samples", type=int, default=1, help="answers to draw, decoded together as one batch")
    p.add_argument("--chat", action="store_true",
                   help="interactive chat in the checkpoint's template (or --template); the image (if any) and "
                   "the KV cache persist across turns")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...; None = cuda if available, else cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weight dtype; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only LM layers made at load time (quantize.py): int8 reads 4x fewer weight bytes per "
                   "token than fp32, int4 (groups of 32, head int8) ~6x; a checkpoint converted with --quantize is "
                   "quantized already")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decode step over a static KV cache (inductor on CPU, CUDA graphs on "
                   "CUDA); the same tokens as without. On the small CPU benchmark it gave 16%% more tokens/s")
    p.add_argument("--attention-map", metavar="OUT.png", default=None,
                   help="also write OUT.png (the image under the answer's attention to its patches) and "
                   "OUT_tokens.png (one small map per answer word)")
    p.add_argument("--attention-layers", default="all",
                   help="LM layers to average for --attention-map: 'all' or indices like '-1' or '0,2'")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1:
        p.error("--num-samples and --max-new-tokens must be at least 1")
    if args.chat and (args.num_samples != 1 or args.attention_map or args.video):
        p.error("--chat works with one sample, without --attention-map and without --video")
    if args.video and args.image:
        p.error("give --image or --video, not both")
    if args.frames < 1:
        p.error("--frames must be at least 1")
    return args


if __name__ == "__main__":
    main()

"""The vision-language model: a ViT, a projector and a Llama, joined LLaVA-style (Liu et al. 2023).

The image is encoded into patch features, projected to the LM's width, and written into the token
embeddings where the prompt holds `image_token_id` placeholders. Everything after that is a plain
decoder-only LM. This file also holds the presets, the loss, generation and checkpoint I/O.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import anyres
from llama import SDPA_HAS_GQA, Llama, LlamaConfig, rope_frequencies
from lora import LoRALinear
from projector import Projector, ProjectorConfig
from quantize import quantize_lm
from vit import VisionTransformer, ViTConfig, siglip_config

if SDPA_HAS_GQA:  # torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask

IGNORE = -100  # label of positions that carry no loss (prompt, image, padding)


@dataclass
class VLMConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    lm: LlamaConfig = field(default_factory=LlamaConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    image_token_id: int = 32000  # the placeholder id; a real row of the embedding table
    feature_layer: int = -2  # which ViT hidden state feeds the projector (LLaVA: penultimate)
    drop_cls: bool = True  # LLaVA's "default" strategy drops the CLS token; "full" keeps it
    image_mode: str = "pad"  # LLaVA-1.5 pads images to square; "crop" centre-crops like CLIP
    template: str = "vicuna_v1"  # the chat template the model was (or will be) finetuned with
    system: str | None = None  # its system prompt: None = the template's default, "" = none (vicuna's is 29 of a
    #                            ShapesWorld question's 53 tokens: 1.5x faster steps without it, but lower accuracy)
    quantize: str | None = None  # "int8" / "int4": the LM's linear layers hold 8- / 4-bit weights (quantize.py)
    quant_group_size: int = 32  # int4: inputs per scale and min (llama.cpp's Q4 blocks are 32)
    grid_pinpoints: list = field(default_factory=list)  # anyres (LLaVA-NeXT): [h, w] canvases to tile; [] = off
    anyres_max: int = 0  # OneVision's anyres_max_N: shrink a tiled map above N tiles' tokens; 0 = never
    video_token_id: int | None = None  # OneVision: the placeholder of a video's frames; None = no video input
    multi_image_tiles: bool = True  # False (OneVision): only a sample's lone image is tiled; several get one view each

    def __post_init__(self):
        if not 0 <= self.image_token_id < self.lm.vocab_size:
            raise ValueError(f"image_token_id {self.image_token_id} is outside the vocab of {self.lm.vocab_size}")
        if self.drop_cls and not self.vision.class_token:
            raise ValueError("drop_cls=True, but the vision tower has no class token")
        if self.projector.kind == "pixel_shuffle" and self.vision.class_token and not self.drop_cls:
            raise ValueError("pixel_shuffle needs a square patch grid: set drop_cls=True")
        if self.quantize not in (None, "int8", "int4"):
            raise ValueError(f"unsupported quantize {self.quantize!r} (None, 'int8' or 'int4')")
        if self.grid_pinpoints:
            anyres.check_pinpoints(self.grid_pinpoints, self.vision.image_size)
            if self.num_image_tokens != self.vision.num_patches:
                raise ValueError("anyres lays tiles' patch grids side by side: it needs one token per patch "
                                 "(no pixel_shuffle, and drop_cls=True with a class token)")
        elif self.anyres_max or self.video_token_id is not None or not self.multi_image_tiles:
            raise ValueError("anyres_max, video_token_id and multi_image_tiles (OneVision) need anyres: set "
                             "grid_pinpoints")

    @property
    def num_image_tokens(self) -> int:
        """How many placeholder tokens one image occupies in the prompt."""
        patches = self.vision.num_patches + (self.vision.class_token and not self.drop_cls)
        return self.projector.num_tokens(patches)

    def tiles(self, num_images: int) -> bool:
        """Whether the images of a sample holding num_images of them are tiled: with LLaVA-NeXT always; OneVision
        tiles only a lone image, and shows each of several as one padded view (transformers' batch_num_images)."""
        return bool(self.grid_pinpoints) and (self.multi_image_tiles or num_images == 1)

    def image_tokens(self, size: tuple[int, int] | None = None, tiled=True) -> int:
        """Placeholder tokens for one image of (height, width) `size`. With anyres the count depends on the size;
        preprocessing, the tokenizer's expansion and the model all ask here, so they cannot disagree. An untiled
        anyres image (see tiles) is its one view's tokens and a newline."""
        if not self.grid_pinpoints:
            return self.num_image_tokens
        if not tiled:
            return self.num_image_tokens + 1
        if size is None:
            raise ValueError("with anyres (grid_pinpoints), an image's token count needs its (height, width)")
        return anyres.num_tokens(size, self.grid_pinpoints, self.vision.image_size, self.vision.grid, self.anyres_max)

    def video_tokens(self, frames: int) -> int:
        """Placeholder tokens for a video of `frames` frames (OneVision: 2x2-pooled frames, then one newline)."""
        return anyres.video_tokens(frames, self.vision.grid)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        parts = {"vision": ViTConfig, "lm": LlamaConfig, "projector": ProjectorConfig}
        try:
            return cls(**{k: parts[k](**v) if k in parts else v for k, v in d.items()})
        except TypeError as err:  # an unknown or missing field
            raise ValueError(f"bad model config: {err}") from None


def tiny_config(vocab_size: int = 512) -> VLMConfig:
    """A from-scratch model small enough to learn ShapesWorld on a laptop CPU in minutes.

    8 px patches of a 48 px scene, one SigLIP-style block (no class token, no pre-norm) and LLaVA's mlp2x_gelu
    projector, so transformers' LLaVA can hold it (`convert_weights.py --to-hf`). Pixels are normalised around
    ShapesWorld's background colour: an empty patch then stays near zero and each object stands out. With CLIP's
    normalisation and pre-norm, every image token shared a large constant part, and in our tuning runs the LM
    learned to ignore the image (blind-level accuracy).
    """
    vision = ViTConfig(image_size=48, patch_size=8, width=192, depth=1, heads=4, mlp_dim=384, act="gelu_tanh",
                       class_token=False, patch_bias=True, pre_norm=False, image_mean=(0.235, 0.235, 0.267),
                       image_std=(0.25, 0.25, 0.25))
    lm = LlamaConfig(vocab_size=vocab_size + 1, dim=192, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=512,
                     max_seq_len=256, tie_embeddings=True)
    return VLMConfig(vision, lm, ProjectorConfig("mlp2x_gelu"), image_token_id=vocab_size, feature_layer=-1,
                     drop_cls=False, template="vicuna_v1")


CLIP_L_336 = dict(image_size=336, patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096)
VICUNA_7B = dict(vocab_size=32064, dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, max_seq_len=4096)
TINYLLAMA = dict(vocab_size=32001, dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632,
                 max_seq_len=2048)

PRESETS = {
    "tiny": tiny_config,
    "small": lambda: VLMConfig(  # the CPU benchmark shape (issue #6)
        ViTConfig(image_size=112, patch_size=14, width=256, depth=5, heads=4, mlp_dim=1024),
        LlamaConfig(vocab_size=32001, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=688,
                    max_seq_len=512),
        image_token_id=32000,
    ),
    "small-siglip": lambda: VLMConfig(
        siglip_config(image_size=112, patch_size=14, width=256, depth=5, heads=4, mlp_dim=1024),
        LlamaConfig(vocab_size=32001, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=688),
        image_token_id=32000, feature_layer=-1, drop_cls=False,
    ),
    "llava-1.5-7b": lambda: VLMConfig(ViTConfig(**CLIP_L_336), LlamaConfig(**VICUNA_7B), image_token_id=32000),
    "tinyllava-1.1b": lambda: VLMConfig(ViTConfig(**CLIP_L_336), LlamaConfig(**TINYLLAMA), image_token_id=32000),
}


def preset(name: str) -> VLMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------- helpers


def left_align(input_ids, attention_mask):
    """Move each row's real tokens to the right end, so new tokens follow them directly (left padding)."""
    order = torch.argsort(attention_mask.long(), dim=1, stable=True)  # padding first, then tokens in order
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def attention_mask_for(valid, slots):
    """valid (B, S) marks filled, non-padding cache slots; slots (T,) are the queries' own slots.

    Returns (B, 1, T, S): causal, no padding keys, and each query always sees itself, so a padding
    query's softmax is never over an empty set (which would give NaN).
    """
    key = torch.arange(valid.size(1), device=valid.device)
    causal = key[None, :] <= slots[:, None]  # (T, S)
    mask = causal[None] & valid[:, None, :]  # (B, T, S)
    return (mask | (key[None, :] == slots[:, None]))[:, None]  # (B, 1, T, S)


def packed_positions_and_mask(segment_ids, flex=False):
    """segment_ids (B, T) -> positions (B, T) restarting at each new segment, and a block-diagonal causal
    mask, so packed samples never attend to each other: (B, 1, T, T) bool, or with flex=True the same rule as
    a FlexAttention BlockMask, whose kernel skips the tiles between samples instead of computing them."""
    B, T = segment_ids.shape
    index = torch.arange(T, device=segment_ids.device).expand(B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    segment_start = torch.where(starts, index, 0).cummax(dim=1).values  # (B, T) index where each segment began
    if flex:
        return index - segment_start, packed_block_mask(segment_ids)
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return index - segment_start, (same & causal)[:, None]


def grounding_loss(attentions: list, ground) -> torch.Tensor:
    """-log of the attention head 0 of every layer but the first pays, from the position that predicts an answer,
    to the image tokens of the object the question asks about (or to the first token when there is none), summed
    over answers and averaged over those layers. ShapesWorld knows where each object is; telling one head where to
    look gives content lookup a direct signal (issue #9: the main job gained with it in every seed tried). Pairs of
    kind 1 tell head 0 of the first layer to look at the question's words that name the object, so that the answer
    position carries what the later layers must look for (issue #9: without them it often did not, and two seeds
    went from 0.773 to 0.956 and from 0.622 to 0.710 with them).

    attentions: per layer (B, nh, T, S); ground (N, 4): row, query, key, kind (0: image, 1: words).
    """
    image, words = ground[ground[:, 3] == 0], ground[ground[:, 3] == 1]
    later = sum(head0_nll(att, image) for att in attentions[1:]) / max(len(attentions) - 1, 1)
    return later + head0_nll(attentions[0], words)


def head0_nll(att, pairs) -> torch.Tensor:
    """-log(attention head 0 pays from each pair's query to its keys), several keys of one query adding up,
    summed over queries. att (B, nh, T, S); pairs (N, >=3): row, query, key."""
    rows, queries, keys = pairs[:, :3].unbind(1)
    query, index = torch.unique(rows * pairs.new_tensor(att.size(-1)) + queries, return_inverse=True)
    p = att[rows, 0, queries, keys].float()  # (N,)
    per_query = torch.zeros(len(query), device=p.device).index_add(0, index, p)  # (queries,)
    return -per_query.clamp(min=1e-9).log().sum()


@torch.compiler.disable  # FlexAttention's advice: build the BlockMask outside the compiled graph
def packed_block_mask(segment_ids):
    """The block-diagonal causal rule as a FlexAttention BlockMask over (B, T) segment ids."""
    B, T = segment_ids.shape

    def same_sample_causal(b, h, q, k):
        return (segment_ids[b, q] == segment_ids[b, k]) & (k <= q)

    return create_block_mask(same_sample_causal, B, None, T, T, device=segment_ids.device)


def sample(logits, temperature=0.0, top_k=None, top_p=1.0, generator=None):
    """logits (B, V) -> next token (B,): greedy at temperature 0, else temperature / top-k / nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # tokens entirely past the nucleus
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


@dataclass
class DecodeState:
    """Where a batch of conversations stands in its own KV cache, kept between stream() calls.

    It owns the caches, so other generate() calls on the same model cannot overwrite them.
    """

    caches: list  # one KVCache per LM block, each (B, nkv, S, hs)
    valid: torch.Tensor  # (B, S) bool: filled, non-padding cache slots
    positions: torch.Tensor  # (B, 1): the RoPE position of each row's next token
    length: int = 0  # slots filled so far; the next token goes to slot `length`

    def reset(self):
        """Forget the conversation but keep the memory (and, with compile, the same buffers)."""
        self.valid.zero_()
        self.positions = torch.zeros_like(self.positions)
        self.length = 0


# ----------------------------------------------------------------------------- the model


class VLM(nn.Module):
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionTransformer(cfg.vision)
        self.projector = Projector(cfg.projector, cfg.vision.width, cfg.lm.dim)
        self.lm = Llama(cfg.lm)
        if cfg.quantize:  # decoding reads only the LM's weights once per token; the ViT runs once
            quantize_lm(self.lm, cfg.quantize, cfg.quant_group_size)
        # anyres: a learned token that ends each row of a tiled feature map, so the LM can tell where rows break
        self.image_newline = nn.Parameter(torch.randn(cfg.lm.dim) * cfg.lm.dim**-0.5) if cfg.grid_pinpoints else None
        self.flex_packing = None  # packed rows: FlexAttention if True, an explicit mask if False; None = on CUDA

    def encode_images(self, pixel_values):
        """(N, 3, H, W) -> (N, num_image_tokens, C_lm)"""
        features = self.vision(pixel_values, self.cfg.feature_layer)  # (N, 1 + P, C_vision) with CLS
        if self.cfg.drop_cls:
            features = features[:, 1:]  # (N, P, C_vision)
        return self.projector(features)

    def image_features(self, pixel_values, image_sizes=None, image_tiled=None):
        """Every image's features in placeholder order, (sum of image_tokens, C_lm).

        Without anyres, pixel_values (N, 3, S, S) holds one view per image. With anyres it holds each image's
        base view and tiles in turn, and image_sizes (N, 2) gives each image's original (height, width).
        image_tiled (N,) bool marks the images that were tiled (default: all); an untiled one has one view.
        """
        features = self.encode_images(pixel_values)  # (views, P, C)
        if not self.cfg.grid_pinpoints:
            return features.flatten(0, 1)
        if image_sizes is None:
            raise ValueError("an anyres model needs image_sizes: each image's (height, width)")
        sizes = [tuple(s) for s in torch.as_tensor(image_sizes).tolist()]
        tiled = [True] * len(sizes) if image_tiled is None else torch.as_tensor(image_tiled).tolist()
        S, pinpoints, newline = self.cfg.vision.image_size, self.cfg.grid_pinpoints, self.image_newline
        views = [1 + rows * cols if t else 1
                 for t, (rows, cols) in zip(tiled, (anyres.tile_grid(s, pinpoints, S) for s in sizes), strict=True)]
        if sum(views) != len(features):
            raise ValueError(f"{len(sizes)} images of sizes {sizes} make {sum(views)} views (base + tiles), "
                             f"but pixel_values holds {len(features)}")
        return torch.cat([anyres.merge_tiles(f, s, pinpoints, S, newline, self.cfg.anyres_max) if t
                          else anyres.single_view(f, newline)
                          for f, s, t in zip(features.split(views), sizes, tiled, strict=True)])

    def video_features(self, videos):
        """videos (V, F, 3, S, S) -> (V * video_tokens(F), C_lm), as LLaVA-OneVision encodes video: each frame
        at base resolution, its feature map bilinearly pooled 2x2, the frames in turn, one newline at the end."""
        V, F = videos.shape[:2]
        frames = anyres.pool_frames(self.encode_images(videos.flatten(0, 1)))  # (V*F, P', C)
        frames = frames.reshape(V, -1, frames.size(-1))  # (V, F*P', C)
        return torch.cat([frames, self.image_newline.to(frames.dtype).expand(V, 1, -1)], dim=1).flatten(0, 1)

    def embed(self, input_ids, pixel_values=None, image_sizes=None, videos=None, image_tiled=None):
        """Token embeddings with each image's (and video's) features spliced over its placeholder block: (B, T, C)."""
        x = self.lm.tok_embed(input_ids)  # (B, T, C)
        is_image = input_ids == self.cfg.image_token_id  # (B, T)
        n_slots = int(is_image.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image placeholder tokens but no pixel_values were given")
        else:
            image_features = self.image_features(pixel_values, image_sizes, image_tiled)  # (N_tokens, C)
            if n_slots != len(image_features):
                n_images = len(pixel_values) if image_sizes is None else len(image_sizes)
                raise ValueError(f"input_ids hold {n_slots} image placeholder tokens, but {n_images} images give "
                                 f"{len(image_features)} image features")
            # masked_scatter fills the placeholders in row-major order: images in the order they appear.
            x = x.masked_scatter(is_image[..., None], image_features.to(x.dtype))
        return self.splice_videos(x, input_ids, videos)

    def splice_videos(self, x, input_ids, videos):
        """x (B, T, C) with each video's features over its video_token_id block, in the order they appear."""
        if self.cfg.video_token_id is None:
            if videos is not None:
                raise ValueError("videos were given, but this model has no video placeholder (video_token_id)")
            return x
        is_video = input_ids == self.cfg.video_token_id  # (B, T)
        n_slots = int(is_video.sum())
        if videos is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} video placeholder tokens but no videos were given")
            return x
        features = self.video_features(videos)  # (V * tokens, C)
        if n_slots != len(features):
            raise ValueError(f"input_ids hold {n_slots} video placeholder tokens, but {len(videos)} videos give "
                             f"{len(features)} video features")
        return x.masked_scatter(is_video[..., None], features.to(x.dtype))

    def forward(self, input_ids, pixel_values=None, labels=None, num_tokens=None, attention_mask=None,
                segment_ids=None, image_sizes=None, videos=None, image_tiled=None, ground=None, ground_weight=0.0):
        """-> (logits, loss). Without labels: logits (B, T, V) and loss None.

        attention_mask (B, T) marks real tokens (left padding allowed). segment_ids (B, T) marks packed
        samples: tokens attend only within their own segment, and positions restart at 0 in each one.

        With labels: (None, loss). The loss is the summed cross-entropy over labels != -100 divided by
        `num_tokens` (default: this batch's count); pass the global batch's count so gradient accumulation
        and DDP average over the same tokens as one big batch. Only supervised positions reach the LM
        head, so most image and prompt positions never materialise vocab-sized logits.
        With ground (N, 3) pairs (data.ground_pairs) and ground_weight > 0, the loss adds ground_weight times
        grounding_loss (a sum: pass the weight divided by the global batch's count of grounded answers).
        """
        x = self.embed(input_ids, pixel_values, image_sizes, videos, image_tiled)
        grounded = labels is not None and ground is not None and ground_weight > 0
        if segment_ids is not None:
            flex = self.flex_packing if self.flex_packing is not None else x.is_cuda and SDPA_HAS_GQA
            positions, mask = packed_positions_and_mask(segment_ids, flex and not grounded)
        elif attention_mask is not None:  # left padding: real tokens count positions from 0, padding is never seen
            positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
            slots = torch.arange(input_ids.size(1), device=x.device)
            mask = attention_mask_for(attention_mask.bool(), slots)
        else:
            positions, mask = torch.arange(input_ids.size(1), device=x.device).expand_as(input_ids), None
        if grounded:  # the attention weights, from the plain path
            h, attentions = self.lm(x, positions, mask, need_weights=True)
        else:
            h = self.lm(x, positions, mask)
        if labels is None:
            return self.lm.head(h), None
        targets = labels[:, 1:]  # position t predicts token t + 1
        supervised = targets != IGNORE
        logits = self.lm.head(h[:, :-1][supervised]).float()  # (N_supervised, V)
        loss = F.cross_entropy(logits, targets[supervised], reduction="sum")
        loss = loss / (num_tokens if num_tokens is not None else supervised.sum().clamp(min=1))
        if grounded:
            loss = loss + ground_weight * grounding_loss(attentions, ground)
        return None, loss

    # ------------------------------------------------------------------------- generation

    @torch.inference_mode()
    def generate(self, input_ids, pixel_values=None, max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=None,
                 eos_id=None, attention_mask=None, generator=None, state=None, image_sizes=None, videos=None,
                 image_tiled=None):
        """-> new tokens (B, <= max_new_tokens). Rows that hit a stop id are filled with eos_id after it."""
        steps = list(self.stream(input_ids, pixel_values, max_new_tokens, temperature, top_p, top_k, eos_id,
                                 attention_mask, generator, state, image_sizes, videos, image_tiled))
        return torch.stack(steps, dim=1) if steps else input_ids.new_empty(input_ids.size(0), 0)

    @torch.inference_mode()
    def stream(self, input_ids, pixel_values=None, max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=None,
               eos_id=None, attention_mask=None, generator=None, state=None, image_sizes=None, videos=None,
               image_tiled=None):
        """Yield the next token of every row (B,) step by step; stops early once every row has ended.

        The prompt is prefilled in one pass into a preallocated KV cache; each later step feeds one token.
        Padding in `attention_mask` may be on either side: rows are left-aligned first. With a `state` from
        new_state(), input_ids continue the conversation already in its cache (a chat's next turn prefills
        only its new tokens). The cache then holds everything except the last yielded token: start the next
        input_ids with it. eos_id: one id or several (a tokenizer's stop_ids: eos and the end-of-turn token);
        a row that emits one of them is done, and yields the first of them from then on.
        """
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        input_ids, attention_mask = left_align(input_ids, attention_mask.bool())
        if state is None:
            state = self.new_state(B, T + max_new_tokens)
        start, S = state.length, state.valid.size(1)
        if start + T + max_new_tokens > S:
            raise ValueError(f"{start} cached + {T} new + {max_new_tokens} generated tokens do not fit the "
                             f"KV cache of {S}")
        x = self.embed(input_ids, pixel_values, image_sizes, videos, image_tiled)
        slots = torch.arange(start, start + T, device=x.device)
        state.valid[:, start : start + T] = attention_mask
        positions = state.positions + (attention_mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T)
        state.positions = state.positions + attention_mask.sum(1, keepdim=True)  # (B, 1) the next token's
        state.length = start + T
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        stops = torch.tensor([] if eos_id is None else [eos_id] if isinstance(eos_id, int) else list(eos_id),
                             dtype=torch.long, device=x.device)
        # MKL's fp32 one-row product reads a (C, V) copy of the head ~3x faster than the (V, C) weight; the copy
        # is repaid within ~5 tokens. GPUs read both layouts alike (and CUDA graphs want the parameter itself).
        head_t, weight = None, self.lm.head.weight
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and max_new_tokens > 1:
            head_t = weight.t().contiguous()  # (C, V)
        self.use_cache(state)
        try:
            h = self.lm(x, positions, attention_mask_for(state.valid, slots), slots)[:, -1]  # (B, C)
            logits = self.lm.head(h)  # (B, V)
            for i in range(max_new_tokens):
                logits[:, self.cfg.image_token_id] = float("-inf")  # never emit a placeholder
                token = sample(logits, temperature, top_k, top_p, generator)
                if len(stops):
                    token = token.masked_fill(done, stops[0])
                    done |= torch.isin(token, stops)
                yield token
                if done.all() or i == max_new_tokens - 1:
                    break
                slot = torch.tensor([state.length], device=x.device)  # a tensor: one compiled step fits all
                state.valid[:, state.length] = True
                logits = self.decode_step(token, state.positions, slot, state.valid, head_t)
                state.positions, state.length = state.positions + 1, state.length + 1
        finally:
            self.lm.clear_cache()

    def decode_step(self, token, positions, slot, valid, head_t=None):
        """One token per row through the cached LM: token (B,), positions (B, 1), slot (1,) -> logits (B, V).

        head_t: an optional (C, V) copy of the LM head's weight (see stream). Every shape is fixed by the cache
        size, so compile_decode_step() compiles it once for all steps.
        """
        x = self.lm.tok_embed(token[:, None])  # (B, 1, C)
        h = self.lm(x, positions, valid[:, None, None, :], slot)[:, -1]  # (B, C)
        return self.lm.head(h) if head_t is None else h @ head_t  # (B, V)

    def compile_decode_step(self):
        """gpt-fast's trick: compile the one-token step; on CUDA, "reduce-overhead" replays it as a CUDA graph.

        Pair it with one new_state() of fixed size, reused across calls, so every step hits the same graph.
        """
        mode = "reduce-overhead" if self.lm.tok_embed.weight.is_cuda else None
        self.decode_step = torch.compile(self.decode_step, mode=mode, fullgraph=True)

    def new_state(self, batch: int, max_len: int | None = None) -> DecodeState:
        """An empty, preallocated KV cache for `batch` rows of up to max_len tokens (default: the LM's limit)."""
        max_len = max_len or self.cfg.lm.max_seq_len
        self.lm.setup_cache(batch, max_len)
        caches = [block.attn.cache for block in self.lm.blocks]
        self.lm.clear_cache()
        device = self.lm.tok_embed.weight.device
        return DecodeState(caches, torch.zeros(batch, max_len, dtype=torch.bool, device=device),
                           torch.zeros(batch, 1, dtype=torch.long, device=device))

    def use_cache(self, state: DecodeState):
        """Attach the state's caches to the attention layers (detached again by lm.clear_cache())."""
        for block, cache in zip(self.lm.blocks, state.caches, strict=True):
            block.attn.cache = cache

    # ------------------------------------------------------------------------- checkpoints

    def save_pretrained(self, out_dir, tokenizer=None):
        """Write config.json, model.safetensors and (if given) the tokenizer's files (tokenizer.Tokenizer.save)."""
        if any(isinstance(m, LoRALinear) for m in self.modules()):
            raise ValueError("the model still has LoRA adapters: call lora.merge_lora(model) before saving")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        state = {k: v.contiguous() for k, v in self.state_dict().items() if k not in self.tied_keys()}
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(out)

    @classmethod
    def from_pretrained(cls, ckpt_dir, device=None, dtype=None) -> "VLM":
        """Load a checkpoint dir strictly; large models are built on `meta` and filled in place (no double RAM)."""
        ckpt = Path(ckpt_dir)
        for name in ("config.json", "model.safetensors"):
            if not (ckpt / name).is_file():
                raise FileNotFoundError(f"{ckpt / name}: not found (is {ckpt} a vlm_from_scratch checkpoint?)")
        try:
            cfg = VLMConfig.from_dict(json.loads((ckpt / "config.json").read_text()))
        except (json.JSONDecodeError, ValueError) as err:
            raise ValueError(f"{ckpt / 'config.json'}: {err}") from None
        with torch.device("meta"):
            model = cls(cfg)
        device = torch.device(device or "cpu")
        with safe_open(ckpt / "model.safetensors", framework="pt", device=str(device)) as f:  # memory-mapped
            state = {k: f.get_tensor(k) for k in f.keys()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_checked(state, source=ckpt / "model.safetensors")
        return model

    def prepare_decoding(self, quantize: str | None = None, compile: bool = False) -> "VLM":
        """What sample.py and eval.py do before decoding: int8 layers made at load time (unless the checkpoint
        already holds them), then the compiled one-token step."""
        if quantize and self.cfg.quantize not in (None, quantize):
            raise ValueError(f"the checkpoint is {self.cfg.quantize} already; it cannot be made {quantize}")
        if quantize and self.cfg.quantize is None:
            self.quantize(quantize)
        if compile:
            self.compile_decode_step()
        return self

    def quantize(self, kind: str = "int8"):
        """Swap the LM's linear layers for int8 or int4 ones (quantize.py); the config records it, so a saved
        checkpoint is rebuilt quantized and loads strictly."""
        self.cfg = dataclasses.replace(self.cfg, quantize=kind)  # checked by VLMConfig
        quantize_lm(self.lm, kind, self.cfg.quant_group_size)
        return self

    def tied_keys(self) -> set[str]:
        tied = self.cfg.lm.tie_embeddings and self.cfg.quantize is None  # a quantized head is its own copy
        return {"lm.head.weight"} if tied else set()

    def load_checked(self, state: dict, source="state dict"):
        """Load every tensor by assignment, after checking that names and shapes match exactly.

        Errors name the key and both shapes. Works on a model built on the `meta` device.
        """
        expected = {k: v.shape for k, v in self.state_dict().items() if k not in self.tied_keys()}
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise KeyError(f"{source}: missing tensor '{missing[0]}', model expects shape "
                           f"{tuple(expected[missing[0]])}{more}")
        if unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise KeyError(f"{source}: unexpected tensor '{unexpected[0]}' with shape "
                           f"{tuple(state[unexpected[0]].shape)}{more}")
        for k, shape in expected.items():
            if state[k].shape != shape:
                raise ValueError(f"{source}: tensor '{k}' has shape {tuple(state[k].shape)}, "
                                 f"model expects {tuple(shape)}")
        state = dict(state)
        for k in self.tied_keys():
            state[k] = state["lm.tok_embed.weight"]
        self.load_state_dict(state, strict=True, assign=True)
        if self.tied_keys():
            self.lm.head.weight = self.lm.tok_embed.weight  # one Parameter again after assignment
        self.lm.inv_freq = rope_frequencies(self.cfg.lm).to(self.lm.tok_embed.weight.device)

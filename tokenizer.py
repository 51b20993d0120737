"""Tokenizer: sentencepiece text <-> ids, the `<image>` placeholder, and LLaVA's conversation templates.

Follows LLaVA (Liu et al. 2023, 2024) byte for byte: `tokenize_prompt` is its `tokenizer_image_token` run with
a legacy (slow) Llama tokenizer, and the `plain` / `vicuna_v1` templates are its `conv_llava_plain` /
`conv_vicuna_v1`. The tokenizer file is the `tokenizer.model` that Llama-2, Vicuna, TinyLlama and Mistral ship.
"""

import io
import re
import warnings
from pathlib import Path

import sentencepiece as spm

IMAGE = "<image>"  # placeholder for one image; never fed to sentencepiece
EOS = "</s>"  # how LLaVA's prompt strings write the end-of-turn token
IGNORE = -100  # label of a position the loss skips (cross_entropy's default ignore_index)
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATES = ("plain", "vicuna_v1")
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}  # "from" -> our role


class TooLong(ValueError):
    """A conversation that cannot be cut to max_len without breaking an image block or losing every answer."""


class Tokenizer:
    """A sentencepiece model and its special ids. pad falls back to unk (id 0) when the model has none, as
    LLaVA pads Llama."""

    def __init__(self, path):
        self.path = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.path)
        except RuntimeError as err:  # sentencepiece reports every failure to load as a RuntimeError
            raise ValueError(f"{path}: not a sentencepiece model ({err})") from None
        self.vocab_size = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id

    def encode(self, text: str, bos=False, eos=False) -> list[int]:
        """Plain text to ids. Sentencepiece adds its dummy-prefix space: "Hi" encodes like " Hi"."""
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.path} (size {self.vocab_size})")
        return self.sp.decode(ids)


def train_tokenizer(texts, vocab_size: int, out_path, model_type="bpe") -> Tokenizer:
    """Train a Llama-2-style sentencepiece model on `texts`, save it to out_path and load it.

    Llama-2's settings: byte fallback (no text is ever unknown), digits split, no normalisation, a dummy
    prefix, unk=0 bos=1 eos=2. We also reserve pad=3: a from-scratch model can afford its own pad id.
    Deterministic: one thread and no sentence sampling. A vocab_size above what the corpus supports is lowered
    to sentencepiece's maximum with a warning, so size the model from the returned `.vocab_size`.
    """
    texts = list(texts)
    model = io.BytesIO()
    settings = dict(
        model_type=model_type, byte_fallback=True, split_digits=True, character_coverage=0.99995,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1,
        input_sentence_size=0, minloglevel=2,
    )
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                       **settings)
    except RuntimeError as err:
        too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))
        if too_small:
            raise ValueError(f"vocab_size {vocab_size} is too small: this corpus needs at least "
                             f"{too_small[1]} (256 byte pieces, 4 special ids, its characters)") from None
        too_big = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", str(err))
        if not too_big:
            raise
        warnings.warn(f"vocab_size {vocab_size} is more than this corpus supports; using {too_big[1]}",
                      stacklevel=2)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                       vocab_size=int(too_big[1]), **settings)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    Path(out_path).write_bytes(model.getvalue())
    return Tokenizer(out_path)


def tokenize_prompt(tokenizer: Tokenizer, text: str, image_token_id: int, num_image_tokens: int,
                    bos=True) -> list[int]:
    """LLaVA's `tokenizer_image_token`: every `<image>` becomes num_image_tokens copies of image_token_id.

    "</s>" becomes eos, as Llama's tokenizer parses it. Each text chunk between them is encoded on its own and
    so gets its own dummy-prefix space: "USER: <image>\\nHi" -> "▁USER", ":", "▁", <image>..., "▁", "<0x0A>", "Hi".
    """
    ids = [tokenizer.bos_id] if bos else []
    for chunk in re.split(f"({IMAGE}|{EOS})", text):
        if chunk == IMAGE:
            ids += [image_token_id] * num_image_tokens
        elif chunk == EOS:
            ids.append(tokenizer.eos_id)
        else:
            ids += tokenizer.encode(chunk)
    return ids


def template_pieces(conversations: list[dict], template: str) -> list[tuple[str, bool]]:
    """The prompt as (text, supervised) pieces; their concatenation is exactly LLaVA's prompt string.

    vicuna_v1: "<system> USER: {q} ASSISTANT: {a}</s>USER: ..."; an answer piece carries the space before it.
    plain (pretraining): each human turn is reduced to its image tags, each answer is followed by "\\n".
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    pieces = []
    for turn in conversations:
        role, value = ROLES.get(turn["from"]), turn["value"]
        if role is None:
            raise ValueError(f"unknown role {turn['from']!r}; expected one of {', '.join(ROLES)}")
        if not pieces and role != "human":
            raise ValueError("a conversation must start with a human turn")
        if template == "plain":
            pieces.append((IMAGE * value.count(IMAGE), False) if role == "human" else (value + "\n", True))
        elif role == "human":
            system = f"{SYSTEM} " if not pieces else ""  # in the first piece: no space of its own to lose
            pieces.append((f"{system}USER: {value} ASSISTANT:", False))
        else:
            pieces.append((f" {value}{EOS}", True))
    return pieces


def build_prompt(messages: list[dict], template="vicuna_v1") -> str:
    """The prompt string; after a human message it ends with "ASSISTANT:", ready for generation."""
    return "".join(text for text, _ in template_pieces(messages, template))


def corpus_text(conversations: list[dict], template="vicuna_v1") -> str:
    """A conversation as tokenizer-training text: the prompt without image tags and "</s>"."""
    return build_prompt(conversations, template).replace(IMAGE, "").replace(EOS, "")


def encode_conversation(tokenizer: Tokenizer, conversations: list[dict], template: str, image_token_id: int,
                        num_image_tokens: int, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for training: labels are IGNORE except each answer's tokens and the "</s>" after it.

    Each piece is tokenized on its own and its labels follow from where it lands, so no offsets are guessed.
    An answer's leading space is left to sentencepiece's dummy prefix; sentencepiece never merges across a
    space, so the ids equal those of the whole prompt (tested).
    """
    ids, labels = [tokenizer.bos_id], [IGNORE]
    for text, supervised in template_pieces(conversations, template):
        piece = tokenize_prompt(tokenizer, text.removeprefix(" "), image_token_id, num_image_tokens, bos=False)
        ids += piece
        labels += piece if supervised else [IGNORE] * len(piece)
    if max_len is None or len(ids) <= max_len:
        return ids, labels
    if image_token_id in ids[max_len:]:
        raise TooLong(f"{len(ids)} tokens, and an image block does not fit in max_len {max_len}")
    if all(label == IGNORE for label in labels[:max_len]):
        raise TooLong(f"{len(ids)} tokens, and no answer token fits in max_len {max_len}")
    return ids[:max_len], labels[:max_len]

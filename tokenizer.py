"""Tokenizer: text <-> ids with the LM's own tokenizer file, the `<image>` placeholder, and chat templates.

Two backends behind one small interface (encode, decode, the special ids, pieces, save): sentencepiece reads the
`tokenizer.model` that Llama-2, Vicuna, TinyLlama and Mistral v0.1-0.3 ship, and trains from-scratch tokenizers;
the `tokenizers` library (the one transformers uses) reads the byte-level BPE `tokenizer.json` of Llama-3.x,
SmolLM2, Qwen2.5 and Mistral-Nemo. The backend is picked from the file that is there, never from a model name.

`tokenize_prompt` is LLaVA's `tokenizer_image_token` (Liu et al. 2023, 2024); `plain` / `vicuna_v1` are its
`conv_llava_plain` / `conv_vicuna_v1`. `chatml`, `llama3` and `mistral` give, token for token, what the model's
own Jinja chat template gives through transformers' `apply_chat_template` (tested), in LLaVA-NeXT's layout
(`llava_llama_3`, `mistral_instruct`) with the model's default system prompt.
"""

import argparse
import functools
import io
import json
import re
import shutil
import warnings
from pathlib import Path

import jinja2.sandbox
import sentencepiece as spm
import tokenizers

IMAGE = "<image>"  # placeholder for one image; never fed to the tokenizer
EOS = "</s>"  # how LLaVA's prompt strings write the end of a vicuna_v1 answer (the tokenizer's eos)
IGNORE = -100  # label of a position the loss skips (cross_entropy's default ignore_index)
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATES = ("plain", "vicuna_v1", "chatml", "llama3", "mistral")
OWN_BOS = ("chatml", "llama3", "mistral")  # they write bos into the text themselves, as the model's Jinja does
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}  # the others end an answer with eos
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}  # "from" -> our role
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


class TooLong(ValueError):
    """A conversation that cannot be cut to max_len without breaking an image block or losing every answer."""


# ----------------------------------------------------------------------------- the two backends


class Tokenizer:
    """What both backends share: special ids read from the files beside the tokenizer file, pieces, save.

    encode(text) turns special-token strings in the text ("</s>", "<|im_end|>") into their ids, as transformers'
    AutoTokenizer does; decode drops special tokens (transformers' skip_special_tokens=True).
    """

    path: Path
    file_name: str  # the name load_tokenizer looks for in a directory
    vocab_size: int

    def _read_specials(self, own: dict):
        """bos/eos/pad/unk from tokenizer_config.json, special_tokens_map.json, generation_config.json and
        config.json beside the file, in that order; `own` holds what the tokenizer file itself says."""
        folder = self.path.parent
        config, tokens_map, generation, model = (read_json(folder / name) for name in (
            "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "config.json"))
        self.chat_template = chat_template(folder, config)
        ids, stops = {}, []
        for name in ("bos", "eos", "pad", "unk"):
            found = [self.token_id(token_text(source.get(f"{name}_token"))) for source in (config, tokens_map)]
            for source in (generation, model):
                value = source.get(f"{name}_token_id")
                values = value if isinstance(value, list) else [value]
                found.append(values[0] if values else None)
                if name == "eos":
                    stops += [v for v in values if v is not None]
            ids[name] = next((i for i in found if i is not None), own.get(name))
        self.bos_id, self.eos_id, self.unk_id = ids["bos"], ids["eos"], ids["unk"]
        # Does a sequence start with bos? tokenizer_config's add_bos_token, else the file's habit: Llama's
        # sentencepiece adds it; a tokenizer.json adds what its post-processor adds (Llama-3 yes, SmolLM2 no).
        flag = config.get("add_bos_token")
        habit = self.bos_id in own.get("prefix", [self.bos_id])
        self.add_bos = self.bos_id is not None and (flag if isinstance(flag, bool) else habit)
        # LLaVA pads Llama with unk; Llama-3 has neither pad nor unk, so eos (padding is masked out anyway)
        self.pad_id = next((i for i in (ids["pad"], self.unk_id, self.eos_id) if i is not None), None)
        ends = [self.token_id(token) for token in END_OF_TURN.values()]
        self.stop_ids = tuple(dict.fromkeys(i for i in [self.eos_id, *stops, *ends] if i is not None))
        self.bos_token = self.piece(self.bos_id) if self.bos_id is not None else ""
        self.eos_token = self.piece(self.eos_id) if self.eos_id is not None else EOS
        self.writes_config = not generation and any(k.endswith("_token_id") for k in model)  # save them with us

    @functools.cached_property
    def default_system(self) -> str | None:
        """The system prompt the model's chat template puts in when a conversation has none (SmolLM2, Qwen2.5)."""
        return default_system(self.chat_template, self.bos_token, self.eos_token, self.path.parent)

    def token_id(self, token: str | None) -> int | None:
        raise NotImplementedError

    def piece(self, i: int) -> str:
        raise NotImplementedError

    def starts_word(self, i: int) -> bool:
        """Whether token i opens a word: sentencepiece's "▁" or byte-level BPE's "Ġ" (a leading space)."""
        return self.piece(i).startswith(("\u2581", "\u0120"))

    def until_stop(self, ids) -> list[int]:
        """The ids before the first stop id (eos or end of turn): a generated answer without its ending."""
        ids = list(ids)
        return next((ids[:k] for k, i in enumerate(ids) if i in self.stop_ids), ids)

    def check_fits(self, rows: int):
        """Refuse a tokenizer with ids beyond a model's embedding table of `rows` rows: it belongs to another model."""
        if self.vocab_size > rows:
            raise ValueError(f"{self.path}: {self.vocab_size} tokens, but the model's embedding table has only "
                             f"{rows} rows (a tokenizer from another model?)")

    def check_ids(self, ids) -> list[int]:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary of {self.path} (size {self.vocab_size})")
        return ids

    def save(self, out_dir):
        """Copy the tokenizer file and the small files that carry its special tokens and chat template."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {self.file_name: self.path} | {name: self.path.parent / name for name in SIDE_FILES}
        for name, src in files.items():
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
        if self.writes_config:  # our checkpoint's config.json is the VLM's, so the ids move to their own file
            ids = {"bos_token_id": self.bos_id, "eos_token_id": list(self.stop_ids), "pad_token_id": self.pad_id}
            (out / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `tokenizer.model`. Special-token strings split the text, and each stretch between them
    gets its own dummy-prefix space, as Llama's legacy tokenizer (and so LLaVA) does."""

    file_name = "tokenizer.model"

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except RuntimeError as err:  # sentencepiece reports every failure to load as a RuntimeError
            raise ValueError(f"{path}: not a sentencepiece model ({err})") from None
        self.vocab_size = self.sp.vocab_size()
        own = {name: i for name, i in (("bos", self.sp.bos_id()), ("eos", self.sp.eos_id()),
                                       ("pad", self.sp.pad_id()), ("unk", self.sp.unk_id())) if i >= 0}
        self._read_specials(own)
        self.special_ids = {i for i in (self.bos_id, self.eos_id, self.unk_id, self.pad_id) if i is not None}
        specials = {self.piece(i) for i in (self.bos_id, self.eos_id, self.unk_id) if i is not None}
        self.split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
        self.piece_bytes = [1 if self.sp.is_byte(i) else len(self.piece(i).replace("\u2581", " ").encode())
                            for i in range(self.vocab_size)]  # the text each piece stands for, in bytes

    def token_id(self, token):
        if token is None:
            return None
        i = self.sp.piece_to_id(token)
        return i if i != self.sp.unk_id() or token == self.sp.id_to_piece(i) else None

    def piece(self, i):
        return self.sp.id_to_piece(i)

    def encode(self, text: str, bos=False, eos=False) -> list[int]:
        """Plain text to ids. Each stretch gets sentencepiece's dummy prefix: "Hi" encodes like " Hi"."""
        return self.encode_offsets(text, bos, eos)[0]

    def encode_offsets(self, text: str, bos=False, eos=False) -> tuple[list[int], list[int]]:
        """(ids, the character where each token starts); bos/eos start at -1 / len(text)."""
        ids, starts, at = [self.bos_id] * bos, [-1] * bos, 0
        for chunk in self.split.split(text):
            if self.split.fullmatch(chunk):
                ids.append(self.token_id(chunk))
                starts.append(at)
            elif chunk:
                chunk_ids = self.sp.encode(chunk)
                ids += chunk_ids
                starts += [at + s for s in self.chunk_starts(chunk, chunk_ids)]
            at += len(chunk)
        return ids + [self.eos_id] * eos, starts + [len(text)] * eos

    def chunk_starts(self, chunk: str, ids: list[int]) -> list[int]:
        """Where each piece starts, from the bytes it stands for (exact for the identity normalization that
        Llama's tokenizers and ours use; others are refused rather than mislabelled)."""
        sizes = [self.piece_bytes[i] for i in ids]
        extra = sum(sizes) - len(chunk.encode())  # 1 when sentencepiece added its dummy-prefix space
        if extra not in (0, 1):
            raise ValueError(f"{self.path}: this sentencepiece model normalizes text, so token offsets are unknown")
        char_of_byte = [i for i, ch in enumerate(chunk) for _ in ch.encode()] + [len(chunk)]
        starts, at = [], -extra
        for size in sizes:
            starts.append(char_of_byte[max(at, 0)])
            at += size
        return starts

    def decode(self, ids) -> str:
        """Special tokens are dropped (sentencepiece would print unk as " ⁇ ")."""
        return self.sp.decode([i for i in self.check_ids(ids) if i not in self.special_ids])


class BPETokenizer(Tokenizer):
    """A `tokenizer.json` read by Hugging Face's `tokenizers` library (byte-level BPE, or any model it holds)."""

    file_name = "tokenizer.json"

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        try:
            self.tk = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception for any file it cannot parse
            raise ValueError(f"{path}: not a valid tokenizer.json ({str(err).splitlines()[0]})") from None
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self._read_specials({"prefix": self.tk.encode("", add_special_tokens=True).ids})

    def token_id(self, token):
        return None if token is None else self.tk.token_to_id(token)

    def piece(self, i):
        return self.tk.id_to_token(i)

    def encode(self, text: str, bos=False, eos=False) -> list[int]:
        return self.encode_offsets(text, bos, eos)[0]

    def encode_offsets(self, text: str, bos=False, eos=False) -> tuple[list[int], list[int]]:
        """(ids, the character where each token starts). bos/eos only if the tokenizer has them."""
        enc = self.tk.encode(text, add_special_tokens=False)
        head = [self.bos_id] * (bos and self.bos_id is not None)
        tail = [self.eos_id] * (eos and self.eos_id is not None)
        return head + enc.ids + tail, [-1] * len(head) + [s for s, _ in enc.offsets] + [len(text)] * len(tail)

    def decode(self, ids) -> str:
        return self.tk.decode(self.check_ids(ids), skip_special_tokens=True)


def load_tokenizer(path) -> Tokenizer:
    """A checkpoint or HF directory, a tokenizer.json or a tokenizer.model. In a directory tokenizer.json wins:
    models that ship both (Mistral v0.3) describe the same tokenizer in it, with its special tokens."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("tokenizer.json", "tokenizer.model") if (path / name).is_file()]
        if not found:
            raise ValueError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
        path = found[0]
    if path.name.endswith(".json"):
        return BPETokenizer(path)
    return SentencePieceTokenizer(path)


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def chat_template(folder: Path, config: dict) -> str | None:
    """The model's Jinja chat template: chat_template.jinja, or tokenizer_config.json's "chat_template"."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def render(template: str, messages: list[dict], bos_token: str, eos_token: str, add_generation_prompt=False):
    """A Jinja chat template rendered as transformers renders it (sandboxed, trim_blocks, lstrip_blocks)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                            add_generation_prompt=add_generation_prompt)


def default_system(template: str | None, bos_token: str, eos_token: str, folder: Path) -> str | None:
    """The system prompt a model's chat template puts in when the conversation has none (SmolLM2, Qwen2.5)."""
    if not template:
        return None
    try:
        text = render(template, [{"role": "user", "content": "?"}], bos_token, eos_token)
    except jinja2.exceptions.TemplateError as err:
        raise ValueError(f"{folder}: the chat template does not render ({err})") from None
    found = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S) or re.search(
        r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", text, re.S)
    return found[1] if found else None


def detect_template(directory) -> str:
    """Our template name for an LM directory, from its own chat template, else from its special tokens.
    A tokenizer with neither (a sentencepiece Llama, a base model) gets LLaVA's vicuna_v1."""
    directory = Path(directory)
    text = chat_template(directory, read_json(directory / "tokenizer_config.json")) or ""
    if not text and (directory / "tokenizer.json").is_file():
        text = " ".join(t["content"] for t in read_json(directory / "tokenizer.json").get("added_tokens", []))
    for marker, name in (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("[INST]", "mistral")):
        if marker in text:
            return name
    return "vicuna_v1"


def train_tokenizer(texts, vocab_size: int, out_path, model_type="bpe") -> SentencePieceTokenizer:
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
    return SentencePieceTokenizer(out_path)


class TextStream:
    """Turns tokens into printable text as they arrive. Each token is decoded together with the ones before
    it (sentencepiece drops the leading space of a text, and byte pieces only make a character together), and
    text that ends in half a character is held back until it is whole."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.printed = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return ""
        new, self.printed = text[len(self.printed):], text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new, self.printed = text[len(self.printed):] if text.startswith(self.printed) else "", text
        return new


# ----------------------------------------------------------------------------- prompts and templates


def tokenize_offsets(tokenizer: Tokenizer, text: str, image_token_id: int, num_image_tokens: int,
                     bos=True) -> tuple[list[int], list[int]]:
    """tokenize_prompt, with the character of `text` where each token starts (-1 for bos)."""
    ids, starts = ([tokenizer.bos_id], [-1]) if bos and tokenizer.add_bos else ([], [])
    at = 0
    for chunk in text.split(IMAGE):
        if at:
            ids += [image_token_id] * num_image_tokens
            starts += [at - len(IMAGE)] * num_image_tokens
        if chunk:
            chunk_ids, chunk_starts = tokenizer.encode_offsets(chunk)
            ids += chunk_ids
            starts += [at + s for s in chunk_starts]
        at += len(chunk) + len(IMAGE)
    return ids, starts


def tokenize_prompt(tokenizer: Tokenizer, text: str, image_token_id: int, num_image_tokens: int,
                    bos=True) -> list[int]:
    """LLaVA's `tokenizer_image_token`: every `<image>` becomes num_image_tokens copies of image_token_id.

    Each text chunk between them is encoded on its own, so with sentencepiece each gets its own dummy-prefix
    space: "USER: <image>\\nHi" -> "▁USER", ":", "▁", <image>..., "▁", "<0x0A>", "Hi"; "</s>" is eos. bos=True
    starts with bos where the tokenizer starts its sequences with one (Llama's do; SmolLM2's and Qwen's do not).
    """
    return tokenize_offsets(tokenizer, text, image_token_id, num_image_tokens, bos)[0]


def template_pieces(conversations: list[dict], template: str, system: str | None = None, bos="",
                    eos=EOS) -> list[tuple[str, bool]]:
    """The prompt as (text, supervised) pieces; their concatenation is the template's prompt string, and after
    a human turn it ends ready for the answer. A leading "system" turn replaces the default `system`.

    plain (pretraining): each human turn is reduced to its image tags, each answer is followed by "\\n".
    vicuna_v1: "<system> USER: {q} ASSISTANT: {a}</s>USER: ..."; an answer piece carries the space before it.
    chatml: "<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n
    {a}<|im_end|>\\n". llama3: "<bos><|start_header_id|>user<|end_header_id|>\\n\\n{q}<|eot_id|>...".
    mistral: "<bos>[INST] {q} [/INST]{a}</s>". bos / eos are the tokenizer's own strings.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    turns = []
    for turn in conversations:
        role = "system" if turn["from"] == "system" else ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"unknown role {turn['from']!r}; expected one of {', '.join(ROLES)}, system")
        if role == "system" and turns:
            raise ValueError("a system turn can only come first")
        if role == "system":
            system = turn["value"].strip() if template == "llama3" else turn["value"]
            continue
        if not turns and role != "human":
            raise ValueError("a conversation must start with a human turn")
        turns.append((role, turn["value"]))
    if template == "plain":
        return [(IMAGE * v.count(IMAGE), False) if r == "human" else (v + "\n", True) for r, v in turns]
    if template == "vicuna_v1":
        pieces = []
        for role, value in turns:
            if role == "gpt":
                pieces.append((f" {value}{eos}", True))
            else:  # the system text sits in the first piece: no space of its own to lose; "" writes none
                text = SYSTEM if system is None else system
                pieces.append((f"{text + ' ' if text and not pieces else ''}USER: {value} ASSISTANT:", False))
        return pieces
    return own_template_pieces(turns, template, system, bos, eos)


def own_template_pieces(turns, template, system, bos, eos) -> list[tuple[str, bool]]:
    """chatml / llama3 / mistral, as the models' own Jinja templates write them."""
    pieces = [(bos, False)] if bos and template != "chatml" else []
    if template == "mistral":
        if system is not None:
            raise ValueError("the mistral template has no system prompt")
        return pieces + [(f"[INST] {v} [/INST]", False) if r == "human" else (f"{v}{eos}", True) for r, v in turns]
    if template == "llama3":  # the template trims every message
        head = "<|start_header_id|>{}<|end_header_id|>\n\n".format
        if system is not None:
            pieces.append((f"{head('system')}{system}<|eot_id|>", False))
        for role, value in turns:
            pieces.append((f"{head('user')}{value.strip()}<|eot_id|>{head('assistant')}", False) if role == "human"
                          else (f"{value.strip()}<|eot_id|>", True))
        return pieces
    head = "<|im_start|>{}\n".format
    if system is not None:
        pieces.append((f"{head('system')}{system}<|im_end|>", False))
    for role, value in turns:  # the newline after each <|im_end|> opens the next piece
        newline = "\n" if pieces else ""
        pieces.append((f"{newline}{head('user')}{value}<|im_end|>\n{head('assistant')}", False) if role == "human"
                      else (f"{value}<|im_end|>", True))
    return pieces + [("\n", False)] * (bool(turns) and turns[-1][0] == "gpt")


def check_template(tokenizer: Tokenizer, template: str):
    """Refuse a template whose end-of-turn token the tokenizer does not have (chatml on a Llama-2 tokenizer)."""
    token = END_OF_TURN.get(template)
    if token is not None and tokenizer.token_id(token) is None:
        raise ValueError(f"{tokenizer.path}: the {template} template ends each turn with {token}, which this "
                         f"tokenizer does not have; choose another --template")


def template_kw(tokenizer: Tokenizer | None, template: str, system: str | None = None) -> dict:
    """What a template takes from the tokenizer: its bos / eos strings and the model's default system prompt.
    `system` is the model's own (VLMConfig.system): None keeps the default, "" drops the system prompt."""
    kw = {}
    if tokenizer is not None:
        check_template(tokenizer, template)
        kw = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token}
    if system is not None:  # chatml / llama3 / mistral write no system turn for None
        kw["system"] = system or ("" if template == "vicuna_v1" else None)
    elif tokenizer is not None and template in ("chatml", "llama3"):
        kw["system"] = tokenizer.default_system
    return kw


def build_prompt(messages: list[dict], template="vicuna_v1", tokenizer: Tokenizer | None = None,
                 system: str | None = None) -> str:
    """The prompt string; after a human message it ends ready for the answer ("ASSISTANT:", "<|im_start|>
    assistant\\n", ...). With the tokenizer, the model's own bos/eos strings and default system prompt; `system`
    as in template_kw."""
    return "".join(text for text, _ in template_pieces(messages, template,
                                                       **template_kw(tokenizer, template, system)))


def encode_prompt(tokenizer: Tokenizer, prompt: str, template: str, image_token_id: int,
                  num_image_tokens: int) -> list[int]:
    """A build_prompt string as ids: bos first, unless the template writes its own (or has none)."""
    return tokenize_prompt(tokenizer, prompt, image_token_id, num_image_tokens, bos=template not in OWN_BOS)


def end_of_turn_id(tokenizer: Tokenizer, template: str) -> int:
    """The token that closes an answer: <|im_end|>, <|eot_id|>, or eos."""
    token = END_OF_TURN.get(template)
    return tokenizer.token_id(token) if token else tokenizer.eos_id


def corpus_text(conversations: list[dict], template="vicuna_v1") -> str:
    """A conversation as tokenizer-training text: the prompt without image tags and "</s>"."""
    return build_prompt(conversations, template).replace(IMAGE, "").replace(EOS, "")


def encode_conversation(tokenizer: Tokenizer, conversations: list[dict], template: str, image_token_id: int,
                        num_image_tokens: int, max_len: int | None = None,
                        system: str | None = None) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for training: labels are IGNORE except each answer's tokens and its end-of-turn.

    The whole prompt is tokenized at once, exactly as the model's template and transformers tokenize it, and a
    token is supervised when it starts inside an answer piece: no offsets are guessed, no boundary is forced.
    """
    pieces = template_pieces(conversations, template, **template_kw(tokenizer, template, system))
    spans, text = [], ""
    for piece, supervised in pieces:
        if supervised:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    ids, starts = tokenize_offsets(tokenizer, text, image_token_id, num_image_tokens, bos=template not in OWN_BOS)
    labels = [i if any(a <= s < b for a, b in spans) else IGNORE for i, s in zip(ids, starts, strict=True)]
    if max_len is None or len(ids) <= max_len:
        return ids, labels
    if image_token_id in ids[max_len:]:
        raise TooLong(f"{len(ids)} tokens, and an image block does not fit in max_len {max_len}")
    if all(label == IGNORE for label in labels[:max_len]):
        raise TooLong(f"{len(ids)} tokens, and no answer token fits in max_len {max_len}")
    return ids[:max_len], labels[:max_len]


# ----------------------------------------------------------------------------- CLI


def main(argv=None):
    p = argparse.ArgumentParser(description="Show how a tokenizer splits text: one JSON list of ids per input "
                                "line (special-token strings such as <|im_end|> become their ids, as in "
                                "transformers).")
    p.add_argument("path", help="a checkpoint or HF directory, a tokenizer.json or a tokenizer.model")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="one input")
    source.add_argument("--file", type=Path, help="a text file: one input per line")
    p.add_argument("--pieces", action="store_true", help="after each list of ids, a JSON list of their pieces")
    args = p.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.path)
        lines = [args.text] if args.text is not None else args.file.read_text().splitlines()
    except (OSError, ValueError) as err:
        raise SystemExit(f"tokenizer: {err}") from None
    for line in lines:
        ids = tokenizer.encode(line)
        print(json.dumps(ids))
        if args.pieces:
            print(json.dumps([tokenizer.piece(i) for i in ids], ensure_ascii=False))


if __name__ == "__main__":
    main()

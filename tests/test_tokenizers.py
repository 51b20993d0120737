"""Both tokenizer backends and the chat templates against transformers, the oracle: ids on a hard corpus,
apply_chat_template token for token (chatml on the real SmolLM2, llama3 and mistral with their published Jinja),
assistant-only labels per template, the files a tokenizer reads and writes, the CLI, and bad input."""

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tokenizers
import transformers

import tokenizer as tok_mod
from tokenizer import (
    IGNORE,
    BPETokenizer,
    SentencePieceTokenizer,
    TextStream,
    build_prompt,
    detect_template,
    encode_conversation,
    encode_prompt,
    end_of_turn_id,
    load_tokenizer,
    tokenize_prompt,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
CORPUS = (Path(__file__).parent / "data" / "hard_corpus.txt").read_text().removesuffix("\n").split("\n")
IMAGE_ID, N_IMAGE = 100_000, 3  # an id no test vocabulary reaches, so image blocks stand out

# Published chat templates: Meta-Llama-3-8B-Instruct and Mistral-7B-Instruct-v0.1/v0.2 (tokenizer_config.json).
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MISTRAL_JINJA = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
    "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
    "are supported!') }}{% endif %}{% endfor %}")

# Multi-turn, with what templates get wrong most easily: runs of spaces, tabs, blank lines, emoji, digits,
# leading/trailing whitespace (llama3 trims it, chatml keeps it), and special-token strings as plain text.
CONVERSATION = [
    ("user", "What is the capital of France?"),
    ("assistant", "Paris.  It has 2,165,423 people 😀"),
    ("user", " héllo\tthere\n\nwhat does <|im_end|> or </s> or [INST] mean? "),
    ("assistant", "  They are special tokens.\n"),
    ("user", "Merci ! 你好 12345?"),
]


def ours_turns(turns):
    return [{"from": role, "value": value} for role, value in turns]


def hf_ids(hf, text):
    return hf(text, add_special_tokens=False)["input_ids"]


def chat_ids(hf, turns, add_generation_prompt):
    out = hf.apply_chat_template([{"role": r, "content": v} for r, v in turns], tokenize=True,
                                 add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A sentencepiece tokenizer.model trained on the hard corpus itself, so its merges are exercised."""
    out = tmp_path_factory.mktemp("sp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a vocab_size above what the corpus supports is lowered
        train_tokenizer(CORPUS * 2, 2000, out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def mistral_dir(sp_dir, tmp_path_factory):
    """The sentencepiece tokenizer with Mistral-Instruct's special tokens and published chat template."""
    out = tmp_path_factory.mktemp("mistral")
    shutil.copyfile(sp_dir / "tokenizer.model", out / "tokenizer.model")
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": MISTRAL_JINJA}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def llama3_dir(smollm2_hf_dir, tmp_path_factory):
    """SmolLM2's byte-level BPE with Llama-3's special tokens, bos habit and published chat template."""
    out = tmp_path_factory.mktemp("llama3")
    tk = tokenizers.Tokenizer.from_file(str(smollm2_hf_dir / "tokenizer.json"))
    tk.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    bos = "<|begin_of_text|>"  # and, like Llama-3's tokenizer.json, a post-processor that starts with bos
    tk.post_processor = tokenizers.processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[
        (bos, tk.token_to_id(bos))])
    tk.save(str(out / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_JINJA}
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def dirs(smollm2_hf_dir, llama3_dir, mistral_dir, sp_dir):
    return {"chatml": smollm2_hf_dir, "llama3": llama3_dir, "mistral": mistral_dir, "sentencepiece": sp_dir}


# ----------------------------------------------------------------------------- ids


def test_the_hard_corpus_is_hard():
    text = "\n".join(CORPUS)
    assert len(CORPUS) >= 500
    for needle in ("\t", "    ", "😀", "你好", "مرحبا", "Привет", "3141592653", "<|im_end|>", "<image>", "</s>"):
        assert needle in text


@pytest.mark.parametrize("backend", ["chatml", "sentencepiece"])
def test_ids_and_text_match_autotokenizer_on_the_hard_corpus(dirs, backend):
    hf = transformers.AutoTokenizer.from_pretrained(dirs[backend])
    ours = load_tokenizer(dirs[backend])
    assert isinstance(ours, BPETokenizer if backend == "chatml" else SentencePieceTokenizer)
    assert ours.vocab_size == len(hf)
    for line in CORPUS:
        ids = ours.encode(line)
        assert ids == hf_ids(hf, line), line
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), line


def test_special_ids_are_the_ones_transformers_reads(dirs):
    for name in ("chatml", "llama3", "mistral"):
        hf, ours = transformers.AutoTokenizer.from_pretrained(dirs[name]), load_tokenizer(dirs[name])
        assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id), name
    smol = load_tokenizer(dirs["chatml"])
    assert smol.stop_ids == (smol.token_id("<|im_end|>"),)  # SmolLM2's eos is its end of turn
    llama3 = load_tokenizer(dirs["llama3"])
    assert llama3.token_id("<|eot_id|>") in llama3.stop_ids
    assert llama3.pad_id == llama3.eos_id  # no pad and no unk (Llama-3): batches pad with eos, masked out


def test_generation_config_adds_stop_ids_and_config_json_ids_are_saved(llama3_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(llama3_dir / "tokenizer.json", src / "tokenizer.json")  # no tokenizer_config.json
    (src / "config.json").write_text(json.dumps({"bos_token_id": 5, "eos_token_id": [7, 9], "pad_token_id": 0}))
    tok = load_tokenizer(src)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (5, 7, 0) and tok.stop_ids[:2] == (7, 9)
    assert tok.token_id("<|eot_id|>") in tok.stop_ids  # the end of turn stops generation, though not eos here
    tok.save(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{}")  # a checkpoint's config.json is the VLM's
    again = load_tokenizer(tmp_path / "ckpt")
    assert (again.bos_id, again.eos_id, again.pad_id, again.stop_ids) == (5, 7, 0, tok.stop_ids)


def test_a_prompt_starts_with_bos_as_the_tokenizer_does(dirs, tmp_path):
    """LLaVA's templates (plain, vicuna_v1) start with bos where transformers' tokenizer adds one by default."""
    text = "USER: What is 2 + 2? ASSISTANT:"
    for name in ("chatml", "llama3"):
        hf, ours = transformers.AutoTokenizer.from_pretrained(dirs[name]), load_tokenizer(dirs[name])
        assert tokenize_prompt(ours, text, IMAGE_ID, N_IMAGE) == hf(text)["input_ids"], name
    shutil.copyfile(dirs["chatml"] / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "add_bos_token": True}))
    ours = load_tokenizer(tmp_path)
    assert tokenize_prompt(ours, text, IMAGE_ID, N_IMAGE) == [ours.bos_id] + ours.encode(text)
    assert tokenize_prompt(load_tokenizer(dirs["sentencepiece"]), text, IMAGE_ID, N_IMAGE)[0] == 1  # Llama's habit


def test_a_template_whose_end_of_turn_the_tokenizer_lacks_is_refused(dirs):
    turns = ours_turns(CONVERSATION[:2])
    for template in ("chatml", "llama3"):
        with pytest.raises(ValueError, match=f"{dirs['sentencepiece']}.*{template} template"):
            encode_conversation(load_tokenizer(dirs["sentencepiece"]), turns, template, IMAGE_ID, N_IMAGE)
    with pytest.raises(ValueError, match=re.escape("<|eot_id|>")):
        build_prompt(turns, "llama3", load_tokenizer(dirs["chatml"]))


def test_image_tags_split_alike_on_both_backends(dirs):
    text = "<image>\nWhat is 1 + 1?<image> end"
    for name in ("chatml", "sentencepiece"):
        tok = load_tokenizer(dirs[name])
        parts = text.split("<image>")
        expected = [IMAGE_ID] * N_IMAGE + tok.encode(parts[1]) + [IMAGE_ID] * N_IMAGE + tok.encode(parts[2])
        assert tokenize_prompt(tok, text, IMAGE_ID, N_IMAGE, bos=False) == expected, name


def test_text_stream_never_splits_a_character(dirs):
    for name in ("chatml", "sentencepiece"):
        tok = load_tokenizer(dirs[name])
        ids = tok.encode("héllo 😀 你好, Привет 🇫🇷!")
        stream, pieces = TextStream(tok), []
        for i in ids:
            pieces.append(stream.push(i))
        pieces.append(stream.flush())
        assert all("\ufffd" not in p for p in pieces)
        assert "".join(pieces) == tok.decode(ids)
        assert sum(map(bool, pieces)) > 3, "the text did not stream"


# ----------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("template", ["chatml", "llama3", "mistral"])
@pytest.mark.parametrize("system", [None, "  You answer in one line.\n"])
def test_templates_equal_apply_chat_template_token_for_token(dirs, template, system):
    if template == "mistral" and system:
        with pytest.raises(ValueError, match="no system prompt"):
            build_prompt(ours_turns([("system", system)] + CONVERSATION), template, load_tokenizer(dirs[template]))
        return
    hf, ours = transformers.AutoTokenizer.from_pretrained(dirs[template]), load_tokenizer(dirs[template])
    assert detect_template(dirs[template]) == template
    turns = ([("system", system)] if system else []) + CONVERSATION
    prompt = build_prompt(ours_turns(turns), template, ours)  # ends with a user turn: ready for the answer
    assert encode_prompt(ours, prompt, template, IMAGE_ID, N_IMAGE) == chat_ids(hf, turns, True)
    ids, _ = encode_conversation(ours, ours_turns(turns[:-1]), template, IMAGE_ID, N_IMAGE)  # ends answered
    assert ids == chat_ids(hf, turns[:-1], False)


def test_smollm2_default_system_prompt_is_read_from_its_template(smollm2_hf_dir):
    tok = load_tokenizer(smollm2_hf_dir)
    assert tok.default_system and tok.default_system in (smollm2_hf_dir / "chat_template.jinja").read_text()
    assert build_prompt(ours_turns(CONVERSATION[:1]), "chatml", tok).startswith(
        f"<|im_start|>system\n{tok.default_system}<|im_end|>\n<|im_start|>user\n")


def runs(labels):
    """The supervised stretches of a label row, as lists of ids."""
    out, current = [], []
    for label in labels + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            out, current = out + [current], []
    return out


@pytest.mark.parametrize("template, backend", [("plain", "sentencepiece"), ("plain", "chatml"),
                                               ("vicuna_v1", "sentencepiece"), ("vicuna_v1", "chatml"),
                                               ("chatml", "chatml"), ("llama3", "llama3"), ("mistral", "mistral")])
def test_labels_are_each_answer_and_its_end_of_turn(dirs, template, backend):
    tok = load_tokenizer(dirs[backend])
    turns = [("user", "<image>\n" + CONVERSATION[0][1])] + CONVERSATION[1:4]
    ids, labels = encode_conversation(tok, ours_turns(turns), template, IMAGE_ID, N_IMAGE)
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels, strict=True))
    assert ids.count(IMAGE_ID) == N_IMAGE and labels[ids.index(IMAGE_ID)] == IGNORE
    answers = [value for role, value in turns if role == "assistant"]
    if template == "plain":  # pretraining: image tags, then every answer and a newline, no end of turn
        assert [label for label in labels if label != IGNORE] == tok.encode("".join(a + "\n" for a in answers))
        return
    supervised = runs(labels)
    assert len(supervised) == len(answers)
    for answer, run in zip(answers, supervised, strict=True):
        assert run[-1] == end_of_turn_id(tok, template)
        text = tok.decode(run[:-1])
        assert text.strip() == answer.strip()
        if template in ("chatml", "mistral"):  # they keep the answer's spaces; a token that straddles the
            assert answer.endswith(text)  # template's "\n" and the answer's first space stays unsupervised


def test_labels_from_offsets_do_not_change_the_ids(dirs):
    """encode_conversation tokenizes the whole prompt once: its ids are the prompt string's ids."""
    for template, backend in (("chatml", "chatml"), ("vicuna_v1", "sentencepiece"), ("mistral", "mistral")):
        tok = load_tokenizer(dirs[backend])
        turns = ours_turns(CONVERSATION[:4])
        ids, _ = encode_conversation(tok, turns, template, IMAGE_ID, N_IMAGE)
        assert ids == encode_prompt(tok, build_prompt(turns, template, tok), template, IMAGE_ID, N_IMAGE)


# ----------------------------------------------------------------------------- files


def test_tokenizer_json_wins_over_tokenizer_model(dirs, tmp_path):
    shutil.copyfile(dirs["chatml"] / "tokenizer.json", tmp_path / "tokenizer.json")
    shutil.copyfile(dirs["sentencepiece"] / "tokenizer.model", tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(tmp_path), BPETokenizer)
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.model"), SentencePieceTokenizer)


def test_save_copies_the_files_and_loads_back_the_same_tokenizer(dirs, tmp_path):
    for name in ("chatml", "llama3", "mistral", "sentencepiece"):
        tok = load_tokenizer(dirs[name])
        out = tmp_path / name
        tok.save(out)
        again = load_tokenizer(out)
        assert type(again) is type(tok) and detect_template(out) == detect_template(dirs[name])
        assert (again.bos_id, again.eos_id, again.pad_id, again.stop_ids, again.default_system) == (
            tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids, tok.default_system)
        assert again.encode(CORPUS[0]) == tok.encode(CORPUS[0])
    shutil.copyfile(dirs["sentencepiece"] / "tokenizer.model", tmp_path / "shapes.model")
    SentencePieceTokenizer(tmp_path / "shapes.model").save(tmp_path / "renamed")
    assert load_tokenizer(tmp_path / "renamed").path.name == "tokenizer.model"  # the name a checkpoint needs


def test_template_is_detected_from_special_tokens_without_a_chat_template(dirs, tmp_path):
    shutil.copyfile(dirs["chatml"] / "tokenizer.json", tmp_path / "tokenizer.json")
    assert detect_template(tmp_path) == "chatml"
    assert detect_template(dirs["sentencepiece"]) == "vicuna_v1"  # a Llama without a template: LLaVA's


# ----------------------------------------------------------------------------- CLI and bad input


def test_cli_prints_one_json_list_per_line_and_pieces(dirs, tmp_path, capsys):
    lines = CORPUS[:5]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    tok_mod.main([str(dirs["chatml"]), "--file", str(tmp_path / "in.txt")])
    tok = load_tokenizer(dirs["chatml"])
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [tok.encode(t) for t in lines]
    tok_mod.main([str(dirs["chatml"] / "tokenizer.json"), "--text", "Hello <|im_end|>", "--pieces"])
    ids, pieces = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert ids == tok.encode("Hello <|im_end|>") and pieces == ["Hello", "\u0120", "<|im_end|>"]


@pytest.mark.parametrize("problem", ["unparsable tokenizer.json", "no tokenizer file", "bad tokenizer_config.json"])
def test_bad_tokenizer_files_are_one_line_naming_the_file(dirs, tmp_path, problem):
    if problem == "unparsable tokenizer.json":
        (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
        culprit = tmp_path / "tokenizer.json"
    elif problem == "bad tokenizer_config.json":
        shutil.copyfile(dirs["chatml"] / "tokenizer.json", tmp_path / "tokenizer.json")
        (tmp_path / "tokenizer_config.json").write_text("{not json")
        culprit = tmp_path / "tokenizer_config.json"
    else:
        culprit = tmp_path
    with pytest.raises(ValueError, match=str(culprit)) as err:
        load_tokenizer(tmp_path)
    if problem == "no tokenizer file":
        assert "tokenizer.json" in str(err.value) and "tokenizer.model" in str(err.value)
    run = subprocess.run([sys.executable, "tokenizer.py", str(tmp_path), "--text", "hi"], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and str(culprit) in run.stderr

"""tokenizer.py: sentencepiece training, LLaVA's `<image>` handling, templates and label masks.

LLaVA's own code is ported below (tokenizer_image_token, Conversation.get_prompt, preprocess_v1/plain) over a
raw sentencepiece processor that behaves like its legacy slow Llama tokenizer; every expectation derives from it.
"""

import random
import warnings

import pytest
import sentencepiece as spm

from tokenizer import (
    IGNORE,
    SYSTEM,
    SentencePieceTokenizer,
    TooLong,
    build_prompt,
    encode_conversation,
    tokenize_prompt,
    train_tokenizer,
)

LLAVA_IMAGE = -200  # LLaVA's IMAGE_TOKEN_INDEX: one id per image, expanded inside the model
WORDS = ("red green blue circle square triangle what color is the where left right top bottom how many "
         "objects there yes no a an image picture describe detail").split()


def corpus(n=400, seed=0):
    rng = random.Random(seed)
    texts = [SYSTEM + " USER: Describe the image. ASSISTANT: A red circle."]
    texts += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".?!") for _ in range(n)]
    return texts


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(corpus(), 400, tmp_path_factory.mktemp("tok") / "tokenizer.model")


# ----------------------------------------------------------------------------- LLaVA, ported


def llama_legacy(tok, text):
    """LLaVA's `tokenizer(text).input_ids` with the slow legacy Llama tokenizer: bos, then each stretch between
    special tokens ("</s>") encoded by sentencepiece on its own (each with its dummy prefix)."""
    ids = [tok.bos_id]
    for i, part in enumerate(text.split("</s>")):
        ids += [tok.eos_id] * (i > 0) + tok.sp.encode(part)
    return ids


def llava_tokenizer_image_token(tok, prompt, image_token_index=LLAVA_IMAGE):
    """llava/mm_utils.py, unchanged but for the tokenizer call."""
    prompt_chunks = [llama_legacy(tok, chunk) for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X), strict=True) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tok.bos_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


def llava_vicuna_v1_prompt(messages):
    """llava/conversation.py: conv_vicuna_v1.get_prompt() (SeparatorStyle.TWO), messages as (role, text|None)."""
    system = ("A chat between a curious human and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the human's questions.")
    seps = [" ", "</s>"]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret


def llava_preprocess_v1(tok, conversation, has_image):
    """llava/train/train.py: preprocess_v1's tokenization and its "-2" label masking, for one conversation."""
    encode = (lambda s: llava_tokenizer_image_token(tok, s)) if has_image else (lambda s: llama_legacy(tok, s))
    input_ids = encode(conversation)
    target = list(input_ids)
    sep = " " + "ASSISTANT" + ": "
    rounds = conversation.split("</s>")
    cur_len = 1
    target[:cur_len] = [IGNORE] * cur_len
    for rou in rounds:
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(encode(rou))
        instruction_len = len(encode(parts[0])) - 2
        target[cur_len : cur_len + instruction_len] = [IGNORE] * instruction_len
        cur_len += round_len
    target[cur_len:] = [IGNORE] * len(target[cur_len:])
    assert cur_len == len(input_ids), "LLaVA's tokenization mismatch: it would mask the whole sample"
    return input_ids, target


def expand(ids, n):
    """LLaVA's one-id-per-image sequence with each image widened to n image tokens, as our model expects."""
    return [t for i in ids for t in ([i] * n if i == LLAVA_IMAGE else [i])]


def turns(*values):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]


# ----------------------------------------------------------------------------- training and loading


def test_train_tokenizer_is_deterministic(tmp_path):
    a = train_tokenizer(corpus(), 350, tmp_path / "a.model")
    b = train_tokenizer(corpus(), 350, tmp_path / "b.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.encode("what color is the circle?") == b.encode("what color is the circle?")
    c = train_tokenizer(corpus(seed=1), 350, tmp_path / "c.model")
    assert (tmp_path / "c.model").read_bytes() != (tmp_path / "a.model").read_bytes()
    assert c.vocab_size == 350


def test_trained_tokenizer_reserves_special_ids_and_round_trips(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert [tok.sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    text = "Größe: 3 × 4 = 12?\n  two  spaces, a tab\t and 😀 emoji"  # unseen characters: byte fallback
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.unk_id not in ids
    assert tok.decode(ids[1:-1]) == text
    assert tok.encode(text) == ids[1:-1]


def test_vocab_size_above_what_the_corpus_supports_is_lowered_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="vocab_size 5000 is more than this corpus supports"):
        tok = train_tokenizer(corpus(50), 5000, tmp_path / "t.model")
    assert 300 < tok.vocab_size < 5000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = train_tokenizer(corpus(50), tok.vocab_size, tmp_path / "u.model")
    assert again.vocab_size == tok.vocab_size


def test_vocab_size_below_the_byte_pieces_names_the_minimum(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size 100 is too small: this corpus needs at least \d+"):
        train_tokenizer(corpus(50), 100, tmp_path / "t.model")


def test_unreadable_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.model: no such tokenizer file"):
        SentencePieceTokenizer(tmp_path / "nothere.model")
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(ValueError, match="junk.model: not a sentencepiece model"):
        SentencePieceTokenizer(tmp_path / "junk.model")


def test_pad_falls_back_to_unk_like_llama(tmp_path):
    # Llama's tokenizer.model has no pad piece (pad_id -1)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus(50)), model_prefix=str(tmp_path / "llama"),
                                   vocab_size=300, byte_fallback=True, pad_id=-1, minloglevel=2)
    tok = SentencePieceTokenizer(tmp_path / "llama.model")
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 0)
    assert tok.path == tmp_path / "llama.model"


def test_decode_names_an_id_outside_the_vocabulary(tok):
    with pytest.raises(ValueError, match=f"token id {tok.vocab_size} is outside the vocabulary"):
        tok.decode([5, tok.vocab_size])


# ----------------------------------------------------------------------------- templates


def test_vicuna_v1_prompt_matches_llava_byte_for_byte():
    q1, a1, q2, a2 = "<image>\nWhat color is the circle?", "Red.", "And the square?", "Blue, I think."
    full = build_prompt(turns(q1, a1, q2, a2))
    assert full == llava_vicuna_v1_prompt([("USER", q1), ("ASSISTANT", a1), ("USER", q2), ("ASSISTANT", a2)])
    assert full == (SYSTEM + " USER: <image>\nWhat color is the circle? ASSISTANT: Red.</s>"
                    "USER: And the square? ASSISTANT: Blue, I think.</s>")
    generation = build_prompt(turns(q1, a1, q2))
    assert generation == llava_vicuna_v1_prompt([("USER", q1), ("ASSISTANT", a1), ("USER", q2), ("ASSISTANT", None)])
    assert generation.endswith("USER: And the square? ASSISTANT:")
    assert SYSTEM == ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                      "helpful, detailed, and polite answers to the human's questions.")


def test_a_model_system_prompt_replaces_the_default_and_an_empty_one_drops_it():
    q = turns("<image>\nWhat color is the circle?")
    assert build_prompt(q, system="") == "USER: <image>\nWhat color is the circle? ASSISTANT:"
    assert build_prompt(q, system="Be brief.") == "Be brief. USER: <image>\nWhat color is the circle? ASSISTANT:"
    assert build_prompt(q, "chatml", system="") == ("<|im_start|>user\n<image>\nWhat color is the circle?<|im_end|>\n"
                                                    "<|im_start|>assistant\n")
    assert build_prompt(q, "chatml", system="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    with pytest.raises(ValueError, match="no system prompt"):
        build_prompt(q, "mistral", system="Be brief.")


def test_plain_prompt_is_image_then_caption_then_newline():
    # preprocess_plain replaces the human turn by "<image>" and appends conv_llava_plain.sep
    assert build_prompt(turns("<image>\nDescribe the image.", "a red circle"), "plain") == "<image>a red circle\n"
    assert build_prompt(turns("Describe <image>"), "plain") == "<image>"


def test_templates_reject_unknown_names_and_roles():
    with pytest.raises(ValueError, match="unknown template 'llama2'"):
        build_prompt(turns("hi"), "llama2")
    with pytest.raises(ValueError, match="unknown role 'narrator'"):
        build_prompt([{"from": "narrator", "value": "hi"}])
    with pytest.raises(ValueError, match="a system turn can only come first"):
        build_prompt(turns("hi") + [{"from": "system", "value": "hi"}])
    with pytest.raises(ValueError, match="must start with a human turn"):
        build_prompt([{"from": "gpt", "value": "hi"}])
    user = [{"from": "user", "value": "hi"}, {"from": "assistant", "value": "yes"}]
    assert build_prompt(user) == build_prompt(turns("hi", "yes"))


# ----------------------------------------------------------------------------- <image> placeholders


@pytest.mark.parametrize("prompt", [
    "<image>\nWhat is this?",
    "USER: <image>\nWhat is this? ASSISTANT:",
    "What is this?\n<image>",
    "Compare <image> and <image>: which is red?",
    "<image><image>two in a row",
    "text only, with an answer</s>USER: and more",
    "",
])
def test_tokenize_prompt_matches_llava_tokenizer_image_token(tok, prompt):
    assert tokenize_prompt(tok, prompt, LLAVA_IMAGE, 1) == llava_tokenizer_image_token(tok, prompt)
    assert tokenize_prompt(tok, prompt, 7, 5) == [7 if i == LLAVA_IMAGE else i
                                                  for i in expand(llava_tokenizer_image_token(tok, prompt), 5)]
    assert tokenize_prompt(tok, prompt, LLAVA_IMAGE, 1, bos=False) == llava_tokenizer_image_token(tok, prompt)[1:]


def test_image_block_sits_between_dummy_prefix_spaces(tok):
    # Llama gives [..., ":", 29871, <image>, 29871, 13, ...]: the lone "▁" on both sides of the image
    ids = tokenize_prompt(tok, "USER: <image>\nWhat", 9999, 3)
    space, newline = tok.sp.piece_to_id("▁"), tok.sp.piece_to_id("<0x0A>")
    start = ids.index(9999)
    assert ids[start - 1] == space and ids[start : start + 3] == [9999] * 3
    assert ids[start + 3 : start + 5] == [space, newline]


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("values", [
    ("<image>\nWhat color is the circle?", "Red."),
    ("<image>\nWhat color is the circle?", "Red.", "Where is it?", "At the top left.", "And the square?", "Blue"),
    ("How many sides has a triangle?", "Three."),  # text only
    ("Hello there", "Hi!", "What is this?", "A question."),  # text only, multi-turn
])
def test_labels_match_llava_preprocess_v1(tok, values):
    conversation = turns(*values)
    has_image = "<image>" in values[0]
    want_ids, want_labels = llava_preprocess_v1(tok, build_prompt(conversation), has_image)
    ids, labels = encode_conversation(tok, conversation, "vicuna_v1", LLAVA_IMAGE, 1)
    assert (ids, labels) == (want_ids, want_labels)
    ids, labels = encode_conversation(tok, conversation, "vicuna_v1", 9999, 4)
    assert ids == [9999 if i == LLAVA_IMAGE else i for i in expand(want_ids, 4)]
    assert labels == [label for i, label in zip(want_ids, want_labels, strict=True)
                      for _ in range(4 if i == LLAVA_IMAGE else 1)]


def test_labels_cover_each_answer_and_its_eos(tok):
    answers = ["Red.", "At the top left.", "Blue"]
    conversation = turns("<image>\nWhat color?", answers[0], "Where?", answers[1], "And the square?", answers[2])
    ids, labels = encode_conversation(tok, conversation, "vicuna_v1", 9999, 4)
    spans, current = [], []  # runs of supervised tokens
    for label in labels + [IGNORE]:
        if label != IGNORE:
            current.append(label)
        elif current:
            spans, current = spans + [current], []
    assert [tok.decode(span[:-1]) for span in spans] == answers
    assert all(span[-1] == tok.eos_id for span in spans)
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels, strict=True))


def test_labels_match_llava_preprocess_plain(tok):
    conversation = turns("Describe the image.\n<image>", "a large red circle at the top left")
    prompt = build_prompt(conversation, "plain")
    want_ids = llava_tokenizer_image_token(tok, prompt)
    masked = len(llava_tokenizer_image_token(tok, "<image>"))
    want_labels = [IGNORE] * masked + want_ids[masked:]
    assert encode_conversation(tok, conversation, "plain", LLAVA_IMAGE, 1) == (want_ids, want_labels)
    ids, labels = encode_conversation(tok, conversation, "plain", 9999, 6)
    assert tok.decode([label for label in labels if label != IGNORE]) == "a large red circle at the top left\n"
    assert ids[1:7] == [9999] * 6


def test_piece_by_piece_ids_equal_the_whole_prompt_for_awkward_answers(tok):
    rng = random.Random(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz  ..,?!:\n\t0123456789éü😀") + ["the", "ASSISTANT", "USER"]
    for _ in range(200):
        values = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))).strip() or "x"
                  for _ in range(2 * rng.randint(1, 3))]
        values[0] = "<image>\n" + values[0]
        conversation = turns(*values)
        ids, _ = encode_conversation(tok, conversation, "vicuna_v1", 9999, 2)
        assert ids == tokenize_prompt(tok, build_prompt(conversation), 9999, 2), values


def test_multi_image_placeholders_expand_in_order(tok):
    conversation = turns("Left: <image> right: <image>. Same colour?", "No.")
    ids, labels = encode_conversation(tok, conversation, "vicuna_v1", 9999, 5)
    blocks = [i for i in range(len(ids)) if ids[i] == 9999 and (i == 0 or ids[i - 1] != 9999)]
    assert len(blocks) == 2 and ids.count(9999) == 10
    assert all(ids[b : b + 5] == [9999] * 5 for b in blocks)
    assert tok.decode(ids[blocks[0] + 5 : blocks[1]]).strip() == "right:"
    assert all(labels[i] == IGNORE for i in range(len(ids)) if ids[i] == 9999)


def test_truncation_never_cuts_an_image_block(tok):
    long_answer = " ".join(["red circle"] * 40)
    conversation = turns("<image>\nDescribe it.", long_answer)
    ids, labels = encode_conversation(tok, conversation, "vicuna_v1", 9999, 16)
    image_end = max(i for i, t in enumerate(ids) if t == 9999) + 1
    first_answer = labels.index(next(label for label in labels if label != IGNORE))
    cut_ids, cut_labels = encode_conversation(tok, conversation, "vicuna_v1", 9999, 16, max_len=first_answer + 3)
    assert cut_ids == ids[: first_answer + 3] and cut_labels == labels[: first_answer + 3]
    with pytest.raises(TooLong, match="image block"):
        encode_conversation(tok, conversation, "vicuna_v1", 9999, 16, max_len=image_end - 1)
    with pytest.raises(TooLong, match="no answer token"):
        encode_conversation(tok, conversation, "vicuna_v1", 9999, 16, max_len=first_answer)
    assert encode_conversation(tok, conversation, "vicuna_v1", 9999, 16, max_len=len(ids)) == (ids, labels)

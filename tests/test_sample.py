"""sample.py, and the generation API it stands on: CLI answers equal VLM.generate, streaming, several images,
chat over a persistent KV cache, attention maps on a briefly trained tiny model, --compile, and the error paths."""

import dataclasses
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from data import ShapesDataset, ShapesWorld, collate, load_image
from llama import LlamaConfig
from model import VLM, VLMConfig
from projector import ProjectorConfig
from tokenizer import build_prompt, encode_prompt, load_tokenizer, tokenize_prompt, train_tokenizer
from vit import ViTConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(vocab_size: int) -> VLMConfig:
    """Smaller than the `tiny` preset, so it trains in seconds: 32 px images, 16 image tokens."""
    vision = ViTConfig(image_size=32, patch_size=8, width=64, depth=2, heads=2, mlp_dim=128,
                       image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    lm = LlamaConfig(vocab_size=vocab_size + 1, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
                     max_seq_len=320, tie_embeddings=True)
    return VLMConfig(vision, lm, ProjectorConfig("mlp2x_gelu"), image_token_id=vocab_size, feature_layer=-1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are far too small to gain from a second thread, and on a busy machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(one_thread, tmp_path_factory):
    """A real, if short, ShapesWorld finetune (~10 s): enough to answer in the task's words and to look."""
    out = tmp_path_factory.mktemp("sample")
    world = ShapesWorld(image_size=32, grid=2, max_objects=2)
    tokenizer = train_tokenizer(world.texts(200), 320, out / "tokenizer.model")
    torch.manual_seed(0)
    model = VLM(tiny_cfg(tokenizer.vocab_size))
    data = ShapesDataset(world, tokenizer, model.cfg, task="qa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(80):
        batch = collate([data[step * 16 + i] for i in range(16)], tokenizer.pad_id)
        _, loss = model(batch["input_ids"], batch["pixel_values"], labels=batch["labels"],
                        attention_mask=batch["attention_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 1.5, "the fixture model did not learn"
    model.eval().save_pretrained(out / "ckpt", tokenizer)
    images = []
    for i in range(2):
        images.append(out / f"scene{i}.png")
        world.record(i, split="test")["image"].save(images[-1])
    wide = Image.new("RGB", (48, 32), (60, 60, 68))  # non-square: pad mode adds bands above and below
    wide.paste(Image.open(images[0]), (16, 0))
    wide.save(out / "wide.png")
    return {"dir": out / "ckpt", "model": VLM.from_pretrained(out / "ckpt").eval(),
            "tokenizer": load_tokenizer(out / "ckpt"), "images": images, "wide": out / "wide.png"}


def run_cli(capsys, *argv) -> str:
    sample.main([str(a) for a in argv])
    return capsys.readouterr().out


def reference_answer(trained, question: str, images: list[Path], **kw) -> str:
    """What VLM.generate answers, built by hand from the library functions."""
    model, tokenizer = trained["model"], trained["tokenizer"]
    text = build_prompt([{"from": "human", "value": question}], model.cfg.template)
    ids = tokenize_prompt(tokenizer, text, model.cfg.image_token_id, model.cfg.num_image_tokens)
    px = sample.pixels(model, [load_image(p) for p in images])
    tokens = model.generate(torch.tensor([ids]), px, eos_id=tokenizer.eos_id, **kw)
    return sample.answer_text(tokenizer, tokens[0].tolist())


# ----------------------------------------------------------------------------- answers


def test_greedy_cli_output_equals_vlm_generate(trained, capsys):
    image = trained["images"][0]
    out = run_cli(capsys, "--checkpoint", trained["dir"], "--image", image, "--prompt", "What color is the circle?")
    want = reference_answer(trained, "<image>\nWhat color is the circle?", [image], max_new_tokens=256)
    assert want.strip(), "the model answers nothing: the test would prove little"
    assert out == want + "\n"


def test_a_text_only_prompt_is_answered_without_an_image(trained, capsys):
    out = run_cli(capsys, "--checkpoint", trained["dir"], "--prompt", "What color is the circle?",
                  "--max-new-tokens", "8")
    assert out == reference_answer(trained, "What color is the circle?", [], max_new_tokens=8) + "\n"


def test_a_text_only_chat_answers_each_turn(trained):
    chat = sample.Chat(trained["model"], trained["tokenizer"], [], max_new_tokens=8)
    first = chat.ask("What color is the circle?")
    assert first == reference_answer(trained, "What color is the circle?", [], max_new_tokens=8)
    assert isinstance(chat.ask("How many objects are there?"), str) and len(chat.messages) == 4


def test_a_chatml_chat_prefills_its_system_prompt_then_only_each_new_turn(smollm2_hf_dir, monkeypatch):
    """SmolLM2's tokenizer and template on a random tiny model: turn one is exactly the model's own prompt (its
    default system prompt included); turn two is the cut answer's end of turn plus the new user piece."""
    tokenizer = load_tokenizer(smollm2_hf_dir)
    cfg = dataclasses.replace(tiny_cfg(tokenizer.vocab_size), template="chatml")
    torch.manual_seed(0)
    model = VLM(cfg).eval()
    prefills, stream = [], model.stream
    monkeypatch.setattr(model, "stream", lambda ids, *rest, **kw: prefills.append(ids[0].tolist())
                        or stream(ids, *rest, **kw))
    chat = sample.Chat(model, tokenizer, [], max_new_tokens=3)
    question = [{"from": "human", "value": "What is the capital of France?"}]
    answer = chat.ask(question[0]["value"])
    assert prefills[0] == encode_prompt(tokenizer, build_prompt(question, "chatml", tokenizer), "chatml", 0, 0)
    last = chat.pending[0]
    chat.ask("And of Spain?")
    end = tokenizer.token_id("<|im_end|>")
    new_turn = tokenizer.encode("\n<|im_start|>user\nAnd of Spain?<|im_end|>\n<|im_start|>assistant\n")
    assert prefills[1] == [last] + [end] * (last != end) + new_turn
    assert isinstance(answer, str)


def test_default_prompt_describes_the_image(trained, capsys):
    image = trained["images"][1]
    out = run_cli(capsys, "--checkpoint", trained["dir"], "--image", image, "--max-new-tokens", "12")
    assert out == reference_answer(trained, "<image>\n" + sample.DEFAULT_PROMPT, [image], max_new_tokens=12) + "\n"


def test_streaming_prints_the_same_text_as_non_streaming(trained):
    model, tokenizer = trained["model"], trained["tokenizer"]
    args = sample.parse_args(["--prompt", "Where is the green triangle?"])
    text = build_prompt([{"from": "human", "value": "<image>\n" + args.prompt}], "vicuna_v1")
    ids = tokenize_prompt(tokenizer, text, model.cfg.image_token_id, model.cfg.num_image_tokens)
    px = sample.pixels(model, [load_image(trained["images"][0])])

    class Chunks(io.StringIO):
        writes = 0

        def write(self, s):
            self.writes += bool(s)
            return super().write(s)

    out = Chunks()
    tokens = sample.generate(model, tokenizer, ids, px, args, out=out)
    assert out.writes > 2, "nothing was streamed token by token"
    batch = model.generate(torch.tensor([ids]), px, max_new_tokens=args.max_new_tokens, eos_id=tokenizer.eos_id)
    assert torch.equal(tokens, batch)
    assert out.getvalue() == sample.answer_text(tokenizer, batch[0].tolist()) + "\n"


def test_text_stream_never_prints_half_a_character(trained):
    tokenizer = trained["tokenizer"]
    text = "a red circle: é, ü and 🟥 at the top left"  # byte-fallback pieces: several tokens per character
    stream = sample.TextStream(tokenizer)
    pieces = [stream.push(t) for t in tokenizer.encode(text)] + [stream.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == text


def test_several_images_in_one_prompt(trained, capsys):
    first, second = trained["images"]
    prompt = "<image> and <image>: what color is the triangle?"
    out = run_cli(capsys, "--checkpoint", trained["dir"], "--image", first, "--image", second, "--prompt", prompt,
                  "--max-new-tokens", "8")
    assert out == reference_answer(trained, prompt, [first, second], max_new_tokens=8) + "\n"
    untagged = run_cli(capsys, "--checkpoint", trained["dir"], "--image", second, "--image", first,
                       "--prompt", "what color is the triangle?", "--max-new-tokens", "8")
    assert untagged == reference_answer(trained, "<image><image>\nwhat color is the triangle?", [second, first],
                                        max_new_tokens=8) + "\n"
    with pytest.raises(SystemExit, match="2 <image> tags but 1 images"):
        sample.main(["--checkpoint", str(trained["dir"]), "--image", str(first), "--prompt", prompt])


def test_num_samples_are_one_reproducible_batch(trained, capsys):
    argv = ["--checkpoint", trained["dir"], "--image", trained["images"][0], "--num-samples", "3",
            "--temperature", "1.0", "--top-k", "20", "--max-new-tokens", "6", "--seed", "7"]
    out = run_cli(capsys, *argv)
    assert [line[:4] for line in out.splitlines()] == ["[1] ", "[2] ", "[3] "]
    assert run_cli(capsys, *argv) == out


# ----------------------------------------------------------------------------- continuing a cache


@torch.no_grad()
def test_continuing_a_decode_state_equals_one_shot_generation():
    """Two chunks through one DecodeState = the concatenation in one go, padding in the first chunk included."""
    torch.manual_seed(0)
    model = VLM(tiny_cfg(300)).eval()
    n, img = model.cfg.num_image_tokens, model.cfg.image_token_id
    px = torch.randn(2, 3, 32, 32)
    first = torch.randint(4, 300, (2, 24))
    first[:, 1 : 1 + n] = img
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, :3] = False  # row 1 is left-padded
    state = model.new_state(2, 100)
    answer = model.generate(first, px, max_new_tokens=5, attention_mask=mask, state=state)
    assert state.length == 24 + 4  # everything but the last token
    second = torch.cat([answer[:, -1:], torch.randint(4, 300, (2, 6))], dim=1)
    continued = model.generate(second, max_new_tokens=7, state=state)
    whole = torch.cat([first, answer[:, :-1], second], dim=1)
    whole_mask = torch.cat([mask, torch.ones(2, whole.size(1) - 24, dtype=torch.bool)], dim=1)
    assert torch.equal(continued, model.generate(whole, px, max_new_tokens=7, attention_mask=whole_mask))
    with pytest.raises(ValueError, match="do not fit the KV cache of 100"):
        model.generate(second, max_new_tokens=90, state=state)


def test_chat_second_turn_equals_one_shot_and_prefills_only_new_tokens(trained, monkeypatch):
    model, tokenizer = trained["model"], trained["tokenizer"]
    chat = sample.Chat(model, tokenizer, [load_image(trained["images"][0])], max_new_tokens=20)
    q1, q2 = "What color is the triangle?", "How many objects are there?"
    a1 = chat.ask(q1)
    prefilled = []
    embed = model.embed
    monkeypatch.setattr(model, "embed", lambda ids, *rest: prefilled.append(ids.size(1)) or embed(ids, *rest))
    a2 = chat.ask(q2)
    messages = [{"from": "human", "value": "<image>\n" + q1}, {"from": "gpt", "value": a1},
                {"from": "human", "value": q2}]
    full = tokenize_prompt(tokenizer, build_prompt(messages), model.cfg.image_token_id, model.cfg.num_image_tokens)
    assert prefilled and prefilled[0] < len(full) // 3, "the second turn re-read the conversation"
    monkeypatch.undo()
    one_shot = model.generate(torch.tensor([full]), sample.pixels(model, chat.images), max_new_tokens=20,
                              eos_id=tokenizer.eos_id)
    assert a2 == sample.answer_text(tokenizer, one_shot[0].tolist())
    chat.reset()
    assert chat.ask(q2) == reference_answer(trained, "<image>\n" + q2, trained["images"][:1], max_new_tokens=20)


def test_a_full_chat_context_is_an_error_that_reset_clears(trained):
    chat = sample.Chat(trained["model"], trained["tokenizer"], [load_image(trained["images"][0])], max_new_tokens=8)
    with pytest.raises(ValueError, match="no longer fits the context of 320 tokens: /reset"):
        for _ in range(10):
            chat.ask("How many objects are there in this picture, counting all of them?")
    kept = len(chat.messages)
    assert kept % 2 == 0 and chat.state.length <= 320  # the refused question left no trace
    chat.reset()
    assert chat.ask("How many objects are there?") == reference_answer(
        trained, "<image>\nHow many objects are there?", trained["images"][:1], max_new_tokens=8)


def test_chat_cli_reads_turns_and_commands(trained, capsys, monkeypatch):
    lines = ["What color is the triangle?", "/reset", "Is there a red circle?", f"/image {trained['images'][1]}",
             "How many objects are there?", "/image no/such.png", ""]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    out = run_cli(capsys, "--checkpoint", trained["dir"], "--image", trained["images"][0], "--chat",
                  "--max-new-tokens", "10")
    assert out.count("ASSISTANT: ") == 3
    assert "(conversation reset)" in out and "(new image; conversation reset)" in out
    assert "no/such.png: no such image" in out
    monkeypatch.setattr(sys, "stdin", io.StringIO("<image> <image> Which is bigger?\nHow many objects are there?\n"))
    out = run_cli(capsys, "--checkpoint", trained["dir"], "--image", trained["images"][0], "--chat")
    assert "2 <image> tags but 1 images" in out and out.count("ASSISTANT: ") == 1  # the chat goes on
    last = out.split("ASSISTANT: ")[-1].splitlines()[0]
    assert last == reference_answer(trained, "<image>\nHow many objects are there?", trained["images"][1:],
                                    max_new_tokens=10)


# ----------------------------------------------------------------------------- attention maps


def test_attention_map_keeps_the_aspect_ratio_and_is_not_uniform(trained, tmp_path, capsys):
    out = tmp_path / "attn.png"
    run_cli(capsys, "--checkpoint", trained["dir"], "--image", trained["wide"], "--prompt",
            "What shape is the blue object?", "--attention-map", out, "--attention-layers", "-1")
    picture = Image.open(out)
    assert abs(picture.width / picture.height - 48 / 32) < 0.01
    assert (tmp_path / "attn_tokens.png").is_file()
    model, tokenizer = trained["model"], trained["tokenizer"]
    text = build_prompt([{"from": "human", "value": "<image>\nWhat shape is the blue object?"}])
    ids = tokenize_prompt(tokenizer, text, model.cfg.image_token_id, model.cfg.num_image_tokens)
    px = sample.pixels(model, [load_image(trained["wide"])])
    answer = model.generate(torch.tensor([ids]), px, max_new_tokens=8)[0].tolist()
    heat = sample.attention_to_images(model, ids, px, answer, [0, 1])  # (n, 1, 4, 4)
    assert heat.shape == (len(answer), 1, 4, 4)
    mean = heat.mean(0)[0]
    assert mean.max() > 1.5 * mean.min(), "the trained model looks at every patch alike"
    pixels = np.asarray(picture, dtype=np.float32)
    assert pixels.std(axis=(0, 1)).max() > 10  # an actual picture, not one flat colour


def test_heat_map_lands_where_the_patch_was_after_padding():
    """A 200 x 100 image padded to 200 x 200: the grid's second row of four is the image's top half."""
    heat = np.zeros((4, 4), dtype=np.float32)
    heat[1, 3] = 1.0
    full = sample.heat_on_image(heat, Image.new("RGB", (200, 100)), "pad")
    assert full.shape == (100, 200)
    ys, xs = np.nonzero(full)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (0, 49, 150, 199)
    cropped = sample.heat_on_image(heat, Image.new("RGB", (200, 100)), "crop")  # only the middle 100 x 100
    ys, xs = np.nonzero(cropped)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (25, 49, 125, 149)


# ----------------------------------------------------------------------------- speed flags


@pytest.mark.slow
def test_compile_flag_gives_the_eager_answer(trained, capsys):
    argv = ["--checkpoint", trained["dir"], "--image", trained["images"][0], "--prompt", "Where is the triangle?",
            "--max-new-tokens", "12"]
    eager = run_cli(capsys, *argv)
    assert run_cli(capsys, *argv, "--compile") == eager
    long = ["--checkpoint", trained["dir"], "--image", trained["images"][0], "--max-new-tokens", "1000"]
    assert run_cli(capsys, *long, "--compile") == run_cli(capsys, *long)  # both stop at the model's context


# ----------------------------------------------------------------------------- errors


def test_a_non_image_file_is_one_line_naming_it(trained, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--checkpoint", str(trained["dir"]),
                             "--image", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and str(bad) in result.stderr


def test_a_missing_checkpoint_is_one_line_naming_it(trained, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--checkpoint", str(tmp_path / "nowhere"), "--image", str(trained["images"][0])])
    message = str(exit_info.value.code)
    assert "\n" not in message and str(tmp_path / "nowhere") in message
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--checkpoint", str(tmp_path / "empty"), "--image", str(trained["images"][0])])
    assert str(tmp_path / "empty" / "config.json") in str(exit_info.value.code)


def test_an_unreadable_tokenizer_is_one_line_naming_it(trained, tmp_path):
    broken = tmp_path / "ckpt"
    broken.mkdir()
    for name in ("config.json", "model.safetensors"):
        (broken / name).write_bytes((trained["dir"] / name).read_bytes())
    (broken / "tokenizer.model").write_text("garbage")
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--checkpoint", str(broken), "--image", str(trained["images"][0])])
    message = str(exit_info.value.code)
    assert "\n" not in message and str(broken / "tokenizer.model") in message


def test_a_checkpoint_without_a_tokenizer_file_is_one_line_naming_both(trained, tmp_path):
    bare = tmp_path / "ckpt"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((trained["dir"] / name).read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--checkpoint", str(bare), "--prompt", "hi"])
    message = str(exit_info.value.code)
    assert "\n" not in message and str(bare) in message and "tokenizer.json" in message and "tokenizer.model" in message


def test_a_tokenizer_larger_than_the_embedding_table_is_one_line_naming_it(trained, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in ("config.json", "model.safetensors"):
        (ckpt / name).write_bytes((trained["dir"] / name).read_bytes())
    rows = trained["model"].cfg.lm.vocab_size
    big = train_tokenizer(ShapesWorld().texts(400), rows + 40, ckpt / "tokenizer.model")
    assert big.vocab_size > rows
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--checkpoint", str(ckpt), "--prompt", "hi"])
    message = str(exit_info.value.code)
    assert "\n" not in message and str(ckpt / "tokenizer.model") in message and "embedding table" in message


def test_a_template_the_tokenizer_cannot_end_turns_with_is_one_line(trained):
    with pytest.raises(SystemExit) as exit_info:
        sample.main(["--checkpoint", str(trained["dir"]), "--template", "llama3", "--prompt", "hi"])
    message = str(exit_info.value.code)
    assert "\n" not in message and str(trained["dir"] / "tokenizer.model") in message and "<|eot_id|>" in message

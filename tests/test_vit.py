"""vit.py against transformers' CLIPVisionModel and SiglipVisionModel, through our converter."""

import pytest
import torch
from conftest import IMAGE_SIZE, convert, load_hf, rel_err, transformers

from model import VLM, preset
from vit import VisionTransformer, ViTConfig


@pytest.fixture(scope="module")
def clip_vlm(clip_dir, llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ours") / "clip"
    convert("--vision", clip_dir, "--lm", llama_dir, "--out", out)
    return VLM.from_pretrained(out).eval()


@pytest.fixture(scope="module")
def siglip_vlm(siglip_dir, llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ours") / "siglip"
    convert("--vision", siglip_dir, "--lm", llama_dir, "--out", out)
    return VLM.from_pretrained(out).eval()


def pixels(size=IMAGE_SIZE, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_clip_penultimate_layer_without_cls_matches_transformers(clip_vlm, clip_dir):
    ref = load_hf(transformers.CLIPVisionModel, clip_dir)
    x = pixels()
    want = ref(x, output_hidden_states=True).hidden_states[-2][:, 1:]
    got = clip_vlm.vision(x, feature_layer=-2)[:, 1:]
    assert got.shape == want.shape == (2, 16, 32)
    assert rel_err(got, want) < 1e-4


@torch.no_grad()
def test_clip_every_hidden_state_matches_transformers(clip_vlm, clip_dir):
    ref = load_hf(transformers.CLIPVisionModel, clip_dir)
    x = pixels()
    hidden = ref(x, output_hidden_states=True).hidden_states
    for layer in range(-len(hidden), 0):
        assert rel_err(clip_vlm.vision(x, feature_layer=layer), hidden[layer]) < 1e-4, layer


@torch.no_grad()
def test_siglip_output_and_hidden_states_match_transformers(siglip_vlm, siglip_dir):
    ref = load_hf(transformers.SiglipVisionModel, siglip_dir)
    x = pixels()
    out = ref(x, output_hidden_states=True)
    assert rel_err(siglip_vlm.vision(x), out.last_hidden_state) < 1e-4  # post-norm included
    assert rel_err(siglip_vlm.vision(x, feature_layer=-1), out.hidden_states[-1]) < 1e-4
    assert rel_err(siglip_vlm.vision(x, feature_layer=-2), out.hidden_states[-2]) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_position_embeddings_interpolate_like_transformers(tower, clip_vlm, siglip_vlm, clip_dir, siglip_dir):
    ours = clip_vlm if tower == "clip" else siglip_vlm
    cls = transformers.CLIPVisionModel if tower == "clip" else transformers.SiglipVisionModel
    ref = load_hf(cls, clip_dir if tower == "clip" else siglip_dir)
    x = pixels(size=48)  # a 6 x 6 grid from a model trained on 4 x 4
    want = ref(x, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-1]
    got = ours.vision(x, feature_layer=-1)
    assert got.shape == want.shape
    assert rel_err(got, want) < 1e-4


def test_conv_stem_is_off_by_default_and_adds_no_weights():
    """Every converted CLIP/SigLIP tower keeps its single linear patch projection, so parity stays bit-exact."""
    assert ViTConfig().conv_stem == () and preset("tiny").vision.conv_stem == ()
    assert not [k for k in VLM(preset("tiny")).state_dict() if "stem" in k]
    with pytest.raises(ValueError, match="patch_size 8 is not a multiple of the conv stem's stride 16"):
        ViTConfig(image_size=48, patch_size=8, conv_stem=(8, 8, 8, 8))


@torch.no_grad()
def test_conv_stem_gives_one_token_per_patch_that_sees_only_its_image():
    """16 px patches of a 48 px image after a 4-layer stem: 9 tokens; an image's tokens do not depend on the rest
    of its batch (no BatchNorm), and the first token's receptive field (31 px, padded) stays inside its patch."""
    torch.manual_seed(0)
    cfg = ViTConfig(image_size=48, patch_size=16, width=32, depth=1, heads=2, mlp_dim=64, class_token=False,
                    conv_stem=(8, 8, 16, 16))
    tower = VisionTransformer(cfg).eval()
    x = pixels(size=48, n=3)
    out = tower(x)
    assert out.shape == (3, 9, 32)
    assert torch.allclose(tower(x[1:2]), out[1:2], atol=1e-6)
    y = x.clone()
    y[:, :, 16:, :] = torch.randn(3, 3, 32, 48)  # every pixel outside the top-left 16 px block
    tokens_x, tokens_y = tower.embed(x), tower.embed(y)  # (B, 9, C) before any attention
    assert torch.equal(tokens_x[:, 0], tokens_y[:, 0]) and not torch.equal(tokens_x[:, 1:], tokens_y[:, 1:])


@torch.no_grad()
def test_conv_stem_keeps_its_signal_through_every_layer_at_init():
    """He init preserves the second moment through conv + GELU, so the patch embedding sees image content; with
    PyTorch's default conv init each layer shrank it ~3x, and after four layers mostly biases were left."""
    torch.manual_seed(0)
    stem = VisionTransformer(ViTConfig(image_size=48, patch_size=16, width=32, depth=0, heads=2, mlp_dim=64,
                                       class_token=False, conv_stem=(24, 48, 96, 192))).stem
    x = pixels(size=48, n=8)
    stds = []
    for conv in stem.convs:
        x = torch.nn.functional.gelu(conv(x))
        stds.append(x.std().item())
    assert min(stds) > 0.5 * max(stds), stds

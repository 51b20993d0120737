"""Sequence packing and gradient checkpointing change speed and memory, never the maths."""

import torch
from conftest import rel_err

from model import VLM, preset


def tiny():
    torch.manual_seed(0)
    return VLM(preset("tiny"))


def sample(model, n_text, seed):
    """One training sample: BOS, image block, text; the last half of the text is supervised."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.tensor([1]), torch.full((cfg.num_image_tokens,), cfg.image_token_id),
                     torch.randint(3, cfg.image_token_id, (n_text,), generator=g)])
    labels = ids.clone()
    labels[: len(ids) - n_text // 2] = -100
    return ids, labels, torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_batch_has_the_loss_and_gradients_of_the_unpacked_batch():
    model = tiny()
    samples = [sample(model, n, seed) for seed, n in enumerate((5, 12, 8))]
    # unpacked: three right-padded rows
    T = max(len(s[0]) for s in samples)
    ids = torch.zeros(3, T, dtype=torch.long)
    labels = torch.full((3, T), -100)
    for i, (x, y, _) in enumerate(samples):
        ids[i, : len(x)], labels[i, : len(y)] = x, y
    pixels = torch.cat([s[2] for s in samples])
    _, loss = model(ids, pixels, labels=labels)
    loss.backward()
    want = grads(model)
    model.zero_grad()
    # packed: samples 0 and 1 share a row, sample 2 has its own, padding gets a segment of its own
    row0 = torch.cat([samples[0][0], samples[1][0]])
    L = max(len(row0), len(samples[2][0])) + 3
    packed_ids = torch.zeros(2, L, dtype=torch.long)
    packed_labels = torch.full((2, L), -100)
    segments = torch.full((2, L), -1)
    packed_ids[0, : len(row0)] = row0
    packed_labels[0, : len(row0)] = torch.cat([samples[0][1], samples[1][1]])
    segments[0, : len(samples[0][0])], segments[0, len(samples[0][0]) : len(row0)] = 0, 1
    packed_ids[1, : len(samples[2][0])], packed_labels[1, : len(samples[2][1])] = samples[2][0], samples[2][1]
    segments[1, : len(samples[2][0])] = 2
    _, packed_loss = model(packed_ids, pixels, labels=packed_labels, segment_ids=segments)
    packed_loss.backward()
    assert rel_err(packed_loss, loss) < 1e-5
    got = grads(model)
    assert got.keys() == want.keys()
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-4, name


def test_packing_without_segments_would_leak_attention():
    """The same packed row without segment ids is a different computation: the mask is what isolates."""
    model = tiny().eval()
    a, b = sample(model, 6, 0), sample(model, 6, 1)
    row = torch.cat([a[0], b[0]])[None]
    pixels = torch.cat([a[2], b[2]])
    segments = torch.cat([torch.zeros(len(a[0])), torch.ones(len(b[0]))]).long()[None]
    with torch.no_grad():
        isolated = model(row, pixels, segment_ids=segments)[0][0, len(a[0]) :]
        alone = model(b[0][None], b[2])[0][0]
        leaky = model(row, pixels)[0][0, len(a[0]) :]
    assert rel_err(isolated, alone) < 1e-5
    assert rel_err(leaky, alone) > 1e-2


def test_gradient_checkpointing_leaves_gradients_unchanged():
    model = tiny()
    ids, labels, pixels = sample(model, 10, 0)
    model(ids[None], pixels, labels=labels[None])[1].backward()
    want = grads(model)
    model.zero_grad()
    model.lm.grad_checkpointing = True
    model(ids[None], pixels, labels=labels[None])[1].backward()
    got = grads(model)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-6, name

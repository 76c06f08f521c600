"""The DiT against docs/design.md section 3."""

import pytest
import torch
from helpers import trained_jat

from jat.model.dit import JaT, RotaryEmbedding, model_config, parameter_breakdown

torch.manual_seed(0)


def test_v2_parameter_count_matches_spec():
    with torch.device("meta"):
        model = JaT(model_config("v2"))
    counts = parameter_breakdown(model)
    assert counts["total"] == pytest.approx(289.6e6, rel=0.01)
    # token dim 2C*p = 8192 into a 512 bottleneck, then 1024
    assert counts["patch_embed"] == 8192 * 512 + 512 + 512 * 1024 + 1024
    assert counts["pos_table"] == 0
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]


def test_v2_attention_shapes_are_grouped_query():
    with torch.device("meta"):
        model = JaT(model_config("v2"))
    attn = model.blocks[0].attn
    assert (attn.q.in_features, attn.q.out_features) == (1024, 1024)
    assert (attn.k.out_features, attn.v.out_features) == (256, 256)
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (16, 4, 64)
    assert model.final_layer.linear.out_features == 4096


def test_v1_builds_with_learned_positions():
    with torch.device("meta"):
        model = JaT(model_config("v1"))
    assert model.pos_table is not None and model.rope is None
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_kv_heads == 12


@pytest.mark.parametrize("preset", ["tiny", "small", "v1", "v2"])
def test_forward_returns_input_length(preset):
    # small channel count keeps the big presets cheap; the code path is the same
    model = JaT(model_config(preset, in_channels=8)).eval()
    for T in (1, 3, 517, 1000):
        x = torch.randn(1, 8, T)
        with torch.no_grad():
            out = model(x, torch.rand(1), torch.randn(1, 8, T))
        assert out.shape == (1, 8, T)


def test_output_independent_of_xt_at_init_and_dependent_after_one_step():
    model = JaT(model_config("tiny", in_channels=8))
    c, t = torch.randn(2, 8, 16), torch.rand(2)
    x1, x2 = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    with torch.no_grad():
        assert torch.equal(model(x1, t, c), model(x2, t, c))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = (model(x1, t, c) - torch.randn(2, 8, 16)).pow(2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        diff = (model(x1, t, c) - model(x2, t, c)).abs().max()
    assert diff > 1e-6


def test_blocks_are_identity_at_init():
    model = JaT(model_config("tiny", in_channels=8))
    x = torch.randn(2, 5, 64)
    cond = torch.randn(2, 64)
    for block in model.blocks:
        assert torch.equal(block(x, cond), x)


def test_rope_scores_depend_only_on_position_difference():
    rope = RotaryEmbedding(64)
    q, k = torch.randn(1, 2, 10, 64), torch.randn(1, 2, 10, 64)
    pos = torch.arange(10)

    def scores(offset):
        cos, sin = rope(pos + offset)
        return RotaryEmbedding.apply(q, cos, sin) @ RotaryEmbedding.apply(k, cos, sin).transpose(-1, -2)

    base = scores(0)
    assert torch.allclose(base, scores(37), atol=1e-4)
    assert torch.allclose(base, scores(1000), atol=1e-3)
    # and positions matter: without rotation the scores differ
    assert not torch.allclose(base, q @ k.transpose(-1, -2), atol=1e-2)


def test_rope_rotates_adjacent_pairs():
    rope = RotaryEmbedding(4, theta=10000.0)
    cos, sin = rope(torch.tensor([1]))
    x = torch.tensor([[[[1.0, 0.0, 1.0, 0.0]]]])
    y = RotaryEmbedding.apply(x, cos, sin)[0, 0, 0]
    # pair (x0, x1) rotated by angle 1 rad, pair (x2, x3) by 1/100 rad
    assert torch.allclose(y, torch.tensor([torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0)),
                                           torch.cos(torch.tensor(0.01)), torch.sin(torch.tensor(0.01))]))


def test_padding_mask_hides_padded_tokens():
    model = trained_jat(model_config("tiny", in_channels=8), seed=0, std=0.1)
    x, c, t = torch.randn(1, 8, 12), torch.randn(1, 8, 12), torch.rand(1)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[:, :8] = True
    with torch.no_grad():
        short = model(x[..., :8], t, c[..., :8])
        garbage = torch.cat([x[..., :8], 100 * torch.randn(1, 8, 4)], -1)
        padded = model(garbage, t, torch.cat([c[..., :8], 100 * torch.randn(1, 8, 4)], -1), mask)
    assert torch.allclose(short, padded[..., :8], atol=1e-5)


def test_grad_checkpointing_gives_same_gradients():
    cfg = model_config("tiny", in_channels=8)
    a = trained_jat(cfg, seed=1)
    b = JaT(model_config("tiny", in_channels=8, grad_checkpointing=True))
    b.load_state_dict(a.state_dict())
    x, c, t = torch.randn(2, 8, 16), torch.randn(2, 8, 16), torch.rand(2)
    for m in (a, b):
        m(x, t, c).pow(2).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_rope_apply_equals_pairwise_rotation_in_bf16_too():
    rope = RotaryEmbedding(64)
    cos, sin = rope(torch.arange(130))
    x = torch.randn(2, 4, 130, 64)
    angles = torch.arange(130).float()[:, None] * rope.inv_freq[None]  # [N, 32]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    expect = torch.stack([x0 * angles.cos() - x1 * angles.sin(), x0 * angles.sin() + x1 * angles.cos()], -1)
    assert torch.allclose(RotaryEmbedding.apply(x, cos, sin), expect.flatten(-2), atol=1e-5)
    yb = RotaryEmbedding.apply(x.bfloat16(), cos, sin)
    assert yb.dtype == torch.bfloat16
    assert (yb.float() - expect.flatten(-2)).abs().max() < 0.05



def test_aligned_envelope_view_is_the_same_at_every_cutoff():
    """model.envelope_aligned: the K bands at and below the condition's band edge, whatever the edge is.
    Two conditions whose top K carried bands hold the same frames but whose edges differ (bands 19 and 37)
    give the same output once the head's weights on the absolute bands and on the edge's place are
    zeroed; with those weights the place still tells them apart. Padding does not move the edge, and a
    silent condition reads edge 0."""
    from jat.model.dit import EnvelopeHead

    K, T, per = 6, 40, 512 // EnvelopeHead.IN_BANDS  # 8 channels per input band
    torch.manual_seed(0)
    head = EnvelopeHead(512, 16, hidden=32, aligned=K)
    torch.nn.init.normal_(head.net[-1].weight)
    top = torch.randn(K * per, T)  # the K bands below the edge, lowest first
    top[-per:] *= 0.25  # the edge band just carried: power 0.0625 against CARRIED_RMS² = 0.04
    low, high = torch.zeros(1, 512, T), torch.zeros(1, 512, T)
    low[0, (20 - K) * per : 20 * per] = top  # edge: band 19
    high[0, (38 - K) * per : 38 * per] = top  # edge: band 37
    high[0, :per] = 0.05  # an uncarried band (RMS below CARRIED_RMS) does not count as carried
    assert not torch.allclose(head(low), head(high))  # the absolute bands and the place differ
    first = head.net[0]
    with torch.no_grad():
        first.weight[:, : 2 * EnvelopeHead.IN_BANDS] = 0  # absolute bands and their means
        first.weight[:, -1] = 0  # the edge's place
    torch.testing.assert_close(head(low), head(high), rtol=0, atol=1e-6)
    assert first.in_channels == 2 * EnvelopeHead.IN_BANDS + 2 * K + 1
    padded = torch.cat([low, torch.zeros(1, 512, 60)], -1)  # unmasked, the edge band's power would be 0.025
    mask = torch.arange(T + 60)[None] < T
    edge_frames = T - 4  # the last 4 frames' convolutions reach into the padding (9-frame field)
    torch.testing.assert_close(head(padded, mask)[..., :edge_frames], head(low)[..., :edge_frames], rtol=0,
                               atol=1e-6)
    assert torch.isfinite(head(torch.zeros(1, 512, T))).all()

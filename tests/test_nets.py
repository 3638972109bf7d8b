"""Backbones and discriminator heads: shapes, conditioning, features, config round-trip, a short training run."""

from __future__ import annotations

import pytest
import torch

from dmdx.denoiser import FeatureTap
from dmdx.nets import (
    BACKBONES,
    ConvHead,
    DiffusersUNet2D,
    MLPDenoiser,
    MultiHead,
    UNet,
    VectorHead,
    build_backbone,
    feature_shapes,
)

# Loading diffusers' models takes a few seconds; pay it at collection rather than inside a test.
pytest.importorskip("diffusers").UNet2DModel

B = 3


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets run faster on one thread, and far faster when other processes compete for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_unet(size: int = 8, **kw) -> UNet:
    torch.manual_seed(0)
    return UNet(in_channels=2, image_size=size, base_channels=8, channel_mult=(1, 2, 2), num_classes=4, **kw)


def labels(b: int = B) -> dict:
    return {"labels": torch.arange(b) % 4}


def features(net, x, t, cond=None):
    with FeatureTap(net, net.feature_layers) as tap:
        net(x, t, cond)
    return tap.features


@pytest.mark.parametrize("time", [torch.rand(B), torch.rand(B) * 1000, 0.25 * torch.randn(B)])
def test_mlp_shape_and_time_ranges(time):
    torch.manual_seed(0)
    net = MLPDenoiser(dim=5, hidden=32, depth=2, num_classes=3)
    out = net(torch.randn(B, 5), time, {"labels": torch.tensor([0, 1, 2])})
    assert out.shape == (B, 5) and torch.isfinite(out).all()
    assert net(torch.randn(B, 5), time, None).shape == (B, 5)


def test_mlp_unconditional_ignores_labels():
    torch.manual_seed(0)
    net = MLPDenoiser(dim=2, hidden=16, depth=1)
    x, t = torch.randn(B, 2), torch.rand(B)
    assert torch.equal(net(x, t, labels()), net(x, t, None))
    assert net.null_cond(None) is None


@pytest.mark.parametrize("size", [8, 16, 28])
@pytest.mark.parametrize("attention", [False, True])
def test_unet_shapes(size, attention):
    net = tiny_unet(size, attention=attention)
    x = torch.randn(B, 2, size, size)
    assert net(x, torch.rand(B), labels()).shape == x.shape
    assert net(x, torch.rand(()), None).shape == x.shape  # scalar time broadcasts


@pytest.mark.parametrize("make", [lambda: MLPDenoiser(dim=4, hidden=16, depth=1, num_classes=4), tiny_unet])
def test_labels_change_output_and_null_cond(make):
    net = make()
    # The zero-mean default init can make label effects tiny; perturb the embedding to make the test robust.
    torch.nn.init.normal_(net.label_embed.embed.weight)
    x = torch.randn((B, 4) if isinstance(net, MLPDenoiser) else (B, 2, 8, 8))
    t = torch.rand(B)
    cond = labels()
    null = net.null_cond(cond)
    assert torch.equal(null["labels"], torch.full((B,), 4))
    out_c, out_u = net(x, t, cond), net(x, t, null)
    assert not torch.allclose(out_c, out_u)
    assert torch.equal(out_u, net(x, t, None))  # None means the null class


def test_unet_features_shallow_to_deep_last_is_mid():
    net = tiny_unet(28)
    assert net.feature_layers == ("down.0", "down.1", "down.2", "mid")
    x, t = torch.randn(B, 2, 28, 28), torch.rand(B)
    shapes = feature_shapes(net, x, t, labels())
    assert shapes == [(8, 28, 28), (16, 14, 14), (16, 7, 7), (16, 7, 7)]
    assert [s[0] for s in shapes] == net.feature_channels()
    feats = features(net, x, t)
    mid_out = []
    handle = net.mid.register_forward_hook(lambda m, i, o: mid_out.append(o))
    net(x, t)
    handle.remove()
    assert torch.equal(feats[-1], mid_out[0])


def test_mlp_features():
    net = MLPDenoiser(dim=3, hidden=16, depth=2)
    assert feature_shapes(net, torch.randn(B, 3), torch.rand(B)) == [(16,)]


def test_conv_head_sizes():
    for c, hw in [(16, (7, 7)), (8, (1, 1)), (8, (16, 16)), (6, (3, 5))]:
        torch.manual_seed(0)
        head = ConvHead(c, hw)
        assert head(torch.randn(B, c, *hw)).shape == (B,)


@pytest.mark.parametrize("c,shape,dims", [(32, (8, 8), 2), (64, (4, 4), 2), (8, (1, 1), 2), (256, (4, 4), 2),
                                          (8, (2, 8, 8), 3)])
def test_conv_head_output_depends_on_its_input(c, shape, dims):
    """Regression: GroupNorm with one or two channels per group on the final 1x1 map made the logit a constant,
    so the discriminator could not see its input (std across inputs was 4e-7)."""
    torch.manual_seed(0)
    head = ConvHead(c, shape, dims=dims)
    x = torch.randn(16, c, *shape, requires_grad=True)
    y = head(x)
    assert y.std() > 1e-2
    (g,) = torch.autograd.grad(y.sum(), x)
    assert (g.flatten(1).norm(dim=1) > 1e-3).all()


# Every feature map a conv head meets in dmdx: the built-in UNets' levels (digits 8x8, MNIST 16x16), the pixel
# backbone's encoder (24/48/96 channels at 1, 1/2, 1/4 resolution), a 1x1 map, and video latents (T = 2, 3).
HEAD_INPUTS = [(32, (8, 8)), (64, (4, 4)), (32, (16, 16)), (64, (8, 8)), (24, (8, 8)), (48, (4, 4)), (96, (2, 2)),
               (96, (4, 4)), (8, (1, 1)), (8, (2, 8, 8)), (16, (3, 4, 4))]


@pytest.mark.parametrize("arch", ["paper", "dmd2"])
@pytest.mark.parametrize("c,shape", HEAD_INPUTS)
def test_heads_see_their_input_at_every_width_and_depth_used(arch, c, shape):
    torch.manual_seed(0)
    head = ConvHead(c, shape, dims=len(shape), arch=arch)
    x = torch.randn(16, c, *shape, requires_grad=True)
    y = head(x)
    assert y.shape == (16,) and y.std() > 1e-2
    (g,) = torch.autograd.grad(y.sum(), x)
    assert (g.flatten(1).norm(dim=1) > 1e-3).all()


def test_paper_head_follows_appendix_b1():
    """256 wide; 3 x [conv 4x4 s2, GroupNorm(32), SiLU]; conv 3x3 + GN + SiLU; global average pool; linear."""
    head = ConvHead(32, (8, 8), arch="paper")
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.kernel_size, m.stride) for m in convs] == [((4, 4), (2, 2))] * 3 + [((3, 3), (1, 1))]
    assert all(m.out_channels == 256 for m in convs)
    assert all(m.num_groups == 32 for m in head.modules() if isinstance(m, torch.nn.GroupNorm))
    assert isinstance(head.net[-1], torch.nn.Linear) and head.net[-1].out_features == 1
    # a 2x2 map is strided once, then the convs keep its 1x1 size
    small = [m for m in ConvHead(8, (2, 2), arch="paper").modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.stride for m in small] == [(2, 2), (1, 1), (1, 1), (1, 1)]
    video = [m for m in ConvHead(8, (2, 8, 8), dims=3, arch="paper").modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(m.kernel_size == (3, 3, 3) for m in video)
    with pytest.raises(ValueError, match="allowed: paper, dmd2"):
        ConvHead(8, (4, 4), arch="nope")


def test_conv_head_3d():
    torch.manual_seed(0)
    head = ConvHead(8, (2, 8, 8), dims=3)
    assert head(torch.randn(B, 8, 2, 8, 8)).shape == (B,)
    assert any(isinstance(m, torch.nn.Conv3d) for m in head.modules())
    with pytest.raises(ValueError):
        ConvHead(8, (8,), dims=1)


def test_vector_and_multi_head_gradients_reach_backbone():
    net = tiny_unet(16)
    x, t = torch.randn(B, 2, 16, 16), torch.rand(B)
    heads = MultiHead(feature_shapes(net, x, t) + [(5,)])
    assert isinstance(heads.heads[-1], VectorHead) and isinstance(heads.heads[0], ConvHead)
    logits = heads(features(net, x, t) + [torch.randn(B, 5)])
    assert logits.shape == (B, 5)
    logits.sum().backward()
    assert net.mid.block1.conv1.weight.grad is not None
    with pytest.raises(ValueError):
        MultiHead([(3, 4)])


@pytest.mark.parametrize(
    "name,kw,x",
    [
        ("mlp", dict(dim=3, hidden=16, depth=2, num_classes=2), torch.randn(B, 3)),
        ("unet", dict(image_size=8, base_channels=8, num_classes=2, attention=True), torch.randn(B, 1, 8, 8)),
        ("diffusers_unet2d", dict(image_size=8, base_channels=8, num_classes=2), torch.randn(B, 1, 8, 8)),
    ],
)
def test_rebuild_from_config(name, kw, x):
    import json

    torch.manual_seed(0)
    net = build_backbone(name, **kw)
    config = json.loads(json.dumps(net.config))
    clone = build_backbone(name, **config)
    clone.load_state_dict(net.state_dict(), strict=True)
    t, cond = torch.rand(B) * 1000, {"labels": torch.tensor([0, 1, 0])}
    assert torch.equal(net(x, t, cond), clone(x, t, cond))


def test_build_backbone_unknown_name():
    with pytest.raises(ValueError, match="allowed: mlp, unet, diffusers_unet2d"):
        build_backbone("resnet")
    assert set(BACKBONES) == {"mlp", "unet", "diffusers_unet2d"}


def test_diffusers_unet_contract():
    torch.manual_seed(0)
    net = DiffusersUNet2D(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), num_classes=3)
    x, t = torch.randn(B, 1, 8, 8), torch.rand(B) * 1000
    cond = {"labels": torch.tensor([0, 1, 2])}
    assert net(x, t, cond).shape == x.shape
    assert torch.equal(net.null_cond(cond)["labels"], torch.full((B,), 3))
    assert torch.equal(net(x, t, net.null_cond(cond)), net(x, t, None))
    assert net.feature_layers[-1] == "unet.mid_block"
    shapes = feature_shapes(net, x, t, cond)
    assert shapes[-1] == (16, 4, 4)
    assert MultiHead(shapes)(features(net, x, t, cond)).shape == (B, len(shapes))


def test_unet_denoising_loss_drops():
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), num_classes=2)
    # Fixed, structured data: two classes of smooth patterns.
    grid = torch.linspace(-1, 1, 8)
    data = torch.stack([torch.sin(3 * grid).expand(8, 8), torch.cos(3 * grid)[:, None].expand(8, 8)])
    data = data[:, None].repeat(8, 1, 1, 1)  # [16, 1, 8, 8]
    cond = {"labels": torch.arange(16) % 2}
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(30):
        t = torch.rand(16, generator=gen)
        eps = torch.randn(data.shape, generator=gen)
        x_t = (1 - t[:, None, None, None]) * data + t[:, None, None, None] * eps
        loss = (net(x_t, t, cond) - data).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses

"""Field networks: shapes for every preset and image size, per-sample independence, config round trips."""

import json
import math

import pytest
import torch
from torch import nn

from efm_cli.integrator import integrate
from efm_cli.network import MLPConfig, MLPField, UNetConfig, UNetField, build, height_embedding, preset


def randomise(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give the zero-initialised layers random weights, so that outputs depend on everything."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if not p.abs().sum():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return net.eval()


@pytest.mark.parametrize(("name", "size"), [("tiny", 16), ("tiny", 24), ("small", 32), ("small", 64), ("base", 32)])
def test_presets_map_images_to_a_field_of_the_same_shape(name: str, size: int) -> None:
    net = UNetField(preset(name, channels=3, size=size)).eval()
    x, z = torch.randn(2, 3, size, size), torch.tensor([0.5, 7.0])
    with torch.no_grad():
        fz, fx = net(z, x)
    assert fz.shape == (2,) and fx.shape == x.shape
    assert torch.equal(fx, torch.zeros_like(fx)) and torch.equal(fz, torch.zeros_like(fz))  # zero-initialised output


def test_preset_sizes() -> None:
    counts = {name: sum(p.numel() for p in UNetField(preset(name, size=64)).parameters()) for name in ("tiny", "small")}
    assert counts["tiny"] < 300_000 < counts["small"] < 3_000_000
    base = sum(p.numel() for p in UNetField(preset("base", size=64)).parameters())
    assert 35_000_000 <= base <= 60_000_000


def test_image_sizes_must_fit_the_downsampling() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        preset("tiny", size=20)
    with pytest.raises(ValueError, match="unknown network preset"):
        preset("huge")


def test_samples_do_not_interact() -> None:
    """The integrator drops finished samples from the batch: a sample's field must not depend on the others."""
    net = randomise(UNetField(preset("tiny", size=16))).double()
    x, z = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([1e-3, 0.5, 10.0, 19.9], dtype=torch.float64)
    with torch.no_grad():
        fz, fx = net(z, x)
        for i in range(4):
            fz_i, fx_i = net(z[i : i + 1], x[i : i + 1])
            torch.testing.assert_close(fz_i, fz[i : i + 1], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(fx_i, fx[i : i + 1], rtol=1e-10, atol=1e-12)


def test_height_is_resolved_next_to_the_plates() -> None:
    """1000·z/L embedding: heights 0.001·L apart near a plate get clearly different features (raw z would not)."""
    L = 20.0
    near = height_embedding(torch.tensor([0.02, 0.04]), L, 128)
    assert (near[0] - near[1]).norm() > 0.5
    net = randomise(UNetField(preset("tiny", size=16, L=L)))
    x = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1)
    with torch.no_grad():
        _, fx = net(torch.tensor([0.02, 0.04]), x)
    assert not torch.allclose(fx[0], fx[1])


def test_config_round_trip_through_json_rebuilds_the_same_network() -> None:
    config = preset("small", channels=1, size=32, L=10.0)
    net = randomise(UNetField(config))
    again = build(json.loads(json.dumps(config.to_dict())))
    again.load_state_dict(net.state_dict())
    x, z = torch.randn(2, 1, 32, 32), torch.tensor([0.3, 9.0])
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(z, x), net(z, x))
    with pytest.raises(ValueError, match="unknown network kind"):
        build({"kind": "transformer"})
    with pytest.raises(ValueError, match="invalid UNet config"):
        UNetConfig(dropout=1.5)


def test_mlp_field_for_toy_points() -> None:
    config = MLPConfig(dim=2, width=64, depth=2, L=6.0)
    net = MLPField(config).eval()
    fz, fx = net(torch.rand(5) * 6, torch.randn(5, 2))
    assert fz.shape == (5,) and fx.shape == (5, 2)
    again = build(json.loads(json.dumps(config.to_dict())))
    again.load_state_dict(net.state_dict())
    x, z = torch.randn(3, 2), torch.tensor([0.1, 3.0, 5.9])
    torch.testing.assert_close(again(z, x), net(z, x))


def test_a_network_drives_the_integrator() -> None:
    """An image-shaped field network is a valid `field` for the integrator, in both directions.

    Built under a fixed seed: the default initialisation draws from the global RNG, which earlier tests advance."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = randomise(UNetField(preset("tiny", size=8, L=6.0))).double()
    with torch.no_grad():
        net.conv_out.bias[-1] = 5.0 / net.z_scale  # a field that climbs: f_z = 5 everywhere
        x = torch.rand(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
        forward = integrate(net, x, 1e-3, 6.0, rtol=1e-5, atol=1e-5)
        backward = integrate(net, forward.x, 6.0, 1e-3, rtol=1e-5, atol=1e-5)
    assert forward.landed.all() and backward.landed.all()
    assert forward.x.shape == x.shape
    moved = (forward.x - x).norm()
    assert moved > 0.1 and (backward.x - x).norm() < 0.05 * moved  # one field, both directions


def test_height_output_is_the_last_channel_mean_scaled_to_the_targets_norm() -> None:
    """Field targets have norm ≈ √N, so their height entry is O(√N): f_z is the channel mean times √N."""
    net = UNetField(preset("tiny", size=16))
    outputs: list[torch.Tensor] = []
    net.conv_out.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.no_grad():
        torch.nn.init.normal_(net.conv_out.weight, std=0.1)
        f_z, f_x = net(torch.rand(3) * 20, torch.rand(3, 3, 16, 16) * 2 - 1)
    n = 1 + 3 * 16 * 16
    assert net.z_scale == math.sqrt(n)
    assert torch.allclose(f_z, outputs[0][:, -1].double().mean(dim=(1, 2)).float() * math.sqrt(n), rtol=1e-5)
    assert torch.equal(f_x, outputs[0][:, :-1])

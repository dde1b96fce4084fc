"""Capacitor folders: save and load round trips, refusal of anything malformed, translation in both directions."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from conftest import climbing_capacitor
from safetensors.torch import save_file

from efm_cli.capacitor.format import CapacitorError, new_config
from efm_cli.capacitor.model import Capacitor
from efm_cli.network import preset

SIZE = 8


def make(field: str = "tube") -> Capacitor:
    """A tiny capacitor whose field climbs everywhere (f_z > 0) and moves images a little."""
    params = {"kind": "tube", "L": 6.0, "S": 1.0} if field == "tube" else {"kind": "coulomb", "L": 6.0}
    config = new_config(
        source="horse", target="zebra", network=preset("tiny", size=SIZE, L=6.0).to_dict(), field=params, size=SIZE
    )
    return climbing_capacitor(config)


def images(count: int = 3) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    capacitor = make()
    folder = capacitor.save_pretrained(tmp_path / "cap")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    loaded = Capacitor.from_pretrained(folder)
    assert loaded.config == json.loads((folder / "config.json").read_text())
    assert (loaded.source, loaded.target) == ("horse", "zebra")
    x, z = images(), torch.tensor([0.5, 2.0, 5.0])
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(z, x), capacitor.network(z, x))


def test_a_version_1_folder_loads_and_saves_again_as_version_2(tmp_path: Path) -> None:
    """Version 1 repeated image.size, image.channels and field.L inside 'network'; version 2 stores them once."""
    capacitor = make()
    folder = capacitor.save_pretrained(tmp_path / "v1")
    current = json.loads((folder / "config.json").read_text())
    assert current["format_version"] == 2 and {"size", "channels", "L"}.isdisjoint(current["network"])
    old = {**current, "format_version": 1, "network": {**current["network"], "size": SIZE, "channels": 3, "L": 6.0}}
    (folder / "config.json").write_text(json.dumps(old))
    loaded = Capacitor.from_pretrained(folder)
    assert loaded.config == current
    x, z = images(), torch.tensor([0.5, 2.0, 5.0])
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(z, x), capacitor.network(z, x))
    again = loaded.save_pretrained(tmp_path / "v2")
    assert json.loads((again / "config.json").read_text()) == current


def test_translation_goes_both_ways_by_domain_name() -> None:
    capacitor = make()
    x = images() / 2  # away from the clamp at ±1, which no field line can undo
    # At 1e-5 the round trip of some random fields misses by 6 % (global error, not a bug); at 1e-6 by ≤ 0.2 %.
    there = capacitor.translate(x, to="zebra", rtol=1e-6, atol=1e-6)
    back = capacitor.translate(there.images, to="horse", rtol=1e-6, atol=1e-6)
    assert (there.direction, back.direction) == ("forward", "backward")
    assert there.solution.landed.all() and back.solution.landed.all()
    assert there.images.shape == x.shape and there.images.abs().max() <= 1.0
    assert torch.equal(there.images, there.solution.x)
    moved = (there.images - x).flatten(1).norm(dim=1)
    assert (moved > 0.1).all() and ((back.images - x).flatten(1).norm(dim=1) < 0.05 * moved).all()
    with pytest.raises(CapacitorError, match="between 'horse' and 'zebra', not 'cat'"):
        capacitor.translate(x, to="cat")
    with pytest.raises(CapacitorError, match=r"expected images \[b, 3, 8, 8\]"):
        capacitor.translate(torch.zeros(1, 3, 16, 16))


def test_sampler_settings_come_from_the_config_unless_given() -> None:
    capacitor = make("coulomb")
    capacitor.config["sampler"] = {"solver": "euler", "steps": 7}
    assert (capacitor.translate(images(1)).solution.nfe == 7).all()
    assert (capacitor.translate(images(1), steps=3).solution.nfe == 3).all()


def test_half_precision_weights_load(tmp_path: Path) -> None:
    folder = make().save_pretrained(tmp_path / "cap")
    state = {k: v.half() for k, v in Capacitor.from_pretrained(folder).network.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    loaded = Capacitor.from_pretrained(folder)
    assert next(loaded.network.parameters()).dtype == torch.float32


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(format="something-else"), "not an efm-capacitor config"),
        (lambda c: c.update(format_version=99), "format_version 99"),
        (lambda c: c["domains"].update(target="horse"), "different names"),
        (lambda c: c["field"].update(kind="magnetic"), "unknown field kind"),
        (lambda c: c["field"].update(L=float("inf")), "finite plate distance"),
        (lambda c: c["image"].update(size=12), "multiple of 8"),
        (lambda c: c["network"].update(size=16), "network.size = 16 disagrees with image.size = 8"),
        (lambda c: c["network"].update(L=5.0), "network.L = 5.0 disagrees with field.L"),
        (lambda c: c["network"].update(kind="mlp"), "'network' must be a UNet"),
        (lambda c: c["network"].update(base=-4), "invalid network"),
        (lambda c: c.update(domains=["horse", "zebra"]), "'domains' must be an object"),
        (lambda c: c["sampler"].update(callback="os.system"), "'sampler' may only set"),
        (lambda c: c["sampler"].update(steps="many"), "'sampler' may only set"),
        (lambda c: c["sampler"].update(solver="rk4"), "'sampler' may only set"),
        (lambda c: c["sampler"].update(max_nfe=10**12), "'sampler' may only set"),
        (lambda c: c["sampler"].update(steps=0), "'sampler' may only set"),
        (lambda c: c["sampler"].update(rtol=-1e-3), "'sampler' may only set"),
    ],
)
def test_malformed_configs_are_refused_before_anything_is_built(tmp_path: Path, edit, message: str) -> None:
    folder = make().save_pretrained(tmp_path / "cap")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CapacitorError, match=message):
        Capacitor.from_pretrained(folder)


def test_broken_folders_are_refused(tmp_path: Path) -> None:
    folder = make().save_pretrained(tmp_path / "cap")
    with pytest.raises(CapacitorError, match="not a capacitor folder"):
        Capacitor.from_pretrained(tmp_path / "missing")
    (folder / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(CapacitorError, match="not a valid safetensors file"):
        Capacitor.from_pretrained(folder)
    other = Capacitor(
        new_config(
            source="a",
            target="b",
            network=preset("small", size=SIZE, L=6.0).to_dict(),
            field={"kind": "tube", "L": 6.0},
            size=SIZE,
        )
    )
    save_file(other.network.state_dict(), str(folder / "model.safetensors"))
    with pytest.raises(CapacitorError, match=r"does not match config\.json"):
        Capacitor.from_pretrained(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CapacitorError, match=r"has no model\.safetensors"):
        Capacitor.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CapacitorError, match="not valid JSON"):
        Capacitor.from_pretrained(folder)

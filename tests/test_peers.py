"""fla's launches, captured as if on an H100 without a GPU (bench/peers.py)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("fla")
triton = pytest.importorskip("triton")

from bench.peers import PeerLaunch, fla_launches

SHAPE = {"B": 1, "T": 256, "H": 4, "K": 64, "V": 64}


@pytest.fixture(scope="module")
def gdn_forward() -> tuple[list[PeerLaunch], bool, object]:
    """The forward's launches, and what the device queries said before the capture."""
    from triton.runtime.driver import driver

    cuda_before = torch.cuda.is_available()
    driver_before = driver._active
    launches = fla_launches("gdn", **SHAPE)
    assert torch.cuda.is_available() == cuda_before
    assert driver._active is driver_before
    return launches, cuda_before, driver_before


def _check(launches: list[PeerLaunch]) -> None:
    from triton.runtime.jit import JITFunction

    assert launches
    for launch in launches:
        assert isinstance(launch.fn, JITFunction), launch.name
        assert launch.name == launch.fn.__name__
        assert list(launch.args) == [p.name for p in launch.fn.params], launch.name
        assert 1 <= len(launch.grid) <= 3 and all(isinstance(g, int) and g > 0 for g in launch.grid), launch.grid
        assert launch.num_warps in (1, 2, 4, 8, 16, 32) and launch.num_stages >= 1
        assert launch.bytes_read > 0 and launch.bytes_written > 0, launch.name


def test_gdn_forward(gdn_forward):
    launches, _, _ = gdn_forward
    _check(launches)
    (out,) = [launch for launch in launches if launch.name == "chunk_fwd_kernel_o"]
    o = out.args["o"]
    assert tuple(o.shape) == (1, 256, 4, 64)
    assert out.bytes_written == o.numel() * o.element_size()  # o, and only o


def test_device_restored(gdn_forward):
    """Nothing of the fake H100 outlives the capture."""
    from triton.runtime.driver import driver

    _, cuda_before, driver_before = gdn_forward
    assert torch.cuda.is_available() == cuda_before
    assert driver._active is driver_before
    assert torch.cuda.get_device_capability.__module__ == "torch.cuda"
    assert triton.runtime.jit.JITFunction.run.__module__ == "triton.runtime.jit"
    assert triton.runtime.autotuner.Autotuner.run.__module__ == "triton.runtime.autotuner"


def test_gdn_backward():
    launches = fla_launches("gdn", **SHAPE, backward=True)
    _check(launches)
    names = [launch.name for launch in launches]
    assert "chunk_bwd_kernel_dqkwg" in names and "chunk_fwd_kernel_o" not in names


def test_compiles_for_sm90(gdn_forward):
    """At least one captured launch compiles ahead of time for sm_90, as captured."""
    from linattn.codegen.aot import compile_launch

    launches, _, _ = gdn_forward
    (out,) = [launch for launch in launches if launch.name == "chunk_fwd_kernel_o"]
    report = compile_launch(out.fn, out.args, out.num_warps, out.num_stages, arch=90)
    assert report.registers > 0

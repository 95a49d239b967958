"""The static report (bench/static.py): our and fla's launches compiled for sm_90 on a CPU."""
import importlib.util

import pytest
import torch

from bench import static


def test_static_report_of_a_forward():
    """A small GDN forward: every kernel compiled for sm_90 with its counts and bytes, fla's
    beside ours when fla is installed, and no fake device left behind."""
    cuda = torch.cuda.is_available()
    lines, totals = static.compare("gdn", {"B": 1, "T": 256, "H": 2, "K": 64}, modes=("forward",))
    assert torch.cuda.is_available() == cuda
    text = "\n".join(lines)
    assert "gdn_state_fwd" in text and "gdn_output_fwd" in text
    ours_mb, fla_mb = totals["forward MB from HBM"]
    launches, fla_launches = totals["forward launches"]
    # the forward reads q, k, v, g, β and writes o at least once: 256 tokens x 2 heads x 64 x (4 x 2 B) + small
    assert ours_mb >= 256 * 2 * 64 * 2 * 4
    assert launches == 5  # gates, intra, wu, state, output (an equal-length batch's chunk table is cached)
    # fla-core is in the test extra: its Triton path, captured the same way
    assert fla_mb > 0 and fla_launches >= 4 and "chunk_fwd_kernel_o" in text


def test_launch_bytes_count_what_was_passed():
    """A core backward kernel of Qwen3-Next reads the computed β the forward kept in fp32: its
    bytes count 4 a value for it (the manifest says the call's dtype, bf16), every other tensor
    (q and k, read as given and normalised on load) as declared."""
    from linattn import specs
    from linattn.codegen.cost import kernel_bytes
    from linattn.inspection import captured_launches, launch_bytes

    T, H, K = 64, 2, 32
    launches = captured_launches(specs.QWEN3_NEXT_GDN, "bf16", K, K, T=T, H=H, HV=H, packed=0, backward=True)
    wu = next(launch for launch in launches if launch.kernel.name == "wu_fwd")
    assert wu.args["beta"].dtype == torch.float32 and wu.args["k"].dtype == torch.bfloat16
    present = {n for n, v in wu.args.items() if v is not None}
    declared_read, declared_written = kernel_bytes(wu.kernel, wu.sizes, present)
    read, written = launch_bytes(wu.kernel, wu.sizes, wu.args)
    assert read - declared_read == T * H * 2 and written == declared_written  # β: 4 bytes a value, not 2


@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="mamba_ssm (an optional peer) not installed")
def test_static_report_against_mamba_ssm():
    """Mamba-2's section sets our kernels beside mamba_ssm's SSD kernels, captured under the
    fake H100 (its package imported without the selective scan's CUDA extension) and put back."""
    import sys

    before = {name for name in sys.modules if name.startswith("mamba_ssm")}
    lines, totals = static.compare("mamba2", {"B": 1, "T": 256, "H": 2, "K": 64}, modes=("forward",))
    assert {name for name in sys.modules if name.startswith("mamba_ssm")} == before
    text = "\n".join(lines)
    assert "_chunk_scan_fwd_kernel" in text and "_state_passing_fwd_kernel" in text
    ours_mb, peer_mb = totals["forward MB from HBM"]
    launches, peer_launches = totals["forward launches"]
    # both read x, B, C, dt and write y at least once: 256 tokens x 2 heads x 64 x 4 tensors x 2 B
    assert min(ours_mb, peer_mb) >= 256 * 2 * 64 * 4 * 2
    assert launches == 3 and peer_launches == 5  # ours: gates, state, output

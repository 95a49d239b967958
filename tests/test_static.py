"""The static report (bench/static.py): our and fla's launches compiled for sm_90 on a CPU."""
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

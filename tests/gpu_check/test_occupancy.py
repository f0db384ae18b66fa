"""The occupancy rules of occupancy.py against figures of NVIDIA's CUDA Occupancy Calculator (cc 8.0 / 9.0)."""

from __future__ import annotations

import pytest

from . import occupancy as O


@pytest.mark.parametrize(
    ("arch", "threads", "registers", "smem", "blocks", "warps", "limiter"),
    [
        # 256 threads, 32 registers, no shared memory: the warp limit (8 blocks x 8 warps = 64: 100%)
        ("sm80", 256, 32, 0, 8, 64, "warps"),
        # 4 warps at 255 registers: 8160 -> 8192 registers per warp, 8 warps fit, 2 blocks: 12.5%
        ("sm80", 128, 255, 0, 2, 8, "registers"),
        ("sm90", 128, 255, 0, 2, 8, "registers"),
        # 8 warps at 128 registers: 4096 per warp, 16 warps, 2 blocks: 25%
        ("sm90", 256, 128, 0, 2, 16, "registers"),
        # 40 registers: 1280 per warp, 51 warps -> 48 (granularity 4), 6 blocks of 8 warps
        ("sm80", 256, 40, 0, 6, 48, "registers"),
        # 96 KB of dynamic shared memory + 1 KB reserved: one block on sm_80 (164 KB), two on sm_90 (228 KB)
        ("sm80", 256, 32, 96 * 1024, 1, 8, "smem"),
        ("sm90", 256, 32, 96 * 1024, 2, 16, "smem"),
        # tiny blocks: the 32-blocks cap
        ("sm90", 32, 16, 0, 32, 32, "blocks"),
        # 1024 threads at 64 registers: 2048 per warp, 32 warps fit, one block of 32 warps
        ("sm80", 1024, 64, 0, 1, 32, "registers"),
    ],
)
def test_occupancy_matches_the_calculator(arch, threads, registers, smem, blocks, warps, limiter):
    occ = O.occupancy(arch, threads, registers, smem)
    assert (occ.blocks, occ.warps, occ.limiter) == (blocks, warps, limiter)
    assert occ.fraction == warps / 64


def test_launches_that_cannot_run_have_no_occupancy():
    assert O.occupancy("sm_80", 256, 256).blocks == 0
    assert "registers" in O.occupancy("sm_80", 256, 256).limiter
    assert O.occupancy("sm80", 2048, 32).blocks == 0
    assert O.occupancy("sm80", 128, 32, 200 * 1024).blocks == 0  # over sm_80's 163 KB per block
    assert O.occupancy("sm90", 128, 32, 200 * 1024).blocks == 1  # within sm_90's 227 KB
    # 64 K registers in one block: 1024 threads x 64 registers fits, x 72 does not
    assert O.occupancy("sm90", 1024, 72).blocks == 0


def test_flag_threshold():
    assert O.flagged(O.occupancy("sm80", 128, 255))  # 12.5%
    assert not O.flagged(O.occupancy("sm90", 256, 128))  # 25% exactly is not below


def test_undocumented_flags_name_the_kernel():
    rows = [
        {"stem": "x", "kernel": "k", "label": "a", "target": "sm80", "occupancy": 0.125, "occupancy_limiter": "smem"},
        {"stem": "x", "kernel": "k", "label": "b", "target": "sm90", "occupancy": 0.5, "occupancy_limiter": "warps"},
        {"stem": "dwconv_ln", "kernel": "dwconv_ln_fwd_kernel", "config": "c", "arch": "sm_80", "occupancy": 0.125},
    ]
    problems = O.undocumented(rows)
    assert len(problems) == 1 and problems[0].startswith("x.k a on sm80: occupancy 12.5% (smem)")
    text = O.summary(rows, "test")
    assert "x.k: 12.5 - 50.0% over 2 compiles, 1 flagged: UNDOCUMENTED" in text
    assert "dwconv_ln.dwconv_ln_fwd_kernel: 12.5 - 12.5% over 1 compiles, 1 flagged: the CUDA launcher's" in text

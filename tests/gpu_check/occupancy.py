"""Theoretical occupancy of a kernel launch on sm_80 (A100) and sm_90 (H100 / H200): CUDA's rules, written out.

Occupancy = resident warps per SM / the SM's maximum (64 warps on both archs), for a block of ``threads`` threads using
``registers`` registers per thread and ``smem`` bytes of shared memory (static + dynamic) per block. The number of
resident blocks is the smallest of four limits, as the CUDA Occupancy Calculator (and
``cudaOccupancyMaxActiveBlocksPerMultiprocessor``) computes them:

* blocks:    at most 32 blocks per SM;
* warps:     ``floor(64 / warps_per_block)``, ``warps_per_block = ceil(threads / 32)``;
* registers: registers are allocated per warp in units of 256 (``ceil(registers * 32 / 256) * 256`` per warp), from a
  65536-register file; the warps that fit are rounded down to the warp allocation granularity (4), then divided by
  the block's warps. More than 255 registers per thread cannot launch;
* shared memory: per block ``ceil((smem + 1024) / 128) * 128`` bytes (the CUDA runtime reserves 1 KB per block from
  sm_80 on), from the SM's maximum shared-memory carve-out: 164 KB on sm_80, 228 KB on sm_90 (the driver picks the
  carve-out a kernel needs; the maximum is assumed).

Low occupancy is not by itself slow - FlashAttention-style kernels run at 12.5 - 25% and hide latency with
instruction-level parallelism inside a big tile - but for the memory-bound kernels of this package (drop_path,
dwconv_ln, the mbconv depthwise pass) it limits the loads in flight, so the gate flags every launch below
:data:`FLAG_BELOW` and asks for a reason (:data:`KNOWN_LOW`).
"""

from __future__ import annotations

from dataclasses import dataclass

FLAG_BELOW = 0.25


@dataclass(frozen=True)
class Arch:
    name: str
    max_warps: int = 64
    max_blocks: int = 32
    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp in units of this many
    warp_granularity: int = 4  # warps that fit the register file are rounded down to a multiple of this
    max_registers_per_thread: int = 255
    smem_per_sm: int = 0  # bytes: the maximum shared-memory carve-out
    smem_per_block: int = 0  # bytes: the opt-in maximum per block
    smem_unit: int = 128
    smem_reserved_per_block: int = 1024
    max_threads_per_block: int = 1024


ARCHS: dict[str, Arch] = {
    "sm80": Arch("sm80", smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    "sm90": Arch("sm90", smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}
# the target names of aot.py ("sm80") and of cuobjdump's report ("sm_80") both work
ARCHS.update({f"sm_{k[2:]}": v for k, v in list(ARCHS.items())})


@dataclass(frozen=True)
class Occupancy:
    blocks: int  # resident blocks per SM
    warps: int  # resident warps per SM
    fraction: float  # warps / the SM's maximum
    limiter: str  # "warps", "blocks", "registers" or "smem" (the binding limit), or why it cannot launch

    @property
    def percent(self) -> str:
        return f"{100 * self.fraction:.1f}"


def _ceil_to(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(arch: str, threads: int, registers: int, smem: int = 0) -> Occupancy:
    """Resident blocks / warps per SM of a launch with ``threads`` per block, ``registers`` per thread and ``smem``
    bytes of shared memory per block (static + dynamic) on ``arch`` ("sm80" / "sm90" or "sm_80" / "sm_90")."""
    a = ARCHS[arch]
    if threads < 1 or threads > a.max_threads_per_block:
        return Occupancy(0, 0, 0.0, f"{threads} threads per block (1..{a.max_threads_per_block})")
    if registers > a.max_registers_per_thread:
        return Occupancy(0, 0, 0.0, f"{registers} registers per thread > {a.max_registers_per_thread}")
    if smem > a.smem_per_block:
        return Occupancy(0, 0, 0.0, f"{smem} B shared memory per block > {a.smem_per_block}")
    warps_per_block = -(-threads // 32)
    limits = {
        "blocks": a.max_blocks,
        "warps": a.max_warps // warps_per_block,
    }
    regs_per_warp = _ceil_to(max(registers, 1) * 32, a.register_unit)
    warps_by_regs = (a.registers // regs_per_warp) // a.warp_granularity * a.warp_granularity
    limits["registers"] = warps_by_regs // warps_per_block
    limits["smem"] = a.smem_per_sm // _ceil_to(smem + a.smem_reserved_per_block, a.smem_unit)
    # the binding limit; ties name the earlier of blocks, warps, registers, smem (the hardware caps first)
    limiter = min(limits, key=lambda k: limits[k])
    blocks = limits[limiter]
    warps = blocks * warps_per_block
    return Occupancy(blocks, warps, warps / a.max_warps, limiter if blocks else f"{limiter}: no block fits")


# (module stem, kernel) -> why a launch below FLAG_BELOW is accepted. A flagged launch of a kernel not listed here
# fails the gate; the end-of-run summary prints, per entry, the occupancy range actually seen, so a stale entry shows.
_DWCONV_SMEM = (
    "the CUDA launcher's 96 KB dynamic shared-memory budget (the input window of a tile row with its halo, and in the "
    "forward / dy kernels a (TW, C) fp32 stash of the conv output for the LayerNorm) leaves room for one 8-warp block "
    "per SM on sm_80 (two on sm_90) when a launch uses all of it; below C = 768 the launches take less - this is the "
    "budget's bound, not a measured launch. Lowering the budget trades occupancy for halo re-reads (served by L2)"
)
KNOWN_LOW: dict[tuple[str, str], str] = {
    **{
        ("dwconv_ln", k): _DWCONV_SMEM
        for k in (
            "dwconv_ln_fwd_kernel",
            "dwconv_ln_bwd_dy_kernel",
            "dwconv_ln_bwd_input_kernel",
            "dwconv_ln_bwd_weight_kernel",
        )
    },
    **{
        ("attention", k): (
            "FlashAttention-style tiles: a 64-128 row tile of scores, its softmax state and the output accumulator "
            "live in registers (128-255 per thread), so one or two blocks fit per SM (12.5-25%); latency is hidden by "
            "the tile's independent MMAs, as in FlashAttention-2; the tables keep the largest tile that does not spill"
        )
        for k in (
            "_attention_fwd_kernel",
            "_attention_bwd_dq_kernel",
            "_attention_bwd_dkdv_kernel",
        )
    },
    ("drop_path", "_drop_path_add_bwd_kernel"): (
        "only the float16 + float64 mix accumulated in float64 on unaligned NCHW rows (sm_80: 155-156 registers, one "
        "8-warp program per SM): a rare dtype mix, no benchmark or model path; every float16 / bfloat16 / float32 "
        "specialisation runs at 37.5-100%"
    ),
    ("mbconv_se", "mbconv_se_bwd_main_kernel"): (
        "k = 5 stride 2 and k = 7 specialisations hold the recomputed k x k window, the activation and BatchNorm "
        "gradients in registers (140-193 per thread): one 8-warp block per SM (12.5%); k = 3 and k = 5 stride 1: 25%"
    ),
}


def flagged(occ: Occupancy) -> bool:
    return occ.fraction < FLAG_BELOW


def summary(rows: list[dict], source: str) -> str:
    """Per (stem, kernel): the occupancy range over the rows, how many are flagged, and the reason of KNOWN_LOW (rows:
    dicts with "stem", "kernel", "occupancy" (fraction or None); ``source`` names the table in the heading)."""
    by_kernel: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.get("occupancy") is not None:
            by_kernel.setdefault((r["stem"], r["kernel"]), []).append(r["occupancy"])
    lines = [f"Occupancy per kernel ({source}; resident warps / 64 per SM, flagged below {100 * FLAG_BELOW:.0f}%):"]
    for key in sorted(by_kernel):
        occ = by_kernel[key]
        low = sum(1 for o in occ if o < FLAG_BELOW)
        line = f"  {key[0]}.{key[1]}: {100 * min(occ):.1f} - {100 * max(occ):.1f}% over {len(occ)} compiles"
        if low:
            line += f", {low} flagged: " + KNOWN_LOW.get(key, "UNDOCUMENTED (add a reason to occupancy.KNOWN_LOW)")
        lines.append(line)
    stale = sorted(k for k in KNOWN_LOW if k in by_kernel and min(by_kernel[k]) >= FLAG_BELOW)
    if stale:
        lines.append("  stale KNOWN_LOW entries (nothing flagged): " + ", ".join(".".join(k) for k in stale))
    return "\n".join(lines)


def undocumented(rows: list[dict]) -> list[str]:
    """The flagged rows whose (stem, kernel) has no KNOWN_LOW reason, as messages."""
    return [
        f"{r['stem']}.{r['kernel']} {r.get('config') or r.get('label', '')} on {r.get('arch') or r.get('target')}: "
        f"occupancy {100 * r['occupancy']:.1f}% ({r.get('occupancy_limiter')}) < {100 * FLAG_BELOW:.0f}%: raise it or "
        "give the reason in tests/gpu_check/occupancy.py KNOWN_LOW"
        for r in rows
        if r.get("occupancy") is not None and r["occupancy"] < FLAG_BELOW and (r["stem"], r["kernel"]) not in KNOWN_LOW
    ]

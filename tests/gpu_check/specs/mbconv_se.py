"""AOT specs of triton_kernels/mbconv_se.py, read by the ahead-of-time gate (tests/gpu_check/aot.py); not used at run
time.

One dict per specialisation the launchers ``mbconv_se_fwd`` / ``mbconv_se_bwd`` compile on CUDA (the GPU branches of
``K._fwd_config``, ``K._dy_config``, ``K._dx_config``, ``K._dw_config``, ``K._pixel_tile``). What a compile depends on:

* the config: forward family (stats, apply, reduce, dy) with channels-last x: ``BLOCK_C`` = next_pow2(C) clamped to
  [16, 64], 8 x 8 pixels (4 x 8 in the backward); with NCHW x: 8 channels x 32 x 8 pixels (16 x 8), for every C.
  grad_x: ``BLOCK_C`` in [16, 128]; grad_weight: ``BLOCK_C`` in [16, 32] and ``BLOCK_K`` = next_pow2(k) (4 or 8);
* dtypes: x / out / grad_out / grad_x (fp16, bf16, fp32) and the parameters (x's dtype or fp32: "f16+f32" is AMP);
  statistics, grad_pooled, workspaces and partials are always fp32;
* constexpr flags: ``STRIDE`` (1, 2), ``ACT`` (5 names), ``HAS_CONV_BIAS`` / ``HAS_BN_WEIGHT`` / ``HAS_BN_BIAS``,
  ``HAS_GRAD_POOLED``, ``BATCH_STATS``, ``NEED_PARTIALS``;
* integer specialisation as the JIT does it: k, paddings, spatial sizes and tile counts are ``do_not_specialize``
  (plain i32); C and the strides are specialised: "a16" = a 56 x 56 map with C a multiple of 16 and 16-byte aligned
  tensors; "odd" = a 13 x 13 map, C odd, x and grad_out offset views; value 1 -> constexpr (the unit stride of the
  layout: stride_xw in NCHW, stride_xc in channels-last, stride_gc of the (B, out_h, out_w, C) grad_out).

``_aot_specs(full=True)``: per kernel and config every dtype mix x shape x stride (silu, every parameter present;
grad_weight with k = 3 and 7), and the other activations and flag variants on the "bf16+f32" mix of each config: the
set used to calibrate the tables (760 specs; compile them with ``aot.check``). When last calibrated (Triton 3.8) all
1520 compiles were spill-free with at most 116 registers (grad_x, 128-channel tiles). The gate's set (``AOT_SPECS``)
covers every value of every dimension for every kernel and config, with the register-heaviest choices of the other
dimensions (see the comment in ``_aot_specs``).
"""

from __future__ import annotations

import itertools

import torch

from pykernels.triton_kernels import mbconv_se as K

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
PTR = {F16: "*fp16", BF16: "*bf16", F32: "*fp32"}
# dtype mixes: (x / out / grad_out / grad_x, parameters)
MIXES = {"f16": (F16, F16), "bf16": (BF16, BF16), "f32": (F32, F32), "f16+f32": (F16, F32), "bf16+f32": (BF16, F32)}
ACTS = ("none", "relu", "relu6", "silu", "hardswish")
KERNELS = {
    "stats": K._mbconv_se_fwd_stats_kernel,
    "fwd": K._mbconv_se_fwd_kernel,
    "reduce": K._mbconv_se_bwd_reduce_kernel,
    "dy": K._mbconv_se_bwd_dy_kernel,
    "dx": K._mbconv_se_bwd_dx_kernel,
    "dw": K._mbconv_se_bwd_dw_kernel,
}
# the (layout, channel class) pairs that select each kernel's configs: C whose next_pow2 lands on each BLOCK_C of the
# kernel's table (C <= 16 share 16; the forward family's channels-last tiles: C > 32 share 64). NCHW forward-family
# tiles have BLOCK_C = 8 for every C (one class); grad_x / grad_weight tiles do not depend on the layout.
CONFIGS = {
    "stats": (("cl", 16), ("cl", 32), ("cl", 64), ("nchw", 64)),
    "fwd": (("cl", 16), ("cl", 32), ("cl", 64), ("nchw", 64)),
    "reduce": (("cl", 16), ("cl", 32), ("cl", 64), ("nchw", 64)),
    "dy": (("cl", 16), ("cl", 32), ("cl", 64), ("nchw", 64)),
    "dx": tuple((layout, c) for c in (16, 32, 64, 128) for layout in ("cl", "nchw")),
    "dw": tuple((layout, c) for c in (16, 32) for layout in ("cl", "nchw")),
}


def _map(c_class: int, layout: str, shape: str, stride: int) -> dict:
    """C, the input / output map sizes and the x strides of a (B, C, H, W) tensor in ``layout``."""
    side = 56 if shape == "a16" else 13
    c = c_class if shape == "a16" else (c_class - 1 if c_class > 16 else 15)  # odd C: not a multiple of 16
    out = (side - 1) // stride + 1
    if layout == "cl":
        x_strides = {"b": side * side * c, "c": 1, "h": side * c, "w": c}
    else:
        x_strides = {"b": c * side * side, "c": side * side, "h": side, "w": 1}
    return {"C": c, "side": side, "out": out, "x": x_strides}


def _classify(values: dict) -> tuple[dict, dict, list]:
    """(signature, constexprs pinned to 1, 16-divisible) of specialised int args, as the JIT would see them."""
    sig, pinned, div = {}, {}, []
    for name, v in values.items():
        if v == 1:
            pinned[name] = 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                div.append(name)
    return sig, pinned, div


def _spec(
    kind: str,
    c_class: int,
    mix: str,
    layout: str,
    shape: str,
    stride: int,
    act: str = "silu",
    params: bool = True,
    grad_pooled: bool = True,
    batch_stats: bool = True,
    need_partials: bool = True,
    ksize: int = 3,
) -> dict:
    """The spec of kernel ``kind`` for one channel class / dtype mix / layout / shape / stride and flags."""
    kernel = KERNELS[kind]
    x_dtype, p_dtype = MIXES[mix]
    geo = _map(c_class, layout, shape, stride)
    block_k = None
    if kind in ("stats", "fwd"):
        block_p, block_c, num_warps = K._fwd_config(geo["C"], layout == "cl", False)
    elif kind in ("reduce", "dy"):
        block_p, block_c, num_warps = K._dy_config(geo["C"], layout == "cl", False)
    elif kind == "dx":
        block_p, block_c, num_warps = K._dx_config(geo["C"], False)
    else:
        block_p, block_c, block_k, num_warps = K._dw_config(geo["C"], ksize, False)
    block_h, block_w = K._pixel_tile(block_p, geo["out"], geo["out"], False)
    ints = {"C": geo["C"]}
    if kind == "dx":
        ints.update({f"stride_gx{d}": v for d, v in geo["x"].items()})  # grad_x: x's layout
    else:
        ints.update({f"stride_x{d}": v for d, v in geo["x"].items()})
    if kind in ("reduce", "dy"):  # grad_out (B, out_h, out_w, C) contiguous
        out, c = geo["out"], geo["C"]
        ints.update(stride_gb=out * out * c, stride_gh=out * c, stride_gw=c, stride_gc=1)
    sig, const, div = _classify(ints)
    sig.update({name: "i32" for name in K._UNSPECIALISED if name in kernel.arg_names})  # do_not_specialize
    const.update(STRIDE=stride, BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c)
    aligned = shape == "a16"
    x_ptr, p_ptr = PTR[x_dtype], PTR[p_dtype]
    label = [f"{mix}/{layout}-{shape}/s{stride}"]
    if kind == "dx":
        sig.update(GRAD_X=x_ptr, DY="*fp32", WEIGHT=p_ptr)
        div += ["GRAD_X", "DY", "WEIGHT"]
    elif kind == "dw":
        sig.update(PARTIAL_W="*fp32", DY="*fp32", X=x_ptr)
        const["BLOCK_K"] = block_k
        div += ["PARTIAL_W", "DY"] + (["X"] if aligned else [])
        label.append(f"k{ksize}")
    else:
        sig.update(X=x_ptr, WEIGHT=p_ptr, CONV_BIAS=p_ptr)
        const["HAS_CONV_BIAS"] = params
        div += ["WEIGHT", "CONV_BIAS"] + (["X"] if aligned else [])
        if kind == "stats":
            sig["PARTIAL"] = "*fp32"
            div.append("PARTIAL")
            label.append(f"cb{params:d}")
        else:
            sig.update(BN_WEIGHT=p_ptr, BN_BIAS=p_ptr, MEAN="*fp32", VAR="*fp32", eps="fp32")
            const.update(HAS_BN_WEIGHT=params, HAS_BN_BIAS=params, ACT=act)
            div += ["BN_WEIGHT", "BN_BIAS", "MEAN", "VAR"]
            label.append(f"{act}/params{params:d}")
        if kind == "fwd":
            sig.update(OUT=x_ptr, PARTIAL_POOLED="*fp32")
            div += ["OUT", "PARTIAL_POOLED"]
        if kind in ("reduce", "dy"):
            sig.update(PARTIAL="*fp32", GRAD_OUT=x_ptr, GRAD_POOLED="*fp32")
            const["HAS_GRAD_POOLED"] = grad_pooled
            div += ["PARTIAL", "GRAD_POOLED"] + (["GRAD_OUT"] if aligned else [])
            label.append(f"gp{grad_pooled:d}")
        if kind == "dy":
            sig.update(DY="*fp32", MEAN_G="*fp32", MEAN_G_XHAT="*fp32")
            const.update(BATCH_STATS=batch_stats, NEED_PARTIALS=need_partials)
            # MEAN_G_XHAT is the second row of a (2, C) buffer: 16-byte aligned when C % 4 == 0
            div += ["DY", "MEAN_G"] + (["MEAN_G_XHAT"] if aligned else [])
            label.append(f"bs{batch_stats:d}-partials{need_partials:d}")
    tile = f"{block_h}x{block_w}xC{block_c}" + (f"xK{block_k}" if block_k else "")
    label.append(f"{tile}-w{num_warps}")
    return {
        "kernel": kernel,
        "label": "/".join(label),
        "signature": sig,
        "constexprs": const,
        "divisible_by_16": tuple(dict.fromkeys(div)),
        "num_warps": num_warps,
        "options": {"maxnreg": K.MAXNREG},
    }


def _aot_specs(full: bool = False) -> list[dict]:
    specs = []
    shapes, strides = ("a16", "odd"), (1, 2)
    if full:
        # calibration: every config x dtype mix x shape x stride (silu, every parameter); the other activations and
        # flags on the heaviest mix of each config
        for kind, configs in CONFIGS.items():
            for (layout, c_class), mix, shape, stride in itertools.product(configs, MIXES, shapes, strides):
                for ksize in (3, 7) if kind == "dw" else (3,):
                    specs.append(_spec(kind, c_class, mix, layout, shape, stride, ksize=ksize))
            for (layout, c_class), stride in itertools.product(configs, strides):
                if kind in ("fwd", "reduce", "dy"):
                    specs += [_spec(kind, c_class, "bf16+f32", layout, "odd", stride, act) for act in ACTS[:3]]
                    specs.append(_spec(kind, c_class, "bf16+f32", layout, "odd", stride, "hardswish", False, False))
                if kind == "stats":
                    specs.append(_spec(kind, c_class, "f16", layout, "odd", stride, params=False))
                if kind == "dy":
                    specs.append(_spec(kind, c_class, "bf16+f32", layout, "odd", stride, batch_stats=False))
                    specs.append(_spec(kind, c_class, "f16", layout, "a16", stride, need_partials=False))
        return specs
    # The gate's set: for every kernel and config both strides in the "bf16+f32" mix (half x, fp32 parameters) on the
    # "odd" shape, fp32 "odd" (the most registers of several kernels in the calibration) and the typical fp16 "a16";
    # every dtype mix, activation and flag variant on the widest config of each layout.
    for kind, configs in CONFIGS.items():
        for (layout, c_class), stride in itertools.product(configs, strides):
            specs.append(_spec(kind, c_class, "bf16+f32", layout, "odd", stride, ksize=7 if stride == 2 else 3))
        for layout, c_class in configs:
            specs.append(_spec(kind, c_class, "f16", layout, "a16", 1 if layout == "nchw" else 2))
            specs.append(_spec(kind, c_class, "f32", layout, "odd", 1))  # the most registers in the calibration
        widest = {layout: c for layout, c in configs}
        for (layout, c_class), mix in itertools.product(widest.items(), ("f16", "bf16", "f32", "f16+f32")):
            specs.append(_spec(kind, c_class, mix, layout, "a16" if mix != "f32" else "odd", 1, ksize=5))
        for layout, c_class in widest.items():
            if kind in ("fwd", "reduce", "dy"):
                specs += [_spec(kind, c_class, "f32", layout, "odd", 2, act) for act in ACTS if act != "silu"]
                specs.append(_spec(kind, c_class, "f16", layout, "odd", 1, "none", params=False, grad_pooled=False))
            if kind == "stats":
                specs.append(_spec(kind, c_class, "f16", layout, "odd", 1, params=False))
            if kind == "dy":
                specs.append(_spec(kind, c_class, "bf16+f32", layout, "odd", 2, "hardswish", batch_stats=False))
                specs.append(_spec(kind, c_class, "f16", layout, "a16", 1, need_partials=False))
                specs.append(_spec(kind, c_class, "f16", layout, "a16", 1, batch_stats=False, need_partials=False))
    return list({(spec["kernel"].__name__, spec["label"]): spec for spec in specs}.values())  # distinct


AOT_SPECS = _aot_specs()

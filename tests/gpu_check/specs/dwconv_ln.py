"""AOT specs of triton_kernels/dwconv_ln.py, read by the ahead-of-time gate (tests/gpu_check/aot.py); not used at run
time.

One dict per specialisation the launchers ``dwconv_ln_fwd`` / ``dwconv_ln_bwd`` compile on CUDA (the GPU branches of
``K._fwd_config``, ``K._dx_config``, ``K._dw_config``, ``K._pixel_tile``). Int args are specialised as the JIT does
it: "a16" = a 56 x 56 map with C a multiple of 16 (ConvNeXt stages), 16-byte aligned tensors; "odd" = a 13 x 13 map,
C = 200 (or the class's odd C), x an offset view; value 1 -> constexpr (the unit stride of the layout: stride_xw in
NCHW, stride_xc in channels-last). The backward's dy workspace ``DY`` has the launcher's dtype (``K.dy_dtype``: x's).
``_aot_specs(full=True)``: the whole product, for calibrating the tables.
"""

from __future__ import annotations

import itertools

import torch
import triton

from pykernels.triton_kernels import dwconv_ln as K


def _aot_specs(full: bool = False) -> list[dict]:
    f16, bf16, f32 = torch.float16, torch.bfloat16, torch.float32
    ptr = {f16: "*fp16", bf16: "*bf16", f32: "*fp32"}
    # dtype mixes: (x / out / grad_out, parameters)
    mixes = {"f16": (f16, f16), "bf16": (bf16, bf16), "f32": (f32, f32), "f16+f32": (f16, f32), "bf16+f32": (bf16, f32)}

    def shape_ints(channels, layout, shape):
        """(sig, pinned, divisible) of C, H, W and the x strides for a (B, C, H, W) tensor in ``layout``."""
        side = 56 if shape == "a16" else 13
        c = channels if shape == "a16" else (channels - 1 if channels > 16 else channels | 1)  # odd C: not /16
        if layout == "cl":
            strides = {"b": side * side * c, "c": 1, "h": side * c, "w": c}
        else:
            strides = {"b": c * side * side, "c": side * side, "h": side, "w": 1}
        values = {"C": c, "H": side, "W": side, **{f"stride_x{k}": v for k, v in strides.items()}}
        return values

    def classify(values):
        sig, pinned, div = {}, {}, []
        for name, v in values.items():
            if v == 1:
                pinned[name] = 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    div.append(name)
        return sig, pinned, div

    def tiles(block_p):
        block_h, block_w = K._pixel_tile(block_p, 56, 56, False)
        return block_h, block_w

    def grid_ints(values, block_h, block_w):
        tiles_w = triton.cdiv(values["W"], block_w)
        return {"tiles_w": tiles_w, "tiles_per_image": triton.cdiv(values["H"], block_h) * tiles_w}

    def fwd_like(kernel, c_pad, mix, layout, shape, flags, need_partials=True):
        x_dtype, p_dtype = mixes[mix]
        block_p, block_c, thirds, chunked, num_warps = K._fwd_config(c_pad, False, kernel is K._dwconv_ln_bwd_dy_kernel)
        block_h, block_w = tiles(block_p)
        values = shape_ints(c_pad, layout, shape)
        values.update(grid_ints(values, block_h, block_w))
        if kernel is K._dwconv_ln_bwd_dy_kernel:  # grad_out (B, H, W, C) contiguous
            side, c = values["H"], values["C"]
            values.update(stride_gb=side * side * c, stride_gc=1, stride_gh=side * c, stride_gw=c)
        sig, pinned, div = classify(values)
        has_cb, has_lw, has_lb = flags
        weight = ptr[p_dtype]
        sig["ksize"] = "i32"
        const = {**pinned, "HAS_CONV_BIAS": has_cb, "HAS_LN_WEIGHT": has_lw, "CHUNKED": chunked, "THIRDS": thirds}
        const.update(BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_C=block_c)
        sig.update(X=ptr[x_dtype], WEIGHT=weight, CONV_BIAS=weight, LN_WEIGHT=weight)
        aligned = ["X", "WEIGHT", "CONV_BIAS", "LN_WEIGHT"] if shape == "a16" else ["WEIGHT", "CONV_BIAS", "LN_WEIGHT"]
        if kernel is K._dwconv_ln_fwd_kernel:
            sig.update(OUT=ptr[x_dtype], MEAN="*fp32", RSTD="*fp32", LN_BIAS=weight, eps="fp32")
            const["HAS_LN_BIAS"] = has_lb
            aligned += ["OUT", "MEAN", "RSTD", "LN_BIAS"]
            extra = f"-lb{has_lb:d}"
        else:
            sig.update(DY=ptr[K.dy_dtype(x_dtype)], PARTIAL="*fp32", GRAD_OUT=ptr[x_dtype], MEAN="*fp32", RSTD="*fp32")
            const["NEED_PARTIALS"] = need_partials
            aligned += ["DY", "PARTIAL", "GRAD_OUT", "MEAN", "RSTD"]
            extra = f"-partials{need_partials:d}"
        mode = "chunked" if chunked else "thirds" if thirds else "single"
        return {
            "kernel": kernel,
            "label": f"{mix}/{layout}-{shape}/cb{has_cb:d}-lw{has_lw:d}{extra}/{mode}-"
            f"{block_h}x{block_w}xC{'3x' if thirds else ''}{block_c}-w{num_warps}",
            "signature": sig,
            "constexprs": const,
            "divisible_by_16": tuple(dict.fromkeys(aligned + div)),
            "num_warps": num_warps,
            "options": {"maxnreg": K.MAXNREG},
        }

    def dx(c_pad, mix, layout, shape):
        x_dtype, p_dtype = mixes[mix]
        block_p, block_c, num_warps = K._dx_config(c_pad, False)
        block_h, block_w = tiles(block_p)
        values = shape_ints(c_pad, layout, shape)
        values = {("stride_gx" + k[len("stride_x") :] if k.startswith("stride_x") else k): v for k, v in values.items()}
        values.update(grid_ints(values, block_h, block_w))
        sig, pinned, div = classify(values)
        sig.update(GRAD_X=ptr[x_dtype], DY=ptr[K.dy_dtype(x_dtype)], WEIGHT=ptr[p_dtype], ksize="i32")
        return {
            "kernel": K._dwconv_ln_bwd_dx_kernel,
            "label": f"{mix}/{layout}-{shape}/{block_h}x{block_w}xC{block_c}-w{num_warps}",
            "signature": sig,
            "constexprs": {**pinned, "BLOCK_H": block_h, "BLOCK_W": block_w, "BLOCK_C": block_c},
            "divisible_by_16": ("GRAD_X", "DY", "WEIGHT", *div),
            "num_warps": num_warps,
            "options": {"maxnreg": K.MAXNREG},
        }

    def dw(c_pad, mix, layout, shape, ksize):
        x_dtype, _ = mixes[mix]
        block_p, block_c, block_k, num_warps = K._dw_config(c_pad, ksize, False)
        block_h, block_w = tiles(block_p)
        values = shape_ints(c_pad, layout, shape)
        values.update(grid_ints(values, block_h, block_w))
        values.update(num_tiles=8 * values["tiles_per_image"], tiles_per_group=values["tiles_per_image"] + 1)
        sig, pinned, div = classify(values)
        sig.update(PARTIAL_W="*fp32", DY=ptr[K.dy_dtype(x_dtype)], X=ptr[x_dtype], ksize="i32")
        aligned = ("PARTIAL_W", "DY", "X") if shape == "a16" else ("PARTIAL_W", "DY")
        return {
            "kernel": K._dwconv_ln_bwd_dw_kernel,
            "label": f"{mix}/{layout}-{shape}/{block_h}x{block_w}xK{block_k}xC{block_c}-w{num_warps}",
            "signature": sig,
            "constexprs": {
                **pinned,
                "BLOCK_H": block_h,
                "BLOCK_W": block_w,
                "BLOCK_C": block_c,
                "BLOCK_K": block_k,
            },
            "divisible_by_16": (*aligned, *div),
            "num_warps": num_warps,
            "options": {"maxnreg": K.MAXNREG},
        }

    specs = []
    all_on = (True, True, True)
    none = (False, False, False)
    # 96 / 192 / 384 / 768: ConvNeXt's widths, three-tile rows (THIRDS); 2048: the chunked path
    c_classes = [4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048]

    def shape_of(c_pad):
        return "a16" if c_pad >= 16 else "odd"  # C < 16 has no 16-divisible strides

    if full:
        # the whole product, for calibrating the tables (compile it with _aot_specs(full=True) and aot.check)
        for kernel in (K._dwconv_ln_fwd_kernel, K._dwconv_ln_bwd_dy_kernel):
            for c_pad, layout, mix in itertools.product(c_classes, ("cl", "nchw"), mixes):
                specs.append(fwd_like(kernel, c_pad, mix, layout, shape_of(c_pad), all_on))
            for c_pad, layout in itertools.product((256, 2048), ("cl", "nchw")):
                specs.append(fwd_like(kernel, c_pad, "bf16+f32", layout, "odd", all_on))
                specs.append(fwd_like(kernel, c_pad, "f32", layout, "odd", all_on))
            specs.append(fwd_like(kernel, 128, "f16", "cl", "a16", none, need_partials=False))
        for c_pad, layout, mix in itertools.product((4, 16, 32, 64, 96, 128, 192), ("cl", "nchw"), mixes):
            specs.append(dx(c_pad, mix, layout, shape_of(c_pad)))
        for c_pad, ksize, layout, mix in itertools.product((4, 32), (3, 5, 13), ("cl", "nchw"), mixes):
            specs.append(dw(c_pad, mix, layout, shape_of(c_pad), ksize))
        return specs

    # The gate's set (CI time: the full product, 328 specs / 656 compiles, all spill-free with <= 128 registers when
    # last calibrated, takes ~7 minutes of 2 cores): per kernel the register-heaviest
    # specialisations of the full product (NCHW, fp32 or bf16 + fp32 parameters, odd shapes, the chunked path) and the
    # typical ConvNeXt ones (channels-last, f16 / bf16). The kernel size is a runtime argument (one compile serves
    # k = 3..13); only the grad_weight kernel's tap lanes (BLOCK_K = next_pow2(k): 4, 8, 16) are compiled in.
    for kernel in (K._dwconv_ln_fwd_kernel, K._dwconv_ln_bwd_dy_kernel):
        for c_pad in (4, 128, 1024, 2048):
            specs.append(fwd_like(kernel, c_pad, "f16", "cl", shape_of(c_pad), all_on))
        for c_pad in (64, 2048):
            specs.append(fwd_like(kernel, c_pad, "f16", "nchw", "a16", all_on))
        for c_pad in (256, 2048):
            specs.append(fwd_like(kernel, c_pad, "bf16+f32", "nchw", "odd", all_on))
        for c_pad in (128, 512):
            specs.append(fwd_like(kernel, c_pad, "f32", "nchw", "a16", all_on))
        specs.append(fwd_like(kernel, 1024, "bf16+f32", "cl", "a16", all_on))
        specs.append(fwd_like(kernel, 128, "bf16", "cl", "a16", none, need_partials=False))
        # ConvNeXt's C = 96 * 2^n: three-tile rows (THIRDS)
        for c_pad in (96, 192, 384, 768):
            specs.append(fwd_like(kernel, c_pad, "f16", "cl", "a16", all_on))
        specs.append(fwd_like(kernel, 96, "bf16+f32", "nchw", "odd", all_on))
        specs.append(fwd_like(kernel, 384, "f32", "nchw", "a16", all_on))
    specs.append(dx(128, "f16", "cl", "a16"))
    specs.append(dx(4, "f16", "nchw", "odd"))
    specs.append(dx(128, "f32", "nchw", "odd"))
    specs.append(dx(128, "bf16+f32", "nchw", "odd"))
    specs.append(dx(96, "f16", "cl", "a16"))
    specs.append(dx(192, "f16", "cl", "a16"))
    specs.append(dw(32, "f16", "cl", "a16", 7))
    specs.append(dw(32, "f16", "nchw", "a16", 3))
    specs.append(dw(4, "f16", "cl", "odd", 5))
    specs.append(dw(32, "f32", "nchw", "odd", 13))
    specs.append(dw(32, "bf16", "nchw", "odd", 7))
    return specs


AOT_SPECS = _aot_specs()

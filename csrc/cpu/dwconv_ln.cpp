// Depthwise k x k convolution fused with LayerNorm over channels (ConvNeXt's block front; Liu et al. 2022, "A ConvNet
// for the 2020s"): the CPU kernels of pykernels::dwconv_ln_fwd / dwconv_ln_bwd (contract in csrc/ops.cpp, argument
// checks and output allocation in csrc/dwconv_ln_args.h).
//
//   forward:  y = dwconv_k(x) + conv_bias ; out[b, h, w, :] = (y - mean) * rstd * ln_weight + ln_bias   (over C)
//   backward: y recomputed ; xhat = (y - mean) * rstd ; gw = grad_out * ln_weight ;
//             dy = rstd * (gw - mean_c(gw) - xhat * mean_c(gw * xhat)) ;
//             grad_x = conv_transpose(dy, weight) ; grad_weight = correlation(x, dy) ; grad_conv_bias = sum dy ;
//             grad_ln_weight = sum grad_out * xhat ; grad_ln_bias = sum grad_out
//
// Work units are (image b, band of output rows). A unit walks its rows top to bottom with a ring of k input rows,
// each converted once to the compute dtype in a padded channels-inner tile [W + k - 1 (+ pad)][Cp] (Cp = C rounded up
// to 16): this reads NCHW (a small transpose per row) and channels-last x alike, float16 / bfloat16 / float32 /
// float64, without any full-size copy. The conv of a row is register-blocked: for a vector of channels and a group
// of P output pixels, the k weight vectors of a kernel row stay in registers while the P + k - 1 input columns of
// that row stream by. The LayerNorm of each pixel then runs over the fp32 row in cache (two passes: mean, then the
// centred variance), and the row is written out (B, H, W, C). The backward keeps a second ring, of dy rows: dy of
// row h is computed from the recomputed y, grad_weight gathers dy(h) x x(h + i - r, . + j - r) from the x ring, and
// grad_x of row h - r is the forward conv of the dy ring with the flipped kernel. No workspace of size B*H*W*C.
//
// Vector code is written with GCC vector extensions in always-inline templates, instantiated twice: for the
// baseline ISA and, chosen at run time, for AVX2 (same operations, same order: identical results). -ffp-contract=off:
// every multiply and add is rounded on its own. Determinism: the forward computes every pixel the same way in any
// partition; the backward's parameter gradients are summed per unit row (fp32 vectors, then into float64 per task),
// over a fixed split of the units into tasks (a function of the shape only), and the tasks are added in order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/half_convert.h"
#include "dwconv_ln_args.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define PYKERNELS_X86 1
#else
#define PYKERNELS_X86 0
#endif

#pragma GCC diagnostic ignored "-Wpsabi"

namespace pykernels {
namespace dwconv_ln {
namespace {

#define PK_INLINE inline __attribute__((always_inline))

constexpr int64_t kChannelPad = 16;     // Cp: channels rounded up to a multiple of this (any vector width divides it)
constexpr int64_t kTargetUnits = 32;    // bands are cut so that B * bands reaches about this many units
constexpr int64_t kMaxTasks = 64;       // at most this many backward partial-sum buffers
constexpr int64_t kTransposeBlock = 8;  // channels transposed together when reading / writing NCHW rows

// ---- element conversion (one contiguous run; float16 / bfloat16 runs from half_convert.h) ---------------------
template <typename T>
void copy_run_in(const void* src, T* __restrict__ dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(T));
}
template <typename T>
void copy_run_out(const T* __restrict__ src, void* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(T));
}

// Converts contiguous runs of a tensor's dtype to / from the compute dtype acc_t.
template <typename acc_t>
struct Converter {
  void (*in)(const void* src, acc_t* dst, int64_t n) = nullptr;
  void (*out)(const acc_t* src, void* dst, int64_t n) = nullptr;
  int64_t elem_size = 0;
};

template <typename acc_t>
Converter<acc_t> converter_for(at::ScalarType t) {
  Converter<acc_t> c;
  if constexpr (std::is_same_v<acc_t, double>) {
    TORCH_CHECK(t == at::kDouble, "dwconv_ln (CPU): float64 compute needs float64 tensors, got ", t);
    c.in = &copy_run_in<double>;
    c.out = &copy_run_out<double>;
    c.elem_size = 8;
  } else {
    switch (t) {
      case at::kFloat:
        c.in = &copy_run_in<float>;
        c.out = &copy_run_out<float>;
        c.elem_size = 4;
        break;
      case at::kHalf:
        c.in = cpu::half_runs().to_float;
        c.out = cpu::half_runs().from_float;
        c.elem_size = 2;
        break;
      case at::kBFloat16:
        c.in = &cpu::bfloat16_to_float_run;
        c.out = &cpu::float_to_bfloat16_run;
        c.elem_size = 2;
        break;
      default:
        TORCH_CHECK(false, "dwconv_ln (CPU): unexpected dtype ", t);
    }
  }
  return c;
}

inline const char* byte_ptr(const void* p, int64_t elems, int64_t elem_size) {
  return static_cast<const char*>(p) + elems * elem_size;
}
inline char* byte_ptr(void* p, int64_t elems, int64_t elem_size) { return static_cast<char*>(p) + elems * elem_size; }

// ---- problem description -----------------------------------------------------------------------------------------
template <typename acc_t>
struct Problem {
  Geometry geo;
  int64_t cp = 0;          // channel stride of every scratch tile (C rounded up to kChannelPad)
  int64_t bands = 1;       // row bands per image
  int64_t units = 0;       // B * bands
  float eps = 0;
  double eps_d = 0;
  Converter<acc_t> x_io;   // x and grad_x
  Converter<acc_t> out_io; // out / grad_out
  const void* x = nullptr;
  // Parameter tables in acc_t, [K*K][cp] and [cp], zero in the padding channels.
  std::vector<acc_t> weight;       // weight[(i*K + j)*cp + c]
  std::vector<acc_t> weight_flip;  // weight[K-1-i][K-1-j] (backward: grad_x is the conv of dy with it)
  std::vector<acc_t> conv_bias;    // 0 when absent
  std::vector<acc_t> ln_weight;    // 1 when absent (0 in the padding channels)
  std::vector<acc_t> ln_bias;      // 0 when absent
  std::vector<acc_t> mask;         // 1 for c < C, 0 in the padding channels

  int64_t band_begin(int64_t band) const { return geo.height * band / bands; }
};

template <typename acc_t>
void fill_problem(Problem<acc_t>& pb, const Geometry& geo, const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& conv_bias, const c10::optional<at::Tensor>& ln_weight,
                  const c10::optional<at::Tensor>& ln_bias, double eps, at::ScalarType io_type, bool need_flip) {
  pb.geo = geo;
  const int64_t C = geo.channels, K = geo.kernel, KK = K * K;
  pb.cp = (C + kChannelPad - 1) / kChannelPad * kChannelPad;
  // Bands: a function of the shape only (the backward's reduction order depends on it). At least K rows per band
  // keeps the halo (rows recomputed by two bands) small.
  const int64_t want = (kTargetUnits + geo.batch - 1) / std::max<int64_t>(1, geo.batch);
  pb.bands = std::max<int64_t>(1, std::min(want, geo.height / std::max<int64_t>(K, 4)));
  pb.units = geo.batch * pb.bands;
  pb.eps = static_cast<float>(eps);
  pb.eps_d = eps;
  pb.x_io = converter_for<acc_t>(x.scalar_type());
  pb.out_io = converter_for<acc_t>(io_type);
  pb.x = x.const_data_ptr();

  const at::ScalarType acc_type = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  const at::Tensor w = weight.reshape({C, KK}).to(acc_type).contiguous();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  pb.weight.assign(KK * pb.cp, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < KK; ++t) pb.weight[t * pb.cp + c] = wp[c * KK + t];
  }
  if (need_flip) {  // backward only
    pb.weight_flip.assign(KK * pb.cp, acc_t(0));
    for (int64_t t = 0; t < KK; ++t) {
      std::copy(pb.weight.begin() + t * pb.cp, pb.weight.begin() + (t + 1) * pb.cp,
                pb.weight_flip.begin() + (KK - 1 - t) * pb.cp);
    }
  }
  auto vec_param = [&](const c10::optional<at::Tensor>& p, acc_t absent) {
    std::vector<acc_t> v(pb.cp, acc_t(0));
    if (p.has_value()) {
      const at::Tensor t = p->to(acc_type).contiguous();
      std::copy(t.const_data_ptr<acc_t>(), t.const_data_ptr<acc_t>() + C, v.begin());
    } else {
      std::fill(v.begin(), v.begin() + C, absent);
    }
    return v;
  };
  pb.conv_bias = vec_param(conv_bias, acc_t(0));
  pb.ln_weight = vec_param(ln_weight, acc_t(1));
  pb.ln_bias = vec_param(ln_bias, acc_t(0));
  pb.mask.assign(pb.cp, acc_t(0));
  std::fill(pb.mask.begin(), pb.mask.begin() + C, acc_t(1));
}

// ---- row I/O -----------------------------------------------------------------------------------------------------
// dst[w * ds + k] = src[k * ss + w] for k < nk, w < nw. 8 x 8 float blocks go through registers (unpack / shuffle /
// 128-bit permute: 24 shuffles per 64 elements), the rest element by element.
typedef float v8sf __attribute__((vector_size(32)));
typedef int v8si __attribute__((vector_size(32)));

PK_INLINE void transpose8x8(const float* __restrict__ src, int64_t ss, float* __restrict__ dst, int64_t ds) {
  v8sf r[8], t[8], u[8];
  for (int k = 0; k < 8; ++k) std::memcpy(&r[k], src + k * ss, 32);
  for (int k = 0; k < 8; k += 2) {
    t[k] = __builtin_shuffle(r[k], r[k + 1], v8si{0, 8, 1, 9, 4, 12, 5, 13});
    t[k + 1] = __builtin_shuffle(r[k], r[k + 1], v8si{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int k = 0; k < 8; k += 4) {
    u[k] = __builtin_shuffle(t[k], t[k + 2], v8si{0, 1, 8, 9, 4, 5, 12, 13});
    u[k + 1] = __builtin_shuffle(t[k], t[k + 2], v8si{2, 3, 10, 11, 6, 7, 14, 15});
    u[k + 2] = __builtin_shuffle(t[k + 1], t[k + 3], v8si{0, 1, 8, 9, 4, 5, 12, 13});
    u[k + 3] = __builtin_shuffle(t[k + 1], t[k + 3], v8si{2, 3, 10, 11, 6, 7, 14, 15});
  }
  // u[q] holds columns q (low half) and q + 4 (high half) of rows 0..3; u[q + 4] the same of rows 4..7.
  for (int q = 0; q < 4; ++q) {
    const v8sf lo = __builtin_shuffle(u[q], u[q + 4], v8si{0, 1, 2, 3, 8, 9, 10, 11});
    const v8sf hi = __builtin_shuffle(u[q], u[q + 4], v8si{4, 5, 6, 7, 12, 13, 14, 15});
    std::memcpy(dst + q * ds, &lo, 32);
    std::memcpy(dst + (q + 4) * ds, &hi, 32);
  }
}

template <typename acc_t>
PK_INLINE void transpose(const acc_t* __restrict__ src, int64_t ss, acc_t* __restrict__ dst, int64_t ds, int64_t nk,
                         int64_t nw) {
  int64_t k0 = 0;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (nw >= 8 && nk >= 8) {
      // Partial blocks at the ends are done as full blocks overlapping the previous one (a copy: idempotent).
      for (;; k0 += 8) {
        const int64_t kb = std::min(k0, nk - 8);
        for (int64_t w0 = 0;; w0 += 8) {
          const int64_t wb = std::min(w0, nw - 8);
          transpose8x8(src + kb * ss + wb, ss, dst + wb * ds + kb, ds);
          if (wb + 8 >= nw) break;
        }
        if (kb + 8 >= nk) break;
      }
      return;
    }
  }
  for (; k0 < nk; k0 += kTransposeBlock) {
    const int64_t n = std::min(kTransposeBlock, nk - k0);
    for (int64_t w = 0; w < nw; ++w) {
      for (int64_t k = k0; k < k0 + n; ++k) dst[w * ds + k] = src[k * ss + w];
    }
  }
}

// Reads x[b, :, h, :] into dst[(w + pad) * cp + c] (w < W, c < C; nothing else is written).
template <typename acc_t>
PK_INLINE void load_x_row(const Problem<acc_t>& pb, int64_t b, int64_t h, acc_t* __restrict__ dst,
                          acc_t* __restrict__ tmp) {
  const Geometry& g = pb.geo;
  const int64_t C = g.channels, W = g.width, cp = pb.cp, es = pb.x_io.elem_size;
  const void* base = byte_ptr(pb.x, b * g.x_stride_b + h * g.x_stride_h, es);
  acc_t* row = dst + g.pad * cp;
  if (g.channels_last) {
    for (int64_t w = 0; w < W; ++w) pb.x_io.in(byte_ptr(base, w * C, es), row + w * cp, C);
    return;
  }
  if (es == int64_t(sizeof(acc_t))) {  // x is in the compute dtype: transpose straight from x
    transpose(static_cast<const acc_t*>(base), g.x_stride_c, row, cp, C, W);
    return;
  }
  for (int64_t c0 = 0; c0 < C; c0 += kTransposeBlock) {
    const int64_t nc = std::min(kTransposeBlock, C - c0);
    for (int64_t cc = 0; cc < nc; ++cc) pb.x_io.in(byte_ptr(base, (c0 + cc) * g.x_stride_c, es), tmp + cc * W, W);
    transpose(tmp, W, row + c0, cp, nc, W);
  }
}

// Writes src[w * cp + c] (w < W, c < C) to grad_x[b, :, h, :] (x's layout and dtype).
template <typename acc_t>
PK_INLINE void store_x_row(const Problem<acc_t>& pb, void* grad_x, int64_t b, int64_t h, const acc_t* __restrict__ src,
                           acc_t* __restrict__ tmp) {
  const Geometry& g = pb.geo;
  const int64_t C = g.channels, W = g.width, cp = pb.cp, es = pb.x_io.elem_size;
  void* base = byte_ptr(grad_x, b * g.x_stride_b + h * g.x_stride_h, es);
  if (g.channels_last) {
    for (int64_t w = 0; w < W; ++w) pb.x_io.out(src + w * cp, byte_ptr(base, w * C, es), C);
    return;
  }
  if (es == int64_t(sizeof(acc_t))) {
    transpose(src, cp, static_cast<acc_t*>(base), g.x_stride_c, W, C);
    return;
  }
  for (int64_t c0 = 0; c0 < C; c0 += kTransposeBlock) {
    const int64_t nc = std::min(kTransposeBlock, C - c0);
    transpose(src + c0, cp, tmp, W, W, nc);
    for (int64_t cc = 0; cc < nc; ++cc) pb.x_io.out(tmp + cc * W, byte_ptr(base, (c0 + cc) * g.x_stride_c, es), W);
  }
}

// ---- vector kernels (always inlined into the per-ISA entry points) -----------------------------------------------
// VW: vector width in bytes (32: AVX2 or the baseline ISA, 64: AVX-512). Channel c is lane c % L of a vector, so
// per-channel arithmetic is the same at any width. Reductions over channels use a logical 16-lane accumulator
// (16 / L vectors) summed in a fixed tree, so they too give the same bits at any width.
template <typename acc_t, int VW>
struct VecOf;
template <>
struct VecOf<float, 32> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t index __attribute__((vector_size(32)));
};
template <>
struct VecOf<double, 32> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t index __attribute__((vector_size(32)));
};
template <>
struct VecOf<float, 64> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t index __attribute__((vector_size(64)));
};
template <>
struct VecOf<double, 64> {
  typedef double type __attribute__((vector_size(64)));
  typedef int64_t index __attribute__((vector_size(64)));
};

template <typename acc_t, int VW>
struct VT {
  using V = typename VecOf<acc_t, VW>::type;
  static constexpr int64_t L = VW / sizeof(acc_t);  // lanes
  static constexpr int64_t NV = kChannelPad / L;    // vectors per 16-channel group
  using IV = typename VecOf<acc_t, VW>::index;

  static PK_INLINE V load(const acc_t* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static PK_INLINE void store(acc_t* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  static PK_INLINE V splat(acc_t s) {
    V v;
    for (int64_t l = 0; l < L; ++l) v[l] = s;
    return v;
  }
  // Sum of a logical 16-lane accumulator held as NV vectors: tree over 16 lanes (l + 8, l + 4, l + 2, l + 1).
  static PK_INLINE acc_t sum16(const V* acc) {
    V part[NV];
    for (int64_t k = 0; k < NV; ++k) part[k] = acc[k];
    for (int64_t width = NV / 2; width > 0; width /= 2) {
      for (int64_t k = 0; k < width; ++k) part[k] = part[k] + part[k + width];
    }
    V v = part[0];
    // Lane l += lane l + width, in registers (lanes >= width become don't-care).
    if constexpr (L == 16) v = v + __builtin_shuffle(v, IV{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    if constexpr (L >= 8) {
      if constexpr (L == 16) {
        v = v + __builtin_shuffle(v, IV{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
        v = v + __builtin_shuffle(v, IV{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
        v = v + __builtin_shuffle(v, IV{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
      } else {
        v = v + __builtin_shuffle(v, IV{4, 5, 6, 7, 0, 1, 2, 3});
        v = v + __builtin_shuffle(v, IV{2, 3, 0, 1, 6, 7, 4, 5});
        v = v + __builtin_shuffle(v, IV{1, 0, 3, 2, 5, 4, 7, 6});
      }
    } else {
      v = v + __builtin_shuffle(v, IV{2, 3, 0, 1});
      v = v + __builtin_shuffle(v, IV{1, 0, 3, 2});
    }
    return v[0];
  }
};

// sum_c f(c) over the cp channels of a pixel, f(c) giving the vector of channels [c, c + L). Deterministic and the
// same at any vector width: 16-channel group g goes to logical 16-lane accumulator g % 4 (four independent chains),
// the four are added as (0 + 1) + (2 + 3), then the 16 lanes in a fixed tree.
template <typename acc_t, int VW, typename F>
PK_INLINE acc_t reduce_channels(int64_t cp, const F& f) {
  using T = VT<acc_t, VW>;
  using V = typename T::V;
  V s0[T::NV], s1[T::NV], s2[T::NV], s3[T::NV];
  for (int64_t k = 0; k < T::NV; ++k) s0[k] = s1[k] = s2[k] = s3[k] = T::splat(0);
  int64_t c0 = 0;
  for (; c0 + 4 * kChannelPad <= cp; c0 += 4 * kChannelPad) {
    for (int64_t k = 0; k < T::NV; ++k) {
      s0[k] = s0[k] + f(c0 + k * T::L);
      s1[k] = s1[k] + f(c0 + kChannelPad + k * T::L);
      s2[k] = s2[k] + f(c0 + 2 * kChannelPad + k * T::L);
      s3[k] = s3[k] + f(c0 + 3 * kChannelPad + k * T::L);
    }
  }
  if (c0 < cp) {
    for (int64_t k = 0; k < T::NV; ++k) s0[k] = s0[k] + f(c0 + k * T::L);
    c0 += kChannelPad;
  }
  if (c0 < cp) {
    for (int64_t k = 0; k < T::NV; ++k) s1[k] = s1[k] + f(c0 + k * T::L);
    c0 += kChannelPad;
  }
  if (c0 < cp) {
    for (int64_t k = 0; k < T::NV; ++k) s2[k] = s2[k] + f(c0 + k * T::L);
  }
  for (int64_t k = 0; k < T::NV; ++k) s0[k] = (s0[k] + s1[k]) + (s2[k] + s3[k]);
  return T::sum16(s0);
}

// Output pixels per register block: 7 independent accumulator chains hide the add latency, 7 + K vector registers
// (the weights of a kernel row stay in registers up to K = 7 with AVX2), and 7 divides every ConvNeXt stage width.
constexpr int kPixelBlock = 7;
constexpr int64_t kConvChunk = 32;  // channels per forward conv pass (a multiple of kChannelPad)

// out[w * cp + c] = sum_{i, j} rows[i][(w + j) * cp + c] * weight[(i * K + j) * cp + c] + bias[c] for w < wr (a
// multiple of kPixelBlock), c < cp; rows[i] == nullptr is a zero row. Terms are added in (i, j) row-major order, then
// the bias.
template <int K, typename acc_t, int VW>
PK_INLINE void conv_row(const acc_t* const* rows, const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                        acc_t* __restrict__ out, int64_t wr, int64_t cp, int64_t c_begin = 0, int64_t c_end = -1) {
  using T = VT<acc_t, VW>;
  using V = typename T::V;
  constexpr int P = kPixelBlock;
  if (c_end < 0) c_end = cp;
  for (int64_t w0 = 0; w0 < wr; w0 += P) {
    for (int64_t c0 = c_begin; c0 < c_end; c0 += T::L) {
      V acc[P];
      for (int p = 0; p < P; ++p) acc[p] = T::splat(0);
      for (int i = 0; i < K; ++i) {
        const acc_t* row = rows[i];
        if (row == nullptr) continue;
        V wv[K];
        for (int j = 0; j < K; ++j) wv[j] = T::load(weight + (i * K + j) * cp + c0);
        const acc_t* xr = row + w0 * cp + c0;
#pragma GCC unroll 32
        for (int t = 0; t < P + K - 1; ++t) {
          const V xv = T::load(xr + t * cp);
#pragma GCC unroll 16
          for (int p = 0; p < P; ++p) {
            const int j = t - p;
            if (j >= 0 && j < K) acc[p] = acc[p] + xv * wv[j];
          }
        }
      }
      const V bv = T::load(bias + c0);
      for (int p = 0; p < P; ++p) T::store(out + (w0 + p) * cp + c0, acc[p] + bv);
    }
  }
}

// LayerNorm of one pixel y[0, cp) (the padding channels of y are 0 on entry); writes mean and rstd. Mean first, then
// the variance of the centred values. The result goes to `direct` (C values) when it is non-null (the output is in
// the compute dtype), else back into y.
template <typename acc_t, int VW>
PK_INLINE void layer_norm_pixel(acc_t* __restrict__ y, acc_t* __restrict__ direct, const Problem<acc_t>& pb, acc_t eps,
                                acc_t& mean_out, acc_t& rstd_out) {
  using T = VT<acc_t, VW>;
  using V = typename T::V;
  const int64_t cp = pb.cp, C = pb.geo.channels;
  const int64_t cfull = C / kChannelPad * kChannelPad;  // groups without padding channels
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  const acc_t mean = reduce_channels<acc_t, VW>(cp, [&](int64_t c) { return T::load(y + c); }) * inv_c;
  const V mv = T::splat(mean);
  const acc_t* mask = pb.mask.data();
  const acc_t var = reduce_channels<acc_t, VW>(cp, [&](int64_t c) {
                      V d = T::load(y + c) - mv;
                      if (c + T::L > cfull) d = d * T::load(mask + c);  // the group with padding channels
                      return d * d;
                    }) *
                    inv_c;
  const acc_t rstd = acc_t(1) / std::sqrt(var + eps);
  const V rv = T::splat(rstd);
  const acc_t* lw = pb.ln_weight.data();
  const acc_t* lb = pb.ln_bias.data();
  if (direct != nullptr) {
    int64_t c = 0;
    for (; c + T::L <= C; c += T::L) {
      T::store(direct + c, ((T::load(y + c) - mv) * rv) * T::load(lw + c) + T::load(lb + c));
    }
    for (; c < C; ++c) direct[c] = ((y[c] - mean) * rstd) * lw[c] + lb[c];
  } else {
    for (int64_t c = 0; c < cp; c += T::L) {
      T::store(y + c, ((T::load(y + c) - mv) * rv) * T::load(lw + c) + T::load(lb + c));
    }
  }
  mean_out = mean;
  rstd_out = rstd;
}

template <typename acc_t>
acc_t eps_of(const Problem<acc_t>& pb) {
  if constexpr (std::is_same_v<acc_t, double>) {
    return pb.eps_d;
  } else {
    return pb.eps;
  }
}

// Scratch of one worker (reused across its units).
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> x_ring;    // K rows of [wpad][cp]
  std::vector<acc_t> dy_ring;   // K rows of [wpad][cp] (backward with grad_x)
  std::vector<acc_t> y;         // [wr][cp]
  std::vector<acc_t> g;         // [W][cp] grad_out row (backward)
  std::vector<acc_t> tmp;       // transpose staging, kTransposeBlock * W
  std::vector<acc_t> zeros;     // cp zeros (the bias of the grad_x conv)
  std::vector<acc_t> row_sums;  // (K*K + 3) * cp: per-row parameter-gradient sums (backward)
};

struct Dims {
  int64_t W, wr, wpad, cp, row_elems;
  Dims(const Geometry& geo, int64_t channel_pad_stride) {
    W = geo.width;
    wr = (W + kPixelBlock - 1) / kPixelBlock * kPixelBlock;
    wpad = wr + geo.kernel - 1;
    cp = channel_pad_stride;
    row_elems = wpad * cp;
  }
};

// ---- ISA selection -----------------------------------------------------------------------------------------------
enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest the CPU supports; PYKERNELS_CPU_ISA=baseline|avx2|avx512 caps it (tests compare the paths).
Isa pick_isa() {
  static const Isa isa = [] {
    Isa best = Isa::kBaseline;
#if PYKERNELS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) best = Isa::kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx2")) best = Isa::kAvx512;
#endif
    const char* cap = std::getenv("PYKERNELS_CPU_ISA");
    if (cap != nullptr) {
      if (std::strcmp(cap, "baseline") == 0) best = Isa::kBaseline;
      if (std::strcmp(cap, "avx2") == 0 && best == Isa::kAvx512) best = Isa::kAvx2;
    }
    return best;
  }();
  return isa;
}

// Rows per forward sub-band: about kSubBandElems elements of x rows (with halo) + conv output, at least 1.
constexpr int64_t kSubBandElems = int64_t(192) << 10;
inline int64_t fwd_sub_rows(const Dims& d, int64_t K, int64_t rows) {
  const int64_t fit = (kSubBandElems - (K - 1) * d.row_elems) / (d.row_elems + d.wr * d.cp);
  return std::max<int64_t>(1, std::min(rows, fit));
}

// ---- forward -----------------------------------------------------------------------------------------------------
template <int K, typename acc_t, int VW>
PK_INLINE void fwd_unit_impl(const Problem<acc_t>& pb, int64_t unit, Scratch<acc_t>& s, void* out, acc_t* mean,
                             acc_t* rstd) {
  const Geometry& g = pb.geo;
  const Dims d(g, pb.cp);
  const int64_t H = g.height, W = g.width, C = g.channels, r = K / 2;
  const int64_t b = unit / pb.bands, band = unit % pb.bands;
  const int64_t h0 = pb.band_begin(band), h1 = pb.band_begin(band + 1);
  if (h0 >= h1) return;
  // Sub-bands of `sub` rows: their x rows (with the K - 1 halo rows) are loaded into s.x_ring, then the conv runs
  // chunk of kConvChunk channels by chunk over all rows of the sub-band (a chunk's weights and input columns stay
  // in L1), into s.y ([sub][wr][cp]); then the LayerNorm of every pixel. Padding columns / channels of s.x_ring are
  // zero from the worker's allocation and never written; rows are loaded before they are read.
  const int64_t sub = fwd_sub_rows(d, K, h1 - h0);
  const acc_t eps = eps_of(pb);
  const int64_t oes = pb.out_io.elem_size;
  for (int64_t hs = h0; hs < h1; hs += sub) {
    const int64_t he = std::min(h1, hs + sub);
    auto x_row = [&](int64_t h) { return s.x_ring.data() + (h - hs + r) * d.row_elems; };
    for (int64_t h = std::max<int64_t>(0, hs - r); h < std::min(H, he + r); ++h) {
      load_x_row(pb, b, h, x_row(h), s.tmp.data());
    }
    for (int64_t c0 = 0; c0 < d.cp; c0 += kConvChunk) {
      for (int64_t h = hs; h < he; ++h) {
        const acc_t* rows[K];
        for (int i = 0; i < K; ++i) {
          const int64_t hi = h + i - r;
          rows[i] = (hi >= 0 && hi < H) ? x_row(hi) : nullptr;
        }
        conv_row<K, acc_t, VW>(rows, pb.weight.data(), pb.conv_bias.data(), s.y.data() + (h - hs) * d.wr * d.cp,
                               d.wr, d.cp, c0, std::min(d.cp, c0 + kConvChunk));
      }
    }
    for (int64_t h = hs; h < he; ++h) {
      const int64_t pix0 = (b * H + h) * W;
      for (int64_t w = 0; w < W; ++w) {
        acc_t* yp = s.y.data() + ((h - hs) * d.wr + w) * d.cp;
        if (oes == int64_t(sizeof(acc_t))) {  // output in the compute dtype: written directly
          layer_norm_pixel<acc_t, VW>(yp, static_cast<acc_t*>(out) + (pix0 + w) * C, pb, eps, mean[pix0 + w],
                                      rstd[pix0 + w]);
        } else {
          layer_norm_pixel<acc_t, VW>(yp, nullptr, pb, eps, mean[pix0 + w], rstd[pix0 + w]);
          pb.out_io.out(yp, byte_ptr(out, (pix0 + w) * C, oes), C);
        }
      }
    }
  }
}

template <int K, typename acc_t>
void fwd_unit_baseline(const Problem<acc_t>& pb, int64_t unit, Scratch<acc_t>& s, void* out, acc_t* mean,
                       acc_t* rstd) {
  fwd_unit_impl<K, acc_t, 32>(pb, unit, s, out, mean, rstd);
}

#if PYKERNELS_X86
template <int K, typename acc_t>
__attribute__((target("avx2"))) void fwd_unit_avx2(const Problem<acc_t>& pb, int64_t unit, Scratch<acc_t>& s,
                                                   void* out, acc_t* mean, acc_t* rstd) {
  fwd_unit_impl<K, acc_t, 32>(pb, unit, s, out, mean, rstd);
}
template <int K, typename acc_t>
__attribute__((target("avx2,avx512f"))) void fwd_unit_avx512(const Problem<acc_t>& pb, int64_t unit,
                                                             Scratch<acc_t>& s, void* out, acc_t* mean, acc_t* rstd) {
  fwd_unit_impl<K, acc_t, 64>(pb, unit, s, out, mean, rstd);
}
#endif

template <int K, typename acc_t>
void fwd_run(const Problem<acc_t>& pb, void* out, acc_t* mean, acc_t* rstd) {
  auto unit_fn = &fwd_unit_baseline<K, acc_t>;
#if PYKERNELS_X86
  if (pick_isa() == Isa::kAvx2) unit_fn = &fwd_unit_avx2<K, acc_t>;
  if (pick_isa() == Isa::kAvx512) unit_fn = &fwd_unit_avx512<K, acc_t>;
#endif
  const Dims d(pb.geo, pb.cp);
  const int64_t sub = fwd_sub_rows(d, K, pb.geo.height);
  at::parallel_for(0, pb.units, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s;
    s.x_ring.assign((sub + K - 1) * d.row_elems, acc_t(0));
    s.y.assign(sub * d.wr * d.cp, acc_t(0));
    s.tmp.resize(kTransposeBlock * d.W);
    for (int64_t unit = begin; unit < end; ++unit) unit_fn(pb, unit, s, out, mean, rstd);
  });
}

// ---- backward ----------------------------------------------------------------------------------------------------
template <typename acc_t>
struct BwdArgs {
  const void* grad_out = nullptr;
  const acc_t* mean = nullptr;
  const acc_t* rstd = nullptr;
  void* grad_x = nullptr;  // null when not needed
  bool params = false;     // parameter gradients needed
};

// Adds this unit's parameter-gradient sums to `partial` (float64): [K*K][cp] grad_weight, then grad_conv_bias,
// grad_ln_weight, grad_ln_bias ([cp] each); writes grad_x rows of the band.
template <int K, typename acc_t, int VW>
PK_INLINE void bwd_unit_impl(const Problem<acc_t>& pb, const BwdArgs<acc_t>& a, int64_t unit, Scratch<acc_t>& s,
                             double* __restrict__ partial) {
  using T = VT<acc_t, VW>;
  using V = typename T::V;
  constexpr int64_t L = T::L;
  constexpr int64_t KK = K * K;
  const Geometry& g = pb.geo;
  const Dims d(g, pb.cp);
  const int64_t H = g.height, W = g.width, C = g.channels, r = K / 2, cp = d.cp;
  const int64_t b = unit / pb.bands, band = unit % pb.bands;
  const int64_t h0 = pb.band_begin(band), h1 = pb.band_begin(band + 1);
  if (h0 >= h1) return;
  const bool need_dx = a.grad_x != nullptr;
  // dy rows computed: the band, plus r rows of halo on each side when grad_x is needed.
  const int64_t d0 = need_dx ? std::max<int64_t>(0, h0 - r) : h0;
  const int64_t d1 = need_dx ? std::min(H, h1 + r) : h1;
  // Ring padding (columns, channels) is zero from the worker's allocation and never written; a row is written
  // before it is read (x rows: loaded; dy rows: every row in [d0, d1) is computed before grad_x reads it).
  auto x_row = [&](int64_t h) { return s.x_ring.data() + (h % K) * d.row_elems; };
  auto dy_row = [&](int64_t h) { return s.dy_ring.data() + (h % K) * d.row_elems; };
  for (int64_t h = std::max<int64_t>(0, d0 - r); h < std::min(H, d0 + r); ++h) {
    load_x_row(pb, b, h, x_row(h), s.tmp.data());
  }
  const int64_t oes = pb.out_io.elem_size;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(C);
  const acc_t* lw = pb.ln_weight.data();
  const acc_t* mask = pb.mask.data();
  acc_t* rs_w = s.row_sums.data();  // [KK][cp]
  acc_t* rs_cb = rs_w + KK * cp;    // [cp]
  acc_t* rs_lw = rs_cb + cp;        // [cp]
  acc_t* rs_lb = rs_lw + cp;        // [cp]
  auto emit_grad_x = [&](int64_t hx) {
    const acc_t* rows[K];
    for (int i = 0; i < K; ++i) {
      const int64_t hi = hx + i - r;
      rows[i] = (hi >= 0 && hi < H) ? dy_row(hi) : nullptr;
    }
    // s.y is free here (dy of its row is in the ring).
    conv_row<K, acc_t, VW>(rows, pb.weight_flip.data(), s.zeros.data(), s.y.data(), d.wr, cp);
    store_x_row(pb, a.grad_x, b, hx, s.y.data(), s.tmp.data());
  };
  for (int64_t h = d0; h < d1; ++h) {
    if (h + r < H) load_x_row(pb, b, h + r, x_row(h + r), s.tmp.data());
    const acc_t* rows[K];
    for (int i = 0; i < K; ++i) {
      const int64_t hi = h + i - r;
      rows[i] = (hi >= 0 && hi < H) ? x_row(hi) : nullptr;
    }
    conv_row<K, acc_t, VW>(rows, pb.weight.data(), pb.conv_bias.data(), s.y.data(), d.wr, cp);
    const int64_t pix0 = (b * H + h) * W;
    for (int64_t w = 0; w < W; ++w) {
      pb.out_io.in(byte_ptr(a.grad_out, (pix0 + w) * C, oes), s.g.data() + w * cp, C);
    }
    const bool sums = a.params && h >= h0 && h < h1;
    if (sums) std::fill(s.row_sums.begin() + KK * cp, s.row_sums.end(), acc_t(0));
    acc_t* dyr = need_dx ? dy_row(h) + r * cp : s.y.data();  // dy of pixel w at dyr + w * cp
    for (int64_t w = 0; w < W; ++w) {
      const V mv = T::splat(a.mean[pix0 + w]), rv = T::splat(a.rstd[pix0 + w]);
      const acc_t* yp = s.y.data() + w * cp;
      const acc_t* gp = s.g.data() + w * cp;
      const acc_t a_mean = reduce_channels<acc_t, VW>(cp, [&](int64_t c) {
        return T::load(gp + c) * T::load(lw + c);
      });
      const acc_t m2_mean = reduce_channels<acc_t, VW>(cp, [&](int64_t c) {
        const V xhat = (T::load(yp + c) - mv) * rv;
        return (T::load(gp + c) * T::load(lw + c)) * xhat;
      });
      const V av = T::splat(a_mean * inv_c);
      const V m2 = T::splat(m2_mean * inv_c);
      acc_t* dp = dyr + w * cp;
      for (int64_t c = 0; c < cp; c += L) {
        const V xhat = (T::load(yp + c) - mv) * rv;
        const V gv = T::load(gp + c);
        const V gw = gv * T::load(lw + c);
        const V dy = (rv * ((gw - av) - xhat * m2)) * T::load(mask + c);
        if (sums) {
          T::store(rs_cb + c, T::load(rs_cb + c) + dy);
          T::store(rs_lw + c, T::load(rs_lw + c) + gv * xhat);
          T::store(rs_lb + c, T::load(rs_lb + c) + gv);
        }
        T::store(dp + c, dy);  // over y[w] when !need_dx: y[w] is not read again
      }
    }
    if (sums) {
      // grad_weight[i][j] += sum_w dy[w] * x(h + i - r)[w + j - r]  (x rows are padded: column w + j).
      for (int i = 0; i < K; ++i) {
        const acc_t* xr = rows[i];
        if (xr == nullptr) {
          std::fill(rs_w + i * K * cp, rs_w + (i + 1) * K * cp, acc_t(0));
          continue;
        }
        for (int64_t c0 = 0; c0 < cp; c0 += L) {
          V acc[K];
          for (int j = 0; j < K; ++j) acc[j] = T::splat(0);
          for (int64_t w = 0; w < W; ++w) {
            const V dv = T::load(dyr + w * cp + c0);
            const acc_t* xp = xr + w * cp + c0;
#pragma GCC unroll 16
            for (int j = 0; j < K; ++j) acc[j] = acc[j] + dv * T::load(xp + j * cp);
          }
          for (int j = 0; j < K; ++j) T::store(rs_w + (i * K + j) * cp + c0, acc[j]);
        }
      }
      const int64_t total = (KK + 3) * cp;
      const acc_t* rs = s.row_sums.data();
      for (int64_t t = 0; t < total; ++t) partial[t] += static_cast<double>(rs[t]);
    }
    if (need_dx) {
      const int64_t hx = h - r;
      if (hx >= h0 && hx < h1) emit_grad_x(hx);
    }
  }
  if (need_dx) {
    for (int64_t hx = std::max(h0, d1 - r); hx < h1; ++hx) emit_grad_x(hx);
  }
}

template <int K, typename acc_t>
void bwd_unit_baseline(const Problem<acc_t>& pb, const BwdArgs<acc_t>& a, int64_t unit, Scratch<acc_t>& s,
                       double* partial) {
  bwd_unit_impl<K, acc_t, 32>(pb, a, unit, s, partial);
}

#if PYKERNELS_X86
template <int K, typename acc_t>
__attribute__((target("avx2"))) void bwd_unit_avx2(const Problem<acc_t>& pb, const BwdArgs<acc_t>& a, int64_t unit,
                                                   Scratch<acc_t>& s, double* partial) {
  bwd_unit_impl<K, acc_t, 32>(pb, a, unit, s, partial);
}
template <int K, typename acc_t>
__attribute__((target("avx2,avx512f"))) void bwd_unit_avx512(const Problem<acc_t>& pb, const BwdArgs<acc_t>& a,
                                                             int64_t unit, Scratch<acc_t>& s, double* partial) {
  bwd_unit_impl<K, acc_t, 64>(pb, a, unit, s, partial);
}
#endif

// Returns the task partial sums added in task order: (K*K + 3) * cp float64 values (see bwd_unit_impl).
template <int K, typename acc_t>
std::vector<double> bwd_run(const Problem<acc_t>& pb, const BwdArgs<acc_t>& a) {
  auto unit_fn = &bwd_unit_baseline<K, acc_t>;
#if PYKERNELS_X86
  if (pick_isa() == Isa::kAvx2) unit_fn = &bwd_unit_avx2<K, acc_t>;
  if (pick_isa() == Isa::kAvx512) unit_fn = &bwd_unit_avx512<K, acc_t>;
#endif
  const Dims d(pb.geo, pb.cp);
  const int64_t partial_size = (K * K + 3) * d.cp;
  // Fixed split of the units into tasks (shape only), at most kMaxTasks and at most ~64 MiB of partial sums.
  const int64_t mem_cap = std::max<int64_t>(1, (int64_t(64) << 20) / (partial_size * int64_t(sizeof(double))));
  const int64_t tasks = std::max<int64_t>(1, std::min({pb.units, kMaxTasks, mem_cap}));
  std::vector<double> partials(a.params ? tasks * partial_size : 0, 0.0);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s;
    s.x_ring.assign(K * d.row_elems, acc_t(0));
    if (a.grad_x != nullptr) s.dy_ring.assign(K * d.row_elems, acc_t(0));
    s.y.assign(d.wr * d.cp, acc_t(0));
    s.g.assign(d.W * d.cp, acc_t(0));
    s.tmp.resize(kTransposeBlock * d.W);
    s.zeros.assign(d.cp, acc_t(0));
    s.row_sums.resize(partial_size);
    for (int64_t task = begin; task < end; ++task) {
      double* partial = a.params ? partials.data() + task * partial_size : nullptr;
      for (int64_t unit = pb.units * task / tasks; unit < pb.units * (task + 1) / tasks; ++unit) {
        unit_fn(pb, a, unit, s, partial);
      }
    }
  });
  std::vector<double> total(a.params ? partial_size : 0, 0.0);
  for (int64_t task = 0; a.params && task < tasks; ++task) {
    const double* p = partials.data() + task * partial_size;
    for (int64_t t = 0; t < partial_size; ++t) total[t] += p[t];
  }
  return total;
}

// ---- dispatch ----------------------------------------------------------------------------------------------------
template <typename F>
void dispatch_kernel(int64_t k, const F& f) {
  switch (k) {
    case 3: return f(std::integral_constant<int, 3>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 9: return f(std::integral_constant<int, 9>{});
    case 11: return f(std::integral_constant<int, 11>{});
    case 13: return f(std::integral_constant<int, 13>{});
    default: TORCH_CHECK(false, "dwconv_ln (CPU): unsupported kernel size ", k);
  }
}

template <typename F>
void dispatch_acc(at::ScalarType x_type, const F& f) {
  if (x_type == at::kDouble) return f(double{});
  return f(float{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_ln_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                 const c10::optional<at::Tensor>& conv_bias,
                                                                 const c10::optional<at::Tensor>& ln_weight,
                                                                 const c10::optional<at::Tensor>& ln_bias, double eps) {
  TORCH_CHECK(x.device().is_cpu(), "dwconv_ln_fwd (CPU kernel): x must be a CPU tensor, got ", x.device());
  const Geometry geo = check_fwd_args(x, weight, conv_bias, ln_weight, ln_bias, eps, /*allow_double=*/true);
  FwdOutputs o = alloc_fwd(x, geo);
  if (geo.empty()) return {o.out, o.mean, o.rstd};
  dispatch_acc(x.scalar_type(), [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    Problem<acc_t> pb;
    fill_problem(pb, geo, x, weight, conv_bias, ln_weight, ln_bias, eps, x.scalar_type(), /*need_flip=*/false);
    dispatch_kernel(geo.kernel, [&](auto k_tag) {
      fwd_run<decltype(k_tag)::value, acc_t>(pb, o.out.mutable_data_ptr(), o.mean.mutable_data_ptr<acc_t>(),
                                             o.rstd.mutable_data_ptr<acc_t>());
    });
  });
  return {o.out, o.mean, o.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_ln_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& conv_bias, const c10::optional<at::Tensor>& ln_weight,
    const c10::optional<at::Tensor>& ln_bias, const at::Tensor& mean, const at::Tensor& rstd, bool need_grad_x,
    bool need_grad_params) {
  TORCH_CHECK(x.device().is_cpu(), "dwconv_ln_bwd (CPU kernel): x must be a CPU tensor, got ", x.device());
  const Geometry geo =
      check_bwd_args(grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd, /*allow_double=*/true);
  BwdOutputs o = alloc_bwd(x, weight, conv_bias, ln_weight, ln_bias, need_grad_x, need_grad_params);
  const int64_t C = geo.channels, KK = geo.kernel * geo.kernel;
  if (geo.empty() || (!need_grad_x && !need_grad_params)) {
    if (o.want_weight) o.grad_weight.zero_();
    if (o.want_conv_bias) o.grad_conv_bias.zero_();
    if (o.want_ln_weight) o.grad_ln_weight.zero_();
    if (o.want_ln_bias) o.grad_ln_bias.zero_();
    return {o.grad_x, o.grad_weight, o.grad_conv_bias, o.grad_ln_weight, o.grad_ln_bias};
  }
  dispatch_acc(x.scalar_type(), [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    Problem<acc_t> pb;
    fill_problem(pb, geo, x, weight, conv_bias, ln_weight, ln_bias, 0.0, grad_out.scalar_type(), /*need_flip=*/true);
    const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
    BwdArgs<acc_t> a;
    a.grad_out = grad_out.const_data_ptr();
    a.mean = mean_c.const_data_ptr<acc_t>();
    a.rstd = rstd_c.const_data_ptr<acc_t>();
    a.grad_x = need_grad_x ? o.grad_x.mutable_data_ptr() : nullptr;
    a.params = need_grad_params;
    std::vector<double> total;
    dispatch_kernel(geo.kernel, [&](auto k_tag) { total = bwd_run<decltype(k_tag)::value, acc_t>(pb, a); });
    if (!need_grad_params) return;
    const int64_t cp = pb.cp;
    at::Tensor gw = at::empty({C, 1, geo.kernel, geo.kernel}, x.options().dtype(at::kDouble));
    double* gwp = gw.mutable_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t t = 0; t < KK; ++t) gwp[c * KK + t] = total[t * cp + c];
    }
    o.grad_weight.copy_(gw);
    auto vec_out = [&](at::Tensor& dst, int64_t slot) {
      at::Tensor v = at::empty({C}, x.options().dtype(at::kDouble));
      std::copy(total.begin() + (KK + slot) * cp, total.begin() + (KK + slot) * cp + C, v.mutable_data_ptr<double>());
      dst.copy_(v);
    };
    if (o.want_conv_bias) vec_out(o.grad_conv_bias, 0);
    if (o.want_ln_weight) vec_out(o.grad_ln_weight, 1);
    if (o.want_ln_bias) vec_out(o.grad_ln_bias, 2);
  });
  return {o.grad_x, o.grad_weight, o.grad_conv_bias, o.grad_ln_weight, o.grad_ln_bias};
}

}  // namespace
}  // namespace dwconv_ln
}  // namespace pykernels

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("dwconv_ln_fwd", &pykernels::dwconv_ln::dwconv_ln_fwd_cpu);
  m.impl("dwconv_ln_bwd", &pykernels::dwconv_ln::dwconv_ln_bwd_cpu);
}

// The depthwise stage of an MBConv block (MobileNet-V2 / V3, Sandler et al. 2018, Howard et al. 2019; EfficientNet,
// Tan & Le 2019) with the squeeze of its squeeze-excitation layer (Hu et al. 2018): the CPU kernels of
// pykernels::mbconv_se_fwd / mbconv_se_bwd (contract in csrc/ops.cpp, argument checks and output allocation in
// csrc/mbconv_se_args.h).
//
//   forward:  y0 = dwconv_k,stride(x) + conv_bias ; y = y0 * scale + shift (BatchNorm folded per channel:
//             scale = rstd * bn_weight, shift = bn_bias - mean * scale) ; out = z = act(y) ; pooled[b, c] = sum z
//   backward: y0 recomputed ; xhat = (y0 - mean) * rstd ; g = (grad_out + grad_pooled) * act'(y) ;
//             dy0 = scale * g  (running statistics)  or  scale * ((g - sum g / N) - xhat * sum(g xhat) / N)  (batch) ;
//             grad_x = transposed strided conv of dy0 ; grad_weight = correlation(x, dy0) ; grad_conv_bias = sum dy0 ;
//             grad_bn_weight = sum g xhat ; grad_bn_bias = sum g
//
// Work units are (image b, band of output rows); bands are cut by shape only. A unit walks its output rows top to
// bottom with a ring of the k input rows they read, each converted once to the compute dtype into a zero-padded,
// channels-inner row [(out_w rounded up to P - 1) * stride + k][Cp] (Cp = C rounded up to 16, column p = input
// column p - pad_l): this reads NCHW (8 x 8 register transposes) and channels-last x alike, in any dtype, with no
// full-size copy and no boundary tests in the conv. (The row copy also streams x into L2 ahead of the conv: reading
// channels-last x in place, with padded tiles at the edges, measured slower.) The conv of a row is register-blocked:
// for a vector of channels and P = 7 output pixels, the k weight vectors of a kernel row stay in registers while the
// (P - 1) * stride + k input columns stream by; the row lands in an L1-sized buffer, from which a per-activation
// epilogue runs (BatchNorm, activation, SE sums; in the backward act', g, dy0 and the per-channel sums), called per row
// through a per-ISA table (one copy per activation and ISA, not per k and stride).
//
// Passes. Eval forward: one pass (x read once, out written once). Batch-statistics forward: pass 1 writes y0 into
// out itself (float32 / float64 out; a float32 workspace for float16 / bfloat16) and the statistics of each group of
// rows (>= 64 pixels) - its mean, then the sum of squared deviations from it, two passes over the group in cache (no
// E[y^2] - E[y]^2 cancellation) - merged into the task's (count, mean, M2) with Chan et al.'s formula in float64; the
// tasks are merged in order; pass 2 normalises out in place. Backward: running statistics: one pass; batch
// statistics: pass A recomputes the conv and g for sum g and sum g xhat, pass B recomputes them again for dy0 (no
// activation-sized workspace). In pass B a unit also owns the grad_x rows from its band's first window on
// (band_begin * stride - pad_t) and computes the few dy0 rows above the band they need (halo); dy0 rows go to a second
// ring, from which the transposed conv makes grad_x rows, split by output phase (column p = q * stride + phase reads
// dy0 columns q - m, m < k / stride). The dy0 ring and the grad_x row staging are channel-tiled ([Cp / 16][cols][16]:
// constant pixel offsets in the loops), and the staging covers every padded column (no bounds tests).
//
// Memory. Outputs of 4 MiB and more get a transparent-huge-page hint before their first touch (first-touch faults
// dominate on VMs), outputs of 32 MiB and more written in the compute dtype go out with non-temporal stores.
//
// Vector code is written with GCC vector extensions in always-inline templates, instantiated for the baseline ISA
// (16-byte vectors: SSE2 on x86) and, chosen at run time, for AVX2 and AVX-512 (same operations in the same order,
// lane c % L holds channel c: identical results on every path; PYKERNELS_CPU_ISA=baseline|avx2 caps the choice);
// -ffp-contract=off keeps every multiply and add rounded on its own. exp (SiLU) is Cephes' expf polynomial in float32
// (std::exp per lane in float64). Determinism: every pixel is computed the same way in any partition; reductions (SE
// sums, batch statistics, parameter gradients) are summed over a group of rows in the compute dtype, then in float64
// per unit / task, over a fixed split of the units into tasks (a function of the shape only), and the tasks are added
// in order. Tasks are handed to the threads dynamically (the partition, not the schedule, fixes the result).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/half_convert.h"
#include "mbconv_se_args.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define PYKERNELS_X86 1
#else
#define PYKERNELS_X86 0
#endif

#pragma GCC diagnostic ignored "-Wpsabi"

namespace pykernels {
namespace mbconv_se {
namespace {

#define PK_INLINE inline __attribute__((always_inline))

constexpr int64_t kChannelPad = 16;     // Cp: channels rounded up to a multiple of this (any vector width divides it)
constexpr int kPixelBlock = 7;          // P: output pixels per register block (7 divides every EfficientNet width)
constexpr int64_t kTargetUnits = 32;    // bands are cut so that B * bands reaches about this many units ...
constexpr int64_t kMinBandRows = 8;     // ... with at least this many output rows per band (the backward's halo)
constexpr int64_t kMaxTasks = 16;       // at most this many reduction partials
constexpr int64_t kGroupPixels = 64;    // reductions: rows summed in the compute dtype in groups of >= this many pixels
constexpr int64_t kGroupElems = int64_t(64) << 10;  // ... holding at most this many conv outputs
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
  bool same = false;  // the tensor is in the compute dtype
};

template <typename acc_t>
Converter<acc_t> converter_for(at::ScalarType t) {
  Converter<acc_t> c;
  if constexpr (std::is_same_v<acc_t, double>) {
    TORCH_CHECK(t == at::kDouble, "mbconv_se (CPU): float64 compute needs float64 tensors, got ", t);
    c.in = &copy_run_in<double>;
    c.out = &copy_run_out<double>;
    c.elem_size = 8;
    c.same = true;
  } else {
    switch (t) {
      case at::kFloat:
        c.in = &copy_run_in<float>;
        c.out = &copy_run_out<float>;
        c.elem_size = 4;
        c.same = true;
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
        TORCH_CHECK(false, "mbconv_se (CPU): unexpected dtype ", t);
    }
  }
  return c;
}

inline const char* byte_ptr(const void* p, int64_t elems, int64_t elem_size) {
  return static_cast<const char*>(p) + elems * elem_size;
}
inline char* byte_ptr(void* p, int64_t elems, int64_t elem_size) { return static_cast<char*>(p) + elems * elem_size; }

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// Channel-tiled rows (the dy0 ring, the grad_x staging): [Cp / 16][cols][16], so that within a tile pixels are 16
// elements apart at any width (constant offsets in the transposed conv's loops: with a run-time pixel stride GCC keeps
// a pointer per pixel of a block and spills them). Offset of channel c0 (a multiple of the vector width) at column 0.
inline int64_t tile_offset(int64_t c0, int64_t cols) { return (c0 / 16) * cols * 16 + (c0 % 16); }

// Orders the non-temporal stores of this thread before what follows (the end of its tasks).
inline void store_fence() {
#if PYKERNELS_X86
  __builtin_ia32_sfence();
#endif
}

// Outputs of 32 MiB and more written directly by the kernels (out, batch-statistics y0, grad_x in the compute dtype
// and a multiple of 16 channels) use non-temporal stores: larger than a last-level cache, the next consumer would
// read them from memory anyway, and the stores skip the read for ownership (a third less traffic for out). Smaller
// outputs stay in cache for the next op.
constexpr int64_t kStreamBytes = int64_t(32) << 20;

// Outputs of 4 MiB and more (out, grad_x, the float16 / bfloat16 batch-statistics workspace) are written first by
// these kernels, and their pages are often fresh: glibc maps blocks of 32 MiB and more on their own, and returns a
// trimmed heap top to the kernel after large frees (eager's intermediates do that). On a VM a 4 KiB first-touch fault
// costs several times the write itself (measured here: 14.5 MiB after eager's frees, 8.3 ms plain, 2.8 ms hinted).
// Asking for transparent huge pages on the 2 MiB-aligned interior of the block (THP "madvise" mode, the common
// default; what PyTorch's opt-in THP_MEM_ALLOC_ENABLE does for every allocation) makes those faults 512 times fewer.
// A hint on memory the tensor owns: no effect on the values, nothing done where it is refused.
constexpr int64_t kHugePageHintBytes = int64_t(4) << 20;
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
  if (bytes < kHugePageHintBytes) return;
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// ---- problem description -----------------------------------------------------------------------------------------
template <typename acc_t>
struct RowFns;

template <typename acc_t>
struct Problem {
  Geometry geo;
  int64_t K = 0, S = 1;
  int64_t cp = 0;         // channel stride of every scratch tile (C rounded up to kChannelPad)
  int64_t owr = 0;        // out_w rounded up to kPixelBlock: pixels of a conv row
  int64_t wpad = 0;       // columns of an x ring row: (owr - 1) * S + K (column p = input column p - pad_l)
  int64_t xcols = 0;      // input columns loaded into a ring row: min(W, wpad - pad_l)
  int64_t row_elems = 0;  // wpad * cp
  int64_t qend = 0;       // grad_x phases: q < qend = ceil((pad_l + W) / S) (padded column q * S + phase)
  int64_t ml = 0;         // (K - 1) / S: dy0 columns read left of a phase column
  int64_t dy_cols = 0;    // columns of a dy0 ring row (tiled; dy0 column j at ml + j; zero off [0, out_w))
  int64_t gcols = 0;      // columns of the grad_x row staging (tiled; padded column p = w + pad_l)
  int64_t nblk = 0;       // pixel blocks of a conv row: owr / P
  int64_t bands = 1;      // row bands per image
  int64_t units = 0;      // B * bands
  int64_t tasks = 1;      // reduction partials: units split in order into this many ranges
  int64_t group = 1;      // output rows per reduction group (sums in acc_t within a group, float64 across groups)
  Converter<acc_t> x_io;  // x and grad_x
  Converter<acc_t> o_io;  // out (forward) or grad_out (backward)
  const void* x = nullptr;
  // Parameter tables in acc_t, [K*K][cp] and [cp], zero in the padding channels.
  std::vector<acc_t> weight;     // weight[(u*K + v)*cp + c]
  std::vector<acc_t> conv_bias;  // 0 when absent
  std::vector<acc_t> mean, rstd, scale, shift;
  std::vector<acc_t> mean_g, mean_gx;  // backward, batch statistics: sum g / N, sum g xhat / N
  const RowFns<acc_t>* fns = nullptr;  // the row epilogues of the ISA in use

  int64_t band_begin(int64_t band) const { return geo.out_h * band / bands; }
  int64_t task_begin(int64_t task) const { return units * task / tasks; }
  // First grad_x row owned by the band starting at output row i (backward): rows [in_row(i0), in_row(i1)).
  int64_t in_row(int64_t i) const {
    if (i <= 0) return 0;
    if (i >= geo.out_h) return geo.height;
    return std::clamp<int64_t>(i * S - geo.pad_t, 0, geo.height);
  }
};

template <typename acc_t>
constexpr at::ScalarType acc_type() {
  return std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
}

template <typename acc_t>
std::vector<acc_t> channel_table(const c10::optional<at::Tensor>& p, int64_t C, int64_t cp, double absent) {
  std::vector<acc_t> v(cp, acc_t(0));
  if (p.has_value()) {
    const at::Tensor t = p->to(acc_type<acc_t>()).contiguous();
    std::copy(t.const_data_ptr<acc_t>(), t.const_data_ptr<acc_t>() + C, v.begin());
  } else {
    std::fill(v.begin(), v.begin() + C, static_cast<acc_t>(absent));
  }
  return v;
}

template <typename acc_t>
const RowFns<acc_t>* row_fns_for();

template <typename acc_t>
void fill_problem(Problem<acc_t>& pb, const Geometry& geo, const at::Tensor& x, const at::Tensor& weight,
                  const c10::optional<at::Tensor>& conv_bias, at::ScalarType o_type) {
  pb.geo = geo;
  const int64_t C = geo.channels, K = geo.kernel, S = geo.stride;
  pb.K = K;
  pb.S = S;
  pb.cp = round_up(C, kChannelPad);
  pb.owr = round_up(geo.out_w, kPixelBlock);
  pb.wpad = (pb.owr - 1) * S + K;
  pb.xcols = std::min(geo.width, pb.wpad - geo.pad_l);
  pb.row_elems = pb.wpad * pb.cp;
  pb.qend = (geo.pad_l + geo.width + S - 1) / S;
  pb.ml = (K - 1) / S;
  // A phase's blocks run from its first in-image column to at most qend + P - 1 (see dx_phase).
  pb.dy_cols = pb.ml + std::max(pb.owr, pb.qend + kPixelBlock);
  pb.gcols = (pb.qend + kPixelBlock) * S;
  pb.nblk = pb.owr / kPixelBlock;
  // Bands and tasks: functions of the shape only (the reductions' order depends on them).
  const int64_t want = (kTargetUnits + geo.batch - 1) / std::max<int64_t>(1, geo.batch);
  pb.bands = std::max<int64_t>(1, std::min(want, geo.out_h / kMinBandRows));
  pb.units = geo.batch * pb.bands;
  pb.tasks = std::max<int64_t>(1, std::min(pb.units, kMaxTasks));
  pb.group = std::max<int64_t>(1, std::min((kGroupPixels + geo.out_w - 1) / geo.out_w,
                                           kGroupElems / (pb.owr * pb.cp)));
  pb.x_io = converter_for<acc_t>(x.scalar_type());
  pb.o_io = converter_for<acc_t>(o_type);
  pb.x = x.const_data_ptr();
  pb.fns = row_fns_for<acc_t>();

  const int64_t KK = K * K;
  const at::Tensor w = weight.reshape({C, KK}).to(acc_type<acc_t>()).contiguous();
  const acc_t* wp = w.const_data_ptr<acc_t>();
  pb.weight.assign(KK * pb.cp, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t t = 0; t < KK; ++t) pb.weight[t * pb.cp + c] = wp[c * KK + t];
  }
  pb.conv_bias = channel_table<acc_t>(conv_bias, C, pb.cp, 0.0);
}

// BatchNorm tables from the statistics (C values each, acc_t): rstd = 1 / sqrt(var + eps), scale = rstd * bn_weight,
// shift = bn_bias - mean * scale, computed in float64 and rounded once. Forward and backward derive them from the same
// acc_t statistics, so both see the same y.
template <typename acc_t>
void fill_bn_tables(Problem<acc_t>& pb, const acc_t* mean, const acc_t* var, const c10::optional<at::Tensor>& bn_weight,
                    const c10::optional<at::Tensor>& bn_bias, double eps) {
  const int64_t C = pb.geo.channels, cp = pb.cp;
  const std::vector<double> gamma = channel_table<double>(bn_weight, C, cp, 1.0);
  const std::vector<double> beta = channel_table<double>(bn_bias, C, cp, 0.0);
  pb.mean.assign(cp, acc_t(0));
  pb.rstd.assign(cp, acc_t(0));
  pb.scale.assign(cp, acc_t(0));
  pb.shift.assign(cp, acc_t(0));
  for (int64_t c = 0; c < C; ++c) {
    const double m = static_cast<double>(mean[c]);
    const double r = 1.0 / std::sqrt(static_cast<double>(var[c]) + eps);
    pb.mean[c] = static_cast<acc_t>(m);
    pb.rstd[c] = static_cast<acc_t>(r);
    pb.scale[c] = static_cast<acc_t>(r * gamma[c]);
    pb.shift[c] = static_cast<acc_t>(beta[c] - m * (r * gamma[c]));
  }
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

// Reads x[b, :, h, 0:xcols] into the ring row dst at columns pad_l + w (w < xcols, c < C; nothing else is written).
template <typename acc_t>
PK_INLINE void load_x_row(const Problem<acc_t>& pb, int64_t b, int64_t h, acc_t* __restrict__ dst,
                          acc_t* __restrict__ tmp) {
  const Geometry& g = pb.geo;
  const int64_t C = g.channels, W = g.width, n = pb.xcols, cp = pb.cp, es = pb.x_io.elem_size;
  const void* base = byte_ptr(pb.x, b * g.x_stride_b + h * g.x_stride_h, es);
  acc_t* row = dst + g.pad_l * cp;
  if (g.channels_last) {
    if (C == cp) {
      pb.x_io.in(base, row, n * C);
    } else {
      for (int64_t w = 0; w < n; ++w) pb.x_io.in(byte_ptr(base, w * C, es), row + w * cp, C);
    }
    return;
  }
  if (pb.x_io.same) {  // x is in the compute dtype: transpose straight from x
    transpose(static_cast<const acc_t*>(base), g.x_stride_c, row, cp, C, n);
    return;
  }
  for (int64_t c0 = 0; c0 < C; c0 += kTransposeBlock) {
    const int64_t nc = std::min(kTransposeBlock, C - c0);
    for (int64_t cc = 0; cc < nc; ++cc) pb.x_io.in(byte_ptr(base, (c0 + cc) * g.x_stride_c, es), tmp + cc * W, n);
    transpose(tmp, W, row + c0, cp, nc, n);
  }
}

// n pixels of C channels at pixel stride C (io's dtype) <-> [n][cp] tiles in acc_t.
template <typename acc_t>
PK_INLINE void get_pixels(const Converter<acc_t>& io, const void* src, acc_t* __restrict__ dst, int64_t n, int64_t C,
                          int64_t cp) {
  if (C == cp) {
    io.in(src, dst, n * C);
  } else {
    for (int64_t j = 0; j < n; ++j) io.in(byte_ptr(src, j * C, io.elem_size), dst + j * cp, C);
  }
}
template <typename acc_t>
PK_INLINE void put_pixels(const Converter<acc_t>& io, const acc_t* __restrict__ src, void* dst, int64_t n, int64_t C,
                          int64_t cp) {
  if (C == cp) {
    io.out(src, dst, n * C);
  } else {
    for (int64_t j = 0; j < n; ++j) io.out(src + j * cp, byte_ptr(dst, j * C, io.elem_size), C);
  }
}

// ---- vector types (always inlined into the per-ISA entry points) -------------------------------------------------
// VW: vector width in bytes, one per ISA: 16 the baseline (SSE2 on x86), 32 AVX2, 64 AVX-512. Channel c is lane
// c % L of a vector, and every operation is per channel: the results are the same at any width.
template <typename acc_t, int VW>
struct VecOf;
template <>
struct VecOf<float, 16> {
  typedef float type __attribute__((vector_size(16)));
  typedef int32_t index __attribute__((vector_size(16)));
};
template <>
struct VecOf<double, 16> {
  typedef double type __attribute__((vector_size(16)));
  typedef int64_t index __attribute__((vector_size(16)));
};
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
  using IV = typename VecOf<acc_t, VW>::index;
  static constexpr int64_t L = VW / sizeof(acc_t);  // lanes

  static PK_INLINE V load(const acc_t* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static PK_INLINE void store(acc_t* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  // Non-temporal store (p aligned to VW bytes): no read for ownership, the line goes to memory; fence() before the
  // values are handed on.
  static PK_INLINE void stream(acc_t* p, V v) {
#if PYKERNELS_X86
    if constexpr (std::is_same_v<acc_t, float> && VW == 16) return __builtin_ia32_movntps(p, v);
    if constexpr (std::is_same_v<acc_t, float> && VW == 32) return __builtin_ia32_movntps256(p, v);
    if constexpr (std::is_same_v<acc_t, float> && VW == 64) return __builtin_ia32_movntps512(p, v);
    if constexpr (std::is_same_v<acc_t, double> && VW == 16) return __builtin_ia32_movntpd(p, v);
#endif
    store(p, v);
  }
  static PK_INLINE void put(acc_t* p, V v, bool nontemporal) {
    if (nontemporal) {
      stream(p, v);
    } else {
      store(p, v);
    }
  }
  static PK_INLINE V splat(acc_t s) {
    V v;
    for (int64_t l = 0; l < L; ++l) v[l] = s;
    return v;
  }
  // min(a, b) = a < b ? a : b and max(a, b) = a > b ? a : b lane-wise (b where a is NaN): one instruction (GCC
  // keeps compare + blend for the ternary without -ffinite-math-only).
  static PK_INLINE V min(V a, V b) {
#if PYKERNELS_X86
    if constexpr (std::is_same_v<acc_t, float> && VW == 16) return __builtin_ia32_minps(a, b);
    if constexpr (std::is_same_v<acc_t, float> && VW == 32) return __builtin_ia32_minps256(a, b);
#endif
    return a < b ? a : b;
  }
  static PK_INLINE V max(V a, V b) {
#if PYKERNELS_X86
    if constexpr (std::is_same_v<acc_t, float> && VW == 16) return __builtin_ia32_maxps(a, b);
    if constexpr (std::is_same_v<acc_t, float> && VW == 32) return __builtin_ia32_maxps256(a, b);
#endif
    return a > b ? a : b;
  }
  // exp(x): float32: Cephes' expf polynomial, evaluated in Estrin's scheme (a short dependency chain: the SiLU
  // epilogues are bound by it), x clamped to [-87, 88] (exp(-87) for anything below, exp(88) above; NaN becomes 88:
  // the callers' other operand carries it); float64: std::exp per lane.
  static PK_INLINE V exp(V x) {
    if constexpr (std::is_same_v<acc_t, float>) {
      x = max(min(x, splat(88.0f)), splat(-87.0f));
      // t = x log2(e) + 1.5 * 2^23: its low mantissa bits hold n = round(x log2(e)) (|n| < 2^22)
      const V t = x * splat(1.44269504088896341f) + splat(12582912.0f);
      const V n = t - splat(12582912.0f);
      const V r = (x - n * splat(0.693359375f)) - n * splat(-2.12194440e-4f);  // x - n ln 2 in two parts
      const V r2 = r * r;
      const V r4 = r2 * r2;
      // exp(r) = 1 + r + r^2 (p5 + p4 r + r^2 (p3 + p2 r) + r^4 (p1 + p0 r))
      const V lo2 = splat(5.0000001201e-1f) + splat(1.6666665459e-1f) * r;
      const V mid2 = splat(4.1665795894e-2f) + splat(8.3334519073e-3f) * r;
      const V hi2 = splat(1.3981999507e-3f) + splat(1.9875691500e-4f) * r;
      const V p = (lo2 + r2 * mid2) + r4 * hi2;
      const V e = (r2 * p + r) + splat(1.0f);
      IV bits;
      std::memcpy(&bits, &t, sizeof(V));
      bits = (bits - (0x4B400000 - 127)) << 23;  // 2^n, n in [-126, 127]
      V pow2n;
      std::memcpy(&pow2n, &bits, sizeof(V));
      return e * pow2n;
    } else {
      V r;
      for (int64_t l = 0; l < L; ++l) r[l] = std::exp(x[l]);
      return r;
    }
  }
};

// ---- activations (PyTorch's definitions and backward conventions) ------------------------------------------------
template <Act A, typename acc_t, int VW>
PK_INLINE typename VT<acc_t, VW>::V act_fwd(typename VT<acc_t, VW>::V y) {
  using T = VT<acc_t, VW>;
  using V = typename T::V;
  const V zero = T::splat(0);
  if constexpr (A == Act::kNone) {
    return y;
  } else if constexpr (A == Act::kRelu) {
    return y < zero ? zero : y;  // NaN stays NaN
  } else if constexpr (A == Act::kRelu6) {
    const V six = T::splat(6);
    const V r = y < zero ? zero : y;
    return r > six ? six : r;
  } else if constexpr (A == Act::kSilu) {
    return y / (T::splat(1) + T::exp(-y));
  } else {  // hardswish: x * min(max(x + 3, 0), 6) / 6
    const V six = T::splat(6);
    V t = y + T::splat(3);
    t = t < zero ? zero : t;
    t = t > six ? six : t;
    return (y * t) / six;
  }
}

// grad * act'(y): relu' = 0 at 0, relu6' = 0 at 0 and 6, hardswish' = x / 3 + 1/2 on [-3, 3].
template <Act A, typename acc_t, int VW>
PK_INLINE typename VT<acc_t, VW>::V act_bwd(typename VT<acc_t, VW>::V grad, typename VT<acc_t, VW>::V y) {
  using T = VT<acc_t, VW>;
  using V = typename T::V;
  const V zero = T::splat(0);
  if constexpr (A == Act::kNone) {
    return grad;
  } else if constexpr (A == Act::kRelu) {
    return y > zero ? grad : zero;
  } else if constexpr (A == Act::kRelu6) {
    return (y > zero) & (y < T::splat(6)) ? grad : zero;
  } else if constexpr (A == Act::kSilu) {
    const V one = T::splat(1);
    const V sig = one / (one + T::exp(-y));
    return (grad * sig) * (one + y * (one - sig));
  } else {
    const V three = T::splat(3);
    const V mid = grad * (y / three + T::splat(0.5));
    return y < -three ? zero : (y <= three ? mid : grad);
  }
}

// ---- the conv of one output row ------------------------------------------------------------------------------------
// src[u * nblk + blk]: input row u of output row i (padded row i * S + u) as seen by pixel block blk: the address of
// its first column (padded column blk * P * S) in the ring, columns cp apart; nullptr: a zero row. (Reading x in
// place instead, with zero-padded tiles for the edge blocks, measured slower here: the row copy streams x into L2
// ahead of the conv, whose block-strided loads would otherwise stall on first touch.)
//
// y[w * cp + c] = sum_{u, v} src(u, w / P)[((w % P) * S + v) * cp + c] * weight[(u * K + v) * cp + c] + bias[c] for
// w < nblk * P, c < cp. Terms are added in (u, v) row-major order, then the bias.
template <int K, int S, typename acc_t, int VW>
PK_INLINE void conv_row(const acc_t* const* src, const acc_t* __restrict__ weight, const acc_t* __restrict__ bias,
                        acc_t* __restrict__ y, int64_t nblk, int64_t cp) {
  using T = VT<acc_t, VW>;
  using V = typename T::V;
  constexpr int P = kPixelBlock;
  constexpr int NT = (P - 1) * S + K;  // input columns of a block
  for (int64_t blk = 0; blk < nblk; ++blk) {
    const acc_t* rows[K];
    for (int u = 0; u < K; ++u) rows[u] = src[u * nblk + blk];
    for (int64_t c0 = 0; c0 < cp; c0 += T::L) {
      V acc[P];
      for (int p = 0; p < P; ++p) acc[p] = T::splat(0);
      for (int u = 0; u < K; ++u) {
        const acc_t* row = rows[u];
        if (row == nullptr) continue;
        V wv[K];
        for (int v = 0; v < K; ++v) wv[v] = T::load(weight + (u * K + v) * cp + c0);
        const acc_t* xr = row + c0;
#pragma GCC unroll 32
        for (int t = 0; t < NT; ++t) {
          const V xv = T::load(xr + t * cp);
#pragma GCC unroll 16
          for (int p = 0; p < P; ++p) {
            const int v = t - p * S;
            if (v >= 0 && v < K) acc[p] = acc[p] + xv * wv[v];
          }
        }
      }
      const V bv = T::load(bias + c0);
      for (int p = 0; p < P; ++p) T::store(y + (blk * P + p) * cp + c0, acc[p] + bv);
    }
  }
}

// rs[(u * K + v) * cp + c] += sum_{w < nblk * P} dy(c, w) * src(u, w / P)[((w % P) * S + v) * cp + c] (w in order;
// dy: a tiled dy0 row of dy_cols columns, zero for w >= out_w); a null row u adds nothing.
template <int K, int S, typename acc_t, int VW>
PK_INLINE void weight_grad_row(const acc_t* const* src, const acc_t* __restrict__ dy, int64_t dy_cols,
                               acc_t* __restrict__ rs, int64_t nblk, int64_t cp) {
  using T = VT<acc_t, VW>;
  using V = typename T::V;
  constexpr int P = kPixelBlock;
  constexpr int NT = (P - 1) * S + K;
  for (int u = 0; u < K; ++u) {
    const acc_t* const* xr = src + u * nblk;
    if (xr[0] == nullptr) continue;
    for (int64_t c0 = 0; c0 < cp; c0 += T::L) {
      V acc[K];
      for (int v = 0; v < K; ++v) acc[v] = T::load(rs + (u * K + v) * cp + c0);
      for (int64_t blk = 0; blk < nblk; ++blk) {
        V dv[P];
        for (int p = 0; p < P; ++p) dv[p] = T::load(dy + tile_offset(c0, dy_cols) + (blk * P + p) * 16);
        const acc_t* xp = xr[blk] + c0;
#pragma GCC unroll 32
        for (int t = 0; t < NT; ++t) {
          const V xv = T::load(xp + t * cp);
#pragma GCC unroll 16
          for (int p = 0; p < P; ++p) {
            const int v = t - p * S;
            if (v >= 0 && v < K) acc[v] = acc[v] + dv[p] * xv;
          }
        }
      }
      for (int v = 0; v < K; ++v) T::store(rs + (u * K + v) * cp + c0, acc[v]);
    }
  }
}

// One phase of the transposed conv of a grad_x row: for the padded columns p = q * S + PHI of the image (w = p - pad_l
// in [0, W)), in blocks of P from the first,
//   gx(p) = sum_{a < n} sum_{m < M} wrows[a][(PHI + S m) * cp] * dy_a(q - m)
// (dyrows[a]: a tiled dy0 row that reaches this grad_x row, wrows[a]: its kernel row) into the tiled staging gx
// (gcols columns). The rows are a compact list walked by a rolled loop.
template <int K, int S, int PHI, typename acc_t, int VW>
PK_INLINE void dx_phase(const acc_t* const* dyrows, const acc_t* const* wrows, int n, int64_t dy_cols,
                        acc_t* __restrict__ gx, int64_t gcols, int64_t pad_l, int64_t width, int64_t cp) {
  using T = VT<acc_t, VW>;
  using V = typename T::V;
  constexpr int P = kPixelBlock;
  constexpr int M = (K - PHI + S - 1) / S;  // taps v = PHI + S m < K
  const int64_t q_lo = (pad_l - PHI + S - 1) / S, q_hi = (pad_l + width - PHI + S - 1) / S;
  for (int64_t q0 = q_lo; q0 < q_hi; q0 += P) {
    for (int64_t c0 = 0; c0 < cp; c0 += T::L) {
      V acc[P];
      for (int p = 0; p < P; ++p) acc[p] = T::splat(0);
      const int64_t d0 = tile_offset(c0, dy_cols) + (q0 - (M - 1)) * 16;  // dy column q0 - (M - 1) + t
#pragma GCC unroll 1
      for (int a = 0; a < n; ++a) {
        V wv[M];
        for (int m = 0; m < M; ++m) wv[m] = T::load(wrows[a] + (PHI + S * m) * cp + c0);
        const acc_t* dp = dyrows[a] + d0;
#pragma GCC unroll 32
        for (int t = 0; t < P + M - 1; ++t) {
          const V dv = T::load(dp + t * 16);
#pragma GCC unroll 16
          for (int p = 0; p < P; ++p) {
            const int m = p + M - 1 - t;
            if (m >= 0 && m < M) acc[p] = acc[p] + dv * wv[m];
          }
        }
      }
      acc_t* out = gx + tile_offset(c0, gcols) + (q0 * S + PHI) * 16;
      for (int p = 0; p < P; ++p) T::store(out + p * S * 16, acc[p]);
    }
  }
}

// ---- per-row epilogues (instantiated per activation) ---------------------------------------------------------------
// Forward: z = act(y0 * scale + shift) for n pixels of y ([n][cp]) into z (pixel stride zs); rowsum[c] += sum_j z.
template <Act A, typename acc_t, int VW>
PK_INLINE void fwd_act_row(const acc_t* y, const acc_t* __restrict__ scale, const acc_t* __restrict__ shift, acc_t* z,
                           int64_t zs, int64_t n, int64_t cp, acc_t* __restrict__ rowsum, bool stream) {
  using T = VT<acc_t, VW>;
  using V = typename T::V;
  for (int64_t c0 = 0; c0 < cp; c0 += T::L) {
    const V sc = T::load(scale + c0), sh = T::load(shift + c0);
    V sum = T::load(rowsum + c0);
    for (int64_t j = 0; j < n; ++j) {
      const V zv = act_fwd<A, acc_t, VW>(T::load(y + j * cp + c0) * sc + sh);
      sum = sum + zv;
      T::put(z + j * zs + c0, zv, stream);
    }
    T::store(rowsum + c0, sum);
  }
}

// dst[0, n) = src[0, n) (n a multiple of the vector width; dst aligned to it when streaming).
template <typename acc_t, int VW>
PK_INLINE void copy_row(acc_t* __restrict__ dst, const acc_t* __restrict__ src, int64_t n, bool stream) {
  using T = VT<acc_t, VW>;
  if (!stream) {
    std::memcpy(dst, src, n * sizeof(acc_t));
    return;
  }
  for (int64_t i = 0; i < n; i += T::L) T::stream(dst + i, T::load(src + i));
}

// Statistics of a group of rows of y (rows of n pixels, ys elements apart, [n][cp] each): mean[c] = sum y / N,
// m2[c] = sum (y - mean)^2 over the N = rows * n values (two passes over the group, in cache).
template <typename acc_t, int VW>
PK_INLINE void group_stats(const acc_t* __restrict__ y, int64_t rows, int64_t ys, int64_t n, int64_t cp,
                           acc_t* __restrict__ mean, acc_t* __restrict__ m2) {
  using T = VT<acc_t, VW>;
  using V = typename T::V;
  const V inv_n = T::splat(acc_t(1) / static_cast<acc_t>(rows * n));
  for (int64_t c0 = 0; c0 < cp; c0 += T::L) {
    V sum = T::splat(0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < n; ++j) sum = sum + T::load(y + r * ys + j * cp + c0);
    }
    const V m = sum * inv_n;
    V q = T::splat(0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < n; ++j) {
        const V d = T::load(y + r * ys + j * cp + c0) - m;
        q = q + d * d;
      }
    }
    T::store(mean + c0, m);
    T::store(m2 + c0, q);
  }
}

enum BwdMode : int { kPassA = 0, kRunning = 1, kBatch = 2 };

// Backward epilogue over n pixels of y0 ([n][cp]) and grad_out (go, [n][cp]):
//   g = (go + gp) * act'(y0 * scale + shift), xhat = (y0 - mean) * rstd
//   kPassA:   sums[0] = sum g, sums[1] = sum g xhat
//   kRunning: dy = scale * g; sums: [0] sum dy, [1] sum g, [2] sum g xhat
//   kBatch:   dy = scale * ((g - mean_g) - xhat * mean_gx); sums[0] = sum dy
// (the sums are added to sums[k] at sums + k * cp; dy: a tiled dy0 ring row, pb.dy_cols columns).
template <Act A, int MODE, typename acc_t, int VW>
PK_INLINE void bwd_act_row(const Problem<acc_t>& pb, const acc_t* __restrict__ y, const acc_t* __restrict__ go,
                           const acc_t* __restrict__ gp, acc_t* __restrict__ dy, int64_t n, acc_t* __restrict__ sums) {
  using T = VT<acc_t, VW>;
  using V = typename T::V;
  const int64_t cp = pb.cp;
  for (int64_t c0 = 0; c0 < cp; c0 += T::L) {
    const V sc = T::load(pb.scale.data() + c0), sh = T::load(pb.shift.data() + c0);
    const V mu = T::load(pb.mean.data() + c0), rs = T::load(pb.rstd.data() + c0);
    const V gpv = T::load(gp + c0);
    V mg = T::splat(0), mgx = T::splat(0);
    if constexpr (MODE == kBatch) {
      mg = T::load(pb.mean_g.data() + c0);
      mgx = T::load(pb.mean_gx.data() + c0);
    }
    acc_t* dyc = MODE == kPassA ? nullptr : dy + tile_offset(c0, pb.dy_cols);
    V s0 = T::load(sums + c0);
    V s1 = MODE != kBatch ? T::load(sums + cp + c0) : T::splat(0);
    V s2 = MODE == kRunning ? T::load(sums + 2 * cp + c0) : T::splat(0);
    for (int64_t j = 0; j < n; ++j) {
      const V y0 = T::load(y + j * cp + c0);
      const V g = act_bwd<A, acc_t, VW>(T::load(go + j * cp + c0) + gpv, y0 * sc + sh);
      const V xhat = (y0 - mu) * rs;
      if constexpr (MODE == kPassA) {
        s0 = s0 + g;
        s1 = s1 + g * xhat;
      } else if constexpr (MODE == kRunning) {
        const V d = sc * g;
        T::store(dyc + j * 16, d);
        s0 = s0 + d;
        s1 = s1 + g;
        s2 = s2 + g * xhat;
      } else {
        const V d = sc * ((g - mg) - xhat * mgx);
        T::store(dyc + j * 16, d);
        s0 = s0 + d;
      }
    }
    T::store(sums + c0, s0);
    if constexpr (MODE != kBatch) T::store(sums + cp + c0, s1);
    if constexpr (MODE == kRunning) T::store(sums + 2 * cp + c0, s2);
  }
}

// ---- per-ISA row functions ------------------------------------------------------------------------------------
// The epilogues depend on the activation and the mode but not on k or the stride: one copy per ISA, called once per
// row through this table (the K x stride templates below inline only the conv loops).
template <typename acc_t>
struct RowFns {
  using FwdAct = void (*)(const acc_t* y, const acc_t* scale, const acc_t* shift, acc_t* z, int64_t zs, int64_t n,
                          int64_t cp, acc_t* rowsum, bool stream);
  using Copy = void (*)(acc_t* dst, const acc_t* src, int64_t n, bool stream);
  using BwdAct = void (*)(const Problem<acc_t>& pb, const acc_t* y, const acc_t* go, const acc_t* gp, acc_t* dy,
                          int64_t n, acc_t* sums);
  using Stats = void (*)(const acc_t* y, int64_t rows, int64_t ys, int64_t n, int64_t cp, acc_t* mean, acc_t* m2);
  FwdAct fwd_act[5] = {};
  BwdAct bwd_act[3][5] = {};  // [BwdMode][Act]
  Stats stats = nullptr;
  Copy copy = nullptr;
};

#define PK_ROW_FNS(SUFFIX, TARGET, VWIDTH)                                                                           \
  template <Act A, typename acc_t>                                                                                   \
  TARGET void fwd_act_##SUFFIX(const acc_t* y, const acc_t* scale, const acc_t* shift, acc_t* z, int64_t zs,        \
                               int64_t n, int64_t cp, acc_t* rowsum, bool stream) {                                 \
    fwd_act_row<A, acc_t, VWIDTH>(y, scale, shift, z, zs, n, cp, rowsum, stream);                                  \
  }                                                                                                                  \
  template <typename acc_t>                                                                                          \
  TARGET void copy_##SUFFIX(acc_t* dst, const acc_t* src, int64_t n, bool stream) {                                 \
    copy_row<acc_t, VWIDTH>(dst, src, n, stream);                                                                    \
  }                                                                                                                  \
  template <Act A, int MODE, typename acc_t>                                                                         \
  TARGET void bwd_act_##SUFFIX(const Problem<acc_t>& pb, const acc_t* y, const acc_t* go, const acc_t* gp,         \
                               acc_t* dy, int64_t n, acc_t* sums) {                                                 \
    bwd_act_row<A, MODE, acc_t, VWIDTH>(pb, y, go, gp, dy, n, sums);                                               \
  }                                                                                                                  \
  template <typename acc_t>                                                                                          \
  TARGET void stats_##SUFFIX(const acc_t* y, int64_t rows, int64_t ys, int64_t n, int64_t cp, acc_t* mean,           \
                             acc_t* m2) {                                                                            \
    group_stats<acc_t, VWIDTH>(y, rows, ys, n, cp, mean, m2);                                                       \
  }                                                                                                                  \
  template <int MODE, typename acc_t>                                                                                \
  void fill_bwd_##SUFFIX(RowFns<acc_t>& f) {                                                                         \
    f.bwd_act[MODE][0] = &bwd_act_##SUFFIX<Act::kNone, MODE, acc_t>;                                                \
    f.bwd_act[MODE][1] = &bwd_act_##SUFFIX<Act::kRelu, MODE, acc_t>;                                                \
    f.bwd_act[MODE][2] = &bwd_act_##SUFFIX<Act::kRelu6, MODE, acc_t>;                                               \
    f.bwd_act[MODE][3] = &bwd_act_##SUFFIX<Act::kSilu, MODE, acc_t>;                                                \
    f.bwd_act[MODE][4] = &bwd_act_##SUFFIX<Act::kHardswish, MODE, acc_t>;                                           \
  }                                                                                                                  \
  template <typename acc_t>                                                                                          \
  RowFns<acc_t> row_fns_##SUFFIX() {                                                                                 \
    RowFns<acc_t> f;                                                                                                 \
    f.fwd_act[0] = &fwd_act_##SUFFIX<Act::kNone, acc_t>;                                                            \
    f.fwd_act[1] = &fwd_act_##SUFFIX<Act::kRelu, acc_t>;                                                            \
    f.fwd_act[2] = &fwd_act_##SUFFIX<Act::kRelu6, acc_t>;                                                           \
    f.fwd_act[3] = &fwd_act_##SUFFIX<Act::kSilu, acc_t>;                                                            \
    f.fwd_act[4] = &fwd_act_##SUFFIX<Act::kHardswish, acc_t>;                                                       \
    fill_bwd_##SUFFIX<kPassA, acc_t>(f);                                                                             \
    fill_bwd_##SUFFIX<kRunning, acc_t>(f);                                                                           \
    fill_bwd_##SUFFIX<kBatch, acc_t>(f);                                                                             \
    f.stats = &stats_##SUFFIX<acc_t>;                                                                                \
    f.copy = &copy_##SUFFIX<acc_t>;                                                                                  \
    return f;                                                                                                        \
  }

PK_ROW_FNS(baseline, , 16)
#if PYKERNELS_X86
PK_ROW_FNS(avx2, __attribute__((target("avx2"))), 32)
PK_ROW_FNS(avx512, __attribute__((target("avx2,avx512f"))), 64)
#endif

// ---- scratch -------------------------------------------------------------------------------------------------------
// Scratch of one worker (reused across its units). Padding columns / channels of the rings are zero from the
// allocation and never written.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> x_ring;   // K rows of [wpad][cp]
  std::vector<const acc_t*> src;  // [K][nblk] block sources of the current output row (see conv_row)
  std::vector<acc_t> dy_ring;  // K tiled rows of dy_cols columns (backward pass B)
  std::vector<acc_t> y;        // group rows of [owr][cp] conv outputs
  std::vector<acc_t> row;      // [owr][cp] output / grad_out row staging
  std::vector<acc_t> gx;       // tiled grad_x row staging, gcols columns
  std::vector<acc_t> tmp;      // transpose staging, 16 * W
  std::vector<acc_t> gp;       // [cp] grad_pooled of the unit's image
  std::vector<acc_t> sums;     // group sums: (K*K + 3) * cp
  std::vector<acc_t> junk;     // sums of the backward's halo rows (not counted): 3 * cp
  std::vector<acc_t> stats;    // group mean, m2: 2 * cp
};

template <typename acc_t>
void init_scratch(const Problem<acc_t>& pb, Scratch<acc_t>& s, bool backward) {
  const int64_t cp = pb.cp;
  s.x_ring.assign(pb.K * pb.row_elems, acc_t(0));
  s.src.assign(pb.K * pb.nblk, nullptr);
  s.y.assign(pb.group * pb.owr * cp, acc_t(0));
  s.row.assign(pb.owr * cp, acc_t(0));
  s.tmp.assign(16 * pb.geo.width, acc_t(0));
  s.sums.assign((pb.K * pb.K + 3) * cp, acc_t(0));
  s.stats.assign(2 * cp, acc_t(0));
  s.junk.assign(3 * cp, acc_t(0));
  if (backward) {
    s.dy_ring.assign(pb.K * pb.dy_cols * cp, acc_t(0));
    s.gx.assign(pb.gcols * cp, acc_t(0));
    s.gp.assign(cp, acc_t(0));
  }
}

// Brings the x rows output row i reads (padded rows i * S + u) into the ring (`loaded`: the next padded row to load)
// and sets s.src to their block sources.
template <typename acc_t>
PK_INLINE void ring_rows(const Problem<acc_t>& pb, Scratch<acc_t>& s, int64_t b, int64_t i, int64_t& loaded) {
  const int64_t K = pb.K, S = pb.S, H = pb.geo.height, pad_t = pb.geo.pad_t, nblk = pb.nblk;
  loaded = std::max(loaded, i * S);
  for (; loaded < i * S + K; ++loaded) {
    const int64_t h = loaded - pad_t;
    if (h >= 0 && h < H) load_x_row(pb, b, h, s.x_ring.data() + (loaded % K) * pb.row_elems, s.tmp.data());
  }
  for (int64_t u = 0; u < K; ++u) {
    const acc_t** src = s.src.data() + u * nblk;
    const int64_t h = i * S + u - pad_t;
    const acc_t* row = s.x_ring.data() + ((i * S + u) % K) * pb.row_elems;
    const bool inside = h >= 0 && h < H;
    for (int64_t blk = 0; blk < nblk; ++blk) src[blk] = inside ? row + blk * kPixelBlock * S * pb.cp : nullptr;
  }
}

// ---- forward -------------------------------------------------------------------------------------------------------
enum FwdMode : int { kEval = 0, kStats = 1 };

template <typename acc_t>
struct FwdArgs {
  int mode = kEval;
  void* out = nullptr;         // (B, out_h, out_w, C) in out's dtype
  acc_t* ybuf = nullptr;       // kStats: where y0 goes (out itself, or a [B * out_h * out_w][cp] workspace)
  int64_t ybuf_ps = 0;         // pixel stride of ybuf (C: out itself, cp: workspace)
  double* pool_part = nullptr; // [units][cp] per-unit SE sums
  double* stat_part = nullptr; // kStats: per task [count][cp mean][cp m2]  (1 + 2 * cp doubles)
  bool stream = false;         // non-temporal stores into out / ybuf (direct rows only)
};

// Eval: conv -> BatchNorm -> act -> out, SE sums. kStats: conv -> y0 -> ybuf, statistics merged into the task's.
template <int K, int S, typename acc_t, int VW>
PK_INLINE void fwd_unit_impl(const Problem<acc_t>& pb, const FwdArgs<acc_t>& a, int64_t unit, Scratch<acc_t>& s,
                             int64_t task) {
  const Geometry& g = pb.geo;
  const int64_t C = g.channels, cp = pb.cp, OW = g.out_w;
  const int64_t b = unit / pb.bands, band = unit % pb.bands;
  const int64_t i0 = pb.band_begin(band), i1 = pb.band_begin(band + 1);
  const bool direct_out = pb.o_io.same && C == cp;  // out rows are [out_w][cp] tiles in acc_t
  double* pool = a.pool_part + unit * cp;
  double* st = a.mode == kStats ? a.stat_part + task * (1 + 2 * cp) : nullptr;
  int64_t loaded = 0;
  const int64_t row_elems = pb.owr * cp;
  acc_t* rowsum = s.sums.data();
  for (int64_t ig = i0; ig < i1; ig += pb.group) {  // groups of rows: sums in acc_t, float64 across groups
    const int64_t ie = std::min(i1, ig + pb.group);
    std::fill(rowsum, rowsum + cp, acc_t(0));
    for (int64_t i = ig; i < ie; ++i) {
      acc_t* y = s.y.data() + (a.mode == kEval ? 0 : (i - ig) * row_elems);
      ring_rows(pb, s, b, i, loaded);
      conv_row<K, S, acc_t, VW>(s.src.data(), pb.weight.data(), pb.conv_bias.data(), y, pb.nblk, cp);
      const int64_t pix0 = (b * g.out_h + i) * OW;
      if (a.mode == kEval) {
        acc_t* z = direct_out ? static_cast<acc_t*>(a.out) + pix0 * C : s.row.data();
        pb.fns->fwd_act[static_cast<int>(g.act)](y, pb.scale.data(), pb.shift.data(), z, cp, OW, cp, rowsum,
                                                 direct_out && a.stream);
        if (!direct_out) put_pixels(pb.o_io, s.row.data(), byte_ptr(a.out, pix0 * C, pb.o_io.elem_size), OW, C, cp);
      } else if (a.ybuf_ps == cp) {
        pb.fns->copy(a.ybuf + pix0 * cp, y, OW * cp, a.stream);
      } else {
        put_pixels(pb.o_io, y, a.ybuf + pix0 * a.ybuf_ps, OW, C, cp);
      }
    }
    if (a.mode == kEval) {
      for (int64_t c = 0; c < cp; ++c) pool[c] += static_cast<double>(rowsum[c]);
      continue;
    }
    // The group's mean and M2 (two passes over its rows in cache), merged into the task's (n, mean, m2) in float64
    // (Chan et al.).
    acc_t* gmean = s.stats.data();
    acc_t* gm2 = gmean + cp;
    pb.fns->stats(s.y.data(), ie - ig, row_elems, OW, cp, gmean, gm2);
    double& n = st[0];
    double* mean = st + 1;
    double* m2 = st + 1 + cp;
    const double nb = static_cast<double>((ie - ig) * OW), nt = n + nb;
    for (int64_t c = 0; c < cp; ++c) {
      const double delta = static_cast<double>(gmean[c]) - mean[c];
      mean[c] += delta * (nb / nt);
      m2[c] += static_cast<double>(gm2[c]) + delta * delta * (n * nb / nt);
    }
    n = nt;
  }
}

// Batch statistics, pass 2: out = act(y0 * scale + shift) from ybuf, SE sums.
template <typename acc_t>
void norm_unit(const Problem<acc_t>& pb, const FwdArgs<acc_t>& a, int64_t unit, Scratch<acc_t>& s) {
  const Geometry& g = pb.geo;
  const int64_t C = g.channels, cp = pb.cp, OW = g.out_w;
  const int64_t b = unit / pb.bands, band = unit % pb.bands;
  const bool direct_out = pb.o_io.same && C == cp;
  double* pool = a.pool_part + unit * cp;
  acc_t* rowsum = s.sums.data();
  const int64_t i0 = pb.band_begin(band), i1 = pb.band_begin(band + 1);
  for (int64_t i = i0; i < i1; ++i) {
    if ((i - i0) % pb.group == 0) std::fill(rowsum, rowsum + cp, acc_t(0));
    const int64_t pix0 = (b * g.out_h + i) * OW;
    const acc_t* y = a.ybuf + pix0 * a.ybuf_ps;
    if (a.ybuf_ps != cp) {  // out itself with C % 16 != 0: staged
      get_pixels(pb.o_io, y, s.row.data(), OW, C, cp);
      y = s.row.data();
    }
    acc_t* z = direct_out ? static_cast<acc_t*>(a.out) + pix0 * C : s.row.data();
    pb.fns->fwd_act[static_cast<int>(g.act)](y, pb.scale.data(), pb.shift.data(), z, cp, OW, cp, rowsum,
                                             direct_out && a.stream);
    if (!direct_out) put_pixels(pb.o_io, s.row.data(), byte_ptr(a.out, pix0 * C, pb.o_io.elem_size), OW, C, cp);
    if ((i - i0) % pb.group == pb.group - 1 || i == i1 - 1) {
      for (int64_t c = 0; c < cp; ++c) pool[c] += static_cast<double>(rowsum[c]);
    }
  }
}

// ---- backward ------------------------------------------------------------------------------------------------------
template <typename acc_t>
struct BwdArgs {
  const void* grad_out = nullptr;
  const acc_t* grad_pooled = nullptr;  // (B, C) or null
  void* grad_x = nullptr;              // null when not needed
  bool params = false;                 // parameter gradients needed
  bool batch = false;                  // batch statistics
  bool stream = false;                 // non-temporal stores into grad_x (float32 / float64 channels-last, C % 16 == 0)
};

// dy0 row i in the dy ring (K tiled rows of dy_cols columns; column j of the row at ml + j: columns -ml .. -1 and
// >= out_w stay zero), pointing at column 0 of tile 0.
template <typename acc_t>
PK_INLINE acc_t* dy_ring_row(const Problem<acc_t>& pb, Scratch<acc_t>& s, int64_t i) {
  return s.dy_ring.data() + (i % pb.K) * pb.dy_cols * pb.cp + pb.ml * 16;
}

// grad_x[b, :, h, :] from the tiled staging gx (padded column p = w + pad_l), in x's layout and dtype.
template <typename acc_t, int VW>
PK_INLINE void store_grad_x_row(const Problem<acc_t>& pb, const BwdArgs<acc_t>& a, int64_t b, int64_t h,
                                const acc_t* __restrict__ gx, acc_t* __restrict__ tmp) {
  using T = VT<acc_t, VW>;
  const Geometry& g = pb.geo;
  const int64_t C = g.channels, W = g.width, es = pb.x_io.elem_size, gc = pb.gcols;
  void* base = byte_ptr(a.grad_x, b * g.x_stride_b + h * g.x_stride_h, es);
  const acc_t* src = gx + g.pad_l * 16;
  if (g.channels_last) {
    if (pb.x_io.same && C == pb.cp) {  // whole tiles: vector copies (non-temporal for large grad_x)
      for (int64_t w = 0; w < W; ++w) {
        acc_t* dst = static_cast<acc_t*>(base) + w * C;
        const acc_t* col = src + w * 16;
        if (a.stream) {
          for (int64_t c0 = 0; c0 < C; c0 += T::L) T::stream(dst + c0, T::load(col + tile_offset(c0, gc)));
        } else {
          for (int64_t c0 = 0; c0 < C; c0 += T::L) T::store(dst + c0, T::load(col + tile_offset(c0, gc)));
        }
      }
      return;
    }
    for (int64_t w = 0; w < W; ++w) {
      for (int64_t c0 = 0; c0 < C; c0 += 16) {
        pb.x_io.out(src + tile_offset(c0, gc) + w * 16, byte_ptr(base, w * C + c0, es), std::min<int64_t>(16, C - c0));
      }
    }
    return;
  }
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    const int64_t nc = std::min<int64_t>(16, C - c0);
    const acc_t* tile = src + tile_offset(c0, gc);
    if (pb.x_io.same) {
      transpose(tile, 16, static_cast<acc_t*>(base) + c0 * g.x_stride_c, g.x_stride_c, W, nc);
    } else {
      transpose(tile, 16, tmp, W, W, nc);
      for (int64_t cc = 0; cc < nc; ++cc) pb.x_io.out(tmp + cc * W, byte_ptr(base, (c0 + cc) * g.x_stride_c, es), W);
    }
  }
}

// grad_x[b, :, h, :] = sum over the dy0 rows i = (h + pad_t - u) / S (in the ring) of the transposed conv of row i
// with kernel row u.
template <int K, int S, typename acc_t, int VW>
PK_INLINE void emit_grad_x_row(const Problem<acc_t>& pb, const BwdArgs<acc_t>& a, Scratch<acc_t>& s, int64_t b,
                               int64_t h) {
  const Geometry& g = pb.geo;
  const int64_t ph = h + g.pad_t;
  const acc_t* dyrows[K];
  const acc_t* wrows[K];
  int n = 0;
  for (int64_t u = 0; u < K; ++u) {
    if (ph - u >= 0 && (ph - u) % S == 0 && (ph - u) / S < g.out_h) {
      dyrows[n] = dy_ring_row(pb, s, (ph - u) / S);
      wrows[n++] = pb.weight.data() + u * K * pb.cp;
    }
  }
  acc_t* gx = s.gx.data();
  const int64_t gc = pb.gcols, dc = pb.dy_cols;
  dx_phase<K, S, 0, acc_t, VW>(dyrows, wrows, n, dc, gx, gc, g.pad_l, g.width, pb.cp);
  if constexpr (S == 2) dx_phase<K, S, 1, acc_t, VW>(dyrows, wrows, n, dc, gx, gc, g.pad_l, g.width, pb.cp);
  store_grad_x_row<acc_t, VW>(pb, a, b, h, s.gx.data(), s.tmp.data());
}

// Pass A (pass_a): adds sum g, sum g xhat of the band's rows to partial ([2][cp]). Pass B: dy0 rows, grad_x rows of
// the band, and (params) the parameter-gradient sums of the band's rows to partial: [K*K][cp] grad_weight, then
// [cp] each: sum dy0, (running statistics) sum g, sum g xhat.
template <int K, int S, typename acc_t, int VW>
PK_INLINE void bwd_unit_impl(const Problem<acc_t>& pb, const BwdArgs<acc_t>& a, int64_t unit, Scratch<acc_t>& s,
                             double* __restrict__ partial, bool pass_a) {
  constexpr int64_t KK = K * K;
  const Geometry& g = pb.geo;
  const int64_t C = g.channels, cp = pb.cp, OW = g.out_w, OH = g.out_h;
  const int64_t b = unit / pb.bands, band = unit % pb.bands;
  const int64_t i0 = pb.band_begin(band), i1 = pb.band_begin(band + 1);
  const bool need_dx = !pass_a && a.grad_x != nullptr;
  const bool direct_go = pb.o_io.same && C == cp;
  const int mode = pass_a ? kPassA : (a.batch ? kBatch : kRunning);
  // grad_x rows owned: [hx0, hx1); dy0 rows computed: [d0, d1) (the band plus the halo grad_x rows need).
  const int64_t hx0 = pb.in_row(i0), hx1 = pb.in_row(i1);
  int64_t d0 = i0, d1 = i1;
  if (need_dx && hx1 > hx0) {
    const int64_t lo = hx0 + g.pad_t - K + 1;
    d0 = std::min(i0, lo <= 0 ? int64_t(0) : (lo + S - 1) / S);
    d1 = std::max(i1, std::min(OH, (hx1 - 1 + g.pad_t) / S + 1));
  }
  if (a.grad_pooled != nullptr) {
    std::copy(a.grad_pooled + b * C, a.grad_pooled + (b + 1) * C, s.gp.begin());
  }
  acc_t* sums = s.sums.data();
  auto dy_row = [&](int64_t i) { return dy_ring_row(pb, s, i); };
  int64_t loaded = 0, next_hx = hx0;
  for (int64_t i = d0; i < d1; ++i) {
    ring_rows(pb, s, b, i, loaded);
    conv_row<K, S, acc_t, VW>(s.src.data(), pb.weight.data(), pb.conv_bias.data(), s.y.data(), pb.nblk, cp);
    const int64_t pix0 = (b * OH + i) * OW;
    const acc_t* go;
    if (direct_go) {
      go = static_cast<const acc_t*>(a.grad_out) + pix0 * C;
    } else {
      get_pixels(pb.o_io, byte_ptr(a.grad_out, pix0 * C, pb.o_io.elem_size), s.row.data(), OW, C, cp);
      go = s.row.data();
    }
    acc_t* dyr = pass_a ? nullptr : dy_row(i);
    const bool own = i >= i0 && i < i1;
    // Sums of the band's rows accumulate in acc_t over a group of rows, then go to the float64 partial.
    const bool counted = own && (pass_a || a.params);
    if (counted && (i - i0) % pb.group == 0) std::fill(s.sums.begin(), s.sums.end(), acc_t(0));
    if (!counted) std::fill(s.junk.begin(), s.junk.end(), acc_t(0));
    acc_t* esums = counted ? sums + (pass_a ? 0 : KK * cp) : s.junk.data();
    pb.fns->bwd_act[mode][static_cast<int>(g.act)](pb, s.y.data(), go, s.gp.data(), dyr, OW, esums);
    if (counted && !pass_a) weight_grad_row<K, S, acc_t, VW>(s.src.data(), dyr, pb.dy_cols, sums, pb.nblk, cp);
    if (counted && ((i - i0) % pb.group == pb.group - 1 || i == i1 - 1)) {
      const int64_t total = pass_a ? 2 * cp : (KK + (a.batch ? 1 : 3)) * cp;
      for (int64_t t = 0; t < total; ++t) partial[t] += static_cast<double>(sums[t]);
    }
    if (need_dx) {
      for (; next_hx < hx1 && (next_hx + g.pad_t) / S <= i; ++next_hx) {
        emit_grad_x_row<K, S, acc_t, VW>(pb, a, s, b, next_hx);
      }
    }
  }
  if (need_dx) {
    for (; next_hx < hx1; ++next_hx) emit_grad_x_row<K, S, acc_t, VW>(pb, a, s, b, next_hx);
  }
}

// ---- ISA selection and per-ISA entry points ------------------------------------------------------------------------
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

template <int K, int S, typename acc_t>
void fwd_unit_baseline(const Problem<acc_t>& pb, const FwdArgs<acc_t>& a, int64_t unit, Scratch<acc_t>& s,
                       int64_t task) {
  fwd_unit_impl<K, S, acc_t, 16>(pb, a, unit, s, task);
}
template <int K, int S, typename acc_t>
void bwd_unit_baseline(const Problem<acc_t>& pb, const BwdArgs<acc_t>& a, int64_t unit, Scratch<acc_t>& s,
                       double* partial, bool pass_a) {
  bwd_unit_impl<K, S, acc_t, 16>(pb, a, unit, s, partial, pass_a);
}

#if PYKERNELS_X86
template <int K, int S, typename acc_t>
__attribute__((target("avx2"))) void fwd_unit_avx2(const Problem<acc_t>& pb, const FwdArgs<acc_t>& a, int64_t unit,
                                                   Scratch<acc_t>& s, int64_t task) {
  fwd_unit_impl<K, S, acc_t, 32>(pb, a, unit, s, task);
}
template <int K, int S, typename acc_t>
__attribute__((target("avx2,avx512f"))) void fwd_unit_avx512(const Problem<acc_t>& pb, const FwdArgs<acc_t>& a,
                                                             int64_t unit, Scratch<acc_t>& s, int64_t task) {
  fwd_unit_impl<K, S, acc_t, 64>(pb, a, unit, s, task);
}
template <int K, int S, typename acc_t>
__attribute__((target("avx2"))) void bwd_unit_avx2(const Problem<acc_t>& pb, const BwdArgs<acc_t>& a, int64_t unit,
                                                   Scratch<acc_t>& s, double* partial, bool pass_a) {
  bwd_unit_impl<K, S, acc_t, 32>(pb, a, unit, s, partial, pass_a);
}
template <int K, int S, typename acc_t>
__attribute__((target("avx2,avx512f"))) void bwd_unit_avx512(const Problem<acc_t>& pb, const BwdArgs<acc_t>& a,
                                                             int64_t unit, Scratch<acc_t>& s, double* partial,
                                                             bool pass_a) {
  bwd_unit_impl<K, S, acc_t, 64>(pb, a, unit, s, partial, pass_a);
}
#endif

// float64 runs the baseline path only (its speed is not the point; the float32 paths give the same bits anyway).
template <typename acc_t>
Isa isa_for() {
  return std::is_same_v<acc_t, double> ? Isa::kBaseline : pick_isa();
}

template <typename acc_t>
const RowFns<acc_t>* row_fns_for() {
#if PYKERNELS_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    static const RowFns<float> fns[3] = {row_fns_baseline<float>(), row_fns_avx2<float>(), row_fns_avx512<float>()};
    return &fns[static_cast<int>(isa_for<float>())];
  }
#endif
  static const RowFns<acc_t> baseline = row_fns_baseline<acc_t>();
  return &baseline;
}

// Runs body(task, unit, scratch) for every unit, task by task (units of a task in order, on one thread); tasks go to
// the threads dynamically. Each worker owns one Scratch.
template <typename acc_t, typename Body>
void run_tasks(const Problem<acc_t>& pb, bool backward, const Body& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), pb.tasks));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Scratch<acc_t> s;
    init_scratch(pb, s, backward);
    for (int64_t task = next.fetch_add(1); task < pb.tasks; task = next.fetch_add(1)) {
      for (int64_t unit = pb.task_begin(task); unit < pb.task_begin(task + 1); ++unit) body(task, unit, s);
    }
    store_fence();
  });
}

// ---- dispatch ------------------------------------------------------------------------------------------------------
template <typename F>
void dispatch_geometry(int64_t k, int64_t stride, const F& f) {
  auto with_k = [&](auto k_tag) {
    if (stride == 1) return f(k_tag, std::integral_constant<int, 1>{});
    return f(k_tag, std::integral_constant<int, 2>{});
  };
  switch (k) {
    case 3: return with_k(std::integral_constant<int, 3>{});
    case 5: return with_k(std::integral_constant<int, 5>{});
    case 7: return with_k(std::integral_constant<int, 7>{});
    default: TORCH_CHECK(false, "mbconv_se (CPU): unsupported kernel size ", k);
  }
}

template <typename F>
void dispatch_acc(at::ScalarType x_type, const F& f) {
  if (x_type == at::kDouble) return f(double{});
  return f(float{});
}

template <int K, int S, typename acc_t>
auto fwd_unit_fn() {
  auto fn = &fwd_unit_baseline<K, S, acc_t>;
#if PYKERNELS_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa_for<acc_t>() == Isa::kAvx2) fn = &fwd_unit_avx2<K, S, acc_t>;
    if (isa_for<acc_t>() == Isa::kAvx512) fn = &fwd_unit_avx512<K, S, acc_t>;
  }
#endif
  return fn;
}

template <int K, int S, typename acc_t>
auto bwd_unit_fn() {
  auto fn = &bwd_unit_baseline<K, S, acc_t>;
#if PYKERNELS_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (isa_for<acc_t>() == Isa::kAvx2) fn = &bwd_unit_avx2<K, S, acc_t>;
    if (isa_for<acc_t>() == Isa::kAvx512) fn = &bwd_unit_avx512<K, S, acc_t>;
  }
#endif
  return fn;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mbconv_se_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& conv_bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double eps,
    int64_t stride, int64_t pad_t, int64_t pad_l, int64_t out_h, int64_t out_w, c10::string_view act,
    bool batch_stats) {
  TORCH_CHECK(x.device().is_cpu(), "mbconv_se_fwd (CPU kernel): x must be a CPU tensor, got ", x.device());
  const Geometry geo = check_fwd_args(x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, stride,
                                      pad_t, pad_l, out_h, out_w, act, batch_stats, /*allow_double=*/true);
  FwdOutputs o = alloc_fwd(x, geo);
  advise_huge_pages(o.out);
  if (geo.empty()) {
    if (batch_stats) {  // statistics of nothing (as torch's mean of an empty tensor)
      o.mean.fill_(std::numeric_limits<double>::quiet_NaN());
      o.var.fill_(std::numeric_limits<double>::quiet_NaN());
    }
    return {o.out, o.pooled, o.mean, o.var};
  }
  dispatch_acc(x.scalar_type(), [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    Problem<acc_t> pb;
    fill_problem(pb, geo, x, weight, conv_bias, x.scalar_type());
    const int64_t C = geo.channels, cp = pb.cp;
    std::vector<double> pool_part(pb.units * cp, 0.0);
    FwdArgs<acc_t> a;
    a.out = o.out.mutable_data_ptr();
    a.pool_part = pool_part.data();
    a.stream = static_cast<int64_t>(o.out.nbytes()) >= kStreamBytes;
    dispatch_geometry(geo.kernel, geo.stride, [&](auto k_tag, auto s_tag) {
      constexpr int K = decltype(k_tag)::value, S = decltype(s_tag)::value;
      const auto unit_fn = fwd_unit_fn<K, S, acc_t>();
      if (!batch_stats) {
        const at::Tensor rm = running_mean->to(acc_type<acc_t>()).contiguous();
        const at::Tensor rv = running_var->to(acc_type<acc_t>()).contiguous();
        fill_bn_tables(pb, rm.const_data_ptr<acc_t>(), rv.const_data_ptr<acc_t>(), bn_weight, bn_bias, eps);
        a.mode = kEval;
        run_tasks(pb, false, [&](int64_t task, int64_t unit, Scratch<acc_t>& s) { unit_fn(pb, a, unit, s, task); });
        return;
      }
      // Pass 1: y0 into out (or a workspace), per-task statistics.
      at::Tensor workspace;
      if (pb.o_io.same) {
        a.ybuf = o.out.mutable_data_ptr<acc_t>();
        a.ybuf_ps = C;
      } else {
        workspace = at::empty({geo.out_pixels() * cp}, x.options().dtype(acc_type<acc_t>()));
        advise_huge_pages(workspace);
        a.ybuf = workspace.mutable_data_ptr<acc_t>();
        a.ybuf_ps = cp;
      }
      std::vector<double> stat_part(pb.tasks * (1 + 2 * cp), 0.0);
      a.stat_part = stat_part.data();
      a.mode = kStats;
      const bool stream_out = a.stream;
      a.stream = geo.out_pixels() * a.ybuf_ps * static_cast<int64_t>(sizeof(acc_t)) >= kStreamBytes;
      run_tasks(pb, false, [&](int64_t task, int64_t unit, Scratch<acc_t>& s) { unit_fn(pb, a, unit, s, task); });
      a.stream = stream_out;
      // Tasks merged in order (Chan et al.), biased variance.
      std::vector<double> mean(cp, 0.0), m2(cp, 0.0);
      double n = 0;
      for (int64_t task = 0; task < pb.tasks; ++task) {
        const double* st = stat_part.data() + task * (1 + 2 * cp);
        const double nb = st[0];
        if (nb == 0) continue;
        const double nt = n + nb;
        for (int64_t c = 0; c < cp; ++c) {
          const double delta = st[1 + c] - mean[c];
          mean[c] += delta * (nb / nt);
          m2[c] += st[1 + cp + c] + delta * delta * (n * nb / nt);
        }
        n = nt;
      }
      acc_t* mean_out = o.mean.mutable_data_ptr<acc_t>();
      acc_t* var_out = o.var.mutable_data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) {
        mean_out[c] = static_cast<acc_t>(mean[c]);
        var_out[c] = static_cast<acc_t>(m2[c] / n);
      }
      fill_bn_tables(pb, mean_out, var_out, bn_weight, bn_bias, eps);
      // Pass 2: normalise, activation, SE sums.
      run_tasks(pb, false, [&](int64_t, int64_t unit, Scratch<acc_t>& s) { norm_unit(pb, a, unit, s); });
    });
    // pooled[b] = the bands' sums, in order.
    acc_t* pooled = o.pooled.mutable_data_ptr<acc_t>();
    for (int64_t b = 0; b < geo.batch; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        double sum = 0;
        for (int64_t band = 0; band < pb.bands; ++band) sum += pool_part[(b * pb.bands + band) * cp + c];
        pooled[b * C + c] = static_cast<acc_t>(sum);
      }
    }
  });
  return {o.out, o.pooled, o.mean, o.var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mbconv_se_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_pooled, const at::Tensor& x,
    const at::Tensor& weight, const c10::optional<at::Tensor>& conv_bias, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, const at::Tensor& mean, const at::Tensor& var, double eps,
    int64_t stride, int64_t pad_t, int64_t pad_l, c10::string_view act, bool batch_stats, bool need_grad_x,
    bool need_grad_params) {
  TORCH_CHECK(x.device().is_cpu(), "mbconv_se_bwd (CPU kernel): x must be a CPU tensor, got ", x.device());
  const Geometry geo = check_bwd_args(grad_out, grad_pooled, x, weight, conv_bias, bn_weight, bn_bias, mean, var, eps,
                                      stride, pad_t, pad_l, act, batch_stats, /*allow_double=*/true);
  BwdOutputs o = alloc_bwd(x, weight, conv_bias, bn_weight, bn_bias, need_grad_x, need_grad_params);
  advise_huge_pages(o.grad_x);
  const auto result = [&o] {
    return std::make_tuple(o.grad_x, o.grad_weight, o.grad_conv_bias, o.grad_bn_weight, o.grad_bn_bias);
  };
  if (geo.empty() || (!need_grad_x && !need_grad_params)) {
    if (o.want_weight) o.grad_weight.zero_();
    if (o.want_conv_bias) o.grad_conv_bias.zero_();
    if (o.want_bn_weight) o.grad_bn_weight.zero_();
    if (o.want_bn_bias) o.grad_bn_bias.zero_();
    return result();
  }
  dispatch_acc(x.scalar_type(), [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    Problem<acc_t> pb;
    fill_problem(pb, geo, x, weight, conv_bias, grad_out.scalar_type());
    const int64_t C = geo.channels, cp = pb.cp, K = geo.kernel, KK = K * K;
    const at::Tensor mean_c = mean.to(acc_type<acc_t>()).contiguous();
    const at::Tensor var_c = var.to(acc_type<acc_t>()).contiguous();
    fill_bn_tables(pb, mean_c.const_data_ptr<acc_t>(), var_c.const_data_ptr<acc_t>(), bn_weight, bn_bias, eps);
    at::Tensor grad_pooled_c;
    BwdArgs<acc_t> a;
    a.grad_out = grad_out.const_data_ptr();
    if (grad_pooled.has_value()) {
      grad_pooled_c = grad_pooled->contiguous();
      a.grad_pooled = grad_pooled_c.const_data_ptr<acc_t>();
    }
    a.grad_x = need_grad_x ? o.grad_x.mutable_data_ptr() : nullptr;
    a.stream = need_grad_x && static_cast<int64_t>(o.grad_x.nbytes()) >= kStreamBytes;
    a.params = need_grad_params;
    a.batch = batch_stats;
    std::vector<double> sums_a;  // batch statistics: sum g, sum g xhat
    std::vector<double> total;   // pass B: [K*K][cp] grad_weight, [cp] sum dy0, (running) [cp] sum g, [cp] sum g xhat
    dispatch_geometry(geo.kernel, geo.stride, [&](auto k_tag, auto s_tag) {
      constexpr int KT = decltype(k_tag)::value, ST = decltype(s_tag)::value;
      const auto unit_fn = bwd_unit_fn<KT, ST, acc_t>();
      auto reduce = [&](int64_t size, bool pass_a) {
        std::vector<double> partials(pb.tasks * size, 0.0);
        run_tasks(pb, true, [&](int64_t task, int64_t unit, Scratch<acc_t>& s) {
          unit_fn(pb, a, unit, s, partials.data() + task * size, pass_a);
        });
        std::vector<double> sum(size, 0.0);
        for (int64_t task = 0; task < pb.tasks; ++task) {
          for (int64_t t = 0; t < size; ++t) sum[t] += partials[task * size + t];
        }
        return sum;
      };
      if (batch_stats) {
        sums_a = reduce(2 * cp, /*pass_a=*/true);
        const double inv_n = 1.0 / static_cast<double>(geo.out_pixels());
        pb.mean_g.assign(cp, acc_t(0));
        pb.mean_gx.assign(cp, acc_t(0));
        for (int64_t c = 0; c < C; ++c) {
          pb.mean_g[c] = static_cast<acc_t>(sums_a[c] * inv_n);
          pb.mean_gx[c] = static_cast<acc_t>(sums_a[cp + c] * inv_n);
        }
      }
      total = reduce(need_grad_params ? (KK + 3) * cp : 0, /*pass_a=*/false);
    });
    if (!need_grad_params) return;
    auto to_tensor = [&](const double* src, at::Tensor& dst) {
      at::Tensor t = at::empty({C}, x.options().dtype(at::kDouble));
      std::copy(src, src + C, t.mutable_data_ptr<double>());
      dst.copy_(t.view(dst.sizes()));
    };
    at::Tensor gw = at::empty({C, 1, K, K}, x.options().dtype(at::kDouble));
    double* gwp = gw.mutable_data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t t = 0; t < KK; ++t) gwp[c * KK + t] = total[t * cp + c];
    }
    o.grad_weight.copy_(gw);
    if (o.want_conv_bias) to_tensor(total.data() + KK * cp, o.grad_conv_bias);
    const double* sum_g = batch_stats ? sums_a.data() : total.data() + (KK + 1) * cp;
    const double* sum_gx = batch_stats ? sums_a.data() + cp : total.data() + (KK + 2) * cp;
    if (o.want_bn_weight) to_tensor(sum_gx, o.grad_bn_weight);
    if (o.want_bn_bias) to_tensor(sum_g, o.grad_bn_bias);
  });
  return result();
}

}  // namespace
}  // namespace mbconv_se
}  // namespace pykernels

TORCH_LIBRARY_IMPL(pykernels, CPU, m) {
  m.impl("mbconv_se_fwd", &pykernels::mbconv_se::mbconv_se_fwd_cpu);
  m.impl("mbconv_se_bwd", &pykernels::mbconv_se::mbconv_se_bwd_cpu);
}

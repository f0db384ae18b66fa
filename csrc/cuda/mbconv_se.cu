// The depthwise stage of an MBConv block (MobileNet-V2 / V3, Sandler et al. 2018, Howard et al. 2019; EfficientNet,
// Tan & Le 2019) with the squeeze of its squeeze-excitation layer (Hu et al. 2018): the CUDA kernels of
// pykernels::mbconv_se_fwd / mbconv_se_bwd (contract in csrc/ops.cpp; argument checks, geometry and outputs in
// csrc/mbconv_se_args.h, shared with the CPU kernels).
//
//   forward:  y0 = depthwise k x k conv of x (stride s, pads pad_t / pad_l, zero outside the image) + conv_bias
//             xhat = (y0 - mean) * rstd, y = xhat * bn_weight + bn_bias, z = act(y); out = z (B, out_h, out_w, C),
//             pooled[b, c] = sum_{i, j} z; batch_stats: mean, var = biased statistics of y0 over (B, out_h, out_w)
//   backward: g = (grad_out + grad_pooled[b, c]) * act'(y); dy0 = rstd * bn_weight * g (running statistics) or
//             rstd * bn_weight * (g - sum g / N - xhat * sum(g * xhat) / N) (batch statistics);
//             grad_x = transposed strided conv of dy0, grad_weight = sum dy0 * x, grad_conv_bias = sum dy0,
//             grad_bn_weight = sum g * xhat, grad_bn_bias = sum g
//
// Tiles. A block owns kChunk = 32 channels (grid.y: the chunk; lane l of every warp works on channel c0 + l) and an
// output tile of TH x TW pixels of one image (TH <= 8, TW <= 16, a multiple of kPx). It stages the tile's input
// window - 32 channels x ((TH - 1) * s + k) rows x ((TW - 1) * s + k) columns, zero outside the image - in shared
// memory as float (read from NCHW or channels_last x in place, through strides, with the thread -> element mapping
// that makes the global reads coalesced in either layout; the channel planes are an odd number of floats apart, so
// 32 lanes reading one position of 32 channels hit 32 banks). Each thread computes kPx = 4 consecutive outputs of one
// row of its channel from registers (k and s are template parameters: the k x k weights of the channel and a window
// of (kPx - 1) * s + k inputs per row live in registers, fully unrolled); taps are summed row-major, then conv_bias.
// The 8 warps take the tile's row groups in turn; the stores of out (B, out_h, out_w, C) are coalesced over the 32
// channels. Tiles shrink (the longer side of the window first) until a block's shared memory fits 48 KB (no opt-in;
// k = 7 with stride 2: 8 x 4 pixels). 256 threads per block, every kernel. x is float16, bfloat16 or float32 (the
// contract's CUDA dtypes; float64 is refused by the header's check), all math in float32.
//
// Kernels (T: x's dtype; K, S: kernel size and stride):
//   mbconv_se_stats_kernel        batch_stats: grid (G, chunks), block g walks tiles g, g + G, ...; each thread keeps
//                                 (count, mean, M2) of its conv outputs (exact two-pass over each 4-pixel group, then
//                                 Chan's merge), the 8 warps are merged in a fixed order -> partial (G, 3, C)
//   mbconv_se_stats_merge_kernel  mean = sum n_t mean_t / N, M2 = sum M2_t + sum n_t (mean_t - mean)^2 in a fixed
//                                 order (no E[y^2] - E[y]^2 cancellation) -> mean, var (C,)
//   mbconv_se_fwd_kernel          grid (tiles, chunks), one tile per block: conv, BatchNorm, activation, out written
//                                 coalesced over C; the tile's sum of z per channel -> pooled partial (B, tiles/img, C)
//   mbconv_se_sum_kernel          out[r, m] = sum_t partial[r, t, m], fixed order (pooled; the backward's sums)
//   mbconv_se_bwd_reduce_kernel   batch_stats: the conv recomputed; sum g, sum g * xhat -> partial (G, 2, C)
//   mbconv_se_bwd_main_kernel     the conv recomputed (weights from shared memory); dy0 -> float workspace (B, out_h,
//                                 out_w, C) when grad_x is wanted; the per-thread sums of dy0, g * xhat, g and dy0 * x
//                                 for the k x k taps (in registers, from the staged input window), merged over the
//                                 warps in a fixed order -> partial (G, C * k * k + 3 C)
//   mbconv_se_bwd_input_kernel    grad_x: grid (input tiles, chunks); the dy0 rows / columns the tile's pixels
//                                 receive from are staged like x; stride 1: a sliding window with the flipped taps,
//                                 stride 2: only the taps of the right parity (both unrolled); written in x's layout
//                                 (NCHW: through a shared-memory stash, so that the writes are coalesced)
// No float atomics: every reduction is per-block partials summed in a fixed order, and the grids depend on the shape
// only, so results are deterministic and GPU-independent. Every launch goes through PYKERNELS_LAUNCH, the device check
// and registration through the macros of launch.cuh (tests/cuda_emu runs this file unmodified on the CPU).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "launch.cuh"
#include "mbconv_se_args.h"

namespace pykernels {
namespace mbconv_se {
namespace {

constexpr int kThreads = 256;                // threads per block, every kernel
constexpr int kWarps = kThreads / 32;        // warps per block
constexpr int kChunk = 32;                   // channels per block: one per lane
constexpr int kPx = 4;                       // consecutive pixels of one row per thread and step
constexpr int kMaxTileH = 8;                 // TH: output (input, for grad_x) rows of a tile
constexpr int kMaxTileW = 16;                // TW: columns of a tile (a multiple of kPx)
constexpr int64_t kSmemBudget = 48 * 1024;   // dynamic + static shared memory per block (no opt-in needed)
constexpr int64_t kGridBlocks = 1024;        // about this many blocks (all chunks) for the grid-strided kernels
constexpr int64_t kMaxGridY = 65535;

constexpr int kActRelu = static_cast<int>(Act::kRelu);
constexpr int kActRelu6 = static_cast<int>(Act::kRelu6);
constexpr int kActSilu = static_cast<int>(Act::kSilu);
constexpr int kActHardswish = static_cast<int>(Act::kHardswish);

// Calls f(TypeTag<T>{}, ...) with the C++ types / constants of a dispatch.
template <typename T>
struct TypeTag {
  using type = T;
};
template <int V>
struct IntTag {
  static constexpr int value = V;
};

// ---- device helpers --------------------------------------------------------------------------------------------
// act(y), PyTorch's definitions (CUDA kernels: relu6 = hardtanh(0, 6), silu = y / (1 + exp(-y)),
// hardswish = y * min(max(y + 3, 0), 6) / 6).
__device__ __forceinline__ float activate(float y, int act) {
  switch (act) {
    case kActRelu:
      return y <= 0.f ? 0.f : y;  // NaN passes, as torch's
    case kActRelu6:
      return y <= 0.f ? 0.f : (y >= 6.f ? 6.f : y);
    case kActSilu:
      return y / (1.f + expf(-y));
    case kActHardswish:
      return y * fminf(fmaxf(y + 3.f, 0.f), 6.f) / 6.f;
    default:
      return y;
  }
}

// d act(y) / dy as PyTorch's backward kernels compute it (0 at relu's kink, 0 at relu6's 0 and 6, the hardswish slope
// y / 3 + 1/2 on [-3, 3]).
__device__ __forceinline__ float activate_grad(float y, int act) {
  switch (act) {
    case kActRelu:
      return y > 0.f ? 1.f : 0.f;
    case kActRelu6:
      return y > 0.f && y < 6.f ? 1.f : 0.f;
    case kActSilu: {
      const float sig = 1.f / (1.f + expf(-y));
      return sig * (1.f + y * (1.f - sig));
    }
    case kActHardswish:
      return y < -3.f ? 0.f : (y <= 3.f ? y / 3.f + 0.5f : 1.f);
    default:
      return 1.f;
  }
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

// floor(a / s) for s = 1 or 2 (a may be negative).
template <int S>
__device__ __forceinline__ int floor_div(int a) {
  return S == 1 ? a : (a >> 1);  // arithmetic shift: floor for negative a too (C++20)
}

// Chan et al.'s merge of (n_b, mean_b, M2_b) into (n, mean, M2): no cancellation.
__device__ __forceinline__ void chan_merge(float& n, float& mean, float& m2, float n_b, float mean_b, float m2_b) {
  if (n_b == 0.f) return;
  const float total = n + n_b;
  const float delta = mean_b - mean;
  const float frac = n_b / total;
  mean += delta * frac;
  m2 += m2_b + delta * delta * (n * frac);
  n = total;
}

// Geometry of the output tiles of the forward and of the backward's conv recompute (host-filled).
struct TileGeo {
  int64_t x_stride_b, x_stride_c, x_stride_h, x_stride_w;  // element strides of x
  int channels, height, width, out_h, out_w, pad_t, pad_l;
  int tile_h, tile_w;    // TH, TW (TW % kPx == 0)
  int tiles_h, tiles_w;  // tiles per image along out_h, out_w
  int in_rows, in_cols;  // staged input window of a tile: (TH - 1) * s + k rows, (TW - 1) * s + k columns
  int ch_stride;         // floats between the staged channels (odd, >= in_rows * in_cols)
  bool channels_last;    // x_stride_c == 1: stage with the channel index fastest (coalesced), else the column
};

struct TilePos {
  int64_t b;
  int row0, col0;  // first output row / column of the tile
};

__device__ __forceinline__ TilePos tile_pos(int64_t t, int tiles_h, int tiles_w, int tile_h, int tile_w) {
  const int64_t per_image = static_cast<int64_t>(tiles_h) * tiles_w;
  TilePos pos;
  pos.b = t / per_image;
  const int rest = static_cast<int>(t - pos.b * per_image);
  pos.row0 = rest / tiles_w * tile_h;
  pos.col0 = rest % tiles_w * tile_w;
  return pos;
}

// Stages x[b, c0 + cl, r0 + r, q0 + col] (0 outside the image) into tile[cl * ch_stride + r * in_cols + col] for
// cl < cc. The caller synchronises around it.
template <typename T>
__device__ __forceinline__ void stage_x(float* __restrict__ tile, const T* __restrict__ x_b, const TileGeo& g, int c0,
                                        int cc, int r0, int q0) {
  const int rows = g.in_rows, cols = g.in_cols;
  const int n = cc * rows * cols;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    int cl, r, col;
    if (g.channels_last) {
      cl = e % cc;
      const int rest = e / cc;
      col = rest % cols;
      r = rest / cols;
    } else {
      col = e % cols;
      const int rest = e / cols;
      r = rest % rows;
      cl = rest / rows;
    }
    const int h = r0 + r, w = q0 + col;
    float value = 0.f;
    if (h >= 0 && h < g.height && w >= 0 && w < g.width) {
      value = static_cast<float>(x_b[(c0 + cl) * g.x_stride_c + h * g.x_stride_h + w * g.x_stride_w]);
    }
    tile[cl * g.ch_stride + r * cols + col] = value;
  }
}

// The k x k weights of channel c (zeros for an idle lane).
template <int K>
__device__ __forceinline__ void load_weights(float (&w)[K * K], const float* __restrict__ weight, int c, bool active) {
#pragma unroll
  for (int e = 0; e < K * K; ++e) w[e] = active ? weight[static_cast<int64_t>(c) * K * K + e] : 0.f;
}

// acc[q] = sum_{u, v} w[u, v] * t[u * cols + q * S + v], q < kPx, taps summed row-major: the conv of kPx consecutive
// outputs of one row; t points at the staged input of the first output's window. w: the channel's K * K weights, in
// registers (float[K * K]) or in shared memory (a pointer).
template <int K, int S, typename Weights>
__device__ __forceinline__ void conv_px(float (&acc)[kPx], const float* __restrict__ t, int cols, const Weights& w) {
  constexpr int kWin = (kPx - 1) * S + K;
#pragma unroll
  for (int q = 0; q < kPx; ++q) acc[q] = 0.f;
#pragma unroll
  for (int u = 0; u < K; ++u) {
    float win[kWin];
#pragma unroll
    for (int e = 0; e < kWin; ++e) win[e] = t[u * cols + e];
#pragma unroll
    for (int v = 0; v < K; ++v) {
#pragma unroll
      for (int q = 0; q < kPx; ++q) acc[q] += win[q * S + v] * w[u * K + v];
    }
  }
}

// The per-channel constants of the BatchNorm + activation.
struct ChannelParams {
  float conv_bias, mean, rstd, gamma, beta;
};

__device__ __forceinline__ ChannelParams channel_params(int c, bool active, const float* __restrict__ conv_bias,
                                                        const float* __restrict__ bn_weight,
                                                        const float* __restrict__ bn_bias,
                                                        const float* __restrict__ mean,
                                                        const float* __restrict__ var, float eps) {
  ChannelParams p{0.f, 0.f, 1.f, 1.f, 0.f};
  if (active) {
    if (conv_bias != nullptr) p.conv_bias = conv_bias[c];
    if (bn_weight != nullptr) p.gamma = bn_weight[c];
    if (bn_bias != nullptr) p.beta = bn_bias[c];
    p.mean = mean[c];
    p.rstd = rsqrtf(var[c] + eps);
  }
  return p;
}

// Where a row group (kPx pixels of one output row) of a tile lies: row ry of the tile, columns px0 .. px0 + kPx - 1;
// n_valid of them inside the image (0: none).
struct Group {
  int ry, px0, n_valid;
};

__device__ __forceinline__ Group group_of(int gi, int tile_w, const TilePos& pos, int out_h, int out_w) {
  const int groups_w = tile_w / kPx;
  Group grp;
  grp.ry = gi / groups_w;
  grp.px0 = (gi - grp.ry * groups_w) * kPx;
  const int cols_left = out_w - pos.col0 - grp.px0;
  grp.n_valid = pos.row0 + grp.ry < out_h ? (cols_left < kPx ? cols_left : kPx) : 0;
  return grp;
}

// ---- forward: batch statistics ------------------------------------------------------------------------------------
// grid (G, chunks); block (g, chunk) walks tiles g, g + G, ... Dynamic smem: the staged window (32 channels).
template <typename T, int K, int S>
__global__ void mbconv_se_stats_kernel(float* __restrict__ partial, const T* __restrict__ x,
                                       const float* __restrict__ weight, const float* __restrict__ conv_bias,
                                       TileGeo g, int64_t tiles) {
  PYKERNELS_DYNAMIC_SHARED(float, tile_s);
  __shared__ float merge_s[3][kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c0 = blockIdx.y * kChunk, cc = imin(kChunk, g.channels - c0), c = c0 + lane;
  const bool active = lane < cc;
  float w[K * K];
  load_weights<K>(w, weight, c, active);
  const float bias = active && conv_bias != nullptr ? conv_bias[c] : 0.f;
  const int n_groups = g.tile_h * (g.tile_w / kPx);

  float n = 0.f, mean = 0.f, m2 = 0.f;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const TilePos pos = tile_pos(t, g.tiles_h, g.tiles_w, g.tile_h, g.tile_w);
    __syncthreads();  // the previous tile is no longer read
    stage_x(tile_s, x + pos.b * g.x_stride_b, g, c0, cc, pos.row0 * S - g.pad_t, pos.col0 * S - g.pad_l);
    __syncthreads();
    if (!active) continue;
    for (int gi = warp; gi < n_groups; gi += kWarps) {
      const Group grp = group_of(gi, g.tile_w, pos, g.out_h, g.out_w);
      if (grp.n_valid <= 0) continue;
      float y0[kPx];
      conv_px<K, S>(y0, tile_s + lane * g.ch_stride + grp.ry * S * g.in_cols + grp.px0 * S, g.in_cols, w);
      // exact two-pass statistics of the group's valid outputs, merged into the thread's
      float sum = 0.f;
#pragma unroll
      for (int q = 0; q < kPx; ++q) {
        y0[q] += bias;
        if (q < grp.n_valid) sum += y0[q];
      }
      const float count = static_cast<float>(grp.n_valid);
      const float group_mean = sum / count;
      float group_m2 = 0.f;
#pragma unroll
      for (int q = 0; q < kPx; ++q) {
        const float d = y0[q] - group_mean;
        if (q < grp.n_valid) group_m2 += d * d;
      }
      chan_merge(n, mean, m2, count, group_mean, group_m2);
    }
  }
  merge_s[0][warp][lane] = n;
  merge_s[1][warp][lane] = mean;
  merge_s[2][warp][lane] = m2;
  __syncthreads();
  if (warp == 0 && active) {  // the warps in a fixed order
    float bn = 0.f, bmean = 0.f, bm2 = 0.f;
    for (int v = 0; v < kWarps; ++v) {
      chan_merge(bn, bmean, bm2, merge_s[0][v][lane], merge_s[1][v][lane], merge_s[2][v][lane]);
    }
    float* out = partial + static_cast<int64_t>(blockIdx.x) * 3 * g.channels + c;
    out[0] = bn;
    out[g.channels] = bmean;
    out[2 * g.channels] = bm2;
  }
}

// grid: ceil(C / 32) blocks; lane l of every warp works on channel 32 * blockIdx.x + l, warp v on the partials
// v, v + 8, ...; mean = sum n_t mean_t / N, then var = (sum M2_t + sum n_t (mean_t - mean)^2) / N, both in a fixed
// order.
__global__ void mbconv_se_stats_merge_kernel(float* __restrict__ mean_out, float* __restrict__ var_out,
                                             const float* __restrict__ partial, int64_t groups, int channels,
                                             float count) {
  __shared__ float red_s[kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c = blockIdx.x * 32 + lane;
  const bool active = c < channels;
  const int64_t row = 3 * static_cast<int64_t>(channels);
  float sum = 0.f;
  if (active) {
    for (int64_t t = warp; t < groups; t += kWarps) sum += partial[t * row + c] * partial[t * row + channels + c];
  }
  red_s[warp][lane] = sum;
  __syncthreads();
  float mean = 0.f;
  for (int v = 0; v < kWarps; ++v) mean += red_s[v][lane];
  mean /= count;
  __syncthreads();  // red_s is written again
  float m2 = 0.f;
  if (active) {
    for (int64_t t = warp; t < groups; t += kWarps) {
      const float d = partial[t * row + channels + c] - mean;
      m2 += partial[t * row + 2 * channels + c] + partial[t * row + c] * (d * d);
    }
  }
  red_s[warp][lane] = m2;
  __syncthreads();
  if (warp == 0 && active) {
    float total = 0.f;
    for (int v = 0; v < kWarps; ++v) total += red_s[v][lane];
    mean_out[c] = mean;
    var_out[c] = total / count;
  }
}

// ---- forward: out and the pooled partial sums ----------------------------------------------------------------------
// grid (tiles, chunks), one tile per block. pool_partial (B, tiles per image, C): the tile's sum of z per channel.
template <typename T, int K, int S>
__global__ void mbconv_se_fwd_kernel(T* __restrict__ out, float* __restrict__ pool_partial, const T* __restrict__ x,
                                     const float* __restrict__ weight, const float* __restrict__ conv_bias,
                                     const float* __restrict__ bn_weight, const float* __restrict__ bn_bias,
                                     const float* __restrict__ mean, const float* __restrict__ var, float eps, int act,
                                     TileGeo g) {
  PYKERNELS_DYNAMIC_SHARED(float, tile_s);
  __shared__ float red_s[kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c0 = blockIdx.y * kChunk, cc = imin(kChunk, g.channels - c0), c = c0 + lane;
  const bool active = lane < cc;
  const TilePos pos = tile_pos(blockIdx.x, g.tiles_h, g.tiles_w, g.tile_h, g.tile_w);
  stage_x(tile_s, x + pos.b * g.x_stride_b, g, c0, cc, pos.row0 * S - g.pad_t, pos.col0 * S - g.pad_l);
  float w[K * K];
  load_weights<K>(w, weight, c, active);
  const ChannelParams p = channel_params(c, active, conv_bias, bn_weight, bn_bias, mean, var, eps);
  __syncthreads();

  float pool = 0.f;
  if (active) {
    const int n_groups = g.tile_h * (g.tile_w / kPx);
    for (int gi = warp; gi < n_groups; gi += kWarps) {
      const Group grp = group_of(gi, g.tile_w, pos, g.out_h, g.out_w);
      if (grp.n_valid <= 0) continue;
      float acc[kPx];
      conv_px<K, S>(acc, tile_s + lane * g.ch_stride + grp.ry * S * g.in_cols + grp.px0 * S, g.in_cols, w);
      const int64_t pixel = (pos.b * g.out_h + pos.row0 + grp.ry) * g.out_w + pos.col0 + grp.px0;
      T* out_px = out + pixel * g.channels + c;
#pragma unroll
      for (int q = 0; q < kPx; ++q) {
        if (q < grp.n_valid) {
          const float xhat = (acc[q] + p.conv_bias - p.mean) * p.rstd;
          const float z = activate(xhat * p.gamma + p.beta, act);
          out_px[static_cast<int64_t>(q) * g.channels] = static_cast<T>(z);
          pool += z;
        }
      }
    }
  }
  red_s[warp][lane] = pool;
  __syncthreads();
  if (warp == 0 && active) {
    float total = 0.f;
    for (int v = 0; v < kWarps; ++v) total += red_s[v][lane];
    pool_partial[static_cast<int64_t>(blockIdx.x) * g.channels + c] = total;
  }
}

// out[r, m] = sum_{t < terms} partial[r, t, m] in a fixed order. kSplit = 1: grid (ceil(cols / 256), rows), one
// column per thread, the terms in order (few terms). kSplit = 8: grid (ceil(cols / 32), rows), lane l of every warp
// sums column 32 * blockIdx.x + l over the terms v, v + 8, ... of warp v, then warp 0 adds the 8 in order (many
// terms: eight loads in flight per column). rows are grid-strided over gridDim.y.
template <int kSplit>
__global__ void mbconv_se_sum_kernel(float* __restrict__ out, const float* __restrict__ partial, int64_t rows,
                                     int64_t terms, int64_t cols) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t m = kSplit == 1 ? static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x
                                : static_cast<int64_t>(blockIdx.x) * 32 + lane;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const float* column = partial + r * terms * cols + m;
    if constexpr (kSplit == 1) {
      if (m < cols) {
        float sum = 0.f;
        for (int64_t t = 0; t < terms; ++t) sum += column[t * cols];
        out[r * cols + m] = sum;
      }
    } else {
      __shared__ float red_s[kWarps][32];
      float sum = 0.f;
      if (m < cols) {
        for (int64_t t = warp; t < terms; t += kWarps) sum += column[t * cols];
      }
      red_s[warp][lane] = sum;
      __syncthreads();
      if (warp == 0 && m < cols) {
        float total = 0.f;
        for (int v = 0; v < kWarps; ++v) total += red_s[v][lane];
        out[r * cols + m] = total;
      }
      __syncthreads();  // red_s is written again
    }
  }
}

// ---- backward: g, xhat of a row group -------------------------------------------------------------------------------
// grad_out (B, out_h, out_w, C) is read as T (grad_t) or float (grad_f, the other null).
template <typename T>
struct GradSource {
  const T* grad_t;
  const float* grad_f;
  const float* grad_pooled;  // (B, C) or null
};

// For the valid pixels q < n_valid of a row group: xhat[q] and g[q] (0 for the others). y0: the conv sums (no bias).
template <typename T>
__device__ __forceinline__ void grad_terms(float (&xhat)[kPx], float (&gq)[kPx], const float (&y0)[kPx],
                                           const ChannelParams& p, const GradSource<T>& src, int64_t pixel,
                                           int64_t b, int channels, int c, int n_valid, int act) {
  const float pooled_grad = src.grad_pooled != nullptr ? src.grad_pooled[b * channels + c] : 0.f;
#pragma unroll
  for (int q = 0; q < kPx; ++q) {
    xhat[q] = 0.f;
    gq[q] = 0.f;
    if (q < n_valid) {
      const int64_t at = (pixel + q) * channels + c;
      const float go = src.grad_t != nullptr ? static_cast<float>(src.grad_t[at]) : src.grad_f[at];
      xhat[q] = (y0[q] + p.conv_bias - p.mean) * p.rstd;
      gq[q] = (go + pooled_grad) * activate_grad(xhat[q] * p.gamma + p.beta, act);
    }
  }
}

// ---- backward: sum g, sum g * xhat (batch statistics: dy0 needs them) -----------------------------------------------
// grid (G, chunks), tiles grid-strided; partial (G, 2, C).
template <typename T, int K, int S>
__global__ void mbconv_se_bwd_reduce_kernel(float* __restrict__ partial, GradSource<T> src, const T* __restrict__ x,
                                            const float* __restrict__ weight, const float* __restrict__ conv_bias,
                                            const float* __restrict__ bn_weight, const float* __restrict__ bn_bias,
                                            const float* __restrict__ mean, const float* __restrict__ var, float eps,
                                            int act, TileGeo g, int64_t tiles) {
  PYKERNELS_DYNAMIC_SHARED(float, tile_s);
  __shared__ float red_s[2][kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c0 = blockIdx.y * kChunk, cc = imin(kChunk, g.channels - c0), c = c0 + lane;
  const bool active = lane < cc;
  float w[K * K];
  load_weights<K>(w, weight, c, active);
  const ChannelParams p = channel_params(c, active, conv_bias, bn_weight, bn_bias, mean, var, eps);
  const int n_groups = g.tile_h * (g.tile_w / kPx);

  float sum_g = 0.f, sum_gx = 0.f;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const TilePos pos = tile_pos(t, g.tiles_h, g.tiles_w, g.tile_h, g.tile_w);
    __syncthreads();  // the previous tile is no longer read
    stage_x(tile_s, x + pos.b * g.x_stride_b, g, c0, cc, pos.row0 * S - g.pad_t, pos.col0 * S - g.pad_l);
    __syncthreads();
    if (!active) continue;
    for (int gi = warp; gi < n_groups; gi += kWarps) {
      const Group grp = group_of(gi, g.tile_w, pos, g.out_h, g.out_w);
      if (grp.n_valid <= 0) continue;
      float y0[kPx], xhat[kPx], gq[kPx];
      conv_px<K, S>(y0, tile_s + lane * g.ch_stride + grp.ry * S * g.in_cols + grp.px0 * S, g.in_cols, w);
      const int64_t pixel = (pos.b * g.out_h + pos.row0 + grp.ry) * g.out_w + pos.col0 + grp.px0;
      grad_terms(xhat, gq, y0, p, src, pixel, pos.b, g.channels, c, grp.n_valid, act);
#pragma unroll
      for (int q = 0; q < kPx; ++q) {
        sum_g += gq[q];
        sum_gx += gq[q] * xhat[q];
      }
    }
  }
  red_s[0][warp][lane] = sum_g;
  red_s[1][warp][lane] = sum_gx;
  __syncthreads();
  if (warp == 0 && active) {
    float total_g = 0.f, total_gx = 0.f;
    for (int v = 0; v < kWarps; ++v) {
      total_g += red_s[0][v][lane];
      total_gx += red_s[1][v][lane];
    }
    float* out = partial + static_cast<int64_t>(blockIdx.x) * 2 * g.channels + c;
    out[0] = total_g;
    out[g.channels] = total_gx;
  }
}

// ---- backward: dy0 (workspace) and the parameter grads' partial sums ------------------------------------------------
// grid (G, chunks), tiles grid-strided. sums (2, C): sum g, sum g * xhat (batch statistics; null: running ones).
// dy_ws (B, out_h, out_w, C) or null; partial (G, C * K * K + 3 C) or null: [dy0 * x per tap (C, K, K) | sum dy0 |
// sum g * xhat | sum g]. Each thread keeps its channel's K * K tap sums in registers, so the weights of the conv
// recompute come from shared memory (K = 7: about 130 registers instead of 255). Dynamic smem: the staged window,
// then the chunk's weights (32, K * K); after the last tile the window's space holds the (32, K * K) tap sums.
template <typename T, int K, int S>
__global__ void mbconv_se_bwd_main_kernel(float* __restrict__ dy_ws, float* __restrict__ partial, GradSource<T> src,
                                          const T* __restrict__ x, const float* __restrict__ weight,
                                          const float* __restrict__ conv_bias, const float* __restrict__ bn_weight,
                                          const float* __restrict__ bn_bias, const float* __restrict__ mean,
                                          const float* __restrict__ var, const float* __restrict__ sums, float count,
                                          float eps, int act, TileGeo g, int64_t tiles) {
  constexpr int KK = K * K;
  constexpr int kWin = (kPx - 1) * S + K;
  PYKERNELS_DYNAMIC_SHARED(float, tile_s);
  __shared__ float red_s[3][kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c0 = blockIdx.y * kChunk, cc = imin(kChunk, g.channels - c0), c = c0 + lane;
  const bool active = lane < cc;
  const bool want_params = partial != nullptr;
  float* wts_s = tile_s + cc * g.ch_stride;  // (cc, K * K): read by lane l at l * K * K + e, K * K odd: no conflicts
  for (int e = threadIdx.x; e < cc * KK; e += blockDim.x) wts_s[e] = weight[static_cast<int64_t>(c0) * KK + e];
  const float* w = wts_s + lane * KK;  // the loop's first __syncthreads publishes wts_s
  const ChannelParams p = channel_params(c, active, conv_bias, bn_weight, bn_bias, mean, var, eps);
  const float scale = p.rstd * p.gamma;  // dy0 = scale * (g - mean_g - xhat * mean_gx)
  const float mean_g = active && sums != nullptr ? sums[c] / count : 0.f;
  const float mean_gx = active && sums != nullptr ? sums[g.channels + c] / count : 0.f;
  const int n_groups = g.tile_h * (g.tile_w / kPx);

  float gw[KK];
#pragma unroll
  for (int e = 0; e < KK; ++e) gw[e] = 0.f;
  float sum_dy = 0.f, sum_gx = 0.f, sum_g = 0.f;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const TilePos pos = tile_pos(t, g.tiles_h, g.tiles_w, g.tile_h, g.tile_w);
    __syncthreads();  // the previous tile is no longer read
    stage_x(tile_s, x + pos.b * g.x_stride_b, g, c0, cc, pos.row0 * S - g.pad_t, pos.col0 * S - g.pad_l);
    __syncthreads();
    if (!active) continue;
    for (int gi = warp; gi < n_groups; gi += kWarps) {
      const Group grp = group_of(gi, g.tile_w, pos, g.out_h, g.out_w);
      if (grp.n_valid <= 0) continue;
      const float* t_in = tile_s + lane * g.ch_stride + grp.ry * S * g.in_cols + grp.px0 * S;
      float y0[kPx], xhat[kPx], gq[kPx], dy[kPx];
      conv_px<K, S>(y0, t_in, g.in_cols, w);
      const int64_t pixel = (pos.b * g.out_h + pos.row0 + grp.ry) * g.out_w + pos.col0 + grp.px0;
      grad_terms(xhat, gq, y0, p, src, pixel, pos.b, g.channels, c, grp.n_valid, act);
#pragma unroll
      for (int q = 0; q < kPx; ++q) {
        dy[q] = q < grp.n_valid ? scale * (gq[q] - mean_g - xhat[q] * mean_gx) : 0.f;
        if (dy_ws != nullptr && q < grp.n_valid) dy_ws[(pixel + q) * g.channels + c] = dy[q];
      }
      if (want_params) {
#pragma unroll
        for (int q = 0; q < kPx; ++q) {
          sum_dy += dy[q];
          sum_gx += gq[q] * xhat[q];
          sum_g += gq[q];
        }
#pragma unroll
        for (int u = 0; u < K; ++u) {
          float win[kWin];
#pragma unroll
          for (int e = 0; e < kWin; ++e) win[e] = t_in[u * g.in_cols + e];
#pragma unroll
          for (int v = 0; v < K; ++v) {
#pragma unroll
            for (int q = 0; q < kPx; ++q) gw[u * K + v] += dy[q] * win[q * S + v];
          }
        }
      }
    }
  }
  if (!want_params) return;  // uniform over the block
  red_s[0][warp][lane] = sum_dy;
  red_s[1][warp][lane] = sum_gx;
  red_s[2][warp][lane] = sum_g;
  __syncthreads();  // every tile done: tile_s is free
  float* acc_s = tile_s;  // (32, K * K) tap sums; 32 * K * K <= 32 * ch_stride floats
  for (int v = 0; v < kWarps; ++v) {  // the warps in a fixed order
    if (warp == v && active) {
#pragma unroll
      for (int e = 0; e < KK; ++e) acc_s[lane * KK + e] = v == 0 ? gw[e] : acc_s[lane * KK + e] + gw[e];
    }
    __syncthreads();
  }
  const int64_t m = static_cast<int64_t>(g.channels) * (KK + 3);
  float* out = partial + static_cast<int64_t>(blockIdx.x) * m;
  for (int e = threadIdx.x; e < cc * KK; e += blockDim.x) out[static_cast<int64_t>(c0) * KK + e] = acc_s[e];
  if (warp == 0 && active) {
    float totals[3] = {0.f, 0.f, 0.f};
    for (int v = 0; v < kWarps; ++v) {
#pragma unroll
      for (int j = 0; j < 3; ++j) totals[j] += red_s[j][v][lane];
    }
    float* sums_out = out + static_cast<int64_t>(g.channels) * KK + c;
#pragma unroll
    for (int j = 0; j < 3; ++j) sums_out[static_cast<int64_t>(j) * g.channels] = totals[j];
  }
}

// ---- backward: grad_x = the transposed strided conv of dy0 ----------------------------------------------------------
// Input-pixel tiles: TH x TW pixels (h0 + ry, w0 + px) of one image; the dy0 rows i_lo .. i_lo + dy_rows - 1 and
// columns j_lo .. j_lo + dy_cols - 1 they receive from (i_lo = floor((h0 + pad_t - (k - 1)) / s)) are staged.
struct InputGeo {
  int64_t x_stride_b, x_stride_c, x_stride_h, x_stride_w;
  int channels, height, width, out_h, out_w, pad_t, pad_l;
  int tile_h, tile_w, tiles_h, tiles_w;
  int dy_rows, dy_cols, ch_stride;  // staged dy0 window; floats between its channel planes (odd)
  int stash_stride;                 // NCHW: floats between the channel planes of the result stash (odd), else 0
  bool channels_last;
};

// floor((PAR - (K - 1)) / 2): the first dy0 column offset the taps of a stride-2 row group reach (K odd, PAR 0 / 1).
template <int K, int PAR>
__host__ __device__ constexpr int s2_lo() {
  return -((K - PAR) / 2);
}

// Stride 2, one staged dy0 row: acc[q] += w[u, v] * dy0[., (base + q - v) / 2] for the taps v of the parity that
// divides (base = w + pad_l of the group's first pixel, PAR = base & 1); row points at the staged column
// (base >> 1) - j_lo + lo.
template <int K, int PAR>
__device__ __forceinline__ void transposed_row_s2(float (&acc)[kPx], const float* __restrict__ row,
                                                  const float* __restrict__ wu) {
  constexpr int lo = s2_lo<K, PAR>();
  constexpr int hi = (PAR + kPx - 1) / 2;
  constexpr int kWin = hi - lo + 1;
  float win[kWin];
#pragma unroll
  for (int e = 0; e < kWin; ++e) win[e] = row[e];
#pragma unroll
  for (int v = 0; v < K; ++v) {
#pragma unroll
    for (int q = 0; q < kPx; ++q) {
      if (((PAR + q - v) & 1) == 0) acc[q] += wu[v] * win[(PAR + q - v) / 2 - lo];
    }
  }
}

// grid (input tiles, chunks), one tile per block. Dynamic smem: the staged dy0 window; NCHW: the result stash.
template <typename T, int K, int S>
__global__ void mbconv_se_bwd_input_kernel(T* __restrict__ grad_x, const float* __restrict__ dy_ws,
                                           const float* __restrict__ weight, InputGeo g) {
  PYKERNELS_DYNAMIC_SHARED(float, dy_s);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int c0 = blockIdx.y * kChunk, cc = imin(kChunk, g.channels - c0), c = c0 + lane;
  const bool active = lane < cc;
  const TilePos pos = tile_pos(blockIdx.x, g.tiles_h, g.tiles_w, g.tile_h, g.tile_w);
  const int h0 = pos.row0, w0 = pos.col0;
  const int i_lo = floor_div<S>(h0 + g.pad_t - (K - 1)), j_lo = floor_div<S>(w0 + g.pad_l - (K - 1));
  {  // stage dy0[b, i_lo + rr, j_lo + col, c0 + cl] (0 outside the output), the channel index fastest (coalesced)
    const float* dy_b = dy_ws + pos.b * g.out_h * g.out_w * g.channels;
    const int n = cc * g.dy_rows * g.dy_cols;
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
      const int cl = e % cc, rest = e / cc, col = rest % g.dy_cols, rr = rest / g.dy_cols;
      const int i = i_lo + rr, j = j_lo + col;
      float value = 0.f;
      if (i >= 0 && i < g.out_h && j >= 0 && j < g.out_w) {
        value = dy_b[(static_cast<int64_t>(i) * g.out_w + j) * g.channels + c0 + cl];
      }
      dy_s[cl * g.ch_stride + rr * g.dy_cols + col] = value;
    }
  }
  float w[K * K];
  load_weights<K>(w, weight, c, active);
  __syncthreads();

  float* stash = dy_s + cc * g.ch_stride;  // NCHW only
  T* gx_b = grad_x + pos.b * g.x_stride_b;
  if (active) {
    const float* dy_c = dy_s + lane * g.ch_stride;
    const int n_groups = g.tile_h * (g.tile_w / kPx);
    for (int gi = warp; gi < n_groups; gi += kWarps) {
      const int groups_w = g.tile_w / kPx;
      const int ry = gi / groups_w, px0 = (gi - ry * groups_w) * kPx;
      const int h = h0 + ry, wc = w0 + px0;
      const int n_valid = h < g.height ? imin(kPx, g.width - wc) : 0;
      if (n_valid <= 0) continue;
      float acc[kPx];
#pragma unroll
      for (int q = 0; q < kPx; ++q) acc[q] = 0.f;
      if constexpr (S == 1) {
        // dy0 row h + pad_t - u is staged row ry + K - 1 - u; column w + q + pad_l - v is px0 + q + K - 1 - v
        constexpr int kWin = kPx + K - 1;
#pragma unroll
        for (int u = 0; u < K; ++u) {
          const float* row = dy_c + (ry + K - 1 - u) * g.dy_cols + px0;
          float win[kWin];
#pragma unroll
          for (int e = 0; e < kWin; ++e) win[e] = row[e];
#pragma unroll
          for (int v = 0; v < K; ++v) {
#pragma unroll
            for (int q = 0; q < kPx; ++q) acc[q] += w[u * K + v] * win[q + K - 1 - v];
          }
        }
      } else {
        const int base = wc + g.pad_l;  // >= 0; its parity is the same for every group (w0, px0 even)
        const int par = base & 1;
#pragma unroll
        for (int u = 0; u < K; ++u) {
          const int ii = h + g.pad_t - u;
          if (ii & 1) continue;
          const float* row = dy_c + ((ii >> 1) - i_lo) * g.dy_cols + (base >> 1) - j_lo;
          if (par == 0) {
            transposed_row_s2<K, 0>(acc, row + s2_lo<K, 0>(), w + u * K);
          } else {
            transposed_row_s2<K, 1>(acc, row + s2_lo<K, 1>(), w + u * K);
          }
        }
      }
      if (g.channels_last) {  // lanes on consecutive channels: coalesced
        T* dst = gx_b + c + h * g.x_stride_h + wc * g.x_stride_w;
#pragma unroll
        for (int q = 0; q < kPx; ++q) {
          if (q < n_valid) dst[q * g.x_stride_w] = static_cast<T>(acc[q]);
        }
      } else {
#pragma unroll
        for (int q = 0; q < kPx; ++q) stash[lane * g.stash_stride + ry * g.tile_w + px0 + q] = acc[q];
      }
    }
  }
  if (g.channels_last) return;  // uniform over the block
  __syncthreads();
  const int n = cc * g.tile_h * g.tile_w;  // NCHW: consecutive threads on consecutive columns
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    const int col = e % g.tile_w, rest = e / g.tile_w, ry = rest % g.tile_h, cl = rest / g.tile_h;
    const int h = h0 + ry, wc = w0 + col;
    if (h < g.height && wc < g.width) {
      const float value = stash[cl * g.stash_stride + ry * g.tile_w + col];
      gx_b[(c0 + cl) * g.x_stride_c + h * g.x_stride_h + wc] = static_cast<T>(value);
    }
  }
}

// ---- launchers -------------------------------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int round_up_px(int64_t v) { return static_cast<int>((v + kPx - 1) / kPx * kPx); }
int odd(int64_t v) { return static_cast<int>(v | 1); }

void check_sizes(const Geometry& geo, const char* op) {
  TORCH_CHECK(geo.channels <= INT32_MAX / 64 && geo.height <= INT32_MAX / 4 && geo.width <= INT32_MAX / 4 &&
                  geo.out_h <= INT32_MAX / 4 && geo.out_w <= INT32_MAX / 4,
              op, " (CUDA kernel): C must be below 2^25 and H, W, out_h, out_w below 2^29, got C = ", geo.channels,
              ", H = ", geo.height, ", W = ", geo.width, ", out_h = ", geo.out_h, ", out_w = ", geo.out_w);
  TORCH_CHECK(ceil_div(geo.channels, kChunk) <= kMaxGridY, op, " (CUDA kernel): C = ", geo.channels,
              " needs more than 65535 chunks of 32 channels");
}

// The output tiles: the largest TH x TW (TH <= 8, TW <= 16) whose staged window fits the shared memory budget.
TileGeo make_tile_geo(const Geometry& geo, int64_t static_smem, const char* op) {
  const int k = static_cast<int>(geo.kernel), s = static_cast<int>(geo.stride);
  const int64_t cc = std::min<int64_t>(kChunk, geo.channels);
  TileGeo g{};
  g.x_stride_b = geo.x_stride_b;
  g.x_stride_c = geo.x_stride_c;
  g.x_stride_h = geo.x_stride_h;
  g.x_stride_w = geo.x_stride_w;
  g.channels = static_cast<int>(geo.channels);
  g.height = static_cast<int>(geo.height);
  g.width = static_cast<int>(geo.width);
  g.out_h = static_cast<int>(geo.out_h);
  g.out_w = static_cast<int>(geo.out_w);
  g.pad_t = static_cast<int>(geo.pad_t);
  g.pad_l = static_cast<int>(geo.pad_l);
  g.channels_last = geo.channels_last;
  int th = static_cast<int>(std::min<int64_t>(kMaxTileH, geo.out_h));
  int tw = std::min(kMaxTileW, round_up_px(geo.out_w));
  auto rows = [&] { return (th - 1) * s + k; };
  auto cols = [&] { return (tw - 1) * s + k; };
  auto smem = [&] { return cc * odd(static_cast<int64_t>(rows()) * cols()) * 4 + static_smem; };
  while (smem() > kSmemBudget) {
    if (cols() >= rows() && tw > kPx) {
      tw = round_up_px(tw / 2);
    } else if (th > 1) {
      th = (th + 1) / 2;
    } else if (tw > kPx) {
      tw = round_up_px(tw / 2);
    } else {
      break;  // k = 7, stride 2, one row of 4 pixels: 7 x 13 floats per channel, always fits
    }
  }
  g.tile_h = th;
  g.tile_w = tw;
  g.in_rows = rows();
  g.in_cols = cols();
  g.ch_stride = odd(static_cast<int64_t>(g.in_rows) * g.in_cols);
  g.tiles_h = static_cast<int>(ceil_div(geo.out_h, th));
  g.tiles_w = static_cast<int>(ceil_div(geo.out_w, tw));
  TORCH_CHECK(geo.batch * g.tiles_h * g.tiles_w <= INT32_MAX, op, " (CUDA kernel): too many output tiles (B = ",
              geo.batch, ", out_h = ", geo.out_h, ", out_w = ", geo.out_w, ")");
  return g;
}

int64_t tile_smem(const TileGeo& g) { return static_cast<int64_t>(std::min(kChunk, g.channels)) * g.ch_stride * 4; }
int64_t tile_count(const TileGeo& g, int64_t batch) { return batch * g.tiles_h * g.tiles_w; }

// The input tiles of the grad_x kernel, sized like the output tiles.
InputGeo make_input_geo(const Geometry& geo, const char* op) {
  const int k = static_cast<int>(geo.kernel), s = static_cast<int>(geo.stride);
  const int64_t cc = std::min<int64_t>(kChunk, geo.channels);
  InputGeo g{};
  g.x_stride_b = geo.x_stride_b;
  g.x_stride_c = geo.x_stride_c;
  g.x_stride_h = geo.x_stride_h;
  g.x_stride_w = geo.x_stride_w;
  g.channels = static_cast<int>(geo.channels);
  g.height = static_cast<int>(geo.height);
  g.width = static_cast<int>(geo.width);
  g.out_h = static_cast<int>(geo.out_h);
  g.out_w = static_cast<int>(geo.out_w);
  g.pad_t = static_cast<int>(geo.pad_t);
  g.pad_l = static_cast<int>(geo.pad_l);
  g.channels_last = geo.channels_last;
  int th = static_cast<int>(std::min<int64_t>(kMaxTileH, geo.height));
  int tw = std::min(kMaxTileW, round_up_px(geo.width));
  // dy0 rows feeding TH input rows: floor((h0 + TH - 1 + pad_t) / s) - floor((h0 + pad_t - k + 1) / s) + 1 at most
  auto rows = [&] { return static_cast<int>(ceil_div(th + k - 2, s)) + 1; };
  auto cols = [&] { return static_cast<int>(ceil_div(tw + k - 2, s)) + 1; };
  auto stash = [&] { return geo.channels_last ? 0 : odd(static_cast<int64_t>(th) * tw); };
  auto smem = [&] { return cc * (odd(static_cast<int64_t>(rows()) * cols()) + stash()) * 4; };
  while (smem() > kSmemBudget) {
    if (tw >= th && tw > kPx) {
      tw = round_up_px(tw / 2);
    } else if (th > 1) {
      th = (th + 1) / 2;
    } else if (tw > kPx) {
      tw = round_up_px(tw / 2);
    } else {
      break;
    }
  }
  g.tile_h = th;
  g.tile_w = tw;
  g.dy_rows = rows();
  g.dy_cols = cols();
  g.ch_stride = odd(static_cast<int64_t>(g.dy_rows) * g.dy_cols);
  g.stash_stride = stash();
  g.tiles_h = static_cast<int>(ceil_div(geo.height, th));
  g.tiles_w = static_cast<int>(ceil_div(geo.width, tw));
  TORCH_CHECK(geo.batch * g.tiles_h * g.tiles_w <= INT32_MAX, op, " (CUDA kernel): too many input tiles (B = ",
              geo.batch, ", H = ", geo.height, ", W = ", geo.width, ")");
  return g;
}

int64_t input_smem(const InputGeo& g) {
  return static_cast<int64_t>(std::min(kChunk, g.channels)) * (g.ch_stride + g.stash_stride) * 4;
}

// Blocks along grid.x of the grid-strided kernels: about kGridBlocks in all, at most one per tile.
int64_t stride_groups(int64_t tiles, int64_t chunks) {
  return std::max<int64_t>(1, std::min<int64_t>(tiles, ceil_div(kGridBlocks, chunks)));
}

// A (C,) parameter as a contiguous float tensor (undefined when absent: the kernels use 0 / 1).
at::Tensor param_f(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->reshape(-1).to(at::kFloat).contiguous() : at::Tensor();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

template <typename F>
void dispatch(at::ScalarType dtype, int64_t k, int64_t s, const F& f) {
  auto with_ks = [&](auto t_tag) {
    switch (k * 10 + s) {
      case 31: return f(t_tag, IntTag<3>{}, IntTag<1>{});
      case 32: return f(t_tag, IntTag<3>{}, IntTag<2>{});
      case 51: return f(t_tag, IntTag<5>{}, IntTag<1>{});
      case 52: return f(t_tag, IntTag<5>{}, IntTag<2>{});
      case 71: return f(t_tag, IntTag<7>{}, IntTag<1>{});
      case 72: return f(t_tag, IntTag<7>{}, IntTag<2>{});
      default: TORCH_CHECK(false, "mbconv_se (CUDA kernel): unexpected kernel size ", k, " / stride ", s);
    }
  };
  switch (dtype) {
    case at::kHalf: return with_ks(TypeTag<c10::Half>{});
    case at::kBFloat16: return with_ks(TypeTag<c10::BFloat16>{});
    case at::kFloat: return with_ks(TypeTag<float>{});
    default: TORCH_CHECK(false, "mbconv_se (CUDA kernel): unexpected dtype ", dtype);
  }
}

// out[r, m] = sum_t partial[r, t, m] (partial (rows, terms, cols) contiguous float), in a fixed order.
constexpr int64_t kSplitTerms = 32;  // from this many terms on, 8 warps share each column's terms

void launch_sum(float* out, const at::Tensor& partial, int64_t rows, int64_t terms, int64_t cols,
                cudaStream_t stream) {
  const unsigned grid_y = static_cast<unsigned>(std::min(rows, kMaxGridY));
  if (terms < kSplitTerms) {
    const auto kernel = &mbconv_se_sum_kernel<1>;
    PYKERNELS_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div(cols, kThreads)), grid_y), dim3(kThreads), 0, stream,
                     out, partial.const_data_ptr<float>(), rows, terms, cols);
  } else {
    const auto kernel = &mbconv_se_sum_kernel<kWarps>;
    PYKERNELS_LAUNCH(kernel, dim3(static_cast<unsigned>(ceil_div(cols, 32)), grid_y), dim3(kThreads), 0, stream, out,
                     partial.const_data_ptr<float>(), rows, terms, cols);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mbconv_se_fwd_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& conv_bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var, double eps,
    int64_t stride, int64_t pad_t, int64_t pad_l, int64_t out_h, int64_t out_w, c10::string_view act,
    bool batch_stats) {
  constexpr const char* op = "mbconv_se_fwd";
  TORCH_CHECK(PYKERNELS_ON_DEVICE(x), op, " (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Geometry geo = check_fwd_args(x, weight, conv_bias, bn_weight, bn_bias, running_mean, running_var, eps,
                                      stride, pad_t, pad_l, out_h, out_w, act, batch_stats, /*allow_double=*/false);
  FwdOutputs outs = alloc_fwd(x, geo);
  auto result = [&] { return std::make_tuple(outs.out, outs.pooled, outs.mean, outs.var); };
  if (geo.empty()) {  // statistics of no values: NaN, as torch's mean of an empty tensor
    if (batch_stats) {
      outs.mean.fill_(std::numeric_limits<double>::quiet_NaN());
      outs.var.fill_(std::numeric_limits<double>::quiet_NaN());
    }
    return result();
  }
  check_sizes(geo, op);
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor cb = param_f(conv_bias), bw = param_f(bn_weight), bb = param_f(bn_bias);
  const at::Tensor mean = batch_stats ? outs.mean : param_f(running_mean);
  const at::Tensor var = batch_stats ? outs.var : param_f(running_var);
  const int64_t chunks = ceil_div(geo.channels, kChunk);
  const TileGeo tg = make_tile_geo(geo, /*static_smem=*/3 * kWarps * 32 * 4, op);
  const int64_t tiles = tile_count(tg, geo.batch);
  const int64_t smem = tile_smem(tg);
  const int64_t groups = stride_groups(tiles, chunks);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor stats_partial;
  if (batch_stats) stats_partial = at::empty({groups, 3, geo.channels}, f32);
  const int64_t per_image = static_cast<int64_t>(tg.tiles_h) * tg.tiles_w;
  // (B, tiles per image, C); one tile per image: the tiles' sums are pooled itself
  at::Tensor pool_partial = per_image == 1 ? outs.pooled : at::empty({tiles, geo.channels}, f32);
  const int act_id = static_cast<int>(geo.act);

  dispatch(x.scalar_type(), geo.kernel, geo.stride, [&](auto t_tag, auto k_tag, auto s_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr int K = decltype(k_tag)::value, S = decltype(s_tag)::value;
    if (batch_stats) {
      const auto stats = &mbconv_se_stats_kernel<T, K, S>;
      PYKERNELS_LAUNCH(stats, dim3(static_cast<unsigned>(groups), static_cast<unsigned>(chunks)), dim3(kThreads),
                       smem, stream, stats_partial.mutable_data_ptr<float>(), x.const_data_ptr<T>(),
                       w.const_data_ptr<float>(), ptr_or_null(cb), tg, tiles);
      const auto merge = &mbconv_se_stats_merge_kernel;
      PYKERNELS_LAUNCH(merge, dim3(static_cast<unsigned>(ceil_div(geo.channels, 32))), dim3(kThreads), 0, stream,
                       outs.mean.mutable_data_ptr<float>(), outs.var.mutable_data_ptr<float>(),
                       stats_partial.const_data_ptr<float>(), groups, static_cast<int>(geo.channels),
                       static_cast<float>(geo.out_pixels()));
    }
    const auto kernel = &mbconv_se_fwd_kernel<T, K, S>;
    PYKERNELS_LAUNCH(kernel, dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks)), dim3(kThreads), smem,
                     stream, outs.out.mutable_data_ptr<T>(), pool_partial.mutable_data_ptr<float>(),
                     x.const_data_ptr<T>(), w.const_data_ptr<float>(), ptr_or_null(cb), ptr_or_null(bw),
                     ptr_or_null(bb), mean.const_data_ptr<float>(), var.const_data_ptr<float>(),
                     static_cast<float>(eps), act_id, tg);
  });
  if (per_image > 1) {
    launch_sum(outs.pooled.mutable_data_ptr<float>(), pool_partial, geo.batch, per_image, geo.channels, stream);
  }
  return result();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mbconv_se_bwd_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_pooled, const at::Tensor& x,
    const at::Tensor& weight, const c10::optional<at::Tensor>& conv_bias, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, const at::Tensor& mean, const at::Tensor& var, double eps,
    int64_t stride, int64_t pad_t, int64_t pad_l, c10::string_view act, bool batch_stats, bool need_grad_x,
    bool need_grad_params) {
  constexpr const char* op = "mbconv_se_bwd";
  TORCH_CHECK(PYKERNELS_ON_DEVICE(x), op, " (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Geometry geo = check_bwd_args(grad_out, grad_pooled, x, weight, conv_bias, bn_weight, bn_bias, mean, var, eps,
                                      stride, pad_t, pad_l, act, batch_stats, /*allow_double=*/false);
  BwdOutputs outs = alloc_bwd(x, weight, conv_bias, bn_weight, bn_bias, need_grad_x, need_grad_params);
  auto result = [&] {
    return std::make_tuple(outs.grad_x, outs.grad_weight, outs.grad_conv_bias, outs.grad_bn_weight,
                           outs.grad_bn_bias);
  };
  if (!need_grad_x && !need_grad_params) return result();
  if (geo.empty()) {  // no pixels: every parameter grad is a sum of nothing
    for (at::Tensor* t : {&outs.grad_weight, &outs.grad_conv_bias, &outs.grad_bn_weight, &outs.grad_bn_bias}) {
      if (t->numel()) t->zero_();
    }
    return result();
  }
  check_sizes(geo, op);
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor cb = param_f(conv_bias), bw = param_f(bn_weight), bb = param_f(bn_bias);
  const at::Tensor mean_f = mean.reshape(-1).to(at::kFloat).contiguous();
  const at::Tensor var_f = var.reshape(-1).to(at::kFloat).contiguous();
  // grad_out in x's dtype is read as is; another dtype is converted to float (one kernel set per x dtype).
  const bool grad_native = grad_out.scalar_type() == x.scalar_type();
  const at::Tensor grad_f = grad_native ? at::Tensor() : grad_out.to(at::kFloat);
  const int64_t k = geo.kernel, kk = k * k, channels = geo.channels;
  const int64_t chunks = ceil_div(channels, kChunk);
  const int64_t weights_smem = std::min<int64_t>(kChunk, channels) * kk * 4;  // the main kernel's staged weights
  const TileGeo tg = make_tile_geo(geo, /*static_smem=*/3 * kWarps * 32 * 4 + weights_smem, op);
  const int64_t tiles = tile_count(tg, geo.batch);
  const int64_t smem = tile_smem(tg);
  const int64_t groups = stride_groups(tiles, chunks);
  const InputGeo ig = make_input_geo(geo, op);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto f32 = x.options().dtype(at::kFloat);
  const int act_id = static_cast<int>(geo.act);
  const float count = static_cast<float>(geo.out_pixels());

  at::Tensor dy_ws, sums, partial;
  if (need_grad_x) dy_ws = at::empty({geo.batch, geo.out_h, geo.out_w, channels}, f32);
  if (need_grad_params) partial = at::empty({groups, channels * (kk + 3)}, f32);

  dispatch(x.scalar_type(), k, geo.stride, [&](auto t_tag, auto k_tag, auto s_tag) {
    using T = typename decltype(t_tag)::type;
    constexpr int K = decltype(k_tag)::value, S = decltype(s_tag)::value;
    const GradSource<T> src{grad_native ? grad_out.const_data_ptr<T>() : nullptr,
                            grad_native ? nullptr : grad_f.const_data_ptr<float>(),
                            grad_pooled.has_value() ? grad_pooled->const_data_ptr<float>() : nullptr};
    const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(chunks));
    if (batch_stats) {
      at::Tensor reduce_partial = at::empty({groups, 2, channels}, f32);
      const auto reduce = &mbconv_se_bwd_reduce_kernel<T, K, S>;
      PYKERNELS_LAUNCH(reduce, grid, dim3(kThreads), smem, stream, reduce_partial.mutable_data_ptr<float>(), src,
                       x.const_data_ptr<T>(), w.const_data_ptr<float>(), ptr_or_null(cb), ptr_or_null(bw),
                       ptr_or_null(bb), mean_f.const_data_ptr<float>(), var_f.const_data_ptr<float>(),
                       static_cast<float>(eps), act_id, tg, tiles);
      if (groups == 1) {  // one block per chunk: its partial is the sum
        sums = reduce_partial.view({2, channels});
      } else {
        sums = at::empty({2, channels}, f32);
        launch_sum(sums.mutable_data_ptr<float>(), reduce_partial, 1, groups, 2 * channels, stream);
      }
    }
    const auto main = &mbconv_se_bwd_main_kernel<T, K, S>;
    PYKERNELS_LAUNCH(main, grid, dim3(kThreads), smem + weights_smem, stream,
                     need_grad_x ? dy_ws.mutable_data_ptr<float>() : nullptr,
                     need_grad_params ? partial.mutable_data_ptr<float>() : nullptr, src, x.const_data_ptr<T>(),
                     w.const_data_ptr<float>(), ptr_or_null(cb), ptr_or_null(bw), ptr_or_null(bb),
                     mean_f.const_data_ptr<float>(), var_f.const_data_ptr<float>(), ptr_or_null(sums), count,
                     static_cast<float>(eps), act_id, tg, tiles);
    if (need_grad_x) {
      const auto input = &mbconv_se_bwd_input_kernel<T, K, S>;
      const int64_t in_tiles = geo.batch * ig.tiles_h * ig.tiles_w;
      PYKERNELS_LAUNCH(input, dim3(static_cast<unsigned>(in_tiles), static_cast<unsigned>(chunks)), dim3(kThreads),
                       input_smem(ig), stream, outs.grad_x.mutable_data_ptr<T>(), dy_ws.const_data_ptr<float>(),
                       w.const_data_ptr<float>(), ig);
    }
  });

  if (need_grad_params) {
    // Fixed-order reduction of the per-block partial sums (deterministic).
    at::Tensor totals = partial.view({-1});  // one block per chunk: its partial is the sum
    if (groups > 1) {
      totals = at::empty({channels * (kk + 3)}, f32);
      launch_sum(totals.mutable_data_ptr<float>(), partial, 1, groups, channels * (kk + 3), stream);
    }
    outs.grad_weight.copy_(totals.narrow(0, 0, channels * kk).view(weight.sizes()));
    if (outs.want_conv_bias) outs.grad_conv_bias.copy_(totals.narrow(0, channels * kk, channels));
    if (outs.want_bn_weight) outs.grad_bn_weight.copy_(totals.narrow(0, channels * (kk + 1), channels));
    if (outs.want_bn_bias) outs.grad_bn_bias.copy_(totals.narrow(0, channels * (kk + 2), channels));
  }
  return result();
}

}  // namespace
}  // namespace mbconv_se
}  // namespace pykernels

TORCH_LIBRARY_IMPL(PYKERNELS_LIBRARY, PYKERNELS_DEVICE, m) {
  m.impl("mbconv_se_fwd", &pykernels::mbconv_se::mbconv_se_fwd_cuda);
  m.impl("mbconv_se_bwd", &pykernels::mbconv_se::mbconv_se_bwd_cuda);
}

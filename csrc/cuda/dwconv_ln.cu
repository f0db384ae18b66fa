// Depthwise k x k conv fused with LayerNorm over channels (ConvNeXt's block front; Liu et al. 2022, "A ConvNet for
// the 2020s"): the CUDA kernels of pykernels::dwconv_ln_fwd / dwconv_ln_bwd (contract in csrc/ops.cpp, argument
// checks, geometry and outputs in csrc/dwconv_ln_args.h).
//
//   forward:  y[p, c] = sum_{i,j} x[b, c, h+i-r, w+j-r] * w[c, i, j] + conv_bias[c]     (p = (b, h, w), r = k / 2)
//             out[p, c] = (y[p, c] - mean[p]) * rstd[p] * ln_weight[c] + ln_bias[c]      (out: (B, H, W, C))
//   backward: xhat = (y - mean) * rstd, gw = g * ln_weight, a = mean_c(gw), m2 = mean_c(gw * xhat),
//             dy = rstd * (gw - a - xhat * m2); grad_x = transposed conv of dy; grad_w[c, i, j] = sum_p dy * x[...]
//
// Tiles. Every kernel works on tiles of TW consecutive pixels of one image row (b, h, w0 .. w0 + TW) and walks the
// channels in chunks of CC: a chunk's input tile with its halo (CC channels x k rows x TW + k - 1 columns) and its
// CC x k x k weights are staged in shared memory (fp32, fp64 for fp64 x), read from NCHW or channels_last x in place
// through strides, with the thread -> element mapping that makes the global reads coalesced in either layout. The
// conv of a staged chunk gives each thread kPx consecutive pixels of one channel (a sliding window along the rows).
// TW shrinks (from 16, or 32 for the grad kernels) until the block's dynamic shared memory fits 96 KB; launches above
// 48 KB opt in with cudaFuncSetAttribute. 256 threads per block.
//   dwconv_ln_fwd_kernel       one tile per block: conv of every chunk into a shared (TW, C) stash of y; then one
//                              warp per pixel: mean and (two-pass) variance with warp shuffles, out written
//                              coalesced over C, mean / rstd by lane 0.
//   dwconv_ln_bwd_dy_kernel    tiles grid-strided over a fixed grid: y recomputed into the stash as above; one warp
//                              per pixel reduces a = mean(gw), m2 = mean(gw * xhat); then one thread per channel
//                              writes dy (computed in acc_t, stored in a (B, H, W, C) workspace of x's dtype: 2
//                              bytes an element for fp16 / bf16) and accumulates sum dy (unrounded), sum g * xhat,
//                              sum g for its channels in shared memory -> partial[block, 3, C].
//   dwconv_ln_bwd_input_kernel grad_x: the conv of the dy workspace with the flipped weights (same staging), written
//                              in x's layout.
//   dwconv_ln_bwd_weight_kernel grid (channel chunk, group): block (chunk, g) walks tiles g, g + G, ... and sums
//                              dy[p, c] * x[tile] for its CC x k x k weights -> partial_w[g, C, k, k]; a thread owns
//                              (channel, tap row(s), pixel segment) and slides the row's k x values along the pixels
//                              in registers: 2 shared loads per k FMAs (k = 3: 4 per 9) instead of 2 per FMA.
// The partial sums are reduced by at::sum(0) in a fixed order: deterministic, and the grids depend on the shape only.
// Every launch goes through PYKERNELS_LAUNCH, the device check and registration through the macros of launch.cuh
// (tests/cuda_emu runs this file unmodified on the CPU).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "dwconv_ln_args.h"
#include "launch.cuh"

namespace pykernels {
namespace dwconv_ln {
namespace {

constexpr int kThreads = 256;                   // threads per block, every kernel
constexpr int kChunk = 32;                      // CC: channels staged per chunk (fewer when C is smaller)
constexpr int kMaxTileFwd = 16;                 // TW of the forward / dy kernels (halved until the smem fits)
constexpr int kMaxTileConv = 32;                // TW of the grad_x / grad_w kernels
constexpr int kPxFwd = 2;                       // pixels per thread in the conv of the forward / dy kernels
constexpr int kPxConv = 4;                      // ... of the grad_x kernel
constexpr int64_t kSmemBudget = 96 * 1024;      // dynamic shared memory per block we aim for (opt-in above 48 KB)
constexpr int64_t kSmemDefault = 48 * 1024;     // above this a kernel needs cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr int64_t kSmemMax = 160 * 1024;        // hard limit (sm_80 allows 163 KB per block)
constexpr int64_t kDyBlocks = 1024;             // grid of the dy kernel when it writes partial sums
constexpr int64_t kWeightBlocks = 2048;         // about this many blocks for the grad_w kernel

// Calls f(TypeTag<T>{}, ...) with the C++ types of a dispatch.
template <typename T>
struct TypeTag {
  using type = T;
};

// ---- device helpers --------------------------------------------------------------------------------------------
__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }

// Sum over the 32 lanes of a warp, the same value in every lane (butterfly; every lane must call).
template <typename acc_t>
__device__ __forceinline__ acc_t warp_allsum(acc_t value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// Row length (columns) of a staged tile: TW + k - 1 rounded up to odd, so that the k * L words between the tiles of
// consecutive channels are odd and lanes reading one channel each hit distinct banks.
__host__ __device__ __forceinline__ int tile_row(int tile_w, int k) { return (tile_w + k - 1) | 1; }

// Where a tile of channels [c0, c0 + CC) and pixels (h, w0 .. w0 + TW) reads its input.
struct TileSource {
  int64_t stride_c, stride_h, stride_w;  // element strides of the input within one image
  int channels, height, width, k;
  bool channels_fast;  // stride_c == 1: stage with the channel index fastest (coalesced), else the column
};

// Stages input[c0 + cl, h + i - r, w0 + col - r] (zero outside the image or past C) into tile[cl][i][col] (rows of
// tile_row(tile_w, k)). The caller synchronises around it.
template <typename in_t, typename acc_t>
__device__ __forceinline__ void stage_input(acc_t* __restrict__ tile, const in_t* __restrict__ in,
                                            const TileSource& src, int c0, int cc, int h, int w0, int tile_w) {
  const int k = src.k, r = k / 2, row = tile_row(tile_w, k), cols = tile_w + k - 1;
  const int n = cc * k * cols;
  for (int e = threadIdx.x; e < n; e += blockDim.x) {
    int cl, i, col;
    if (src.channels_fast) {
      cl = e % cc;
      col = (e / cc) % cols;
      i = e / (cc * cols);
    } else {
      col = e % cols;
      i = (e / cols) % k;
      cl = e / (cols * k);
    }
    const int c = c0 + cl, hh = h + i - r, ww = w0 + col - r;
    acc_t value = acc_t(0);
    if (c < src.channels && hh >= 0 && hh < src.height && ww >= 0 && ww < src.width) {
      value = static_cast<acc_t>(in[c * src.stride_c + hh * src.stride_h + ww * src.stride_w]);
    }
    tile[(cl * k + i) * row + col] = value;
  }
}

// Stages the chunk's weights into wts[cl][i * k + j] = w[c0 + cl, i, j] (flip: w[c0 + cl, k-1-i, k-1-j]), 0 past C.
template <typename acc_t>
__device__ __forceinline__ void stage_weights(acc_t* __restrict__ wts, const acc_t* __restrict__ weight, bool flip,
                                              int c0, int cc, int channels, int k) {
  const int kk = k * k;
  for (int e = threadIdx.x; e < cc * kk; e += blockDim.x) {
    const int cl = e / kk, ij = e % kk, c = c0 + cl;
    wts[e] = c < channels ? weight[static_cast<int64_t>(c) * kk + (flip ? kk - 1 - ij : ij)] : acc_t(0);
  }
}

// Conv of the staged chunk for pixels [0, n_pix) of the tile and channels [0, cc) of the chunk (c < C only):
// store(p, cl, sum) with the (i, j) terms summed row-major. Each thread computes kPx consecutive pixels of one channel
// (tile_w is a multiple of kPx), sliding a window of kPx inputs along each row: about (2k + kPx) / kPx shared loads
// per output and row instead of 2k. channels_fast: consecutive threads take consecutive channels (else consecutive
// pixel groups).
template <int kPx, typename acc_t, typename Store>
__device__ __forceinline__ void conv_staged(const acc_t* __restrict__ tile, const acc_t* __restrict__ wts, int k,
                                            int tile_w, int cc, int n_pix, int c0, int channels, bool channels_fast,
                                            Store store) {
  const int row = tile_row(tile_w, k), kk = k * k;
  const int groups = (n_pix + kPx - 1) / kPx;
  const int n = cc * groups;
  for (int m = threadIdx.x; m < n; m += blockDim.x) {
    const int cl = channels_fast ? m % cc : m / groups;
    const int p0 = (channels_fast ? m / cc : m % groups) * kPx;
    if (c0 + cl >= channels) continue;
    const acc_t* t = tile + cl * k * row + p0;
    const acc_t* wv = wts + cl * kk;
    acc_t sum[kPx];
#pragma unroll
    for (int q = 0; q < kPx; ++q) sum[q] = acc_t(0);
    for (int i = 0; i < k; ++i) {
      const acc_t* tr = t + i * row;  // columns p0 .. p0 + kPx + k - 2 of row i are staged (tile_w % kPx == 0)
      acc_t window[kPx];
#pragma unroll
      for (int q = 0; q < kPx; ++q) window[q] = tr[q];
      for (int j = 0; j < k; ++j) {
        const acc_t wj = wv[i * k + j];
#pragma unroll
        for (int q = 0; q < kPx; ++q) sum[q] += window[q] * wj;
        if (j + 1 < k) {
#pragma unroll
          for (int q = 0; q + 1 < kPx; ++q) window[q] = window[q + 1];
          window[kPx - 1] = tr[j + kPx];
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kPx; ++q) {
      if (p0 + q < n_pix) store(p0 + q, cl, sum[q]);
    }
  }
}

// Block index -> tile (b, h, w0) of width tile_w; n_pix: its pixels inside the image.
struct Tile {
  int64_t b;
  int h, w0, n_pix;
};

__device__ __forceinline__ Tile tile_of(int64_t t, int tiles_w, int height, int width, int tile_w) {
  Tile tile;
  const int64_t row = t / tiles_w;
  tile.w0 = static_cast<int>(t - row * tiles_w) * tile_w;
  tile.h = static_cast<int>(row % height);
  tile.b = row / height;
  tile.n_pix = width - tile.w0 < tile_w ? width - tile.w0 : tile_w;
  return tile;
}

// y_s[p * C + c] = conv(x)[p, c] + conv_bias[c] for the pixels of `tile`, every chunk of channels.
template <typename T, typename acc_t>
__device__ __forceinline__ void conv_into_stash(acc_t* __restrict__ y_s, acc_t* __restrict__ tile_s,
                                                acc_t* __restrict__ w_s, const T* __restrict__ x_b,
                                                const TileSource& src, const acc_t* __restrict__ weight,
                                                const acc_t* __restrict__ conv_bias, const Tile& tile, int tile_w,
                                                int cc) {
  const int channels = src.channels;
  for (int c0 = 0; c0 < channels; c0 += cc) {
    __syncthreads();  // the previous chunk's tile (or the previous tile's stash) is no longer read
    stage_input(tile_s, x_b, src, c0, cc, tile.h, tile.w0, tile_w);
    stage_weights(w_s, weight, false, c0, cc, channels, src.k);
    __syncthreads();
    conv_staged<kPxFwd>(tile_s, w_s, src.k, tile_w, cc, tile.n_pix, c0, channels, true, [&](int p, int cl, acc_t sum) {
      const int c = c0 + cl;
      y_s[p * channels + c] = conv_bias != nullptr ? sum + conv_bias[c] : sum;
    });
  }
  __syncthreads();
}

// ---- forward ---------------------------------------------------------------------------------------------------
// grid.x: B * H * tiles_w tiles. Dynamic smem: y stash (TW, C), tile (CC, k, L), weights (CC, k * k).
template <typename T, typename acc_t>
__global__ void dwconv_ln_fwd_kernel(T* __restrict__ out, acc_t* __restrict__ mean, acc_t* __restrict__ rstd,
                                     const T* __restrict__ x, const acc_t* __restrict__ weight,
                                     const acc_t* __restrict__ conv_bias, const acc_t* __restrict__ ln_weight,
                                     const acc_t* __restrict__ ln_bias, TileSource src, int64_t x_stride_b,
                                     int tiles_w, int tile_w, int cc, acc_t eps) {
  PYKERNELS_DYNAMIC_SHARED(unsigned char, smem);
  const int channels = src.channels, k = src.k;
  acc_t* y_s = reinterpret_cast<acc_t*>(smem);
  acc_t* tile_s = y_s + tile_w * channels;
  acc_t* w_s = tile_s + cc * k * tile_row(tile_w, k);

  const Tile tile = tile_of(blockIdx.x, tiles_w, src.height, src.width, tile_w);
  conv_into_stash(y_s, tile_s, w_s, x + tile.b * x_stride_b, src, weight, conv_bias, tile, tile_w, cc);

  // One warp per pixel: two-pass mean / variance over the stash, then the normalised row.
  const int lane = threadIdx.x % 32;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(channels);
  for (int p = threadIdx.x / 32; p < tile.n_pix; p += blockDim.x / 32) {
    const acc_t* y = y_s + p * channels;
    acc_t sum = acc_t(0);
    for (int c = lane; c < channels; c += 32) sum += y[c];
    const acc_t mu = warp_allsum(sum) * inv_c;
    acc_t sq = acc_t(0);
    for (int c = lane; c < channels; c += 32) {
      const acc_t d = y[c] - mu;
      sq += d * d;
    }
    const acc_t rs = rsqrt_acc(warp_allsum(sq) * inv_c + eps);
    const int64_t pixel = (tile.b * src.height + tile.h) * src.width + tile.w0 + p;
    T* out_row = out + pixel * channels;
    for (int c = lane; c < channels; c += 32) {
      acc_t v = (y[c] - mu) * rs;
      if (ln_weight != nullptr) v *= ln_weight[c];
      if (ln_bias != nullptr) v += ln_bias[c];
      out_row[c] = static_cast<T>(v);
    }
    if (lane == 0) {
      mean[pixel] = mu;
      rstd[pixel] = rs;
    }
  }
}

// ---- backward: dy (and the partial sums of the LN / conv-bias grads) -------------------------------------------
// grid.x blocks walk the B * H * tiles_w tiles (grid-strided). Dynamic smem: y stash (TW, C), tile, weights, per-pixel
// stats (4, TW), and when partial != nullptr the block's channel sums (3, C), each owned by one thread.
template <typename T, typename G, typename acc_t>
__global__ void dwconv_ln_bwd_dy_kernel(T* __restrict__ dy_ws, acc_t* __restrict__ partial,
                                        const G* __restrict__ grad_out, const T* __restrict__ x,
                                        const acc_t* __restrict__ weight, const acc_t* __restrict__ conv_bias,
                                        const acc_t* __restrict__ ln_weight, const acc_t* __restrict__ mean,
                                        const acc_t* __restrict__ rstd, TileSource src, int64_t x_stride_b,
                                        int64_t tiles, int tiles_w, int tile_w, int cc) {
  PYKERNELS_DYNAMIC_SHARED(unsigned char, smem);
  const int channels = src.channels, k = src.k;
  acc_t* y_s = reinterpret_cast<acc_t*>(smem);
  acc_t* tile_s = y_s + tile_w * channels;
  acc_t* w_s = tile_s + cc * k * tile_row(tile_w, k);
  acc_t* stats_s = w_s + cc * k * k;  // [0]: mean, [1]: rstd, [2]: a, [3]: m2; tile_w each
  acc_t* sums_s = stats_s + 4 * tile_w;  // (3, C): sum dy, sum g * xhat, sum g
  if (partial != nullptr) {
    for (int c = threadIdx.x; c < channels; c += blockDim.x) {
      sums_s[c] = sums_s[channels + c] = sums_s[2 * channels + c] = acc_t(0);
    }
  }
  const int lane = threadIdx.x % 32;
  const acc_t inv_c = acc_t(1) / static_cast<acc_t>(channels);

  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const Tile tile = tile_of(t, tiles_w, src.height, src.width, tile_w);
    const int64_t pixel0 = (tile.b * src.height + tile.h) * src.width + tile.w0;
    conv_into_stash(y_s, tile_s, w_s, x + tile.b * x_stride_b, src, weight, conv_bias, tile, tile_w, cc);

    // One warp per pixel: a = mean_c(gw), m2 = mean_c(gw * xhat).
    for (int p = threadIdx.x / 32; p < tile.n_pix; p += blockDim.x / 32) {
      const acc_t mu = mean[pixel0 + p], rs = rstd[pixel0 + p];
      const acc_t* y = y_s + p * channels;
      const G* g_row = grad_out + (pixel0 + p) * channels;
      acc_t s_gw = acc_t(0), s_gwx = acc_t(0);
      for (int c = lane; c < channels; c += 32) {
        acc_t gw = static_cast<acc_t>(g_row[c]);
        if (ln_weight != nullptr) gw *= ln_weight[c];
        s_gw += gw;
        s_gwx += gw * ((y[c] - mu) * rs);
      }
      s_gw = warp_allsum(s_gw);
      s_gwx = warp_allsum(s_gwx);
      if (lane == 0) {
        stats_s[p] = mu;
        stats_s[tile_w + p] = rs;
        stats_s[2 * tile_w + p] = s_gw * inv_c;
        stats_s[3 * tile_w + p] = s_gwx * inv_c;
      }
    }
    __syncthreads();

    // One thread per channel: dy for the tile's pixels (coalesced over C), and the channel sums.
    for (int c = threadIdx.x; c < channels; c += blockDim.x) {
      const acc_t lw = ln_weight != nullptr ? ln_weight[c] : acc_t(1);
      acc_t s_dy = acc_t(0), s_gx = acc_t(0), s_g = acc_t(0);
      for (int p = 0; p < tile.n_pix; ++p) {
        const acc_t rs = stats_s[tile_w + p];
        const acc_t xhat = (y_s[p * channels + c] - stats_s[p]) * rs;
        const acc_t g = static_cast<acc_t>(grad_out[(pixel0 + p) * channels + c]);
        const acc_t dy = rs * (g * lw - stats_s[2 * tile_w + p] - xhat * stats_s[3 * tile_w + p]);
        dy_ws[(pixel0 + p) * channels + c] = static_cast<T>(dy);
        s_dy += dy;
        s_gx += g * xhat;
        s_g += g;
      }
      if (partial != nullptr) {
        sums_s[c] += s_dy;
        sums_s[channels + c] += s_gx;
        sums_s[2 * channels + c] += s_g;
      }
    }
    // The next tile's conv_into_stash starts with a __syncthreads before it overwrites the stash and the stats.
  }
  if (partial != nullptr) {
    acc_t* block_partial = partial + static_cast<int64_t>(blockIdx.x) * 3 * channels;
    for (int c = threadIdx.x; c < channels; c += blockDim.x) {  // the owner of c wrote these sums: no barrier needed
      block_partial[c] = sums_s[c];
      block_partial[channels + c] = sums_s[channels + c];
      block_partial[2 * channels + c] = sums_s[2 * channels + c];
    }
  }
}

// ---- backward: grad_x = transposed conv of dy -------------------------------------------------------------------
// grid.x: B * H * tiles_w tiles; dy_ws (B, H, W, C) read as a channels-last image; grad_x written through x's
// strides (consecutive threads on consecutive channels for channels_last, on consecutive pixels for NCHW).
template <typename T, typename acc_t>
__global__ void dwconv_ln_bwd_input_kernel(T* __restrict__ grad_x, const T* __restrict__ dy_ws,
                                           const acc_t* __restrict__ weight, TileSource dy_src, int64_t x_stride_b,
                                           int64_t x_stride_c, int64_t x_stride_h, int64_t x_stride_w, int tiles_w,
                                           int tile_w, int cc, bool x_channels_last) {
  PYKERNELS_DYNAMIC_SHARED(unsigned char, smem);
  const int channels = dy_src.channels, k = dy_src.k;
  acc_t* tile_s = reinterpret_cast<acc_t*>(smem);
  acc_t* w_s = tile_s + cc * k * tile_row(tile_w, k);
  const Tile tile = tile_of(blockIdx.x, tiles_w, dy_src.height, dy_src.width, tile_w);
  const T* dy_b = dy_ws + tile.b * dy_src.height * dy_src.width * channels;
  T* gx = grad_x + tile.b * x_stride_b + tile.h * x_stride_h + tile.w0 * x_stride_w;
  for (int c0 = 0; c0 < channels; c0 += cc) {
    __syncthreads();
    stage_input(tile_s, dy_b, dy_src, c0, cc, tile.h, tile.w0, tile_w);
    stage_weights(w_s, weight, true, c0, cc, channels, k);
    __syncthreads();
    conv_staged<kPxConv>(tile_s, w_s, k, tile_w, cc, tile.n_pix, c0, channels, x_channels_last, [&](int p, int cl, acc_t sum) {
      gx[(c0 + cl) * x_stride_c + p * x_stride_w] = static_cast<T>(sum);
    });
  }
}

// ---- backward: grad_w -------------------------------------------------------------------------------------------
// Tap rows a thread owns in the grad_w kernel: all three of k = 3 (1 dy + 3 x shared loads per 9 FMAs), one otherwise
// (1 dy + 1 x per k FMAs).
__host__ __device__ __forceinline__ int weight_rows_per_thread(int k) { return k == 3 ? 3 : 1; }
constexpr int kWeightMinSegment = 16;  // pixels per thread and tile of the grad_w kernel, at least (tile_w >= 16)

// Pixel splits of a grad_w tile: enough (channel, tap rows, split) items to fill the block, segments of >= 16 pixels.
__host__ __device__ __forceinline__ int weight_splits(int k, int cc, int tile_w) {
  const int items = cc * (k / weight_rows_per_thread(k));
  const int by_threads = kThreads / items, by_pixels = tile_w / kWeightMinSegment;
  const int splits = by_threads < by_pixels ? by_threads : by_pixels;
  return splits > 1 ? splits : 1;
}

// One staged tile's contribution to grad_w. Item (s, cl, g) owns channel c0 + cl, tap rows i = g * R .. g * R + R - 1
// and pixels [s * seg, (s + 1) * seg) of the tile: it slides a window of K x values per row along the pixels in
// registers (one new x per row and pixel), loads dy[p, cl] once per pixel and does R * K FMAs with it, then adds its
// R * K sums to acc_s[s][cl][i][j] (the item's own slots: the same thread every tile, no barrier).
// Shared loads per FMA: (seg * (1 + R) + R * (K - 1) + R * K) / (seg * R * K): 0.34 at k = 7 (seg = 32).
template <int K, int R, typename acc_t>
__device__ __forceinline__ void weight_tile(acc_t* __restrict__ acc_s, const acc_t* __restrict__ tile_s,
                                            const acc_t* __restrict__ dyt_s, int cc, int row, int n_pix, int splits,
                                            int seg) {
  constexpr int kGroups = K / R;
  const int n_items = splits * cc * kGroups;
  for (int m = threadIdx.x; m < n_items; m += blockDim.x) {
    const int g = m % kGroups, cl = (m / kGroups) % cc, s = m / (kGroups * cc);
    const int p0 = s * seg, p1 = p0 + seg < n_pix ? p0 + seg : n_pix;
    if (p0 >= p1) continue;
    const acc_t* xr = tile_s + (cl * K + g * R) * row;  // row r of the item: xr[r * row + p + j] = x at tap (i, j)
    const acc_t* dyc = dyt_s + cl;
    acc_t acc[R][K];
    acc_t window[R][K];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int j = 0; j < K; ++j) acc[r][j] = acc_t(0);
#pragma unroll
      for (int j = 0; j + 1 < K; ++j) window[r][j] = xr[r * row + p0 + j];
    }
    for (int p = p0; p < p1; ++p) {
      const acc_t d = dyc[p * cc];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        window[r][K - 1] = xr[r * row + p + K - 1];
#pragma unroll
        for (int j = 0; j < K; ++j) acc[r][j] += d * window[r][j];
#pragma unroll
        for (int j = 0; j + 1 < K; ++j) window[r][j] = window[r][j + 1];
      }
    }
    acc_t* a = acc_s + ((s * cc + cl) * K + g * R) * K;
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int j = 0; j < K; ++j) a[r * K + j] += acc[r][j];
    }
  }
}

// grid (x: chunk of CC channels, y: G groups); block (chunk, g) walks tiles g, g + G, ... Dynamic smem: x tile
// (CC, k, L), dy tile (TW, CC), the block's splits x CC * k * k sums (each owned by one item); at the end the splits
// are added in a fixed order.
template <typename T, typename acc_t>
__global__ void dwconv_ln_bwd_weight_kernel(acc_t* __restrict__ partial_w, const T* __restrict__ x,
                                            const T* __restrict__ dy_ws, TileSource src, int64_t x_stride_b,
                                            int64_t tiles, int tiles_w, int tile_w, int cc) {
  PYKERNELS_DYNAMIC_SHARED(unsigned char, smem);
  const int channels = src.channels, k = src.k, kk = k * k, row = tile_row(tile_w, k);
  const int splits = weight_splits(k, cc, tile_w), seg = (tile_w + splits - 1) / splits;
  acc_t* tile_s = reinterpret_cast<acc_t*>(smem);
  acc_t* dyt_s = tile_s + cc * k * row;
  acc_t* acc_s = dyt_s + tile_w * cc;
  const int c0 = blockIdx.x * cc;
  for (int m = threadIdx.x; m < splits * cc * kk; m += blockDim.x) acc_s[m] = acc_t(0);

  for (int64_t t = blockIdx.y; t < tiles; t += gridDim.y) {
    const Tile tile = tile_of(t, tiles_w, src.height, src.width, tile_w);
    const int64_t pixel0 = (tile.b * src.height + tile.h) * src.width + tile.w0;
    __syncthreads();  // the previous tile is no longer read
    stage_input(tile_s, x + tile.b * x_stride_b, src, c0, cc, tile.h, tile.w0, tile_w);
    for (int e = threadIdx.x; e < tile_w * cc; e += blockDim.x) {
      const int p = e / cc, cl = e % cc, c = c0 + cl;
      dyt_s[e] = p < tile.n_pix && c < channels ? static_cast<acc_t>(dy_ws[(pixel0 + p) * channels + c]) : acc_t(0);
    }
    __syncthreads();
    switch (k) {
      case 3: weight_tile<3, 3>(acc_s, tile_s, dyt_s, cc, row, tile.n_pix, splits, seg); break;
      case 5: weight_tile<5, 1>(acc_s, tile_s, dyt_s, cc, row, tile.n_pix, splits, seg); break;
      case 7: weight_tile<7, 1>(acc_s, tile_s, dyt_s, cc, row, tile.n_pix, splits, seg); break;
      case 9: weight_tile<9, 1>(acc_s, tile_s, dyt_s, cc, row, tile.n_pix, splits, seg); break;
      case 11: weight_tile<11, 1>(acc_s, tile_s, dyt_s, cc, row, tile.n_pix, splits, seg); break;
      default: weight_tile<13, 1>(acc_s, tile_s, dyt_s, cc, row, tile.n_pix, splits, seg); break;  // k = 13
    }
  }
  __syncthreads();  // every item's sums are in acc_s
  acc_t* block_partial = partial_w + static_cast<int64_t>(blockIdx.y) * channels * kk;
  for (int m = threadIdx.x; m < cc * kk; m += blockDim.x) {
    acc_t sum = acc_s[m];
    for (int s = 1; s < splits; ++s) sum += acc_s[s * cc * kk + m];
    if (c0 + m / kk < channels) block_partial[static_cast<int64_t>(c0) * kk + m] = sum;
  }
}

// ---- launchers -------------------------------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tile width and chunk of a launch, and its dynamic shared memory.
struct Plan {
  int tile_w = 1;
  int cc = 1;
  int64_t tiles_w = 1;
  int64_t tiles = 0;  // B * H * tiles_w
  int64_t smem = 0;
};

// The widest tile (a multiple of px, <= max_tile, <= W rounded up to px) whose shared memory smem_of(tile_w, cc)
// fits the budget (cc = min(32, C)).
template <typename SmemOf>
Plan make_plan(const Geometry& geo, int max_tile, int px, const SmemOf& smem_of, const char* op) {
  auto round_up = [px](int64_t v) { return static_cast<int>((v + px - 1) / px * px); };
  Plan plan;
  plan.cc = static_cast<int>(std::min<int64_t>(kChunk, geo.channels));
  plan.tile_w = std::min(max_tile, round_up(geo.width));
  while (plan.tile_w > px && smem_of(plan.tile_w, plan.cc) > kSmemBudget) plan.tile_w = round_up(plan.tile_w / 2);
  plan.smem = smem_of(plan.tile_w, plan.cc);
  TORCH_CHECK(plan.smem <= kSmemMax, op, " (CUDA kernel): C = ", geo.channels, " channels need ", plan.smem,
              " bytes of shared memory per block (limit ", kSmemMax, "); use the cpp or triton backend");
  plan.tiles_w = ceil_div(geo.width, plan.tile_w);
  plan.tiles = geo.batch * geo.height * plan.tiles_w;
  TORCH_CHECK(plan.tiles <= INT32_MAX, op, " (CUDA kernel): too many pixels (", geo.pixels(), ")");
  return plan;
}

// Lets `kernel` use `bytes` of dynamic shared memory (the default limit is 48 KB).
template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes > kSmemDefault) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

TileSource x_source(const Geometry& geo) {
  return TileSource{geo.x_stride_c,
                    geo.x_stride_h,
                    geo.x_stride_w,
                    static_cast<int>(geo.channels),
                    static_cast<int>(geo.height),
                    static_cast<int>(geo.width),
                    static_cast<int>(geo.kernel),
                    geo.channels_last};
}

void check_sizes(const Geometry& geo, const char* op) {
  TORCH_CHECK(geo.channels <= INT32_MAX / 4 && geo.height <= INT32_MAX / 4 && geo.width <= INT32_MAX / 4, op,
              " (CUDA kernel): C, H and W must each be below 2^29, got ", geo.channels, ", ", geo.height, ", ",
              geo.width);
  // In-image offsets c * stride_c + h * stride_h + w * stride_w are int64 products of ints: no overflow.
}

template <typename F>
void dispatch_x(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kHalf:
      return f(TypeTag<c10::Half>{}, TypeTag<float>{});
    case at::kBFloat16:
      return f(TypeTag<c10::BFloat16>{}, TypeTag<float>{});
    case at::kFloat:
      return f(TypeTag<float>{}, TypeTag<float>{});
    case at::kDouble:
      return f(TypeTag<double>{}, TypeTag<double>{});
    default:
      TORCH_CHECK(false, "dwconv_ln (CUDA kernel): unexpected dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dwconv_ln_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                  const c10::optional<at::Tensor>& conv_bias,
                                                                  const c10::optional<at::Tensor>& ln_weight,
                                                                  const c10::optional<at::Tensor>& ln_bias,
                                                                  double eps) {
  constexpr const char* op = "dwconv_ln_fwd";
  TORCH_CHECK(PYKERNELS_ON_DEVICE(x), op, " (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Geometry geo = check_fwd_args(x, weight, conv_bias, ln_weight, ln_bias, eps, /*allow_double=*/true);
  FwdOutputs outs = alloc_fwd(x, geo);
  if (geo.empty()) return std::make_tuple(outs.out, outs.mean, outs.rstd);
  check_sizes(geo, op);
  const at::ScalarType compute = compute_dtype(x.scalar_type());
  const at::Tensor w = param_in(weight, compute), cb = param_in(conv_bias, compute);
  const at::Tensor lw = param_in(ln_weight, compute), lb = param_in(ln_bias, compute);
  const int64_t acc_size = compute == at::kDouble ? 8 : 4;
  const int64_t k = geo.kernel, channels = geo.channels;
  const Plan plan = make_plan(
      geo, kMaxTileFwd, kPxFwd,
      [&](int tile_w, int cc) { return acc_size * (tile_w * channels + cc * k * tile_row(tile_w, k) + cc * k * k); },
      op);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_x(x.scalar_type(), [&](auto x_tag, auto acc_tag) {
    using T = typename decltype(x_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    const auto kernel = &dwconv_ln_fwd_kernel<T, acc_t>;
    allow_smem(kernel, plan.smem);
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
    PYKERNELS_LAUNCH(kernel, dim3(static_cast<unsigned>(plan.tiles)), dim3(kThreads), plan.smem, stream,
                     outs.out.mutable_data_ptr<T>(), outs.mean.mutable_data_ptr<acc_t>(),
                     outs.rstd.mutable_data_ptr<acc_t>(), x.const_data_ptr<T>(), ptr(w), ptr(cb), ptr(lw), ptr(lb),
                     x_source(geo), geo.x_stride_b, static_cast<int>(plan.tiles_w), plan.tile_w, plan.cc,
                     static_cast<acc_t>(eps));
  });
  return std::make_tuple(outs.out, outs.mean, outs.rstd);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwconv_ln_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& conv_bias, const c10::optional<at::Tensor>& ln_weight,
    const c10::optional<at::Tensor>& ln_bias, const at::Tensor& mean, const at::Tensor& rstd, bool need_grad_x,
    bool need_grad_params) {
  constexpr const char* op = "dwconv_ln_bwd";
  TORCH_CHECK(PYKERNELS_ON_DEVICE(x), op, " (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  const Geometry geo =
      check_bwd_args(grad_out, x, weight, conv_bias, ln_weight, ln_bias, mean, rstd, /*allow_double=*/true);
  BwdOutputs outs = alloc_bwd(x, weight, conv_bias, ln_weight, ln_bias, need_grad_x, need_grad_params);
  auto result = [&]() {
    return std::make_tuple(outs.grad_x, outs.grad_weight, outs.grad_conv_bias, outs.grad_ln_weight, outs.grad_ln_bias);
  };
  if (!need_grad_x && !need_grad_params) return result();
  if (geo.empty()) {  // no pixels: every parameter grad is a sum of nothing
    for (at::Tensor* t : {&outs.grad_weight, &outs.grad_conv_bias, &outs.grad_ln_weight, &outs.grad_ln_bias}) {
      if (t->numel()) t->zero_();
    }
    return result();
  }
  check_sizes(geo, op);
  const at::ScalarType compute = compute_dtype(x.scalar_type());
  const at::Tensor w = param_in(weight, compute), cb = param_in(conv_bias, compute), lw = param_in(ln_weight, compute);
  const at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  // grad_out in x's dtype is read as is; another dtype is converted to the compute dtype (one kernel set per x dtype).
  const at::Tensor grad = grad_out.scalar_type() == x.scalar_type() ? grad_out : grad_out.to(compute);
  const int64_t acc_size = compute == at::kDouble ? 8 : 4;
  const int64_t k = geo.kernel, channels = geo.channels;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const TileSource src = x_source(geo);
  // dy workspace in x's dtype (fp16 / bf16 / fp32 / fp64): computed in acc_t, rounded once when stored.
  at::Tensor dy_ws = at::empty({geo.batch, geo.height, geo.width, channels}, x.options());

  // dy (+ partial sums of grad_conv_bias, grad_ln_weight, grad_ln_bias when the parameter grads are wanted)
  const Plan dy_plan = make_plan(
      geo, kMaxTileFwd, kPxFwd,
      [&](int tile_w, int cc) {
        return acc_size * (tile_w * channels + cc * k * tile_row(tile_w, k) + cc * k * k + 4 * tile_w +
                           (need_grad_params ? 3 * channels : 0));
      },
      op);
  const int64_t dy_blocks = need_grad_params ? std::min(dy_plan.tiles, kDyBlocks) : dy_plan.tiles;
  at::Tensor partial;
  if (need_grad_params) partial = at::empty({dy_blocks, 3, channels}, x.options().dtype(compute));

  // grad_x: dy as a channels-last (B, H, W, C) image
  const TileSource dy_src{1,
                          geo.width * channels,
                          channels,
                          static_cast<int>(channels),
                          static_cast<int>(geo.height),
                          static_cast<int>(geo.width),
                          static_cast<int>(k),
                          true};
  const Plan in_plan = make_plan(
      geo, kMaxTileConv, kPxConv,
      [&](int tile_w, int cc) { return acc_size * (cc * k * tile_row(tile_w, k) + cc * k * k); }, op);
  // grad_w
  const Plan w_plan = make_plan(
      geo, kMaxTileConv, 1,
      [&](int tile_w, int cc) {
        const int splits = weight_splits(static_cast<int>(k), cc, tile_w);
        return acc_size * (cc * k * tile_row(tile_w, k) + tile_w * cc + splits * cc * k * k);
      },
      op);
  const int64_t w_chunks = ceil_div(channels, w_plan.cc);
  const int64_t w_groups = std::min<int64_t>({w_plan.tiles, std::max<int64_t>(1, kWeightBlocks / w_chunks), 65535});
  at::Tensor partial_w;
  if (need_grad_params) partial_w = at::empty({w_groups, channels * k * k}, x.options().dtype(compute));

  dispatch_x(x.scalar_type(), [&](auto x_tag, auto acc_tag) {
    using T = typename decltype(x_tag)::type;
    using acc_t = typename decltype(acc_tag)::type;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<acc_t>() : nullptr; };
    auto launch_dy = [&](auto grad_tag) {
      using G = typename decltype(grad_tag)::type;
      const auto kernel = &dwconv_ln_bwd_dy_kernel<T, G, acc_t>;
      allow_smem(kernel, dy_plan.smem);
      PYKERNELS_LAUNCH(kernel, dim3(static_cast<unsigned>(dy_blocks)), dim3(kThreads), dy_plan.smem, stream,
                       dy_ws.mutable_data_ptr<T>(), need_grad_params ? partial.mutable_data_ptr<acc_t>() : nullptr,
                       grad.const_data_ptr<G>(), x.const_data_ptr<T>(), ptr(w), ptr(cb), ptr(lw),
                       mean_c.const_data_ptr<acc_t>(), rstd_c.const_data_ptr<acc_t>(), src, geo.x_stride_b,
                       dy_plan.tiles, static_cast<int>(dy_plan.tiles_w), dy_plan.tile_w, dy_plan.cc);
    };
    if (grad.scalar_type() == x.scalar_type()) launch_dy(TypeTag<T>{});
    else launch_dy(TypeTag<acc_t>{});

    if (need_grad_x) {
      const auto kernel = &dwconv_ln_bwd_input_kernel<T, acc_t>;
      allow_smem(kernel, in_plan.smem);
      PYKERNELS_LAUNCH(kernel, dim3(static_cast<unsigned>(in_plan.tiles)), dim3(kThreads), in_plan.smem, stream,
                       outs.grad_x.mutable_data_ptr<T>(), dy_ws.const_data_ptr<T>(), ptr(w), dy_src,
                       geo.x_stride_b, geo.x_stride_c, geo.x_stride_h, geo.x_stride_w,
                       static_cast<int>(in_plan.tiles_w), in_plan.tile_w, in_plan.cc, geo.channels_last);
    }
    if (need_grad_params) {
      const auto kernel = &dwconv_ln_bwd_weight_kernel<T, acc_t>;
      allow_smem(kernel, w_plan.smem);
      PYKERNELS_LAUNCH(kernel, dim3(static_cast<unsigned>(w_chunks), static_cast<unsigned>(w_groups)), dim3(kThreads),
                       w_plan.smem, stream, partial_w.mutable_data_ptr<acc_t>(), x.const_data_ptr<T>(),
                       dy_ws.const_data_ptr<T>(), src, geo.x_stride_b, w_plan.tiles,
                       static_cast<int>(w_plan.tiles_w), w_plan.tile_w, w_plan.cc);
    }
  });

  if (need_grad_params) {
    // Fixed-order reductions of the per-block partial sums (deterministic).
    outs.grad_weight.copy_(partial_w.sum(0).view(weight.sizes()));
    const at::Tensor sums = partial.sum(0);  // (3, C): dy, g * xhat, g
    if (outs.want_conv_bias) outs.grad_conv_bias.copy_(sums[0]);
    if (outs.want_ln_weight) outs.grad_ln_weight.copy_(sums[1]);
    if (outs.want_ln_bias) outs.grad_ln_bias.copy_(sums[2]);
  }
  return result();
}

}  // namespace
}  // namespace dwconv_ln
}  // namespace pykernels

TORCH_LIBRARY_IMPL(PYKERNELS_LIBRARY, PYKERNELS_DEVICE, m) {
  m.impl("dwconv_ln_fwd", &pykernels::dwconv_ln::dwconv_ln_fwd_cuda);
  m.impl("dwconv_ln_bwd", &pykernels::dwconv_ln::dwconv_ln_bwd_cuda);
}

// CPU path of the fused flow-warp + SSIM ops (float32 and float64).
//
// The SSIM is one number per image, so its gradient with respect to any input is that input's
// gradient "per unit of grad_ssim" times grad_ssim[b]. When a gradient is wanted, the forward
// pass computes these unit gradients in the same streaming pass that computes the SSIM, and the
// backward pass only scales them (in Python). Recomputing the four moment maps in the backward
// would cost as much as the whole forward.
//
// Work is split into tasks of (image, band of rows) run with at::parallel_for (OpenMP threads,
// torch.set_num_threads). A task walks down its band two rows at a time, keeping only small
// ring buffers of rows (cache-line aligned, and padded so that rows do not alias in L1):
//   1. produce input row r: sample the warped row (bilinear taps of the row, then one gathered
//      sample per channel, plus d(sample)/d(flow) when the flow gradient is wanted) straight
//      into the warped output, or into the ring for the rows of the halo; x (for ssim) and y
//      are read where they lie, never copied;
//   2. vertical pass: rows p..p+11 -> the four Gaussian column moments of output rows p, p+1;
//   3. horizontal pass: window moments -> SSIM (summed), and the SSIM partial derivatives,
//      which are then blurred back along the row with the transposed (full) window;
//   4. vertical transposed pass: blurred partials of output rows q-10..q+3 -> gradient of the
//      SSIM with respect to every pixel of input rows q..q+3, then of the flow there.
// Every loop over a row runs over contiguous memory and is vectorised by the compiler.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#include "warp_ssim_math.h"
#include "warp_ssim_ops.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace warp_kernel {
namespace {

// The 11-row passes handle several rows at once, so that every row streamed from cache serves
// several outputs. The forward pass takes output rows in pairs (rows p and p+1 read 12 input
// rows, 10 of them shared): 16% faster than single rows here, while larger groups run out of
// vector registers. The transposed pass of the gradient keeps one accumulator per row and
// takes four rows (14 rows of partials read for 4 outputs, against 12 for 2).
constexpr int kRows = 2;
constexpr int kGradRows = 4;
constexpr int kPad = 2 * kRadius;  // rows (or columns) between a window's first and last tap
// Rows kept by the ring buffers. The gradient of input rows [q, q + 4) is computed once the
// partials of output row q + 3 exist, at most kRows - 1 rows later, when input rows up to
// q + 3 + kRows - 1 + kPad have been produced.
constexpr int kRing = kPad + kRows + kGradRows - 1;
constexpr int kPrefetchRows = 8;  // image rows fetched ahead: the forward ran 7-10% faster
constexpr int kMoments = 4;  // x, y, x^2 + y^2, xy
constexpr bool kLittleEndian = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;  // for the pair loads

// f(std::integral_constant<int, n>{}) for n = 1..Max rows, so that the row loops are unrolled
// over a compile-time number of rows.
template <int Max, typename F>
void with_rows(int n, const F& f) {
  if constexpr (Max > 1) {
    if (n < Max) return with_rows<Max - 1>(n, f);
  }
  f(std::integral_constant<int, Max>{});
}

template <typename T>
struct CacheAligned {
  using value_type = T;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  bool operator==(const CacheAligned&) const { return true; }
  bool operator!=(const CacheAligned&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, CacheAligned<T>>;

template <typename T>
struct Gauss {
  T g[kTaps];
  Gauss() {
    const double d[kTaps] = {WARP_KERNEL_GAUSS_TAPS};
    for (int k = 0; k < kTaps; ++k) g[k] = T(d[k]);
  }
};

struct Geometry {
  int B, C, H, W;
  int Ho, Wo;  // size of the 'valid' SSIM map
  int plane;   // H * W
  int stride;  // row stride of the ring buffers: W rounded up, plus two cache lines
  explicit Geometry(Shape s)
      : B(s.B), C(s.C), H(s.H), W(s.W), Ho(H - 2 * kRadius), Wo(W - 2 * kRadius), plane(H * W),
        stride((W + 15) / 16 * 16 + 32) {}
};

// Below this many pixels (all images and channels) a call runs on one thread: waking a
// team of threads would cost more than the work.
constexpr int64_t kSerialWork = 1 << 16;

// Tasks per thread handed out at once by at::parallel_for: all of them for small work.
int64_t grain(int64_t tasks, int64_t work) { return work < kSerialWork ? tasks : 1; }

// Split every image into bands of rows so that there are about as many tasks as threads
// (a band re-derives a 10-row halo, so bands are kept at least 32 rows tall).
int bands_per_image(int batch, int rows) {
  const int threads = std::max(1, at::get_num_threads());
  const int wanted = (threads + batch - 1) / batch;
  return std::max(1, std::min(wanted, rows / 32));
}

template <typename F>
void for_each_band(const Geometry& g, const F& f) {
  const int bands = bands_per_image(g.B, g.H);
  const int64_t tasks = int64_t(g.B) * bands;
  const int64_t work = int64_t(g.B) * g.C * g.plane;
  at::parallel_for(0, tasks, grain(tasks, work), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int b = int(task / bands), band = int(task % bands);
      f(b, int(int64_t(g.H) * band / bands), int(int64_t(g.H) * (band + 1) / bands));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The 11-tap window along a row
// ---------------------------------------------------------------------------------------------

// dst[j] = sum_t g[t] src[j + t] for j in [0, n). Reads src up to n + 31 and writes dst up to
// n + 15, so both rows are padded by that much.
template <typename T>
void blur_row(const T* __restrict__ src, T* __restrict__ dst, int n, const T* g) {
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    T acc = 0;
#pragma GCC unroll 11
    for (int t = 0; t < kTaps; ++t) acc += g[t] * src[j + t];
    dst[j] = acc;
  }
}

#if defined(__AVX512F__)
// float32 with AVX-512: 16 outputs take 11 shifted copies of the row. Unaligned loads of them
// split cache lines (two cache accesses each); shifting two aligned vectors (valignd) uses the
// shuffle port, which the FMAs share. Half of each: 1.3x faster than loads alone here.
// src must be 64-byte aligned.
template <>
void blur_row<float>(const float* __restrict__ src, float* __restrict__ dst, int n,
                     const float* g) {
  __m512 gv[kRadius + 1];
  for (int t = 0; t <= kRadius; ++t) gv[t] = _mm512_set1_ps(g[t]);
  __m512i cur = _mm512_load_si512(src);
  for (int j = 0; j < n; j += 16) {
    const __m512i next = _mm512_load_si512(src + j + 16);
    __m512 v[kTaps];
#define WARP_KERNEL_SHIFTED(t) v[t] = _mm512_castsi512_ps(_mm512_alignr_epi32(next, cur, t))
    v[0] = _mm512_castsi512_ps(cur);
    WARP_KERNEL_SHIFTED(1);
    WARP_KERNEL_SHIFTED(2);
    WARP_KERNEL_SHIFTED(3);
    WARP_KERNEL_SHIFTED(4);
    WARP_KERNEL_SHIFTED(5);
#undef WARP_KERNEL_SHIFTED
    for (int t = 6; t < kTaps; ++t) v[t] = _mm512_loadu_ps(src + j + t);
    // The window is symmetric: taps t and 10 - t share a weight.
    __m512 acc = _mm512_mul_ps(gv[kRadius], v[kRadius]);
    for (int t = 0; t < kRadius; ++t)
      acc = _mm512_fmadd_ps(gv[t], _mm512_add_ps(v[t], v[kTaps - 1 - t]), acc);
    _mm512_storeu_ps(dst + j, acc);
    cur = next;
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// Bilinear taps of one output row, structure-of-arrays so the loops over them vectorise
// ---------------------------------------------------------------------------------------------

#if defined(__AVX512F__)
// float32 with AVX-512: the corners of 16 consecutive samples are usually read from a few
// columns of a few rows (a smooth flow moves neighbouring pixels alike). Such a group loads
// those rows as two vectors each and picks its corners with permutes, instead of gathering
// them: gathers are most of the warp's time otherwise.
constexpr bool kWindowedCorners = true;
#else
constexpr bool kWindowedCorners = false;
#endif
constexpr int kLanes = 16;               // float32 samples in one group (one AVX-512 vector)
constexpr int kWindowCols = 2 * kLanes;  // columns of a window: two vectors, one permute
constexpr int kWindowRows = 4;           // rows of a window
// Rows below a window fetched ahead: the next output rows read them (2: 2x faster than none
// on a smooth flow, while 3 was slower again).
constexpr int kWindowPrefetchRows = 2;

template <typename T>
struct TapRow {
  Buffer<int> x0, y0, offset, step_x, step_y;
  Buffer<T> wx, wy, dx, dy;
  // Windowed corners (float32, AVX-512). Group g = samples [16 g, 16 g + 16): window_rows[g]
  // rows from window_base[g] (0: the group gathers), and for each sample where its corners lie
  // in the window, one byte each: columns x0 and x0 + step_x, rows y0 and y0 + (step_y > 0).
  Buffer<int> window_rows, window_base, window_code;
  Buffer<T> corner;  // (4, W) v00, v01, v10, v11 of every sample, for the plane last sampled

  explicit TapRow(int W)
      : x0(W), y0(W), offset(W), step_x(W), step_y(W), wx(W), wy(W), dx(W), dy(W) {
    if (windowed(W)) {
      corner.resize(4 * size_t(W));
      window_rows.resize(W / kLanes);
      window_base.resize(W / kLanes);
      window_code.resize(W);
    }
  }

  BilinearTap<T> at(int j) const {
    return BilinearTap<T>{x0[j], y0[j], offset[j], step_x[j], step_y[j],
                          wx[j], wy[j], dx[j],     dy[j]};
  }

  // Row y of an image's (2, H, W) flow: sample positions (x + flow_x, y + flow_y).
  template <int kPadding>
  void fill(const T* flow, int y, int H, int W) {
    const T* fx = flow + size_t(y) * W;
    const T* fy = flow + size_t(H) * W + size_t(y) * W;
    int* __restrict__ cx = x0.data();
    int* __restrict__ cy = y0.data();
    int* __restrict__ o = offset.data();
    int* __restrict__ sx = step_x.data();
    int* __restrict__ sy = step_y.data();
    T* __restrict__ ax = wx.data();
    T* __restrict__ ay = wy.data();
    T* __restrict__ gx = dx.data();
    T* __restrict__ gy = dy.data();
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      const BilinearTap<T> t = bilinear_tap(T(j) + fx[j], T(y) + fy[j], H, W, kPadding);
      if constexpr (kWindowedCorners) {  // only the window plan reads them
        cx[j] = t.x0;
        cy[j] = t.y0;
      }
      o[j] = t.offset;
      sx[j] = t.step_x;
      sy[j] = t.step_y;
      ax[j] = t.wx;
      ay[j] = t.wy;
      gx[j] = t.dx;
      gy[j] = t.dy;
    }
    if (windowed(W)) plan_windows(W);
  }
  void fill(const T* flow, int y, int H, int W, int padding) {
    if (padding == kReflection)
      fill<kReflection>(flow, y, H, W);
    else
      fill<kBorder>(flow, y, H, W);
  }

  // Samples of one row of `plane` (H * W values).
  void sample(const T* plane, int H, int W, T* __restrict__ out) {
    for_each_sample(plane, H, W, [&](int j, T v00, T v01, T v10, T v11) {
      out[j] = bilinear_blend(v00, v01, v10, v11, at(j));
    });
  }

  // The samples and their derivatives with respect to flow_x and flow_y.
  void sample_grad(const T* plane, int H, int W, T* __restrict__ out, T* __restrict__ d_fx,
                   T* __restrict__ d_fy) {
    for_each_sample(plane, H, W, [&](int j, T v00, T v01, T v10, T v11) {
      out[j] = bilinear_blend_grad(v00, v01, v10, v11, at(j), &d_fx[j], &d_fy[j]);
    });
  }

 private:
  // f(j, v00, v01, v10, v11) for every sample j of the row, given its four corners in `plane`
  // (top-left, top-right, bottom-left, bottom-right), in a vectorised loop.
  template <typename F>
  void for_each_sample(const T* plane, int H, int W, const F& f) {
    const int size = H * W;
    if constexpr (std::is_same_v<T, float> && kLittleEndian) {
      if (size >= 2 && windowed(W)) {
        const T* c = load_corners(plane, size, W);
#pragma omp simd
        for (int j = 0; j < W; ++j) f(j, c[j], c[W + j], c[2 * W + j], c[3 * W + j]);
        return;
      }
      if (size >= 2) {
#pragma omp simd
        for (int j = 0; j < W; ++j) {
          T v00, v01, v10, v11;
          corners(plane, size, j, &v00, &v01, &v10, &v11);
          f(j, v00, v01, v10, v11);
        }
        return;
      }
    }
#pragma omp simd
    for (int j = 0; j < W; ++j) {
      T v00, v01, v10, v11;
      bilinear_corners(plane, at(j), &v00, &v01, &v10, &v11);
      f(j, v00, v01, v10, v11);
    }
  }

  static bool windowed(int W) {
    return kWindowedCorners && std::is_same_v<T, float> && W >= kWindowCols;
  }

  // The corners of every sample of the row, (4, W) v00, v01, v10, v11, read through windows
  // where the plan allows, else gathered. Only for windowed(W) (AVX-512) and size >= 2.
  const float* load_corners(const float* plane, int size, int W) {
    float* c = corner.data();
    int j = 0;
#if defined(__AVX512F__)
    for (int g = 0; g < W / kLanes; ++g, j += kLanes) {
      if (window_rows[g] == 0) {
        gather_corners(plane, size, W, j, j + kLanes, c);
        continue;
      }
      const __m512i code = _mm512_load_si512(window_code.data() + j);
      const __m512i byte = _mm512_set1_epi32(0xff);
      const __m512i col0 = _mm512_and_si512(code, byte);
      const __m512i col1 = _mm512_and_si512(_mm512_srli_epi32(code, 8), byte);
      const __m512i row0 = _mm512_and_si512(_mm512_srli_epi32(code, 16), byte);
      const __m512i row1 = _mm512_srli_epi32(code, 24);
      const float* p = plane + window_base[g];
      __m512 lo = _mm512_loadu_ps(p), hi = _mm512_loadu_ps(p + kLanes);
      __m512 v00 = _mm512_permutex2var_ps(lo, col0, hi);
      __m512 v01 = _mm512_permutex2var_ps(lo, col1, hi);
      __m512 v10 = v00, v11 = v01;  // a bottom corner in the window's first row: step_y = 0
      for (int r = 1; r < window_rows[g]; ++r) {
        p += W;
        lo = _mm512_loadu_ps(p);
        hi = _mm512_loadu_ps(p + kLanes);
        const __m512 left = _mm512_permutex2var_ps(lo, col0, hi);
        const __m512 right = _mm512_permutex2var_ps(lo, col1, hi);
        const __m512i rv = _mm512_set1_epi32(r);
        const __mmask16 top = _mm512_cmpeq_epi32_mask(row0, rv);
        const __mmask16 bottom = _mm512_cmpeq_epi32_mask(row1, rv);
        v00 = _mm512_mask_mov_ps(v00, top, left);
        v01 = _mm512_mask_mov_ps(v01, top, right);
        v10 = _mm512_mask_mov_ps(v10, bottom, left);
        v11 = _mm512_mask_mov_ps(v11, bottom, right);
      }
      for (int d = 1; d <= kWindowPrefetchRows; ++d) {  // the window's 128 bytes, d rows down
        const char* q = reinterpret_cast<const char*>(p + size_t(d) * W);
        _mm_prefetch(q, _MM_HINT_T0);
        _mm_prefetch(q + 64, _MM_HINT_T0);
        _mm_prefetch(q + 127, _MM_HINT_T0);
      }
      _mm512_storeu_ps(c + j, v00);
      _mm512_storeu_ps(c + W + j, v01);
      _mm512_storeu_ps(c + 2 * W + j, v10);
      _mm512_storeu_ps(c + 3 * W + j, v11);
    }
#endif
    gather_corners(plane, size, W, j, W, c);
    return c;
  }

#if defined(__AVX512F__)
  // Which groups of 16 samples have all their corners in kWindowRows rows and kWindowCols
  // columns, where that window starts, and where each sample's corners lie in it.
  void plan_windows(int W) {
    const __m512i one = _mm512_set1_epi32(1);
    for (int g = 0; g < W / kLanes; ++g) {
      const int j = g * kLanes;
      const __m512i left = _mm512_load_si512(x0.data() + j);
      const __m512i top = _mm512_load_si512(y0.data() + j);
      const __m512i right = _mm512_add_epi32(left, _mm512_load_si512(step_x.data() + j));
      const __m512i bottom =
          _mm512_add_epi32(top, _mm512_min_epi32(_mm512_load_si512(step_y.data() + j), one));
      const int x_lo = _mm512_reduce_min_epi32(left), x_hi = _mm512_reduce_max_epi32(right);
      const int y_lo = _mm512_reduce_min_epi32(top), y_hi = _mm512_reduce_max_epi32(bottom);
      if (x_hi - x_lo >= kWindowCols || y_hi - y_lo >= kWindowRows) {
        window_rows[g] = 0;
        continue;
      }
      const int x_start = std::min(x_lo, W - kWindowCols);  // the window stays in its rows
      window_rows[g] = y_hi - y_lo + 1;
      window_base[g] = y_lo * W + x_start;
      const __m512i xs = _mm512_set1_epi32(x_start), ys = _mm512_set1_epi32(y_lo);
      __m512i code = _mm512_sub_epi32(left, xs);
      code = _mm512_or_si512(code, _mm512_slli_epi32(_mm512_sub_epi32(right, xs), 8));
      code = _mm512_or_si512(code, _mm512_slli_epi32(_mm512_sub_epi32(top, ys), 16));
      code = _mm512_or_si512(code, _mm512_slli_epi32(_mm512_sub_epi32(bottom, ys), 24));
      _mm512_store_si512(window_code.data() + j, code);
    }
  }
#else
  void plan_windows(int) {}
#endif

  // Corners of samples [j0, j1) gathered; for float32 the two horizontal neighbours are
  // fetched as one 64-bit word, which halves the gathered elements.
  void gather_corners(const float* plane, int size, int W, int j0, int j1, float* c) const {
    float* __restrict__ c00 = c;
    float* __restrict__ c01 = c + W;
    float* __restrict__ c10 = c + 2 * W;
    float* __restrict__ c11 = c + 3 * W;
#pragma omp simd
    for (int j = j0; j < j1; ++j) corners(plane, size, j, &c00[j], &c01[j], &c10[j], &c11[j]);
  }

  // The four corners of sample j through two 64-bit loads, one per row: (v00, v01) and
  // (v10, v11). A pair never starts at the plane's last value (it would read past the
  // plane); the right neighbour is only used where its weight may be non-zero (step_x = 1),
  // so a value beyond the row (even NaN) never leaks in.
  void corners(const float* plane, int size, int j, float* v00, float* v01, float* v10,
               float* v11) const {
    const int top = offset[j], bottom = offset[j] + step_y[j];
    const int top_pair = top < size - 1 ? top : size - 2;
    const int bottom_pair = bottom < size - 1 ? bottom : size - 2;
    uint64_t t, b;
    std::memcpy(&t, plane + top_pair, sizeof(t));
    std::memcpy(&b, plane + bottom_pair, sizeof(b));
    const float t_lo = low_float(t), t_hi = high_float(t);
    const float b_lo = low_float(b), b_hi = high_float(b);
    *v00 = top == top_pair ? t_lo : t_hi;
    *v10 = bottom == bottom_pair ? b_lo : b_hi;
    *v01 = step_x[j] ? t_hi : *v00;  // step_x = 0 on the last column, where the pair is shifted
    *v11 = step_x[j] ? b_hi : *v10;
  }
  static float low_float(uint64_t v) {
    const uint32_t u = uint32_t(v);  // little-endian: the first float of the pair
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
  static float high_float(uint64_t v) {
    const uint32_t u = uint32_t(v >> 32);
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
};

// ---------------------------------------------------------------------------------------------
// The fused pass of one band
// ---------------------------------------------------------------------------------------------

// What one call computes (SSIMArgs: x comes from `x` or, when `img` is set, is the warp of img
// by flow; the gradients are per unit of grad_ssim[b]), with the sizes the passes use.
template <typename T>
struct Problem : SSIMArgs<T> {
  Geometry g;
  double* row_sums = nullptr;  // out (B, C, Ho): SSIM summed over each output row
  explicit Problem(const SSIMArgs<T>& a) : SSIMArgs<T>(a), g(a.s) {}
};

template <typename T>
class BandPass {
 public:
  BandPass(const Problem<T>& pb, int b)
      : pb_(pb), g_(pb.g), b_(b), S_(pb.g.stride), K_(pb.grad_y ? 4 : 3), taps_(pb.g.W) {
    const size_t S = size_t(S_);
    x_rows_.resize(size_t(g_.C) * kRing);
    if (pb.img != nullptr) halo_.resize(size_t(g_.C) * kRing * S);
    if (pb.grad_flow) dflow_.resize(size_t(g_.C) * kRing * 2 * S);
    m_.resize(kRows * kMoments * S);
    h_.resize(kMoments * S);
    s_.resize(S);
    if (pb.wants_grad()) {
      d_.assign(4 * (S + 16), T(0));
      e_.resize(size_t(g_.C) * kRing * K_ * S);
      zeros_.assign(K_ * S, T(0));
      f_.resize(kGradRows * 4 * S);
      dx_.resize(S);
    }
  }

  // Input rows [q0, q1) of image b: their warped pixels and gradients, and the SSIM of the
  // output rows [q0, min(q1, Ho)).
  void run(int q0, int q1) {
    const bool grad = pb_.wants_grad();
    // The gradient of input row q gathers output rows q-10..q: start 10 rows early.
    const int p_begin = grad ? std::max(0, q0 - kPad) : q0;
    const int p_end = std::min(q1, g_.Ho);
    q0_ = q0;
    q1_ = q1;
    next_ = p_begin;
    done_ = q0;
    for (int p = p_begin; p < p_end; p += kRows) {
      const int n = std::min(kRows, p_end - p);  // output rows p .. p+n-1
      produce_until(p + n - 1 + kPad);
      for (int c = 0; c < g_.C; ++c) {
        with_rows<kRows>(n, [&](auto rows) { column_moments<rows()>(c, p); });
        for (int i = 0; i < n; ++i) {
          const T* m = m_.data() + i * kMoments * S_;
          const double s = grad ? window_row<true>(c, p + i, m) : window_row<false>(c, p + i, m);
          if (p + i >= q0) pb_.row_sums[(size_t(b_) * g_.C + c) * g_.Ho + p + i] = s;
        }
      }
      if (grad) finish_rows(p + n, false);
    }
    if (grad) finish_rows(q1, true);  // every row left, down to those below the last window
    produce_until(q1 - 1);  // rows of the warped image nothing above needed
  }

 private:
  // Input row r of channel c: x is read where it lies (the input x, or the warped output for
  // the band's own rows) or, for the rows of the halo, from a ring slot; y is read from y.
  const T*& x_row(int c, int r) { return x_rows_[size_t(c) * kRing + r % kRing]; }
  const T* y_row(int c, int r) const {
    return pb_.y + (size_t(b_) * g_.C + c) * g_.plane + size_t(r) * g_.W;
  }
  // Ring slots: x (S) of a halo row; for the flow gradient [d x / d flow_x | d x / d flow_y].
  T* halo_row(int c, int r) { return halo_.data() + (size_t(c) * kRing + r % kRing) * S_; }
  T* dflow_row(int c, int r) { return dflow_.data() + (size_t(c) * kRing + r % kRing) * 2 * S_; }
  // Blurred partials of output row p: [map 0 (S) | map 1 | ... | map K-1].
  T* e_row(int c, int p) { return e_.data() + (size_t(c) * kRing + p % kRing) * K_ * S_; }

  // Gathered samples do not trigger the hardware prefetcher: fetch the image rows that the
  // samples of the rows ahead will read (a smooth flow moves them by a few rows at most).
  static void prefetch_row(const T* row, int W) {
    const char* p = reinterpret_cast<const char*>(row);
    for (size_t o = 0; o < sizeof(T) * size_t(W); o += 64) __builtin_prefetch(p + o, 0, 2);
  }

  // ---- 1. input rows: x warped (straight into the output when the row is the band's) ----
  void produce_until(int last) {
    const int W = g_.W;
    for (; next_ <= last; ++next_) {
      const int r = next_;
      const size_t image = size_t(b_) * g_.C * g_.plane;
      if (pb_.img != nullptr)
        taps_.fill(pb_.flow + size_t(b_) * 2 * g_.plane, r, g_.H, W, pb_.padding);
      for (int c = 0; c < g_.C; ++c) {
        const size_t at = image + size_t(c) * g_.plane + size_t(r) * W;
        if (pb_.img == nullptr) {
          x_row(c, r) = pb_.x + at;
          continue;
        }
        const T* plane = pb_.img + image + size_t(c) * g_.plane;
        prefetch_row(plane + size_t(std::min(g_.H - 1, r + kPrefetchRows)) * W, W);
        const bool own = pb_.warped != nullptr && r >= q0_ && r < q1_;
        T* x = own ? pb_.warped + at : halo_row(c, r);
        if (pb_.grad_flow) {
          T* d = dflow_row(c, r);
          taps_.sample_grad(plane, g_.H, W, x, d, d + S_);
        } else {
          taps_.sample(plane, g_.H, W, x);
        }
        x_row(c, r) = x;
      }
    }
  }

  // ---- 2. vertical pass: rows p..p+10+N-1 -> the four Gaussian column moments
  // m = (sum g x, sum g y, sum g (x^2 + y^2), sum g xy) of output rows p..p+N-1. ----
  template <int N>
  void column_moments(int c, int p) {
    const T* r[kTaps + N - 1];
    const T* yr[kTaps + N - 1];
    for (int k = 0; k < kTaps + N - 1; ++k) {
      r[k] = x_row(c, p + k);
      yr[k] = y_row(c, p + k);
    }
    const int S = S_;
    T* __restrict__ m = m_.data();
    const T* gk = gauss_.g;
#pragma omp simd
    for (int j = 0; j < g_.W; ++j) {
      T sx[N] = {}, sy[N] = {}, ssq[N] = {}, sxy[N] = {};
#pragma GCC unroll 12
      for (int k = 0; k < kTaps + N - 1; ++k) {
        const T a = r[k][j], b = yr[k][j];
        const T sq = a * a + b * b, ab = a * b;
#pragma GCC unroll 2
        for (int i = 0; i < N; ++i) {
          if (k - i < 0 || k - i >= kTaps) continue;  // row k is tap k - i of output row p + i
          const T g = gk[k - i];
          sx[i] += g * a;
          sy[i] += g * b;
          ssq[i] += g * sq;
          sxy[i] += g * ab;
        }
      }
#pragma GCC unroll 2
      for (int i = 0; i < N; ++i) {
        T* mi = m + i * kMoments * S;
        mi[j] = sx[i];
        mi[S + j] = sy[i];
        mi[2 * S + j] = ssq[i];
        mi[3 * S + j] = sxy[i];
      }
    }
  }

  // ---- 3. horizontal pass: window moments -> SSIM of the row (summed in float64) and, for
  // the gradient, the partials (zero-padded by 10 on both sides) blurred back along the row:
  // e[j] = sum_k g[k] d[j - k] = sum_t g[t] d_padded[j + t] (the window is symmetric). ----
  template <bool kGrad>
  double window_row(int c, int p, const T* m) {
    const int S = S_;
    const int Sd = S + 16;  // rows of d: 10 zeros, the Wo partials, zeros; 64-byte aligned
    const T* gk = gauss_.g;
    const T c1 = pb_.c1, c2 = pb_.c2, scale = inv_count();
    T* __restrict__ d = d_.data();
    T* __restrict__ ssim = s_.data();
    T* __restrict__ h = h_.data();
    for (int i = 0; i < kMoments; ++i) blur_row(m + i * S, h + i * S, g_.Wo, gk);
#pragma omp simd
    for (int j = 0; j < g_.Wo; ++j) {
      const T ux = h[j], uy = h[S + j], usq = h[2 * S + j], uxy = h[3 * S + j];
      if (kGrad) {
        const SSIMPartials<T> q = ssim_partials(ux, uy, usq, uxy, c1, c2);
        d[kPad + j] = scale * q.mu_x;
        d[Sd + kPad + j] = scale * q.sq;
        d[2 * Sd + kPad + j] = scale * q.xy;
        d[3 * Sd + kPad + j] = scale * q.mu_y;  // read only when K == 4
        ssim[j] = q.s;
      } else {
        ssim[j] = ssim_from_moments(ux, uy, usq, uxy, c1, c2);
      }
    }
    // Vector lanes of T each add ~Wo/16 values; the rows are then added in float64.
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < g_.Wo; ++j) sum += ssim[j];
    if (kGrad) {
      T* e = e_row(c, p);
      for (int i = 0; i < K_; ++i) blur_row(d + i * Sd, e + i * S, g_.W, gk);
    }
    return double(sum);
  }

  // ---- 4. vertical transposed pass: gradient of the SSIM at every pixel of the input rows
  // not done yet below `end`, four rows at a time (they share 8 of their 11 blurred partials);
  // a group of fewer rows only for the last ones. ----
  void finish_rows(int end, bool last) {
    while (done_ + kGradRows <= end || (last && done_ < end)) {
      const int n = std::min(kGradRows, end - done_);
      with_rows<kGradRows>(n, [&](auto rows) { finish<rows()>(done_); });
      done_ += n;
    }
  }

  template <int N>
  void finish(int q) {
    const int W = g_.W, S = S_;
    const T* gk = gauss_.g;
    for (int c = 0; c < g_.C; ++c) {
      // f_i(q) = sum_k g[k] e_i(row q - 10 + k): output row p weighs pixel row q by g[q - p].
      const T* er[kTaps + N - 1];
      for (int k = 0; k < kTaps + N - 1; ++k) {
        const int p = q - kPad + k;
        er[k] = (p >= 0 && p < g_.Ho) ? e_row(c, p) : zeros_.data();
      }
      for (int i = 0; i < K_; ++i) {
        T* __restrict__ f = f_.data() + i * S;  // row q; row q + n at f + n * 4 * S
        const int o = i * S;
#pragma omp simd
        for (int j = 0; j < W; ++j) {
          T acc[N] = {};
#pragma GCC unroll 16
          for (int k = 0; k < kTaps + N - 1; ++k) {
            const T e = er[k][o + j];
#pragma GCC unroll 4
            for (int n = 0; n < N; ++n)
              if (k - n >= 0 && k - n < kTaps) acc[n] += gk[k - n] * e;
          }
#pragma GCC unroll 4
          for (int n = 0; n < N; ++n) f[n * 4 * S + j] = acc[n];
        }
      }
      for (int n = 0; n < N; ++n) pixel_grads(c, q + n, f_.data() + n * 4 * S);
    }
  }

  // Gradients at input row q of channel c from the blurred partials f = (mu_x, sq, xy, mu_y).
  void pixel_grads(int c, int q, const T* f) {
    const int W = g_.W, S = S_;
    const T* xq = x_row(c, q);
    const T* yq = y_row(c, q);
    const T* f_mu = f;
    const T* f_sq = f + S;
    const T* f_xy = f + 2 * S;
    T* __restrict__ dx = dx_.data();
#pragma omp simd
    for (int j = 0; j < W; ++j) dx[j] = ssim_grad_pixel(f_mu[j], f_sq[j], f_xy[j], xq[j], yq[j]);

    const size_t at = size_t(b_) * g_.C * g_.plane + size_t(c) * g_.plane + size_t(q) * W;
    if (pb_.grad_x) std::memcpy(pb_.grad_x + at, dx, sizeof(T) * W);
    if (pb_.grad_y) {
      const T* f_mu_y = f + 3 * S;
      T* __restrict__ gy = pb_.grad_y + at;
#pragma omp simd
      for (int j = 0; j < W; ++j)
        gy[j] = ssim_grad_pixel(f_mu_y[j], f_sq[j], f_xy[j], yq[j], xq[j]);
    }
    if (pb_.grad_flow) {  // sum over channels of d ssim / d x * d x / d flow
      T* __restrict__ gfx = pb_.grad_flow + size_t(b_) * 2 * g_.plane + size_t(q) * W;
      T* __restrict__ gfy = gfx + g_.plane;
      const T* dfx = dflow_row(c, q);
      const T* dfy = dfx + S;
      if (c == 0) {
#pragma omp simd
        for (int j = 0; j < W; ++j) {
          gfx[j] = dx[j] * dfx[j];
          gfy[j] = dx[j] * dfy[j];
        }
      } else {
#pragma omp simd
        for (int j = 0; j < W; ++j) {
          gfx[j] += dx[j] * dfx[j];
          gfy[j] += dx[j] * dfy[j];
        }
      }
    }
  }

  T inv_count() const { return T(1.0 / (double(g_.C) * g_.Ho * g_.Wo)); }

  const Problem<T>& pb_;
  const Geometry& g_;
  const int b_;
  const int S_;  // padded row length of every row buffer
  const int K_;  // partial maps carried: d_mu_x, d_sq, d_xy (and d_mu_y for grad_y)
  const Gauss<T> gauss_;
  TapRow<T> taps_;
  std::vector<const T*> x_rows_;  // ring (C, kRing) of pointers to the rows of x
  Buffer<T> halo_;   // ring (C, kRing, S): x of the rows above or below the band
  Buffer<T> dflow_;  // ring (C, kRing, [d/d flow_x | d/d flow_y])
  Buffer<T> m_;      // (2, 4, S) column moments of two output rows
  Buffer<T> h_;      // (4, S) window moments of one output row
  Buffer<T> s_;      // (S) SSIM of one output row
  Buffer<T> d_;      // (4, S + 16) partials of one output row, zero-padded
  Buffer<T> e_;      // ring (C, kRing, K, S) of partials blurred along their row
  Buffer<T> zeros_;  // (K, S) stands in for rows outside the SSIM map
  Buffer<T> f_;      // (4, 4, S) partials blurred back onto four input rows
  Buffer<T> dx_;     // (S) gradient of one row of x
  int q0_ = 0, q1_ = 0, next_ = 0;
  int done_ = 0;  // first input row whose gradient is not computed yet
};

// Runs the fused pass over every band and returns the (B,) mean SSIM.
template <typename T>
at::Tensor run_fused(Problem<T>& pb, const at::TensorOptions& options) {
  const Geometry& g = pb.g;
  // Per (image, channel, output row) sums, added in a fixed order: the result does not depend
  // on the number of threads.
  std::vector<double> row_sums(size_t(g.B) * g.C * g.Ho);
  pb.row_sums = row_sums.data();
  for_each_band(g, [&](int b, int q0, int q1) { BandPass<T>(pb, b).run(q0, q1); });
  at::Tensor out = at::empty({g.B}, options);
  T* o = out.data_ptr<T>();
  for (int b = 0; b < g.B; ++b) {
    double s = 0;
    const double* r = row_sums.data() + size_t(b) * g.C * g.Ho;
    for (int i = 0; i < g.C * g.Ho; ++i) s += r[i];
    o[b] = T(s / (double(g.C) * g.Ho * g.Wo));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Plain warp: forward, flow gradient, image gradient (scatter)
// ---------------------------------------------------------------------------------------------

template <typename T>
void warp_forward(const T* img, const T* flow, const Geometry& g, int padding, T* out) {
  const int64_t rows = int64_t(g.B) * g.H;
  const int64_t rows_per_task = std::max<int64_t>(16, grain(rows, rows * g.C * g.W));
  at::parallel_for(0, rows, rows_per_task, [&](int64_t begin, int64_t end) {
    TapRow<T> taps(g.W);
    for (int64_t by = begin; by < end; ++by) {
      const int b = int(by / g.H), y = int(by % g.H);
      taps.fill(flow + size_t(b) * 2 * g.plane, y, g.H, g.W, padding);
      for (int c = 0; c < g.C; ++c) {
        const size_t plane = (size_t(b) * g.C + c) * g.plane;
        taps.sample(img + plane, g.H, g.W, out + plane + size_t(y) * g.W);
      }
    }
  });
}

// grad_flow[b, :, y, x] = sum_c grad_out[b, c, y, x] * d warped[b, c, y, x] / d flow.
template <typename T>
void warp_flow_grad(const T* grad_out, const T* img, const T* flow, const Geometry& g,
                    int padding, T* grad_flow) {
  const int64_t rows = int64_t(g.B) * g.H;
  const int64_t rows_per_task = std::max<int64_t>(16, grain(rows, rows * g.C * g.W));
  at::parallel_for(0, rows, rows_per_task, [&](int64_t begin, int64_t end) {
    TapRow<T> taps(g.W);
    Buffer<T> v(g.W), dfx(g.W), dfy(g.W);
    for (int64_t by = begin; by < end; ++by) {
      const int b = int(by / g.H), y = int(by % g.H);
      taps.fill(flow + size_t(b) * 2 * g.plane, y, g.H, g.W, padding);
      T* __restrict__ gx = grad_flow + size_t(b) * 2 * g.plane + size_t(y) * g.W;
      T* __restrict__ gy = gx + g.plane;
      for (int c = 0; c < g.C; ++c) {
        const size_t plane = (size_t(b) * g.C + c) * g.plane;
        taps.sample_grad(img + plane, g.H, g.W, v.data(), dfx.data(), dfy.data());
        const T* go = grad_out + plane + size_t(y) * g.W;
#pragma omp simd
        for (int j = 0; j < g.W; ++j) {
          gx[j] = (c == 0 ? T(0) : gx[j]) + go[j] * dfx[j];
          gy[j] = (c == 0 ? T(0) : gy[j]) + go[j] * dfy[j];
        }
      }
    }
  });
}

// grad_img: the gradient of every warped pixel scattered to the four corners it sampled.
// Planes are independent, so they run in parallel and each is race-free.
template <typename T>
void warp_image_grad(const T* grad_out, const T* flow, const Geometry& g, int padding,
                     T* grad_img) {
  const int64_t planes = int64_t(g.B) * g.C;
  at::parallel_for(0, planes, grain(planes, planes * g.plane), [&](int64_t begin, int64_t end) {
    TapRow<T> taps(g.W);
    for (int64_t bc = begin; bc < end; ++bc) {
      const int b = int(bc / g.C);
      const T* go = grad_out + size_t(bc) * g.plane;
      T* gi = grad_img + size_t(bc) * g.plane;
      for (int y = 0; y < g.H; ++y) {
        taps.fill(flow + size_t(b) * 2 * g.plane, y, g.H, g.W, padding);
        for (int j = 0; j < g.W; ++j) {
          const BilinearTap<T> t = taps.at(j);
          T w00, w01, w10, w11;
          bilinear_weights(t, &w00, &w01, &w10, &w11);
          const T v = go[size_t(y) * g.W + j];
          gi[t.offset] += v * w00;
          gi[t.offset + t.step_x] += v * w01;
          gi[t.offset + t.step_y] += v * w10;
          gi[t.offset + t.step_y + t.step_x] += v * w11;
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// The backend of the Python-visible ops (warp_ssim_ops.h)
// ---------------------------------------------------------------------------------------------

struct CpuBackend {
  static constexpr bool kCuda = false;

  struct Scope {
    explicit Scope(const at::Tensor&) {}
  };

  template <typename T>
  static void warp(const WarpArgs<T>& a, const at::Tensor&, Scope&) {
    warp_forward(a.img, a.flow, Geometry(a.s), a.padding, a.out);
  }

  template <typename T>
  static void warp_backward(const WarpArgs<T>& a, const at::Tensor&, Scope&) {
    const Geometry g(a.s);
    if (a.grad_flow) warp_flow_grad(a.grad_out, a.img, a.flow, g, a.padding, a.grad_flow);
    if (a.grad_img) warp_image_grad(a.grad_out, a.flow, g, a.padding, a.grad_img);
  }

  template <typename T>
  static at::Tensor ssim(SSIMArgs<T>& a, const at::Tensor& like, Scope&) {
    Problem<T> pb(a);
    return run_fused(pb, like.options());
  }
};

}  // namespace
}  // namespace warp_kernel

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  warp_kernel::Ops<warp_kernel::CpuBackend>::define(
      m, "warp_kernel CPU ops: fused bilinear flow-warp + SSIM (float32/float64)");
}

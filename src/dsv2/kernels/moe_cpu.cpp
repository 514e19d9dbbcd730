// SwiGLU experts on the CPU for few tokens: the routed experts of a MoE layer in one call (grouped by expert), or
// one dense / shared-experts MLP (one expert that every token goes through with weight 1); and a plain linear
// (dsv2_linear) with the same tiles.
//
// For token t and its chosen experts e with weights w (fp32):
//   act[s]  = silu(x[t] . gate[e]^T) * (x[t] . up[e]^T)
//   out[t]  = sum_e w * (act[s] . down[e]^T)                 (summed in fp32, rounded once)
// which is what the eager path computes (model/moe.py ExpertGroup.forward, model/layers.py MLP.forward). With bf16
// activations the intermediate values are rounded to bf16 where torch's bf16 operators round them (gate, up,
// silu(gate), act, each expert's output), so the two differ only by the order of fp32 sums inside the dot products;
// with fp32 activations (over fp32 weights, or bf16 ones widened: the upcast plan) nothing is rounded.
//
// Decode multiplies few rows by each weight, so the work is reading weights: every weight row is read from memory
// once per call and dotted with all of its expert's tokens while in L1 (register tiles of one weight row -- four
// when an expert has many tokens -- x COLS tokens; the tokens come in blocks of TOKEN_BLOCK so that a block's
// activations stay in L2). Two passes, each thread streaming one contiguous part of the weights, neither with two
// threads writing the same memory:
//   1. gate/up: the active experts' gate and up rows, one after another, cut into a range per thread;
//   2. down: a range of output columns per thread, over all experts in turn (so it owns those columns of out).
// The dot products: on CPUs with AVX-512 BF16 a bf16 x bf16 product sums pairs by the bf16 dot-product
// instruction (exact products, fp32 sums); else each bf16 value is widened to fp32 (a 16-bit shift) and multiplied
// by fused multiply-adds, 16 (AVX-512) or 8 (AVX2) lanes wide; elsewhere plain loops the compiler vectorises.
//
// Weights: bf16 or fp32, rows contiguous; activations: bf16 or fp32 (an fp32 x over bf16 weights is the "upcast"
// plan of CPUs without fast bf16: weights widened on the fly, no rounding of x).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <omp.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define DSV2_BF16_DOT 1
#endif

namespace {

using bf16 = uint16_t;

inline float widen(bf16 v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float widen(float v) { return v; }

inline bf16 round_bf16(float f) {  // round to nearest even, as torch's .to(torch.bfloat16)
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return static_cast<bf16>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
inline float rounded(float f) { return widen(round_bf16(f)); }  // f's nearest bf16, as fp32
inline void store(bf16* p, float f) { *p = round_bf16(f); }
inline void store(float* p, float f) { *p = f; }
inline void put(void* out, bool out_bf16, int64_t at, float f) {  // element `at` of an output, bf16 or fp32
  if (out_bf16) store(static_cast<bf16*>(out) + at, f);
  else store(static_cast<float*>(out) + at, f);
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

// ---- register tiles: acc[r][c] = w[r] . v[c] over n elements -------------------------------------------------
#if defined(__AVX512F__)
constexpr int LANES = 16;
using vec = __m512;
inline vec load(const float* p) { return _mm512_loadu_ps(p); }
inline vec load(const bf16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec zero() { return _mm512_setzero_ps(); }
inline float hsum(vec v) { return _mm512_reduce_add_ps(v); }
constexpr int ROWS = 4, COLS = 4;  // 16 accumulators of 32 registers
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int LANES = 8;
using vec = __m256;
inline vec load(const float* p) { return _mm256_loadu_ps(p); }
inline vec load(const bf16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec zero() { return _mm256_setzero_ps(); }
inline float hsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
constexpr int ROWS = 4, COLS = 3;  // 12 accumulators of 16 registers (3 tokens: 15-25% faster than 2 at 16-32)
#else
constexpr int LANES = 8;
struct vec { float v[8]; };
template <class T> inline vec load(const T* p) { vec r; for (int i = 0; i < 8; ++i) r.v[i] = widen(p[i]); return r; }
inline vec fma(vec a, vec b, vec c) { for (int i = 0; i < 8; ++i) c.v[i] += a.v[i] * b.v[i]; return c; }
inline vec add(vec a, vec b) { for (int i = 0; i < 8; ++i) a.v[i] += b.v[i]; return a; }
inline vec zero() { return vec{}; }
inline float hsum(vec v) { float s = 0; for (int i = 0; i < 8; ++i) s += v.v[i]; return s; }
constexpr int ROWS = 4, COLS = 2;
#endif

// Small tiles (one row by one or two tokens: decode) keep U partial sums per accumulator over consecutive vectors,
// so that at least four fused multiply-adds are in flight: with one, each waits for the previous one's result
// (~4 cycles), which caps a core at 2 weights a cycle with 8 lanes -- about one core's share of memory bandwidth,
// so decode ran at 75% of the streaming rate on AVX2 (AMD EPYC Zen 3: 14 of 18.5 GB/s).
template <int R, int C, class TW, class TV>
inline void tile(const TW* const* w, const TV* const* v, int n, float (*out)[COLS]) {
  constexpr int U = R * C >= 4 ? 1 : 4 / (R * C);
  vec acc[U][R][C];
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[u][r][c] = zero();
  int k = 0;
  for (; k + U * LANES <= n; k += U * LANES)
    for (int u = 0; u < U; ++u) {
      vec vv[C];
      for (int c = 0; c < C; ++c) vv[c] = load(v[c] + k + u * LANES);
      for (int r = 0; r < R; ++r) {
        const vec ww = load(w[r] + k + u * LANES);
        for (int c = 0; c < C; ++c) acc[u][r][c] = fma(ww, vv[c], acc[u][r][c]);
      }
    }
  for (; k + LANES <= n; k += LANES) {
    vec vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load(v[c] + k);
    for (int r = 0; r < R; ++r) {
      const vec ww = load(w[r] + k);
      for (int c = 0; c < C; ++c) acc[0][r][c] = fma(ww, vv[c], acc[0][r][c]);
    }
  }
  for (int u = 1; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[0][r][c] = add(acc[0][r][c], acc[u][r][c]);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = hsum(acc[0][r][c]);
      for (int kk = k; kk < n; ++kk) s += widen(w[r][kk]) * widen(v[c][kk]);
      out[r][c] = s;
    }
}

#ifdef DSV2_BF16_DOT
// bf16 x bf16: 32 pairs a register, products exact and summed in fp32
template <int R, int C>
inline void tile(const bf16* const* w, const bf16* const* v, int n, float (*out)[COLS]) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  int k = 0;
  for (; k + 32 <= n; k += 32) {
    __m512bh vv[C];
    for (int c = 0; c < C; ++c) vv[c] = (__m512bh)_mm512_loadu_si512(v[c] + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh ww = (__m512bh)_mm512_loadu_si512(w[r] + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], ww, vv[c]);
    }
  }
  if (k < n) {
    const __mmask32 tail = (__mmask32)((1ull << (n - k)) - 1);
    __m512bh vv[C];
    for (int c = 0; c < C; ++c) vv[c] = (__m512bh)_mm512_maskz_loadu_epi16(tail, v[c] + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh ww = (__m512bh)_mm512_maskz_loadu_epi16(tail, w[r] + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], ww, vv[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r][c] = _mm512_reduce_add_ps(acc[r][c]);
}
#endif

// acc[r][c] = w[r] . v[c] for r < nr <= ROWS, c < nc <= COLS (the tile's size chosen at run time)
template <int R, int C, class TW, class TV>
inline void tile_upto(const TW* const* w, const TV* const* v, int nc, int n, float (*out)[COLS]) {
  if constexpr (C == 1) {
    tile<R, 1>(w, v, n, out);
  } else {
    if (nc >= C) tile<R, C>(w, v, n, out);
    else tile_upto<R, C - 1>(w, v, nc, n, out);
  }
}

template <int R, class TW, class TV>
inline void dots_upto(const TW* const* w, int nr, const TV* const* v, int nc, int n, float (*out)[COLS]) {
  if constexpr (R == 1) {
    tile_upto<1, COLS>(w, v, nc, n, out);
  } else {
    if (nr >= R) tile_upto<R, COLS>(w, v, nc, n, out);
    else dots_upto<R - 1>(w, nr, v, nc, n, out);
  }
}

template <class TW, class TV>
inline void dots(const TW* const* w, int nr, const TV* const* v, int nc, int n, float (*out)[COLS]) {
  dots_upto<ROWS>(w, nr, v, nc, n, out);
}

// This thread's contiguous part [first, last) of n units of work, cut at multiples of `align`.
inline void share(int64_t n, int64_t align, int64_t* first, int64_t* last) {
  const int threads = omp_get_num_threads(), me = omp_get_thread_num();
  const int64_t blocks = (n + align - 1) / align;
  *first = std::min(n, blocks * me / threads * align);
  *last = std::min(n, blocks * (me + 1) / threads * align);
}

constexpr int TOKEN_BLOCK = 64;  // tokens whose activations are reused from L2 per sweep over a weight range

// Weight rows per tile for an expert with this many tokens. Few tokens (decode): one row at a time, so that each
// thread reads its weights as one sequential stream -- tiles of four rows read four streams of one row (1-2 KB)
// each, which the hardware prefetchers do not follow, and measured ~1.6x slower from memory (11-16 vs 23-32 GB/s,
// 2 threads). From 4 tokens on: four rows, reusing each loaded activation four times where arithmetic dominates.
inline int tile_rows(int tokens) { return tokens >= 4 ? ROWS : 1; }

template <class TW, class TV>
void run(const TV* x, int T, int H, const int64_t* idx, const float* wts, int K, const TW* gate, const TW* up,
         int64_t gu_stride, const TW* down, int64_t d_stride, int E, int I, void* out_ptr, bool out_bf16) {
  constexpr bool NARROW = std::is_same<TV, bf16>::value;
  // group the T*K assignments by expert (counting sort, stable): slot s -> token, weight
  const int n_slots = idx ? T * K : T;
  std::vector<int> count(E + 1, 0), token(n_slots);
  std::vector<float> weight(n_slots);
  if (idx) {
    for (int a = 0; a < T * K; ++a) count[idx[a] + 1]++;
    for (int e = 0; e < E; ++e) count[e + 1] += count[e];
    std::vector<int> fill(count.begin(), count.end() - 1);
    for (int a = 0; a < T * K; ++a) {
      const int s = fill[idx[a]]++;
      token[s] = a / K;
      weight[s] = wts[a];
    }
  } else {
    count[1] = T;
    for (int t = 0; t < T; ++t) token[t] = t, weight[t] = 1.0f;
  }
  std::vector<int> active;  // experts with tokens, in expert order
  for (int e = 0; e < E; ++e)
    if (count[e + 1] > count[e]) active.push_back(e);

  // pass 1: h[s, j] = gate[e, j] . x[token[s]] and h[s, I + j] = up[e, j] . x[token[s]]. The active experts'
  // 2I rows each (gate rows, then up rows: for stacked gate_up weights, their order in memory) are cut into one
  // contiguous range per thread, so each thread streams its part of the weights front to back in one stream, which
  // the hardware prefetchers follow. Then act = silu(gate) * up.
  std::vector<float> h(static_cast<size_t>(n_slots) * 2 * I);
  std::vector<TV> act(static_cast<size_t>(n_slots) * I);
  const int64_t n_rows = static_cast<int64_t>(active.size()) * 2 * I;
#pragma omp parallel
  {
    int64_t first, last;
    share(n_rows, ROWS, &first, &last);
    while (first < last) {  // one expert's part of the range at a time
      const int e = active[first / (2 * I)];
      const int j0 = static_cast<int>(first % (2 * I));
      const int j1 = static_cast<int>(std::min<int64_t>(2 * I, j0 + (last - first)));
      first += j1 - j0;
      for (int b0 = count[e]; b0 < count[e + 1]; b0 += TOKEN_BLOCK) {
        const int b1 = std::min(count[e + 1], b0 + TOKEN_BLOCK);
        const int rows = tile_rows(b1 - b0);
        for (int j = j0; j < j1; j += rows) {
          const int nj = std::min(rows, j1 - j);
          const TW* w[ROWS];
          for (int r = 0; r < nj; ++r)
            w[r] = (j + r < I ? gate + static_cast<int64_t>(j + r) * H : up + static_cast<int64_t>(j + r - I) * H)
                   + e * gu_stride;
          for (int s = b0; s < b1; s += COLS) {
            const int ns = std::min(COLS, b1 - s);
            const TV* v[COLS];
            for (int c = 0; c < ns; ++c) v[c] = x + static_cast<int64_t>(token[s + c]) * H;
            float acc[ROWS][COLS];
            dots(w, nj, v, ns, H, acc);
            for (int r = 0; r < nj; ++r)
              for (int c = 0; c < ns; ++c) h[static_cast<size_t>(s + c) * 2 * I + j + r] = acc[r][c];
          }
        }
      }
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int s = 0; s < n_slots; ++s)
      for (int j = 0; j < I; ++j) {
        const float* hs = h.data() + static_cast<size_t>(s) * 2 * I;
        if constexpr (NARROW) {  // bf16 activations: rounded where torch's bf16 ops round them
          const float g = rounded(hs[j]), u = rounded(hs[I + j]);
          store(&act[static_cast<size_t>(s) * I + j], rounded(silu(g)) * u);
        } else {
          store(&act[static_cast<size_t>(s) * I + j], silu(hs[j]) * hs[I + j]);
        }
      }
  }

  // pass 2: out[t, i] = sum over t's slots s of weight[s] * (down[e, i] . act[s]). Each thread owns a contiguous
  // range of output columns (so no two threads add into the same place) and streams that range of rows of every
  // active expert in turn.
  std::vector<float> sum(static_cast<size_t>(T) * H, 0.0f);
#pragma omp parallel
  {
    int64_t first, last;
    share(H, ROWS, &first, &last);
    const int i0 = static_cast<int>(first), i1 = static_cast<int>(last);
    for (int e : active) {
      const TW* d = down + e * d_stride;
      for (int b0 = count[e]; b0 < count[e + 1]; b0 += TOKEN_BLOCK) {
        const int b1 = std::min(count[e + 1], b0 + TOKEN_BLOCK);
        const int rows = tile_rows(b1 - b0);
        for (int i = i0; i < i1; i += rows) {
          const int ni = std::min(rows, i1 - i);
          const TW* w[ROWS];
          for (int r = 0; r < ni; ++r) w[r] = d + static_cast<int64_t>(i + r) * I;
          for (int s = b0; s < b1; s += COLS) {
            const int ns = std::min(COLS, b1 - s);
            const TV* v[COLS];
            for (int c = 0; c < ns; ++c) v[c] = act.data() + static_cast<size_t>(s + c) * I;
            float acc[ROWS][COLS];
            dots(w, ni, v, ns, I, acc);
            for (int c = 0; c < ns; ++c) {
              float* row = sum.data() + static_cast<size_t>(token[s + c]) * H;
              for (int r = 0; r < ni; ++r) row[i + r] += weight[s + c] * (NARROW ? rounded(acc[r][c]) : acc[r][c]);
            }
          }
        }
      }
    }
    for (int t = 0; t < T; ++t)
      for (int i = i0; i < i1; ++i) {
        const int64_t at = static_cast<int64_t>(t) * H + i;
        put(out_ptr, out_bf16, at, sum[at]);
      }
  }
}

// out[t, n] = w[n] . x[t] for T few rows: each thread streams a contiguous range of the weight's N rows.
template <class TW, class TV>
void linear(const TV* x, int T, int K, const TW* w, int N, void* out_ptr, bool out_bf16) {
  const int rows = tile_rows(T);
#pragma omp parallel
  {
    int64_t first, last;
    share(N, ROWS, &first, &last);
    for (int b0 = 0; b0 < T; b0 += TOKEN_BLOCK) {
      const int b1 = std::min(T, b0 + TOKEN_BLOCK);
      for (int64_t n = first; n < last; n += rows) {
        const int nr = static_cast<int>(std::min<int64_t>(rows, last - n));
        const TW* wr[ROWS];
        for (int r = 0; r < nr; ++r) wr[r] = w + (n + r) * K;
        for (int t = b0; t < b1; t += COLS) {
          const int nt = std::min(COLS, b1 - t);
          const TV* v[COLS];
          for (int c = 0; c < nt; ++c) v[c] = x + static_cast<int64_t>(t + c) * K;
          float acc[ROWS][COLS];
          dots(wr, nr, v, nt, K, acc);
          for (int c = 0; c < nt; ++c)
            for (int r = 0; r < nr; ++r) put(out_ptr, out_bf16, static_cast<int64_t>(t + c) * N + n + r, acc[r][c]);
        }
      }
    }
  }
}

}  // namespace

// x [T, H] (bf16 if x_bf16, else fp32); idx [T, K] int64 and wts [T, K] fp32 (idx null: every token through expert
// 0 with weight 1); expert e's gate rows [I, H] at gate + e * gu_stride, its up rows at up + e * gu_stride, its
// down rows [H, I] at down + e * d_stride (elements; bf16 if w_bf16, else fp32); out [T, H] (bf16 if out_bf16, else
// fp32). Returns 0, or -1 when an expert id is out of range (nothing is written then).
extern "C" int dsv2_swiglu_experts(const void* x, int x_bf16, int T, int H, const int64_t* idx, const float* wts,
                                   int K, const void* gate, const void* up, int64_t gu_stride, const void* down,
                                   int64_t d_stride, int w_bf16, int E, int I, void* out, int out_bf16) {
  if (idx)
    for (int a = 0; a < T * K; ++a)
      if (idx[a] < 0 || idx[a] >= E) return -1;
  if (!idx) E = 1;
  if (w_bf16 && x_bf16)
    run(static_cast<const bf16*>(x), T, H, idx, wts, K, static_cast<const bf16*>(gate), static_cast<const bf16*>(up),
        gu_stride, static_cast<const bf16*>(down), d_stride, E, I, out, out_bf16);
  else if (w_bf16)
    run(static_cast<const float*>(x), T, H, idx, wts, K, static_cast<const bf16*>(gate),
        static_cast<const bf16*>(up), gu_stride, static_cast<const bf16*>(down), d_stride, E, I, out, out_bf16);
  else if (x_bf16)
    return -2;  // bf16 activations over fp32 weights: not a plan dsv2 makes
  else
    run(static_cast<const float*>(x), T, H, idx, wts, K, static_cast<const float*>(gate),
        static_cast<const float*>(up), gu_stride, static_cast<const float*>(down), d_stride, E, I, out, out_bf16);
  return 0;
}

// out [T, N] = x [T, K] . w [N, K]^T (bf16 if out_bf16, else fp32): a linear layer's few rows (decode). x bf16 if
// x_bf16, else fp32; w bf16 if w_bf16, else fp32 (bf16 x over fp32 w is refused: -2).
extern "C" int dsv2_linear(const void* x, int x_bf16, int T, int K, const void* w, int w_bf16, int N, void* out,
                           int out_bf16) {
  if (w_bf16 && x_bf16)
    linear(static_cast<const bf16*>(x), T, K, static_cast<const bf16*>(w), N, out, out_bf16);
  else if (w_bf16)
    linear(static_cast<const float*>(x), T, K, static_cast<const bf16*>(w), N, out, out_bf16);
  else if (x_bf16)
    return -2;
  else
    linear(static_cast<const float*>(x), T, K, static_cast<const float*>(w), N, out, out_bf16);
  return 0;
}

// Whether bf16 x bf16 products use the CPU's bf16 dot-product instruction (for `dsv2 info --system`).
extern "C" int dsv2_swiglu_experts_bf16_dot() {
#ifdef DSV2_BF16_DOT
  return 1;
#else
  return 0;
#endif
}

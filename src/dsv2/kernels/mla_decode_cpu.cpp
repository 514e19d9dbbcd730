// Absorbed MLA decode over the paged latent cache, for the CPU (flash-decoding: split-KV + a combine).
//
// One query per sequence attends to its whole context in the latent space: for head h and context position t,
//   score[h, t] = scale * (q[h] . latent[t])          (the whole R + Dr row: q_lat . c_kv + q_pe . k_pe)
//   o_lat[h]    = sum_t softmax_t(score[h, :]) * latent[t, :R]
// Every head reads the same latent row, so each row is converted to fp32 once (in blocks of the cache's block
// size) and serves all heads from L1. A sequence's context is cut into `splits` ranges of blocks, each an OpenMP
// work item with its own running max / sum / unnormalised output (online softmax per block); a second loop
// combines the ranges. Everything past the loads is fp32, as in the plain twin (dsv2.model.mla.latent_attention).
//
// Portable C++: the loops over R and R + Dr are written for the compiler to vectorise (-O3 with the build machine's
// vector ISA, see cpu_mla.py); the OpenMP runtime is the one torch already loaded (libgomp.so.1).
//
// Shapes: q [B, n, D] (bf16 or fp32), cache [NB, BS, D] (bf16 or fp32), tables [B, W] int32, lens [B] int32,
// out [B, n, R] (bf16 or fp32); scratch [B, splits, n, R + 2] fp32. D = R + Dr.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DSV2_BF16_DOT 1
#endif

namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// e^x for x <= 0 (softmax weights), within ~2 ulp of expf, in plain arithmetic the compiler vectorises (a call to
// expf per weight does not, and costs more than the rest of the kernel): x = k ln2 + r with |r| <= ln2 / 2, e^r by
// Cephes' degree-6 polynomial, 2^k written into the exponent bits. Below -87.3 (e^x < 2^-126) it returns 0.
inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.3f);
  const float k = std::floor(clamped * 1.44269504088896341f + 0.5f);
  const float r = clamped - k * 0.693359375f + k * 2.12194440e-4f;  // ln2 in two parts: exact k * hi
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.0f : y * scale;
}

// Rows [rows, D] of the cache block into fp32 dst [rows, D].
void load_rows(const void* cache, bool bf16, int64_t first_row, int rows, int D, float* dst) {
  if (bf16) {
    const uint16_t* src = static_cast<const uint16_t*>(cache) + first_row * D;
    const int64_t count = static_cast<int64_t>(rows) * D;
#pragma omp simd
    for (int64_t i = 0; i < count; ++i) dst[i] = bf16_to_float(src[i]);
  } else {
    std::memcpy(dst, static_cast<const float*>(cache) + first_row * D, sizeof(float) * rows * D);
  }
}

// scores [n, BS] of the block's `valid` rows [valid, D]: four heads at a time, so each row element loaded serves four
// dot products.
void block_scores(const float* q, const float* rows, int valid, int n, int D, int BS, float scale, float* scores) {
  int h = 0;
  for (; h + 4 <= n; h += 4) {
    const float *q0 = q + h * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
    for (int t = 0; t < valid; ++t) {
      const float* row = rows + t * D;
      float d0 = 0.0f, d1 = 0.0f, d2 = 0.0f, d3 = 0.0f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
      for (int d = 0; d < D; ++d) {
        d0 += q0[d] * row[d];
        d1 += q1[d] * row[d];
        d2 += q2[d] * row[d];
        d3 += q3[d] * row[d];
      }
      scores[h * BS + t] = d0 * scale;
      scores[(h + 1) * BS + t] = d1 * scale;
      scores[(h + 2) * BS + t] = d2 * scale;
      scores[(h + 3) * BS + t] = d3 * scale;
    }
  }
  for (; h < n; ++h) {
    const float* qh = q + h * D;
    for (int t = 0; t < valid; ++t) {
      const float* row = rows + t * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int d = 0; d < D; ++d) dot += qh[d] * row[d];
      scores[h * BS + t] = dot * scale;
    }
  }
}

#ifdef DSV2_BF16_DOT
// block_scores from the bf16 query and cache rows as stored, by the CPU's bf16 dot-product instruction (AVX-512 BF16:
// 32 products a step, summed in fp32; bf16 x bf16 products are exact in fp32, so this is the fp32 arithmetic of
// block_scores without converting the rows first).
float dot_bf16(const uint16_t* a, const uint16_t* b, int D) {
  __m512 acc = _mm512_setzero_ps();
  int d = 0;
  for (; d + 32 <= D; d += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(a + d), (__m512bh)_mm512_loadu_si512(b + d));
  if (d < D) {
    const __mmask32 tail = static_cast<__mmask32>((1ull << (D - d)) - 1);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(tail, a + d),
                           (__m512bh)_mm512_maskz_loadu_epi16(tail, b + d));
  }
  return _mm512_reduce_add_ps(acc);
}

void block_scores_bf16(const uint16_t* q, const uint16_t* rows, int valid, int n, int D, int BS, float scale,
                       float* scores) {
  for (int h = 0; h < n; ++h)
    for (int t = 0; t < valid; ++t) scores[h * BS + t] = dot_bf16(q + h * D, rows + t * D, D) * scale;
}
#endif

// acc[h, :R] += sum_t weights[h, t] * rows[t, :R] for every head: HB heads x 16 columns of acc stay in registers
// while the block's rows stream past, so each row element is loaded once per HB heads (not once per head).
template <int HB>
void values_heads(const float* weights, const float* rows, int valid, int D, int R, int BS, float* acc) {
  constexpr int C = 16;
  int r0 = 0;
  for (; r0 + C <= R; r0 += C) {
    float a[HB][C];
    for (int h = 0; h < HB; ++h)
      for (int c = 0; c < C; ++c) a[h][c] = acc[h * (R + 2) + r0 + c];
    for (int t = 0; t < valid; ++t) {
      const float* row = rows + t * D + r0;
      for (int h = 0; h < HB; ++h) {
        const float w = weights[h * BS + t];
#pragma omp simd
        for (int c = 0; c < C; ++c) a[h][c] += w * row[c];
      }
    }
    for (int h = 0; h < HB; ++h)
      for (int c = 0; c < C; ++c) acc[h * (R + 2) + r0 + c] = a[h][c];
  }
  for (int h = 0; h < HB; ++h)  // the last R % 16 columns
    for (int t = 0; t < valid; ++t)
      for (int r = r0; r < R; ++r) acc[h * (R + 2) + r] += weights[h * BS + t] * rows[t * D + r];
}

void block_values(const float* weights, const float* rows, int valid, int n, int D, int R, int BS, float* acc) {
  int h = 0;
  for (; h + 8 <= n; h += 8) values_heads<8>(weights + h * BS, rows, valid, D, R, BS, acc + h * (R + 2));
  for (; h + 4 <= n; h += 4) values_heads<4>(weights + h * BS, rows, valid, D, R, BS, acc + h * (R + 2));
  for (; h < n; ++h) values_heads<1>(weights + h * BS, rows, valid, D, R, BS, acc + h * (R + 2));
}

// One sequence, blocks [block_begin, block_end) of its table, into part = [n, R + 2]: per head the output (unnormalised)
// | the running max m | the running sum l, kept there as the blocks go by.
void attend_range(const float* q, const uint16_t* q_bf16, const void* cache, bool bf16, const int32_t* table, int len,
                  int block_begin, int block_end, int n, int D, int R, int BS, float scale, float* part, float* rows,
                  float* scores) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float* acc = part;  // [n, R + 2], the first R of each head's row
  for (int h = 0; h < n; ++h) {
    std::fill(acc + h * (R + 2), acc + h * (R + 2) + R, 0.0f);
    part[h * (R + 2) + R] = neg_inf;  // m
    part[h * (R + 2) + R + 1] = 0.0f;  // l
  }
  for (int blk = block_begin; blk < block_end; ++blk) {
    const int valid = std::min(BS, len - blk * BS);
    if (valid <= 0) break;
    const int64_t first_row = static_cast<int64_t>(table[blk]) * BS;
    load_rows(cache, bf16, first_row, valid, D, rows);
#ifdef DSV2_BF16_DOT
    if (bf16 && q_bf16 != nullptr)
      block_scores_bf16(q_bf16, static_cast<const uint16_t*>(cache) + first_row * D, valid, n, D, BS, scale, scores);
    else
#endif
      block_scores(q, rows, valid, n, D, BS, scale, scores);
    for (int h = 0; h < n; ++h) {
      float* s = scores + h * BS;
      float &m = part[h * (R + 2) + R], &l = part[h * (R + 2) + R + 1];
      float block_max = neg_inf;
      for (int t = 0; t < valid; ++t) block_max = std::max(block_max, s[t]);
      const float m_new = std::max(m, block_max);
      const float correction = m == neg_inf ? 0.0f : exp_nonpositive(m - m_new);  // 0 for the first block
      float* out = acc + h * (R + 2);
      if (correction != 1.0f) {
#pragma omp simd
        for (int r = 0; r < R; ++r) out[r] *= correction;
      }
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int t = 0; t < valid; ++t) {
        s[t] = exp_nonpositive(s[t] - m_new);  // the weight, in place of the score
        sum += s[t];
      }
      l = l * correction + sum;
      m = m_new;
    }
    block_values(scores, rows, valid, n, D, R, BS, acc);
  }
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch's .to(torch.bfloat16)
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace

// q: [B, n, D] bf16 (q_is_bf16) or fp32; tables: row b at tables + b * table_stride; lens: lens[b * lens_stride]
// (strided views of the compiled step's input rows are read in place); out: [B, n, R] bf16 (out_is_bf16) or fp32.
// With a bf16 query and cache on a CPU with AVX-512 BF16, the scores come from the stored values directly.
// Returns 0, or 1 for shapes it does not take.
extern "C" int dsv2_mla_decode(const void* q_in, int q_is_bf16, const void* cache, int cache_is_bf16,
                               const int32_t* tables, int64_t table_stride, const int32_t* lens, int64_t lens_stride,
                               void* out_raw, int out_is_bf16, int B, int n, int D, int R, int BS, int W, int splits,
                               float scale) {
  if (B <= 0 || n <= 0 || R <= 0 || D < R || BS <= 0 || W <= 0 || splits <= 0) return 1;
  const bool bf16 = cache_is_bf16 != 0;
  const int per_split = (W + splits - 1) / splits;  // blocks per range
  const int64_t q_count = static_cast<int64_t>(B) * n * D;
  const uint16_t* q_bf16 = q_is_bf16 ? static_cast<const uint16_t*>(q_in) : nullptr;
  std::vector<float> q_converted(q_bf16 ? q_count : 0);
  if (q_bf16)
    for (int64_t i = 0; i < q_count; ++i) q_converted[i] = bf16_to_float(q_bf16[i]);
  const float* q = q_bf16 ? q_converted.data() : static_cast<const float*>(q_in);
  std::vector<float> work(static_cast<size_t>(B) * splits * n * (R + 2));
#pragma omp parallel
  {
    std::vector<float> rows(static_cast<size_t>(BS) * D), scores(static_cast<size_t>(n) * BS), o(R);
#pragma omp for schedule(static)
    for (int item = 0; item < B * splits; ++item) {
      const int b = item / splits, s = item % splits;
      const int len = lens[b * lens_stride];
      const int used_blocks = std::min(W, (len + BS - 1) / BS);
      const int begin = s * per_split, end = std::min(used_blocks, begin + per_split);
      float* part = work.data() + static_cast<int64_t>(item) * n * (R + 2);
      attend_range(q + static_cast<int64_t>(b) * n * D, q_bf16 ? q_bf16 + static_cast<int64_t>(b) * n * D : nullptr,
                   cache, bf16, tables + b * table_stride, len, begin, end, n, D, R, BS, scale, part, rows.data(),
                   scores.data());
    }
#pragma omp for schedule(static)
    for (int bh = 0; bh < B * n; ++bh) {
      const int b = bh / n, h = bh % n;
      const float* first = work.data() + (static_cast<int64_t>(b) * splits * n + h) * (R + 2);  // split 0
      const int64_t split_step = static_cast<int64_t>(n) * (R + 2);
      float M = -std::numeric_limits<float>::infinity();
      for (int s = 0; s < splits; ++s) M = std::max(M, first[s * split_step + R]);
      std::fill(o.begin(), o.end(), 0.0f);
      float total = 0.0f;
      for (int s = 0; s < splits; ++s) {
        const float* part = first + s * split_step;
        if (part[R + 1] == 0.0f) continue;  // a range past the context
        const float w = std::exp(part[R] - M);
        total += w * part[R + 1];
#pragma omp simd
        for (int r = 0; r < R; ++r) o[r] += w * part[r];
      }
      const float inv = 1.0f / total;
      if (out_is_bf16) {
        uint16_t* dst = static_cast<uint16_t*>(out_raw) + static_cast<int64_t>(bh) * R;
        for (int r = 0; r < R; ++r) dst[r] = float_to_bf16(o[r] * inv);
      } else {
        float* dst = static_cast<float*>(out_raw) + static_cast<int64_t>(bh) * R;
#pragma omp simd
        for (int r = 0; r < R; ++r) dst[r] = o[r] * inv;
      }
    }
  }
  return 0;
}

// Whether this build computes bf16 scores with the CPU's dot-product instruction (for `dsv2 info --system`).
extern "C" int dsv2_mla_decode_bf16_dot() {
#ifdef DSV2_BF16_DOT
  return 1;
#else
  return 0;
#endif
}

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
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define DSV2_AMX 1
#endif
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

// scores [n, BS] of the block's `valid` rows [valid, D]: four heads by three rows at a time, so each row element
// loaded serves four dot products and each query element three (12 sums in flight; one row at a time made the whole
// kernel ~10% slower on AVX2, AMD EPYC Zen 3).
void block_scores(const float* q, const float* rows, int valid, int n, int D, int BS, float scale, float* scores) {
  int h = 0;
  for (; h + 4 <= n; h += 4) {
    const float *q0 = q + h * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
    int t = 0;
    for (; t + 3 <= valid; t += 3) {
      const float *ra = rows + t * D, *rb = ra + D, *rc = rb + D;
      float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, b0 = 0.0f, b1 = 0.0f, b2 = 0.0f, b3 = 0.0f;
      float c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, c3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3, c0, c1, c2, c3)
      for (int d = 0; d < D; ++d) {
        const float x = ra[d], y = rb[d], z = rc[d];
        a0 += q0[d] * x, b0 += q0[d] * y, c0 += q0[d] * z;
        a1 += q1[d] * x, b1 += q1[d] * y, c1 += q1[d] * z;
        a2 += q2[d] * x, b2 += q2[d] * y, c2 += q2[d] * z;
        a3 += q3[d] * x, b3 += q3[d] * y, c3 += q3[d] * z;
      }
      const float dots[3][4] = {{a0, a1, a2, a3}, {b0, b1, b2, b3}, {c0, c1, c2, c3}};
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 4; ++j) scores[(h + j) * BS + t + i] = dots[i][j] * scale;
    }
    for (; t < valid; ++t) {
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
#ifdef __AVX512F__
  // 8 heads x 16 columns are 8 of AVX-512's 32 registers; with 8-lane vectors (AVX2) they would be 16, every register
  // there is, and the spills made the whole kernel ~10% slower than 4 heads at a time (AMD EPYC Zen 3)
  for (; h + 8 <= n; h += 8) values_heads<8>(weights + h * BS, rows, valid, D, R, BS, acc + h * (R + 2));
#endif
  for (; h + 4 <= n; h += 4) values_heads<4>(weights + h * BS, rows, valid, D, R, BS, acc + h * (R + 2));
  for (; h < n; ++h) values_heads<1>(weights + h * BS, rows, valid, D, R, BS, acc + h * (R + 2));
}

// part [n, R + 2] before a range: per head an output of zeros, running max m = -inf, running sum l = 0 (a range
// that holds no position keeps these, and the combine skips it).
void reset_part(float* part, int n, int R) {
  for (int h = 0; h < n; ++h) {
    std::fill(part + h * (R + 2), part + h * (R + 2) + R, 0.0f);
    part[h * (R + 2) + R] = -std::numeric_limits<float>::infinity();  // m
    part[h * (R + 2) + R + 1] = 0.0f;  // l
  }
}

// One sequence, blocks [block_begin, block_end) of its table, into part = [n, R + 2]: per head the output (unnormalised)
// | the running max m | the running sum l, kept there as the blocks go by.
void attend_range(const float* q, const uint16_t* q_bf16, const void* cache, bool bf16, const int32_t* table, int len,
                  int block_begin, int block_end, int n, int D, int R, int BS, float scale, float* part, float* rows,
                  float* scores) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float* acc = part;  // [n, R + 2], the first R of each head's row
  reset_part(part, n, R);
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

#ifdef DSV2_AMX
// ---- AMX tiles (Intel Sapphire Rapids and later): the same attention as attend_range, by bf16 tile products ------
// Two passes over a range of blocks, for up to 16 heads at a time (a tile's rows):
//   1. scores^T [positions, heads] = K [positions, D] . Q^T [D, heads]: the cached rows are the A tiles, read in place
//      (16 rows of 32 bf16 a step, the row stride of the cache), the query's transpose is the B tile, prepared once in
//      the pairwise ("VNNI") layout tile products take. bf16 x bf16 products are exact, summed in fp32: the arithmetic
//      of the bf16 dot-product path. The range's max per head is then known, so no output is ever rescaled.
//   2. o [heads, R] += P [heads, positions] . V [positions, R], P = e^(score - max): P is split into a bf16 high part
//      and a bf16 remainder (two products; ~16 bits of each weight kept, against the fp32 twin's 24), the V rows are
//      copied into the pairwise layout with zeros past the context (a slot past it may hold any bits), the output
//      tiles accumulate in `part` itself.
// Needs D and R multiples of 32; each block is taken in chunks of CR rows, the largest divisor of BS up to 16, so a
// tile never reads past its block. The kernel asks Linux for the tile state once (arch_prctl); where that is refused,
// or DSV2_NO_AMX is set on the Python side, attend_range serves.
#include <sys/syscall.h>
#include <unistd.h>

bool amx_permitted() {
  static const bool ok = [] {
    constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Pass 1's tiles: 0 scores [CR, nh] fp32; 1 K rows [CR, 32 bf16]; 2 Q^T pairs [16, nh x 2 bf16].
void configure_score_tiles(int cr, int nh) {
  TileConfig cfg;
  cfg.rows[0] = static_cast<uint8_t>(cr), cfg.colsb[0] = static_cast<uint16_t>(nh * 4);
  cfg.rows[1] = static_cast<uint8_t>(cr), cfg.colsb[1] = 64;
  cfg.rows[2] = 16, cfg.colsb[2] = static_cast<uint16_t>(nh * 4);
  _tile_loadconfig(&cfg);
}

// Pass 2's: 0, 1 output [nh, 16] fp32 (two column tiles at a time, two independent chains); 4 / 5 weights high /
// remainder [nh, KP bf16]; 6, 7 V pairs [KP / 2, 16 x 2 bf16].
void configure_value_tiles(int kp, int nh) {
  TileConfig cfg;
  for (int t : {0, 1}) cfg.rows[t] = static_cast<uint8_t>(nh), cfg.colsb[t] = 64;
  for (int t : {4, 5}) cfg.rows[t] = static_cast<uint8_t>(nh), cfg.colsb[t] = static_cast<uint16_t>(kp * 2);
  for (int t : {6, 7}) cfg.rows[t] = static_cast<uint8_t>(kp / 2), cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

inline uint16_t bf16_bits_truncate(float f) {  // exact for the high part: the remainder carries the rest
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return static_cast<uint16_t>(bits >> 16);
}

struct AmxScratch {  // per thread, sized by the widest call; the per-chunk tiles (<= 16 x 16) live on the stack
  std::vector<uint16_t> q_pairs, v_pairs;
  std::vector<float> scores;
};

void attend_range_amx(const uint16_t* q, const uint16_t* cache, const int32_t* table, int len, int block_begin,
                      int block_end, int n, int D, int R, int BS, float scale, float* part, AmxScratch& s) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  int cr = std::min(BS, 16);
  while (BS % cr != 0) --cr;
  const int kp = cr + (cr & 1);  // weights / V rows per chunk, padded to pairs
  const int used_end = std::min(block_end, (len + BS - 1) / BS);
  const int positions = std::max(0, std::min(len, used_end * BS) - block_begin * BS);
  reset_part(part, n, R);
  if (positions <= 0) return;
  const int ksteps = D / 32;
  for (int h0 = 0; h0 < n; h0 += 16) {
    const int nh = std::min(16, n - h0);
    configure_score_tiles(cr, nh);
    // Q^T in pairs: q_pairs[k][r][h][2] = q[h0 + h][32k + 2r .. + 1]
    s.q_pairs.assign(static_cast<size_t>(ksteps) * 16 * nh * 2, 0);
    for (int k = 0; k < ksteps; ++k)
      for (int r = 0; r < 16; ++r)
        for (int h = 0; h < nh; ++h)
          for (int e = 0; e < 2; ++e)
            s.q_pairs[((k * 16 + r) * nh + h) * 2 + e] = q[static_cast<int64_t>(h0 + h) * D + 32 * k + 2 * r + e];
    // pass 1: scores [positions, 16] (heads past nh: zeros), and the max per head
    s.scores.assign(static_cast<size_t>(positions) * 16, 0.0f);
    alignas(64) float tile_out[16 * 16];
    float mx[16], sum[16];
    std::fill(mx, mx + 16, 0.0f);
    std::fill(mx, mx + nh, neg_inf);
    for (int blk = block_begin, p0 = 0; blk < used_end; ++blk) {
      const int valid = std::min(BS, len - blk * BS);
      const uint16_t* block = cache + static_cast<int64_t>(table[blk]) * BS * D;
      for (int c0 = 0; c0 < valid; c0 += cr) {
        _tile_zero(0);
        for (int k = 0; k < ksteps; ++k) {
          _tile_loadd(1, block + static_cast<int64_t>(c0) * D + 32 * k, D * 2);
          _tile_loadd(2, s.q_pairs.data() + k * 16 * nh * 2, nh * 4);
          _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, tile_out, nh * 4);
        const int rows = std::min(cr, valid - c0);
        for (int t = 0; t < rows; ++t)
          for (int h = 0; h < nh; ++h) {
            const float v = tile_out[t * nh + h] * scale;
            s.scores[static_cast<size_t>(p0 + t) * 16 + h] = v;
            mx[h] = std::max(mx[h], v);
          }
        p0 += rows;
      }
    }
    // weights e^(score - max) in place, and their sums (all 16 lanes: one vector a position)
    std::fill(sum, sum + 16, 0.0f);
    for (int p = 0; p < positions; ++p) {
      float* v = s.scores.data() + static_cast<size_t>(p) * 16;
#pragma omp simd
      for (int h = 0; h < 16; ++h) {
        v[h] = exp_nonpositive(v[h] - mx[h]);
        sum[h] += v[h];
      }
    }
    configure_value_tiles(kp, nh);
    // pass 2: output [nh, R] += weights [nh, chunk] . V [chunk, R], accumulated in part's rows
    alignas(64) uint16_t w_hi[16 * 16], w_lo[16 * 16];  // [nh, kp], kp <= 16
    s.v_pairs.resize(static_cast<size_t>(R / 16) * (kp / 2) * 32);
    float* out = part + static_cast<int64_t>(h0) * (R + 2);
    // interleaving two rows' 32 columns: lo_idx gives (a[c], b[c]) for c < 16, hi_idx for c = 16..31
    const __m512i zero = _mm512_setzero_si512();
    const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                            37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi_idx = _mm512_add_epi16(lo_idx, _mm512_set1_epi16(16));
    for (int blk = block_begin, p0 = 0; blk < used_end; ++blk) {
      const int valid = std::min(BS, len - blk * BS);
      const uint16_t* block = cache + static_cast<int64_t>(table[blk]) * BS * D;
      for (int c0 = 0; c0 < valid; c0 += cr) {
        const int rows = std::min(cr, valid - c0);
        for (int h = 0; h < nh; ++h)
          for (int t = 0; t < kp; ++t) {
            const float w = t < rows ? s.scores[static_cast<size_t>(p0 + t) * 16 + h] : 0.0f;
            const uint16_t hi = bf16_bits_truncate(w);
            w_hi[h * kp + t] = hi;
            w_lo[h * kp + t] = float_to_bf16(w - bf16_to_float(hi));
          }
        // v_pairs[j][r][c][2] = V[c0 + 2r .. + 1][16 j + c], zero past the context
        for (int r = 0; r < kp / 2; ++r) {
          const uint16_t* row0 = block + static_cast<int64_t>(c0 + 2 * r) * D;
          for (int j = 0; j < R / 32; ++j) {
            const __m512i a = 2 * r < rows ? _mm512_loadu_si512(row0 + 32 * j) : zero;
            const __m512i b = 2 * r + 1 < rows ? _mm512_loadu_si512(row0 + D + 32 * j) : zero;
            _mm512_storeu_si512(s.v_pairs.data() + ((2 * j) * (kp / 2) + r) * 32, _mm512_permutex2var_epi16(a, lo_idx, b));
            _mm512_storeu_si512(s.v_pairs.data() + ((2 * j + 1) * (kp / 2) + r) * 32,
                                _mm512_permutex2var_epi16(a, hi_idx, b));
          }
        }
        _tile_loadd(4, w_hi, kp * 2);
        _tile_loadd(5, w_lo, kp * 2);
        for (int j = 0; j < R / 16; j += 2) {  // R / 16 is even (R % 32 == 0)
          _tile_loadd(0, out + 16 * j, (R + 2) * 4);
          _tile_loadd(1, out + 16 * (j + 1), (R + 2) * 4);
          _tile_loadd(6, s.v_pairs.data() + j * (kp / 2) * 32, 64);
          _tile_loadd(7, s.v_pairs.data() + (j + 1) * (kp / 2) * 32, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(0, 5, 6);
          _tile_dpbf16ps(1, 5, 7);
          _tile_stored(0, out + 16 * j, (R + 2) * 4);
          _tile_stored(1, out + 16 * (j + 1), (R + 2) * 4);
        }
        p0 += rows;
      }
    }
    for (int h = 0; h < nh; ++h) {
      part[(h0 + h) * (R + 2) + R] = mx[h];
      part[(h0 + h) * (R + 2) + R + 1] = sum[h];
    }
  }
  _tile_release();
}
#endif

}  // namespace

// q: [B, n, D] bf16 (q_is_bf16) or fp32; tables: row b at tables + b * table_stride; lens: lens[b * lens_stride]
// (strided views of the compiled step's input rows are read in place); out: [B, n, R] bf16 (out_is_bf16) or fp32.
// With a bf16 query and cache on a CPU with AVX-512 BF16, the scores come from the stored values directly.
// Returns 0, or 1 for shapes it does not take.
extern "C" int dsv2_mla_decode(const void* q_in, int q_is_bf16, const void* cache, int cache_is_bf16,
                               const int32_t* tables, int64_t table_stride, const int32_t* lens, int64_t lens_stride,
                               void* out_raw, int out_is_bf16, int B, int n, int D, int R, int BS, int W, int splits,
                               float scale, int use_amx) {
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
#ifdef DSV2_AMX
  const bool amx = use_amx && bf16 && q_bf16 != nullptr && D % 32 == 0 && R % 32 == 0 && amx_permitted();
#else
  (void)use_amx;
#endif
#pragma omp parallel
  {
    std::vector<float> rows(static_cast<size_t>(BS) * D), scores(static_cast<size_t>(n) * BS), o(R);
#ifdef DSV2_AMX
    AmxScratch amx_scratch;
#endif
#pragma omp for schedule(static)
    for (int item = 0; item < B * splits; ++item) {
      const int b = item / splits, s = item % splits;
      const int len = lens[b * lens_stride];
      const int used_blocks = std::min(W, (len + BS - 1) / BS);
      const int begin = s * per_split, end = std::min(used_blocks, begin + per_split);
      float* part = work.data() + static_cast<int64_t>(item) * n * (R + 2);
#ifdef DSV2_AMX
      if (amx) {
        attend_range_amx(q_bf16 + static_cast<int64_t>(b) * n * D, static_cast<const uint16_t*>(cache),
                         tables + b * table_stride, len, begin, end, n, D, R, BS, scale, part, amx_scratch);
        continue;
      }
#endif
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

// Whether this build multiplies with AMX tiles (a bf16 query and cache, D and R multiples of 32) and Linux grants
// this process the tile state (for `dsv2 info --system` and the tests).
extern "C" int dsv2_mla_decode_amx() {
#ifdef DSV2_AMX
  return amx_permitted() ? 1 : 0;
#else
  return 0;
#endif
}

// Whether this build computes bf16 scores with the CPU's dot-product instruction (for `dsv2 info --system`).
extern "C" int dsv2_mla_decode_bf16_dot() {
#ifdef DSV2_BF16_DOT
  return 1;
#else
  return 0;
#endif
}

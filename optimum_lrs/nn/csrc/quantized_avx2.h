/* The decoding product of a quantized layer with bfloat16 factors on CPUs with AVX2 but not AVX512-BF16: included
 * by bitmask_matmul.c after the bfloat16 bitmask_typed.h, and called by lrs_quantized_few_bf16 (quantized_typed.h)
 * in place of its float32 loops where the codes are 4 bits in groups of a multiple of 32 (it returns 0 otherwise).
 * The codes are dequantized into bfloat16 words: a group's 16 levels (code * scale, rounded to bfloat16 as torch
 * rounds) split into their low and high bytes form two tables that `vpshufb` looks 16 codes up in at once, a few
 * instructions per 32 codes (the float32 loops' multiply and rounding per code cost as much as the product at
 * batch 1). S's rows then go through forward_few_bf16, whose expansion of a mask byte is one `vpshufb` of the
 * next 8 words (`expand8_bf16`); U's and V's rows are widened from words in registers (load8_bf16). */

/* The 16 levels' low bytes and high bytes, each a 16-byte table indexed by the code. */
typedef struct {
    __m128i lo, hi;
} levels_t;

static inline levels_t level_table(float s) {
    const __m256 first = _mm256_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1), second = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 scale = _mm256_set1_ps(s);
    __m256i a = _mm256_castps_si256(round8_bf16(_mm256_mul_ps(first, scale)));
    __m256i b = _mm256_castps_si256(round8_bf16(_mm256_mul_ps(second, scale)));
    /* A bfloat16 is bytes 2 (low) and 3 (high) of its float32 lane. Per 128-bit half, a's four levels' low bytes go
     * to bytes 0-3 and high bytes to 8-11, b's to 4-7 and 12-15: halves [lo0-3 lo8-11 hi0-3 hi8-11] and
     * [lo4-7 lo12-15 hi4-7 hi12-15], which two 32-bit unpacks put in order. */
    const __m256i pick_a = _mm256_setr_epi8(2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15, -1, -1, -1, -1,
                                            2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15, -1, -1, -1, -1);
    const __m256i pick_b = _mm256_setr_epi8(-1, -1, -1, -1, 2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15,
                                            -1, -1, -1, -1, 2, 6, 10, 14, -1, -1, -1, -1, 3, 7, 11, 15);
    __m256i both = _mm256_or_si256(_mm256_shuffle_epi8(a, pick_a), _mm256_shuffle_epi8(b, pick_b));
    __m128i h0 = _mm256_castsi256_si128(both), h1 = _mm256_extracti128_si256(both, 1);
    return (levels_t){_mm_unpacklo_epi32(h0, h1), _mm_unpackhi_epi32(h0, h1)};
}

/* 16 codes (one per byte) as 16 words, in two halves of 8. */
static inline void lookup16(levels_t table, __m128i codes, uint16_t *out) {
    __m128i lo = _mm_shuffle_epi8(table.lo, codes), hi = _mm_shuffle_epi8(table.hi, codes);
    _mm_storeu_si128((__m128i *)out, _mm_unpacklo_epi8(lo, hi));
    _mm_storeu_si128((__m128i *)(out + 8), _mm_unpackhi_epi8(lo, hi));
}

/* 32 codes from 16 bytes, the even position in each low nibble. */
static inline void lookup32(levels_t table, const uint8_t *p, uint16_t *out) {
    const __m128i nibble = _mm_set1_epi8(15);
    __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    __m128i low = _mm_and_si128(bytes, nibble), high = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble);
    lookup16(table, _mm_unpacklo_epi8(low, high), out);
    lookup16(table, _mm_unpackhi_epi8(low, high), out + 16);
}

#include "bf16_codes.h"

#define LOWRANK_ROWS 512 /* rows of U per work item of the low-rank part: y's rows for 8 tokens stay in L2 */

/* out[t * stride] = sum_j a[j] x[t, j] for T tokens, a (n,) in words: four sums per token hide the FMA's latency. */
static void words_dot(const uint16_t *a, const float *x, int64_t n, int64_t T, float *out, int64_t stride) {
    for (int64_t t = 0; t < T; t++) {
        const float *xt = x + t * n;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t j = 0;
        for (; j + 32 <= n; j += 32)
            for (int c = 0; c < 4; c++)
                acc[c] = _mm256_fmadd_ps((__m256)load8_bf16(a + j + 8 * c), _mm256_loadu_ps(xt + j + 8 * c),
                                         acc[c]);
        for (; j + 8 <= n; j += 8)
            acc[0] = _mm256_fmadd_ps((__m256)load8_bf16(a + j), _mm256_loadu_ps(xt + j), acc[0]);
        float lanes[8], sum = 0.0f;
        _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        for (int l = 0; l < 8; l++) sum += lanes[l];
        for (; j < n; j++) sum += load1_bf16(a + j) * xt[j];
        out[t * stride] = sum;
    }
}

/* y[t, r0 + i] = bias[r0 + i] + sum_k U[r0 + i, k] z[t, k] for rows [r0, r0 + rows) and T tokens: U's transposed
 * row k holds these rows' weights side by side, dequantized as one range into `segment` (so that a group's table
 * serves all its codes, where ROW_BLOCK rows at a time built most tables twice), then added into y, which stays
 * in L1 or L2 (rows x T floats). */
static void words_lowrank(const uint8_t *codes, const uint16_t *scales, int bits, int64_t group, int64_t m,
                          int64_t r, const float *z, const float *bias, int64_t r0, int64_t rows, int64_t T,
                          float *y, uint16_t *segment) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < rows; i++) y[t * m + r0 + i] = bias ? bias[r0 + i] : 0.0f;
    for (int64_t k = 0; k < r; k++) {
        words_dequant(codes, scales, bits, group, k * m + r0, rows, segment);
        for (int64_t t = 0; t < T; t++) {
            const float zt = z[t * r + k];
            const __m256 z8 = _mm256_set1_ps(zt);
            float *yt = y + t * m + r0;
            int64_t i = 0;
            for (; i + 8 <= rows; i += 8)
                _mm256_storeu_ps(yt + i,
                                 _mm256_fmadd_ps((__m256)load8_bf16(segment + i), z8, _mm256_loadu_ps(yt + i)));
            for (; i < rows; i++) yt[i] += load1_bf16(segment + i) * zt;
        }
    }
}

/* lrs_quantized_few_bf16's product (its arguments; `starts` the rows' first values): returns 1 (done), or 0 where
 * the codes are not 4 bits in groups of a multiple of 32 (the float32 loops then run). */
static int quantized_few_avx2(const float *x, int64_t T, int64_t n, const uint8_t *u_codes, const uint16_t *u_scales,
                              const uint8_t *v_codes, const uint16_t *v_scales, int64_t r, const float *bias,
                              const uint8_t *mask, int64_t m, int64_t nb, const uint8_t *s_codes,
                              const uint16_t *s_scales, int bits, int64_t group, const int64_t *starts, float *y,
                              float *work, int nthreads) {
    if (bits != 4 || group % 32) return 0;
    float *xv = work, *scratch = work + T * r;
    const int64_t per_thread = quantized_scratch_floats(n, r);
#pragma omp parallel num_threads(nthreads)
    {
        uint16_t *buffer = (uint16_t *)(scratch + per_thread * omp_get_thread_num());
#pragma omp for schedule(static)
        for (int64_t k = 0; k < r; k++) {
            words_dequant(v_codes, v_scales, bits, group, k * n, n, buffer);
            words_dot(buffer, x, n, T, xv + k, r);
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < (m + LOWRANK_ROWS - 1) / LOWRANK_ROWS; c++) {
            const int64_t r0 = c * LOWRANK_ROWS, rows = m - r0 < LOWRANK_ROWS ? m - r0 : LOWRANK_ROWS;
            words_lowrank(u_codes, u_scales, bits, group, m, r, xv, bias, r0, rows, T, y, buffer);
        }
#pragma omp for schedule(static)
        for (int64_t rb = 0; rb < (m + ROW_BLOCK - 1) / ROW_BLOCK; rb++) {
            const int64_t r0 = rb * ROW_BLOCK, rows = m - r0 < ROW_BLOCK ? m - r0 : ROW_BLOCK;
            /* S's values a run of rows at a time (at most DEQUANT_WORDS, or one row), so that the ends of a range,
             * which go code by code, are few; the run's rows, offsets into the run, then go through
             * forward_few_bf16, which reads 8 words past a row's last value (the scratch has that slack). */
            for (int64_t i0 = r0, run = DEQUANT_WORDS / n > 1 ? DEQUANT_WORDS / n : 1; i0 < r0 + rows; i0 += run) {
                const int64_t i1 = i0 + run < r0 + rows ? i0 + run : r0 + rows;
                int64_t local[ROW_BLOCK + 1];
                for (int64_t i = i0; i <= i1; i++) local[i - i0] = starts[i] - starts[i0];
                words_dequant(s_codes, s_scales, bits, group, starts[i0], local[i1 - i0], buffer);
                for (int64_t t0 = 0; t0 < T; t0 += FEW_TOKENS) {
                    const int64_t tg = T - t0 < FEW_TOKENS ? T - t0 : FEW_TOKENS;
                    forward_few_bf16[tg](x + t0 * n, mask + i0 * nb, n, nb, buffer, local, local[i1 - i0] + 8, 0,
                                         i1 - i0, y + t0 * m + i0, m);
                }
            }
        }
    }
    return 1;
}

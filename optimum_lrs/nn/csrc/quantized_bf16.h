/* The decoding product of a quantized layer with bfloat16 factors, in bfloat16 pairs (AVX512-BF16): included by
 * bitmask_matmul.c where the CPU has it, and called by lrs_quantized_few_bf16 (quantized_typed.h) in place of its
 * float32 loops. Each row is dequantized into a bfloat16 buffer: at 4 bits a group's 16 levels (code * scale,
 * rounded to bfloat16 as torch rounds) form a table that `vpermw` looks 32 codes up in at once. S's rows are
 * then multiplied 32 columns at a time: the row's next values are expanded into the lanes of the set mask bits
 * (`vpexpandw`, zero elsewhere) and `vdpbf16ps` adds their products with 32 inputs into 16 float32 sums. */

static inline float bf16_to_f32(uint16_t h) { return load1_bf16(&h); }

/* 32 weights from the mask bits `bits`: lane l holds the next of w's values if bit l is set, else 0. Reads 64 bytes
 * from w, however few bits are set (the buffers have that slack). The load stays a separate instruction: folded
 * into vpexpandw's memory form (which compilers do) it measured 1.8x slower on Zen 4. */
static inline __m512bh expand_words(const uint16_t *w, uint32_t bits) {
    __m512i words = _mm512_loadu_si512(w);
    __asm__("" : "+v"(words));
    return (__m512bh)_mm512_maskz_expand_epi16(bits, words);
}

/* A group's 16 levels (code - 8) * s rounded to bfloat16, twice over: vpermw reads 5 index bits, and the low lane's
 * index carries the high nibble's lowest bit as its fifth. */
typedef __m512i levels_t;
static inline __m512i level_table(float s) {
    const __m512 levels = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    __m256i half = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(levels, _mm512_set1_ps(s)));
    return _mm512_inserti64x4(_mm512_castsi256_si512(half), half, 1);
}

/* 32 codes from 16 bytes: byte c -> one 32-bit lane c | c << 12, whose low half indexes by the low nibble and
 * whose high half holds the high nibble: the two codes' 16-bit lanes in stream order. */
static inline __m512i lookup_codes(__m512i table, const uint8_t *p) {
    __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm512_permutexvar_epi16(_mm512_or_si512(c, _mm512_slli_epi32(c, 12)), table);
}
static inline void lookup32(__m512i table, const uint8_t *p, uint16_t *out) {
    _mm512_storeu_si512(out, lookup_codes(table, p));
}

#include "bf16_codes.h"

/* sum_j a[j] x[t, j] for T tokens into out[t * stride], a (n,) in bfloat16, xb x's whole chunks in bfloat16
 * (chunk-major, as quantized_few_bf16 lays them out), x in float32 for the last n % 32: four sums per token hide vdpbf16ps's latency. */
static inline void pairs_dot(const uint16_t *a, const uint16_t *xb, const float *x, int64_t n, int64_t T, float *out,
                             int64_t stride) {
    for (int64_t t = 0; t < T; t++) {
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        int64_t j = 0;
        for (; j + 128 <= n; j += 128)
            for (int c = 0; c < 4; c++)
                acc[c] = _mm512_dpbf16_ps(acc[c], (__m512bh)_mm512_loadu_si512(a + j + 32 * c),
                                          (__m512bh)_mm512_loadu_si512(xb + ((j / 32 + c) * T + t) * 32));
        for (; j + 32 <= n; j += 32)
            acc[0] = _mm512_dpbf16_ps(acc[0], (__m512bh)_mm512_loadu_si512(a + j), (__m512bh)_mm512_loadu_si512(xb + (j / 32 * T + t) * 32));
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
        for (; j < n; j++) sum += bf16_to_f32(a[j]) * x[t * n + j];
        out[t * stride] = sum;
    }
}

/* acc[t] += the products of a row's columns [8 b0, 8 b1) (b0, b1 mask bytes, multiples of 4, within the
 * row's whole 32-column chunks) with TT tokens: `row` the row's mask bytes, w the value of its first set column
 * there (bfloat16, in order); returns w past the range's values. NA chunks go in turn to NA sums per token, so
 * that TT * NA >= 4 chains hide vdpbf16ps's latency. */
#define ROW_DOT(TT, NA)                                                                                         \
    static const uint16_t *pairs_row_dot_##TT(const uint16_t *xb, const uint8_t *row, int64_t b0,               \
                                              int64_t b1, const uint16_t *w, __m512 *acc) {                     \
        __m512 sums[TT][NA];                                                                                    \
        for (int t = 0; t < TT; t++)                                                                            \
            for (int a = 0; a < NA; a++) sums[t][a] = a ? _mm512_setzero_ps() : acc[t];                         \
        int64_t b = b0;                                                                                         \
        for (; b + 4 * NA <= b1; b += 4 * NA)                                                                   \
            for (int a = 0; a < NA; a++) {                                                                      \
                uint32_t bits;                                                                                  \
                memcpy(&bits, row + b + 4 * a, 4);                                                              \
                __m512bh weights = expand_words(w, bits);                                                       \
                w += __builtin_popcount(bits);                                                                  \
                for (int t = 0; t < TT; t++)                                                                    \
                    sums[t][a] = _mm512_dpbf16_ps(sums[t][a], weights,                                          \
                                                  (__m512bh)_mm512_loadu_si512(xb + ((b + 4 * a) / 4 * TT + t) * 32));  \
            }                                                                                                   \
        for (; b < b1; b += 4) {                                                                                \
            uint32_t bits;                                                                                      \
            memcpy(&bits, row + b, 4);                                                                          \
            __m512bh weights = expand_words(w, bits);                                                           \
            w += __builtin_popcount(bits);                                                                      \
            for (int t = 0; t < TT; t++)                                                                        \
                sums[t][0] = _mm512_dpbf16_ps(sums[t][0], weights, (__m512bh)_mm512_loadu_si512(xb + (b / 4 * TT + t) * 32)); \
        }                                                                                                       \
        for (int t = 0; t < TT; t++) {                                                                          \
            for (int a = 1; a < NA; a++) sums[t][0] = _mm512_add_ps(sums[t][0], sums[t][a]);                    \
            acc[t] = sums[t][0];                                                                                \
        }                                                                                                       \
        return w;                                                                                               \
    }
ROW_DOT(1, 4)
ROW_DOT(2, 2)
ROW_DOT(3, 2)
ROW_DOT(4, 1)
ROW_DOT(5, 1)
ROW_DOT(6, 1)
ROW_DOT(7, 1)
ROW_DOT(8, 1)
#undef ROW_DOT

typedef const uint16_t *(*pairs_row_dot_fn)(const uint16_t *, const uint8_t *, int64_t, int64_t,
                                           const uint16_t *, __m512 *);
static const pairs_row_dot_fn pairs_row_dots[9] = {NULL, pairs_row_dot_1, pairs_row_dot_2, pairs_row_dot_3, pairs_row_dot_4,
                                       pairs_row_dot_5, pairs_row_dot_6, pairs_row_dot_7, pairs_row_dot_8};

/* 32 bfloat16 weights as two float32 vectors. */
static inline void widen_words(__m512i words, __m512 *lo, __m512 *hi) {
    *lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(words)), 16));
    *hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(words, 1)), 16));
}

/* y[t, r0 + i] = bias[r0 + i] + sum_k U[r0 + i, k] z[t, k] for the rows < rows (at most ROW_BLOCK = 32) of one
 * block and TT tokens: U's transposed row k holds the block's 32 weights side by side, dequantized straight into
 * two float32 vectors (at 4 bits with groups of a multiple of 32, one table lookup; else through words_dequant),
 * each multiplied with every token's z[t, k] into 2 TT register sums. */
#define LOWRANK_ROWS(TT)                                                                                        \
    static void pairs_lowrank_##TT(const uint8_t *codes, const uint16_t *scales, int bits, int64_t group,       \
                                   int64_t m, int64_t r, const float *z, const float *bias, int64_t r0,          \
                                   int64_t rows, float *y) {                                                    \
        const __mmask16 lo_rows = (__mmask16)(rows >= 16 ? 0xffff : (1u << rows) - 1);                          \
        const __mmask16 hi_rows = (__mmask16)(rows >= 32 ? 0xffff : rows > 16 ? (1u << (rows - 16)) - 1 : 0);   \
        const int lookup = bits == 4 && group % 32 == 0 && rows == 32;                                          \
        __m512 acc[TT][2];                                                                                      \
        for (int t = 0; t < TT; t++) {                                                                          \
            acc[t][0] = bias ? _mm512_maskz_loadu_ps(lo_rows, bias + r0) : _mm512_setzero_ps();                 \
            acc[t][1] = bias ? _mm512_maskz_loadu_ps(hi_rows, bias + r0 + 16) : _mm512_setzero_ps();            \
        }                                                                                                       \
        for (int64_t k = 0; k < r; k++) {                                                                       \
            __m512i words;                                                                                      \
            if (lookup) {                                                                                       \
                words = lookup_codes(level_table(load1_bf16(scales + (k * m + r0) / group)),                    \
                                     codes + (k * m + r0) / 2);                                                 \
            } else {                                                                                            \
                uint16_t segment[32] = {0};                                                                     \
                words_dequant(codes, scales, bits, group, k * m + r0, rows, segment);                           \
                words = _mm512_loadu_si512(segment);                                                            \
            }                                                                                                   \
            __m512 u_lo, u_hi;                                                                                  \
            widen_words(words, &u_lo, &u_hi);                                                                   \
            for (int t = 0; t < TT; t++) {                                                                      \
                __m512 zt = _mm512_set1_ps(z[t * r + k]);                                                       \
                acc[t][0] = _mm512_fmadd_ps(u_lo, zt, acc[t][0]);                                               \
                acc[t][1] = _mm512_fmadd_ps(u_hi, zt, acc[t][1]);                                               \
            }                                                                                                   \
        }                                                                                                       \
        for (int t = 0; t < TT; t++) {                                                                          \
            _mm512_mask_storeu_ps(y + t * m + r0, lo_rows, acc[t][0]);                                          \
            _mm512_mask_storeu_ps(y + t * m + r0 + 16, hi_rows, acc[t][1]);                                     \
        }                                                                                                       \
    }
LOWRANK_ROWS(1)
LOWRANK_ROWS(2)
LOWRANK_ROWS(3)
LOWRANK_ROWS(4)
LOWRANK_ROWS(5)
LOWRANK_ROWS(6)
LOWRANK_ROWS(7)
LOWRANK_ROWS(8)
#undef LOWRANK_ROWS

typedef void (*pairs_lowrank_fn)(const uint8_t *, const uint16_t *, int, int64_t, int64_t, int64_t, const float *,
                                 const float *, int64_t, int64_t, float *);
static const pairs_lowrank_fn pairs_lowrank[9] = {NULL, pairs_lowrank_1, pairs_lowrank_2, pairs_lowrank_3,
                                                  pairs_lowrank_4, pairs_lowrank_5, pairs_lowrank_6, pairs_lowrank_7,
                                                  pairs_lowrank_8};

/* lrs_quantized_few_bf16's product (its arguments; `starts` the rows' first values): returns 1 (done). */
static int quantized_few_bf16(const float *x, int64_t T, int64_t n, const uint8_t *u_codes, const uint16_t *u_scales,
                              const uint8_t *v_codes, const uint16_t *v_scales, int64_t r, const float *bias,
                              const uint8_t *mask, int64_t m, int64_t nb, const uint8_t *s_codes,
                              const uint16_t *s_scales, int bits, int64_t group, const int64_t *starts, float *y,
                              float *work, int nthreads) {
    float *xv = work;
    uint16_t *xb = (uint16_t *)(xv + T * r);
    float *scratch = xv + T * r + (T * n + 1) / 2 + 8;
    int64_t per_thread = quantized_scratch_floats(n, r);
    /* Tokens go in groups of up to FEW_TOKENS, which share every loaded weight vector (registers hold one sum per
     * token); the dequantized buffers serve every group. Mask bytes in whole 32-column chunks: `whole`. */
    const int64_t whole = n / 32 * 4, wide = n / 32 * 32, groups = (T + FEW_TOKENS - 1) / FEW_TOKENS;
    /* x in bfloat16, exactly (x holds bfloat16 values: the layer's input in its factors' dtype), chunk-major
     * within each group of tokens: the group's inputs of each whole 32-column chunk side by side, as the products
     * read them (token-major rows n apart would share L1 sets when n is a multiple of 2 KiB). */
    for (int64_t t = 0; t < T; t++) {
        int64_t g = t / FEW_TOKENS, tg = T - g * FEW_TOKENS < FEW_TOKENS ? T - g * FEW_TOKENS : FEW_TOKENS;
        uint16_t *xg = xb + g * FEW_TOKENS * wide;
        for (int64_t j = 0; j < wide; j++) {
            uint32_t u;
            memcpy(&u, x + t * n + j, sizeof u);
            xg[(j / 32 * tg + t % FEW_TOKENS) * 32 + j % 32] = (uint16_t)(u >> 16);
        }
    }
#pragma omp parallel num_threads(nthreads)
    {
        uint16_t *buffer = (uint16_t *)(scratch + per_thread * omp_get_thread_num());
#pragma omp for schedule(static)
        for (int64_t k = 0; k < r; k++) {
            words_dequant(v_codes, v_scales, bits, group, k * n, n, buffer);
            for (int64_t g = 0; g < groups; g++) {
                int64_t t0 = g * FEW_TOKENS, tg = T - t0 < FEW_TOKENS ? T - t0 : FEW_TOKENS;
                pairs_dot(buffer, xb + t0 * wide, x + t0 * n, n, tg, xv + t0 * r + k, r);
            }
        }
#pragma omp for schedule(static)
        for (int64_t rb = 0; rb < (m + ROW_BLOCK - 1) / ROW_BLOCK; rb++) {
            int64_t r0 = rb * ROW_BLOCK, rows = m - r0 < ROW_BLOCK ? m - r0 : ROW_BLOCK;
            for (int64_t t0 = 0; t0 < T; t0 += FEW_TOKENS) {
                int64_t tg = T - t0 < FEW_TOKENS ? T - t0 : FEW_TOKENS;
                pairs_lowrank[tg](u_codes, u_scales, bits, group, m, r, xv + t0 * r, bias, r0, rows, y + t0 * m);
            }
            /* S's values dequantized a run of rows at a time (at most DEQUANT_WORDS, or one row), so that the
             * ends of a range, which go code by code, are few; for each group of tokens, the run's rows then go
             * through the columns a block at a time, whose inputs (at most 8 KiB) stay in L1 while every row of
             * the run reads them. */
            for (int64_t i0 = r0, run = DEQUANT_WORDS / n > 1 ? DEQUANT_WORDS / n : 1; i0 < r0 + rows; i0 += run) {
                int64_t i1 = i0 + run < r0 + rows ? i0 + run : r0 + rows; /* run <= ROW_BLOCK rows: the block's */
                words_dequant(s_codes, s_scales, bits, group, starts[i0], starts[i1] - starts[i0], buffer);
                for (int64_t t0 = 0; t0 < T; t0 += FEW_TOKENS) {
                    int64_t tg = T - t0 < FEW_TOKENS ? T - t0 : FEW_TOKENS, block = 4096 / tg / 32 * 4;
                    const uint16_t *xg = xb + t0 * wide, *w[ROW_BLOCK];
                    __m512 sums[ROW_BLOCK][FEW_TOKENS];
                    for (int64_t i = i0; i < i1; i++) {
                        w[i - i0] = buffer + (starts[i] - starts[i0]);
                        for (int64_t t = 0; t < tg; t++) sums[i - i0][t] = _mm512_setzero_ps();
                    }
                    for (int64_t b0 = 0; b0 < whole; b0 += block) {
                        int64_t b1 = b0 + block < whole ? b0 + block : whole;
                        for (int64_t i = i0; i < i1; i++)
                            w[i - i0] = pairs_row_dots[tg](xg, mask + i * nb, b0, b1, w[i - i0], sums[i - i0]);
                    }
                    for (int64_t i = i0; i < i1; i++)
                        for (int64_t t = 0; t < tg; t++) {
                            float sum = _mm512_reduce_add_ps(sums[i - i0][t]);
                            const uint16_t *tw = w[i - i0];
                            for (int64_t tb = whole; tb < nb; tb++)
                                for (unsigned byte = mask[i * nb + tb]; byte; byte &= byte - 1)
                                    sum += bf16_to_f32(*tw++) * x[(t0 + t) * n + tb * 8 + __builtin_ctz(byte)];
                            y[(t0 + t) * m + i] += sum;
                        }
                }
            }
        }
    }
    return 1;
}

/* lrs_quantized_to_dense_bf16's rebuild in bfloat16 (its arguments; `starts` the rows' first values): each row's
 * values dequantized into the buffer, then expanded 32 columns at a time straight into the output row. */
static void quantized_dense_bf16(const uint8_t *mask, int64_t m, int64_t n, int64_t nb, const uint8_t *s_codes,
                                 const uint16_t *s_scales, int bits, int64_t group, const int64_t *starts, void *dense,
                                 float *work, int nthreads) {
    int64_t per_thread = quantized_scratch_floats(n, 0);
#pragma omp parallel num_threads(nthreads)
    {
        uint16_t *buffer = (uint16_t *)(work + n + per_thread * omp_get_thread_num());
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            const uint8_t *row = mask + i * nb;
            uint16_t *out = (uint16_t *)dense + i * n;
            words_dequant(s_codes, s_scales, bits, group, starts[i], starts[i + 1] - starts[i], buffer);
            const uint16_t *w = buffer;
            int64_t b = 0;
            for (; b + 4 <= n / 8; b += 4) {
                uint32_t bits32;
                memcpy(&bits32, row + b, 4);
                _mm512_storeu_si512(out + 8 * b, (__m512i)expand_words(w, bits32));
                w += __builtin_popcount(bits32);
            }
            for (int64_t j = 8 * b; j < n; j++) out[j] = (row[j / 8] >> (j % 8)) & 1 ? *w++ : 0;
        }
    }
}

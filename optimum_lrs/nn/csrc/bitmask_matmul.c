/* Products with a sparse matrix S stored as a row-padded bitmask plus its values in row-major order,
 * the `sparse_format="bitmask"` layout of LowRankSparseLinear (optimum_lrs/nn/linear.py):
 *
 *   mask:   uint8 (m, nb), nb = ceil(n / 8); column j of row i is bit j % 8 (least significant first)
 *           of byte mask[i * nb + j / 8]; padding bits are 0.
 *   values: (nnz,), the set positions' values, row by row, columns ascending.
 *
 * U, V and the values are stored in float32, bfloat16 or float16: each entry point below exists once per type,
 * named with the suffix _f32, _bf16 or _f16 (bitmask_typed.h, included once per type), and widens the stored
 * values in registers. Inputs, bias and outputs are float32, and so is every sum.
 *
 * lrs_lowrank_bitmask_matmul: y (T, m) = x (T, n) (U V + S)^T + bias   (the layer's forward from 9 tokens on)
 * lrs_lowrank_bitmask_few: y (T, m) = x (U V + S)^T + bias for T <= FEW_TOKENS (decoding, in one call)
 * lrs_bitmask_matmul: y (T, m) += x (T, n) S^T   (the forward's sparse part under autograd)
 * lrs_bitmask_matmul_t: y (T, n) += x (T, m) S   (the gradient with respect to the layer's input)
 * lrs_bitmask_to_dense: dense (m, n) = S         (the rebuilt weight, for layers too dense for the kernels)
 * lrs_quantized_few: lrs_lowrank_bitmask_few for U, V and S's values stored as group codes (quantized_typed.h)
 * lrs_dequantize: a stream of group codes as float32 (the quantized layer's low-rank factors for long inputs)
 * lrs_quantized_to_dense: dense (m, n) = S from its value codes (the dense rebuild for long inputs)
 *
 * Every array is dense, row-major and contiguous. Up to FEW_TOKENS tokens (decoding), each mask byte's 8
 * weights are expanded into a vector once and multiplied with every token. For more tokens only the set
 * positions are touched: for each one, a tile of up to TILE tokens of the transposed input is scaled and
 * added, which vectorises over tokens; the tile's z = x V^T is computed first, and U's products with it
 * start each row's sums.
 * docs/performance.md has the measurements behind the constants.
 * Threads: OpenMP where the compiler has it; loaded into a process that has imported torch, the library
 * binds to torch's own libgomp (same soname), so the two share one thread pool.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static int omp_get_thread_num(void) { return 0; }
#endif
#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mask words are read as little-endian integers"
#endif

typedef float v8 __attribute__((vector_size(32), aligned(4)));

#define TILE 96      /* tokens per tile: 12 vectors of 8 floats stay in registers (measured against 48, 64) */
#define FEW_TOKENS 8 /* up to this many tokens, expand each mask byte (measured against 16..64) */
#define ROW_BLOCK 32 /* rows per work item (measured against 8 and 16) */
#define TILE_T 48    /* tokens per tile of the S^T product, whose per-thread sums (n, TILE_T) stay in L2 */
#define Z_ROWS 16    /* rows of V per work item computing z's tiles */
#define GEMM_ROWS 4  /* rows of the GEMM micro-kernel (bitmask_typed.h) that share every loaded input vector */

/* Up to 8 bytes of a mask row as a little-endian word (bit b = column 8 * first_byte + b); the full-word
 * case is a single load. */
static inline uint64_t mask_word(const uint8_t *p, int64_t bytes) {
    uint64_t w = 0;
    if (bytes >= 8)
        memcpy(&w, p, 8);
    else
        memcpy(&w, p, (size_t)bytes);
    return w;
}

/* starts[i] = index in values of row i's first entry; starts[m] = nnz. Returns nnz. The rows are counted by
 * nthreads threads where the mask is large enough to pay for the parallel region (a decoding call reads it here
 * and again in its product). */
static int64_t row_starts(const uint8_t *mask, int64_t m, int64_t nb, int64_t *starts, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (m * nb >= 65536)
    for (int64_t i = 0; i < m; i++) {
        const uint8_t *row = mask + i * nb;
        int64_t k = 0;
        for (int64_t b = 0; b < nb; b += 8) k += __builtin_popcountll(mask_word(row + b, nb - b));
        starts[i + 1] = k;
    }
    starts[0] = 0;
    for (int64_t i = 0; i < m; i++) starts[i + 1] += starts[i];
    return starts[m];
}

/* The rows' starts (m + 1, allocated here: the caller frees them) of a mask that sets nvalues bits; NULL with
 * *status -1 (no memory) or -2 (the mask sets another number of bits), the entry points' error codes. */
static int64_t *mask_row_starts(const uint8_t *mask, int64_t m, int64_t nb, int64_t nvalues, int nthreads,
                                int *status) {
    int64_t *starts = malloc((size_t)(m + 1) * sizeof(int64_t));
    *status = starts ? 0 : -1;
    if (starts && row_starts(mask, m, nb, starts, nthreads) != nvalues) {
        free(starts);
        starts = NULL;
        *status = -2;
    }
    return starts;
}

/* x (T, dim) transposed tile by tile: tile q (tokens q * width ...) is a contiguous (dim, width) block at
 * xt + q * dim * width, so that a tile's rows stay close in cache; tokens past T are zero. Work goes in
 * 8 x 8 blocks (transposed in registers under AVX2): a token-major pass reads rows dim apart, which for
 * dims that are multiples of 2 KiB hit the same few cache sets. */
static void transpose_tiles(const float *x, int64_t T, int64_t dim, float *xt, int64_t width, int nthreads) {
    int64_t tiles = (T + width - 1) / width, groups = width / 8;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t item = 0; item < tiles * groups; item++) {
        int64_t q = item / groups, t0 = item % groups * 8;
        int64_t token0 = q * width + t0, tn = T - token0 < 8 ? (T - token0 > 0 ? T - token0 : 0) : 8;
        float *tile = xt + q * dim * width;
        for (int64_t j0 = 0; j0 < dim; j0 += 8) {
            int64_t jn = dim - j0 < 8 ? dim - j0 : 8;
#ifdef __AVX2__
            if (jn == 8 && tn == 8) {
                __m256 r[8], s[8];
                for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(x + (token0 + i) * dim + j0);
                for (int i = 0; i < 8; i += 2) {
                    s[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
                    s[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
                }
                for (int i = 0; i < 8; i += 4)
                    for (int k = 0; k < 2; k++) {
                        r[i + k] = _mm256_shuffle_ps(s[i + k], s[i + k + 2], 0x44);
                        r[i + k + 2] = _mm256_shuffle_ps(s[i + k], s[i + k + 2], 0xEE);
                    }
                /* r[0..3] from rows 0-3, r[4..7] from rows 4-7; lanes: r[0] = cols 0,4; r[2] = 1,5; r[1] = 2,6; r[3] = 3,7 */
                static const int order[4] = {0, 2, 1, 3};
                for (int k = 0; k < 4; k++) {
                    __m256 lo = r[order[k]], hi = r[4 + order[k]];
                    _mm256_storeu_ps(tile + (j0 + k) * width + t0, _mm256_permute2f128_ps(lo, hi, 0x20));
                    _mm256_storeu_ps(tile + (j0 + k + 4) * width + t0, _mm256_permute2f128_ps(lo, hi, 0x31));
                }
                continue;
            }
#endif
            for (int64_t j = 0; j < jn; j++)
                for (int64_t t = 0; t < 8; t++) tile[(j0 + j) * width + t0 + t] = t < tn ? x[(token0 + t) * dim + j0 + j] : 0.0f;
        }
    }
}

/* Tile width for T tokens: tile, or T rounded up to whole vectors when T < tile. */
static int64_t tile_width(int64_t T, int64_t tile) { return T >= tile ? tile : (T + 7) / 8 * 8; }

#ifdef __AVX2__
/* expand_index[byte][l]: where lane l's value sits among the byte's set bits (popcount of the bits below l), with
 * the sign bit set where bit l is clear: vpermps reads the low 3 bits, and a blend on the sign zeroes those lanes. */
static int32_t expand_index[256][8];
__attribute__((constructor)) static void fill_expand_index(void) {
    for (unsigned byte = 0; byte < 256; byte++) {
        int32_t below = 0;
        for (int l = 0; l < 8; l++) {
            expand_index[byte][l] = (byte >> l) & 1u ? below : (int32_t)0x80000000u;
            below += (byte >> l) & 1u;
        }
    }
}

/* expand_words_shuffle[byte]: a vpshufb control that, from 8 bfloat16 words in both 128-bit halves, puts the
 * word of lane l's value (as expand_index) in the top half of float32 lane l, zero elsewhere: one shuffle widens
 * and expands at once (cheaper than vpermps and a blend, 3 and 2 micro-ops on the first Zen cores). */
static uint8_t expand_words_shuffle[256][32];
/* expand_halves_shuffle[byte]: the same for float16, 8 words packed in one 128-bit register (lane l's value in
 * word l, zero elsewhere), which F16C then widens. */
static uint8_t expand_halves_shuffle[256][16];
__attribute__((constructor)) static void fill_expand_words_shuffle(void) {
    for (unsigned byte = 0; byte < 256; byte++) {
        uint8_t below = 0;
        for (int l = 0; l < 8; l++) {
            const int set = (byte >> l) & 1u;
            expand_words_shuffle[byte][4 * l] = expand_words_shuffle[byte][4 * l + 1] = 0x80;
            expand_words_shuffle[byte][4 * l + 2] = expand_halves_shuffle[byte][2 * l] = set ? 2 * below : 0x80;
            expand_words_shuffle[byte][4 * l + 3] = expand_halves_shuffle[byte][2 * l + 1] = set ? 2 * below + 1 : 0x80;
            below += set;
        }
    }
}

/* The 8 weights of one mask byte from bfloat16 values, as float32 (reads values[0..8)). */
static inline __m256 expand8_bf16(const uint16_t *values, unsigned byte) {
    __m256i words = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)values));
    return _mm256_castsi256_ps(
        _mm256_shuffle_epi8(words, _mm256_loadu_si256((const __m256i *)expand_words_shuffle[byte])));
}

#ifdef __F16C__
/* The 8 weights of one mask byte from float16 values, as float32 (reads values[0..8)): one 128-bit shuffle and
 * F16C's widening, where vpermps and a blend on the widened values cost 5 micro-ops on the first Zen cores. */
static inline __m256 expand8_f16(const uint16_t *values, unsigned byte) {
    return _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)values),
                                            _mm_loadu_si128((const __m128i *)expand_halves_shuffle[byte])));
}
#endif
#endif

/* The tokens up to which lrs_lowrank_bitmask_few runs on this build (0: it does not). */
int lrs_few_tokens(void) {
#ifdef __AVX2__
    return FEW_TOKENS;
#else
    return 0;
#endif
}

/* Where the few-token products read x and bias and write y in float32 (few_inputs in bitmask_typed.h). */
typedef struct {
    const float *x, *bias;
    float *y;
} few_io;

/* Floats for a few-token product's typed input, bias and output: x (T, n), bias (m) and y (T, m) in float32. */
static int64_t few_io_floats(int64_t T, int64_t n, int64_t m) { return T * n + m + T * m; }

/* Floats of the work buffer lrs_lowrank_bitmask_few takes for T tokens, n inputs, rank r and m outputs: z = x V^T
 * and the typed input and output. */
int64_t lrs_few_workspace_floats(int64_t T, int64_t n, int64_t r, int64_t m) { return T * r + few_io_floats(T, n, m); }

/* Floats of the work buffer that the products below take for T tokens, n inputs and rank: the transposed
 * tiles of x and z. Callers keep one between calls (`work`): freshly allocated memory costs a page fault per
 * 4 KiB on first touch, which measured 20% of a 512-token product. With a smaller or no buffer
 * (work_floats 0) the products allocate their own. */
int64_t lrs_workspace_floats(int64_t T, int64_t n, int64_t rank) {
    int64_t width = tile_width(T, TILE);
    return (T + width - 1) / width * (n + rank) * width;
}

/* The storage types: one element as a float, eight as a vector (static inline: GCC's note that a vector return
 * changes the ABI without AVX concerns calls across objects, of which there are none). */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
static inline float load1_f32(const float *p) { return *p; }
static inline v8 load8_f32(const float *p) { return *(const v8 *)p; }

/* bfloat16 is the top half of a float32. */
static inline float load1_bf16(const uint16_t *p) {
    uint32_t bits = (uint32_t)*p << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}
static inline v8 load8_bf16(const uint16_t *p) {
#ifdef __AVX2__
    return (v8)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
#else
    v8 out;
    for (int l = 0; l < 8; l++) out[l] = load1_bf16(p + l);
    return out;
#endif
}

/* float16 by the F16C instructions, or by its fields where the build has none. */
static inline float load1_f16(const uint16_t *p) {
#ifdef __F16C__
    return _cvtsh_ss(*p);
#else
    uint32_t h = *p, sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13); /* inf, nan */
    } else if (exponent) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (!mantissa) {
        bits = sign;
    } else { /* subnormal: mantissa x 2^-24, normalised */
        uint32_t shift = 0;
        while (!(mantissa & 0x400u)) mantissa <<= 1, shift++;
        bits = sign | ((113 - shift) << 23) | ((mantissa & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}
static inline v8 load8_f16(const uint16_t *p) {
#ifdef __F16C__
    return (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    v8 out;
    for (int l = 0; l < 8; l++) out[l] = load1_f16(p + l);
    return out;
#endif
}

/* A float32 rounded to the storage type and back: what a value computed in float32 becomes once stored. */
static inline float round1_f32(float f) { return f; }
static inline float round1_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) <= 0x7f800000u) bits = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u; /* to nearest even, as torch */
    memcpy(&f, &bits, sizeof f);
    return f;
}
static inline float round1_f16(float f) {
#ifdef __F16C__
    return _cvtsh_ss(_cvtss_sh(f, 0));
#else
    return (float)(_Float16)f;
#endif
}

/* A float32 stored in the storage type (to nearest even, as torch casts): the few-token products' typed outputs. */
static inline float store1_f32(float f) { return f; }
static inline uint16_t store1_bf16(float f) {
    if (f != f) return 0x7fc0; /* NaN, as torch's */
    uint32_t bits;
    f = round1_bf16(f);
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)(bits >> 16);
}
static inline uint16_t store1_f16(float f) {
#ifdef __F16C__
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    _Float16 h = (_Float16)f;
    uint16_t bits;
    memcpy(&bits, &h, sizeof bits);
    return bits;
#endif
}

#define DEQUANT_WORDS 65536 /* bfloat16 values of S dequantized at a time (a run of rows; 128 KiB, in L2) */

#ifdef __AVX2__
/* Eight float32 values rounded to the storage type and back, as round1_* does one (scales and codes are finite). */
static inline __m256 round8_f32(__m256 v) { return v; }
static inline __m256 round8_bf16(__m256 v) {
    __m256i bits = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32((int)0xffff0000u)));
}
static inline __m256 round8_f16(__m256 v) {
#ifdef __F16C__
    return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    for (int l = 0; l < 8; l++) lanes[l] = round1_f16(lanes[l]);
    return _mm256_loadu_ps(lanes);
#endif
}
#endif

/* Scratch floats per thread of the quantized products: a dequantized row of V or of S's values in float32 (n,
 * plus slack for reads in eights), or a run of S's rows in bfloat16 (at most DEQUANT_WORDS or one row, plus
 * slack for reads of 32), or a segment of U's transposed row (ROW_BLOCK). */
static int64_t quantized_scratch_floats(int64_t n, int64_t r) {
    (void)r;
    int64_t words = n > DEQUANT_WORDS ? n : DEQUANT_WORDS;
    return (n > ROW_BLOCK ? n : ROW_BLOCK) + words / 2 + 64;
}

/* Floats of the work buffer lrs_quantized_to_dense takes for n columns and nthreads threads, and the part of
 * lrs_quantized_few's before its typed input and output (few_io_floats) for T tokens, n inputs and rank r:
 * z = x V^T, x in bfloat16, and each thread's scratch. */
int64_t lrs_quantized_workspace_floats(int64_t T, int64_t n, int64_t r, int64_t nthreads) {
    return T * r + T * n + 16 + nthreads * quantized_scratch_floats(n, r);
}

/* Floats of the work buffer lrs_quantized_few takes for T tokens, n inputs, rank r, m outputs and nthreads
 * threads. */
int64_t lrs_quantized_few_workspace_floats(int64_t T, int64_t n, int64_t r, int64_t m, int64_t nthreads) {
    return lrs_quantized_workspace_floats(T, n, r, nthreads) + few_io_floats(T, n, m);
}

#define LRS_PASTE(name, suffix) name##_##suffix
#define LRS_NAME(name, suffix) LRS_PASTE(name, suffix)
#define FN(name) LRS_NAME(name, SUFFIX)
#define LOAD1 FN(load1)
#define LOAD8 FN(load8)
#define ROUND1 FN(round1)
#define ROUND8 FN(round8)
#define STORE1 FN(store1)

#define FT float
#define SUFFIX f32
#include "bitmask_typed.h"
#include "quantized_typed.h"
#undef FT
#undef SUFFIX

#define FT uint16_t
#define SUFFIX f16
#if defined(__AVX2__) && defined(__F16C__)
#define EXPAND8 expand8_f16
#endif
#include "bitmask_typed.h"
#undef EXPAND8
#include "quantized_typed.h"
#undef SUFFIX

#define SUFFIX bf16
#ifdef __AVX2__
#define EXPAND8 expand8_bf16
#endif
#include "bitmask_typed.h"
#undef EXPAND8
#if defined(__AVX512BF16__) && defined(__AVX512VBMI2__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* bfloat16 factors on CPUs with AVX512-BF16: the quantized decoding product in bfloat16 pairs. The layer hands
 * the kernels its input in its factors' dtype, so x widened from bfloat16 narrows back exactly, and
 * `vdpbf16ps` multiplies 32 weights by 32 inputs per instruction, products exact and sums in float32: half the
 * instructions of float32 FMAs over the same expanded weights (both by the rank and S's positions). */
#include "quantized_bf16.h"
#define QUANTIZED_FEW_FAST quantized_few_bf16
#define QUANTIZED_DENSE_FAST quantized_dense_bf16
#elif defined(__AVX2__)
/* bfloat16 factors on CPUs with AVX2 only: the codes looked up into bfloat16 words, the products in float32. */
#include "quantized_avx2.h"
#define QUANTIZED_FEW_FAST quantized_few_avx2
#endif
#include "quantized_typed.h"
#undef SUFFIX
#undef FT
#undef QUANTIZED_FEW_FAST
#undef QUANTIZED_DENSE_FAST

/* Whether this build has the bfloat16 pairs path (AVX512-BF16): lrs_quantized_to_dense_bf16 writes bfloat16. */
int lrs_bf16_pairs(void) {
#if defined(__AVX512BF16__) && defined(__AVX512VBMI2__) && defined(__AVX512BW__) && defined(__AVX512VL__)
    return 1;
#else
    return 0;
#endif
}

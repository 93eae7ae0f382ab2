/* The kernels that read the factors (U, V and S's values), written once for every storage type: included by
 * bitmask_matmul.c once per type, with FT the stored element type, FN(name) the name with the type's suffix,
 * LOAD1(p) one element as a float and LOAD8(p) eight as a v8. Inputs, work buffers, bias and outputs are
 * float32 whatever FT is: half-precision factors are widened in registers and every sum is float32. */

/* A GEMM micro-kernel over transposed tiles: out[kk, 8 c0 ...] (+)= sum_{j in [j0, j1)} a[kk, j] b[j, 8 c0 ...]
 * for the rows kk < rows (at most GEMM_ROWS; missing rows repeat row 0 and are dropped) and NC vectors of 8
 * tokens from vector c0 on; a is row-major with lda, b and out have row strides ldb and ldo. GEMM_ROWS x NC
 * accumulators share every loaded b vector (7 loads per 12 FMAs, against one load per FMA in the sparse
 * loop). It computes a tile of z = x V^T (a = V, b = the input tile) and U's share of the outputs (a = U,
 * b = z's tile); BLAS's GEMM for z, with only `rank` outputs per token, cost 2-4x its flop share. */
#define GEMM_TILE(NC)                                                                                           \
    static void FN(gemm_tile_##NC)(const FT *a, int64_t lda, int64_t rows, const float *b, int64_t ldb,         \
                               int64_t c0, int64_t j0, int64_t j1, float *out, int64_t ldo, int accumulate) {   \
        const FT *row[GEMM_ROWS];                                                                                  \
        for (int kk = 0; kk < GEMM_ROWS; kk++) row[kk] = a + (kk < rows ? kk : 0) * lda;                        \
        v8 acc[GEMM_ROWS][NC];                                                                                  \
        for (int kk = 0; kk < GEMM_ROWS; kk++)                                                                  \
            for (int c = 0; c < NC; c++)                                                                        \
                acc[kk][c] = accumulate && kk < rows ? *(const v8 *)(out + kk * ldo + 8 * (c0 + c)) : (v8){0};  \
        for (int64_t j = j0; j < j1; j++) {                                                                     \
            v8 in[NC];                                                                                          \
            for (int c = 0; c < NC; c++) in[c] = *(const v8 *)(b + j * ldb + 8 * (c0 + c));                    \
            for (int kk = 0; kk < GEMM_ROWS; kk++)                                                              \
                for (int c = 0; c < NC; c++) acc[kk][c] += LOAD1(row[kk] + j) * in[c];                                  \
        }                                                                                                       \
        for (int kk = 0; kk < rows; kk++)                                                                       \
            for (int c = 0; c < NC; c++) *(v8 *)(out + kk * ldo + 8 * (c0 + c)) = acc[kk][c];                   \
    }
GEMM_TILE(1)
GEMM_TILE(2)
GEMM_TILE(3)

typedef void (*FN(gemm_tile_fn))(const FT *, int64_t, int64_t, const float *, int64_t, int64_t, int64_t, int64_t,
                             float *, int64_t, int);
static const FN(gemm_tile_fn) FN(gemm_tiles)[4] = {NULL, FN(gemm_tile_1), FN(gemm_tile_2), FN(gemm_tile_3)};

/* out[0..rows) x (vectors 0..nv) (+)= a[0..rows, j0..j1) b[j0..j1, ...], GEMM_ROWS rows by 3 vectors at a time. */
static void FN(gemm_rows)(const FT *a, int64_t lda, int64_t rows, const float *b, int64_t ldb, int64_t nv, int64_t j0,
                      int64_t j1, float *out, int64_t ldo, int accumulate) {
    for (int64_t k = 0; k < rows; k += GEMM_ROWS)
        for (int64_t c0 = 0; c0 < nv; c0 += 3)
            FN(gemm_tiles)[nv - c0 < 3 ? nv - c0 : 3](a + k * lda, lda, rows - k < GEMM_ROWS ? rows - k : GEMM_ROWS, b,
                                                 ldb, c0, j0, j1, out + k * ldo, ldo, accumulate);
}

/* Forward over rows [r0, r1) (at most ROW_BLOCK) and the tokens [t0, t0 + tw), whose transposed tiles are
 * xt (n, ld) and zt (rank, ld): y[t0 + t, i] += sum_k U[i, k] zt[k, t] + sum_j S[i, j] xt[j, t]. Columns go
 * 64 at a time (one mask word), all rows of the block per word, so that the 64 tile rows being read stay
 * in L1 while every row uses them; the rows' value streams are prefetched a word ahead, and the sums are
 * written token by token, as 32 neighbouring outputs of a token share cache lines. */
#define FORWARD_TILE(NV)                                                                                        \
    static void FN(forward_tile_##NV)(const float *xt, const float *zt, int64_t ld, int64_t t0, int64_t tw,        \
                                  const FT *u, int64_t rank, const uint8_t *mask, int64_t nb,                   \
                                  const FT *values, const int64_t *starts, int64_t r0, int64_t r1, float *y, \
                                  int64_t m, const float *bias, int accumulate) {                               \
        v8 acc[ROW_BLOCK][NV];                                                                                  \
        const FT *val[ROW_BLOCK];                                                                               \
        for (int64_t r = 0; r < r1 - r0; r++) {                                                                 \
            val[r] = values + starts[r0 + r];                                                                   \
            if (!rank)                                                                                          \
                for (int q = 0; q < NV; q++) acc[r][q] = (v8){0};                                               \
        }                                                                                                       \
        if (rank) FN(gemm_rows)(u + r0 * rank, rank, r1 - r0, zt, ld, NV, 0, rank, (float *)acc, 8 * NV, 0);        \
        for (int64_t b = 0; b < nb; b += 8) {                                                                   \
            const float *block = xt + b * 8 * ld;                                                               \
            for (int64_t r = 0; r < r1 - r0; r++) {                                                             \
                uint64_t w = mask_word(mask + (r0 + r) * nb + b, nb - b);                                       \
                __builtin_prefetch((const char *)val[r] + 128);                                                               \
                __builtin_prefetch((const char *)val[r] + 192);                                                               \
                if (!w) continue;                                                                               \
                v8 a[NV];                                                                                       \
                for (int q = 0; q < NV; q++) a[q] = acc[r][q];                                                  \
                const FT *v = val[r];                                                                           \
                while (w) {                                                                                     \
                    const float *src = block + __builtin_ctzll(w) * ld;                                         \
                    for (int q = 0; q < NV; q++) a[q] += LOAD1(v) * *(const v8 *)(src + 8 * q);                       \
                    v++;                                                                                        \
                    w &= w - 1;                                                                                 \
                }                                                                                               \
                val[r] = v;                                                                                     \
                for (int q = 0; q < NV; q++) acc[r][q] = a[q];                                                  \
            }                                                                                                   \
        }                                                                                                       \
        const float *sums = (const float *)acc;                                                                 \
        for (int64_t t = 0; t < tw; t++) {                                                                      \
            float *out = y + (t0 + t) * m + r0;                                                                 \
            for (int64_t r = 0; r < r1 - r0; r++)                                                               \
                out[r] = (accumulate ? out[r] : bias ? bias[r0 + r] : 0.0f) + sums[r * 8 * NV + t];             \
        }                                                                                                       \
    }
FORWARD_TILE(1)
FORWARD_TILE(2)
FORWARD_TILE(3)
FORWARD_TILE(4)
FORWARD_TILE(5)
FORWARD_TILE(6)
FORWARD_TILE(7)
FORWARD_TILE(8)
FORWARD_TILE(9)
FORWARD_TILE(10)
FORWARD_TILE(11)
FORWARD_TILE(12)

typedef void (*FN(forward_tile_fn))(const float *, const float *, int64_t, int64_t, int64_t, const FT *, int64_t,
                                const uint8_t *, int64_t, const FT *, const int64_t *, int64_t, int64_t, float *,
                                int64_t, const float *, int);
static const FN(forward_tile_fn) FN(forward_tiles)[TILE / 8 + 1] = {
    NULL,           FN(forward_tile_1), FN(forward_tile_2), FN(forward_tile_3),  FN(forward_tile_4),  FN(forward_tile_5), FN(forward_tile_6),
    FN(forward_tile_7), FN(forward_tile_8), FN(forward_tile_9), FN(forward_tile_10), FN(forward_tile_11), FN(forward_tile_12)};

#ifdef __AVX2__
/* The 8 weights of one mask byte: lane l is the next value if bit l is set, else 0. Loads values[0..8). */
static inline __m256 FN(expand_byte)(const FT *values, unsigned byte) {
#ifdef EXPAND8
    return EXPAND8(values, byte);
#endif
    __m256i idx = _mm256_loadu_si256((const __m256i *)expand_index[byte]);
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps((__m256)LOAD8(values), idx), _mm256_setzero_ps(),
                            _mm256_castsi256_ps(idx));
}
#endif

#ifdef __AVX2__
/* TT (1..8) tokens, rows [r0, r1): each mask byte's 8 weights are expanded once into a vector and used for
 * every token, a register accumulator per token; for so few tokens this beats one pass per set position. NA
 * consecutive bytes go to NA sums per token, so that TT * NA >= 4 chains hide the FMA's latency (one chain per
 * token left a single token's row bound by it). */
#define FORWARD_FEW(TT, NA)                                                                                     \
    static void FN(forward_few_##TT)(const float *x, const uint8_t *mask, int64_t n, int64_t nb,               \
                                 const FT *values, const int64_t *starts, int64_t nnz, int64_t r0,              \
                                 int64_t r1, float *y, int64_t m) {                                             \
        for (int64_t i = r0; i < r1; i++) {                                                                     \
            const uint8_t *row = mask + i * nb;                                                                 \
            int64_t k = starts[i], b = 0;                                                                       \
            __m256 acc[TT][NA];                                                                                 \
            for (int t = 0; t < TT; t++)                                                                        \
                for (int a = 0; a < NA; a++) acc[t][a] = _mm256_setzero_ps();                                   \
            for (; b + NA <= n / 8 && k + 8 * NA <= nnz; b += NA)                                               \
                for (int a = 0; a < NA; a++) {                                                                  \
                    __m256 w = FN(expand_byte)(values + k, row[b + a]);                                         \
                    for (int t = 0; t < TT; t++)                                                                \
                        acc[t][a] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * n + (b + a) * 8), acc[t][a]);    \
                    k += __builtin_popcount(row[b + a]);                                                        \
                }                                                                                               \
            for (; b < n / 8 && k + 8 <= nnz; b++) {                                                            \
                __m256 w = FN(expand_byte)(values + k, row[b]);                                                 \
                for (int t = 0; t < TT; t++)                                                                    \
                    acc[t][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * n + b * 8), acc[t][0]);             \
                k += __builtin_popcount(row[b]);                                                                \
            }                                                                                                   \
            for (int t = 0; t < TT; t++) {                                                                      \
                float lanes[8], sum = 0.0f;                                                                     \
                for (int a = 1; a < NA; a++) acc[t][0] = _mm256_add_ps(acc[t][0], acc[t][a]);                   \
                _mm256_storeu_ps(lanes, acc[t][0]);                                                             \
                for (int l = 0; l < 8; l++) sum += lanes[l];                                                    \
                for (int64_t tb = b, tk = k; tb < nb; tb++)                                                     \
                    for (unsigned byte = row[tb]; byte; byte &= byte - 1)                                       \
                        sum += LOAD1(values + tk++) * x[t * n + tb * 8 + __builtin_ctz(byte)];                  \
                y[t * m + i] += sum;                                                                            \
            }                                                                                                   \
        }                                                                                                       \
    }
FORWARD_FEW(1, 4)
FORWARD_FEW(2, 2)
FORWARD_FEW(3, 2)
FORWARD_FEW(4, 1)
FORWARD_FEW(5, 1)
FORWARD_FEW(6, 1)
FORWARD_FEW(7, 1)
FORWARD_FEW(8, 1)

typedef void (*FN(forward_few_fn))(const float *, const uint8_t *, int64_t, int64_t, const FT *, const int64_t *,
                               int64_t, int64_t, int64_t, float *, int64_t);
static const FN(forward_few_fn) FN(forward_few)[9] = {NULL, FN(forward_few_1), FN(forward_few_2), FN(forward_few_3), FN(forward_few_4),
                                              FN(forward_few_5), FN(forward_few_6), FN(forward_few_7), FN(forward_few_8)};
#endif

/* dense (m, n) = S. Returns 0, or -2 when the mask sets other than nvalues bits (dense untouched). */
int FN(lrs_bitmask_to_dense)(const uint8_t *mask, int64_t m, int64_t n, int64_t nb, const FT *values,
                         int64_t nvalues, float *dense, int nthreads) {
    int status;
    int64_t *starts = mask_row_starts(mask, m, nb, nvalues, nthreads, &status);
    if (!starts) return status;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        const uint8_t *row = mask + i * nb;
        float *out = dense + i * n;
        int64_t k = starts[i], b = 0;
#ifdef __AVX2__
        for (; b < n / 8 && k + 8 <= nvalues; b++) {
            _mm256_storeu_ps(out + b * 8, FN(expand_byte)(values + k, row[b]));
            k += __builtin_popcount(row[b]);
        }
#endif
        for (int64_t j = b * 8; j < n; j++) out[j] = (row[j / 8] >> (j % 8)) & 1 ? LOAD1(values + k++) : 0.0f;
    }
    free(starts);
    return 0;
}

static float FN(dot)(const FT *a, const float *b, int64_t len) {
    v8 acc = (v8){0};
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) acc += LOAD8(a + j) * *(const v8 *)(b + j);
    float sum = 0.0f;
    for (int l = 0; l < 8; l++) sum += acc[l];
    for (; j < len; j++) sum += LOAD1(a + j) * b[j];
    return sum;
}

/* The few-token products compute in float32. With `typed`, their input x (T, n), bias (m,) and output y (T, m) are
 * in FT instead, as a half-precision layer holds them: x and bias are widened into `io` here (few_io_floats),
 * and the float32 output written at the returned y is narrowed into y by few_outputs. Converting T (n + m) values
 * here costs far less than the two torch casts around the call did (each about a small layer's product). */
static few_io FN(few_inputs)(const void *x, const void *bias, void *y, int typed, int64_t T, int64_t n, int64_t m,
                             float *io) {
    if (!typed) return (few_io){(const float *)x, (const float *)bias, (float *)y};
    for (int64_t i = 0; i < T * n; i++) io[i] = LOAD1((const FT *)x + i);
    float *b = bias ? io + T * n : NULL;
    for (int64_t i = 0; b && i < m; i++) b[i] = LOAD1((const FT *)bias + i);
    return (few_io){io, b, io + T * n + m};
}

static void FN(few_outputs)(const float *y, int64_t count, void *out, int typed) {
    for (int64_t i = 0; typed && i < count; i++) ((FT *)out)[i] = STORE1(y[i]);
}

/* The whole layer for decoding, in one call: y (T, m) = x (T, n) (U V + S)^T + bias, for
 * T <= lrs_few_tokens(); u (m, r), v (r, n), bias (m,) or NULL; x, bias and y in float32, or in FT where typed
 * (few_inputs). `work` holds lrs_few_workspace_floats(T, n, r, m) floats. Returns as lrs_bitmask_matmul, -1 for
 * a smaller work buffer, or -3 for too many tokens. */
int FN(lrs_lowrank_bitmask_few)(const void *x_in, int64_t T, int64_t n, const FT *u, const FT *v, int64_t r,
                                const void *bias_in, const uint8_t *mask, int64_t m, int64_t nb, const FT *values,
                                int64_t nvalues, void *y_out, int typed, float *work, int64_t work_floats,
                                int nthreads) {
    if (T < 1 || T > lrs_few_tokens()) return -3;
    if (work_floats < lrs_few_workspace_floats(T, n, r, m)) return -1;
    int status;
    int64_t *starts = mask_row_starts(mask, m, nb, nvalues, nthreads, &status);
    if (!starts) return status;
    float *xv = work;
    const few_io io = FN(few_inputs)(x_in, bias_in, y_out, typed, T, n, m, work + T * r);
    const float *x = io.x, *bias = io.bias;
    float *y = io.y;
#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t k = 0; k < r; k++)
            for (int64_t t = 0; t < T; t++) xv[t * r + k] = FN(dot)(v + k * n, x + t * n, n);
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++)
            for (int64_t t = 0; t < T; t++) y[t * m + i] = (bias ? bias[i] : 0.0f) + FN(dot)(u + i * r, xv + t * r, r);
#ifdef __AVX2__
#pragma omp for schedule(static)
        for (int64_t rb = 0; rb < (m + ROW_BLOCK - 1) / ROW_BLOCK; rb++) {
            int64_t r1 = (rb + 1) * ROW_BLOCK < m ? (rb + 1) * ROW_BLOCK : m;
            FN(forward_few)[T](x, mask, n, nb, values, starts, nvalues, rb * ROW_BLOCK, r1, y, m);
        }
#endif
    }
    FN(few_outputs)(y, T * m, y_out, typed);
    free(starts);
    return 0;
}

/* y (T, m) = [y +] x (T, n) (U V + S)^T [+ bias] for u (m, rank), v (rank, n): added to y when accumulate,
 * else written over it with bias (m,) or NULL; rank may be 0 (u and v unused). */
static int FN(lowrank_bitmask_matmul)(const float *x, int64_t T, int64_t n, const FT *v, int64_t rank,
                                  const FT *u, const float *bias, const uint8_t *mask, int64_t m, int64_t nb,
                                  const FT *values, int64_t nvalues, float *y, int accumulate, float *work,
                                  int64_t work_floats, int nthreads) {
    int status;
    int64_t *starts = mask_row_starts(mask, m, nb, nvalues, nthreads, &status);
    if (!starts) return status;
    int64_t row_blocks = (m + ROW_BLOCK - 1) / ROW_BLOCK;
#ifdef __AVX2__
    if (T <= FEW_TOKENS && rank == 0 && accumulate) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t rb = 0; rb < row_blocks; rb++) {
            int64_t r1 = (rb + 1) * ROW_BLOCK < m ? (rb + 1) * ROW_BLOCK : m;
            FN(forward_few)[T](x, mask, n, nb, values, starts, nvalues, rb * ROW_BLOCK, r1, y, m);
        }
        free(starts);
        return 0;
    }
#endif
    int64_t width = tile_width(T, TILE), tiles = (T + width - 1) / width;
    float *xt = work_floats >= lrs_workspace_floats(T, n, rank) ? work : NULL;
    float *own = xt ? NULL : malloc((size_t)lrs_workspace_floats(T, n, rank) * sizeof(float));
    if (!xt && !(xt = own)) {
        free(starts);
        return -1;
    }
    float *zt = xt + tiles * n * width;
    transpose_tiles(x, T, n, xt, width, nthreads);
    if (rank) {
        /* z's tiles from x's: items of up to Z_ROWS rows of V for one tile, 64 columns of x at a time so that
         * the input tile rows in use stay in L1 for every row of V. */
        int64_t groups = (rank + Z_ROWS - 1) / Z_ROWS;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t item = 0; item < tiles * groups; item++) {
            int64_t q = item / groups, k0 = item % groups * Z_ROWS, rows = rank - k0 < Z_ROWS ? rank - k0 : Z_ROWS;
            for (int64_t j0 = 0; j0 < n; j0 += 64)
                FN(gemm_rows)(v + k0 * n, n, rows, xt + q * n * width, width, width / 8, j0, j0 + 64 < n ? j0 + 64 : n,
                              zt + (q * rank + k0) * width, width, j0 > 0);
        }
    }
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t item = 0; item < tiles * row_blocks; item++) {
        int64_t q = item / row_blocks, rb = item % row_blocks;
        int64_t t0 = q * width, tw = T - t0 < width ? T - t0 : width;
        int64_t r0 = rb * ROW_BLOCK, r1 = r0 + ROW_BLOCK < m ? r0 + ROW_BLOCK : m;
        FN(forward_tiles)[(tw + 7) / 8](xt + q * n * width, zt + q * rank * width, width, t0, tw, u, rank, mask, nb,
                                    values, starts, r0, r1, y, m, bias, accumulate);
    }
    free(own);
    free(starts);
    return 0;
}

/* The product entry points return 0; -1 when a work buffer could not be allocated, -2 when the mask sets other than
 * nvalues bits (y untouched in both cases). */
int FN(lrs_bitmask_matmul)(const float *x, int64_t T, int64_t n, const uint8_t *mask, int64_t m, int64_t nb,
                       const FT *values, int64_t nvalues, float *y, float *work, int64_t work_floats,
                       int nthreads) {
    return FN(lowrank_bitmask_matmul)(x, T, n, NULL, 0, NULL, NULL, mask, m, nb, values, nvalues, y, 1, work,
                                  work_floats, nthreads);
}

/* y (T, m) = x (T, n) (U V + S)^T + bias, written over y, for u (m, rank), v (rank, n) and bias (m,) or NULL:
 * the layer's forward from FEW_TOKENS + 1 tokens on. */
int FN(lrs_lowrank_bitmask_matmul)(const float *x, int64_t T, int64_t n, const FT *v, int64_t rank, const FT *u,
                               const float *bias, const uint8_t *mask, int64_t m, int64_t nb, const FT *values,
                               int64_t nvalues, float *y, float *work, int64_t work_floats, int nthreads) {
    return FN(lowrank_bitmask_matmul)(x, T, n, v, rank, u, bias, mask, m, nb, values, nvalues, y, 0, work, work_floats,
                                  nthreads);
}

int FN(lrs_bitmask_matmul_t)(const float *x, int64_t T, int64_t m, const uint8_t *mask, int64_t n, int64_t nb,
                         const FT *values, int64_t nvalues, float *y, int nthreads) {
    /* Token tiles are independent: each thread accumulates its tile of y^T (n, TILE_T) privately. */
    int64_t set_bits = 0;
    for (int64_t b = 0; b < m * nb; b += 8) set_bits += __builtin_popcountll(mask_word(mask + b, m * nb - b));
    if (set_bits != nvalues) return -2;
    int64_t width = tile_width(T, TILE_T), tiles = (T + width - 1) / width;
    if (nthreads > tiles) nthreads = (int)tiles;
    float *xt = malloc((size_t)(tiles * m * width) * sizeof(float));
    float *acc = malloc((size_t)(n * width * nthreads) * sizeof(float));
    if (!xt || !acc) {
        free(xt);
        free(acc);
        return -1;
    }
    transpose_tiles(x, T, m, xt, width, nthreads);
#pragma omp parallel num_threads(nthreads)
    {
        float *mine = acc + (size_t)(n * width) * (size_t)omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
        for (int64_t q = 0; q < tiles; q++) {
            int64_t t0 = q * width, tw = T - t0 < width ? T - t0 : width;
            memset(mine, 0, (size_t)(n * width) * sizeof(float));
            const FT *val = values;
            for (int64_t i = 0; i < m; i++) {
                const uint8_t *row = mask + i * nb;
                const v8 *src = (const v8 *)(xt + (q * m + i) * width);
                for (int64_t b = 0; b < nb; b += 8) {
                    uint64_t w = mask_word(row + b, nb - b);
                    while (w) {
                        v8 *dst = (v8 *)(mine + (b * 8 + __builtin_ctzll(w)) * width);
                        float v = LOAD1(val++);
                        for (int q = 0; q < (tw + 7) / 8; q++) dst[q] += v * src[q];
                        w &= w - 1;
                    }
                }
            }
            for (int64_t t = 0; t < tw; t++)
                for (int64_t j = 0; j < n; j++) y[(t0 + t) * n + j] += mine[j * width + t];
        }
    }
    free(acc);
    free(xt);
    return 0;
}


#undef GEMM_TILE
#undef FORWARD_TILE
#undef FORWARD_FEW

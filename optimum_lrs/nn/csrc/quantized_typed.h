/* Products of layers whose U, V and S's values are stored as group codes (QuantizedLowRankSparseLinear,
 * optimum_lrs/nn/quantize.py), written once per scale type: included by bitmask_matmul.c after bitmask_typed.h,
 * with FT the scales' type (the layer's factor dtype), FN(name) the name with its suffix and LOAD1 as there.
 *
 * A stream of codes (V's rows, U's transposed rows, S's values in row-major order) holds `bits` (4 or 8) per
 * code, unsigned, offset by 2^(bits-1); at 4 bits two share a byte, the even position in the low nibble; one
 * scale per `group` consecutive codes. The codes are dequantized a row (or a segment of one) at a time into a
 * small per-thread buffer, which stays in L1 while the row's product reads it: the layer's bytes are read once,
 * as codes. A dequantized value is code * scale rounded to FT, as the torch reference computes it. */

/* out[0, count) = the codes [start, start + count) of a stream, dequantized and rounded to FT, as float32. */
static void FN(dequant_f32)(const uint8_t *codes, const FT *scales, int bits, int64_t group, int64_t start,
                            int64_t count, float *out) {
    const int offset = 1 << (bits - 1);
    /* group by group: g the group of code start + i, limit where it ends (relative to start) */
    for (int64_t i = 0, g = start / group, limit = (g + 1) * group - start; i < count; g++, limit += group) {
        const int64_t end = limit < count ? limit : count;
        const float s = LOAD1(scales + g);
#ifdef __AVX2__
        const __m256 scale = _mm256_set1_ps(s);
        const __m256i offsets = _mm256_set1_epi32(offset);
#endif
        if (bits == 8) {
#ifdef __AVX2__
            for (; i + 8 <= end; i += 8) {
                __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + start + i)));
                _mm256_storeu_ps(out + i, ROUND8(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, offsets)), scale)));
            }
#endif
            for (; i < end; i++) out[i] = ROUND1((float)((int)codes[start + i] - offset) * s);
            continue;
        }
        /* the codes before and after whole runs of eight, one by one (no table of the 16 levels: building it
         * cost more than a group's vector loop) */
#define LEVEL(c) ROUND1((float)((int)(c) - offset) * s)
        if ((start + i) & 1 && i < end) {
            out[i] = LEVEL(codes[(start + i) >> 1] >> 4);
            i++;
        }
        const uint8_t *p = codes + ((start + i) >> 1);
#ifdef __AVX2__
        /* eight codes from four bytes: each lane shifts its nibble down (the even position in the low one) */
        const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), nibble = _mm256_set1_epi32(15);
        for (; i + 8 <= end; i += 8, p += 4) {
            int32_t word;
            memcpy(&word, p, sizeof word);
            __m256i c = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), nibble);
            _mm256_storeu_ps(out + i, ROUND8(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, offsets)), scale)));
        }
#endif
        for (; i + 2 <= end; i += 2, p++) {
            out[i] = LEVEL(*p & 15);
            out[i + 1] = LEVEL(*p >> 4);
        }
        if (i < end) {
            out[i] = LEVEL(*p & 15);
            i++;
        }
#undef LEVEL
    }
}

/* The whole layer in one call: y (T, m) = x (T, n) (U V + S)^T + bias for any T >= 1 where lrs_few_tokens() > 0,
 * with V's codes (r, n), U's transposed codes (r, m), S's value codes (nvalues, padded to whole groups) and their
 * scales; bias (m,) or NULL; x, bias and y in float32, or in FT where typed (few_inputs). `work` holds
 * lrs_quantized_few_workspace_floats(T, n, r, m, nthreads) floats. Returns as lrs_lowrank_bitmask_few. */
int FN(lrs_quantized_few)(const void *x_in, int64_t T, int64_t n, const uint8_t *u_codes, const FT *u_scales,
                          const uint8_t *v_codes, const FT *v_scales, int64_t r, const void *bias_in,
                          const uint8_t *mask, int64_t m, int64_t nb, const uint8_t *s_codes, const FT *s_scales,
                          int64_t nvalues, int bits, int64_t group, void *y_out, int typed, float *work,
                          int64_t work_floats, int nthreads) {
    if (T < 1 || !lrs_few_tokens()) return -3;
    if (work_floats < lrs_quantized_few_workspace_floats(T, n, r, m, nthreads)) return -1;
    int status;
    int64_t *starts = mask_row_starts(mask, m, nb, nvalues, nthreads, &status);
    if (!starts) return status;
    const few_io io = FN(few_inputs)(x_in, bias_in, y_out, typed, T, n, m,
                                     work + lrs_quantized_workspace_floats(T, n, r, nthreads));
    const float *x = io.x, *bias = io.bias;
    float *y = io.y;
#ifdef QUANTIZED_FEW_FAST
    if (QUANTIZED_FEW_FAST(x, T, n, u_codes, u_scales, v_codes, v_scales, r, bias, mask, m, nb, s_codes, s_scales,
                           bits, group, starts, y, work, nthreads)) {
        FN(few_outputs)(y, T * m, y_out, typed);
        free(starts);
        return 0;
    }
#endif
    float *xv = work, *scratch = work + T * r;
    int64_t per_thread = quantized_scratch_floats(n, r);
    /* Tokens in groups of up to FEW_TOKENS (the float32 loops' limit), each group's product dequantizing afresh. */
    for (int64_t t0 = 0; t0 < T; t0 += FEW_TOKENS) {
        const int64_t tg = T - t0 < FEW_TOKENS ? T - t0 : FEW_TOKENS;
        const float *xg = x + t0 * n;
        float *yg = y + t0 * m;
#pragma omp parallel num_threads(nthreads)
        {
            float *buffer = scratch + per_thread * omp_get_thread_num();
#pragma omp for schedule(static)
            for (int64_t k = 0; k < r; k++) {
                FN(dequant_f32)(v_codes, v_scales, bits, group, k * n, n, buffer);
                for (int64_t t = 0; t < tg; t++) xv[t * r + k] = dot_f32(buffer, xg + t * n, n);
            }
#pragma omp for schedule(static)
            for (int64_t rb = 0; rb < (m + ROW_BLOCK - 1) / ROW_BLOCK; rb++) {
                int64_t r0 = rb * ROW_BLOCK, rows = m - r0 < ROW_BLOCK ? m - r0 : ROW_BLOCK;
                for (int64_t t = 0; t < tg; t++)
                    for (int64_t i = 0; i < rows; i++) yg[t * m + r0 + i] = bias ? bias[r0 + i] : 0.0f;
                for (int64_t k = 0; k < r; k++) {
                    FN(dequant_f32)(u_codes, u_scales, bits, group, k * m + r0, rows, buffer);
                    for (int64_t t = 0; t < tg; t++) {
                        const float z = xv[t * r + k];
                        for (int64_t i = 0; i < rows; i++) yg[t * m + r0 + i] += buffer[i] * z;
                    }
                }
#ifdef __AVX2__
                for (int64_t i = r0; i < r0 + rows; i++) {
                    /* The row's values, then the float32 loop over them (8 floats of slack past them, as it reads
                     * values in eights). */
                    int64_t local[2] = {0, starts[i + 1] - starts[i]};
                    FN(dequant_f32)(s_codes, s_scales, bits, group, starts[i], local[1], buffer);
                    forward_few_f32[tg](xg, mask + i * nb, n, nb, buffer, local, local[1] + 8, 0, 1, yg + i, m);
                }
#endif
            }
        }
    }
    FN(few_outputs)(y, T * m, y_out, typed);
    free(starts);
    return 0;
}

/* dense (m, n) = S from its value codes (the dense rebuild of long inputs): float32, or bfloat16 where out_bf16 and
 * this build has the bfloat16 pairs path (lrs_bf16_pairs(); else -4). `work` holds
 * lrs_quantized_workspace_floats(1, n, 0, nthreads) floats. Returns as lrs_bitmask_to_dense. */
int FN(lrs_quantized_to_dense)(const uint8_t *mask, int64_t m, int64_t n, int64_t nb, const uint8_t *s_codes,
                               const FT *s_scales, int64_t nvalues, int bits, int64_t group, void *dense,
                               int out_bf16, float *work, int64_t work_floats, int nthreads) {
    if (work_floats < lrs_quantized_workspace_floats(1, n, 0, nthreads)) return -1;
    int status;
    int64_t *starts = mask_row_starts(mask, m, nb, nvalues, nthreads, &status);
    if (!starts) return status;
    if (out_bf16) {
#ifdef QUANTIZED_DENSE_FAST
        QUANTIZED_DENSE_FAST(mask, m, n, nb, s_codes, s_scales, bits, group, starts, dense, work, nthreads);
#else
        status = -4;
#endif
        free(starts);
        return status;
    }
    int64_t per_thread = quantized_scratch_floats(n, 0);
#pragma omp parallel num_threads(nthreads)
    {
        float *buffer = work + n + per_thread * omp_get_thread_num();
#pragma omp for schedule(static)
        for (int64_t i = 0; i < m; i++) {
            const uint8_t *row = mask + i * nb;
            float *out = (float *)dense + i * n;
            const int64_t count = starts[i + 1] - starts[i];
            FN(dequant_f32)(s_codes, s_scales, bits, group, starts[i], count, buffer);
            int64_t k = 0, b = 0;
#ifdef __AVX2__
            for (; b < n / 8; b++) { /* reads 8 values from k: the buffer has that slack */
                _mm256_storeu_ps(out + b * 8, expand_byte_f32(buffer + k, row[b]));
                k += __builtin_popcount(row[b]);
            }
#endif
            for (int64_t j = b * 8; j < n; j++) out[j] = (row[j / 8] >> (j % 8)) & 1 ? buffer[k++] : 0.0f;
        }
    }
    free(starts);
    return status;
}

/* codes [0, count) of a stream dequantized into out (float32), the groups shared among threads. */
int FN(lrs_dequantize)(const uint8_t *codes, const FT *scales, int bits, int64_t group, int64_t count, float *out,
                       int nthreads) {
    int64_t groups = (count + group - 1) / group;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t g = 0; g < groups; g++)
        FN(dequant_f32)(codes, scales, bits, group, g * group, count - g * group < group ? count - g * group : group,
                        out + g * group);
    return 0;
}

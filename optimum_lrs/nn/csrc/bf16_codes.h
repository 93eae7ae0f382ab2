/* Group codes dequantized into bfloat16 words, shared by the two bfloat16 decoding paths (quantized_bf16.h with
 * AVX512-BF16, quantized_avx2.h with AVX2): included by the one this build compiles, after it has defined
 * `levels_t`, `level_table(s)` (a group's 16 levels (code - 8) * s rounded to bfloat16, in whatever form its
 * lookup reads) and `lookup32(table, p, out)` (the 32 codes of the 16 bytes at p as 32 words at out). */

/* Code `pos` of a stream times its scale s, rounded to bfloat16. */
static inline uint16_t dequant1(const uint8_t *codes, int bits, int64_t pos, float s) {
    int code = bits == 8 ? codes[pos] - 128 : ((codes[pos >> 1] >> (4 * (pos & 1))) & 15) - 8;
    return store1_bf16((float)code * s);
}

/* out[0, count) = the codes [start, start + count) of a stream, dequantized and rounded to bfloat16. At 4 bits
 * with groups of a multiple of 32, whole aligned runs of 32 codes take one table lookup (`level_table`, built
 * once per group, in a loop without branches so that the next groups' tables are built while this one's
 * lookups run); the ends of the range, other widths and group sizes go code by code. */
static void words_dequant(const uint8_t *codes, const uint16_t *scales, int bits, int64_t group, int64_t start,
                          int64_t count, uint16_t *out) {
    int64_t i = 0;
    if (bits == 4 && group % 32 == 0) {
        /* The codes before the first whole run share one group, and so do those after the last. */
        const float first = count ? load1_bf16(scales + start / group) : 0.0f;
        for (; i < count && (start + i) % 32; i++) out[i] = dequant1(codes, bits, start + i, first);
        int64_t runs = (count - i) / 32, per_group = group / 32;
        int64_t g = (start + i) / group, run = (start + i) % group / 32;
        const uint8_t *p = codes + (start + i) / 2;
        for (int64_t done = 0; done < runs; g++, run = 0) {
            levels_t table = level_table(load1_bf16(scales + g));
            for (; run < per_group && done < runs; run++, done++, p += 16, i += 32) lookup32(table, p, out + i);
        }
        const float last = i < count ? load1_bf16(scales + (start + i) / group) : 0.0f;
        for (; i < count; i++) out[i] = dequant1(codes, bits, start + i, last);
    }
    for (; i < count; i++) out[i] = dequant1(codes, bits, start + i, load1_bf16(scales + (start + i) / group));
}

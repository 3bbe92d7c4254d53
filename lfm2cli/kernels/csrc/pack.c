/* ---- The packed layouts every level reads, so a model packed once runs at any level.
 *
 * bf16 ("pairs"): W [out, in] as [out/16][in/2][16][2]: 16 output channels side by side, each with two
 * consecutive inputs, so one 64-byte load meets one pair of x (vdpbf16ps, BFDOT, or two FMAs of widened floats).
 * `in` must be even.
 *
 * int8 and int4 in groups of 32 (lfm2cli/kernels/quantize.py): 32 consecutive inputs of a row share one scale;
 * int8 q in -127..127 with an fp16 scale (llama.cpp's Q8_0 rule), int4 q in -8..7 with a bf16 scale (Q4_0's).
 * [out/16][in/32][block_bytes]: per 16-row block and group, the 16 rows' scales (32 bytes), then steps of 64
 * bytes, each as rows 0-7 then rows 8-15 (32 bytes each):
 *   int8 (544 bytes = 17 * 32): eight steps of 4 inputs; a row's 32-bit lane holds q of inputs 4s..4s+3.
 *   int4 (288 bytes = 9 * 32): four steps of 8 inputs; a row's lane holds q + 8 of input 8s + j (j < 4) in the
 *   low nibble of byte j and of input 8s + j + 4 in its high nibble.
 * A block's groups follow each other, so decode reads each block, scales included, as one forward stream; every
 * 32-byte piece is 32-byte aligned and none crosses a cache line; 128-bit vectors see 4 rows' lanes.
 *
 * Rows are padded to a multiple of 64 (4 blocks: the decode kernels' tiles) with zeros (zero scales). */

/* bf16 W [rows, in] -> pairs, rows padded with zeros to `padded` (a multiple of 16). A pair is 4 bytes, so each
 * moves as one integer. */
void lfm2_pack(const void *src, void *dst, int64_t rows, int64_t padded, int64_t in, int threads) {
    const int64_t pairs = in / 2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < padded / 16; b++) {
        const int64_t live = rows - b * 16 < 16 ? rows - b * 16 : 16; /* rows of this block in `src` */
        const uint32_t *s = (const uint32_t *)src + b * 16 * pairs;
        uint32_t *d = (uint32_t *)dst + b * pairs * 16;
        for (int64_t p = 0; p < pairs; p++)
            for (int64_t j = 0; j < 16; j++) d[p * 16 + j] = j < live ? s[j * pairs + p] : 0u;
    }
}

/* The same for W [rows, in] with rows % 16 == 0, in place: block b of the packed layout occupies exactly the
 * memory of rows 16b..16b+15, so each block is transposed through a small buffer. No new memory is touched,
 * which at load time saves the page faults of a fresh copy of every weight. */
void lfm2_pack_inplace(void *w, int64_t rows, int64_t in, int threads) {
    const int64_t block = 16 * in * 2;
    #pragma omp parallel num_threads(threads)
    {
        void *tmp = malloc((size_t)block);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < rows / 16; b++) {
            char *base = (char *)w + b * block;
            memcpy(tmp, base, (size_t)block);
            lfm2_pack(tmp, base, 16, 16, in, 1);
        }
        free(tmp);
    }
}

/* int8 q [rows, in] (LFM2_INT8) or nibbles [rows, in / 2] (LFM2_INT4: byte k holds q + 8 of input 2k low, of
 * 2k + 1 high), and their 16-bit scales [rows, in / 32] -> the grouped layout, rows padded with zeros to
 * `padded` (a multiple of 16). */
void lfm2_pack_grouped(const uint8_t *src, const uint16_t *scales, uint8_t *dst, int64_t rows, int64_t padded,
                       int64_t in, int fmt, int threads) {
    const int64_t groups = in / GQ_G, bytes = FORMATS[fmt].block_bytes;
    const int64_t row_bytes = fmt == LFM2_INT4 ? in / 2 : in, group_bytes = row_bytes / groups;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < padded / 16; b++)
        for (int64_t g = 0; g < groups; g++) {
            uint8_t *o = dst + (b * groups + g) * bytes;
            memset(o, 0, (size_t)bytes);
            for (int64_t r = 0; r < 16 && b * 16 + r < rows; r++) {
                const int64_t row = b * 16 + r;
                memcpy(o + 2 * r, scales + row * groups + g, 2);
                const uint8_t *s = src + row * row_bytes + g * group_bytes;
                uint8_t *lane = o + 32 + 32 * (r / 8) + 4 * (r % 8);
                if (fmt == LFM2_INT8) {
                    for (int st = 0; st < 8; st++) memcpy(lane + 64 * st, s + 4 * st, 4);
                    continue;
                }
                for (int st = 0; st < 4; st++)
                    for (int j = 0; j < 4; j++) {
                        const int i = 8 * st + j; /* inputs i and i + 4 */
                        const uint8_t lo = (uint8_t)((s[i / 2] >> (4 * (i % 2))) & 0x0F);
                        const uint8_t hi = (uint8_t)((s[(i + 4) / 2] >> (4 * ((i + 4) % 2))) & 0x0F);
                        lane[64 * st + j] = (uint8_t)(lo | (hi << 4));
                    }
            }
        }
}

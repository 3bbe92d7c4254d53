/* ---- Packing bf16 weights: W [rows, in] -> the pairs layout of lfm2_linear, rows padded with zeros to `padded`
 * (a multiple of 16). A pair is 4 bytes, so each moves as one integer. (int8 and int4 weights are packed with
 * their scales by lfm2_pack_grouped, linear_grouped.c.) */
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

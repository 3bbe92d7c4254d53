/* ---- Packing: W [rows, in] -> the layout of lfm2_linear, rows padded with zeros to `padded` (a multiple of
 * 16). bf16 (elem 2): pairs; int8 (elem 1): quads plus 128 (per byte, w + 128 == w ^ 0x80). A pair or a quad
 * is 4 bytes, so each moves as one integer. */
void lfm2_pack(const void *src, void *dst, int64_t rows, int64_t padded, int64_t in, int64_t elem, int threads) {
    const int64_t groups = in * elem / 4;        /* 4-byte groups per row */
    const uint32_t flip = elem == 1 ? 0x80808080u : 0u;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < padded / 16; b++) {
        const int64_t live = rows - b * 16 < 16 ? rows - b * 16 : 16; /* rows of this block in `src` */
        const uint32_t *s = (const uint32_t *)src + b * 16 * groups;
        uint32_t *d = (uint32_t *)dst + b * groups * 16;
        for (int64_t p = 0; p < groups; p++)
            for (int64_t j = 0; j < 16; j++) d[p * 16 + j] = (j < live ? s[j * groups + p] : 0u) ^ flip;
    }
}

/* The same for W [rows, in] with rows % 16 == 0, in place: block b of the packed layout occupies exactly the
 * memory of rows 16b..16b+15, so each block is transposed through a small buffer. No new memory is touched,
 * which at load time saves the page faults of a fresh copy of every weight. */
void lfm2_pack_inplace(void *w, int64_t rows, int64_t in, int64_t elem, int threads) {
    const int64_t block = 16 * in * elem;
    #pragma omp parallel num_threads(threads)
    {
        void *tmp = malloc((size_t)block);
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < rows / 16; b++) {
            char *base = (char *)w + b * block;
            memcpy(tmp, base, (size_t)block);
            lfm2_pack(tmp, base, 16, 16, in, elem, 1);
        }
        free(tmp);
    }
}


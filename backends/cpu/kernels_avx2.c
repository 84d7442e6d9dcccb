/* The CPU backend's float32 kernels for x86-64 with AVX2 and FMA: see native.py for how they are built.
 *
 * linear_bf16w: y = x W^T + b with float32 x and y and W stored as bfloat16, for CPUs without bfloat16
 * arithmetic. Decoding reads every weight once per step, so halving the bytes of W is most of the speed
 * on such machines; widening bfloat16 to float32 is exact (a 16-bit shift), so the products are those of
 * float32 weights rounded to bfloat16 once, at load.
 *
 * W is packed once (pack_bf16w in linear.py) into panels of 16 output columns, each [k][16], padded
 * with zero columns to a multiple of 64. Within a row of 16 the columns are stored in the order
 * 0-3, 8-11, 4-7, 12-15, so that interleaving a 256-bit load with zeros (vpunpcklwd / vpunpckhwd, which
 * work per 128-bit lane) yields columns 0-7 and 8-15 as float32 without a shift. The product is an
 * outer-product micro-kernel: MR rows of x (each element broadcast) times NP panels, 2 * MR * NP
 * accumulators in registers, streaming each panel once per block of rows.
 *
 * Layer ops in float32 (rms_norm_f32, rotary_f32, silu_and_mul_f32, paged_decode_f32): one call each
 * instead of several torch calls, whose dispatch is most of a decode step's time outside the matrix
 * products; with torch's rounding steps where they are elementwise (compiled without contraction into
 * FMA, so each product rounds as torch's does).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define PANEL 16
#define ROW_CHUNK 96 /* rows of x kept in L2 while every panel streams past them */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256i first_lanes(int64_t valid) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline __m256 load_cols(const float *p, int64_t valid) {
    if (valid >= 8) return _mm256_loadu_ps(p);
    return valid > 0 ? _mm256_maskload_ps(p, first_lanes(valid)) : _mm256_setzero_ps();
}

static inline __attribute__((always_inline)) void store_cols(float *y, __m256 v, int64_t valid) {
    if (valid >= 8) {
        _mm256_storeu_ps(y, v);
    } else if (valid > 0) {
        _mm256_maskstore_ps(y, first_lanes(valid), v);
    }
}

/* Weight formats, each in panels of 16 output columns (zero-padded to a multiple of 64 columns):
 *
 * BF16W: [panels][k][16] bfloat16, columns in the order 0-3, 8-11, 4-7, 12-15 (see the top of the file).
 * Q4W:   GGUF's Q4_0 and Q4_1 blocks regrouped: w = d * q + m per column and block of 32 k, q in 0..15.
 *        q: [panels][k][8] bytes, byte c holding column c (low nibble) and column c + 8 (high nibble);
 *        d, m: [panels][k / 32][16] float16 (Q4_0's m is -8 d, exactly).
 * Q8W:   GGUF's Q8_0 regrouped: w = d * q, q: [panels][k][16] int8, d: [panels][k / 32][16] float16.
 * k is a multiple of 32 for the block formats, as GGUF guarantees. Widening a block weight is exact: d * q
 * is exact in float32 and the FMA adds m with one rounding, which is what gguf-py's dequantization gives.
 */
enum { BF16W = 0, Q4W = 1, Q8W = 2 };

typedef struct {
    const void *q;
    const uint16_t *d, *m;
} weights_t;

/* Widen the 16 columns of panel p, rows j0..j1 of k, to float32 at dst + (j - j0) * stride. Inlined where
 * the format is a constant, so each caller gets a loop of one format. */
static inline __attribute__((always_inline)) void widen_panel(int format, weights_t w, int64_t k, int64_t p, int64_t j0, int64_t j1, float *dst,
                        int64_t stride, int64_t valid) {
    const __m256i zero = _mm256_setzero_si256();
    const __m256i nibble = _mm256_set1_epi32(0x0f);
    __m256 d0 = _mm256_setzero_ps(), d1 = d0, m0 = d0, m1 = d0;
    for (int64_t j = j0; j < j1; ++j) {
        __m256 lo, hi;
        if (format == BF16W) {
            __m256i packed = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w.q + (p * k + j) * PANEL));
            lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, packed));
            hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, packed));
        } else {
            if (j == j0 || j % 32 == 0) {
                const uint16_t *scales = w.d + (p * (k / 32) + j / 32) * PANEL;
                d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)scales));
                d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 8)));
                if (format == Q4W) {
                    const uint16_t *mins = w.m + (p * (k / 32) + j / 32) * PANEL;
                    m0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)mins));
                    m1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mins + 8)));
                }
            }
            if (format == Q4W) {
                __m128i bytes = _mm_loadl_epi64((const __m128i *)((const uint8_t *)w.q + (p * k + j) * 8));
                __m256i both = _mm256_cvtepu8_epi32(bytes); /* a byte per lane: both nibbles of a column pair */
                __m256 q0 = _mm256_cvtepi32_ps(_mm256_and_si256(both, nibble));
                __m256 q1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(both, 4));
                lo = _mm256_fmadd_ps(q0, d0, m0);
                hi = _mm256_fmadd_ps(q1, d1, m1);
            } else {
                __m128i bytes = _mm_loadu_si128((const __m128i *)((const int8_t *)w.q + (p * k + j) * PANEL));
                lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), d0);
                hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8))), d1);
            }
        }
        store_cols(dst + (j - j0) * stride, lo, valid);
        store_cols(dst + (j - j0) * stride + 8, hi, valid - 8);
    }
}

/* y[0..MR) x [col, col + 16 * NP) from MR rows of x (stride k) and NP consecutive panels at w: bfloat16
 * panels read directly, or float32 ones already widened. One function per shape and source, so that each
 * one's accumulators are an array the compiler keeps in registers. */
#define LOAD_BF16(w, p, j, k, lo, hi)                                                                          \
    __m256i packed = _mm256_loadu_si256((const __m256i *)((const uint16_t *)(w) + ((p) * (k) + (j)) * PANEL)); \
    __m256 lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, packed));                                      \
    __m256 hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, packed));
#define LOAD_F32(w, p, j, k, lo, hi)                                                                           \
    __m256 lo = _mm256_loadu_ps((const float *)(w) + ((p) * (k) + (j)) * PANEL);                               \
    __m256 hi = _mm256_loadu_ps((const float *)(w) + ((p) * (k) + (j)) * PANEL + 8);

/* The tile's sums, plus the bias, into y's MR rows and the NP panels' columns (fewer at the matrix's edge). */
#define STORE_TILE(SUMS, MR, NP)                                                                               \
    for (int p = 0; p < NP; ++p) {                                                                             \
        int64_t c = col + p * PANEL;                                                                           \
        __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();                                             \
        if (bias) {                                                                                            \
            b0 = load_cols(bias + c, n - c);                                                                   \
            b1 = load_cols(bias + c + 8, n - c - 8);                                                           \
        }                                                                                                      \
        for (int r = 0; r < MR; ++r) {                                                                         \
            store_cols(y + r * n + c, _mm256_add_ps(SUMS[r][p][0], b0), n - c);                                \
            store_cols(y + r * n + c + 8, _mm256_add_ps(SUMS[r][p][1], b1), n - c - 8);                        \
        }                                                                                                      \
    }

#define DEFINE_TILE(MR, NP, SRC)                                                                               \
    static void tile_##SRC##_##MR##_##NP(const float *x, const void *w, const float *bias, float *y,          \
                                         int64_t n, int64_t k, int64_t col) {                                  \
        __m256 acc[MR][NP][2];                                                                                 \
        for (int r = 0; r < MR; ++r)                                                                           \
            for (int p = 0; p < NP; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_ps();                    \
        const __m256i zero = _mm256_setzero_si256();                                                           \
        (void)zero;                                                                                            \
        for (int64_t j = 0; j < k; ++j) {                                                                      \
            for (int p = 0; p < NP; ++p) {                                                                     \
                LOAD_##SRC(w, p, j, k, lo, hi)                                                                 \
                for (int r = 0; r < MR; ++r) {                                                                 \
                    __m256 xr = _mm256_broadcast_ss(x + r * k + j);                                            \
                    acc[r][p][0] = _mm256_fmadd_ps(xr, lo, acc[r][p][0]);                                      \
                    acc[r][p][1] = _mm256_fmadd_ps(xr, hi, acc[r][p][1]);                                      \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        STORE_TILE(acc, MR, NP)                                                                                \
    }
#define DEFINE_TILES(SRC)                                                                                      \
    DEFINE_TILE(1, 4, SRC)                                                                                     \
    DEFINE_TILE(2, 2, SRC)                                                                                     \
    DEFINE_TILE(3, 2, SRC)                                                                                     \
    DEFINE_TILE(1, 1, SRC)                                                                                     \
    DEFINE_TILE(2, 1, SRC)                                                                                     \
    DEFINE_TILE(3, 1, SRC)                                                                                     \
    DEFINE_TILE(4, 1, SRC)                                                                                     \
    DEFINE_TILE(5, 1, SRC)                                                                                     \
    DEFINE_TILE(6, 1, SRC)                                                                                     \
    static const tile_fn SRC##_few[4] = {0, tile_##SRC##_1_4, tile_##SRC##_2_2, tile_##SRC##_3_2};             \
    static const tile_fn SRC##_rows[7] = {0,                tile_##SRC##_1_1, tile_##SRC##_2_1,                \
                                          tile_##SRC##_3_1, tile_##SRC##_4_1, tile_##SRC##_5_1,                \
                                          tile_##SRC##_6_1};

typedef void (*tile_fn)(const float *, const void *, const float *, float *, int64_t, int64_t, int64_t);
DEFINE_TILES(BF16)
DEFINE_TILES(F32)

/* Few rows against block-format panels, the weights widened in registers (no buffer): per block of 32 k,
 * sums of x * q in integers' float form, then scaled once by the block's d and, for Q4, offset by m times
 * the block's sum of x: y = sum_b d_b sum_j x_j q_j + m_b sum_j x_j. Decoding is bound by reading the
 * weights, and this reads 0.625 (Q4) or 1.06 (Q8) bytes a weight. */
#define DEFINE_QTILE(MR, NP, FMT)                                                                              \
    static void qtile_##FMT##_##MR##_##NP(const float *x, weights_t w, const float *bias, float *y, int64_t n, \
                                          int64_t k, int64_t col) {                                            \
        __m256 total[MR][NP][2];                                                                               \
        for (int r = 0; r < MR; ++r)                                                                           \
            for (int p = 0; p < NP; ++p) total[r][p][0] = total[r][p][1] = _mm256_setzero_ps();                \
        const int64_t p0 = col / PANEL, blocks = k / 32;                                                       \
        const __m256i nibble = _mm256_set1_epi32(0x0f);                                                        \
        (void)nibble;                                                                                          \
        for (int64_t b = 0; b < blocks; ++b) {                                                                 \
            __m256 acc[MR][NP][2];                                                                             \
            for (int r = 0; r < MR; ++r)                                                                       \
                for (int p = 0; p < NP; ++p) acc[r][p][0] = acc[r][p][1] = _mm256_setzero_ps();                \
            for (int64_t j = b * 32; j < b * 32 + 32; ++j) {                                                   \
                for (int p = 0; p < NP; ++p) {                                                                 \
                    __m256 q0, q1;                                                                             \
                    if (FMT == Q4W) {                                                                          \
                        __m128i bytes = _mm_loadl_epi64((const __m128i *)((const uint8_t *)w.q + ((p0 + p) * k + j) * 8)); \
                        __m256i both = _mm256_cvtepu8_epi32(bytes);                                            \
                        q0 = _mm256_cvtepi32_ps(_mm256_and_si256(both, nibble));                               \
                        q1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(both, 4));                                   \
                    } else {                                                                                   \
                        __m128i bytes = _mm_loadu_si128((const __m128i *)((const int8_t *)w.q + ((p0 + p) * k + j) * PANEL)); \
                        q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));                                  \
                        q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));               \
                    }                                                                                          \
                    for (int r = 0; r < MR; ++r) {                                                             \
                        __m256 xr = _mm256_broadcast_ss(x + r * k + j);                                        \
                        acc[r][p][0] = _mm256_fmadd_ps(xr, q0, acc[r][p][0]);                                  \
                        acc[r][p][1] = _mm256_fmadd_ps(xr, q1, acc[r][p][1]);                                  \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
            for (int p = 0; p < NP; ++p) {                                                                     \
                const uint16_t *scales = w.d + ((p0 + p) * blocks + b) * PANEL;                                \
                __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)scales));                         \
                __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + 8)));                   \
                for (int r = 0; r < MR; ++r) {                                                                 \
                    total[r][p][0] = _mm256_fmadd_ps(acc[r][p][0], d0, total[r][p][0]);                        \
                    total[r][p][1] = _mm256_fmadd_ps(acc[r][p][1], d1, total[r][p][1]);                        \
                }                                                                                              \
                if (FMT == Q4W) {                                                                              \
                    const uint16_t *mins = w.m + ((p0 + p) * blocks + b) * PANEL;                              \
                    __m256 m0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)mins));                       \
                    __m256 m1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mins + 8)));                 \
                    for (int r = 0; r < MR; ++r) {                                                             \
                        const float *xb = x + r * k + b * 32;                                                  \
                        __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(xb), _mm256_loadu_ps(xb + 8)),  \
                                                 _mm256_add_ps(_mm256_loadu_ps(xb + 16), _mm256_loadu_ps(xb + 24))); \
                        __m256 sx = _mm256_set1_ps(hsum(s));                                                   \
                        total[r][p][0] = _mm256_fmadd_ps(sx, m0, total[r][p][0]);                              \
                        total[r][p][1] = _mm256_fmadd_ps(sx, m1, total[r][p][1]);                              \
                    }                                                                                          \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        STORE_TILE(total, MR, NP)                                                                              \
    }

typedef void (*qtile_fn)(const float *, weights_t, const float *, float *, int64_t, int64_t, int64_t);
DEFINE_QTILE(1, 1, Q4W)
DEFINE_QTILE(1, 2, Q4W)
DEFINE_QTILE(2, 1, Q4W)
DEFINE_QTILE(3, 1, Q4W)
DEFINE_QTILE(1, 1, Q8W)
DEFINE_QTILE(1, 2, Q8W)
DEFINE_QTILE(2, 1, Q8W)
DEFINE_QTILE(3, 1, Q8W)
/* By format, then rows: the tiles for one to three rows (one panel each but for a single row's two), and
 * the one-panel tiles that rows beyond three are computed with, three at a time. */
static const qtile_fn qtiles[3][4] = {{0}, {0, qtile_Q4W_1_2, qtile_Q4W_2_1, qtile_Q4W_3_1},
                                      {0, qtile_Q8W_1_2, qtile_Q8W_2_1, qtile_Q8W_3_1}};
static const qtile_fn qtiles_one_panel[3][4] = {{0}, {0, qtile_Q4W_1_1, qtile_Q4W_2_1, qtile_Q4W_3_1},
                                                {0, qtile_Q8W_1_1, qtile_Q8W_2_1, qtile_Q8W_3_1}};
#define QTILE_MAX_ROWS 3
/* Up to this many rows (a decode step's last token and its draft tokens) still widen weights in registers:
 * three rows at a time against one panel, which stays in L1 between them, so the weights are read from
 * memory once. Every row's sums run in the same order whatever the row count, so it gets the same bits as
 * alone. Above it, widening the panels once into a buffer pays. */
#define QTILE_CHUNKED_ROWS 8

/* A thread's buffer for the widened panels of a block format, grown as needed and kept. */
static float *scratch_for(int64_t floats) {
    static __thread float *buffer = 0;
    static __thread int64_t capacity = 0;
    if (floats > capacity) {
        free(buffer);
        buffer = aligned_alloc(64, (size_t)((floats * 4 + 63) / 64 * 64));
        capacity = buffer ? floats : 0;
    }
    return buffer;
}

/* Rows [0, m) of one chunk against the np panels from column col: blocks of six rows, then the rest.
 * Block formats widen the panels once into the thread's buffer, and every block of rows reads that. */
static void panel_group(int format, const float *x, weights_t w, const float *bias, float *y, int64_t m, int64_t n,
                        int64_t k, int64_t col, int np) {
    const tile_fn *few = BF16_few, *rows = BF16_rows;
    const void *panels = (const uint16_t *)w.q + col * k;
    if (format != BF16W && m <= QTILE_MAX_ROWS) {
        for (int p = 0; p < np; p += m == 1 ? 2 : 1) qtiles[format][m](x, w, bias, y, n, k, col + p * PANEL);
        return;
    }
    if (format != BF16W && m <= QTILE_CHUNKED_ROWS) {
        for (int p = 0; p < np; ++p)
            for (int64_t r = 0; r < m; r += QTILE_MAX_ROWS) {
                int64_t rows_here = m - r < QTILE_MAX_ROWS ? m - r : QTILE_MAX_ROWS;
                qtiles_one_panel[format][rows_here](x + r * k, w, bias, y + r * n, n, k, col + p * PANEL);
            }
        return;
    }
    if (format != BF16W) {
        float *widened = scratch_for(np * k * PANEL);
        for (int p = 0; p < np; ++p) {
            float *dst = widened + p * k * PANEL;
            if (format == Q4W)
                widen_panel(Q4W, w, k, col / PANEL + p, 0, k, dst, PANEL, PANEL);
            else
                widen_panel(Q8W, w, k, col / PANEL + p, 0, k, dst, PANEL, PANEL);
        }
        few = F32_few;
        rows = F32_rows;
        panels = widened;
    }
    if (np > 1) { /* few rows: one tile of them all */
        few[m](x, panels, bias, y, n, k, col);
        return;
    }
    int64_t r = 0;
    for (; r + 6 <= m; r += 6) rows[6](x + r * k, panels, bias, y + r * n, n, k, col);
    if (m > r) rows[m - r](x + r * k, panels, bias, y + r * n, n, k, col);
}

/* x: [m, k], w: a [n, k] matrix in one of the formats above, bias: [n] or NULL, y: [m, n]; all float32 but
 * w. Few rows take several panels at once, so that enough independent sums are in flight to stream W at
 * the memory's speed; six rows and more fill the registers with one panel. */
void linear_packed(int format, const float *x, const void *q, const uint16_t *d, const uint16_t *mins,
                   const float *bias, float *y, int64_t m, int64_t n, int64_t k, int threads) {
    weights_t w = {q, d, mins};
    int np = m == 1 ? 4 : m <= 3 ? 2 : 1;
    int64_t groups = (n + np * PANEL - 1) / (np * PANEL);
    for (int64_t r0 = 0; r0 < m; r0 += ROW_CHUNK) {
        int64_t rows = m - r0 < ROW_CHUNK ? m - r0 : ROW_CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t g = 0; g < groups; ++g)
            panel_group(format, x + r0 * k, w, bias, y + r0 * n, rows, n, k, g * np * PANEL, np);
    }
}

/* The matrix as float32 [k, n] (W transposed): for many rows the float32 GEMM of the BLAS library is faster
 * than the kernels above, and widening the weight for it streams, 16 consecutive floats per panel row. */
void widen_transposed(int format, const void *q, const uint16_t *d, const uint16_t *mins, float *out, int64_t n,
                      int64_t k, int threads) {
    weights_t w = {q, d, mins};
    int64_t panels = (n + PANEL - 1) / PANEL;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < panels; ++p) {
        if (format == BF16W)
            widen_panel(BF16W, w, k, p, 0, k, out + p * PANEL, n, n - p * PANEL);
        else if (format == Q4W)
            widen_panel(Q4W, w, k, p, 0, k, out + p * PANEL, n, n - p * PANEL);
        else
            widen_panel(Q8W, w, k, p, 0, k, out + p * PANEL, n, n - p * PANEL);
    }
}

/* --- layer ops ------------------------------------------------------------------------------------ */

#define PARALLEL_ROWS 16


/* out = weight * (h * rsqrt(mean(h^2) + eps)) with h = x, or h = x + residual stored into sum_out when
 * residual is given. All [rows, hidden] float32. */
void rms_norm_f32(const float *x, const float *residual, const float *weight, float *out, float *sum_out,
                  int64_t rows, int64_t hidden, float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (rows >= PARALLEL_ROWS) schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
        const float *xt = x + t * hidden;
        const float *h = residual ? sum_out + t * hidden : xt;
        __m256 squares = _mm256_setzero_ps();
        for (int64_t i = 0; i < hidden; i += 8) {
            __m256i mask = first_lanes(hidden - i);
            __m256 v = _mm256_maskload_ps(xt + i, mask);
            if (residual) {
                v = _mm256_add_ps(v, _mm256_maskload_ps(residual + t * hidden + i, mask));
                _mm256_maskstore_ps(sum_out + t * hidden + i, mask, v);
            }
            squares = _mm256_add_ps(squares, _mm256_mul_ps(v, v));
        }
        __m256 inv = _mm256_set1_ps(1.f / sqrtf(hsum(squares) / (float)hidden + eps));
        for (int64_t i = 0; i < hidden; i += 8) {
            __m256i mask = first_lanes(hidden - i);
            __m256 normed = _mm256_mul_ps(_mm256_maskload_ps(h + i, mask), inv);
            _mm256_maskstore_ps(out + t * hidden + i, mask, _mm256_mul_ps(_mm256_maskload_ps(weight + i, mask), normed));
        }
    }
}

/* Rotary embedding, neox layout, of `heads` heads of head_dim at x + t * row_stride into out
 * ([rows, heads * head_dim]): out = (x1 cos - x2 sin, x2 cos + x1 sin) at positions[t] of cos_sin
 * ([positions, head_dim]: cos | sin). */
void rotary_f32(const float *x, int64_t row_stride, float *out, const int64_t *positions, const float *cos_sin,
                int64_t rows, int64_t heads, int64_t head_dim, int threads) {
    int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(threads) if (rows >= PARALLEL_ROWS) schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
        const float *cos = cos_sin + positions[t] * head_dim, *sin = cos + half;
        for (int64_t h = 0; h < heads; ++h) {
            const float *x1 = x + t * row_stride + h * head_dim, *x2 = x1 + half;
            float *o1 = out + (t * heads + h) * head_dim, *o2 = o1 + half;
            for (int64_t i = 0; i < half; i += 8) {
                __m256i mask = first_lanes(half - i);
                __m256 c = _mm256_maskload_ps(cos + i, mask), s = _mm256_maskload_ps(sin + i, mask);
                __m256 a = _mm256_maskload_ps(x1 + i, mask), b = _mm256_maskload_ps(x2 + i, mask);
                _mm256_maskstore_ps(o1 + i, mask, _mm256_sub_ps(_mm256_mul_ps(a, c), _mm256_mul_ps(b, s)));
                _mm256_maskstore_ps(o2 + i, mask, _mm256_add_ps(_mm256_mul_ps(b, c), _mm256_mul_ps(a, s)));
            }
        }
    }
}

/* e^x for float32 lanes: x = n ln2 + r, e^r by Cephes' degree-6 polynomial (about 1 ulp), 2^n in the
 * exponent bits. Inputs below -88 give 0, as the softmax and SiLU below need. */
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* out [rows, inter] = silu(gate) * up with x [rows, 2 * inter] = gate | up. */
void silu_and_mul_f32(const float *x, float *out, int64_t rows, int64_t inter, int threads) {
#pragma omp parallel for num_threads(threads) if (rows >= PARALLEL_ROWS) schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
        const float *gate = x + t * 2 * inter, *up = gate + inter;
        for (int64_t i = 0; i < inter; i += 8) {
            __m256i mask = first_lanes(inter - i);
            __m256 g = _mm256_maskload_ps(gate + i, mask);
            __m256 sig = _mm256_add_ps(_mm256_set1_ps(1.f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g)));
            __m256 silu = _mm256_div_ps(g, sig);
            _mm256_maskstore_ps(out + t * inter + i, mask, _mm256_mul_ps(silu, _mm256_maskload_ps(up + i, mask)));
        }
    }
}

#define MAX_BLOCK 128

/* Store new keys and values at their slots of the paged cache [2, blocks, kv_heads, block_size, head]
 * (slot -1: a padding row that writes nothing). Any dtype: sizes and strides are in bytes. */
void write_kv(void *cache, const void *k_new, int64_t k_stride, const void *v_new, int64_t v_stride,
              const int64_t *slots, int64_t tokens, int64_t kv_heads, int64_t head_bytes, int64_t num_blocks,
              int64_t block_size) {
    char *base = (char *)cache;
    int64_t part = num_blocks * kv_heads * block_size * head_bytes;
    for (int64_t t = 0; t < tokens; ++t) {
        if (slots[t] < 0) continue;
        int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
        for (int64_t h = 0; h < kv_heads; ++h) {
            char *k = base + ((block * kv_heads + h) * block_size + offset) * head_bytes;
            __builtin_memcpy(k, (const char *)k_new + t * k_stride + h * head_bytes, head_bytes);
            __builtin_memcpy(k + part, (const char *)v_new + t * v_stride + h * head_bytes, head_bytes);
        }
    }
}

/* Decode attention straight from the paged cache, one query token per sequence; head_dim % 8 == 0.
 *
 * First the new keys and values are written at their slots (slot -1: a padding row that writes
 * nothing). Then each query head runs an online softmax over its context block by block: the scores of
 * a block, then the running output rescaled when the maximum grows, so the context is read once (per
 * query head, from cache for those sharing a KV head) and never gathered into a copy. Work items are
 * (sequence, KV head, range of its query heads): the heads of a group split when there are too few
 * sequences to keep every thread busy.
 * q [seqs, heads, hd] contiguous; k_new, v_new rows of kv_heads * hd at strides k_stride, v_stride;
 * cache [2, blocks, kv_heads, block_size, hd]; block_tables rows at table_stride; out [seqs, heads, hd]. */
void paged_decode_f32(const float *q, const float *k_new, int64_t k_stride, const float *v_new, int64_t v_stride,
                      float *cache, const int64_t *slots, const int32_t *block_tables, const int32_t *seq_lens,
                      float *out, int64_t seqs, int64_t heads, int64_t kv_heads, int64_t hd, int64_t num_blocks,
                      int64_t block_size, int64_t table_stride, float scale, int threads) {
    int64_t tile = block_size * hd, part = num_blocks * kv_heads * tile;
    write_kv(cache, k_new, k_stride * 4, v_new, v_stride * 4, slots, seqs, kv_heads, hd * 4, num_blocks, block_size);
    int64_t group = heads / kv_heads, total = 0;
    for (int64_t s = 0; s < seqs; ++s) total += seq_lens[s];
    int64_t splits = seqs * kv_heads < 4 * threads ? group : 1, per_split = group / splits;
#pragma omp parallel for num_threads(threads) if (total * heads >= 1024) schedule(dynamic, 1)
    for (int64_t item = 0; item < seqs * kv_heads * splits; ++item) {
        int64_t s = item / (kv_heads * splits), h = item / splits % kv_heads, len = seq_lens[s];
        for (int64_t g = item % splits * per_split; g < (item % splits + 1) * per_split; ++g) {
            const float *qg = q + (s * heads + h * group + g) * hd;
            float *o = out + (s * heads + h * group + g) * hd;
            float top = -INFINITY, sum = 0.f, scores[MAX_BLOCK];
            for (int64_t i = 0; i < hd; ++i) o[i] = 0.f;
            for (int64_t start = 0; start < len; start += block_size) {
                int64_t n = len - start < block_size ? len - start : block_size;
                const float *keys = cache + ((int64_t)block_tables[s * table_stride + start / block_size] * kv_heads + h) * tile;
                const float *values = keys + part;
                float block_top = top;
                for (int64_t t = 0; t < n; ++t) {
                    __m256 acc = _mm256_setzero_ps();
                    for (int64_t c = 0; c < hd; c += 8)
                        acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + c), _mm256_loadu_ps(keys + t * hd + c), acc);
                    scores[t] = hsum(acc) * scale;
                    block_top = scores[t] > block_top ? scores[t] : block_top;
                }
                for (int64_t t = 0; t < n; t += 8) {
                    __m256i mask = first_lanes(n - t);
                    __m256 e = exp_ps(_mm256_sub_ps(_mm256_maskload_ps(scores + t, mask), _mm256_set1_ps(block_top)));
                    _mm256_maskstore_ps(scores + t, mask, e);
                }
                float correction = top == -INFINITY ? 0.f : expf(top - block_top);
                sum *= correction;
                for (int64_t t = 0; t < n; ++t) sum += scores[t];
                for (int64_t c = 0; c < hd; c += 8) {
                    __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(o + c), _mm256_set1_ps(correction));
                    for (int64_t t = 0; t < n; ++t)
                        acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[t]), _mm256_loadu_ps(values + t * hd + c), acc);
                    _mm256_storeu_ps(o + c, acc);
                }
                top = block_top;
            }
            __m256 inv = _mm256_set1_ps(sum > 0.f ? 1.f / sum : 0.f);
            for (int64_t c = 0; c < hd; c += 8) _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_loadu_ps(o + c), inv));
        }
    }
}

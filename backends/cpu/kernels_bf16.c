/* The CPU backend's bfloat16 kernels: see native.py for how they are built and called.
 *
 * gemv_bf16: y = x W^T for one to four rows of bfloat16 x, the matrix-vector products of decoding.
 *
 * With so few rows a linear layer is bound by reading W from memory once. oneDNN's GEMM kernels reach
 * about half of this machine's memory bandwidth on such shapes; streaming W four rows at a time while
 * prefetching the next four, with AVX-512 BF16 dot products into float32 accumulators, reaches most of
 * it. Every row of x is applied to a block of W while that block is in registers and L1.
 *
 * x: [m, k], w: [n, k], y: [m, n], all bfloat16 and row-major, 1 <= m <= 4; float32 accumulation,
 * rounded to nearest even on output as oneDNN and torch round.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define ROWS 4 /* rows of W per block */
#define MAX_M 4

static inline __attribute__((always_inline)) void dot_block(const uint16_t *x, const uint16_t *w, uint16_t *y,
                                                            int64_t n, int64_t k, int64_t row, int rows, int m) {
    __m512 acc[MAX_M][ROWS];
    for (int i = 0; i < m; ++i)
        for (int r = 0; r < ROWS; ++r) acc[i][r] = _mm512_setzero_ps();
    int64_t full = k & ~(int64_t)31;
    __mmask32 tail = (__mmask32)((1ull << (k - full)) - 1);
    for (int64_t j = 0; j <= full; j += 32) {
        if (j == full && !tail) break;
        __mmask32 mask = j < full ? (__mmask32)~0u : tail;
        __m512bh wv[ROWS];
        for (int r = 0; r < ROWS; ++r)
            wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(r < rows ? mask : 0, w + (row + r) * k + j);
        for (int i = 0; i < m; ++i) {
            __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + i * k + j);
            for (int r = 0; r < ROWS; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], wv[r], xv);
        }
    }
    for (int i = 0; i < m; ++i) {
        __m128 sums = _mm_setr_ps(_mm512_reduce_add_ps(acc[i][0]), _mm512_reduce_add_ps(acc[i][1]),
                                  _mm512_reduce_add_ps(acc[i][2]), _mm512_reduce_add_ps(acc[i][3]));
        uint16_t out[8];
        _mm_storeu_si128((__m128i *)out, (__m128i)_mm_cvtneps_pbh(sums));
        for (int r = 0; r < rows; ++r) y[i * n + row + r] = out[r];
    }
}

static inline __attribute__((always_inline)) void gemv_m(const uint16_t *x, const uint16_t *w, uint16_t *y,
                                                         int64_t n, int64_t k, int threads, int m) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < n; row += ROWS) {
        if (row + 2 * ROWS <= n) /* the next block, while this one is computed */
            for (int64_t p = 0; p < ROWS * k; p += 32) _mm_prefetch((const char *)(w + (row + ROWS) * k + p), _MM_HINT_T0);
        dot_block(x, w, y, n, k, row, n - row < ROWS ? (int)(n - row) : ROWS, m);
    }
}

/* Returns 0, or -1 when m is outside 1..MAX_M. */
int gemv_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t m, int64_t n, int64_t k, int threads) {
    switch (m) {
    case 1: gemv_m(x, w, y, n, k, threads, 1); return 0;
    case 2: gemv_m(x, w, y, n, k, threads, 2); return 0;
    case 3: gemv_m(x, w, y, n, k, threads, 3); return 0;
    case 4: gemv_m(x, w, y, n, k, threads, 4); return 0;
    default: return -1;
    }
}

/* --- layer ops ------------------------------------------------------------------------------------
 *
 * Each replaces several torch calls whose dispatch and passes over memory, not arithmetic, are most of a
 * decode step's time outside the matrix products. They round where transformers' bfloat16 modules round (every torch op
 * there returns bfloat16), so they give the same bits as the plain-torch ops up to the order of a sum.
 * Rows run in parallel once there are enough of them to pay for waking the threads.
 */

#define PARALLEL_ROWS 16

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline __m512 load_f32(const uint16_t *p, __mmask16 mask) {
    return _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(mask, p));
}

static inline __m512 round_bf16_x16(__m512 v) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }

/* out = weight * bf16(h * rsqrt(mean(h^2) + eps)) with h = x, or h = bf16(x + residual) stored into
 * sum_out when residual is given. x, residual, out, sum_out: [rows, hidden]. */
void rms_norm_bf16(const uint16_t *x, const uint16_t *residual, const uint16_t *weight, uint16_t *out,
                   uint16_t *sum_out, int64_t rows, int64_t hidden, float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (rows >= PARALLEL_ROWS) schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
        const uint16_t *h = residual ? sum_out + t * hidden : x + t * hidden;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < hidden; i += 16) {
            __mmask16 mask = hidden - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (hidden - i)) - 1);
            __m512 v = load_f32(x + t * hidden + i, mask);
            if (residual) {
                v = round_bf16_x16(_mm512_add_ps(v, load_f32(residual + t * hidden + i, mask)));
                _mm256_mask_storeu_epi16(sum_out + t * hidden + i, mask, (__m256i)_mm512_cvtneps_pbh(v));
            }
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        __m512 inv = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(squares) / (float)hidden + eps));
        for (int64_t i = 0; i < hidden; i += 16) {
            __mmask16 mask = hidden - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (hidden - i)) - 1);
            __m512 normed = round_bf16_x16(_mm512_mul_ps(load_f32(h + i, mask), inv));
            __m512 scaled = _mm512_mul_ps(load_f32(weight + i, mask), normed);
            _mm256_mask_storeu_epi16(out + t * hidden + i, mask, (__m256i)_mm512_cvtneps_pbh(scaled));
        }
    }
}

/* Rotary embedding, neox layout, of `heads` heads of head_dim at x + t * row_stride into out
 * ([rows, heads * head_dim]): out = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)) with cos and sin
 * rounded to bfloat16 first, at positions[t] of cos_sin ([positions, head_dim] float32: cos | sin). */
void rotary_bf16(const uint16_t *x, int64_t row_stride, uint16_t *out, const int64_t *positions,
                 const float *cos_sin, int64_t rows, int64_t heads, int64_t head_dim, int threads) {
    int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(threads) if (rows >= PARALLEL_ROWS) schedule(static)
    for (int64_t t = 0; t < rows; ++t) {
        const float *cs = cos_sin + positions[t] * head_dim;
        for (int64_t h = 0; h < heads; ++h) {
            const uint16_t *xh = x + t * row_stride + h * head_dim;
            uint16_t *oh = out + (t * heads + h) * head_dim;
            for (int64_t i = 0; i < half; ++i) {
                float c = round_bf16(cs[i]), s = round_bf16(cs[half + i]);
                float a = bf16_to_f32(xh[i]), b = bf16_to_f32(xh[half + i]);
                oh[i] = f32_to_bf16(round_bf16(a * c) + round_bf16(-b * s));
                oh[half + i] = f32_to_bf16(round_bf16(b * c) + round_bf16(a * s));
            }
        }
    }
}

/* A GPT-2 decode step for up to a few rows: embedding, every layer (layer norms, attention over the KV
 * cache, tanh-GELU MLP, residuals) and the logits, inside one OpenMP parallel region. Weights are fp32 or
 * bf16 (activations fp32), or int8 with a scale per row, or 4-bit codes in blocks of 64 with a scale and a
 * minimum each (q4.py), the last two multiplied by activations quantized to 8 bits per row with VNNI dot
 * products, as fbgemm and llama.cpp do (built only where the CPU has VNNI). Each linear layer has its own
 * weight type (fast-q4 may keep the output projection at int8). The same products serve prefills
 * (rugpt_linear), blocked over tokens, with weights repacked into panels where there are many rows; a
 * prefill's causal attention is rugpt_attention.
 *
 * Why: at small batch a step costs reading the weights once. torch's kernels for these matrix-vector
 * products (MKL's sgemv, oneDNN) read ruGPT-3 small's layer shapes at 20-26 GB/s on a 2-core machine
 * that sums memory at 32+ GB/s, and the ~170 small ops around them cost 3-4 ms a step in dispatch.
 * Here rows of a weight are read in blocks of 8, each row its own stream, against up to 3 input rows
 * at a time; the small ops cost nothing but their arithmetic. GCC vector extensions keep it portable:
 * -march=native makes them AVX-512, AVX2 or NEON (int8 needs AVX-512 VNNI). It runs in the caller's
 * OpenMP runtime (torch's), so it shares torch's threads instead of competing with them. */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define LANES 16 /* floats per vector */
#define ROWS 8   /* weight rows per tile: each its own stream, which keeps enough reads in flight */
#define COLS 3   /* input rows per tile: ROWS * COLS accumulators (measured best of 4x4, 8x2, 6x4, 8x3 ...) */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef unsigned short u16s __attribute__((vector_size(LANES * 2)));
typedef unsigned int u32s __attribute__((vector_size(LANES * 4)));
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HAVE_VNNI 1
#define QLANES 64 /* int8 products per VNNI instruction */
#else
#define HAVE_VNNI 0
#endif

enum { F32, BF16, I8, Q4 };   /* weight element types (the order native.py names them in) */
enum { STORE, ADD, GELU };    /* what a product does with its output: y = Wx+b, y += Wx+b, y = gelu(Wx+b) */
#define Q4_BLOCK 64           /* input columns per q4 scale and minimum (q4.py's BLOCK) */
#define Q4_TILE 16            /* output rows per q4 tile: the int32 lanes of one register */
#define Q4_CHUNKS (Q4_BLOCK / 8) /* 64-byte chunks per block: 16 rows x 8 columns each */
#define Q4_BLOCK_BYTES (Q4_CHUNKS * 64 + 4 * Q4_TILE) /* the chunks, then 16 fp16 scales and 16 fp16 minimums */
#define TOKEN_BLOCK 256       /* prefill rows per pass over a product's weights: their quantized inputs stay in L2 */

/* One linear layer y = x W^T + b: W [out, in] in `type` (int8: tiles, see tile_q8, with a scale s and a
 * code sum z per row; q4: tiles, see tile_q4, scales inside; else s and z NULL); b may be NULL. */
typedef struct {
    const void *w;
    const float *s;
    const int *z;
    const float *b;
    int type;
} Linear;

typedef struct {
    const float *ln1_w, *ln1_b;
    Linear qkv, proj;
    const float *ln2_w, *ln2_b;
    Linear fc, out;
} Layer;

typedef struct {
    int n_layer, d, n_head, d_ff, vocab, ctx;
    float eps;
    const float *wte, *wpe, *lnf_w, *lnf_b;
    Linear lm;                  /* the output projection [vocab, d], no bias */
    const Layer *layers;
    float **k_cache, **v_cache; /* per layer: [rows, n_head, ctx, d / n_head] */
    float *h, *a, *qkv, *att, *f, *scores; /* scratch per row: d, d, 3d, d, d_ff, n_head * ctx */
    unsigned char *xq;          /* scratch per row, 8-bit products only: the quantized input (d_ff, padded to 64)... */
    float *xs;                  /* ...its scale (1)... */
    float *xb;                  /* ...and, q4 only, its sums per block of 64 (d_ff / 64, rounded up) */
} Model;

int rugpt_has_vnni(void) { return HAVE_VNNI; }
#if defined(__AVX512F__)
int rugpt_has_attention(void) { return 1; } /* rugpt_attention below applies (head widths in 16s) */
#else
int rugpt_has_attention(void) { return 0; }
#endif
#if HAVE_VNNI && defined(__AVX512BF16__)
#define HAVE_BF16_PANELS 1
#else
#define HAVE_BF16_PANELS 0
#endif
int rugpt_bf16_panels(void) { return HAVE_BF16_PANELS; } /* bf16 prefills faster here than on oneDNN */
int rugpt_q4_block(void) { return Q4_BLOCK; }

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vec as_floats(u32s bits) {
    vec v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline u32s widen_16(const unsigned short *p) {
    u16s half;
    memcpy(&half, p, sizeof half);
    return __builtin_convertvector(half, u32s);
}

/* LANES weights from element i on, widened to floats */
static inline __attribute__((always_inline)) vec load_w(const void *w, size_t i, int type) {
    if (type == BF16) return as_floats(widen_16((const unsigned short *)w + i) << 16); /* the top half of a float */
    return load((const float *)w + i);
}

static inline __attribute__((always_inline)) float weight_at(const void *w, size_t i, int type) {
    if (type == F32) return ((const float *)w)[i];
    u32s bits = {((const unsigned short *)w)[i]};
    return as_floats(bits << 16)[0];
}

/* the sum of a vector's lanes as a tree of halves: 4 dependent adds instead of 16 in a row */
static inline float hsum(vec v) {
    typedef float v8 __attribute__((vector_size(8 * sizeof(float))));
    typedef float v4 __attribute__((vector_size(4 * sizeof(float))));
    v8 lo8, hi8;
    memcpy(&lo8, &v, sizeof lo8);
    memcpy(&hi8, (const char *)&v + sizeof lo8, sizeof hi8);
    v8 s8 = lo8 + hi8;
    v4 lo4, hi4;
    memcpy(&lo4, &s8, sizeof lo4);
    memcpy(&hi4, (const char *)&s8 + sizeof lo4, sizeof hi4);
    v4 s4 = lo4 + hi4;
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* tanh-GELU, as 0.5 (1 + tanh z) = sigmoid(2z): one expf costs a fraction of a tanhf */
static inline float gelu(float x) {
    return x / (1.0f + expf(-1.5957691216057308f * (x + 0.044715f * x * x * x)));
}

#if defined(__AVX512F__)
/* e^x in 16 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor polynomial to r^6 (relative error
 * under 2e-7), times 2^n by vscalefps (which also gives 0 and infinity past the float range) */
static inline __m512 exp16(__m512 x) {
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* put() for the 16 outputs y[0..16) where `lanes` is set: a prefill's epilogue in vectors (a scalar expf
 * per output of a 1,024-token GELU layer costs more than torch's whole vectorised GELU) */
static inline void put16(float *y, __m512 v, __mmask16 lanes, int mode) {
    if (mode == ADD) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(lanes, y));
    else if (mode == GELU) {
        __m512 z = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_mul_ps(v, v), _mm512_set1_ps(0.044715f), _mm512_set1_ps(1.0f)), v);
        __m512 e = exp16(_mm512_mul_ps(z, _mm512_set1_ps(-1.5957691216057308f)));
        v = _mm512_div_ps(v, _mm512_add_ps(e, _mm512_set1_ps(1.0f)));
    }
    _mm512_mask_storeu_ps(y, lanes, v);
}
#endif

/* sums in vector lanes: a plain float loop is one dependent add after another (C keeps their order) */
static float dot(const float *a, const float *b, int n) {
    vec acc = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES) acc += load(a + i) * load(b + i);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static float sum(const float *a, int n) {
    vec acc = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES) acc += load(a + i);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i];
    return s;
}

static inline void put(float *y, float value, int mode) {
    if (mode == ADD) *y += value;
    else *y = mode == GELU ? gelu(value) : value;
}

/* An input [n, in]: floats, and for int8 weights the same rows quantized (x = (q - 128) * qs[row]) */
typedef struct {
    const float *x;
    const unsigned char *q;
    const float *qs;
} Input;

/* y[c][r + k] for k < R, c < C: R rows of W against C rows of x, R * C vector accumulators. Inlined with
 * constant R, C and type, so the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(const float *x, Linear W, const float *b, float *y, int in,
                                                       int out, int r, int R, int C, int mode, int type) {
    vec acc[ROWS][COLS];
    for (int k = 0; k < R; k++)
        for (int c = 0; c < C; c++) acc[k][c] = (vec){0};
    size_t first = (size_t)r * in;
    int main_in = in - in % LANES;
    for (int i = 0; i < main_in; i += LANES) {
        vec wv[ROWS];
        for (int k = 0; k < R; k++) wv[k] = load_w(W.w, first + (size_t)k * in + i, type);
        if (type == BF16) /* the next tile's rows, as for int8 (fp32 rows are long enough streams as they are) */
            for (int k = 0; k < R; k++) __builtin_prefetch((const unsigned short *)W.w + first + (size_t)(k + R) * in + i);
        for (int c = 0; c < C; c++) {
            vec xv = load(x + (size_t)c * in + i);
            for (int k = 0; k < R; k++) acc[k][c] += wv[k] * xv;
        }
    }
    for (int c = 0; c < C; c++)
        for (int k = 0; k < R; k++) {
            float s = hsum(acc[k][c]);
            for (int i = main_in; i < in; i++) s += weight_at(W.w, first + (size_t)k * in + i, type) * x[(size_t)c * in + i];
            put(y + (size_t)c * out + r + k, s + (b ? b[r + k] : 0.0f), mode);
        }
}

#if HAVE_VNNI
/* tile() for int8 weights and quantized inputs: 64 products per instruction into int32 lanes. The
 * inputs are stored +128 (VNNI multiplies unsigned by signed bytes), which adds 128 * z to each sum.
 * int8 weights are laid out in tiles, [out / 8][in / 64][8][64] (rows padded with zeros to a multiple
 * of 8; `in` a multiple of 64), so a tile reads one sequential stream: as 8 separate rows, 768-byte
 * streams left the hardware prefetcher behind (5.1 vs 3.3 ms for ruGPT-3 small's int8 weights). */
static inline __attribute__((always_inline)) void tile_q8(const unsigned char *xq, const float *qs, Linear W,
                                                          const float *b, float *y, int in, int out, int r, int C,
                                                          int mode) {
    __m512i acc[ROWS][COLS];
    for (int k = 0; k < ROWS; k++)
        for (int c = 0; c < C; c++) acc[k][c] = _mm512_setzero_si512();
    const signed char *tile = (const signed char *)W.w + (size_t)r * in;
    for (int i = 0; i < in; i += QLANES, tile += ROWS * QLANES) {
        for (int c = 0; c < C; c++) {
            __m512i xv = _mm512_loadu_si512(xq + (size_t)c * in + i);
            for (int k = 0; k < ROWS; k++)
                acc[k][c] = _mm512_dpbusd_epi32(acc[k][c], xv, _mm512_load_si512(tile + k * QLANES));
        }
    }
    for (int c = 0; c < C; c++)
        for (int k = 0; k < ROWS && r + k < out; k++) {
            int total = _mm512_reduce_add_epi32(acc[k][c]) - 128 * W.z[r + k];
            put(y + (size_t)c * out + r + k, (float)total * qs[c] * W.s[r + k] + (b ? b[r + k] : 0.0f), mode);
        }
}
#endif

static inline __attribute__((always_inline)) void any_tile(Input x, Linear W, const float *b, float *y, int in,
                                                           int out, int r, int R, int C, int mode, int type) {
#if HAVE_VNNI
    if (type == I8) {
        tile_q8(x.q, x.qs, W, b, y, in, out, r, C, mode);
        return;
    }
#endif
    tile(x.x, W, b, y, in, out, r, R, C, mode, type);
}

static inline Input rows_from(Input x, int c, int in) {
    return (Input){x.x + (size_t)c * in, x.q ? x.q + (size_t)c * in : NULL, x.qs ? x.qs + c : NULL};
}

/* rows [r0, r1) of y = x W^T + b for the n rows of x (y is [n, out]) */
static inline __attribute__((always_inline)) void rows(Input x, Linear W, const float *b, float *y, int n, int in,
                                                       int out, int r0, int r1, int mode, int type) {
    int r = r0;
    for (; r + ROWS <= r1; r += ROWS)
        for (int c = 0; c < n; c += COLS) {
            Input xc = rows_from(x, c, in);
            float *yc = y + (size_t)c * out;
            switch (n - c) { /* constant tile widths, so each is its own inlined loop */
            case 1: any_tile(xc, W, b, yc, in, out, r, ROWS, 1, mode, type); break;
            case 2: any_tile(xc, W, b, yc, in, out, r, ROWS, 2, mode, type); break;
            default: any_tile(xc, W, b, yc, in, out, r, ROWS, COLS, mode, type);
            }
        }
    for (; r < r1; r++) /* float rows past the last whole block; int8 shares are whole (padded) tiles */
        for (int c = 0; c < n; c++) any_tile(rows_from(x, c, in), W, b, y + (size_t)c * out, in, out, r, 1, 1, mode, type);
}

/* x = (q - 128) * scale, q in [1, 255]: symmetric 8 bits for the row's largest magnitude. Written so
 * that GCC vectorises both loops (a max as a comparison; lrintf, rounding half to even, with
 * -fno-math-errno). */
static void quantize(const float *x, int in, unsigned char *q, float *scale) {
    float top = 0.0f;
    for (int i = 0; i < in; i++) {
        float a = fabsf(x[i]);
        top = a > top ? a : top;
    }
    *scale = top > 0.0f ? top / 127.0f : 1.0f;
    float inverse = 1.0f / *scale;
    for (int i = 0; i < in; i++) q[i] = (unsigned char)(128 + lrintf(x[i] * inverse));
}

#if HAVE_VNNI
/* x = q * scale, q in [-127, 127] signed (q4 codes are the unsigned side of vpdpbusd), zero-padded to in_pad;
 * sums[b] = the sum of block b's q, for the blocks' minimums */
static void quantize_signed(const float *x, int in, int in_pad, signed char *q, float *scale, float *sums) {
    float top = 0.0f;
    for (int i = 0; i < in; i++) {
        float a = fabsf(x[i]);
        top = a > top ? a : top;
    }
    *scale = top > 0.0f ? top / 127.0f : 1.0f;
    float inverse = 1.0f / *scale;
    for (int i = 0; i < in; i++) q[i] = (signed char)lrintf(x[i] * inverse);
    memset(q + in, 0, (size_t)(in_pad - in));
    for (int b = 0; b < in_pad / Q4_BLOCK; b++) {
        int total = 0;
        for (int i = 0; i < Q4_BLOCK; i++) total += q[b * Q4_BLOCK + i];
        sums[b] = (float)total;
    }
}

static inline int load_i32(const signed char *p) {
    int v;
    memcpy(&v, p, sizeof v);
    return v;
}


/* acc[c] (16 lanes: the tile's 16 rows) = sum over blocks of d * (q . x_c) + m * sum(x_c), for C input rows
 * of the quantized x (row stride in_pad, block sums at sums + c * blocks). A q4 tile is, per block of 64
 * columns, 8 chunks of 64 bytes, byte 4 r + j of chunk k holding column 8 k + j of row r in its low nibble
 * and column 8 k + 4 + j in its high nibble (so a nibble mask and a shift give two registers of 16 rows x
 * 4 columns, each multiplied by 4 broadcast input bytes), then the rows' fp16 scales and minimums. With
 * few input rows, low and high nibbles sum into separate registers: two dependency chains, not one. */
static inline __attribute__((always_inline)) void tile_q4(const signed char *xq, const float *sums, int in_pad,
                                                          int blocks, const unsigned char *t, int C, __m512 *acc) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const int split = C <= 4;
    for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
    for (int b = 0; b < blocks; b++, t += Q4_BLOCK_BYTES) {
        __m512i lo_sum[8], hi_sum[8];
        for (int c = 0; c < C; c++) lo_sum[c] = hi_sum[c] = _mm512_setzero_si512();
        const signed char *xb = xq + (size_t)b * Q4_BLOCK;
        for (int k = 0; k < Q4_CHUNKS; k++) {
            __m512i v = _mm512_loadu_si512(t + 64 * k);
            __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            for (int c = 0; c < C; c++) {
                const signed char *xc = xb + (size_t)c * in_pad + 8 * k;
                lo_sum[c] = _mm512_dpbusd_epi32(lo_sum[c], lo, _mm512_set1_epi32(load_i32(xc)));
                if (split) hi_sum[c] = _mm512_dpbusd_epi32(hi_sum[c], hi, _mm512_set1_epi32(load_i32(xc + 4)));
                else lo_sum[c] = _mm512_dpbusd_epi32(lo_sum[c], hi, _mm512_set1_epi32(load_i32(xc + 4)));
            }
        }
        const unsigned char *scales = t + 64 * Q4_CHUNKS;
        __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)scales));
        __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + 2 * Q4_TILE)));
        for (int c = 0; c < C; c++) {
            __m512i total = split ? _mm512_add_epi32(lo_sum[c], hi_sum[c]) : lo_sum[c];
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), d, acc[c]);
            acc[c] = _mm512_fmadd_ps(m, _mm512_set1_ps(sums[(size_t)c * blocks + b]), acc[c]);
        }
    }
}

/* rows [16 tile, 16 tile + 16) of y for input rows c0 .. c0 + C - 1 */
static inline __attribute__((always_inline)) void q4_columns(const signed char *xq, const float *xs,
                                                             const float *sums, Linear W, float *y, int in_pad,
                                                             int out, int tile, int c0, int C, int mode) {
    int blocks = in_pad / Q4_BLOCK;
    __m512 acc[8];
    tile_q4(xq + (size_t)c0 * in_pad, sums + (size_t)c0 * blocks, in_pad, blocks,
            (const unsigned char *)W.w + (size_t)tile * blocks * Q4_BLOCK_BYTES, C, acc);
    int r = tile * Q4_TILE, valid = out - r < Q4_TILE ? out - r : Q4_TILE;
    __mmask16 lanes = (__mmask16)((1u << valid) - 1);
    __m512 b = W.b ? _mm512_maskz_loadu_ps(lanes, W.b + r) : _mm512_setzero_ps();
    for (int c = 0; c < C; c++)
        put16(y + (size_t)(c0 + c) * out + r, _mm512_fmadd_ps(acc[c], _mm512_set1_ps(xs[c0 + c]), b), lanes, mode);
}

/* tiles [t0, t1) of y = x W^T + b for q4 W and the n rows already quantized; rows in groups of 8, tokens in
 * blocks of TOKEN_BLOCK (a prefill's), so the quantized rows of a block stay in cache across the tiles */
static void q4_rows(const signed char *xq, const float *xs, const float *sums, Linear W, float *y, int n,
                    int in_pad, int out, int t0, int t1, int mode) {
    for (int first = 0; first < n; first += TOKEN_BLOCK) {
        int last = first + TOKEN_BLOCK < n ? first + TOKEN_BLOCK : n;
        for (int tile = t0; tile < t1; tile++)
            for (int c = first; c < last; c += 8) {
                switch (last - c) { /* constant widths: each its own inlined loop with accumulators in registers */
                case 1: q4_columns(xq, xs, sums, W, y, in_pad, out, tile, c, 1, mode); break;
                case 2: q4_columns(xq, xs, sums, W, y, in_pad, out, tile, c, 2, mode); break;
                case 3: q4_columns(xq, xs, sums, W, y, in_pad, out, tile, c, 3, mode); break;
                case 4: q4_columns(xq, xs, sums, W, y, in_pad, out, tile, c, 4, mode); break;
                case 5: q4_columns(xq, xs, sums, W, y, in_pad, out, tile, c, 5, mode); break;
                case 6: q4_columns(xq, xs, sums, W, y, in_pad, out, tile, c, 6, mode); break;
                case 7: q4_columns(xq, xs, sums, W, y, in_pad, out, tile, c, 7, mode); break;
                default: q4_columns(xq, xs, sums, W, y, in_pad, out, tile, c, 8, mode);
                }
            }
    }
}

/* int8 weights for many input rows (a prefill): the decode tiles (8 rows, reduced across lanes at the end:
 * as costly as the products themselves at in = 768) are repacked a panel of 2 x 16 rows at a time into
 * q4's arrangement, 16 rows x 4 columns per 64 bytes, so each VNNI instruction multiplies 16 rows by 4
 * broadcast input bytes and the sums come out with the rows in lanes. A panel is 32 x in bytes, repacked
 * once per PANEL_TOKENS input rows. */
#define Q8_PANEL 32 /* weight rows per panel: two tiles of 16 */
#define PACK_MIN 32 /* input rows from which a product repacks its weights into panels (fewer: a batched step) */
/* input rows per repacking of a panel: a repacked panel serves up to a 1,024-token prefill whole (its inputs
 * stream from L2 and L3; repacking every 256 rows cost 15 % of a bf16 product) */
#define PANEL_TOKENS 1024

static void pack_q8_panel(const signed char *tiles, int in, int rows_out, int r0, signed char *panel) {
    for (int half = 0; half < 2; half++) {
        int first = r0 + 16 * half, live = rows_out - first < 16 ? rows_out - first : 16; /* whole tiles: 8 or 16 */
        signed char *dst = panel + (size_t)half * 16 * in;
        if (live <= 0) {
            memset(dst, 0, (size_t)16 * in);
            continue;
        }
        /* lane r gathers row first + r: its tile's bytes for 64 columns are 64 apart within 8 rows, and the
         * next 8 rows are the next tile, in / 64 steps of 8 x 64 bytes on */
        int step = in / QLANES * ROWS * QLANES, index[16];
        for (int r = 0; r < 16; r++) index[r] = (r / ROWS) * step + (r % ROWS) * QLANES;
        __m512i rows_at = _mm512_loadu_si512(index);
        __mmask16 lanes = (__mmask16)((1u << live) - 1);
        const signed char *base = tiles + (size_t)(first / ROWS) * step;
        for (int k = 0; k < in / 4; k++) {
            const signed char *at = base + (size_t)(4 * k / QLANES) * ROWS * QLANES + (4 * k) % QLANES;
            _mm512_store_si512(dst + (size_t)64 * k,
                               _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, rows_at, at, 1));
        }
    }
}

static inline __attribute__((always_inline)) void q8_columns(const unsigned char *xq, const float *xs,
                                                             const signed char *panel, Linear W, float *y, int in,
                                                             int out, int r0, int c0, int C, int mode) {
    __m512i acc[2][8];
    for (int h = 0; h < 2; h++)
        for (int c = 0; c < C; c++) acc[h][c] = _mm512_setzero_si512();
    const signed char *lo = panel, *hi = panel + (size_t)16 * in;
    for (int k = 0; k < in / 4; k++) {
        __m512i w0 = _mm512_load_si512(lo + 64 * k), w1 = _mm512_load_si512(hi + 64 * k);
        for (int c = 0; c < C; c++) {
            __m512i xv = _mm512_set1_epi32(load_i32((const signed char *)xq + (size_t)(c0 + c) * in + 4 * k));
            acc[0][c] = _mm512_dpbusd_epi32(acc[0][c], xv, w0);
            acc[1][c] = _mm512_dpbusd_epi32(acc[1][c], xv, w1);
        }
    }
    for (int h = 0; h < 2; h++) {
        int r = r0 + 16 * h, valid = out - r < 16 ? out - r : 16;
        if (valid <= 0) break;
        __mmask16 lanes = (__mmask16)((1u << valid) - 1);
        __m512i z = _mm512_mullo_epi32(_mm512_maskz_loadu_epi32(lanes, W.z + r), _mm512_set1_epi32(128));
        __m512 s = _mm512_maskz_loadu_ps(lanes, W.s + r);
        __m512 b = W.b ? _mm512_maskz_loadu_ps(lanes, W.b + r) : _mm512_setzero_ps();
        for (int c = 0; c < C; c++) {
            __m512 total = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[h][c], z));
            put16(y + (size_t)(c0 + c) * out + r, _mm512_fmadd_ps(total, _mm512_mul_ps(s, _mm512_set1_ps(xs[c0 + c])), b),
                  lanes, mode);
        }
    }
}

#if defined(__AVX512BF16__)
/* bf16 weights [out, in] for many input rows: as for int8, the weights repacked per PANEL_TOKENS rows, here in
 * panels of BF16_TILES x 16 rows, 16 rows x 2 columns per 64 bytes, each vdpbf16ps multiplying 16 rows by a
 * broadcast pair of inputs (the inputs rounded to bf16 once, as oneDNN's bf16 products do; sums in fp32). */
#define BF16_TILES 3
#define BF16_COLS 8
static void pack_bf16_panel(const unsigned short *w, int in, int out, int r0, unsigned short *panel) {
    for (int part = 0; part < BF16_TILES; part++) {
        int first = r0 + 16 * part, live = out - first < 16 ? out - first : 16;
        unsigned short *dst = panel + (size_t)part * 32; /* the tiles' chunks interleaved: one stream */
        __m512i rows_at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(2 * in));
        __mmask16 lanes = live > 0 ? (__mmask16)((1u << live) - 1) : 0;
        const unsigned short *base = w + (size_t)(live > 0 ? first : 0) * in;
        for (int k = 0; k < in / 2; k++)
            _mm512_store_si512(dst + (size_t)32 * BF16_TILES * k,
                               _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, rows_at, base + 2 * k, 1));
    }
}

static inline __attribute__((always_inline)) void bf16_columns(const unsigned short *xb, const unsigned short *panel,
                                                               Linear W, float *y, int in, int out, int r0, int c0,
                                                               int C, int mode) {
    __m512 acc[BF16_TILES][BF16_COLS];
    for (int h = 0; h < BF16_TILES; h++)
        for (int c = 0; c < C; c++) acc[h][c] = _mm512_setzero_ps();
    for (int k = 0; k < in / 2; k++) {
        __m512bh w[BF16_TILES];
        for (int h = 0; h < BF16_TILES; h++) w[h] = (__m512bh)_mm512_load_si512(panel + (size_t)32 * (BF16_TILES * k + h));
        for (int c = 0; c < C; c++) {
            int pair;
            memcpy(&pair, xb + (size_t)c0 * in + 2 * (BF16_COLS * k + c), sizeof pair);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            for (int h = 0; h < BF16_TILES; h++) acc[h][c] = _mm512_dpbf16_ps(acc[h][c], xv, w[h]);
        }
    }
    for (int h = 0; h < BF16_TILES; h++) {
        int r = r0 + 16 * h, valid = out - r < 16 ? out - r : 16;
        if (valid <= 0) break;
        __mmask16 lanes = (__mmask16)((1u << valid) - 1);
        __m512 b = W.b ? _mm512_maskz_loadu_ps(lanes, W.b + r) : _mm512_setzero_ps();
        for (int c = 0; c < C; c++) put16(y + (size_t)(c0 + c) * out + r, _mm512_add_ps(acc[h][c], b), lanes, mode);
    }
}

/* this thread's panels [p0, p1) of y = x W^T + b for bf16 W, x already rounded to bf16 (xb, [n, in]) */
static int bf16_rows(const unsigned short *xb, Linear W, float *y, int n, int in, int out, int p0, int p1, int mode) {
    int rows = BF16_TILES * 16;
    unsigned short *panel = aligned_alloc(64, (size_t)rows * in * 2);
    if (!panel) return -1;
    for (int first = 0; first < n; first += PANEL_TOKENS) {
        int last = first + PANEL_TOKENS < n ? first + PANEL_TOKENS : n;
        for (int p = p0; p < p1; p++) {
            pack_bf16_panel((const unsigned short *)W.w, in, out, p * rows, panel);
            for (int c = first; c < last; c += BF16_COLS) {
                switch (last - c) {
                case 1: bf16_columns(xb, panel, W, y, in, out, p * rows, c, 1, mode); break;
                case 2: bf16_columns(xb, panel, W, y, in, out, p * rows, c, 2, mode); break;
                case 3: bf16_columns(xb, panel, W, y, in, out, p * rows, c, 3, mode); break;
                case 4: bf16_columns(xb, panel, W, y, in, out, p * rows, c, 4, mode); break;
                case 5: bf16_columns(xb, panel, W, y, in, out, p * rows, c, 5, mode); break;
                case 6: bf16_columns(xb, panel, W, y, in, out, p * rows, c, 6, mode); break;
                case 7: bf16_columns(xb, panel, W, y, in, out, p * rows, c, 7, mode); break;
                default: bf16_columns(xb, panel, W, y, in, out, p * rows, c, BF16_COLS, mode);
                }
            }
        }
    }
    free(panel);
    return 0;
}

/* row r of x rounded to bf16, nearest even (as torch's .to(torch.bfloat16)), into q laid out for bf16_columns:
 * rows in groups of BF16_COLS, a group's pairs k of columns side by side ([group][in / 2][BF16_COLS] pairs),
 * so the inputs of a step of the inner loop are one read */
static void round_bf16(const float *x, int in, int r, unsigned short *q) {
    unsigned short row[in];
    int i = 0;
    for (; i + 16 <= in; i += 16) _mm256_storeu_si256((__m256i *)(row + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
    for (; i < in; i++) {
        unsigned int bits;
        memcpy(&bits, x + i, sizeof bits);
        row[i] = (unsigned short)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }
    unsigned short *group = q + (size_t)(r - r % BF16_COLS) * in + 2 * (r % BF16_COLS);
    for (int k = 0; k < in / 2; k++) memcpy(group + (size_t)2 * BF16_COLS * k, row + 2 * k, 4);
}
#endif

/* panels [p0, p1) of y = x W^T + b for int8 W (decode tiles) and the n rows already quantized (+128) */
static int q8_rows(const unsigned char *xq, const float *xs, Linear W, float *y, int n, int in, int out, int p0,
                   int p1, int mode) {
    signed char *panel = aligned_alloc(64, (size_t)Q8_PANEL * in);
    if (!panel) return -1;
    int rows_out = (out + ROWS - 1) / ROWS * ROWS;
    for (int first = 0; first < n; first += PANEL_TOKENS) {
        int last = first + PANEL_TOKENS < n ? first + PANEL_TOKENS : n;
        for (int p = p0; p < p1; p++) {
            pack_q8_panel((const signed char *)W.w, in, rows_out, p * Q8_PANEL, panel);
            for (int c = first; c < last; c += 8) {
                switch (last - c) { /* constant widths, as in q4_rows */
                case 1: q8_columns(xq, xs, panel, W, y, in, out, p * Q8_PANEL, c, 1, mode); break;
                case 2: q8_columns(xq, xs, panel, W, y, in, out, p * Q8_PANEL, c, 2, mode); break;
                case 3: q8_columns(xq, xs, panel, W, y, in, out, p * Q8_PANEL, c, 3, mode); break;
                case 4: q8_columns(xq, xs, panel, W, y, in, out, p * Q8_PANEL, c, 4, mode); break;
                case 5: q8_columns(xq, xs, panel, W, y, in, out, p * Q8_PANEL, c, 5, mode); break;
                case 6: q8_columns(xq, xs, panel, W, y, in, out, p * Q8_PANEL, c, 6, mode); break;
                case 7: q8_columns(xq, xs, panel, W, y, in, out, p * Q8_PANEL, c, 7, mode); break;
                default: q8_columns(xq, xs, panel, W, y, in, out, p * Q8_PANEL, c, 8, mode);
                }
            }
        }
    }
    free(panel);
    return 0;
}
#endif

static inline int padded(int n, int multiple) { return (n + multiple - 1) / multiple * multiple; }

/* this thread's share of y = x W^T + b (x [n, in], y [n, out]); every thread of the team calls it, and
 * the caller puts a barrier after it. xq, xs and xb are scratch for the quantized input (8-bit products):
 * n rows of `in` (q4: padded to 64) bytes, n scales, and for q4 n rows of block sums. */
static void product(const float *x, Linear W, float *y, int n, int in, int out, int mode, unsigned char *xq,
                    float *xs, float *xb) {
    const float *b = W.b;
#ifdef _OPENMP
    int team = omp_get_num_threads(), id = omp_get_thread_num();
#else
    int team = 1, id = 0;
#endif
#if HAVE_VNNI
    if (W.type == Q4) {
        int in_pad = padded(in, Q4_BLOCK), blocks = in_pad / Q4_BLOCK;
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++)
            quantize_signed(x + (size_t)r * in, in, in_pad, (signed char *)xq + (size_t)r * in_pad, xs + r,
                            xb + (size_t)r * blocks);
        int tiles = (out + Q4_TILE - 1) / Q4_TILE, share = (tiles + team - 1) / team;
        int t0 = id * share, t1 = t0 + share < tiles ? t0 + share : tiles;
        if (t0 < t1) q4_rows((const signed char *)xq, xs, xb, W, y, n, in_pad, out, t0, t1, mode);
        return;
    }
#endif
    Input input = {x, NULL, NULL};
    if (W.type == I8) { /* xq [n, in], xs [n]: scratch for the quantized input */
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++) quantize(x + (size_t)r * in, in, xq + (size_t)r * in, xs + r);
        input = (Input){x, xq, xs};
    }
#if HAVE_BF16_PANELS
    if (W.type == BF16 && n >= PACK_MIN && in % 2 == 0) {
        unsigned short *xb16 = (unsigned short *)xq; /* scratch of n rows, rounded up to 8, of in bf16 */
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++) round_bf16(x + (size_t)r * in, in, r, xb16);
        int size = BF16_TILES * 16, panels = (out + size - 1) / size, per = (panels + team - 1) / team;
        int p0 = id * per, p1 = p0 + per < panels ? p0 + per : panels;
        if (p0 >= p1 || bf16_rows(xb16, W, y, n, in, out, p0, p1, mode) == 0) return;
        /* no memory for the panel: this thread's share by the decode tiles */
        rows(input, W, b, y, n, in, out, p0 * size, p1 * size < out ? p1 * size : out, mode, BF16);
        return;
    }
#endif
#if HAVE_VNNI
    if (W.type == I8 && n >= PACK_MIN) {
        int panels = (out + Q8_PANEL - 1) / Q8_PANEL, per = (panels + team - 1) / team;
        int p0 = id * per, p1 = p0 + per < panels ? p0 + per : panels;
        if (p0 >= p1 || q8_rows(xq, xs, W, y, n, in, out, p0, p1, mode) == 0) return;
        int rows_out = padded(out, ROWS); /* no memory for the panel: this thread's share by the decode tiles */
        rows(input, W, b, y, n, in, out, p0 * Q8_PANEL, p1 * Q8_PANEL < rows_out ? p1 * Q8_PANEL : rows_out, mode, I8);
        return;
    }
#endif
    int rows_out = W.type == I8 ? (out + ROWS - 1) / ROWS * ROWS : out; /* int8: whole (padded) tiles */
    int share = ((rows_out + team - 1) / team + ROWS - 1) / ROWS * ROWS;
    int r0 = id * share, r1 = r0 + share < rows_out ? r0 + share : rows_out;
    if (r0 >= r1) return;
    switch (W.type) { /* one specialised copy of the loops per type */
    case I8: rows(input, W, b, y, n, in, out, r0, r1, mode, I8); break;
    case BF16: rows(input, W, b, y, n, in, out, r0, r1, mode, BF16); break;
    default: rows(input, W, b, y, n, in, out, r0, r1, mode, F32);
    }
}

static void layer_norm(const float *x, const float *w, const float *b, float *y, int d, float eps) {
    float mean = sum(x, d) / d;
    for (int i = 0; i < d; i++) y[i] = x[i] - mean;
    float inv = 1.0f / sqrtf(dot(y, y, d) / d + eps);
    for (int i = 0; i < d; i++) y[i] = y[i] * inv * w[i] + b[i];
}

/* one head of input row `row` (cache slot `slot`, position `pos`): store its key and value */
static void store(const Model *m, int l, int row, int head, int slot, int pos) {
    int d = m->d, hd = d / m->n_head;
    size_t base = ((size_t)slot * m->n_head + head) * m->ctx * hd;
    const float *qkv = m->qkv + (size_t)row * 3 * d;
    memcpy(m->k_cache[l] + base + (size_t)pos * hd, qkv + d + head * hd, hd * sizeof(float));
    memcpy(m->v_cache[l] + base + (size_t)pos * hd, qkv + 2 * d + head * hd, hd * sizeof(float));
}

/* one head of input row `row` (cache slot `slot`, position `pos`): attend over 0..pos, its own key stored */
static void attend(const Model *m, int l, int row, int head, int slot, int pos) {
    int d = m->d, hd = d / m->n_head;
    size_t base = ((size_t)slot * m->n_head + head) * m->ctx * hd;
    float *keys = m->k_cache[l] + base, *values = m->v_cache[l] + base;
    const float *q = m->qkv + (size_t)row * 3 * d + head * hd;
    float *score = m->scores + ((size_t)row * m->n_head + head) * m->ctx;
    float scale = 1.0f / sqrtf((float)hd), top = -INFINITY;
    for (int t = 0; t <= pos; t++) {
        score[t] = dot(q, keys + (size_t)t * hd, hd) * scale;
        if (score[t] > top) top = score[t];
    }
    float total = 0.0f;
    for (int t = 0; t <= pos; t++) total += score[t] = expf(score[t] - top);
    float *out = m->att + (size_t)row * d + head * hd;
    memset(out, 0, hd * sizeof(float));
    for (int t = 0; t <= pos; t++) {
        const float *v = values + (size_t)t * hd;
        float p = score[t] / total;
        for (int i = 0; i < hd; i++) out[i] += p * v[i];
    }
}

/* Append tokens[r] at positions[r] to the row in cache slot slots[r], for r < n (n <= the scratch's rows);
 * logits is [n, vocab]. Rows may sit at different positions, and several may be one slot's consecutive
 * positions: an extend by a few tokens (speculative decoding's check of its drafts) in one call. */
void rugpt_step(const Model *m, int n, const int *slots, const int *positions, const int *tokens, float *logits,
                int threads) {
    int d = m->d;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++)
            for (int i = 0; i < d; i++)
                m->h[(size_t)r * d + i] = m->wte[(size_t)tokens[r] * d + i] + m->wpe[(size_t)positions[r] * d + i];
        for (int l = 0; l < m->n_layer; l++) {
            const Layer *w = m->layers + l;
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++) layer_norm(m->h + (size_t)r * d, w->ln1_w, w->ln1_b, m->a + (size_t)r * d, d, m->eps);
            product(m->a, w->qkv, m->qkv, n, d, 3 * d, STORE, m->xq, m->xs, m->xb);
#pragma omp barrier
#pragma omp for schedule(static) collapse(2)
            for (int r = 0; r < n; r++)
                for (int head = 0; head < m->n_head; head++) store(m, l, r, head, slots[r], positions[r]);
            /* every key stored before any row attends: rows of one slot (an extend) read each other's */
#pragma omp for schedule(static) collapse(2)
            for (int r = 0; r < n; r++)
                for (int head = 0; head < m->n_head; head++) attend(m, l, r, head, slots[r], positions[r]);
            product(m->att, w->proj, m->h, n, d, d, ADD, m->xq, m->xs, m->xb);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int r = 0; r < n; r++) layer_norm(m->h + (size_t)r * d, w->ln2_w, w->ln2_b, m->a + (size_t)r * d, d, m->eps);
            product(m->a, w->fc, m->f, n, d, m->d_ff, GELU, m->xq, m->xs, m->xb);
#pragma omp barrier
            product(m->f, w->out, m->h, n, m->d_ff, d, ADD, m->xq, m->xs, m->xb);
#pragma omp barrier
        }
#pragma omp for schedule(static)
        for (int r = 0; r < n; r++) layer_norm(m->h + (size_t)r * d, m->lnf_w, m->lnf_b, m->a + (size_t)r * d, d, m->eps);
        product(m->a, m->lm, logits, n, d, m->vocab, STORE, m->xq, m->xs, m->xb);
    }
}

/* y [n, out] = x [n, in] W^T + b on its own (mode STORE), or gelu(x W^T + b) (GELU), or y += x W^T + b (ADD):
 * the fast engine's prefill products for 8- and 4-bit weights (which otherwise would need a second, fbgemm copy
 * of them) and for bf16 where the CPU has AVX-512 BF16. Returns 0, or -1 when scratch cannot be allocated. */
int rugpt_linear(const float *x, const Linear *W, float *y, int n, int in, int out, int mode, int threads) {
    if (n <= 0) return 0;
    size_t width = (size_t)padded(in, Q4_BLOCK) * (W->type == BF16 ? 2 : 1); /* bf16: the inputs rounded */
    unsigned char *xq = malloc((size_t)padded(n, 8) * width); /* bf16: in whole groups of 8 rows */
    float *xs = malloc((size_t)n * sizeof(float)), *xb = malloc((size_t)n * (width / Q4_BLOCK) * sizeof(float));
    int ok = xq && xs && xb;
    if (ok) {
#pragma omp parallel num_threads(threads)
        product(x, *W, y, n, in, out, mode, xq, xs, xb);
    }
    free(xq);
    free(xs);
    free(xb);
    return ok ? 0 : -1;
}

#if defined(__AVX512F__)
#define ATT_Q 6 /* queries per group: 6 x 4 accumulators (64 keys, or 64 dimensions) in registers */

/* scores[q][t] = (query q . key t) * scale for keys [0, keys) in blocks of 64 (keys in lanes, from kt:
 * the head's keys transposed, [hd][width]) */
static inline __attribute__((always_inline)) void attention_scores(const float *const *query, int Q, int hd,
                                                                   const float *kt, int width, int keys, float scale,
                                                                   float *scores) {
    for (int t0 = 0; t0 < keys; t0 += 64) {
        __m512 acc[ATT_Q][4];
        for (int q = 0; q < Q; q++)
            for (int v = 0; v < 4; v++) acc[q][v] = _mm512_setzero_ps();
        for (int j = 0; j < hd; j++) {
            const float *row = kt + (size_t)j * width + t0;
            __m512 k0 = _mm512_loadu_ps(row), k1 = _mm512_loadu_ps(row + 16), k2 = _mm512_loadu_ps(row + 32),
                   k3 = _mm512_loadu_ps(row + 48);
            for (int q = 0; q < Q; q++) {
                __m512 x = _mm512_set1_ps(query[q][j]);
                acc[q][0] = _mm512_fmadd_ps(x, k0, acc[q][0]);
                acc[q][1] = _mm512_fmadd_ps(x, k1, acc[q][1]);
                acc[q][2] = _mm512_fmadd_ps(x, k2, acc[q][2]);
                acc[q][3] = _mm512_fmadd_ps(x, k3, acc[q][3]);
            }
        }
        for (int q = 0; q < Q; q++)
            for (int v = 0; v < 4; v++)
                _mm512_storeu_ps(scores + (size_t)q * width + t0 + 16 * v, _mm512_mul_ps(acc[q][v], _mm512_set1_ps(scale)));
    }
}

/* out[q][c0 .. c0 + 16 V) = sum over keys t < keys of p[q][t] value[t][...], V 16-wide vectors of dimensions */
static inline __attribute__((always_inline)) void attention_values(const float *p, int width, int Q, const float *values,
                                                                   int hd, int keys, int c0, int V, float *const *out,
                                                                   const float *inverse) {
    __m512 acc[ATT_Q][4];
    for (int q = 0; q < Q; q++)
        for (int v = 0; v < V; v++) acc[q][v] = _mm512_setzero_ps();
    for (int t = 0; t < keys; t++) {
        const float *row = values + (size_t)t * hd + c0;
        __m512 value[4];
        for (int v = 0; v < V; v++) value[v] = _mm512_loadu_ps(row + 16 * v);
        for (int q = 0; q < Q; q++) {
            __m512 weight = _mm512_set1_ps(p[(size_t)q * width + t]);
            for (int v = 0; v < V; v++) acc[q][v] = _mm512_fmadd_ps(weight, value[v], acc[q][v]);
        }
    }
    for (int q = 0; q < Q; q++)
        for (int v = 0; v < V; v++)
            _mm512_storeu_ps(out[q] + c0 + 16 * v, _mm512_mul_ps(acc[q][v], _mm512_set1_ps(inverse[q])));
}

/* queries [i0, i0 + Q) of one head: scores, the causal softmax (query i sees positions 0 .. start + i), values */
static void attention_group(const float *qkv, int d, int hd, int head, const float *kt, int width, const float *values,
                            int start, int i0, int Q, float *scores, float *out) {
    const float *query[ATT_Q];
    float *target[ATT_Q], inverse[ATT_Q];
    for (int q = 0; q < Q; q++) {
        query[q] = qkv + (size_t)(i0 + q) * 3 * d + head * hd;
        target[q] = out + (size_t)(i0 + q) * d + head * hd;
    }
    int keys = start + i0 + Q; /* the last query's positions */
    float scale = 1.0f / sqrtf((float)hd);
    switch (Q) { /* constant query counts: the accumulators stay in registers */
    case 1: attention_scores(query, 1, hd, kt, width, keys, scale, scores); break;
    case 2: attention_scores(query, 2, hd, kt, width, keys, scale, scores); break;
    case 3: attention_scores(query, 3, hd, kt, width, keys, scale, scores); break;
    case 4: attention_scores(query, 4, hd, kt, width, keys, scale, scores); break;
    case 5: attention_scores(query, 5, hd, kt, width, keys, scale, scores); break;
    default: attention_scores(query, ATT_Q, hd, kt, width, keys, scale, scores);
    }
    for (int q = 0; q < Q; q++) {
        float *row = scores + (size_t)q * width;
        int seen = start + i0 + q + 1, full = seen - seen % 16;
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int t = 0; t < full; t += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(row + t));
        __mmask16 tail = (__mmask16)((1u << (seen - full)) - 1);
        top = _mm512_max_ps(top, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, row + full));
        __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top)), total = _mm512_setzero_ps();
        for (int t = 0; t < full; t += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + t), most));
            total = _mm512_add_ps(total, e);
            _mm512_storeu_ps(row + t, e);
        }
        for (int t = full; t < keys; t += 16) { /* past the query's position: weight 0 */
            __mmask16 live = t == full ? tail : 0;
            __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, row + t), most)));
            total = _mm512_add_ps(total, e);
            _mm512_storeu_ps(row + t, e);
        }
        inverse[q] = 1.0f / _mm512_reduce_add_ps(total);
    }
    for (int c0 = 0; c0 < hd; c0 += 64) {
        int V = (hd - c0) / 16 < 4 ? (hd - c0) / 16 : 4;
#define VALUES(QQ, VV) attention_values(scores, width, QQ, values, hd, keys, c0, VV, target, inverse)
#define BY_V(QQ) switch (V) { case 1: VALUES(QQ, 1); break; case 2: VALUES(QQ, 2); break; \
                              case 3: VALUES(QQ, 3); break; default: VALUES(QQ, 4); }
        switch (Q) {
        case 1: BY_V(1); break;
        case 2: BY_V(2); break;
        case 3: BY_V(3); break;
        case 4: BY_V(4); break;
        case 5: BY_V(5); break;
        default: BY_V(ATT_Q);
        }
#undef BY_V
#undef VALUES
    }
}
#endif

/* Causal self-attention of a prefill (or a chunk of one): queries for positions start .. start + T - 1 in
 * qkv [T, 3d] (q in columns [0, d), head h at h * hd), against the row's cached keys and values (the slot's
 * [n_head, ctx, hd] caches, positions 0 .. start + T - 1 written); out [T, d], heads side by side, as the
 * output projection reads them. Work is spread over (head, group of 6 queries). Returns 0; -1 without
 * memory; -2 where it does not apply (no AVX-512, or a head width not in whole 16-float vectors). Why: torch's
 * CPU attention took 19 ms a layer for 1,024 tokens of ruGPT-3 small's shape, a third of a q4 prefill. */
int rugpt_attention(const float *qkv, int T, int d, int n_head, const float *k_cache, const float *v_cache, int ctx,
                    int start, float *out, int threads) {
#if defined(__AVX512F__)
    /* rows of the transposed keys and the scores are padded past whole 4 KB, which would put them all in the
     * same few L1 sets */
    int hd = d / n_head, end = start + T, width = padded(end, 64) + 16, groups = (T + ATT_Q - 1) / ATT_Q;
    if (hd % 16 || end > ctx) return -2;
    float *kt = aligned_alloc(64, (size_t)n_head * hd * width * sizeof(float));
    if (!kt) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int h = 0; h < n_head; h++) { /* each head's keys transposed, zero past the end */
            float *head = kt + (size_t)h * hd * width;
            const float *keys = k_cache + (size_t)h * ctx * hd;
            for (int j = 0; j < hd; j++) {
                for (int t = 0; t < end; t++) head[(size_t)j * width + t] = keys[(size_t)t * hd + j];
                memset(head + (size_t)j * width + end, 0, (size_t)(width - end) * sizeof(float));
            }
        }
        float *scores = aligned_alloc(64, (size_t)ATT_Q * width * sizeof(float));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int g = groups - 1; g >= 0; g--) /* the longest groups first */
            for (int h = 0; h < n_head; h++) {
                if (!scores) continue;
                int i0 = g * ATT_Q, Q = T - i0 < ATT_Q ? T - i0 : ATT_Q;
                attention_group(qkv, d, hd, h, kt + (size_t)h * hd * width, width, v_cache + (size_t)h * ctx * hd,
                                start, i0, Q, scores, out);
            }
        free(scores);
    }
    free(kt);
    return failed ? -1 : 0;
#else
    (void)qkv, (void)T, (void)d, (void)n_head, (void)k_cache, (void)v_cache, (void)ctx, (void)start, (void)out,
        (void)threads;
    return -2;
#endif
}

/* One block of 64 weights to 4-bit codes q and fp16 d, m with w ~ d q + m: the grid spans the block's range
 * (widened to hold 0), then d and m are refitted by least squares for the codes chosen and rounded to fp16,
 * and the codes taken again for those. q4.py's quantize_q4 is the same arithmetic in torch (the reference). */
static void quantize_block(const float *w, unsigned char *q, _Float16 *d_out, _Float16 *m_out) {
    float low = 0.0f, high = 0.0f;
    for (int i = 0; i < Q4_BLOCK; i++) {
        low = w[i] < low ? w[i] : low;
        high = w[i] > high ? w[i] : high;
    }
    float d = (high - low) / 15.0f, step = d == 0.0f ? 1.0f : d;
    double sq = 0, sw = 0, sqq = 0, sqw = 0;
    for (int i = 0; i < Q4_BLOCK; i++) {
        float c = nearbyintf((w[i] - low) / step);
        c = c < 0.0f ? 0.0f : c > 15.0f ? 15.0f : c;
        sq += c, sw += w[i], sqq += (double)c * c, sqw += (double)c * w[i];
    }
    double det = Q4_BLOCK * sqq - sq * sq, fit_d = d, fit_m = low;
    if (det > 0) {
        fit_d = (Q4_BLOCK * sqw - sq * sw) / det;
        fit_m = (sw - fit_d * sq) / Q4_BLOCK;
    }
    *d_out = (_Float16)(float)fit_d;
    *m_out = (_Float16)(float)fit_m;
    float dd = (float)*d_out, mm = (float)*m_out, inverse_step = dd == 0.0f ? 1.0f : dd;
    for (int i = 0; i < Q4_BLOCK; i++) {
        float c = nearbyintf((w[i] - mm) / inverse_step);
        q[i] = (unsigned char)(c < 0.0f ? 0.0f : c > 15.0f ? 15.0f : c);
    }
}

/* w [out, in] fp32, element (r, c) at w[r * row_stride + c * column_stride] (a transposed view needs no copy),
 * to q4 tiles (q4.py's tile_q4 layout: whole tiles of 16 rows, `in` padded with zero columns to whole blocks),
 * tiles spread over the threads */
void rugpt_quantize_q4(const float *w, long row_stride, long column_stride, int out, int in, unsigned char *tiles,
                       int threads) {
    int blocks = padded(in, Q4_BLOCK) / Q4_BLOCK, n_tiles = (out + Q4_TILE - 1) / Q4_TILE;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int t = 0; t < n_tiles; t++)
        for (int b = 0; b < blocks; b++) {
            unsigned char *block = tiles + ((size_t)t * blocks + b) * Q4_BLOCK_BYTES;
            _Float16 *ds = (_Float16 *)(block + 64 * Q4_CHUNKS), *ms = ds + Q4_TILE;
            memset(block, 0, Q4_BLOCK_BYTES);
            for (int r = 0; r < Q4_TILE && t * Q4_TILE + r < out; r++) {
                const float *row = w + (t * Q4_TILE + r) * row_stride;
                float v[Q4_BLOCK];
                unsigned char q[Q4_BLOCK];
                for (int i = 0, c = b * Q4_BLOCK; i < Q4_BLOCK; i++, c++) v[i] = c < in ? row[c * column_stride] : 0.0f;
                quantize_block(v, q, ds + r, ms + r);
                for (int k = 0; k < Q4_CHUNKS; k++) /* column 8 k + j low, 8 k + 4 + j high, at byte 4 r + j */
                    for (int j = 0; j < 4; j++)
                        block[64 * k + 4 * r + j] = (unsigned char)(q[8 * k + j] | q[8 * k + 4 + j] << 4);
            }
        }
}

/* The CPU's compute peak, measured (benchmarks report prefill speed as a share of it): every thread runs
 * `rounds` x 12 independent dot-product instructions, bf16 pairs (kind 0: vdpbf16ps, 64 flops each),
 * VNNI bytes (kind 1: vpdpbusd, 128 ops each) or fp32 fused multiply-adds (kind 2: 32 flops each). Returns
 * the operations done per thread, 0 where the CPU lacks the instruction. */
double rugpt_peak(int kind, long rounds, int threads) {
    double done = 0.0;
#if defined(__AVX512F__)
    if (kind == 2) {
#pragma omp parallel num_threads(threads)
        {
            __m512 acc[12];
            for (int j = 0; j < 12; j++) acc[j] = _mm512_set1_ps((float)j);
            __m512 a = _mm512_set1_ps(1.0000001f), b = _mm512_set1_ps(1e-7f);
            for (long i = 0; i < rounds; i++)
                for (int j = 0; j < 12; j++) acc[j] = _mm512_fmadd_ps(acc[j], a, b);
            float sink = 0.0f;
            for (int j = 0; j < 12; j++) sink += _mm512_reduce_add_ps(acc[j]);
            if (sink == 42.0f) done = -1.0;
        }
        if (done == 0.0) done = (double)rounds * 12 * 32;
    }
#endif
#if defined(__AVX512BF16__)
    if (kind == 0) {
#pragma omp parallel num_threads(threads)
        {
            __m512 acc[12];
            for (int j = 0; j < 12; j++) acc[j] = _mm512_set1_ps((float)j);
            __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3c00);
            for (long i = 0; i < rounds; i++)
                for (int j = 0; j < 12; j++) acc[j] = _mm512_dpbf16_ps(acc[j], a, b);
            float sink = 0.0f;
            for (int j = 0; j < 12; j++) sink += _mm512_reduce_add_ps(acc[j]);
            if (sink == 42.0f) done = -1.0; /* never: keeps the loop */
        }
        if (done == 0.0) done = (double)rounds * 12 * 64;
    }
#endif
#if HAVE_VNNI
    if (kind == 1) {
#pragma omp parallel num_threads(threads)
        {
            __m512i acc[12];
            for (int j = 0; j < 12; j++) acc[j] = _mm512_set1_epi32(j);
            __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
            for (long i = 0; i < rounds; i++)
                for (int j = 0; j < 12; j++) acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
            int sink = 0;
            for (int j = 0; j < 12; j++) sink += _mm512_reduce_add_epi32(acc[j]);
            if (sink == 42) done = -1.0;
        }
        if (done == 0.0) done = (double)rounds * 12 * 128;
    }
#endif
    return done;
}

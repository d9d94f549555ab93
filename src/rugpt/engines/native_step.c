/* One batch-1 GPT-2 decode step in fp32: embedding, every layer (layer norms, attention over the KV
 * cache, tanh-GELU MLP, residuals) and the logits, inside one OpenMP parallel region.
 *
 * Why: at batch 1 a step costs reading the weights once. torch's kernels for these matrix-vector
 * products (MKL's sgemv, oneDNN) read ruGPT-3 small's layer shapes at 20-26 GB/s on a 2-core machine
 * that sums memory at 32+ GB/s, and the ~170 small ops around them cost 3-4 ms a step in dispatch.
 * Here rows of a weight are read in blocks of 8, each row its own stream with its own vector
 * accumulator (28-36 GB/s here), and the small ops cost nothing but their arithmetic. GCC vector
 * extensions keep it portable: -march=native makes them AVX-512, AVX2 or NEON. It runs in the
 * caller's OpenMP runtime (torch's), so it shares torch's threads instead of competing with them. */
#include <math.h>
#include <stddef.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 8
#define LANES 16
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

enum { STORE, ADD, GELU }; /* what a product does with its output: y = Wx+b, y += Wx+b, y = gelu(Wx+b) */
enum { LN1_W, LN1_B, QKV_W, QKV_B, PROJ_W, PROJ_B, LN2_W, LN2_B, FC_W, FC_B, OUT_W, OUT_B, PER_LAYER };

typedef struct {
    int n_layer, d, n_head, d_ff, vocab, ctx;
    float eps;
    const float *wte, *wpe, *lnf_w, *lnf_b;
    const float **layer;     /* PER_LAYER pointers per layer; weights laid out [out, in] */
    float **k_cache, **v_cache; /* per layer: [rows, n_head, ctx, d / n_head] */
    float *h, *a, *qkv, *att, *f, *scores; /* scratch: d, d, 3d, d, d_ff, n_head * ctx */
} Model;

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline float hsum(vec v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; i++) s += v[i];
    return s;
}

static inline float gelu(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

static inline void put(float *y, float value, int mode) {
    if (mode == ADD) *y += value;
    else *y = mode == GELU ? gelu(value) : value;
}

/* rows [r0, r1) of y = W x + b */
static void rows(const float *x, const float *w, const float *b, float *y, int in, int r0, int r1, int mode) {
    int main_in = in - in % LANES;
    int r = r0;
    for (; r + BLOCK <= r1; r += BLOCK) {
        vec acc[BLOCK] = {0};
        const float *wr = w + (size_t)r * in;
        for (int i = 0; i < main_in; i += LANES) {
            vec xv = load(x + i);
            for (int k = 0; k < BLOCK; k++) acc[k] += load(wr + (size_t)k * in + i) * xv;
        }
        for (int k = 0; k < BLOCK; k++) {
            float s = hsum(acc[k]);
            for (int i = main_in; i < in; i++) s += wr[(size_t)k * in + i] * x[i];
            put(y + r + k, s + (b ? b[r + k] : 0.0f), mode);
        }
    }
    for (; r < r1; r++) {
        const float *wr = w + (size_t)r * in;
        float s = 0.0f;
        for (int i = 0; i < in; i++) s += wr[i] * x[i];
        put(y + r, s + (b ? b[r] : 0.0f), mode);
    }
}

/* this thread's share of y = W x + b; the caller puts a barrier after it */
static void product(const float *x, const float *w, const float *b, float *y, int in, int out, int mode) {
#ifdef _OPENMP
    int team = omp_get_num_threads(), id = omp_get_thread_num();
#else
    int team = 1, id = 0;
#endif
    int share = ((out + team - 1) / team + BLOCK - 1) / BLOCK * BLOCK;
    int r0 = id * share, r1 = r0 + share < out ? r0 + share : out;
    if (r0 < r1) rows(x, w, b, y, in, r0, r1, mode);
}

static void layer_norm(const float *x, const float *w, const float *b, float *y, int d, float eps) {
    float mean = 0.0f, var = 0.0f;
    for (int i = 0; i < d; i++) mean += x[i];
    mean /= d;
    for (int i = 0; i < d; i++) var += (x[i] - mean) * (x[i] - mean);
    float inv = 1.0f / sqrtf(var / d + eps);
    for (int i = 0; i < d; i++) y[i] = (x[i] - mean) * inv * w[i] + b[i];
}

/* one head: store this position's key and value in the cache, attend over positions 0..pos */
static void attend(const Model *m, int l, int head, int slot, int pos) {
    int hd = m->d / m->n_head;
    size_t base = ((size_t)slot * m->n_head + head) * m->ctx * hd;
    float *keys = m->k_cache[l] + base, *values = m->v_cache[l] + base;
    const float *q = m->qkv + head * hd;
    memcpy(keys + (size_t)pos * hd, m->qkv + m->d + head * hd, hd * sizeof(float));
    memcpy(values + (size_t)pos * hd, m->qkv + 2 * m->d + head * hd, hd * sizeof(float));
    float *score = m->scores + (size_t)head * m->ctx, scale = 1.0f / sqrtf((float)hd), top = -INFINITY;
    for (int t = 0; t <= pos; t++) {
        const float *k = keys + (size_t)t * hd;
        float s = 0.0f;
        for (int i = 0; i < hd; i++) s += q[i] * k[i];
        score[t] = s * scale;
        if (score[t] > top) top = score[t];
    }
    float total = 0.0f;
    for (int t = 0; t <= pos; t++) total += score[t] = expf(score[t] - top);
    float *out = m->att + head * hd;
    memset(out, 0, hd * sizeof(float));
    for (int t = 0; t <= pos; t++) {
        const float *v = values + (size_t)t * hd;
        float p = score[t] / total;
        for (int i = 0; i < hd; i++) out[i] += p * v[i];
    }
}

void rugpt_step(const Model *m, int slot, int pos, int token, float *logits, int threads) {
    int d = m->d;
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
        for (int i = 0; i < d; i++) m->h[i] = m->wte[(size_t)token * d + i] + m->wpe[(size_t)pos * d + i];
        for (int l = 0; l < m->n_layer; l++) {
            const float **w = m->layer + (size_t)l * PER_LAYER;
#pragma omp single
            layer_norm(m->h, w[LN1_W], w[LN1_B], m->a, d, m->eps);
            product(m->a, w[QKV_W], w[QKV_B], m->qkv, d, 3 * d, STORE);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int head = 0; head < m->n_head; head++) attend(m, l, head, slot, pos);
            product(m->att, w[PROJ_W], w[PROJ_B], m->h, d, d, ADD);
#pragma omp barrier
#pragma omp single
            layer_norm(m->h, w[LN2_W], w[LN2_B], m->a, d, m->eps);
            product(m->a, w[FC_W], w[FC_B], m->f, d, m->d_ff, GELU);
#pragma omp barrier
            product(m->f, w[OUT_W], w[OUT_B], m->h, m->d_ff, d, ADD);
#pragma omp barrier
        }
#pragma omp single
        layer_norm(m->h, m->lnf_w, m->lnf_b, m->a, d, m->eps);
        product(m->a, m->wte, NULL, logits, d, m->vocab, STORE);
    }
}

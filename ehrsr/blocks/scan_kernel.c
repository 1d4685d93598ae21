/* The SSMB's cross-scan (ehrsr/blocks/ssm.py) as SIMD loops, compiled on first use (scan_kernel.py).
 *
 * One call computes, for every batch item b, scan direction k and channel c of an image of
 * H x W = L tokens (docs/architecture.md, SSMB):
 *
 *     p_t      = the token visited at step t of direction k (row-major, reversed, column-major,
 *                reversed), computed from t: no gathered copy of any input
 *     z_t      = dt_b[k,c] + sum_r dt_w[k,c,r] proj[b,p_t,k,r]           (dt projection)
 *     delta_t  = softplus(z_t)
 *     h_t      = exp(delta_t A[k,c]) h_{t-1} + delta_t x[b,p_t,c] B_t      (N states)
 *     y[b,p_t,c] += <C_t, h_t> + D[k,c] x[b,p_t,c]                        (written back at p_t)
 *
 * with B_t and C_t read from proj[b,p_t] too. The backward is the reverse-time adjoint
 * lam_t = gy_t C_t + a_{t+1} lam_{t+1} over states recomputed segment by segment from checkpoints,
 * giving every input's gradient in one pass (no autograd graph).
 *
 * Layouts (all contiguous, tokens in row-major image order p = i W + j):
 *   x, y, gy: (B, L, E)   proj: (B, L, P) with P = K (R + 2N); direction k's slice of a row is
 *   [dt inputs (R) | B (N) | C (N)] at offset k (R + 2N)   dt_w: (K, E, R)   dt_b, D: (K, E)
 *   A: (K, E, N)   y_parts, grad_x_parts: (K, B, L, E), one slab per direction (the caller sums)
 *   grad_proj_parts: (B, G, L, P), one slab per block of LANES channels, G = ceil(E / LANES) (the
 *   caller sums)
 *   grad_dt_w_parts: (B, K, E, R); grad_dt_b_parts, grad_D_parts: (B, K, E); grad_A_parts: (B, K, E, N)
 *
 * Vectorisation: a work item is one (batch item, block of LANES channels, direction). The block's
 * channels are the lanes of one SIMD vector (GCC / Clang vector extensions, 64 bytes: 16 floats or
 * 8 doubles, lowered to whatever SIMD the target has), so every step is a few vector operations per
 * state. Channels past E in the last block are computed as zeros (A = 0, u = 0) and never written.
 * exp and softplus are written out (below) as vector code: measured over their ranges here, exp is
 * within 1 unit in the last place, softplus and its derivative within 4.
 *
 * Threads: each call starts its own POSIX threads and joins them before returning (no pool lives
 * between calls, so a forked process is safe). Work items write disjoint parts of the outputs and
 * every sum runs in a fixed order, so results do not depend on the thread count.
 */
#ifndef SCAN_TYPE

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 256
/* Backward: steps are replayed in segments whose kept states fill about this many elements (512 KiB of
 * floats, L2-sized); a sequence up to a segment long (training patches) needs no checkpoint pass. */
#define SEGMENT_ELEMENTS 131072
#define SOFTPLUS_THRESHOLD 20 /* above it softplus(z) = z, as torch.nn.functional.softplus */
#define MAX_STATE 64 /* d_state and dt_rank limits (scan_kernel.supports checks them) */
#define MAX_RANK 64

typedef struct {
    const void *x, *proj, *dt_w, *dt_b, *A, *D, *gy;
    void *y_parts, *grad_x_parts, *grad_proj_parts, *grad_dt_w_parts, *grad_dt_b_parts, *grad_A_parts,
        *grad_D_parts;
    int64_t batch, height, width, channels, directions, dt_rank, d_state;
    int64_t begin, end; /* this thread's share of the work items */
    int failed;
} Job;

/* Run work(job) on `threads` threads over items [0, total): the calling thread takes the first share. */
static int run_parallel(void *(*work)(void *), const Job *base, int64_t total, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > total) threads = (int)(total > 0 ? total : 1);
    Job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int i = 0; i < threads; ++i) {
        jobs[i] = *base;
        jobs[i].begin = total * i / threads;
        jobs[i].end = total * (i + 1) / threads;
        jobs[i].failed = 0;
    }
    for (int i = 1; i < threads; ++i) started[i] = pthread_create(&ids[i], NULL, work, &jobs[i]) == 0;
    work(&jobs[0]);
    for (int i = 1; i < threads; ++i) {
        if (started[i])
            pthread_join(ids[i], NULL);
        else
            work(&jobs[i]); /* could not start a thread: do its share here */
    }
    int failed = 0;
    for (int i = 0; i < threads; ++i) failed |= jobs[i].failed;
    return failed;
}

/* What one step keeps for the backward: its inputs, then N decays exp(delta A) and N states h_t. */
enum { KEPT_U, KEPT_DELTA, KEPT_SOFTPLUS_GRAD, KEPT_DU, KEPT_DECAYS };

/* The token visited at step t of direction k: 0 row-major, 1 its reverse, 2 column-major, 3 its reverse. */
static inline int64_t token_at(int64_t k, int64_t t, int64_t height, int64_t width) {
    const int64_t length = height * width;
    if (k & 1) t = length - 1 - t;
    return k < 2 ? t : (t % height) * width + t / height;
}

/* 1 / i! for i = 0 .. 13: the Taylor coefficients of exp */
static const double INVERSE_FACTORIALS[14] = {
    1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880,
    1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0,
};

/* float: 16 lanes (one AVX-512 register, two AVX ones); exp's Taylor series to degree 7 and the
 * softplus series to 7 terms reach float's precision on the reduced ranges below. */
#define SCAN_TYPE float
#define SCAN_INT int32_t
#define SCAN_SUFFIX f32
#define LANES 16
#define EXP_TERMS 8
#define LOG1P_TERMS 7
#define EXP_LIMIT 87.0f
#define MANTISSA_BITS 23
#define EXPONENT_BIAS 127
#define LN2_HI 0.693359375f
#define LN2_LO (-2.12194440e-4f)
#include __FILE__
#undef SCAN_TYPE
#undef SCAN_INT
#undef SCAN_SUFFIX
#undef LANES
#undef EXP_TERMS
#undef LOG1P_TERMS
#undef EXP_LIMIT
#undef MANTISSA_BITS
#undef EXPONENT_BIAS
#undef LN2_HI
#undef LN2_LO

/* double: 8 lanes; degree 13 and 17 terms reach double's precision. */
#define SCAN_TYPE double
#define SCAN_INT int64_t
#define SCAN_SUFFIX f64
#define LANES 8
#define EXP_TERMS 14
#define LOG1P_TERMS 17
#define EXP_LIMIT 708.0
#define MANTISSA_BITS 52
#define EXPONENT_BIAS 1023
#define LN2_HI 6.93147180369123816490e-01
#define LN2_LO 1.90821492927058770002e-10
#include __FILE__

#else /* the type-generic part, included once per SCAN_TYPE */

#define T SCAN_TYPE
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SCAN_SUFFIX)
#define V FN(vec)
#define IV FN(ivec)
#define HALF FN(half)
#define QUARTER FN(quarter)

typedef T V __attribute__((vector_size(LANES * sizeof(T))));                 /* one block of channels */
typedef SCAN_INT IV __attribute__((vector_size(LANES * sizeof(T))));         /* comparison masks */
typedef T HALF __attribute__((vector_size(LANES * sizeof(T) / 2)));
typedef T QUARTER __attribute__((vector_size(LANES * sizeof(T) / 4)));

static inline V FN(splat)(T value) {
    V zero = {0};
    return zero + value;
}

static inline V FN(select)(IV mask, V yes, V no) { return (V)(((IV)yes & mask) | ((IV)no & ~mask)); }

/* The sum of the lanes, as a tree (halves, quarters, then the last few). */
static inline T FN(lane_sum)(V v) {
    HALF a, b;
    memcpy(&a, &v, sizeof a);
    memcpy(&b, (char *)&v + sizeof a, sizeof b);
    a += b;
    QUARTER c, d;
    memcpy(&c, &a, sizeof c);
    memcpy(&d, (char *)&a + sizeof c, sizeof d);
    c += d;
    T sum = 0;
    for (int i = 0; i < (int)(sizeof c / sizeof(T)); ++i) sum += c[i];
    return sum;
}

/* exp(x) for x in [-EXP_LIMIT, EXP_LIMIT] (clamped): x = k ln2 + r with |r| <= ln2 / 2, exp(r) by its
 * Taylor series (Horner), 2^k built in the exponent bits. ln2 is split in two (Cody & Waite) so that
 * k LN2_HI is exact. */
static inline V FN(exp_vec)(V x) {
    const V limit = FN(splat)(EXP_LIMIT), zero = FN(splat)(0);
    x = FN(select)(x < -limit, -limit, x);
    x = FN(select)(x > limit, limit, x);
    const V half = FN(select)(x < zero, FN(splat)((T)-0.5), FN(splat)((T)0.5));
    const IV k = __builtin_convertvector(x * (T)1.44269504088896340736 + half, IV);
    const V kf = __builtin_convertvector(k, V);
    const V r = (x - kf * LN2_HI) - kf * LN2_LO;
    V series = FN(splat)((T)INVERSE_FACTORIALS[EXP_TERMS - 1]);
    for (int i = EXP_TERMS - 2; i >= 0; --i) series = series * r + (T)INVERSE_FACTORIALS[i];
    return series * (V)((k + EXPONENT_BIAS) << MANTISSA_BITS);
}

/* softplus(z) = max(z, 0) + log1p(e) with e = exp(-|z|) in (0, 1]; log1p(e) = 2 atanh(s) with
 * s = e / (2 + e) in (0, 1/3], summed as 2 s sum_i s^2i / (2i + 1). Also gives its derivative,
 * sigmoid(z). Above SOFTPLUS_THRESHOLD the value is z and the derivative 1, as in PyTorch. */
static inline V FN(softplus_vec)(V z, V *derivative) {
    const V zero = FN(splat)(0), one = FN(splat)(1);
    const V e = FN(exp_vec)(FN(select)(z < zero, z, -z));
    const V s = e / (e + 2), s2 = s * s;
    V series = FN(splat)((T)1 / (2 * (LOG1P_TERMS - 1) + 1));
    for (int i = LOG1P_TERMS - 2; i >= 0; --i) series = series * s2 + (T)1 / (2 * i + 1);
    const IV above = z > FN(splat)(SOFTPLUS_THRESHOLD);
    const V sigmoid = FN(select)(z >= zero, one, e) / (e + 1);
    *derivative = FN(select)(above, one, sigmoid);
    return FN(select)(above, z, FN(select)(z > zero, z, zero) + 2 * s * series);
}

/* One block of channels of a token row as lanes (zero past the last channel), and back. */
static inline V FN(load)(const T *row, int64_t used) {
    V v = {0};
    if (used == LANES)
        memcpy(&v, row, sizeof v);
    else
        for (int64_t i = 0; i < used; ++i) v[i] = row[i];
    return v;
}

static inline void FN(store)(T *row, V v, int64_t used) {
    if (used == LANES)
        memcpy(row, &v, sizeof v);
    else
        for (int64_t i = 0; i < used; ++i) row[i] = v[i];
}

static void *FN(aligned)(size_t count) {
    const size_t bytes = (count * sizeof(V) + 63) / 64 * 64;
    return aligned_alloc(64, bytes ? bytes : 64);
}

/* The parameters of one direction for one block of channels. */
typedef struct {
    V A[MAX_STATE], dt_w[MAX_RANK], dt_b, D;
} FN(Lanes);

static void FN(load_lanes)(const Job *job, int64_t k, int64_t c0, int64_t used, FN(Lanes) * lanes) {
    const int64_t E = job->channels, N = job->d_state, R = job->dt_rank;
    const T *A = job->A, *dt_w = job->dt_w, *dt_b = job->dt_b, *D = job->D;
    memset(lanes, 0, sizeof(*lanes));
    for (int64_t v = 0; v < used; ++v) {
        const int64_t c = k * E + c0 + v;
        for (int64_t n = 0; n < N; ++n) lanes->A[n][v] = A[c * N + n];
        for (int64_t r = 0; r < R; ++r) lanes->dt_w[r][v] = dt_w[c * R + r];
        lanes->dt_b[v] = dt_b[c];
        lanes->D[v] = D[c];
    }
}

/* h <- exp(delta A) h + delta u B for steps t0 .. t1 - 1 of direction k. Optional outputs: `y`, the
 * outputs <C_t, h_t> + D u_t at their tokens; `kept`, per step (segment-relative, KEPT_DECAYS + 2N
 * vectors) what the backward needs; `checkpoints`, h before every multiple of `segment` steps. */
static void FN(run_steps)(const Job *job, const FN(Lanes) * lanes, int64_t b, int64_t k, int64_t c0, int64_t used,
                          int64_t t0, int64_t t1, V *h, T *y, V *kept, V *checkpoints, int64_t segment) {
    const int64_t H = job->height, W = job->width, L = H * W, E = job->channels, N = job->d_state,
                  R = job->dt_rank;
    const int64_t P = job->directions * (R + 2 * N), stride = KEPT_DECAYS + 2 * N;
    const T *x = job->x, *proj = job->proj;
    for (int64_t t = t0; t < t1; ++t) {
        if (checkpoints && t % segment == 0) memcpy(checkpoints + (t / segment) * N, h, sizeof(V) * N);
        const int64_t p = token_at(k, t, H, W);
        const T *row = proj + (b * L + p) * P + k * (R + 2 * N);
        const V u = FN(load)(x + (b * L + p) * E + c0, used);
        V z = lanes->dt_b, softplus_grad;
        for (int64_t r = 0; r < R; ++r) z += lanes->dt_w[r] * row[r];
        const V delta = FN(softplus_vec)(z, &softplus_grad), du = delta * u;
        if (kept) {
            V *step = kept + (t - t0) * stride;
            step[KEPT_U] = u, step[KEPT_DELTA] = delta, step[KEPT_SOFTPLUS_GRAD] = softplus_grad, step[KEPT_DU] = du;
            V *decays = step + KEPT_DECAYS, *states = decays + N;
            for (int64_t n = 0; n < N; ++n) {
                decays[n] = FN(exp_vec)(delta * lanes->A[n]);
                states[n] = h[n] = decays[n] * h[n] + du * row[R + n];
            }
        } else {
            V acc = lanes->D * u;
            for (int64_t n = 0; n < N; ++n) {
                h[n] = FN(exp_vec)(delta * lanes->A[n]) * h[n] + du * row[R + n];
                acc += h[n] * row[R + N + n];
            }
            if (y) FN(store)(y + (b * L + p) * E + c0, acc, used);
        }
    }
}

static void FN(item)(const Job *job, int64_t item, int64_t *b, int64_t *k, int64_t *c0, int64_t *used) {
    const int64_t K = job->directions, E = job->channels, blocks = (E + LANES - 1) / LANES;
    *k = item % K;
    *c0 = (item / K) % blocks * LANES;
    *b = item / (K * blocks);
    *used = E - *c0 < LANES ? E - *c0 : LANES;
}

static void *FN(forward_work)(void *arg) {
    Job *job = (Job *)arg;
    const int64_t N = job->d_state, slab = job->batch * job->height * job->width * job->channels;
    FN(Lanes) *lanes = FN(aligned)(sizeof(FN(Lanes)) / sizeof(V));
    V *h = FN(aligned)(N);
    if (!(lanes && h)) {
        job->failed = 1;
        job->end = job->begin;
    }
    for (int64_t item = job->begin; item < job->end; ++item) {
        int64_t b, k, c0, used;
        FN(item)(job, item, &b, &k, &c0, &used);
        FN(load_lanes)(job, k, c0, used, lanes);
        memset(h, 0, sizeof(V) * N);
        FN(run_steps)(job, lanes, b, k, c0, used, 0, job->height * job->width, h, (T *)job->y_parts + k * slab,
                      NULL, NULL, 1);
    }
    free(lanes);
    free(h);
    return NULL;
}

/* Steps per segment of the backward's replay for d_state states. */
int64_t FN(cross_scan_segment)(int64_t d_state) {
    const int64_t per_step = (KEPT_DECAYS + 2 * d_state) * LANES;
    return SEGMENT_ELEMENTS / per_step > 0 ? SEGMENT_ELEMENTS / per_step : 1;
}

static void *FN(backward_work)(void *arg) {
    Job *job = (Job *)arg;
    const int64_t H = job->height, W = job->width, L = H * W, E = job->channels, N = job->d_state,
                  R = job->dt_rank, K = job->directions;
    const int64_t P = K * (R + 2 * N), blocks = (E + LANES - 1) / LANES, slab = job->batch * L * E;
    const int64_t stride = KEPT_DECAYS + 2 * N; /* vectors kept per step */
    const int64_t segment = FN(cross_scan_segment)(N);
    const int64_t n_segments = (L + segment - 1) / segment;
    const T *proj = job->proj, *gy = job->gy;
    FN(Lanes) *lanes = FN(aligned)(sizeof(FN(Lanes)) / sizeof(V));
    V *kept = FN(aligned)(segment * stride);
    V *checkpoints = FN(aligned)(n_segments * N);
    V *sums = FN(aligned)(3 * N + R + 2); /* h, the adjoint lam, and the parameter gradients */
    if (!(lanes && kept && checkpoints && sums)) {
        job->failed = 1;
        job->end = job->begin;
    }
    for (int64_t item = job->begin; item < job->end; ++item) {
        int64_t b, k, c0, used;
        FN(item)(job, item, &b, &k, &c0, &used);
        FN(load_lanes)(job, k, c0, used, lanes);
        memset(sums, 0, sizeof(V) * (3 * N + R + 2));
        V *h = sums, *lam = h + N, *grad_A = lam + N, *grad_dt_w = grad_A + N;
        V *grad_dt_b = grad_dt_w + R, *grad_D = grad_dt_b + 1;
        /* the state before every segment (the first one starts from zero) */
        FN(run_steps)(job, lanes, b, k, c0, used, 0, (n_segments - 1) * segment, h, NULL, NULL, checkpoints, segment);
        memcpy(checkpoints + (n_segments - 1) * N, h, sizeof(V) * N);
        T *grad_proj = (T *)job->grad_proj_parts + (b * blocks + c0 / LANES) * L * P;
        T *grad_x = (T *)job->grad_x_parts + k * slab;
        for (int64_t s = n_segments - 1; s >= 0; --s) {
            const int64_t t0 = s * segment, t1 = t0 + segment < L ? t0 + segment : L;
            memcpy(h, checkpoints + s * N, sizeof(V) * N);
            FN(run_steps)(job, lanes, b, k, c0, used, t0, t1, h, NULL, kept, NULL, segment);
            for (int64_t t = t1 - 1; t >= t0; --t) {
                const int64_t i = t - t0, p = token_at(k, t, H, W);
                const T *row = proj + (b * L + p) * P + k * (R + 2 * N);
                T *grad_row = grad_proj + p * P + k * (R + 2 * N);
                const V *step = kept + i * stride, *decays = step + KEPT_DECAYS, *states = decays + N;
                const V *h_prev = i ? kept + (i - 1) * stride + KEPT_DECAYS + N : checkpoints + s * N;
                const V u = step[KEPT_U], delta = step[KEPT_DELTA], du = step[KEPT_DU];
                const V g = FN(load)(gy + (b * L + p) * E + c0, used);
                V d_du = FN(splat)(0), d_delta = FN(splat)(0);
                for (int64_t n = 0; n < N; ++n) {
                    const V lam_t = lam[n] + g * row[R + N + n];               /* dL/dh_t */
                    const V decay_grad = lam_t * decays[n] * h_prev[n];        /* dL/d(delta A) */
                    grad_row[R + n] = FN(lane_sum)(lam_t * du);               /* dL/dB_t */
                    grad_row[R + N + n] = FN(lane_sum)(g * states[n]);        /* dL/dC_t */
                    d_du += lam_t * row[R + n];
                    grad_A[n] += decay_grad * delta;
                    d_delta += decay_grad * lanes->A[n];
                    lam[n] = lam_t * decays[n];
                }
                const V d_z = (d_delta + d_du * u) * step[KEPT_SOFTPLUS_GRAD];
                FN(store)(grad_x + (b * L + p) * E + c0, d_du * delta + g * lanes->D, used);
                *grad_D += g * u;
                *grad_dt_b += d_z;
                for (int64_t r = 0; r < R; ++r) {
                    grad_dt_w[r] += d_z * row[r];
                    grad_row[r] = FN(lane_sum)(d_z * lanes->dt_w[r]);
                }
            }
        }
        /* this item's parameter gradients, summed over the batch by the caller */
        const int64_t base = (b * K + k) * E + c0;
        for (int64_t v = 0; v < used; ++v) {
            for (int64_t n = 0; n < N; ++n) ((T *)job->grad_A_parts)[(base + v) * N + n] = grad_A[n][v];
            for (int64_t r = 0; r < R; ++r) ((T *)job->grad_dt_w_parts)[(base + v) * R + r] = grad_dt_w[r][v];
            ((T *)job->grad_dt_b_parts)[base + v] = (*grad_dt_b)[v];
            ((T *)job->grad_D_parts)[base + v] = (*grad_D)[v];
        }
    }
    free(lanes);
    free(kept);
    free(checkpoints);
    free(sums);
    return NULL;
}

static int64_t FN(items)(const Job *job) {
    return job->batch * job->directions * ((job->channels + LANES - 1) / LANES);
}

int FN(cross_scan_forward)(const T *x, const T *proj, const T *dt_w, const T *dt_b, const T *A, const T *D,
                           T *y_parts, int64_t batch, int64_t height, int64_t width, int64_t channels,
                           int64_t directions, int64_t dt_rank, int64_t d_state, int threads) {
    Job job = {0};
    job.x = x, job.proj = proj, job.dt_w = dt_w, job.dt_b = dt_b, job.A = A, job.D = D, job.y_parts = y_parts;
    job.batch = batch, job.height = height, job.width = width, job.channels = channels;
    job.directions = directions, job.dt_rank = dt_rank, job.d_state = d_state;
    return run_parallel(FN(forward_work), &job, FN(items)(&job), threads);
}

int FN(cross_scan_backward)(const T *x, const T *proj, const T *dt_w, const T *dt_b, const T *A, const T *D,
                            const T *gy, T *grad_x_parts, T *grad_proj_parts, T *grad_dt_w_parts,
                            T *grad_dt_b_parts, T *grad_A_parts, T *grad_D_parts, int64_t batch, int64_t height,
                            int64_t width, int64_t channels, int64_t directions, int64_t dt_rank, int64_t d_state,
                            int threads) {
    Job job = {0};
    job.x = x, job.proj = proj, job.dt_w = dt_w, job.dt_b = dt_b, job.A = A, job.D = D, job.gy = gy;
    job.grad_x_parts = grad_x_parts, job.grad_proj_parts = grad_proj_parts, job.grad_dt_w_parts = grad_dt_w_parts;
    job.grad_dt_b_parts = grad_dt_b_parts, job.grad_A_parts = grad_A_parts, job.grad_D_parts = grad_D_parts;
    job.batch = batch, job.height = height, job.width = width, job.channels = channels;
    job.directions = directions, job.dt_rank = dt_rank, job.d_state = d_state;
    return run_parallel(FN(backward_work), &job, FN(items)(&job), threads);
}

#undef T
#undef FN
#undef V
#undef IV
#undef HALF
#undef QUARTER
#endif

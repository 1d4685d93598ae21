/* The selective scan of ehrsr/blocks/ssm.py as plain loops, compiled on first use (scan_kernel.py).
 *
 * Forward, per sequence (batch b, channel c; g = the channel's group):
 *     h_t = exp(delta_t A_c) h_{t-1} + delta_t u_t B_t        y_t = <C_t, h_t> + D_c u_t
 * Backward: the reverse-time adjoint  lam_t = gy_t C_t + a_{t+1} lam_{t+1}  over states recomputed
 * into a per-sequence buffer, giving every input's gradient in one pass (no autograd graph).
 *
 * Layouts (all contiguous): u, delta, y, gy, grad_u, grad_delta: (b, d, L); A: (d, n); B, C,
 * grad_B, grad_C: (b, g, L, n) (time-major, the caller transposes); D: (d); grad_A_part: (b, d, n)
 * and grad_D_part: (b, d), summed over b by the caller.
 *
 * Threads: each call starts its own POSIX threads and joins them before returning (no pool lives
 * between calls, so a forked process is safe). The forward splits the b*d sequences, the backward
 * the b*g (batch, group) pairs, so that the sums of grad_B / grad_C over a group's channels are
 * written by one thread only. Results do not depend on the thread count.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 256

typedef struct {
    const void *u, *delta, *A, *B, *C, *D, *gy;
    void *y, *grad_u, *grad_delta, *grad_A_part, *grad_B, *grad_C, *grad_D_part;
    int64_t bsz, d, L, n, groups;
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

#define DEFINE_SCAN(T, SUFFIX, EXP)                                                                  \
    static void *forward_work_##SUFFIX(void *arg) {                                                   \
        Job *job = (Job *)arg;                                                                        \
        const int64_t d = job->d, L = job->L, n = job->n, groups = job->groups;                       \
        const int64_t per_group = d / groups;                                                         \
        const T *u = job->u, *delta = job->delta, *A = job->A, *B = job->B, *C = job->C, *D = job->D; \
        T *y = job->y;                                                                                \
        T *h = (T *)malloc(sizeof(T) * n);                                                            \
        if (!h) {                                                                                     \
            job->failed = 1;                                                                          \
            return NULL;                                                                              \
        }                                                                                             \
        for (int64_t row = job->begin; row < job->end; ++row) {                                       \
            const int64_t b = row / d, c = row % d, g = c / per_group;                                \
            const T *ur = u + row * L, *dr = delta + row * L, *Ar = A + c * n;                        \
            const T *Bg = B + (b * groups + g) * L * n, *Cg = C + (b * groups + g) * L * n;           \
            T *yr = y + row * L;                                                                      \
            const T Dc = D[c];                                                                        \
            memset(h, 0, sizeof(T) * n);                                                              \
            for (int64_t t = 0; t < L; ++t) {                                                         \
                const T dt = dr[t], x = dt * ur[t];                                                   \
                const T *Bt = Bg + t * n, *Ct = Cg + t * n;                                           \
                T acc = 0;                                                                            \
                for (int64_t k = 0; k < n; ++k) {                                                     \
                    h[k] = EXP(dt * Ar[k]) * h[k] + x * Bt[k];                                        \
                    acc += h[k] * Ct[k];                                                              \
                }                                                                                     \
                yr[t] = acc + Dc * ur[t];                                                             \
            }                                                                                         \
        }                                                                                             \
        free(h);                                                                                      \
        return NULL;                                                                                  \
    }                                                                                                 \
                                                                                                      \
    static void *backward_work_##SUFFIX(void *arg) {                                                  \
        Job *job = (Job *)arg;                                                                        \
        const int64_t d = job->d, L = job->L, n = job->n, groups = job->groups;                       \
        const int64_t per_group = d / groups;                                                         \
        const T *u = job->u, *delta = job->delta, *A = job->A, *B = job->B, *C = job->C, *D = job->D; \
        const T *gy = job->gy;                                                                        \
        T *grad_u = job->grad_u, *grad_delta = job->grad_delta, *grad_A_part = job->grad_A_part;      \
        T *grad_B = job->grad_B, *grad_C = job->grad_C, *grad_D_part = job->grad_D_part;              \
        /* states h_t and decays a_t of one sequence, the adjoint lam and dA of one channel */        \
        T *H = (T *)malloc(sizeof(T) * L * n), *E = (T *)malloc(sizeof(T) * L * n);                   \
        T *lam = (T *)malloc(sizeof(T) * n), *gA = (T *)malloc(sizeof(T) * n);                        \
        if (!(H && E && lam && gA)) {                                                                 \
            job->failed = 1;                                                                          \
            job->end = job->begin;                                                                    \
        }                                                                                             \
        for (int64_t bg = job->begin; bg < job->end; ++bg) {                                          \
            const int64_t b = bg / groups, g = bg % groups;                                           \
            const T *Bg = B + bg * L * n, *Cg = C + bg * L * n;                                       \
            T *gBg = grad_B + bg * L * n, *gCg = grad_C + bg * L * n;                                 \
            memset(gBg, 0, sizeof(T) * L * n);                                                        \
            memset(gCg, 0, sizeof(T) * L * n);                                                        \
            for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {                           \
                const int64_t row = b * d + c;                                                        \
                const T *ur = u + row * L, *dr = delta + row * L, *gyr = gy + row * L;                \
                const T *Ar = A + c * n;                                                              \
                const T Dc = D[c];                                                                    \
                T *gur = grad_u + row * L, *gdr = grad_delta + row * L;                               \
                /* the forward again, keeping every state and decay of this sequence */               \
                for (int64_t t = 0; t < L; ++t) {                                                     \
                    const T dt = dr[t], x = dt * ur[t];                                               \
                    const T *Bt = Bg + t * n;                                                         \
                    T *Ht = H + t * n, *Et = E + t * n;                                               \
                    for (int64_t k = 0; k < n; ++k) {                                                 \
                        Et[k] = EXP(dt * Ar[k]);                                                      \
                        Ht[k] = (t ? Et[k] * Ht[k - n] : 0) + x * Bt[k];                              \
                    }                                                                                 \
                }                                                                                     \
                memset(lam, 0, sizeof(T) * n);                                                        \
                memset(gA, 0, sizeof(T) * n);                                                         \
                T gD = 0;                                                                             \
                for (int64_t t = L - 1; t >= 0; --t) {                                                \
                    const T g_y = gyr[t], dt = dr[t], ut = ur[t], x = dt * ut;                        \
                    const T *Bt = Bg + t * n, *Ct = Cg + t * n, *Ht = H + t * n, *Et = E + t * n;     \
                    T *gBt = gBg + t * n, *gCt = gCg + t * n;                                         \
                    T d_x = 0, d_dt = 0;                                                              \
                    for (int64_t k = 0; k < n; ++k) {                                                 \
                        lam[k] += g_y * Ct[k];                                                        \
                        gCt[k] += g_y * Ht[k];                                                        \
                        gBt[k] += lam[k] * x;                                                         \
                        d_x += lam[k] * Bt[k];                                                        \
                        const T decay_grad = t ? lam[k] * Et[k] * Ht[k - n] : 0;                      \
                        gA[k] += decay_grad * dt;                                                     \
                        d_dt += decay_grad * Ar[k];                                                   \
                        lam[k] *= Et[k];                                                              \
                    }                                                                                 \
                    gdr[t] = d_dt + d_x * ut;                                                         \
                    gur[t] = d_x * dt + g_y * Dc;                                                     \
                    gD += g_y * ut;                                                                   \
                }                                                                                     \
                memcpy(grad_A_part + row * n, gA, sizeof(T) * n);                                     \
                grad_D_part[row] = gD;                                                                \
            }                                                                                         \
        }                                                                                             \
        free(H);                                                                                      \
        free(E);                                                                                      \
        free(lam);                                                                                    \
        free(gA);                                                                                     \
        return NULL;                                                                                  \
    }                                                                                                 \
                                                                                                      \
    int scan_forward_##SUFFIX(const T *u, const T *delta, const T *A, const T *B, const T *C,       \
                              const T *D, T *y, int64_t bsz, int64_t d, int64_t L, int64_t n,         \
                              int64_t groups, int threads) {                                          \
        Job job = {0};                                                                                \
        job.u = u, job.delta = delta, job.A = A, job.B = B, job.C = C, job.D = D, job.y = y;          \
        job.bsz = bsz, job.d = d, job.L = L, job.n = n, job.groups = groups;                          \
        return run_parallel(forward_work_##SUFFIX, &job, bsz * d, threads);                           \
    }                                                                                                 \
                                                                                                      \
    int scan_backward_##SUFFIX(const T *u, const T *delta, const T *A, const T *B, const T *C,      \
                               const T *D, const T *gy, T *grad_u, T *grad_delta, T *grad_A_part,     \
                               T *grad_B, T *grad_C, T *grad_D_part, int64_t bsz, int64_t d,          \
                               int64_t L, int64_t n, int64_t groups, int threads) {                   \
        Job job = {0};                                                                                \
        job.u = u, job.delta = delta, job.A = A, job.B = B, job.C = C, job.D = D, job.gy = gy;        \
        job.grad_u = grad_u, job.grad_delta = grad_delta, job.grad_A_part = grad_A_part;              \
        job.grad_B = grad_B, job.grad_C = grad_C, job.grad_D_part = grad_D_part;                      \
        job.bsz = bsz, job.d = d, job.L = L, job.n = n, job.groups = groups;                          \
        return run_parallel(backward_work_##SUFFIX, &job, bsz * groups, threads);                     \
    }

DEFINE_SCAN(float, f32, expf)
DEFINE_SCAN(double, f64, exp)

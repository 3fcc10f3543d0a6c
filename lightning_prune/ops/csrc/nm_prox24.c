/* 2:4 proximal operator of the ProxSparse regulariser lam * e_3(|w_g|), float32, CPU.

   Built on first use by lightning_prune/ops/nm_prox_native.py with the system C compiler and
   loaded through ctypes.  Same algorithm as the vectorised torch path (nm_prox_torch.py):
   sort each group of 4 magnitudes, solve the candidates supported on the top 2 (closed form),
   top 3 and all 4 entries (best uniform shrink, damped Jacobi warm-up where the support problem
   is not certified convex, then Gauss-Seidel coordinate descent) and keep the lowest objective.
   The builder passes WARM_ITERS and WARM_DAMP (the warm-up constants of the torch path). */
#ifndef WARM_ITERS
#error "compile with -DWARM_ITERS=<warm-up iterations>"
#endif
#ifndef WARM_DAMP
#error "compile with -DWARM_DAMP=<warm-up damping>f"
#endif

#include <stdint.h>
#include <math.h>

/* Groups are processed in blocks of B with a structure-of-arrays layout so that the compiler
   vectorises every inner loop; a block stops sweeping once all its groups have converged. */
#define B 32
#define EPS4 (4.0f * 1.1920928955078125e-07f)

static inline float rl(float x) { return x > 0.0f ? x : 0.0f; }
static inline float mx(float a, float b) { return a > b ? a : b; }
static inline float mn(float a, float b) { return a < b ? a : b; }

static void prox24_block(const float* z, float* out, int nb, const float* lg, int max_sweeps,
                         float tol)
{
    float x0[B], x1[B], x2[B], x3[B], s0[B], s1[B], s2[B], s3[B], l[B], te[B];
    float u0[B], u1[B], u2[B], v0[B], v1[B], v2[B], v3[B];
    int r0[B], r1[B], r2[B], r3[B], nc3[B], nc4[B];
    if (nb == B) {
        for (int j = 0; j < B; ++j) {
            x0[j] = z[4 * j]; x1[j] = z[4 * j + 1]; x2[j] = z[4 * j + 2]; x3[j] = z[4 * j + 3];
            l[j] = lg[j];
        }
    } else { /* tail block: pad with zero groups (they converge at once) */
        for (int j = 0; j < B; ++j) {
            int ok = j < nb;
            x0[j] = ok ? z[4 * j] : 0.0f; x1[j] = ok ? z[4 * j + 1] : 0.0f;
            x2[j] = ok ? z[4 * j + 2] : 0.0f; x3[j] = ok ? z[4 * j + 3] : 0.0f;
            l[j] = ok ? lg[j] : 0.0f;
        }
    }
    /* ranks (0 = largest, ties -> lower index) and a descending sorting network */
    for (int j = 0; j < B; ++j) {
        float a0 = fabsf(x0[j]), a1 = fabsf(x1[j]), a2 = fabsf(x2[j]), a3 = fabsf(x3[j]);
        int c01 = a0 >= a1, c02 = a0 >= a2, c03 = a0 >= a3;
        int c12 = a1 >= a2, c13 = a1 >= a3, c23 = a2 >= a3;
        r0[j] = 3 - c01 - c02 - c03;
        r1[j] = 2 + c01 - c12 - c13;
        r2[j] = 1 + c02 + c12 - c23;
        r3[j] = c03 + c13 + c23;
        float h01 = mx(a0, a1), l01 = mn(a0, a1), h23 = mx(a2, a3), l23 = mn(a2, a3);
        float t1 = mn(h01, h23), t2 = mx(l01, l23);
        s0[j] = mx(h01, h23); s3[j] = mn(l01, l23);
        s1[j] = mx(t1, t2); s2[j] = mn(t1, t2);
        te[j] = tol + EPS4 * s0[j];
    }
    /* starts: best uniform shrink rho * s (closed form for n = 2); flag the groups whose
       support problem is not certified convex (Gershgorin bound) for a Jacobi warm-up */
    int any3 = 0, any4 = 0;
    for (int j = 0; j < B; ++j) {
        float a3s = s0[j] * s0[j] + s1[j] * s1[j] + s2[j] * s2[j], a4s = a3s + s3[j] * s3[j];
        float e3 = s0[j] * s1[j] * s2[j];
        float e4 = s0[j] * s1[j] * (s2[j] + s3[j]) + s2[j] * s3[j] * (s0[j] + s1[j]);
        float q3 = sqrtf(a3s), q4 = sqrtf(a4s);
        float rho3 = a3s > 0.0f ? 2.0f * q3 / (q3 + sqrtf(a3s + 12.0f * l[j] * e3)) : 1.0f;
        float rho4 = a4s > 0.0f ? 2.0f * q4 / (q4 + sqrtf(a4s + 12.0f * l[j] * e4)) : 1.0f;
        u0[j] = rho3 * s0[j]; u1[j] = rho3 * s1[j]; u2[j] = rho3 * s2[j];
        v0[j] = rho4 * s0[j]; v1[j] = rho4 * s1[j]; v2[j] = rho4 * s2[j]; v3[j] = rho4 * s3[j];
        nc3[j] = l[j] * (s0[j] + s1[j]) > 1.0f;
        nc4[j] = 2.0f * l[j] * (s0[j] + s1[j] + s2[j]) > 1.0f;
        any3 |= nc3[j]; any4 |= nc4[j];
    }
    for (int it = 0; any3 && it < WARM_ITERS; ++it) {
        for (int j = 0; j < B; ++j) {
            float b = nc3[j] ? WARM_DAMP : 0.0f;
            float n0 = rl(s0[j] - l[j] * (u1[j] * u2[j]));
            float n1 = rl(s1[j] - l[j] * (u0[j] * u2[j]));
            float n2 = rl(s2[j] - l[j] * (u0[j] * u1[j]));
            u0[j] += b * (n0 - u0[j]); u1[j] += b * (n1 - u1[j]); u2[j] += b * (n2 - u2[j]);
        }
    }
    for (int it = 0; any4 && it < WARM_ITERS; ++it) {
        for (int j = 0; j < B; ++j) {
            float b = nc4[j] ? WARM_DAMP : 0.0f;
            float p0 = v0[j], p1 = v1[j], p2 = v2[j], p3 = v3[j];
            float n0 = rl(s0[j] - l[j] * (p1 * p2 + p3 * (p1 + p2)));
            float n1 = rl(s1[j] - l[j] * (p0 * p2 + p3 * (p0 + p2)));
            float n2 = rl(s2[j] - l[j] * (p0 * p1 + p3 * (p0 + p1)));
            float n3 = rl(s3[j] - l[j] * (p0 * p1 + p2 * (p0 + p1)));
            v0[j] = p0 + b * (n0 - p0); v1[j] = p1 + b * (n1 - p1);
            v2[j] = p2 + b * (n2 - p2); v3[j] = p3 + b * (n3 - p3);
        }
    }
    /* candidates k=3 (u, top-3 support) and k=4 (v): Gauss-Seidel coordinate descent */
    for (int it = 0; it < max_sweeps; ++it) {
        int go = 0;
        for (int j = 0; j < B; ++j) {
            float p0 = u0[j], p1 = u1[j], p2 = u2[j];
            float n0 = rl(s0[j] - l[j] * (p1 * p2));
            float n1 = rl(s1[j] - l[j] * (n0 * p2));
            float n2 = rl(s2[j] - l[j] * (n0 * n1));
            float d = mx(mx(fabsf(n0 - p0), fabsf(n1 - p1)), fabsf(n2 - p2));
            u0[j] = n0; u1[j] = n1; u2[j] = n2;
            float q0 = v0[j], q1 = v1[j], q2 = v2[j], q3 = v3[j];
            float m0 = rl(s0[j] - l[j] * (q1 * q2 + q3 * (q1 + q2)));
            float m1 = rl(s1[j] - l[j] * (m0 * q2 + q3 * (m0 + q2)));
            float m2 = rl(s2[j] - l[j] * (m0 * m1 + q3 * (m0 + m1)));
            float m3 = rl(s3[j] - l[j] * (m0 * m1 + m2 * (m0 + m1)));
            d = mx(d, mx(mx(fabsf(m0 - q0), fabsf(m1 - q1)), mx(fabsf(m2 - q2), fabsf(m3 - q3))));
            v0[j] = m0; v1[j] = m1; v2[j] = m2; v3[j] = m3;
            go |= d > te[j];
        }
        if (!go) break;
    }
    /* objectives, best candidate (ties -> sparser), unsort, signs */
    for (int j = 0; j < B; ++j) {
        float e0 = u0[j] - s0[j], e1 = u1[j] - s1[j], e2 = u2[j] - s2[j];
        float g0 = v0[j] - s0[j], g1 = v1[j] - s1[j], g2 = v2[j] - s2[j], g3 = v3[j] - s3[j];
        float f2 = 0.5f * (s2[j] * s2[j] + s3[j] * s3[j]);
        float f3 = 0.5f * (e0 * e0 + e1 * e1 + e2 * e2 + s3[j] * s3[j])
                   + l[j] * (u0[j] * u1[j] * u2[j]);
        float f4 = 0.5f * (g0 * g0 + g1 * g1 + g2 * g2 + g3 * g3)
                   + l[j] * (v0[j] * v1[j] * (v2[j] + v3[j]) + v2[j] * v3[j] * (v0[j] + v1[j]));
        int b3 = f3 < f2;
        int b4 = f4 < mn(f2, f3);
        float w0 = b4 ? v0[j] : (b3 ? u0[j] : s0[j]);
        float w1 = b4 ? v1[j] : (b3 ? u1[j] : s1[j]);
        float w2 = b4 ? v2[j] : (b3 ? u2[j] : 0.0f);
        float w3 = b4 ? v3[j] : 0.0f;
        int q;
        q = r0[j]; x0[j] = copysignf(q == 0 ? w0 : q == 1 ? w1 : q == 2 ? w2 : w3, x0[j]);
        q = r1[j]; x1[j] = copysignf(q == 0 ? w0 : q == 1 ? w1 : q == 2 ? w2 : w3, x1[j]);
        q = r2[j]; x2[j] = copysignf(q == 0 ? w0 : q == 1 ? w1 : q == 2 ? w2 : w3, x2[j]);
        q = r3[j]; x3[j] = copysignf(q == 0 ? w0 : q == 1 ? w1 : q == 2 ? w2 : w3, x3[j]);
    }
    if (nb == B) {
        for (int j = 0; j < B; ++j) {
            out[4 * j] = x0[j]; out[4 * j + 1] = x1[j];
            out[4 * j + 2] = x2[j]; out[4 * j + 3] = x3[j];
        }
    } else {
        for (int j = 0; j < nb; ++j) {
            out[4 * j] = x0[j]; out[4 * j + 1] = x1[j];
            out[4 * j + 2] = x2[j]; out[4 * j + 3] = x3[j];
        }
    }
}

/* Groups [g_begin, g_end) of a contiguous [rows, C, 4] float32 tensor (out may alias z);
   the lambda of group (r, c) is lam[r * ls0 + c * ls1]. */
void lp_nm_prox24_f32(const float* z, float* out, int64_t g_begin, int64_t g_end, int64_t C,
                      const float* lam, int64_t ls0, int64_t ls1, int32_t max_sweeps, float tol)
{
    float lg[B];
    int64_t r = g_begin / C, c = g_begin % C;
    for (int64_t g = g_begin; g < g_end; g += B) {
        int nb = (g_end - g) < B ? (int)(g_end - g) : B;
        for (int j = 0; j < nb; ++j) {
            lg[j] = lam[r * ls0 + c * ls1];
            if (++c == C) { c = 0; ++r; }
        }
        prox24_block(z + 4 * g, out + 4 * g, nb, lg, max_sweeps, tol);
    }
}

/*
 * cpu_sel_bench.c — CPU selection attention benchmark (not a test).
 *
 * Prints plan time (v1 host loop, v2 data-parallel) and per-path forward
 * (and with --bwd, backward) time for a mid-size NSA case:
 *   T = S = Skv = 4096, G = 4, h = 4 (H = 16), Dk = Dv = 64, block 64, n = 16
 * Each query selects its own (local) block plus 15 distinct random causal
 * blocks, as NSA's top-n does. Times are the median of --runs runs.
 *
 * usage: nsa_bench_cpu [--T N] [--runs N] [--dtype f32|bf16|f16] [--bwd]
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nsa/sel_attn.h"

#ifdef _OPENMP
#include <omp.h>
#endif

static uint64_t g_rng = 0x1234567ull;
static uint64_t rnd(void) {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 7;
  g_rng ^= g_rng << 17;
  return g_rng;
}
static float frand(void) { return (float)((double)(rnd() >> 11) * 0x1p-53 * 2.0 - 1.0); }

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}
static double median(double *v, int n) {
  qsort(v, (size_t)n, sizeof(double), cmp_d);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void *tensor(nsa_tensor_t *t, nsa_dtype_t dt, int nd, const int64_t *shape, int fill) {
  memset(t, 0, sizeof(*t));
  t->dtype = dt;
  t->ndim = nd;
  int64_t n = 1;
  for (int i = 0; i < nd; i++) n *= (t->shape[i] = shape[i]);
  nsa_tensor_set_contiguous(t);
  t->data = malloc((size_t)n * nsa_dtype_size(dt));
  if (!t->data) {
    fprintf(stderr, "out of memory\n");
    exit(1);
  }
  if (fill)
    for (int64_t i = 0; i < n; i++) {
      float x = frand();
      if (dt == NSA_F32) ((float *)t->data)[i] = x;
      if (dt == NSA_BF16) ((uint16_t *)t->data)[i] = nsa_f32_to_bf16(x);
      if (dt == NSA_F16) ((uint16_t *)t->data)[i] = nsa_f32_to_f16(x);
    }
  return t->data;
}

int main(int argc, char **argv) {
  int64_t T = 4096, G = 4, h = 4, D = 64, n = 16;
  int32_t bs = 64;
  int runs = 3, do_bwd = 0;
  nsa_dtype_t dt = NSA_F32;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--T") && i + 1 < argc) T = atoll(argv[++i]);
    else if (!strcmp(argv[i], "--runs") && i + 1 < argc) runs = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--bwd")) do_bwd = 1;
    else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) {
      const char *s = argv[++i];
      if (nsa_dtype_parse(s, strlen(s), &dt) != 0 || dt == NSA_I32) {
        fprintf(stderr, "bad dtype %s\n", s);
        return 2;
      }
    } else {
      fprintf(stderr, "usage: %s [--T N] [--runs N] [--dtype f32|bf16|f16] [--bwd]\n", argv[0]);
      return 2;
    }
  }
  if (runs < 1) runs = 1;
  const int64_t H = G * h, B = 1, S = T, Skv = T;
  nsa_tensor_t q, k, v, o, lse, sel, dout, dq, dk, dv;
  tensor(&q, dt, 4, (int64_t[]){B, S, H, D}, 1);
  tensor(&k, dt, 4, (int64_t[]){B, Skv, G, D}, 1);
  tensor(&v, dt, 4, (int64_t[]){B, Skv, G, D}, 1);
  tensor(&o, dt, 4, (int64_t[]){B, S, H, D}, 0);
  tensor(&lse, NSA_F32, 3, (int64_t[]){B, S, H}, 0);
  int32_t *ids = tensor(&sel, NSA_I32, 4, (int64_t[]){B, S, G, n}, 0);
  for (int64_t t = 0; t < S; t++)
    for (int64_t g = 0; g < G; g++) {
      int32_t *row = ids + (t * G + g) * n;
      int32_t own = (int32_t)(t / bs);
      row[0] = own;
      for (int64_t i = 1; i < n; i++) {
        if (own + 1 <= i) { /* fewer causal blocks than slots */
          row[i] = -1;
          continue;
        }
        int32_t id;
        int dup;
        do { /* distinct causal block */
          id = (int32_t)(rnd() % (uint64_t)(own + 1));
          dup = 0;
          for (int64_t j = 0; j < i; j++) dup |= row[j] == id;
        } while (dup);
        row[i] = id;
      }
    }
  nsa_selection_t s = {.kind = NSA_SEL_BLOCK_INDICES, .t = sel, .block_size = bs};
  nsa_fwd_args_t fa = {.q = q, .k = k, .v = v, .o = o, .lse = lse, .sel = s, .scale = 0};
  char msg[256];
  nsa_dims_t d;
  if (nsa_fwd_check(&fa, &d, msg, sizeof msg) != NSA_OK) {
    fprintf(stderr, "check: %s\n", msg);
    return 1;
  }
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  printf("nsa_bench_cpu: T=%lld G=%lld h=%lld D=%lld block=%d n=%lld dtype=%s threads=%d runs=%d\n",
         (long long)T, (long long)G, (long long)h, (long long)D, bs, (long long)n,
         nsa_dtype_name(dt), threads, runs);

  /* planners alone */
  nsa_plan_layout_t lay;
  void *pbuf = malloc(nsa_plan_layout(d.rows, d.n, &lay));
  nsa_plan_t plan;
  double tv[2][64];
  for (int r = 0; r < runs && r < 64; r++)
    for (int p = 0; p < 2; p++) {
      nsa_plan_bind(&plan, pbuf, d.rows, d.n);
      double t0 = now_ms();
      if (p == 0)
        nsa_cpu_plan_v1(&s, &d, &plan);
      else
        nsa_cpu_plan_v2(&s, &d, &plan);
      tv[p][r] = now_ms() - t0;
    }
  int nr = runs < 64 ? runs : 64;
  printf("rows %lld  total keys %lld  mean len %.1f  max len %d\n", (long long)d.rows,
         (long long)plan.total_len, (double)plan.total_len / (double)d.rows, plan.max_len);
  printf("%-12s %10.3f ms\n%-12s %10.3f ms\n", "plan v1", median(tv[0], nr), "plan v2",
         median(tv[1], nr));
  /* useful flops of the forward: per key and head, q.k (2D) + p*v (2D) */
  double flops = (double)plan.total_len * (double)h * 4.0 * (double)D;
  free(pbuf);

  printf("%-12s %12s %12s %10s %14s\n", "path", "fwd ms", "plan ms", "GFLOP/s", "workspace B");
  const nsa_path_t paths[] = {NSA_PATH_VARLEN_V2, NSA_PATH_VARLEN_V1, NSA_PATH_PACKED};
  for (int pi = 0; pi < 3; pi++) {
    double tt[64], tp[64];
    nsa_run_info_t info;
    for (int r = 0; r < nr; r++) {
      int rc = nsa_cpu_sel_fwd(&fa, NULL, paths[pi], &info, msg, sizeof msg);
      if (rc != NSA_OK) {
        fprintf(stderr, "%s: %s\n", nsa_path_name(paths[pi]), msg);
        return 1;
      }
      tt[r] = info.device_us * 1e-3;
      tp[r] = info.plan_us * 1e-3;
    }
    double mt = median(tt, nr);
    printf("%-12s %12.2f %12.3f %10.2f %14zu\n", nsa_path_name(paths[pi]), mt, median(tp, nr),
           flops / (mt * 1e6), info.workspace_bytes);
  }

  if (do_bwd) {
    tensor(&dout, dt, 4, (int64_t[]){B, S, H, D}, 1);
    tensor(&dq, dt, 4, (int64_t[]){B, S, H, D}, 0);
    tensor(&dk, dt, 4, (int64_t[]){B, Skv, G, D}, 0);
    tensor(&dv, dt, 4, (int64_t[]){B, Skv, G, D}, 0);
    nsa_bwd_args_t ba = {.q = q, .k = k, .v = v, .o = o, .lse = lse, .dout = dout,
                         .dq = dq, .dk = dk, .dv = dv, .sel = s, .scale = 0};
    printf("%-12s %12s\n", "path", "bwd ms");
    for (int pi = 0; pi < 3; pi++) {
      double tt[64];
      nsa_run_info_t info;
      for (int r = 0; r < nr; r++) {
        if (nsa_cpu_sel_bwd(&ba, NULL, paths[pi], &info, msg, sizeof msg) != NSA_OK) {
          fprintf(stderr, "%s: %s\n", nsa_path_name(paths[pi]), msg);
          return 1;
        }
        tt[r] = info.device_us * 1e-3;
      }
      printf("%-12s %12.2f\n", nsa_path_name(paths[pi]), median(tt, nr));
    }
    free(dout.data);
    free(dq.data);
    free(dk.data);
    free(dv.data);
  }
  free(q.data);
  free(k.data);
  free(v.data);
  free(o.data);
  free(lse.data);
  free(sel.data);
  return 0;
}

/*
 * cuda_bench.c — CUDA selection-attention forward benchmark (issue 7 configs).
 *
 *   build/bin/nsa_bench_cuda [--quick] [--reps N] [--csv FILE] [--no-pack] [--small-h]
 * --quick: T = 16k only; --small-h: h in {1, 4} only; --no-pack: one query per
 * MMA tile even when h < 16 (to measure what query packing buys); --qt1: one
 * 16-row query tile per CTA, --qt2: two where Dv <= 128 (default: auto);
 * --stages2: two-stage K/V ring; --nohint: no L2 cache policies;
 * --one T h corr: one config (corr -1 = both patterns; for A/B runs and ncu).
 *
 * One sequence (B = 1), S = Skv = T, G = 4 KV heads, block 64, n = 16
 * selected blocks, bf16. Selections: "random" (block 0, the query's own block
 * and 14 distinct random earlier blocks per query) and "corr" (all 64 queries
 * of a query block share one selection, as trained models mostly do).
 * For each config: v2 forward time (whole request: device planner + group
 * planner + kernel, sync=0 on the context stream, CUDA events per rep,
 * median after warm-up), planner alone, TFLOP/s counted on the real keys
 * (2 * h * (Dk + Dv) * sum of row lengths per group), workspace bytes.
 * Peers are NOT run here.
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nsa/sel_attn_cuda.h"

#define CKC(x)                                                                             \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      exit(1);                                                                             \
    }                                                                                      \
  } while (0)

static uint64_t rng_s = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
  uint64_t z = (rng_s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static uint16_t bf16_of(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

static void *dev_random_bf16(size_t n) {
  uint16_t *h = malloc(n * 2);
  for (size_t i = 0; i < n; i++) h[i] = bf16_of((float)((rnd() >> 11) * (1.0 / 9007199254740992.0)) * 2.f - 1.f);
  void *d;
  CKC(cudaMalloc(&d, n * 2));
  CKC(cudaMemcpy(d, h, n * 2, cudaMemcpyHostToDevice));
  free(h);
  return d;
}

/* ids [T][G][n]: block 0, own block, then distinct random earlier blocks. */
static void make_sel(int32_t *ids, int64_t T, int64_t G, int64_t n, int bs, int corr) {
  int32_t *set = malloc(sizeof(int32_t) * n);
  for (int64_t t = 0; t < T; t++)
    for (int64_t g = 0; g < G; g++) {
      int32_t *row = ids + (t * G + g) * n;
      if (corr && t % bs != 0) { /* same as the first query of its query block */
        memcpy(row, ids + ((t - t % bs) * G + g) * n, sizeof(int32_t) * n);
        continue;
      }
      int64_t own = t / bs;
      int k = 0;
      set[k++] = 0;
      if (own != 0) set[k++] = (int32_t)own;
      int64_t avail = own + 1;  /* blocks 0..own */
      int64_t want = n < avail ? n : avail;
      int guard = 0;
      while (k < want && guard++ < 1000) {
        int32_t b = (int32_t)(rnd() % (uint64_t)avail);
        int dup = 0;
        for (int i = 0; i < k; i++) dup |= set[i] == b;
        if (!dup) set[k++] = b;
      }
      for (int i = 0; i < n; i++) row[i] = i < k ? set[i] : -1;
    }
  free(set);
}

static int cmpf(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return x < y ? -1 : x > y;
}

static void tensor4(nsa_tensor_t *t, void *d, nsa_dtype_t dt, int64_t a, int64_t b, int64_t c, int64_t e) {
  memset(t, 0, sizeof(*t));
  t->data = d;
  t->dtype = dt;
  t->ndim = 4;
  t->shape[0] = a, t->shape[1] = b, t->shape[2] = c, t->shape[3] = e;
  nsa_tensor_set_contiguous(t);
}

int main(int argc, char **argv) {
  int quick = 0, reps = 20, small_h = 0, one_corr = -1;
  long long one_T = 0, one_h = 0; /* --one T h corr: a single config (for profilers) */
  const char *csv = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--quick")) quick = 1;
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--csv") && i + 1 < argc) csv = argv[++i];
    else if (!strcmp(argv[i], "--no-pack")) setenv("NSA_CUDA_NO_PACK", "1", 1);
    else if (!strcmp(argv[i], "--small-h")) small_h = 1;
    else if (!strcmp(argv[i], "--qt1")) setenv("NSA_CUDA_QTILES", "1", 1);
    else if (!strcmp(argv[i], "--qt2")) setenv("NSA_CUDA_QTILES", "2", 1);
    else if (!strcmp(argv[i], "--stages2")) setenv("NSA_CUDA_STAGES", "2", 1);
    else if (!strcmp(argv[i], "--nohint")) setenv("NSA_CUDA_L2HINT", "0", 1);
    else if (!strcmp(argv[i], "--one") && i + 3 < argc) {
      one_T = atoll(argv[++i]);
      one_h = atoll(argv[++i]);
      one_corr = atoi(argv[++i]);
    }
  }
  if (nsa_cuda_device_count() == 0) {
    printf("nsa_bench_cuda: no CUDA device, nothing to time\n");
    return 0;
  }
  char name[256];
  nsa_cuda_device_name(0, name, sizeof name);
  printf("device: %s\n", name);
  FILE *fc = csv ? fopen(csv, "w") : NULL;
  if (fc) fprintf(fc, "T,h,Dk,Dv,sel,fwd_ms,plan_ms,tflops,mean_len,workspace_bytes\n");

  char msg[512];
  nsa_cuda_ctx_t *ctx;
  if (nsa_cuda_ctx_create(0, 0, &ctx, msg, sizeof msg)) {
    fprintf(stderr, "ctx: %s\n", msg);
    return 1;
  }
  cudaStream_t st = (cudaStream_t)nsa_cuda_ctx_stream(ctx);
  cudaEvent_t e0[64], e1[64];
  for (int i = 0; i < 64; i++) {
    CKC(cudaEventCreate(&e0[i]));
    CKC(cudaEventCreate(&e1[i]));
  }
  if (reps > 64) reps = 64;

  const int64_t Ts_full[] = {8192, 16384, 65536}, Ts_quick[] = {16384};
  const int64_t *Ts = quick ? Ts_quick : Ts_full;
  const int nT = quick ? 1 : 3;
  const int64_t hs[] = {1, 4, 8, 16};
  const int64_t G = 4, n = 16;
  const int bs = 64;
  printf("%6s %3s %4s %4s %6s | %9s %9s %8s %8s %12s\n", "T", "h", "Dk", "Dv", "sel", "fwd_ms",
         "plan_ms", "TFLOP/s", "mean_L", "ws_bytes");
  for (int ti = 0; ti < nT; ti++) {
    const int64_t T = one_T ? one_T : Ts[ti];
    if (one_T && ti > 0) break;
    int32_t *hsel = malloc(sizeof(int32_t) * T * G * n);
    void *dsel;
    CKC(cudaMalloc(&dsel, sizeof(int32_t) * T * G * n));
    for (int dkv = 0; dkv < 2; dkv++) {
      const int64_t Dk = dkv ? 192 : 128, Dv = 128;
      if (dkv && (T != 16384 || one_T)) continue; /* Dk = 192 at T = 16k only */
      void *k = dev_random_bf16((size_t)T * G * Dk), *v = dev_random_bf16((size_t)T * G * Dv);
      for (size_t hi = 0; hi < (small_h ? 2 : 4); hi++) {
        const int64_t h = hs[hi], H = G * h;
        if (one_h && h != one_h) continue;
        void *q = dev_random_bf16((size_t)T * H * Dk), *o;
        float *lse;
        CKC(cudaMalloc(&o, (size_t)T * H * Dv * 2));
        CKC(cudaMalloc((void **)&lse, (size_t)T * H * 4));
        for (int corr = 0; corr < 2; corr++) {
          if (one_corr >= 0 && corr != one_corr) continue;
          make_sel(hsel, T, G, n, bs, corr);
          CKC(cudaMemcpy(dsel, hsel, sizeof(int32_t) * T * G * n, cudaMemcpyHostToDevice));
          nsa_fwd_args_t a;
          memset(&a, 0, sizeof a);
          tensor4(&a.q, q, NSA_BF16, 1, T, H, Dk);
          tensor4(&a.k, k, NSA_BF16, 1, T, G, Dk);
          tensor4(&a.v, v, NSA_BF16, 1, T, G, Dv);
          tensor4(&a.o, o, NSA_BF16, 1, T, H, Dv);
          memset(&a.lse, 0, sizeof a.lse);
          a.lse.data = lse, a.lse.dtype = NSA_F32, a.lse.ndim = 3;
          a.lse.shape[0] = 1, a.lse.shape[1] = T, a.lse.shape[2] = H;
          nsa_tensor_set_contiguous(&a.lse);
          tensor4(&a.sel.t, dsel, NSA_I32, 1, T, G, n);
          a.sel.kind = NSA_SEL_BLOCK_INDICES;
          a.sel.block_size = bs;
          nsa_run_info_t info;
          nsa_cuda_exec_t sync1 = {.sync = 1}, sync0 = {.sync = 0};
          int rc = nsa_cuda_sel_fwd(ctx, &a, NULL, NSA_PATH_VARLEN_V2, &sync1, &info, msg, sizeof msg);
          if (rc) {
            printf("T=%lld h=%lld: rc %d %s\n", (long long)T, (long long)h, rc, msg);
            continue;
          }
          float ms[64], pms[64];
          for (int w = 0; w < 3; w++)
            nsa_cuda_sel_fwd(ctx, &a, NULL, NSA_PATH_VARLEN_V2, &sync0, NULL, msg, sizeof msg);
          for (int r = 0; r < reps; r++) {
            CKC(cudaEventRecord(e0[r], st));
            nsa_cuda_sel_fwd(ctx, &a, NULL, NSA_PATH_VARLEN_V2, &sync0, NULL, msg, sizeof msg);
            CKC(cudaEventRecord(e1[r], st));
          }
          CKC(cudaStreamSynchronize(st));
          for (int r = 0; r < reps; r++) CKC(cudaEventElapsedTime(&ms[r], e0[r], e1[r]));
          /* planner alone (into the context's own plan buffer is not exposed:
           * use a separate device plan) */
          nsa_dims_t d;
          nsa_fwd_check(&a, &d, msg, sizeof msg);
          nsa_plan_layout_t lay;
          size_t pbytes = nsa_plan_layout(d.rows, d.n, &lay);
          void *pbuf;
          CKC(cudaMalloc(&pbuf, pbytes));
          nsa_plan_t plan;
          nsa_plan_bind(&plan, pbuf, d.rows, d.n);
          for (int w = 0; w < 3; w++) nsa_cuda_plan_v2(ctx, &a.sel, &d, &plan, 0, msg, sizeof msg);
          for (int r = 0; r < reps; r++) {
            CKC(cudaEventRecord(e0[r], st));
            nsa_cuda_plan_v2(ctx, &a.sel, &d, &plan, 0, msg, sizeof msg);
            CKC(cudaEventRecord(e1[r], st));
          }
          CKC(cudaStreamSynchronize(st));
          for (int r = 0; r < reps; r++) CKC(cudaEventElapsedTime(&pms[r], e0[r], e1[r]));
          cudaFree(pbuf);
          qsort(ms, reps, sizeof(float), cmpf);
          qsort(pms, reps, sizeof(float), cmpf);
          const float fm = ms[reps / 2], pm = pms[reps / 2];
          const double keys = info.mean_len * (double)d.rows;
          const double flops = 2.0 * (double)h * (double)(Dk + Dv) * keys;
          const double tf = flops / (fm * 1e-3) / 1e12;
          printf("%6lld %3lld %4lld %4lld %6s | %9.3f %9.3f %8.1f %8.1f %12zu\n", (long long)T,
                 (long long)h, (long long)Dk, (long long)Dv, corr ? "corr" : "random", fm, pm, tf,
                 info.mean_len, info.workspace_bytes);
          fflush(stdout);
          if (fc)
            fprintf(fc, "%lld,%lld,%lld,%lld,%s,%.4f,%.4f,%.2f,%.1f,%zu\n", (long long)T, (long long)h,
                    (long long)Dk, (long long)Dv, corr ? "corr" : "random", fm, pm, tf, info.mean_len,
                    info.workspace_bytes);
        }
        cudaFree(q);
        cudaFree(o);
        cudaFree(lse);
      }
      cudaFree(k);
      cudaFree(v);
    }
    free(hsel);
    cudaFree(dsel);
  }
  if (fc) fclose(fc);
  nsa_cuda_ctx_destroy(ctx);
  return 0;
}

/*
 * cuda_bench.c — CUDA selection-attention forward + backward benchmark (issue 7 configs).
 *
 *   build/bin/nsa_bench_cuda [--quick] [--reps N] [--csv FILE] [--no-pack] [--small-h]
 *                            [--no-bwd] [--dump-sel DIR [--dump-only]] [--one T h corr]
 *                            [--fwd-key 0|1] [--dk 128|192]
 * --quick: T = 16k only; --small-h: h in {1, 4} only; --no-pack: one query per
 * MMA tile even when h < 16 (to measure what query packing buys); --qt1: one
 * 16-row query tile per CTA, --qt2: two where Dv <= 128 (default: auto);
 * --stages2: two-stage K/V ring; --nohint: no L2 cache policies;
 * --fwd-key 0|1: query-centric / key-block-centric forward forced (default auto);
 * --one T h corr: one config (corr -1 = both patterns; for A/B runs and ncu).
 * --dk 128|192: time that Dk only, at every T (default: 128, and 192 at T = 16k
 * in the full table; --one alone: 128).
 *
 * One sequence (B = 1), S = Skv = T, G = 4 KV heads, block 64, n = 16
 * selected blocks, bf16. Selections: "random" (block 0, the query's own block
 * and 14 distinct random earlier blocks per query) and "corr" (all 64 queries
 * of a query block share one selection, as trained models mostly do).
 * For each config: v2 forward time (whole request: device planner + group
 * planner + kernel, sync=0 on the context stream, CUDA events per rep,
 * median after warm-up), planner alone, TFLOP/s counted on the real keys
 * (2 * h * (Dk + Dv) * sum of row lengths per group), workspace bytes.
 * Backward: nsa_cuda_sel_bwd (v2, sync=0, same method) on the forward's o/lse
 * with a random dout; its TFLOP/s counts 2.5x the forward's FLOPs, the
 * convention FlashAttention uses (backward = 5 matmuls vs the forward's 2).
 * --no-bwd: forward only.
 * Selections depend only on (T, pattern): a fixed seed per (T, pattern), so
 * every h and Dk of one T sees the same selection. --dump-sel DIR writes each
 * one once as DIR/sel_T<T>_<random|corr>.i32 (raw little-endian int32
 * [T][G][n], -1 = unused slot) + .json header, and DIR/manifest.tsv with one
 * line per timed config (T h Dk Dv sel file), for bench/peers.py.
 * Peers are NOT run here (bench/peers.py, scripts/bench-kernels.sh).
 */
#include <cuda_runtime.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

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

static int cmpf(const void *a, const void *b);
static int dump_sel(const char *dir, const int32_t *ids, int64_t T, int64_t G, int64_t n, int bs,
                    int corr);
static void seed_sel(int64_t T, int corr);
static void make_sel(int32_t *ids, int64_t T, int64_t G, int64_t n, int bs, int corr);

/* --dump-only: the same selections and manifest the timed run writes, same
 * config order (T, Dk, h, pattern), without a GPU (tests bench/peers.py). */
static int dump_configs(const char *dir, int quick, int small_h, long long one_T, long long one_h,
                        int one_corr) {
  const int64_t Ts[] = {8192, 16384, 65536}, hs[] = {1, 4, 8, 16}, G = 4, n = 16;
  const int bs = 64;
  char mp[1024];
  if (mkdir(dir, 0755) != 0 && errno != EEXIST) return 1;
  snprintf(mp, sizeof mp, "%s/manifest.tsv", dir);
  FILE *fman = fopen(mp, "w");
  if (!fman) return 1;
  fprintf(fman, "T\th\tDk\tDv\tsel\tfile\n");
  for (int ti = 0; ti < 3; ti++) {
    const int64_t T = one_T ? one_T : Ts[ti];
    if (one_T && ti > 0) break;
    if (!one_T && quick && T != 16384) continue;
    int32_t *ids = malloc(sizeof(int32_t) * T * G * n);
    for (int corr = 0; corr < 2; corr++) {
      seed_sel(T, corr);
      make_sel(ids, T, G, n, bs, corr);
      if (dump_sel(dir, ids, T, G, n, bs, corr)) return 1;
    }
    free(ids);
    for (int dkv = 0; dkv < 2; dkv++) {
      if (dkv && (T != 16384 || one_T)) continue;
      for (int hi = 0; hi < (small_h ? 2 : 4); hi++) {
        if (one_h && hs[hi] != one_h) continue;
        for (int corr = 0; corr < 2; corr++) {
          if (one_corr >= 0 && corr != one_corr) continue;
          const char *pat = corr ? "corr" : "random";
          fprintf(fman, "%lld\t%lld\t%d\t128\t%s\tsel_T%lld_%s.i32\n", (long long)T, (long long)hs[hi],
                  dkv ? 192 : 128, pat, (long long)T, pat);
        }
      }
    }
  }
  fclose(fman);
  printf("nsa_bench_cuda: selections and manifest written to %s (nothing timed)\n", dir);
  return 0;
}

/* Fixed seed per (T, pattern): the same selection for every h and Dk of a T. */
static void seed_sel(int64_t T, int corr) { rng_s = 0x9e3779b97f4a7c15ull ^ ((uint64_t)T << 1) ^ (uint64_t)corr; }

/* --dump-sel: DIR/sel_T<T>_<pat>.i32 (int32 [T][G][n], host byte order =
 * little-endian on x86-64) + DIR/sel_T<T>_<pat>.json. Returns 0 or -1. */
static int dump_sel(const char *dir, const int32_t *ids, int64_t T, int64_t G, int64_t n, int bs,
                    int corr) {
  char path[1024];
  const char *pat = corr ? "corr" : "random";
  snprintf(path, sizeof path, "%s/sel_T%lld_%s.i32", dir, (long long)T, pat);
  FILE *f = fopen(path, "wb");
  if (!f) return -1;
  size_t cnt = (size_t)(T * G * n);
  int ok = fwrite(ids, sizeof(int32_t), cnt, f) == cnt;
  ok &= fclose(f) == 0;
  snprintf(path, sizeof path, "%s/sel_T%lld_%s.json", dir, (long long)T, pat);
  f = fopen(path, "w");
  if (!f) return -1;
  fprintf(f,
          "{\"file\": \"sel_T%lld_%s.i32\", \"dtype\": \"int32\", \"layout\": \"[T][G][n]\", "
          "\"T\": %lld, \"G\": %lld, \"n\": %lld, \"block_size\": %d, \"pattern\": \"%s\", "
          "\"unused\": -1}\n",
          (long long)T, pat, (long long)T, (long long)G, (long long)n, bs, pat);
  ok &= fclose(f) == 0;
  return ok ? 0 : -1;
}

static float median_ms(float *ms, int reps) {
  qsort(ms, reps, sizeof(float), cmpf);
  return ms[reps / 2];
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
  int quick = 0, reps = 20, small_h = 0, one_corr = -1, do_bwd = 1, one_dk = 0;
  const char *dump_dir = NULL;
  int dump_only = 0; /* --dump-only: write --dump-sel's files for the configs, time nothing (no GPU needed) */
  long long one_T = 0, one_h = 0; /* --one T h corr: a single config (for profilers) */
  const char *csv = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--quick")) quick = 1;
    else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--csv") && i + 1 < argc) csv = argv[++i];
    else if (!strcmp(argv[i], "--no-pack")) setenv("NSA_CUDA_NO_PACK", "1", 1);
    else if (!strcmp(argv[i], "--small-h")) small_h = 1;
    else if (!strcmp(argv[i], "--no-bwd")) do_bwd = 0;
    else if (!strcmp(argv[i], "--dump-sel") && i + 1 < argc) dump_dir = argv[++i];
    else if (!strcmp(argv[i], "--dump-only")) dump_only = 1;
    else if (!strcmp(argv[i], "--qt1")) setenv("NSA_CUDA_QTILES", "1", 1);
    else if (!strcmp(argv[i], "--qt2")) setenv("NSA_CUDA_QTILES", "2", 1);
    else if (!strcmp(argv[i], "--stages2")) setenv("NSA_CUDA_STAGES", "2", 1);
    else if (!strcmp(argv[i], "--nohint")) setenv("NSA_CUDA_L2HINT", "0", 1);
    else if (!strcmp(argv[i], "--fwd-key") && i + 1 < argc) setenv("NSA_CUDA_FWD_KEY", argv[++i], 1);
    else if (!strcmp(argv[i], "--dk") && i + 1 < argc)
      one_dk = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--one") && i + 3 < argc) {
      one_T = atoll(argv[++i]);
      one_h = atoll(argv[++i]);
      one_corr = atoi(argv[++i]);
    }
  }
  if (dump_only) {
    if (!dump_dir) {
      fprintf(stderr, "nsa_bench_cuda: --dump-only needs --dump-sel DIR\n");
      return 2;
    }
    return dump_configs(dump_dir, quick, small_h, one_T, one_h, one_corr);
  }
  if (nsa_cuda_device_count() == 0) {
    printf("nsa_bench_cuda: no CUDA device, nothing to time\n");
    return 0;
  }
  char name[256];
  nsa_cuda_device_name(0, name, sizeof name);
  printf("device: %s\n", name);
  FILE *fc = csv ? fopen(csv, "w") : NULL;
  if (csv && !fc) {
    fprintf(stderr, "nsa_bench_cuda: cannot write %s\n", csv);
    return 1;
  }
  if (fc)
    fprintf(fc, "T,h,Dk,Dv,sel,fwd_ms,plan_ms,tflops,mean_len,workspace_bytes,bwd_ms,bwd_tflops,"
                "bwd_workspace_bytes\n");
  FILE *fman = NULL;
  if (dump_dir) {
    if (mkdir(dump_dir, 0755) != 0 && errno != EEXIST) {
      fprintf(stderr, "nsa_bench_cuda: mkdir %s: %s\n", dump_dir, strerror(errno));
      return 1;
    }
    char mp[1024];
    snprintf(mp, sizeof mp, "%s/manifest.tsv", dump_dir);
    fman = fopen(mp, "w");
    if (!fman) {
      fprintf(stderr, "nsa_bench_cuda: cannot write %s\n", mp);
      return 1;
    }
    fprintf(fman, "T\th\tDk\tDv\tsel\tfile\n");
  }
  printf("backward TFLOP/s counts 2.5x the forward's FLOPs (FlashAttention's convention)\n");

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
  printf("%6s %3s %4s %4s %6s | %9s %9s %8s %8s %12s | %9s %8s %12s\n", "T", "h", "Dk", "Dv",
         "sel", "fwd_ms", "plan_ms", "TFLOP/s", "mean_L", "ws_bytes", "bwd_ms", "TFLOP/s", "bwd_ws");
  for (int ti = 0; ti < nT; ti++) {
    const int64_t T = one_T ? one_T : Ts[ti];
    if (one_T && ti > 0) break;
    /* one selection per pattern for this T (hsel[corr]), dumped once */
    int32_t *hsel[2];
    for (int corr = 0; corr < 2; corr++) {
      hsel[corr] = malloc(sizeof(int32_t) * T * G * n);
      seed_sel(T, corr);
      make_sel(hsel[corr], T, G, n, bs, corr);
      if (dump_dir && dump_sel(dump_dir, hsel[corr], T, G, n, bs, corr)) {
        fprintf(stderr, "nsa_bench_cuda: writing selections to %s failed\n", dump_dir);
        return 1;
      }
    }
    void *dsel;
    CKC(cudaMalloc(&dsel, sizeof(int32_t) * T * G * n));
    for (int dkv = 0; dkv < 2; dkv++) {
      const int64_t Dk = dkv ? 192 : 128, Dv = 128;
      if (one_dk ? Dk != one_dk : dkv && (T != 16384 || one_T)) continue; /* Dk = 192 at T = 16k only */
      void *k = dev_random_bf16((size_t)T * G * Dk), *v = dev_random_bf16((size_t)T * G * Dv);
      for (size_t hi = 0; hi < (small_h ? 2 : 4); hi++) {
        const int64_t h = hs[hi], H = G * h;
        if (one_h && h != one_h) continue;
        void *q = dev_random_bf16((size_t)T * H * Dk), *o;
        float *lse;
        CKC(cudaMalloc(&o, (size_t)T * H * Dv * 2));
        CKC(cudaMalloc((void **)&lse, (size_t)T * H * 4));
        /* backward buffers: dout random, dq/dk/dv fully overwritten */
        void *dout = NULL, *dq = NULL, *dk = NULL, *dv = NULL;
        if (do_bwd) {
          dout = dev_random_bf16((size_t)T * H * Dv);
          CKC(cudaMalloc(&dq, (size_t)T * H * Dk * 2));
          CKC(cudaMalloc(&dk, (size_t)T * G * Dk * 2));
          CKC(cudaMalloc(&dv, (size_t)T * G * Dv * 2));
        }
        for (int corr = 0; corr < 2; corr++) {
          if (one_corr >= 0 && corr != one_corr) continue;
          CKC(cudaMemcpy(dsel, hsel[corr], sizeof(int32_t) * T * G * n, cudaMemcpyHostToDevice));
          if (fman)
            fprintf(fman, "%lld\t%lld\t%lld\t%lld\t%s\tsel_T%lld_%s.i32\n", (long long)T, (long long)h,
                    (long long)Dk, (long long)Dv, corr ? "corr" : "random", (long long)T,
                    corr ? "corr" : "random");
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
          const float fm = median_ms(ms, reps), pm = median_ms(pms, reps);
          const double keys = info.mean_len * (double)d.rows;
          const double flops = 2.0 * (double)h * (double)(Dk + Dv) * keys;
          const double tf = flops / (fm * 1e-3) / 1e12;
          /* Backward on the forward's o and lse (the sync=1 forward above
           * wrote them; later forwards rewrite the same values). */
          float bm = NAN;
          double btf = NAN;
          size_t bws = 0;
          if (do_bwd) {
            nsa_bwd_args_t b;
            memset(&b, 0, sizeof b);
            b.q = a.q, b.k = a.k, b.v = a.v, b.o = a.o, b.lse = a.lse, b.sel = a.sel;
            tensor4(&b.dout, dout, NSA_BF16, 1, T, H, Dv);
            tensor4(&b.dq, dq, NSA_BF16, 1, T, H, Dk);
            tensor4(&b.dk, dk, NSA_BF16, 1, T, G, Dk);
            tensor4(&b.dv, dv, NSA_BF16, 1, T, G, Dv);
            nsa_run_info_t binfo;
            int brc = nsa_cuda_sel_bwd(ctx, &b, NULL, NSA_PATH_VARLEN_V2, &sync1, &binfo, msg, sizeof msg);
            if (brc) {
              printf("T=%lld h=%lld bwd: rc %d %s\n", (long long)T, (long long)h, brc, msg);
            } else {
              float bms[64];
              for (int w = 0; w < 3; w++)
                nsa_cuda_sel_bwd(ctx, &b, NULL, NSA_PATH_VARLEN_V2, &sync0, NULL, msg, sizeof msg);
              for (int r = 0; r < reps; r++) {
                CKC(cudaEventRecord(e0[r], st));
                nsa_cuda_sel_bwd(ctx, &b, NULL, NSA_PATH_VARLEN_V2, &sync0, NULL, msg, sizeof msg);
                CKC(cudaEventRecord(e1[r], st));
              }
              CKC(cudaStreamSynchronize(st));
              for (int r = 0; r < reps; r++) CKC(cudaEventElapsedTime(&bms[r], e0[r], e1[r]));
              bm = median_ms(bms, reps);
              btf = 2.5 * flops / (bm * 1e-3) / 1e12;
              bws = binfo.workspace_bytes;
            }
          }
          printf("%6lld %3lld %4lld %4lld %6s | %9.3f %9.3f %8.1f %8.1f %12zu | %9.3f %8.1f %12zu\n",
                 (long long)T, (long long)h, (long long)Dk, (long long)Dv, corr ? "corr" : "random", fm,
                 pm, tf, info.mean_len, info.workspace_bytes, bm, btf, bws);
          fflush(stdout);
          if (fc)
            fprintf(fc, "%lld,%lld,%lld,%lld,%s,%.4f,%.4f,%.2f,%.1f,%zu,%.4f,%.2f,%zu\n", (long long)T,
                    (long long)h, (long long)Dk, (long long)Dv, corr ? "corr" : "random", fm, pm, tf,
                    info.mean_len, info.workspace_bytes, bm, btf, bws);
        }
        cudaFree(q);
        cudaFree(o);
        cudaFree(lse);
        if (do_bwd) {
          cudaFree(dout);
          cudaFree(dq);
          cudaFree(dk);
          cudaFree(dv);
        }
      }
      cudaFree(k);
      cudaFree(v);
    }
    free(hsel[0]);
    free(hsel[1]);
    cudaFree(dsel);
  }
  if (fc) fclose(fc);
  if (fman) fclose(fman);
  nsa_cuda_ctx_destroy(ctx);
  return 0;
}

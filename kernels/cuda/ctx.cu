// ctx.cu — CUDA backend context and the request entry points (sel_attn_cuda.h).
//
// A context = one device, one non-blocking stream (plus a side stream the
// backward forks its plan inversions onto and joins before each dk/dv, so
// callers still see one stream), one workspace arena that grows to a
// high-water mark under ws_cap (then NSA_ERR_BUSY), pinned host staging for
// the v1 planner and the planner summary, and timing events.
//
// Forward request flow (nsa_cuda_sel_fwd):
//   check → wait_event → plan (v2 on the device, or v1 on the host) →
//   [summary copy + host sync only where needed, see below] → path →
//   attention kernel(s) → done_event → [sync].
// Host synchronization happens only when:
//   - sync = 1 (the caller asked; info is then complete, invalid_selection is
//     reported before any attention kernel runs),
//   - the v1 planner runs (it is a host planner by definition),
//   - the path may be `packed` (varlen off, or MIN_L > 0 with v2 on): packed
//     needs its length-bucket counts (nsa_cuda_launch_pack_hist, in the same
//     summary copy) to size its padded gather buffers, and MIN_L needs
//     max_len. This is the documented cost of MIN_L > 0 (docs/KERNELS_CUDA.md).
// With sync = 0 on the v2 path nothing waits on the host; a bad selection then
// cannot be reported, and the kernels write NaN instead of reading anything.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_internal.h"
#include "fwd_key.h"
#include "fwd_rows.h"

struct nsa_cuda_ctx {
  int device;
  cudaStream_t stream;
  size_t ws_cap;
  void *arena;
  size_t arena_size;
  void *h_stage;  // pinned: v1 selection copy + v1 host plan
  size_t h_stage_size;
  nsa_cuda_summary_t *h_sum;  // pinned
  cudaEvent_t ev0, ev1, ev2;
  // The backward's side stream: the plan inversions run there beside the dq
  // and the previous batch's dk/dv (bwd_request.cu), forked / joined by
  // these events (free_ev: a batch's inversion area is read no more).
  cudaStream_t side;
  cudaEvent_t fork_ev, join_ev, free_ev;
  int fatal;  // a sticky error was seen: every later call fails fast
  int no_pack;  // NSA_CUDA_NO_PACK=1 (benchmarks): one query per tile even when h < 16
  int qt_max;   // NSA_CUDA_QTILES=1|2 (benchmarks): force one / two query tiles per CTA
  int stages_max;  // NSA_CUDA_STAGES=2 (benchmarks): two-stage K/V ring
  int l2hint;      // NSA_CUDA_L2HINT=0 (benchmarks): no L2 cache policies
  int fwd_key;     // NSA_CUDA_FWD_KEY=0|1: key-centric forward never / wherever supported; else auto
};

static void setmsg(char *msg, size_t len, const char *fmt, ...) {
  if (msg == NULL || len == 0) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, len, fmt, ap);
  va_end(ap);
}

// Errors after which the CUDA context is unusable (the process must exit).
static int is_sticky(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorContextIsDestroyed:
    case cudaErrorExternalDevice:
    case cudaErrorUnknown: return 1;
    default: return 0;
  }
}

static int fail(nsa_cuda_ctx_t *ctx, cudaError_t e, const char *what, char *msg, size_t len) {
  if (is_sticky(e)) {
    if (ctx) ctx->fatal = 1;
    setmsg(msg, len, "%s: sticky CUDA error %s (%s); the device context is lost", what,
           cudaGetErrorName(e), cudaGetErrorString(e));
    return NSA_ERR_DEVICE_FATAL;
  }
  cudaGetLastError();  // clear a non-sticky error so the next request starts clean
  if (e == cudaErrorMemoryAllocation) {
    setmsg(msg, len, "%s: out of device memory", what);
    return NSA_ERR_BUSY;
  }
  setmsg(msg, len, "%s: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
  return NSA_ERR_DEVICE;
}

#define CK(call, what)                                           \
  do {                                                           \
    cudaError_t e_ = (call);                                     \
    if (e_ != cudaSuccess) return fail(ctx, e_, what, msg, msglen); \
  } while (0)

extern "C" int nsa_cuda_device_count(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

extern "C" int nsa_cuda_device_name(int device, char *buf, size_t len) {
  cudaDeviceProp p;
  if (cudaGetDeviceProperties(&p, device) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  snprintf(buf, len, "%s", p.name);
  return 0;
}

extern "C" int nsa_cuda_ctx_create(int device, size_t ws_cap, nsa_cuda_ctx_t **out, char *msg,
                                   size_t msglen) {
  *out = NULL;
  nsa_cuda_ctx_t *ctx = (nsa_cuda_ctx_t *)calloc(1, sizeof(*ctx));
  if (!ctx) {
    setmsg(msg, msglen, "out of host memory");
    return NSA_ERR_INTERNAL;
  }
  ctx->device = device;
  ctx->ws_cap = ws_cap;
  const char *np = getenv("NSA_CUDA_NO_PACK");
  ctx->no_pack = np && np[0] == '1';
  const char *qt = getenv("NSA_CUDA_QTILES");
  ctx->qt_max = (qt && qt[0] >= '1' && qt[0] <= '3') ? qt[0] - '0' : 0;
  const char *ns = getenv("NSA_CUDA_STAGES");
  ctx->stages_max = (ns && ns[0] == '2') ? 2 : 3;
  const char *lh = getenv("NSA_CUDA_L2HINT");
  ctx->l2hint = (lh && lh[0] == '0') ? 0 : 1;
  const char *fk = getenv("NSA_CUDA_FWD_KEY");
  ctx->fwd_key = (fk && fk[0] == '0') ? 0 : (fk && fk[0] == '1') ? 1 : -1;
  cudaError_t e = cudaSetDevice(device);
  if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking);
  if (e == cudaSuccess) e = cudaMallocHost((void **)&ctx->h_sum, sizeof(nsa_cuda_summary_t));
  if (e == cudaSuccess) e = cudaEventCreate(&ctx->ev0);
  if (e == cudaSuccess) e = cudaEventCreate(&ctx->ev1);
  if (e == cudaSuccess) e = cudaEventCreate(&ctx->ev2);
  if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&ctx->side, cudaStreamNonBlocking);
  if (e == cudaSuccess) e = cudaEventCreateWithFlags(&ctx->fork_ev, cudaEventDisableTiming);
  if (e == cudaSuccess) e = cudaEventCreateWithFlags(&ctx->join_ev, cudaEventDisableTiming);
  if (e == cudaSuccess) e = cudaEventCreateWithFlags(&ctx->free_ev, cudaEventDisableTiming);
  if (e != cudaSuccess) {
    int st = fail(NULL, e, "nsa_cuda_ctx_create", msg, msglen);
    nsa_cuda_ctx_destroy(ctx);
    return st;
  }
  *out = ctx;
  return NSA_OK;
}

extern "C" void nsa_cuda_ctx_destroy(nsa_cuda_ctx_t *ctx) {
  if (!ctx) return;
  cudaSetDevice(ctx->device);
  if (ctx->stream) cudaStreamSynchronize(ctx->stream);
  if (ctx->side) cudaStreamSynchronize(ctx->side);
  if (ctx->arena) cudaFree(ctx->arena);
  if (ctx->h_stage) cudaFreeHost(ctx->h_stage);
  if (ctx->h_sum) cudaFreeHost(ctx->h_sum);
  if (ctx->ev0) cudaEventDestroy(ctx->ev0);
  if (ctx->ev1) cudaEventDestroy(ctx->ev1);
  if (ctx->ev2) cudaEventDestroy(ctx->ev2);
  if (ctx->fork_ev) cudaEventDestroy(ctx->fork_ev);
  if (ctx->join_ev) cudaEventDestroy(ctx->join_ev);
  if (ctx->free_ev) cudaEventDestroy(ctx->free_ev);
  if (ctx->side) cudaStreamDestroy(ctx->side);
  if (ctx->stream) cudaStreamDestroy(ctx->stream);
  cudaGetLastError();
  free(ctx);
}

extern "C" size_t nsa_cuda_ctx_workspace_bytes(const nsa_cuda_ctx_t *ctx) {
  return ctx ? ctx->arena_size : 0;
}

extern "C" void *nsa_cuda_ctx_stream(nsa_cuda_ctx_t *ctx) { return ctx ? (void *)ctx->stream : NULL; }

static size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

// Makes the arena at least `need` bytes, keeping its first `keep` bytes.
static int arena_reserve(nsa_cuda_ctx_t *ctx, size_t need, size_t keep, char *msg, size_t msglen) {
  if (need <= ctx->arena_size) return NSA_OK;
  if (ctx->ws_cap && need > ctx->ws_cap) {
    setmsg(msg, msglen, "workspace of %zu bytes needed, over the cap of %zu bytes", need, ctx->ws_cap);
    return NSA_ERR_BUSY;
  }
  void *p = NULL;
  CK(cudaMalloc(&p, need), "workspace allocation");
  if (ctx->arena) {
    cudaError_t e = cudaSuccess;
    if (keep) e = cudaMemcpyAsync(p, ctx->arena, keep, cudaMemcpyDeviceToDevice, ctx->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(ctx->stream);  // old arena may be in use
    // ... also by the side stream, where a failed backward left it unjoined
    if (e == cudaSuccess && ctx->side) e = cudaStreamSynchronize(ctx->side);
    if (e != cudaSuccess) {
      cudaFree(p);
      return fail(ctx, e, "workspace growth", msg, msglen);
    }
    cudaFree(ctx->arena);
  }
  ctx->arena = p;
  ctx->arena_size = need;
  return NSA_OK;
}

static int stage_reserve(nsa_cuda_ctx_t *ctx, size_t need, char *msg, size_t msglen) {
  if (need <= ctx->h_stage_size) return NSA_OK;
  if (ctx->h_stage) {
    CK(cudaStreamSynchronize(ctx->stream), "staging growth");
    cudaFreeHost(ctx->h_stage);
    ctx->h_stage = NULL;
    ctx->h_stage_size = 0;
  }
  CK(cudaMallocHost(&ctx->h_stage, need), "pinned staging allocation");
  ctx->h_stage_size = need;
  return NSA_OK;
}

// ---------------------------------------------------------------- helpers --

// Elements a strided tensor can reach (0 when empty).
static int64_t tensor_extent(const nsa_tensor_t *t) {
  int64_t ext = 1;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] == 0) return 0;
    ext += (t->shape[i] - 1) * t->stride[i];
  }
  return ext;
}

// Limits of this backend, named (NSA_ERR_UNSUPPORTED), and selection sanity.
static int check_limits(const nsa_dims_t *d, const nsa_selection_t *sel, char *msg, size_t msglen) {
  if (d->Dk > NSA_CUDA_SIMPLE_MAX_D || d->Dv > NSA_CUDA_SIMPLE_MAX_D) {
    setmsg(msg, msglen, "CUDA backend supports Dk, Dv <= %d (got Dk=%lld, Dv=%lld)",
           NSA_CUDA_SIMPLE_MAX_D, (long long)d->Dk, (long long)d->Dv);
    return NSA_ERR_UNSUPPORTED;
  }
  if (d->Skv >= (1LL << 27) || d->S >= (1LL << 31)) {
    setmsg(msg, msglen, "CUDA backend supports Skv < 2^27 and S < 2^31 (got Skv=%lld, S=%lld)",
           (long long)d->Skv, (long long)d->S);
    return NSA_ERR_UNSUPPORTED;
  }
  if (sel->kind == NSA_SEL_BLOCK_INDICES && sel->block_size <= 0) {
    setmsg(msg, msglen, "sel.block_size must be > 0");
    return NSA_ERR_BAD_REQUEST;
  }
  return NSA_OK;
}

static int aligned16(const nsa_tensor_t *t) {
  if (((uintptr_t)t->data & 15) != 0) return 0;
  if (t->stride[3] != 1) return 0;
  for (int i = 0; i < 3; i++)
    if (t->stride[i] % 8 != 0) return 0;
  return 1;
}

static void fill_attn(nsa_cuda_attn_t *at, const nsa_fwd_args_t *a, const nsa_dims_t *d,
                      const long long *invalid) {
  memset(at, 0, sizeof(*at));
  at->q = a->q.data;
  at->k = a->k.data;
  at->v = a->v.data;
  at->o = a->o.data;
  at->lse = (float *)a->lse.data;
  for (int i = 0; i < 4; i++) {
    at->qs[i] = a->q.stride[i];
    at->ks[i] = a->k.stride[i];
    at->vs[i] = a->v.stride[i];
    at->os[i] = a->o.stride[i];
  }
  if (a->lse.data)
    for (int i = 0; i < 3; i++) at->ls[i] = a->lse.stride[i];
  at->B = d->B;
  at->S = d->S;
  at->Skv = d->Skv;
  at->G = d->G;
  at->h = d->h;
  at->Dk = d->Dk;
  at->Dv = d->Dv;
  at->n = d->n;
  at->scale = nsa_resolve_scale(a->scale, d->Dk);
  at->invalid = invalid;
}

extern "C" int nsa_cuda_mma_supported(nsa_dtype_t dt, int64_t Dk, int64_t Dv) {
  if (dt != NSA_BF16 && dt != NSA_F16) return 0;
  int ok_k = Dk == 64 || Dk == 128 || Dk == 192 || Dk == 256;
  int ok_v = Dv == 64 || Dv == 128 || Dv == 192 || Dv == 256;
  return ok_k && ok_v;
}

extern "C" cudaError_t nsa_cuda_launch_fwd_mma(const nsa_cuda_attn_t *a, nsa_dtype_t dt, int P,
                                               const nsa_cuda_piece_t *pieces, const int2 *gcount,
                                               int64_t max_pieces, cudaStream_t st) {
  if (dt == NSA_BF16) return nsa_cuda_launch_fwd_mma_bf16(a, P, pieces, gcount, max_pieces, st);
  if (dt == NSA_F16) return nsa_cuda_launch_fwd_mma_f16(a, P, pieces, gcount, max_pieces, st);
  return cudaErrorInvalidValue;
}

static double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

// Arena layout of one request (byte offsets; 256-aligned).
typedef struct {
  size_t sum, plan, len64, temp, temp_bytes, pieces, gcount, end_plan;
} req_layout_t;

// Pg: queries per group of the tensor-core kernel (P * query tiles), exactly
// as run_attention will use it (the group count and the pieces depend on it).
static void req_layout(const nsa_dims_t *d, int Pg, req_layout_t *L) {
  const int P = Pg;
  nsa_plan_layout_t pl;
  size_t o = 0;
  L->sum = o;
  o = align256(o + sizeof(nsa_cuda_summary_t));
  L->plan = o;
  o = align256(o + nsa_plan_layout(d->rows, d->n, &pl));
  L->len64 = o;
  o = align256(o + (size_t)(d->rows + 1) * 8);
  L->temp_bytes = nsa_cuda_plan_v2_temp_bytes(d->rows);
  L->temp = o;
  o = align256(o + L->temp_bytes);
  int64_t ng = nsa_cuda_num_groups(d->B, d->S, d->G, P);
  L->pieces = o;
  o = align256(o + (size_t)ng * nsa_cuda_max_pieces(d->n, P) * sizeof(nsa_cuda_piece_t));
  L->gcount = o;
  o = align256(o + (size_t)ng * sizeof(int2));
  L->end_plan = o;
}

// Grows the arena to `need` bytes for an optional buffer (the row
// grouping's order, the key-centric forward's inversion and partials),
// keeping its first `keep` bytes (the plan), and rebinds the request's
// pointers into the new arena (*ws, *dsum, the plan, at->invalid). *got = 1
// when it grew; 0 when the cap or the device memory refused it: the request
// then goes on without the buffer, and only a sticky CUDA error (ctx->fatal)
// fails it.
static int arena_grow_optional(nsa_cuda_ctx_t *ctx, size_t need, size_t keep, char **ws, nsa_cuda_summary_t **dsum,
                               nsa_plan_t *plan, const req_layout_t *L, const nsa_dims_t *d, nsa_cuda_attn_t *at,
                               int *got, char *msg, size_t msglen) {
  *got = 0;
  const int rs = arena_reserve(ctx, need, keep, msg, msglen);
  if (rs != NSA_OK) {
    if (ctx->fatal) return rs;
    cudaGetLastError();  // a failed cudaMalloc is not sticky
    if (msg && msglen) msg[0] = 0;
    return NSA_OK;
  }
  *ws = (char *)ctx->arena;
  *dsum = (nsa_cuda_summary_t *)(*ws + L->sum);
  nsa_plan_bind(plan, *ws + L->plan, d->rows, d->n);
  at->invalid = &(*dsum)->invalid;
  *got = 1;
  return NSA_OK;
}

static void summary_to_info(const nsa_cuda_summary_t *s, const nsa_dims_t *d, nsa_run_info_t *info) {
  info->rows = d->rows;
  info->max_len = s->max_len;
  info->mean_len = d->rows ? (double)s->total / (double)d->rows : 0.0;
  info->invalid = s->invalid;
  for (int i = 0; i < NSA_LEN_HIST_BUCKETS; i++) info->len_hist[i] = s->hist[i];
}

// v1: selection D2H, nsa_cpu_plan_v1 on the host, plan H2D. Fills *sum.
static int plan_v1(nsa_cuda_ctx_t *ctx, const nsa_selection_t *sel, const nsa_dims_t *d,
                   nsa_plan_t *dplan, void *dplan_buf, nsa_cuda_summary_t *sum, char *msg,
                   size_t msglen) {
  nsa_plan_layout_t pl;
  size_t plan_bytes = nsa_plan_layout(d->rows, d->n, &pl);
  int64_t ext = tensor_extent(&sel->t);
  size_t sel_bytes = align256((size_t)ext * 4);
  int st = stage_reserve(ctx, sel_bytes + plan_bytes, msg, msglen);
  if (st) return st;
  if (ext > 0)
    CK(cudaMemcpyAsync(ctx->h_stage, sel->t.data, (size_t)ext * 4, cudaMemcpyDeviceToHost, ctx->stream),
       "v1 selection copy");
  CK(cudaStreamSynchronize(ctx->stream), "v1 selection copy");
  nsa_selection_t hs = *sel;
  hs.t.data = ctx->h_stage;
  nsa_plan_t hp;
  nsa_plan_bind(&hp, (char *)ctx->h_stage + sel_bytes, d->rows, d->n);
  st = nsa_cpu_plan_v1(&hs, d, &hp);
  if (st != NSA_OK) {
    setmsg(msg, msglen, "v1 host planner failed (%s)", nsa_status_code_name(st));
    return st;
  }
  CK(cudaMemcpyAsync(dplan_buf, (char *)ctx->h_stage + sel_bytes, plan_bytes, cudaMemcpyHostToDevice,
                     ctx->stream),
     "v1 plan copy");
  memset(sum, 0, sizeof(*sum));
  sum->invalid = hp.invalid;
  sum->total = hp.total_len;
  sum->max_len = hp.max_len;
  for (int i = 0; i < NSA_LEN_HIST_BUCKETS; i++) sum->hist[i] = hp.len_hist[i];
  (void)dplan;
  return NSA_OK;
}

// Attention over a finished device plan (varlen paths, and packed over its
// synthetic plan with kp/vp as K/V).
static int run_attention(nsa_cuda_ctx_t *ctx, const nsa_cuda_attn_t *at, nsa_dtype_t dt, int P,
                         int use_mma, const nsa_plan_t *plan, nsa_cuda_piece_t *pieces, int2 *gcount,
                         char *msg, size_t msglen) {
  if (use_mma) {
    const int Pg = P * nsa_cuda_qtiles(at->Dk, at->Dv, P, at->qt_max);
    CK(nsa_cuda_launch_plan_group(plan, at->B, at->S, at->G, Pg, pieces, gcount, ctx->stream),
       "group planner launch");
    CK(nsa_cuda_launch_fwd_mma(at, dt, P, pieces, gcount, nsa_cuda_max_pieces(plan->n, Pg), ctx->stream),
       "tensor-core forward launch");
  } else {
    CK(nsa_cuda_launch_fwd_simple(at, dt, plan, ctx->stream), "forward launch");
  }
  return NSA_OK;
}

extern "C" int nsa_cuda_plan_v2(nsa_cuda_ctx_t *ctx, const nsa_selection_t *sel, const nsa_dims_t *d,
                                nsa_plan_t *plan, int sync_summary, char *msg, size_t msglen) {
  if (ctx->fatal) {
    setmsg(msg, msglen, "device context lost after a sticky error");
    return NSA_ERR_DEVICE_FATAL;
  }
  CK(cudaSetDevice(ctx->device), "cudaSetDevice");
  int st = check_limits(d, sel, msg, msglen);
  if (st) return st;
  req_layout_t L;
  req_layout(d, 1, &L);
  st = arena_reserve(ctx, L.temp + L.temp_bytes, 0, msg, msglen);
  if (st) return st;
  char *ws = (char *)ctx->arena;
  nsa_cuda_selview_t sv = nsa_cuda_selview_of(sel);
  nsa_cuda_summary_t *dsum = (nsa_cuda_summary_t *)(ws + L.sum);
  CK(nsa_cuda_launch_plan_v2(&sv, d->B, d->S, d->Skv, d->G, d->n, plan, dsum,
                             (int64_t *)(ws + L.len64), ws + L.temp, L.temp_bytes, 1, ctx->stream),
     "v2 planner launch");
  if (sync_summary) {
    CK(cudaMemcpyAsync(ctx->h_sum, dsum, sizeof(*dsum), cudaMemcpyDeviceToHost, ctx->stream),
       "summary copy");
    CK(cudaStreamSynchronize(ctx->stream), "v2 planner");
    plan->invalid = ctx->h_sum->invalid;
    plan->total_len = ctx->h_sum->total;
    plan->max_len = ctx->h_sum->max_len;
    for (int i = 0; i < NSA_LEN_HIST_BUCKETS; i++) plan->len_hist[i] = ctx->h_sum->hist[i];
  }
  return NSA_OK;
}

// The v2 planner of a request into its arena (layout L) on st.
static cudaError_t launch_planner(const nsa_cuda_selview_t *sv, const nsa_dims_t *d, nsa_plan_t *plan,
                                  nsa_cuda_summary_t *dsum, char *ws, const req_layout_t *L, int need_row_off,
                                  cudaStream_t st) {
  return nsa_cuda_launch_plan_v2(sv, d->B, d->S, d->Skv, d->G, d->n, plan, dsum, (int64_t *)(ws + L->len64),
                                 ws + L->temp, L->temp_bytes, need_row_off, st);
}

extern "C" int nsa_cuda_sel_fwd(nsa_cuda_ctx_t *ctx, const nsa_fwd_args_t *a,
                                const nsa_path_flags_t *flags, nsa_path_t force_path,
                                const nsa_cuda_exec_t *ex, nsa_run_info_t *info, char *msg,
                                size_t msglen) {
  nsa_run_info_t dummy;
  if (!info) info = &dummy;
  memset(info, 0, sizeof(*info));
  info->path = NSA_PATH_AUTO;
  if (ctx->fatal) {
    setmsg(msg, msglen, "device context lost after a sticky error");
    return NSA_ERR_DEVICE_FATAL;
  }
  nsa_path_flags_t defl;
  if (!flags) {
    nsa_path_flags_default(&defl);
    flags = &defl;
  }
  const int sync = ex ? ex->sync : 1;
  nsa_dims_t d;
  int st = nsa_fwd_check(a, &d, msg, msglen);
  if (st) return st;
  st = check_limits(&d, &a->sel, msg, msglen);
  if (st) return st;
  info->rows = d.rows;
  CK(cudaSetDevice(ctx->device), "cudaSetDevice");
  double t_start = now_us();

  // Which planner, and must the host see the summary before choosing?
  nsa_path_t planner = force_path == NSA_PATH_AUTO ? nsa_planner_for_flags(flags)
                       : force_path == NSA_PATH_VARLEN_V1 ? NSA_PATH_VARLEN_V1
                                                          : NSA_PATH_VARLEN_V2;
  int maybe_packed = force_path == NSA_PATH_PACKED ||
                     (force_path == NSA_PATH_AUTO &&
                      (!flags->use_sel_varlen || (flags->sel_varlen_v2 && flags->sel_varlen_min_l > 0)));
  int need_summary = sync || maybe_packed || planner == NSA_PATH_VARLEN_V1;

  const int P = ctx->no_pack ? 1 : nsa_cuda_pack_queries(d.h);
  req_layout_t L;
  req_layout(&d, P * nsa_cuda_qtiles(d.Dk, d.Dv, P, ctx->qt_max), &L);
  st = arena_reserve(ctx, L.end_plan, 0, msg, msglen);
  if (st) return st;
  char *ws = (char *)ctx->arena;
  nsa_cuda_summary_t *dsum = (nsa_cuda_summary_t *)(ws + L.sum);
  nsa_plan_t plan;
  nsa_plan_bind(&plan, ws + L.plan, d.rows, d.n);

  if (ex && ex->wait_event) CK(cudaStreamWaitEvent(ctx->stream, (cudaEvent_t)ex->wait_event, 0), "wait_event");
  if (sync) CK(cudaEventRecord(ctx->ev0, ctx->stream), "event record");

  nsa_cuda_summary_t hsum;
  memset(&hsum, 0, sizeof(hsum));
  double plan_t0 = now_us();
  const nsa_cuda_selview_t sv = nsa_cuda_selview_of(&a->sel);
  // With no summary to wait for (v2, sync = 0, packed impossible) the path
  // is v2 whatever the plan says, so the planner is launched below, where
  // the kernel is chosen: beside the row grouping (on the side stream) when
  // the row-block forward runs, else on the stream before the kernel.
  int plan_deferred = 0;
  if (planner == NSA_PATH_VARLEN_V1) {
    st = plan_v1(ctx, &a->sel, &d, &plan, ws + L.plan, &hsum, msg, msglen);
    if (st) return st;
    CK(cudaMemcpyAsync(dsum, &hsum, sizeof(hsum), cudaMemcpyHostToDevice, ctx->stream), "summary copy");
    CK(cudaStreamSynchronize(ctx->stream), "v1 plan copy");  // hsum is on the stack
    info->plan_us = now_us() - plan_t0;
  } else if (!need_summary) {
    plan_deferred = 1;
  } else {
    CK(launch_planner(&sv, &d, &plan, dsum, ws, &L, maybe_packed, ctx->stream), "v2 planner launch");
    // packed sizes its padded K/V by the bucket counts: count them into the
    // summary before its (one) copy to the host.
    if (maybe_packed) CK(nsa_cuda_launch_pack_hist(&plan, dsum, ctx->stream), "packed histogram launch");
    if (sync) CK(cudaEventRecord(ctx->ev1, ctx->stream), "event record");
    if (need_summary) {
      CK(cudaMemcpyAsync(ctx->h_sum, dsum, sizeof(*dsum), cudaMemcpyDeviceToHost, ctx->stream),
         "summary copy");
      CK(cudaStreamSynchronize(ctx->stream), "v2 planner");
      hsum = *ctx->h_sum;
    }
  }
  if (need_summary) {
    summary_to_info(&hsum, &d, info);
    if (hsum.invalid > 0) {
      setmsg(msg, msglen, "invalid selection: %lld bad entries (ids < -1 or >= ceil(Skv/block_size), "
             "or spans with start < 0 or start > end)", hsum.invalid);
      return NSA_ERR_INVALID_SELECTION;
    }
  }

  nsa_path_t path = force_path != NSA_PATH_AUTO ? force_path
                    : need_summary              ? nsa_choose_path(flags, hsum.max_len)
                                                : planner;
  info->path = path;

  nsa_cuda_attn_t at;
  fill_attn(&at, a, &d, &dsum->invalid);
  at.qt_max = ctx->qt_max;
  at.stages_max = ctx->stages_max;
  at.l2hint = ctx->l2hint;
  const int q_ok = aligned16(&a->q);
  size_t used = L.end_plan;
  size_t packed_kv = 0;
  if (path == NSA_PATH_PACKED) {
    // Bucket counts come with the summary (maybe_packed launched the
    // histogram on the v2 planner, the only planner packed runs on).
    if (planner != NSA_PATH_VARLEN_V2) {
      setmsg(msg, msglen, "packed path needs the v2 planner");
      return NSA_ERR_INTERNAL;
    }
    const long long slots = nsa_cuda_pack_slots(hsum.pk_cnt);  // padded keys
    if (slots >= (1LL << 31)) {
      setmsg(msg, msglen, "packed path supports < 2^31 padded keys (got %lld)", slots);
      return NSA_ERR_UNSUPPORTED;
    }
    const size_t es = nsa_dtype_size(d.dtype);
    nsa_plan_layout_t pl;
    size_t pplan_off = L.end_plan;
    size_t pscr_off = align256(pplan_off + nsa_plan_layout(d.rows, 1, &pl));
    const size_t pscr_bytes = nsa_cuda_pack_scratch_bytes(d.rows);
    size_t kp_off = align256(pscr_off + pscr_bytes);
    size_t vp_off = align256(kp_off + (size_t)slots * d.Dk * es);
    size_t pieces_off = align256(vp_off + (size_t)slots * d.Dv * es);
    packed_kv = (size_t)slots * (size_t)(d.Dk + d.Dv) * es;
    const int Pg = nsa_cuda_qtiles(d.Dk, d.Dv, 1, ctx->qt_max);
    int64_t ng = nsa_cuda_num_groups(d.B, d.S, d.G, Pg);
    size_t gcount_off = align256(pieces_off + (size_t)ng * nsa_cuda_max_pieces(1, Pg) * sizeof(nsa_cuda_piece_t));
    used = align256(gcount_off + (size_t)ng * sizeof(int2));
    st = arena_reserve(ctx, used, L.end_plan, msg, msglen);
    if (st) return st;
    ws = (char *)ctx->arena;
    dsum = (nsa_cuda_summary_t *)(ws + L.sum);
    nsa_plan_bind(&plan, ws + L.plan, d.rows, d.n);
    nsa_plan_t pplan;
    nsa_plan_bind(&pplan, ws + pplan_off, d.rows, 1);
    CK(nsa_cuda_launch_pack(&plan, dsum, d.B, d.S, d.G, &a->k, &a->v, d.Dk, d.Dv, ws + pscr_off, pscr_bytes,
                            ws + kp_off, ws + vp_off, slots, &pplan, ctx->stream),
       "packed gather launch");
    at.k = ws + kp_off;
    at.v = ws + vp_off;
    at.ks[0] = 0, at.ks[1] = d.Dk, at.ks[2] = 0, at.ks[3] = 1;
    at.vs[0] = 0, at.vs[1] = d.Dv, at.vs[2] = 0, at.vs[3] = 1;
    at.n = 1;
    at.invalid = &dsum->invalid;
    const int mma = q_ok && nsa_cuda_mma_supported(d.dtype, d.Dk, d.Dv);
    st = run_attention(ctx, &at, d.dtype, 1, mma, &pplan, (nsa_cuda_piece_t *)(ws + pieces_off),
                       (int2 *)(ws + gcount_off), msg, msglen);
    if (st) return st;
  } else {
    const int aligned = q_ok && aligned16(&a->k) && aligned16(&a->v);
    const int mma = aligned && nsa_cuda_mma_supported(d.dtype, d.Dk, d.Dv);
    // Key-block-centric forward (fwd_key.h) wherever it is built (measured
    // faster than the query-centric kernel at every h on random selections,
    // docs/PERF.md); it needs its inversion and one row batch of partials in
    // the arena. If they do not fit (cap, or out of device memory) the
    // query-centric kernel runs instead.
    // Row-block forward (fwd_rows.h) at h = 16 (Dk = 128 or 192, Dv = 128): no partials
    // and no workspace beyond the plan. Auto only while the forward kernel
    // is not forced (NSA_CUDA_FWD_KEY=0|1 keep the kernel they name: tests,
    // A/B); NSA_CUDA_FWD_ROWS=0|1 overrides per request.
    nsa_cuda_fwd_rows_t RM;
    const int rows_fwd = nsa_cuda_fwd_rows_plan(&at, d.dtype, a->sel.kind, a->sel.block_size, aligned,
                                                ctx->fwd_key == -1 ? -1 : 0, &RM);
    if (rows_fwd) {
      // The row grouping's order (B * G * S int32) after the plan; without
      // room for it the rows run in t order (same outputs, bitwise).
      int32_t *ord = NULL;
      const size_t ob = nsa_cuda_fwd_rows_ws_bytes(&at, &RM);
      if (ob > 0) {
        const size_t off = align256(used);
        int got = 0;
        st = arena_grow_optional(ctx, off + ob, L.end_plan, &ws, &dsum, &plan, &L, &d, &at, &got, msg, msglen);
        if (st) return st;
        if (got) {
          ord = (int32_t *)(ws + off);
          used = off + ob;
        }
      }
      // The grouping lists the rows' tiles from the selection itself, so a
      // deferred planner runs beside it on the side stream (forked and
      // joined by events: capturable), off the kernel's critical path.
      cudaEvent_t plan_ready = NULL;
      if (plan_deferred) {
        const int beside = ord != NULL;  // the grouping runs
        if (beside) {
          CK(cudaEventRecord(ctx->fork_ev, ctx->stream), "fork");
          CK(cudaStreamWaitEvent(ctx->side, ctx->fork_ev, 0), "fork");
        }
        CK(launch_planner(&sv, &d, &plan, dsum, ws, &L, 0, beside ? ctx->side : ctx->stream), "v2 planner launch");
        if (beside) {
          CK(cudaEventRecord(ctx->join_ev, ctx->side), "join");
          plan_ready = ctx->join_ev;
        }
        plan_deferred = 0;
      }
      CK(nsa_cuda_launch_fwd_rows(&at, d.dtype, &plan, &RM, ord, &sv, plan_ready, ctx->stream),
         "row-block forward launch");
    }
    if (plan_deferred)  // the other kernels read the plan: planner first, on the stream
      CK(launch_planner(&sv, &d, &plan, dsum, ws, &L, 0, ctx->stream), "v2 planner launch");
    nsa_cuda_fwd_key_layout_t KL;
    int key = !rows_fwd && nsa_cuda_fwd_key_plan(&at, d.dtype, a->sel.kind, a->sel.block_size, aligned,
                                                 ctx->fwd_key, used, &KL);
    if (key) {
      int got = 0;
      st = arena_grow_optional(ctx, KL.end, L.end_plan, &ws, &dsum, &plan, &L, &d, &at, &got, msg, msglen);
      if (st) return st;
      key = got;
      if (key) {
        CK(nsa_cuda_launch_fwd_key(&at, d.dtype, &plan, ws, &KL, ctx->stream), "key-centric forward launch");
        used = KL.end;
      }
    }
    if (!key && !rows_fwd) {
      st = run_attention(ctx, &at, d.dtype, P, mma, &plan, (nsa_cuda_piece_t *)(ws + L.pieces),
                         (int2 *)(ws + L.gcount), msg, msglen);
      if (st) return st;
    }
  }
  // packed: its padded K/V workspace, sum_b rows_b * Lpad_b * (Dk + Dv) * es
  // (the arena also holds the plan, as on v2); varlen: the plan's arena bytes.
  info->workspace_bytes = path == NSA_PATH_PACKED ? packed_kv : used;

  if (ex && ex->done_event) CK(cudaEventRecord((cudaEvent_t)ex->done_event, ctx->stream), "done_event");
  if (sync) {
    CK(cudaEventRecord(ctx->ev2, ctx->stream), "event record");
    CK(cudaStreamSynchronize(ctx->stream), "forward");
    float ms = 0.f;
    if (planner == NSA_PATH_VARLEN_V2 && cudaEventElapsedTime(&ms, ctx->ev0, ctx->ev1) == cudaSuccess)
      info->plan_us = ms * 1e3;
    if (cudaEventElapsedTime(&ms, ctx->ev0, ctx->ev2) == cudaSuccess) info->device_us = ms * 1e3;
    else info->device_us = now_us() - t_start;
    cudaGetLastError();
  } else {
    CK(cudaGetLastError(), "forward");
  }
  return NSA_OK;
}

// ---- accessors for the backward (bwd_request.cu, declared in bwd_internal.h;
// added by helper cuda-bwd: nsa_cuda_sel_bwd lives in bwd_request.cu) ----
#include "bwd_internal.h"

extern "C" void nsa_cuda_ctx_view(nsa_cuda_ctx_t *ctx, nsa_cuda_ctx_view_t *v) {
  v->device = ctx->device;
  v->stream = ctx->stream;
  v->h_sum = ctx->h_sum;
  v->ev0 = ctx->ev0;
  v->ev1 = ctx->ev1;
  v->ev2 = ctx->ev2;
  v->side = ctx->side;
  v->fork_ev = ctx->fork_ev;
  v->join_ev = ctx->join_ev;
  v->free_ev = ctx->free_ev;
  v->fatal = ctx->fatal;
}

extern "C" int nsa_cuda_ctx_arena(nsa_cuda_ctx_t *ctx, size_t need, size_t keep, void **base, char *msg,
                                  size_t msglen) {
  int st = arena_reserve(ctx, need, keep, msg, msglen);
  *base = ctx->arena;
  return st;
}

extern "C" int nsa_cuda_ctx_fail(nsa_cuda_ctx_t *ctx, cudaError_t e, const char *what, char *msg,
                                 size_t msglen) {
  return fail(ctx, e, what, msg, msglen);
}

extern "C" int nsa_cuda_ctx_plan_v1(nsa_cuda_ctx_t *ctx, const nsa_selection_t *sel, const nsa_dims_t *d,
                                    void *dplan_buf, nsa_cuda_summary_t *sum, char *msg, size_t msglen) {
  return plan_v1(ctx, sel, d, NULL, dplan_buf, sum, msg, msglen);
}

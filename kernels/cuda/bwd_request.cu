// bwd_request.cu — nsa_cuda_sel_bwd (sel_attn_cuda.h): the CUDA backward request.
//
// Flow (bwd_internal.h has the index maps):
//   check → wait_event → plan (v2 on the device / v1 on the host, the forward's
//   planners) → [summary on the host where needed] → path →
//   preprocess (delta, lse copy; done by the row-block dq itself where it
//   runs before dk/dv) → dq (row-block or query-centric; `packed` gathers K/V
//   first and runs dq over the packed rows; with the key-centric dq: the
//   shared-tile groups' select + gate and their dq on chip, bwd_shared.h) →
//   per row batch: invert the plan → dk/dv (key-centric, segments + ordered
//   partial reduction) [+ key-centric dq of the other rows and its
//   reduction | + the row-block dq from the dS dk/dv stored (choose_ds):
//   then no dq before dk/dv] → done_event → [sync].
// Deterministic: no float atomics anywhere; two runs are bitwise identical.
//
// Host synchronization happens where the forward has it (sync = 1, v1, the
// packed path and MIN_L > 0), plus once for a `ranges` selection: the
// inversion's pair capacity is bounded without the plan for block ids
// (n * tiles-per-block per row), but a range can be any length, so the bound
// then uses the plan's total length. With block ids on v2 and sync = 0 the
// whole backward is queued without a host wait (graph-capturable).
//
// NSA_BWD_TIMING=1 (development): with sync = 1, prints the time of each
// phase (preprocess, dq, inversion, dk/dv) to stderr, measured with events;
// NSA_BWD_SEG=<rows> overrides the rows per dk/dv segment (benchmarks).
// dq is row-block (fwd_rows.h: h = 16, Dk = Dv = 128, block ids, sm_90;
// each row's tiles summed on chip, so dk/dv run without dq in one batch),
// else query-centric (bwd_dq.cu) or, wherever the tensor-core dk/dv kernel
// supports it, key-centric: the dk/dv kernel writes per-(pair, head) partials that a
// reduction sums per row in pair order (choose_dq_rows: row batches bound the
// partials, bwd_internal.h has the accumulator); with key-centric dq
// the "dq" phase time is ~0 and the work shows under "dkdv".
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bwd_internal.h"
#include "bwd_shared.h"
#include "fwd_rows.h"

namespace {

void setmsg(char *msg, size_t len, const char *fmt, ...) {
  if (msg == NULL || len == 0) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, len, fmt, ap);
  va_end(ap);
}

size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

double now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int aligned16(const nsa_tensor_t *t) {
  if (((uintptr_t)t->data & 15) != 0) return 0;
  if (t->stride[3] != 1) return 0;
  for (int i = 0; i < 3; i++)
    if (t->stride[i] % 8 != 0) return 0;
  return 1;
}

// Budget for the f32 partials of long tile lists (sets the segment length).
constexpr double kPartBudget = 256.0 * 1024 * 1024;

struct Layout {
  // part 1: plan and per-(row, head) scalars
  size_t sum, plan, len64, ptemp, ptemp_bytes, pieces, gcount, delta, lsec, end1;
  // part 2: inversion, partials, packed buffers
  size_t inv, inv2, part, dqp, ds, acc, pplan, pscr, pscr_bytes, kp, vp, ppieces, pgcount, end;
  nsa_cuda_inv_layout_t il;  // the inversion of one row batch
  int64_t cap;               // pair bound of all rows
  int64_t brows, bcap;       // rows per batch (all rows unless the key-centric dq or dS is batched), its pair bound
  int64_t items_bound, NT;   // items_bound: for a batch of brows rows
  int seg_rows;
  nsa_cuda_fwd_shared_layout_t sh;  // shared-tile groups (bwd_shared.h); sh.on = 0 when not used
};

// The forward's view of the dims, for the shared-tile group selection
// (fwd_shared.h reads B, S, Skv, G, h, Dk, Dv, n and invalid).
void shared_view(const nsa_dims_t *d, const long long *invalid, nsa_cuda_attn_t *sa) {
  memset(sa, 0, sizeof(*sa));
  sa->B = d->B;
  sa->S = d->S;
  sa->Skv = d->Skv;
  sa->G = d->G;
  sa->h = d->h;
  sa->Dk = d->Dk;
  sa->Dv = d->Dv;
  sa->n = d->n;
  sa->invalid = invalid;
}

void layout1(const nsa_dims_t *d, int P, Layout *L) {
  nsa_plan_layout_t pl;
  size_t o = 0;
  L->sum = o;
  o = align256(o + sizeof(nsa_cuda_summary_t));
  L->plan = o;
  o = align256(o + nsa_plan_layout(d->rows, d->n, &pl));
  L->len64 = o;
  o = align256(o + (size_t)(d->rows + 1) * 8);
  L->ptemp_bytes = nsa_cuda_plan_v2_temp_bytes(d->rows);
  L->ptemp = o;
  o = align256(o + L->ptemp_bytes);
  const int64_t ng = nsa_cuda_num_groups(d->B, d->S, d->G, P);
  L->pieces = o;
  o = align256(o + (size_t)ng * nsa_cuda_max_pieces(d->n, P) * sizeof(nsa_cuda_piece_t));
  L->gcount = o;
  o = align256(o + (size_t)ng * sizeof(int2));
  L->delta = o;
  o = align256(o + (size_t)d->rows * d->h * 4);
  L->lsec = o;
  o = align256(o + (size_t)d->rows * d->h * 4);
  L->end1 = o;
}

// Part 2 once the pair capacity (and, for packed, the padded key slots of its
// length buckets, nsa_cuda_pack_slots) is known. dq_rows: 0 = query-centric
// dq; else the key-centric dq's rows per batch (== d->rows: one batch).
// ds_rows (with dq_rows = 0): the row-block dq from dS's rows per batch, 0
// without dS. Several batches need block ids (cap = rows * per-row bound)
// and an f32 dk/dv accumulator (bwd_internal.h).
void layout2(const nsa_dims_t *d, int64_t cap, int packed, int64_t slots, int64_t dq_rows, Layout *L,
             int64_t ds_rows = 0) {
  L->cap = cap;
  L->brows = dq_rows > 0 && dq_rows < d->rows ? dq_rows : d->rows;
  if (dq_rows <= 0 && ds_rows > 0 && ds_rows < d->rows) L->brows = ds_rows;  // the dq from dS, batched
  L->bcap = L->brows == d->rows ? cap : L->brows * (cap / d->rows);
  L->NT = (d->Skv + NSA_BWD_TILE - 1) / NSA_BWD_TILE;
  const int64_t ntiles = d->B * d->G * L->NT;
  // Rows per dk/dv segment: 1024 (the kernel's staging window) was fastest at
  // every h in an H200 sweep (docs/PERF.md, T = 16k, 64..4096 rows).
  // Fewer rows where the pairs are few, so small requests still fill the GPU
  // (>= ~512 CTA items).
  int64_t seg = L->bcap / 512;
  if (seg > 1024) seg = 1024;
  if (seg < 64) seg = 64;
  // At h >= 8 an item of 1024 rows is long (rows x h columns): when the items
  // would be under ~1024 (the tiles plus the extra segments' bound; ~4 waves
  // of the two-CTA-per-SM kernel on 132 SMs) their tail shows, and 512 rows
  // balance it. H100, T = 8k h = 8 random backward 2.55-2.59 -> 2.42-2.44
  // ms; at T = 16k (1024 tiles) 512 was slower (4.71 -> 4.85), and at h < 8
  // the short items only add prologues (H200, 8k: h = 1 +1 %, h = 4 corr
  // +3.5 %; docs/PERF.md). A constant, not the SM count, so the result does
  // not depend on the GPU model.
  if (seg == 1024 && d->h >= 8 && ntiles + L->bcap / 1024 <= 1024) seg = 512;
  const char *se = getenv("NSA_BWD_SEG");  // development knob: rows per segment
  if (se && atoll(se) > 0) seg = atoll(se);
  const double slot = (double)NSA_BWD_TILE * (double)(d->Dk + d->Dv) * 4.0;
  const double need = 2.0 * (double)L->bcap * slot / kPartBudget;
  if ((double)seg < need) seg = (int64_t)need + 1;
  if (seg > 0x3fffffff) seg = 0x3fffffff;
  L->seg_rows = (int)seg;
  const int64_t nparts = 2 * L->bcap / seg + 1;
  L->items_bound = ntiles + L->bcap / seg + 1;
  size_t o = L->end1;
  L->inv = o;
  const size_t inv_bytes = nsa_cuda_inv_layout(L->brows, L->bcap, ntiles, &L->il);
  o = align256(o + inv_bytes);
  // Several batches: a second inversion area, so batch k + 1's inversion
  // (on the side stream) runs while batch k's dk/dv and dq reduction still
  // read batch k's. Batch k uses inv (k even) or inv2 (k odd).
  L->inv2 = L->inv;
  if (L->brows < d->rows) {
    L->inv2 = o;
    o = align256(o + inv_bytes);
  }
  L->part = o;
  o = align256(o + (size_t)nparts * (size_t)slot);
  L->dqp = o;
  if (dq_rows > 0) o = align256(o + (size_t)L->bcap * d->h * d->Dk * 4);
  L->ds = o;  // the row-block dq from dS: h x 64 dtype elements per pair of a batch
  if (ds_rows > 0) o = align256(o + (size_t)L->bcap * d->h * NSA_BWD_TILE * nsa_dtype_size(d->dtype));
  L->acc = o;
  if (L->brows < d->rows) o = align256(o + (size_t)ntiles * (size_t)slot);
  L->pplan = L->pscr = L->kp = L->vp = L->ppieces = L->pgcount = o;
  L->pscr_bytes = 0;
  if (packed) {
    const size_t es = nsa_dtype_size(d->dtype);
    nsa_plan_layout_t pl;
    o = align256(o + nsa_plan_layout(d->rows, 1, &pl));
    L->pscr = o;
    L->pscr_bytes = nsa_cuda_pack_scratch_bytes(d->rows);
    o = align256(o + L->pscr_bytes);
    L->kp = o;
    o = align256(o + (size_t)slots * d->Dk * es);
    L->vp = o;
    o = align256(o + (size_t)slots * d->Dv * es);
    const int64_t ng = nsa_cuda_num_groups(d->B, d->S, d->G, 1);
    L->ppieces = o;
    o = align256(o + (size_t)ng * nsa_cuda_max_pieces(1, 1) * sizeof(nsa_cuda_piece_t));
    L->pgcount = o;
    o = align256(o + (size_t)ng * sizeof(int2));
  }
  // Shared-tile groups: only with the key-centric dq, whose partials they
  // replace (rows * ~256 bytes of tile lists and masks).
  memset(&L->sh, 0, sizeof(L->sh));
  if (dq_rows > 0 && !packed && nsa_cuda_bwd_shared_ok(d->dtype, d->h, d->Dk, d->Dv)) {
    nsa_cuda_attn_t sa;
    shared_view(d, NULL, &sa);
    if (nsa_cuda_fwd_shared_plan(&sa, d->dtype, o, &L->sh)) o = L->sh.end;
  }
  L->end = o;
}

// Key-centric dq (partials per (pair, head), bwd_internal.h) wherever the
// tensor-core kernel supports it: the query-centric dq re-reads every K/V
// tile per query group. (H200, T=16k G=4 D=128 n=16 bf16, whole backward:
// h=1 1.6 vs 5.6 ms, h=4 4.6 vs 10.6, h=16 13.3 vs 19.8.) Its f32 partials,
// cap*h*Dk*4 bytes, are bounded by running the rows in batches of at most
// kDqPartBudget of partials (block ids; a `ranges` selection has no per-row
// pair bound, so it takes the key-centric dq only when all rows fit one
// batch). Returns the rows per batch, 0 for the query-centric dq.
// NSA_BWD_DQ=query|key forces a mode (key: still batched);
// NSA_BWD_DQ_BATCH_ROWS caps the rows per batch (tests: several batches);
// NSA_BWD_DQ_BUDGET_MB sets the budget (docs/OPERATIONS.md: fewer batches
// are faster, for as much more workspace).
constexpr double kDqPartBudget = 4.0 * 1024 * 1024 * 1024;
double dq_budget(void) {
  const char *me = getenv("NSA_BWD_DQ_BUDGET_MB");
  return me && atof(me) > 0 ? atof(me) * 1024.0 * 1024.0 : kDqPartBudget;
}

// Rows per batch for per_row bytes of per-pair buffers per row within the
// budget (NSA_BWD_DQ_BATCH_ROWS caps it), 0 when not even one row fits.
int64_t rows_per_batch(const nsa_dims_t *d, double per_row) {
  int64_t br = per_row > 0 ? (int64_t)(dq_budget() / per_row) : d->rows;
  const char *be = getenv("NSA_BWD_DQ_BATCH_ROWS");
  if (be && atoll(be) > 0 && atoll(be) < br) br = atoll(be);
  if (br > d->rows) br = d->rows;
  return br >= 1 ? br : 0;
}

int64_t choose_dq_rows(const nsa_dims_t *d, int64_t cap, int ranges, int tc_ok) {
  if (!tc_ok || !nsa_cuda_bwd_dq_key_ok(d->dtype, d->Dk, d->Dv) || d->rows <= 0) return 0;
  const char *e = getenv("NSA_BWD_DQ");
  if (e && strcmp(e, "query") == 0) return 0;
  const double per_row = (double)cap / (double)d->rows * (double)d->h * (double)d->Dk * 4.0;
  if (ranges) return per_row * (double)d->rows <= dq_budget() ? d->rows : 0;
  return rows_per_batch(d, per_row);
}

// The row-block dq from dS (nsa_cuda_bwd_t::ds) where it runs: the wgmma
// dk/dv kernel, which computes dS anyway, stores it (rounded to the dtype,
// as both dq kernels use it) as the dq's A fragments, and the row-block dq
// then runs one product per (row, tile), dQ += dS K, over a ring of K
// alone, instead of recomputing S = Q K^T, dP = dO V^T and dS from Q, dO,
// K and V. Needs the row-block dq (rows_dq), h = 16 (a wgmma chunk is two
// rows) and the wgmma dk/dv kernel. dS takes 2 KB per pair; like the
// key-centric dq's partials (8 KB per pair) it is bounded by running the
// rows in batches of at most kDqPartBudget of dS (NSA_BWD_DQ_BUDGET_MB and
// NSA_BWD_DQ_BATCH_ROWS as for those). Returns the rows per batch, 0 for the
// dq that recomputes dS. NSA_CUDA_BWD_DS=0 turns it off (A/B runs, tests).
int64_t choose_ds(const nsa_dims_t *d, const nsa_cuda_bwd_t *view, int64_t cap, int rows_dq) {
  const char *e = getenv("NSA_CUDA_BWD_DS");
  if (!rows_dq || (e && e[0] == '0') || d->h != 16 || d->rows <= 0) return 0;
  if (!nsa_cuda_dkdv_wgmma_ok(view, d->dtype)) return 0;
  return rows_per_batch(d, (double)cap / (double)d->rows * (double)d->h * NSA_BWD_TILE *
                               (double)nsa_dtype_size(d->dtype));
}

void summary_to_info(const nsa_cuda_summary_t *s, const nsa_dims_t *d, nsa_run_info_t *info) {
  info->rows = d->rows;
  info->max_len = s->max_len;
  info->mean_len = d->rows ? (double)s->total / (double)d->rows : 0.0;
  info->invalid = s->invalid;
  for (int i = 0; i < NSA_LEN_HIST_BUCKETS; i++) info->len_hist[i] = s->hist[i];
}

void fill_bwd(nsa_cuda_bwd_t *at, const nsa_bwd_args_t *a, const nsa_dims_t *d, const long long *invalid,
              const float *delta, const float *lsec) {
  memset(at, 0, sizeof(*at));
  at->q = a->q.data;
  at->k = a->k.data;
  at->v = a->v.data;
  at->o = a->o.data;
  at->dout = a->dout.data;
  at->lse = (const float *)a->lse.data;
  at->dq = a->dq.data;
  at->dk = a->dk.data;
  at->dv = a->dv.data;
  for (int i = 0; i < 4; i++) {
    at->qs[i] = a->q.stride[i];
    at->ks[i] = a->k.stride[i];
    at->vs[i] = a->v.stride[i];
    at->os[i] = a->o.stride[i];
    at->dos[i] = a->dout.stride[i];
    at->dqs[i] = a->dq.stride[i];
    at->dks[i] = a->dk.stride[i];
    at->dvs[i] = a->dv.stride[i];
  }
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
  at->delta = delta;
  at->lsec = lsec;
}

}  // namespace

#define BCK(call, what)                                                   \
  do {                                                                    \
    cudaError_t e_ = (call);                                              \
    if (e_ != cudaSuccess) return nsa_cuda_ctx_fail(ctx, e_, what, msg, msglen); \
  } while (0)

extern "C" int nsa_cuda_sel_bwd(nsa_cuda_ctx_t *ctx, const nsa_bwd_args_t *a, const nsa_path_flags_t *flags,
                                nsa_path_t force_path, const nsa_cuda_exec_t *ex, nsa_run_info_t *info,
                                char *msg, size_t msglen) {
  nsa_run_info_t dummy;
  if (!info) info = &dummy;
  memset(info, 0, sizeof(*info));
  info->path = NSA_PATH_AUTO;
  nsa_cuda_ctx_view_t cv;
  nsa_cuda_ctx_view(ctx, &cv);
  if (cv.fatal) {
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
  int st = nsa_bwd_check(a, &d, msg, msglen);
  if (st) return st;
  if (d.Dk > NSA_CUDA_SIMPLE_MAX_D || d.Dv > NSA_CUDA_SIMPLE_MAX_D) {
    setmsg(msg, msglen, "CUDA backward supports Dk, Dv <= %d (got Dk=%lld, Dv=%lld)", NSA_CUDA_SIMPLE_MAX_D,
           (long long)d.Dk, (long long)d.Dv);
    return NSA_ERR_UNSUPPORTED;
  }
  if (d.Skv >= (1LL << 27) || d.S >= (1LL << 31)) {
    setmsg(msg, msglen, "CUDA backend supports Skv < 2^27 and S < 2^31 (got Skv=%lld, S=%lld)",
           (long long)d.Skv, (long long)d.S);
    return NSA_ERR_UNSUPPORTED;
  }
  if (a->sel.kind == NSA_SEL_BLOCK_INDICES && a->sel.block_size <= 0) {
    setmsg(msg, msglen, "sel.block_size must be > 0");
    return NSA_ERR_BAD_REQUEST;
  }
  if (a->lse.dtype != NSA_F32 || a->lse.data == NULL) {
    setmsg(msg, msglen, "lse (f32 [B,S,H]) is required for the backward");
    return NSA_ERR_BAD_REQUEST;
  }
  info->rows = d.rows;
  BCK(cudaSetDevice(cv.device), "cudaSetDevice");
  const double t_start = now_us();
  cudaStream_t stream = cv.stream;

  const nsa_path_t planner = force_path == NSA_PATH_AUTO ? nsa_planner_for_flags(flags)
                             : force_path == NSA_PATH_VARLEN_V1 ? NSA_PATH_VARLEN_V1
                                                                : NSA_PATH_VARLEN_V2;
  const int maybe_packed = force_path == NSA_PATH_PACKED ||
                           (force_path == NSA_PATH_AUTO &&
                            (!flags->use_sel_varlen || (flags->sel_varlen_v2 && flags->sel_varlen_min_l > 0)));
  const int ranges = a->sel.kind == NSA_SEL_RANGES;
  const int need_summary = sync || maybe_packed || planner == NSA_PATH_VARLEN_V1 || ranges;

  const int P = nsa_cuda_pack_queries(d.h);
  Layout L;
  layout1(&d, P, &L);
  const int64_t NT = (d.Skv + NSA_BWD_TILE - 1) / NSA_BWD_TILE;
  // Block ids: the pair capacity needs no plan; reserve everything up front.
  int64_t cap = 0;
  const int tc_ok = nsa_cuda_mma_supported(d.dtype, d.Dk, d.Dv) && aligned16(&a->q) && aligned16(&a->dout) &&
                    aligned16(&a->k) && aligned16(&a->v);
  // The row-block dq (fwd_rows.h: h = 16, Dk = Dv = 128, block ids, sm_90)
  // sums each row's tiles on chip: no dq partials, so one batch.
  nsa_cuda_fwd_rows_t rows_m;
  int rows_dq = 0;
  nsa_cuda_bwd_t view;  // the request's tensors, for the kernels' conditions (filled when rows_dq can be set)
  if (!ranges && !maybe_packed) {
    fill_bwd(&view, a, &d, NULL, NULL, NULL);
    rows_dq = nsa_cuda_bwd_rows_plan(&view, d.dtype, a->sel.kind, a->sel.block_size, tc_ok, &rows_m);
  }
  int64_t dq_rows0 = 0;  // block ids: the key-centric dq's rows per batch
  int64_t rows_ds = 0;   // the row-block dq from dS: rows per batch (choose_ds)
  if (!ranges) {
    cap = d.rows * nsa_cuda_inv_row_bound_blocks(d.n, a->sel.block_size, NT);
    dq_rows0 = rows_dq ? 0 : choose_dq_rows(&d, cap, 0, tc_ok);
    if (rows_dq && tc_ok) rows_ds = choose_ds(&d, &view, cap, rows_dq);
    layout2(&d, cap, 0, 0, dq_rows0, &L, rows_ds);
  } else {
    L.end = L.end1;
  }
  if (cap >= 0x7fffffff) {
    setmsg(msg, msglen, "CUDA backward supports < 2^31 (row, key tile) pairs (bound %lld)", (long long)cap);
    return NSA_ERR_UNSUPPORTED;
  }
  void *arena = NULL;
  st = nsa_cuda_ctx_arena(ctx, L.end, 0, &arena, msg, msglen);
  // Over the workspace cap (or the device's memory) with per-pair buffers
  // in row batches (the key-centric dq's f32 partials or the dq's dS; at
  // most one of dq_rows0 / rows_ds is set): halve the rows per batch, up to
  // 5 times (each batch costs a pass of dk/dv over every tile, yet 16
  // batches of partials still beat the query-centric dq: H200, T = 64k h = 8
  // random, 31.6 vs 46.5 ms), then size without them (the query-centric dq,
  // or the row-block dq that recomputes dS).
  int64_t *batched = rows_ds > 0 ? &rows_ds : dq_rows0 > 0 ? &dq_rows0 : NULL;
  auto relayout = [&] {
    layout2(&d, cap, 0, 0, dq_rows0, &L, rows_ds);
    return nsa_cuda_ctx_arena(ctx, L.end, 0, &arena, msg, msglen);
  };
  for (int i = 0; i < 5 && st == NSA_ERR_BUSY && batched && *batched > 1; i++) {
    *batched /= 2;
    st = relayout();
  }
  if (st == NSA_ERR_BUSY && batched && *batched > 0) {
    *batched = 0;
    st = relayout();
  }
  if (st) return st;
  char *ws = (char *)arena;
  nsa_cuda_summary_t *dsum = (nsa_cuda_summary_t *)(ws + L.sum);
  nsa_plan_t plan;
  nsa_plan_bind(&plan, ws + L.plan, d.rows, d.n);

  if (ex && ex->wait_event) BCK(cudaStreamWaitEvent(stream, (cudaEvent_t)ex->wait_event, 0), "wait_event");
  if (sync) BCK(cudaEventRecord(cv.ev0, stream), "event record");

  nsa_cuda_summary_t hsum;
  memset(&hsum, 0, sizeof(hsum));
  const double plan_t0 = now_us();
  if (planner == NSA_PATH_VARLEN_V1) {
    st = nsa_cuda_ctx_plan_v1(ctx, &a->sel, &d, ws + L.plan, &hsum, msg, msglen);
    if (st) return st;
    BCK(cudaMemcpyAsync(dsum, &hsum, sizeof(hsum), cudaMemcpyHostToDevice, stream), "summary copy");
    BCK(cudaStreamSynchronize(stream), "v1 plan copy");  // hsum is on the stack
    info->plan_us = now_us() - plan_t0;
  } else {
    const nsa_cuda_selview_t sv = nsa_cuda_selview_of(&a->sel);
    BCK(nsa_cuda_launch_plan_v2(&sv, d.B, d.S, d.Skv, d.G, d.n, &plan, dsum, (int64_t *)(ws + L.len64),
                                ws + L.ptemp, L.ptemp_bytes, maybe_packed, stream),
        "v2 planner launch");
    // packed sizes its padded K/V by the bucket counts (same summary copy)
    if (maybe_packed) BCK(nsa_cuda_launch_pack_hist(&plan, dsum, stream), "packed histogram launch");
    if (sync) BCK(cudaEventRecord(cv.ev1, stream), "event record");
    if (need_summary) {
      BCK(cudaMemcpyAsync(cv.h_sum, dsum, sizeof(*dsum), cudaMemcpyDeviceToHost, stream), "summary copy");
      BCK(cudaStreamSynchronize(stream), "v2 planner");
      hsum = *cv.h_sum;
    }
  }
  if (need_summary) {
    summary_to_info(&hsum, &d, info);
    if (hsum.invalid > 0) {
      setmsg(msg, msglen,
             "invalid selection: %lld bad entries (ids < -1 or >= ceil(Skv/block_size), "
             "or spans with start < 0 or start > end)",
             hsum.invalid);
      return NSA_ERR_INVALID_SELECTION;
    }
  }
  const nsa_path_t path = force_path != NSA_PATH_AUTO ? force_path
                          : need_summary              ? nsa_choose_path(flags, hsum.max_len)
                                                      : planner;
  info->path = path;
  const int packed = path == NSA_PATH_PACKED;
  if (packed && planner != NSA_PATH_VARLEN_V2) {  // the bucket counts come from the v2 flow
    setmsg(msg, msglen, "packed path needs the v2 planner");
    return NSA_ERR_INTERNAL;
  }
  const long long slots = packed ? nsa_cuda_pack_slots(hsum.pk_cnt) : 0;  // padded keys
  if (slots >= (1LL << 31)) {
    setmsg(msg, msglen, "packed path supports < 2^31 padded keys (got %lld)", slots);
    return NSA_ERR_UNSUPPORTED;
  }

  // Part 2 (sizes that need the plan's summary), keeping part 1 on growth.
  if (ranges) {
    const int64_t by_len = hsum.total / NSA_BWD_TILE + 2 * d.rows * d.n + 1;
    const int64_t by_tiles = d.rows * NT;
    cap = by_len < by_tiles ? by_len : by_tiles;
    if (cap >= 0x7fffffff) {
      setmsg(msg, msglen, "CUDA backward supports < 2^31 (row, key tile) pairs (bound %lld)", (long long)cap);
      return NSA_ERR_UNSUPPORTED;
    }
  }
  int64_t dq_rows = packed ? 0 : ranges ? choose_dq_rows(&d, cap, 1, tc_ok) : dq_rows0;  // block ids: part 1's
  int dq_key = dq_rows > 0;
  if (packed) rows_ds = 0;
  layout2(&d, cap, packed, slots, dq_rows, &L, rows_ds);
  st = nsa_cuda_ctx_arena(ctx, L.end, L.end1, &arena, msg, msglen);
  if (st == NSA_ERR_BUSY && rows_ds) {
    rows_ds = 0;
    layout2(&d, cap, packed, slots, dq_rows, &L);
    st = nsa_cuda_ctx_arena(ctx, L.end, L.end1, &arena, msg, msglen);
  }
  if (st == NSA_ERR_BUSY && dq_key) {  // as above: fall back to the query-centric dq
    dq_key = 0;
    dq_rows = 0;
    layout2(&d, cap, packed, slots, 0, &L);
    st = nsa_cuda_ctx_arena(ctx, L.end, L.end1, &arena, msg, msglen);
  }
  if (st) return st;
  ws = (char *)arena;
  dsum = (nsa_cuda_summary_t *)(ws + L.sum);
  nsa_plan_bind(&plan, ws + L.plan, d.rows, d.n);

  nsa_cuda_bwd_t at;
  fill_bwd(&at, a, &d, &dsum->invalid, (const float *)(ws + L.delta), (const float *)(ws + L.lsec));
  const int mma_dims = nsa_cuda_mma_supported(d.dtype, d.Dk, d.Dv);
  const int qo_ok = aligned16(&a->q) && aligned16(&a->dout);
  const int kv_ok = aligned16(&a->k) && aligned16(&a->v);

  // Optional phase timing (NSA_BWD_TIMING=1, sync only).
  const char *tenv = getenv("NSA_BWD_TIMING");
  const int timing = sync && tenv && tenv[0] == '1';
  cudaEvent_t pev[6] = {0, 0, 0, 0, 0, 0};
  if (timing)
    for (int i = 0; i < 6; i++) cudaEventCreate(&pev[i]);
  if (timing) cudaEventRecord(pev[0], stream);
  // dk/dv's first row batch needs the plan inverted (bwd_invert_plan.cu:
  // count, scan, write, sort, offsets: small grids, ~0.13 ms at T = 16k).
  // The inversion reads only the plan and writes only L.inv, which nothing
  // before dk/dv touches, so it runs on the context's side stream beside the
  // preprocess and dq: forked here, once the plan is enqueued; launched
  // after the dq (so the dq's CTAs are queued first and the inversion's
  // small grids fill the SMs its tail wave leaves idle); joined just before
  // dk/dv. With several batches, batch k + 1's inversion runs there beside
  // batch k's dk/dv, into the other of two areas (inv / inv2), once batch
  // k - 1 has stopped reading it (free_ev). Stream capture records the
  // forks / joins as graph branches.
  // Not with NSA_BWD_TIMING, whose phases are read off the one stream, and
  // not beside the row-block dq, which fills every SM one CTA each and gave
  // the overlap back (H100 backward ms, same call: 8k h = 8 random 2.39 ->
  // 2.31, 16k h = 8 corr 3.46 -> 3.37, 16k h = 8 random 4.675 -> 4.647, but
  // 16k h = 16 random 6.511 -> 6.534 and 8k h = 16 random 3.178 -> 3.193;
  // docs/PERF.md).
  // Row batch at row0: its rows, its pair bound, its inversion area.
  auto batch_rows = [&](int64_t row0) { return d.rows - row0 < L.brows ? d.rows - row0 : L.brows; };
  auto batch_cap = [&](int64_t nb) { return nb == L.brows ? L.bcap : nb * (L.cap / d.rows); };
  auto inv_of = [&](int64_t row0) { return ws + ((row0 / (L.brows > 0 ? L.brows : 1)) % 2 ? L.inv2 : L.inv); };
  auto invert = [&](int64_t row0, cudaStream_t st) {
    const int64_t nb = batch_rows(row0);
    return nsa_cuda_launch_invert_rows(&plan, d.B, d.S, d.G, L.NT, row0, nb, batch_cap(nb), L.seg_rows, NULL,
                                       inv_of(row0), &L.il, st);
  };
  const int row_block_dq = rows_dq && !packed && !dq_key;  // the dq branch below
  // dq from dS: each row batch's after its dk/dv, which writes the batch's dS.
  const int ds_dq = row_block_dq && rows_ds > 0;
  const int fork = !timing && cv.side != NULL && !row_block_dq;
  if (fork) {
    BCK(cudaEventRecord(cv.fork_ev, stream), "inversion fork");
    BCK(cudaStreamWaitEvent(cv.side, cv.fork_ev, 0), "inversion fork");
  }
  // The row-block dq computes delta and the lse copy itself (fwd_rows.h)
  // where the preprocess's 16-byte layout holds: one kernel fewer, bitwise
  // the same results. NSA_CUDA_BWD_ROWS_PRE=0 keeps the preprocess kernel
  // (A/B runs, tests).
  const char *pre_env = getenv("NSA_CUDA_BWD_ROWS_PRE");
  const int pre_in_dq = rows_dq && !packed && !dq_key && !ds_dq && nsa_cuda_bwd_pre_vec_ok(&at) &&
                        !(pre_env != NULL && pre_env[0] == '0');
  if (!pre_in_dq)
    BCK(nsa_cuda_launch_bwd_preprocess(&at, d.dtype, (float *)(ws + L.delta), (float *)(ws + L.lsec), stream),
        "backward preprocess launch");

  if (timing) cudaEventRecord(pev[1], stream);
  // ---- dq ----
  if (packed) {
    nsa_plan_t pplan;
    nsa_plan_bind(&pplan, ws + L.pplan, d.rows, 1);
    BCK(nsa_cuda_launch_pack(&plan, dsum, d.B, d.S, d.G, &a->k, &a->v, d.Dk, d.Dv, ws + L.pscr, L.pscr_bytes,
                             ws + L.kp, ws + L.vp, slots, &pplan, stream),
        "packed gather launch");
    nsa_cuda_bwd_t pa = at;
    pa.k = ws + L.kp;
    pa.v = ws + L.vp;
    pa.ks[0] = 0, pa.ks[1] = d.Dk, pa.ks[2] = 0, pa.ks[3] = 1;
    pa.vs[0] = 0, pa.vs[1] = d.Dv, pa.vs[2] = 0, pa.vs[3] = 1;
    pa.n = 1;
    if (mma_dims && qo_ok) {
      nsa_cuda_piece_t *pc = (nsa_cuda_piece_t *)(ws + L.ppieces);
      int2 *gc = (int2 *)(ws + L.pgcount);
      BCK(nsa_cuda_launch_plan_group(&pplan, d.B, d.S, d.G, 1, pc, gc, stream), "group planner launch");
      BCK(nsa_cuda_launch_bwd_dq_mma(&pa, d.dtype, 1, pc, gc, nsa_cuda_max_pieces(1, 1), stream),
          "tensor-core dq launch");
    } else {
      BCK(nsa_cuda_launch_bwd_dq_simple(&pa, d.dtype, &pplan, stream), "dq launch");
    }
  } else if (dq_key) {
    // computed with dk/dv below, except the rows of shared-tile groups: the
    // forward's group selection, then their dq on chip (bwd_shared.h)
    if (L.sh.on) {
      nsa_cuda_attn_t sa;
      shared_view(&d, &dsum->invalid, &sa);
      BCK(nsa_cuda_launch_fwd_shared_select(&sa, &plan, ws, &L.sh, stream), "shared-tile select launch");
      BCK(nsa_cuda_launch_bwd_shared_dq(&at, d.dtype, ws, &L.sh, stream), "shared-tile dq launch");
    }
  } else if (row_block_dq) {
    if (!ds_dq)  // (the dq from dS runs after each batch's dk/dv, below)
      BCK(nsa_cuda_launch_bwd_dq_rows(&at, d.dtype, &plan, &rows_m, pre_in_dq ? (float *)(ws + L.delta) : NULL,
                                      pre_in_dq ? (float *)(ws + L.lsec) : NULL, stream),
          "row-block dq launch");
  } else if (mma_dims && qo_ok && kv_ok) {
    nsa_cuda_piece_t *pc = (nsa_cuda_piece_t *)(ws + L.pieces);
    int2 *gc = (int2 *)(ws + L.gcount);
    BCK(nsa_cuda_launch_plan_group(&plan, d.B, d.S, d.G, P, pc, gc, stream), "group planner launch");
    BCK(nsa_cuda_launch_bwd_dq_mma(&at, d.dtype, P, pc, gc, nsa_cuda_max_pieces(d.n, P), stream),
        "tensor-core dq launch");
  } else {
    BCK(nsa_cuda_launch_bwd_dq_simple(&at, d.dtype, &plan, stream), "dq launch");
  }

  // ---- dk, dv (+ key-centric dq), one row batch at a time ----
  // One batch (brows = rows) writes dk/dv directly; several add into the f32
  // accumulator, written out after the last. A request with no rows still
  // runs one (empty) batch: its dk/dv are zeros.
  if (fork) {  // the first batch's inversion (above)
    BCK(invert(0, cv.side), "plan inversion launch");
    BCK(cudaEventRecord(cv.join_ev, cv.side), "inversion join");
  }
  if (timing) cudaEventRecord(pev[2], stream);
  float *acc = L.brows < d.rows ? (float *)(ws + L.acc) : NULL;
  const int64_t ntiles = d.B * d.G * L.NT;
  const unsigned char *skip = dq_key && L.sh.on ? (const unsigned char *)(ws + L.sh.skip) : NULL;
  if (acc)
    BCK(cudaMemsetAsync(acc, 0, (size_t)ntiles * NSA_BWD_TILE * (size_t)(d.Dk + d.Dv) * 4, stream),
        "accumulator clear");
  for (int64_t row0 = 0; row0 == 0 || row0 < d.rows; row0 += L.brows) {
    const int64_t nb = batch_rows(row0), bcap = batch_cap(nb);
    // With fork, the next batch (if any) is inverted on the side stream
    // beside this batch's dk/dv: its area was last read by the batch before.
    const int pipe = fork && nb > 0 && row0 + L.brows < d.rows;
    if (fork)
      BCK(cudaStreamWaitEvent(stream, cv.join_ev, 0), "inversion join");
    else
      BCK(invert(row0, stream), "plan inversion launch");
    if (pipe) {
      if (row0 > 0) BCK(cudaStreamWaitEvent(cv.side, cv.free_ev, 0), "inversion area wait");
      BCK(invert(row0 + L.brows, cv.side), "plan inversion launch");
      BCK(cudaEventRecord(cv.join_ev, cv.side), "inversion join");
    }
    if (timing && row0 == 0) cudaEventRecord(pev[3], stream);  // "invert" = the first batch's
    nsa_cuda_bwd_t adk = at;
    if (ds_dq) adk.ds = ws + L.ds;
    BCK(nsa_cuda_launch_bwd_dkdv(&adk, d.dtype, mma_dims && qo_ok && kv_ok, inv_of(row0), &L.il, L.NT,
                                 L.seg_rows, ntiles + bcap / L.seg_rows + 1, (float *)(ws + L.part),
                                 dq_key ? (float *)(ws + L.dqp) : NULL, acc, skip, stream),
        "dk/dv launch");
    if (ds_dq) {  // this batch's dq = scale * the sum of dS K over each row's pairs
      nsa_cuda_bwd_t adq = at;
      adq.ds = ws + L.ds;
      adq.ds_pair_off = (const int32_t *)(inv_of(row0) + L.il.pair_off);
      adq.ds_row0 = row0;
      adq.ds_row1 = row0 + nb;
      if (timing && row0 == 0) cudaEventRecord(pev[4], stream);  // "dq" adds the first batch's
      BCK(nsa_cuda_launch_bwd_dq_rows(&adq, d.dtype, &plan, &rows_m, NULL, NULL, stream), "row-block dq launch");
      if (timing && row0 == 0) cudaEventRecord(pev[5], stream);
    }
    if (dq_key)
      BCK(nsa_cuda_launch_bwd_dq_reduce(&at, d.dtype, inv_of(row0), &L.il, (const float *)(ws + L.dqp), row0, nb,
                                        skip, stream),
          "dq reduction launch");
    if (pipe) BCK(cudaEventRecord(cv.free_ev, stream), "inversion area free");  // this batch's area is free
    if (nb <= 0) break;
  }
  if (acc) BCK(nsa_cuda_launch_bwd_acc_store(&at, d.dtype, L.NT, acc, stream), "dk/dv store launch");
  if (timing && !ds_dq) {
    cudaEventRecord(pev[4], stream);
    cudaEventRecord(pev[5], stream);
  }
  info->workspace_bytes = L.end;

  if (ex && ex->done_event) BCK(cudaEventRecord((cudaEvent_t)ex->done_event, stream), "done_event");
  if (sync) {
    BCK(cudaEventRecord(cv.ev2, stream), "event record");
    BCK(cudaStreamSynchronize(stream), "backward");
    float ms = 0.f;
    if (planner == NSA_PATH_VARLEN_V2 && cudaEventElapsedTime(&ms, cv.ev0, cv.ev1) == cudaSuccess)
      info->plan_us = ms * 1e3;
    if (cudaEventElapsedTime(&ms, cv.ev0, cv.ev2) == cudaSuccess) info->device_us = ms * 1e3;
    else info->device_us = now_us() - t_start;
    if (timing) {
      float t[5] = {0, 0, 0, 0, 0};
      for (int i = 0; i < 5; i++) cudaEventElapsedTime(&t[i], pev[i], pev[i + 1]);
      t[1] += t[4];  // the dq from dS runs after dk/dv
      fprintf(stderr, "nsa bwd phases (ms): preprocess %.3f dq %.3f invert %.3f dkdv %.3f | cap %lld seg_rows %d "
              "items_bound %lld path %s dq %s batches %lld\n", t[0], t[1], t[2], t[3], (long long)L.cap,
              L.seg_rows, (long long)L.items_bound, nsa_path_name(path),
              dq_key                ? "key-centric"
              : ds_dq               ? "row-block from dS (after dk/dv)"
              : rows_dq && !packed  ? (pre_in_dq ? "row-block (with the preprocess)" : "row-block")
                                    : "query-centric",
              (long long)((d.rows + L.brows - 1) / (L.brows > 0 ? L.brows : 1)));
    }
    cudaGetLastError();
  } else {
    BCK(cudaGetLastError(), "backward");
  }
  if (timing)
    for (int i = 0; i < 6; i++) cudaEventDestroy(pev[i]);
  return NSA_OK;
}

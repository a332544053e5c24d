/*
 * nsa/sel_attn.h — the one C API for NSA selection attention.
 *
 * Shared by every backend (CPU in kernels/cpu, CUDA in kernels/cuda) and by the
 * daemon. Semantics are DESIGN.md §2; paths and flags are §3.
 *
 * Shapes (strides are in ELEMENTS, any layout is allowed):
 *   q   [B, S,   H, Dk]   H = G*h, head j of group g is index g*h + j
 *   k   [B, Skv, G, Dk]
 *   v   [B, Skv, G, Dv]
 *   o   [B, S,   H, Dv]
 *   lse [B, S,   H]       f32, natural log, of the SCALED scores; -inf for empty rows
 *   sel block_indices [B, S, G, n] i32 (-1 = unused)  or
 *       ranges        [B, S, G, n, 2] i32 half-open [start,end) ([0,0] = unused)
 *
 * Query t sits at key position p(t) = t + (Skv - S). The key set of row (b,t,g)
 * is the union of its spans clipped to [0, min(p(t)+1, Skv)).
 *
 * Row index map used everywhere (plans, partials, histograms):
 *   r = ((b * S) + t) * G + g          rows = B * S * G
 */
#ifndef NSA_SEL_ATTN_H
#define NSA_SEL_ATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NSA_MAX_DIMS 5

/* Status codes. Each maps to exactly one DESIGN.md §4 error code string
 * (nsa_status_code_name). 0 is success, everything else negative. */
typedef enum {
  NSA_OK = 0,
  NSA_ERR_BAD_REQUEST = -1,       /* "bad_request": shapes/dtypes inconsistent */
  NSA_ERR_INVALID_SELECTION = -2, /* "invalid_selection": bad ids/spans, count in info */
  NSA_ERR_UNSUPPORTED = -3,       /* "unsupported": a limit of this backend, named */
  NSA_ERR_OUT_OF_BOUNDS = -4,     /* "out_of_bounds": tensor reaches outside memory */
  NSA_ERR_BUSY = -5,              /* "busy": workspace cap reached */
  NSA_ERR_DEVICE = -6,            /* "device_error": non-sticky CUDA error */
  NSA_ERR_INTERNAL = -7,          /* "internal" */
  NSA_ERR_DEVICE_FATAL = -8,      /* sticky CUDA error: context is gone, caller exits */
} nsa_status_t;

/* DESIGN.md §4 code string for a status ("bad_request", ...). */
const char *nsa_status_code_name(int status);

typedef enum { NSA_BF16 = 0, NSA_F16 = 1, NSA_F32 = 2, NSA_I32 = 3 } nsa_dtype_t;

/* "bf16", "f16", "f32", "i32"; NULL for an unknown value. */
const char *nsa_dtype_name(nsa_dtype_t dt);
/* Parses a dtype name; returns 0 on success, -1 if unknown. */
int nsa_dtype_parse(const char *name, size_t len, nsa_dtype_t *out);
size_t nsa_dtype_size(nsa_dtype_t dt);

/* A strided view. data points at element [0,...,0] (host memory for the CPU
 * backend, device memory for CUDA). stride[i] is in elements and may be any
 * non-negative value (0 = broadcast is allowed for inputs only). */
typedef struct {
  void *data;
  nsa_dtype_t dtype;
  int ndim;
  int64_t shape[NSA_MAX_DIMS];
  int64_t stride[NSA_MAX_DIMS];
} nsa_tensor_t;

/* Fills stride[] as contiguous row-major for the current shape. */
void nsa_tensor_set_contiguous(nsa_tensor_t *t);

typedef enum { NSA_SEL_BLOCK_INDICES = 0, NSA_SEL_RANGES = 1 } nsa_sel_kind_t;

typedef struct {
  nsa_sel_kind_t kind;
  nsa_tensor_t t;      /* i32: [B,S,G,n] block ids or [B,S,G,n,2] spans */
  int32_t block_size;  /* block_indices only; > 0 */
} nsa_selection_t;

typedef enum {
  NSA_PATH_VARLEN_V2 = 0,
  NSA_PATH_VARLEN_V1 = 1,
  NSA_PATH_PACKED = 2,
  NSA_PATH_COUNT = 3,
  NSA_PATH_AUTO = -1, /* choose from flags (nsa_choose_path) */
} nsa_path_t;

/* "varlen_v2", "varlen_v1", "packed". */
const char *nsa_path_name(nsa_path_t p);

/* The seed's three path flags (DESIGN.md §3), already parsed. */
typedef struct {
  int use_sel_varlen;       /* NSA_USE_SEL_VARLEN, default 1 */
  int sel_varlen_v2;        /* NSA_SEL_VARLEN_V2, default 1 */
  int64_t sel_varlen_min_l; /* NSA_SEL_VARLEN_MIN_L, default 0 */
} nsa_path_flags_t;

void nsa_path_flags_default(nsa_path_flags_t *f);

/* Path choice of DESIGN.md §3. max_len is the request's max row length from
 * the plan (only consulted for the MIN_L bypass of v2). */
nsa_path_t nsa_choose_path(const nsa_path_flags_t *f, int32_t max_len);

/* Planner choice implied by the flags before any plan exists:
 * NSA_PATH_VARLEN_V1 when varlen is on and v2 is off (host planner),
 * NSA_PATH_VARLEN_V2 otherwise (device-style planner; packed uses its plan). */
nsa_path_t nsa_planner_for_flags(const nsa_path_flags_t *f);

/* Problem dimensions, derived and checked by nsa_fwd_check/nsa_bwd_check. */
typedef struct {
  int64_t B, S, Skv, G, h, H, Dk, Dv, n;
  int64_t rows; /* B*S*G */
  nsa_dtype_t dtype;
} nsa_dims_t;

/* ---------------------------------------------------------------- plan --- */

/* Row-length histogram bucket upper bounds (inclusive), last is +inf. */
#define NSA_LEN_HIST_BUCKETS 12
extern const int64_t nsa_len_hist_le[NSA_LEN_HIST_BUCKETS - 1]; /* 0,16,32,...,8192 */
/* Bucket index of a row length. */
int nsa_len_hist_bucket(int64_t len);

/*
 * The plan: the one format every path shares. All arrays are caller-owned
 * (host memory for the CPU planners, device memory for the CUDA planner) and
 * sized by nsa_plan_layout().
 *
 *   spans   [rows][n][2] i32  merged, sorted, clipped, non-empty, non-adjacent
 *                              half-open key spans; slots >= nspans[r] are {0,0}
 *   nspans  [rows]       i32  number of spans used
 *   row_len [rows]       i32  keys in the row = sum of span lengths
 *   row_off [rows+1]     i64  exclusive scan of row_len; row_off[rows] = total
 *
 * Two spans are merged when they overlap OR touch (a.end >= b.start), so a plan
 * is canonical: the same key set always gives the same bytes.
 */
typedef struct {
  int64_t rows;
  int64_t n;
  int32_t *spans;
  int32_t *nspans;
  int32_t *row_len;
  int64_t *row_off;
  /* Summary (host copies). */
  int64_t total_len;
  int32_t max_len;
  int64_t invalid; /* invalid selection entries counted; > 0 → invalid_selection */
  int64_t len_hist[NSA_LEN_HIST_BUCKETS];
} nsa_plan_t;

/* Byte offsets of each array inside one contiguous plan buffer (16-byte
 * aligned sub-arrays). Returns total bytes. */
typedef struct {
  size_t spans, nspans, row_len, row_off, total;
} nsa_plan_layout_t;
size_t nsa_plan_layout(int64_t rows, int64_t n, nsa_plan_layout_t *lay);
/* Points the plan's arrays into buf (which has lay->total bytes). */
void nsa_plan_bind(nsa_plan_t *p, void *buf, int64_t rows, int64_t n);

/* ------------------------------------------------------------- requests --- */

typedef struct {
  nsa_tensor_t q, k, v, o;
  nsa_tensor_t lse;   /* lse.data == NULL: not requested */
  nsa_selection_t sel;
  float scale;        /* <= 0 or NaN: 1/sqrt(Dk) */
} nsa_fwd_args_t;

typedef struct {
  nsa_tensor_t q, k, v, o, lse, dout; /* inputs (lse required) */
  nsa_tensor_t dq, dk, dv;            /* outputs, fully overwritten */
  nsa_selection_t sel;
  float scale;
} nsa_bwd_args_t;

/* What a run did; filled by every backend's forward/backward. */
typedef struct {
  nsa_path_t path;  /* the path that actually ran */
  int64_t rows;
  int32_t max_len;
  double mean_len;  /* total_len / rows */
  int64_t invalid;  /* invalid selection entries (with NSA_ERR_INVALID_SELECTION) */
  int64_t len_hist[NSA_LEN_HIST_BUCKETS];
  double plan_us;   /* planner time */
  double device_us; /* planner + kernels, measured by the backend */
  size_t workspace_bytes; /* scratch memory this call used; the CUDA packed forward
                           * reports its padded K/V gather only (the bucket formula) */
} nsa_run_info_t;

/* Validates shapes, dtypes and consistency of a forward/backward request
 * (NOT memory bounds — the daemon checks those against regions). Returns
 * NSA_OK or NSA_ERR_BAD_REQUEST with a message naming the tensor/dimension. */
int nsa_fwd_check(const nsa_fwd_args_t *a, nsa_dims_t *d, char *msg, size_t msglen);
int nsa_bwd_check(const nsa_bwd_args_t *a, nsa_dims_t *d, char *msg, size_t msglen);

/* Resolved softmax scale: a->scale if > 0, else 1/sqrt(Dk). */
float nsa_resolve_scale(float scale, int64_t Dk);

/* ------------------------------------------------------------ CPU backend - */

/* v2 planner: the data-parallel per-row algorithm the GPU runs (load n spans,
 * validate, clip, sort, merge), parallel over rows, then an exclusive scan.
 * plan arrays must be bound (nsa_plan_bind) for d->rows, d->n. */
int nsa_cpu_plan_v2(const nsa_selection_t *sel, const nsa_dims_t *d, nsa_plan_t *plan);
/* v1 planner: a plain sequential host loop that must build the identical plan. */
int nsa_cpu_plan_v1(const nsa_selection_t *sel, const nsa_dims_t *d, nsa_plan_t *plan);

/* Attention over a finished plan. */
int nsa_cpu_varlen_fwd(const nsa_fwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                       char *msg, size_t msglen);
int nsa_cpu_packed_fwd(const nsa_fwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                       size_t *workspace_bytes, char *msg, size_t msglen);
int nsa_cpu_varlen_bwd(const nsa_bwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                       char *msg, size_t msglen);
int nsa_cpu_packed_bwd(const nsa_bwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                       size_t *workspace_bytes, char *msg, size_t msglen);

/* Whole request on the CPU: check, plan, choose the path (force_path =
 * NSA_PATH_AUTO to follow flags), run. Returns NSA_OK or a status with msg. */
int nsa_cpu_sel_fwd(const nsa_fwd_args_t *a, const nsa_path_flags_t *flags, nsa_path_t force_path,
                    nsa_run_info_t *info, char *msg, size_t msglen);
int nsa_cpu_sel_bwd(const nsa_bwd_args_t *a, const nsa_path_flags_t *flags, nsa_path_t force_path,
                    nsa_run_info_t *info, char *msg, size_t msglen);

/* --------------------------------------------------------------- dtypes --- */

float nsa_bf16_to_f32(uint16_t x);
uint16_t nsa_f32_to_bf16(float x);   /* round to nearest even, NaN preserved */
float nsa_f16_to_f32(uint16_t x);
uint16_t nsa_f32_to_f16(float x);    /* round to nearest even, inf/NaN preserved */

#ifdef __cplusplus
}
#endif
#endif /* NSA_SEL_ATTN_H */

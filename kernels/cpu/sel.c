/*
 * sel.c — whole selection-attention requests on the CPU backend:
 * check → plan (v1 or v2 planner, as the flags or force_path imply) →
 * reject invalid selections (outputs untouched) → choose the path → run →
 * fill nsa_run_info_t.
 */
#include <inttypes.h>
#include <stdlib.h>

#include "cpu_internal.h"

typedef struct {
  void *buf;
  nsa_plan_t plan;
  size_t bytes;
} cpu_plan_t;

static int plan_request(const nsa_selection_t *sel, const nsa_dims_t *d, nsa_path_t planner,
                        cpu_plan_t *cp, nsa_run_info_t *info, char *msg, size_t msglen) {
  nsa_plan_layout_t lay;
  cp->bytes = nsa_plan_layout(d->rows, d->n, &lay);
  cp->buf = malloc(cp->bytes);
  if (!cp->buf) {
    if (msg && msglen) snprintf(msg, msglen, "plan: out of host memory (%zu bytes)", cp->bytes);
    return NSA_ERR_INTERNAL;
  }
  nsa_plan_bind(&cp->plan, cp->buf, d->rows, d->n);
  double t0 = nsa_now_us();
  int rc = planner == NSA_PATH_VARLEN_V1 ? nsa_cpu_plan_v1(sel, d, &cp->plan)
                                         : nsa_cpu_plan_v2(sel, d, &cp->plan);
  info->plan_us = nsa_now_us() - t0;
  if (rc != NSA_OK) {
    if (msg && msglen) snprintf(msg, msglen, "plan: internal error (%d)", rc);
    return rc;
  }
  const nsa_plan_t *p = &cp->plan;
  info->rows = d->rows;
  info->max_len = p->max_len;
  info->mean_len = d->rows > 0 ? (double)p->total_len / (double)d->rows : 0.0;
  memcpy(info->len_hist, p->len_hist, sizeof(info->len_hist));
  if (p->invalid > 0) {
    info->invalid = p->invalid;
    if (msg && msglen) {
      if (sel->kind == NSA_SEL_BLOCK_INDICES)
        snprintf(msg, msglen,
                 "invalid_selection: %" PRId64 " bad block_indices entries (ids must be -1 or in "
                 "[0, %" PRId64 ") for Skv=%" PRId64 ", block_size=%d)",
                 p->invalid, (d->Skv + sel->block_size - 1) / sel->block_size, d->Skv,
                 (int)sel->block_size);
      else
        snprintf(msg, msglen,
                 "invalid_selection: %" PRId64 " bad ranges entries (need 0 <= start <= end)",
                 p->invalid);
    }
    return NSA_ERR_INVALID_SELECTION;
  }
  return NSA_OK;
}

/* Resolves the planner and validates force_path. */
static int resolve(const nsa_path_flags_t *flags, nsa_path_t force, nsa_path_flags_t *f,
                   nsa_path_t *planner, char *msg, size_t msglen) {
  if (flags)
    *f = *flags;
  else
    nsa_path_flags_default(f);
  if (force == NSA_PATH_AUTO) {
    *planner = nsa_planner_for_flags(f);
    return NSA_OK;
  }
  if ((int)force < 0 || force >= NSA_PATH_COUNT) {
    if (msg && msglen) snprintf(msg, msglen, "force_path: unknown path %d", (int)force);
    return NSA_ERR_BAD_REQUEST;
  }
  *planner = force == NSA_PATH_VARLEN_V1 ? NSA_PATH_VARLEN_V1 : NSA_PATH_VARLEN_V2;
  return NSA_OK;
}

/* Runs one checked request on the path the planner's result implies. */
typedef int (*path_fn)(const void *args, const nsa_dims_t *d, const nsa_plan_t *plan,
                       nsa_path_t path, size_t *ws, char *msg, size_t msglen);

static int fwd_on_path(const void *args, const nsa_dims_t *d, const nsa_plan_t *plan,
                       nsa_path_t path, size_t *ws, char *msg, size_t msglen) {
  const nsa_fwd_args_t *a = args;
  if (path == NSA_PATH_PACKED) return nsa_cpu_packed_fwd(a, d, plan, ws, msg, msglen);
  return nsa_cpu_varlen_fwd(a, d, plan, msg, msglen);
}

static int bwd_on_path(const void *args, const nsa_dims_t *d, const nsa_plan_t *plan,
                       nsa_path_t path, size_t *ws, char *msg, size_t msglen) {
  const nsa_bwd_args_t *a = args;
  if (path == NSA_PATH_PACKED) return nsa_cpu_packed_bwd(a, d, plan, ws, msg, msglen);
  return nsa_cpu_varlen_bwd(a, d, plan, msg, msglen);
}

/* The request flow shared by forward and backward: resolve flags, plan with
 * the planner they imply, choose the path (MIN_L needs the plan's max_len),
 * run. `check_rc` is the result of nsa_fwd_check / nsa_bwd_check. */
static int sel_request(int check_rc, const void *args, const nsa_selection_t *sel,
                       const nsa_dims_t *d, const nsa_path_flags_t *flags, nsa_path_t force_path,
                       path_fn run, nsa_run_info_t *info, double t0, char *msg, size_t msglen) {
  if (check_rc != NSA_OK) return check_rc;
  nsa_path_flags_t f;
  nsa_path_t planner;
  int rc = resolve(flags, force_path, &f, &planner, msg, msglen);
  if (rc != NSA_OK) return rc;

  cpu_plan_t cp = {0};
  rc = plan_request(sel, d, planner, &cp, info, msg, msglen);
  if (rc == NSA_OK) {
    nsa_path_t path = force_path == NSA_PATH_AUTO ? nsa_choose_path(&f, cp.plan.max_len) : force_path;
    size_t ws = 0;
    rc = run(args, d, &cp.plan, path, &ws, msg, msglen);
    info->path = path;
    info->workspace_bytes = cp.bytes + ws;
  }
  free(cp.buf);
  info->device_us = nsa_now_us() - t0;
  return rc;
}

static void info_reset(nsa_run_info_t *info, char *msg, size_t msglen) {
  memset(info, 0, sizeof(*info));
  info->path = NSA_PATH_AUTO;
  if (msg && msglen) msg[0] = 0;
}

int nsa_cpu_sel_fwd(const nsa_fwd_args_t *a, const nsa_path_flags_t *flags, nsa_path_t force_path,
                    nsa_run_info_t *info, char *msg, size_t msglen) {
  nsa_run_info_t scratch_info;
  if (!info) info = &scratch_info;
  info_reset(info, msg, msglen);
  double t0 = nsa_now_us();
  nsa_dims_t d;
  int rc = nsa_fwd_check(a, &d, msg, msglen);
  return sel_request(rc, a, &a->sel, &d, flags, force_path, fwd_on_path, info, t0, msg, msglen);
}

int nsa_cpu_sel_bwd(const nsa_bwd_args_t *a, const nsa_path_flags_t *flags, nsa_path_t force_path,
                    nsa_run_info_t *info, char *msg, size_t msglen) {
  nsa_run_info_t scratch_info;
  if (!info) info = &scratch_info;
  info_reset(info, msg, msglen);
  double t0 = nsa_now_us();
  nsa_dims_t d;
  int rc = nsa_bwd_check(a, &d, msg, msglen);
  return sel_request(rc, a, &a->sel, &d, flags, force_path, bwd_on_path, info, t0, msg, msglen);
}

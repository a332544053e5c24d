/* names.c — string names and sizes shared by every backend and the daemon. */
#include <math.h>
#include <string.h>

#include "nsa/sel_attn.h"

const char *nsa_status_code_name(int status) {
  switch (status) {
    case NSA_OK: return "ok";
    case NSA_ERR_BAD_REQUEST: return "bad_request";
    case NSA_ERR_INVALID_SELECTION: return "invalid_selection";
    case NSA_ERR_UNSUPPORTED: return "unsupported";
    case NSA_ERR_OUT_OF_BOUNDS: return "out_of_bounds";
    case NSA_ERR_BUSY: return "busy";
    case NSA_ERR_DEVICE: return "device_error";
    case NSA_ERR_DEVICE_FATAL: return "device_error";
    default: return "internal";
  }
}

static const char *const k_dtype_names[] = {"bf16", "f16", "f32", "i32"};

const char *nsa_dtype_name(nsa_dtype_t dt) {
  if ((int)dt < 0 || (int)dt > NSA_I32) return NULL;
  return k_dtype_names[dt];
}

int nsa_dtype_parse(const char *name, size_t len, nsa_dtype_t *out) {
  for (int i = 0; i <= NSA_I32; i++) {
    if (strlen(k_dtype_names[i]) == len && memcmp(k_dtype_names[i], name, len) == 0) {
      *out = (nsa_dtype_t)i;
      return 0;
    }
  }
  return -1;
}

size_t nsa_dtype_size(nsa_dtype_t dt) {
  switch (dt) {
    case NSA_BF16:
    case NSA_F16: return 2;
    case NSA_F32:
    case NSA_I32: return 4;
  }
  return 0;
}

const char *nsa_path_name(nsa_path_t p) {
  switch (p) {
    case NSA_PATH_VARLEN_V2: return "varlen_v2";
    case NSA_PATH_VARLEN_V1: return "varlen_v1";
    case NSA_PATH_PACKED: return "packed";
    default: return "none";
  }
}

void nsa_path_flags_default(nsa_path_flags_t *f) {
  f->use_sel_varlen = 1;
  f->sel_varlen_v2 = 1;
  f->sel_varlen_min_l = 0;
}

nsa_path_t nsa_planner_for_flags(const nsa_path_flags_t *f) {
  return (f->use_sel_varlen && !f->sel_varlen_v2) ? NSA_PATH_VARLEN_V1 : NSA_PATH_VARLEN_V2;
}

/* DESIGN.md §3: varlen off → packed; v2 off → v1; v2 on but the request's max
 * row length below MIN_L → packed (dense buckets serve short rows better). */
nsa_path_t nsa_choose_path(const nsa_path_flags_t *f, int32_t max_len) {
  if (!f->use_sel_varlen) return NSA_PATH_PACKED;
  if (!f->sel_varlen_v2) return NSA_PATH_VARLEN_V1;
  if ((int64_t)max_len < f->sel_varlen_min_l) return NSA_PATH_PACKED;
  return NSA_PATH_VARLEN_V2;
}

float nsa_resolve_scale(float scale, int64_t Dk) {
  if (scale > 0.0f && isfinite(scale)) return scale;
  return (float)(1.0 / sqrt((double)(Dk > 0 ? Dk : 1)));
}

void nsa_tensor_set_contiguous(nsa_tensor_t *t) {
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    t->stride[i] = s;
    s *= t->shape[i];
  }
}

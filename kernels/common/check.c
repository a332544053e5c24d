/*
 * check.c — shape/dtype consistency of forward and backward requests.
 *
 * Every message names the tensor and the dimension, because the caller is a
 * remote worker that only sees the string. Memory bounds are not checked here
 * (the daemon checks tensors against regions); what IS checked is that no
 * element count or reachable offset overflows int64, so later index math
 * (b*S*G, off + i*stride) cannot wrap.
 */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>

#include "nsa_internal.h"

static int fail(char *msg, size_t msglen, const char *fmt, ...) {
  if (msg && msglen) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, msglen, fmt, ap);
    va_end(ap);
  }
  return NSA_ERR_BAD_REQUEST;
}

/* Generic checks of one tensor: ndim, non-negative shape/strides, no zero
 * stride on an output dim that has more than one element, no int64 overflow
 * of the element count or of the largest reachable offset, data present. */
static int check_tensor(const nsa_tensor_t *t, const char *name, int nd_a, int nd_b, int output,
                        char *msg, size_t msglen) {
  if (t->ndim != nd_a && t->ndim != nd_b) {
    if (nd_a == nd_b)
      return fail(msg, msglen, "%s: ndim must be %d, got %d", name, nd_a, t->ndim);
    return fail(msg, msglen, "%s: ndim must be %d or %d, got %d", name, nd_a, nd_b, t->ndim);
  }
  int64_t count = 1, maxoff = 0;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] < 0)
      return fail(msg, msglen, "%s: shape[%d] = %" PRId64 " is negative", name, i, t->shape[i]);
    if (t->stride[i] < 0)
      return fail(msg, msglen, "%s: stride[%d] = %" PRId64 " is negative", name, i, t->stride[i]);
    if (output && t->stride[i] == 0 && t->shape[i] > 1)
      return fail(msg, msglen, "%s: stride[%d] is 0 (broadcast) on an output", name, i);
    if (__builtin_mul_overflow(count, t->shape[i], &count))
      return fail(msg, msglen, "%s: element count overflows int64", name);
  }
  if (count > 0) {
    for (int i = 0; i < t->ndim; i++) {
      int64_t term;
      if (__builtin_mul_overflow(t->shape[i] - 1, t->stride[i], &term) ||
          __builtin_add_overflow(maxoff, term, &maxoff))
        return fail(msg, msglen, "%s: largest element offset overflows int64", name);
    }
    int64_t bytes;
    if (__builtin_mul_overflow(maxoff + 1, (int64_t)8, &bytes))
      return fail(msg, msglen, "%s: byte extent overflows int64", name);
    if (!t->data) return fail(msg, msglen, "%s: data is NULL", name);
  }
  return NSA_OK;
}

static int check_float_dtype(const nsa_tensor_t *t, const char *name, char *msg, size_t msglen) {
  if (t->dtype != NSA_BF16 && t->dtype != NSA_F16 && t->dtype != NSA_F32)
    return fail(msg, msglen, "%s: dtype must be bf16, f16 or f32, got %s", name,
                nsa_dtype_name(t->dtype) ? nsa_dtype_name(t->dtype) : "unknown");
  return NSA_OK;
}

static int dim_eq(const nsa_tensor_t *t, const char *name, int axis, int64_t want,
                  const char *what, char *msg, size_t msglen) {
  if (t->shape[axis] != want)
    return fail(msg, msglen, "%s: shape[%d] (%s) must be %" PRId64 ", got %" PRId64, name, axis,
                what, want, t->shape[axis]);
  return NSA_OK;
}

#define TRY(x)                \
  do {                        \
    int rc_ = (x);            \
    if (rc_ != NSA_OK) return rc_; \
  } while (0)

/* q/k/v/(o) and the selection: the part forward and backward share. */
static int check_core(const nsa_tensor_t *q, const nsa_tensor_t *k, const nsa_tensor_t *v,
                      const nsa_tensor_t *o, const nsa_selection_t *sel, nsa_dims_t *d,
                      char *msg, size_t msglen) {
  TRY(check_tensor(q, "q", 4, 4, 0, msg, msglen));
  TRY(check_tensor(k, "k", 4, 4, 0, msg, msglen));
  TRY(check_tensor(v, "v", 4, 4, 0, msg, msglen));
  TRY(check_float_dtype(q, "q", msg, msglen));
  memset(d, 0, sizeof(*d));
  d->B = q->shape[0];
  d->S = q->shape[1];
  d->H = q->shape[2];
  d->Dk = q->shape[3];
  d->Skv = k->shape[1];
  d->G = k->shape[2];
  d->Dv = v->shape[3];
  d->dtype = q->dtype;
  if (k->dtype != q->dtype)
    return fail(msg, msglen, "k: dtype %s differs from q's %s", nsa_dtype_name(k->dtype),
                nsa_dtype_name(q->dtype));
  if (v->dtype != q->dtype)
    return fail(msg, msglen, "v: dtype %s differs from q's %s", nsa_dtype_name(v->dtype),
                nsa_dtype_name(q->dtype));
  if (d->G < 1) return fail(msg, msglen, "k: shape[2] (G) must be >= 1, got %" PRId64, d->G);
  if (d->H < 1) return fail(msg, msglen, "q: shape[2] (H) must be >= 1, got %" PRId64, d->H);
  if (d->Dk < 1) return fail(msg, msglen, "q: shape[3] (Dk) must be >= 1");
  if (d->Dv < 1) return fail(msg, msglen, "v: shape[3] (Dv) must be >= 1");
  if (d->H % d->G != 0)
    return fail(msg, msglen, "q: H = %" PRId64 " is not a multiple of G = %" PRId64 " (k shape[2])",
                d->H, d->G);
  d->h = d->H / d->G;
  TRY(dim_eq(k, "k", 0, d->B, "B", msg, msglen));
  TRY(dim_eq(k, "k", 3, d->Dk, "Dk", msg, msglen));
  TRY(dim_eq(v, "v", 0, d->B, "B", msg, msglen));
  TRY(dim_eq(v, "v", 1, d->Skv, "Skv", msg, msglen));
  TRY(dim_eq(v, "v", 2, d->G, "G", msg, msglen));
  if (d->Skv < d->S)
    return fail(msg, msglen, "k: Skv = %" PRId64 " must be >= S = %" PRId64 " (q shape[1])",
                d->Skv, d->S);
  if (d->Skv > INT32_MAX - 1)
    return fail(msg, msglen, "k: Skv = %" PRId64 " exceeds the i32 span range", d->Skv);
  if (o) {
    TRY(check_tensor(o, "o", 4, 4, 0, msg, msglen));
    if (o->dtype != q->dtype)
      return fail(msg, msglen, "o: dtype %s differs from q's %s", nsa_dtype_name(o->dtype),
                  nsa_dtype_name(q->dtype));
    TRY(dim_eq(o, "o", 0, d->B, "B", msg, msglen));
    TRY(dim_eq(o, "o", 1, d->S, "S", msg, msglen));
    TRY(dim_eq(o, "o", 2, d->H, "H", msg, msglen));
    TRY(dim_eq(o, "o", 3, d->Dv, "Dv", msg, msglen));
  }

  /* selection */
  const nsa_tensor_t *s = &sel->t;
  const char *sn = sel->kind == NSA_SEL_RANGES ? "ranges" : "block_indices";
  if (sel->kind != NSA_SEL_BLOCK_INDICES && sel->kind != NSA_SEL_RANGES)
    return fail(msg, msglen, "sel: unknown selection kind %d", (int)sel->kind);
  int nd = sel->kind == NSA_SEL_RANGES ? 5 : 4;
  TRY(check_tensor(s, sn, nd, nd, 0, msg, msglen));
  if (s->dtype != NSA_I32)
    return fail(msg, msglen, "%s: dtype must be i32, got %s", sn,
                nsa_dtype_name(s->dtype) ? nsa_dtype_name(s->dtype) : "unknown");
  TRY(dim_eq(s, sn, 0, d->B, "B", msg, msglen));
  TRY(dim_eq(s, sn, 1, d->S, "S", msg, msglen));
  TRY(dim_eq(s, sn, 2, d->G, "G", msg, msglen));
  d->n = s->shape[3];
  if (sel->kind == NSA_SEL_RANGES) {
    TRY(dim_eq(s, sn, 4, 2, "start/end pair", msg, msglen));
  } else if (sel->block_size <= 0) {
    return fail(msg, msglen, "block_indices: block_size must be > 0, got %d", (int)sel->block_size);
  }
  /* rows = B*S*G and the plan's rows*n*2 span slots must not overflow. */
  int64_t rows, slots, bytes;
  if (__builtin_mul_overflow(d->B, d->S, &rows) || __builtin_mul_overflow(rows, d->G, &rows) ||
      __builtin_mul_overflow(rows, d->n, &slots) || __builtin_mul_overflow(slots, (int64_t)8, &bytes))
    return fail(msg, msglen, "sel: B*S*G*n overflows int64");
  d->rows = rows;
  return NSA_OK;
}

int nsa_fwd_check(const nsa_fwd_args_t *a, nsa_dims_t *d, char *msg, size_t msglen) {
  if (!a || !d) return fail(msg, msglen, "null arguments");
  TRY(check_core(&a->q, &a->k, &a->v, &a->o, &a->sel, d, msg, msglen));
  /* o is an output: no broadcast strides */
  TRY(check_tensor(&a->o, "o", 4, 4, 1, msg, msglen));
  if (a->lse.data) {
    TRY(check_tensor(&a->lse, "lse", 3, 3, 1, msg, msglen));
    if (a->lse.dtype != NSA_F32)
      return fail(msg, msglen, "lse: dtype must be f32, got %s",
                  nsa_dtype_name(a->lse.dtype) ? nsa_dtype_name(a->lse.dtype) : "unknown");
    TRY(dim_eq(&a->lse, "lse", 0, d->B, "B", msg, msglen));
    TRY(dim_eq(&a->lse, "lse", 1, d->S, "S", msg, msglen));
    TRY(dim_eq(&a->lse, "lse", 2, d->H, "H", msg, msglen));
  }
  return NSA_OK;
}

int nsa_bwd_check(const nsa_bwd_args_t *a, nsa_dims_t *d, char *msg, size_t msglen) {
  if (!a || !d) return fail(msg, msglen, "null arguments");
  TRY(check_core(&a->q, &a->k, &a->v, &a->o, &a->sel, d, msg, msglen));
  if (!a->lse.data) return fail(msg, msglen, "lse: required for backward");
  TRY(check_tensor(&a->lse, "lse", 3, 3, 0, msg, msglen));
  if (a->lse.dtype != NSA_F32)
    return fail(msg, msglen, "lse: dtype must be f32, got %s",
                nsa_dtype_name(a->lse.dtype) ? nsa_dtype_name(a->lse.dtype) : "unknown");
  TRY(dim_eq(&a->lse, "lse", 0, d->B, "B", msg, msglen));
  TRY(dim_eq(&a->lse, "lse", 1, d->S, "S", msg, msglen));
  TRY(dim_eq(&a->lse, "lse", 2, d->H, "H", msg, msglen));

  struct {
    const nsa_tensor_t *t;
    const char *name;
    int out;
    int64_t s1, s2, s3;
    const char *n1, *n2, *n3;
  } g[] = {
      {&a->dout, "do", 0, d->S, d->H, d->Dv, "S", "H", "Dv"},
      {&a->dq, "dq", 1, d->S, d->H, d->Dk, "S", "H", "Dk"},
      {&a->dk, "dk", 1, d->Skv, d->G, d->Dk, "Skv", "G", "Dk"},
      {&a->dv, "dv", 1, d->Skv, d->G, d->Dv, "Skv", "G", "Dv"},
  };
  for (size_t i = 0; i < sizeof(g) / sizeof(g[0]); i++) {
    TRY(check_tensor(g[i].t, g[i].name, 4, 4, g[i].out, msg, msglen));
    if (g[i].t->dtype != d->dtype)
      return fail(msg, msglen, "%s: dtype %s differs from q's %s", g[i].name,
                  nsa_dtype_name(g[i].t->dtype) ? nsa_dtype_name(g[i].t->dtype) : "unknown",
                  nsa_dtype_name(d->dtype));
    TRY(dim_eq(g[i].t, g[i].name, 0, d->B, "B", msg, msglen));
    TRY(dim_eq(g[i].t, g[i].name, 1, g[i].s1, g[i].n1, msg, msglen));
    TRY(dim_eq(g[i].t, g[i].name, 2, g[i].s2, g[i].n2, msg, msglen));
    TRY(dim_eq(g[i].t, g[i].name, 3, g[i].s3, g[i].n3, msg, msglen));
  }
  return NSA_OK;
}

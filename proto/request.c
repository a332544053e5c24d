/*
 * request.c — validation of decoded requests into typed C structs (DESIGN.md
 * §4), before anything is dispatched. Every error names the key with its path
 * ("missing key 'q'", "key 'sel.block_size' must be a positive integer").
 *
 * Conventions: integers are msgpack integers only (a float, even 3.0, is
 * rejected where an integer is expected); negative values are rejected where
 * the field is an id, size, count or dimension; optional keys may be absent or
 * nil; strings must fit their fixed buffers (never truncated) and must not
 * contain NUL bytes (they become C strings); unknown keys are ignored.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nsa_proto.h"

/* ---------------------------------------------------------- tensors --- */

int nsa_proto_tensor_set_contiguous(nsa_proto_tensor_t *t) {
  if (t->ndim < 1 || t->ndim > NSA_MAX_DIMS) return -1;
  uint64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (s > (uint64_t)INT64_MAX || t->shape[i] < 0) return -1;
    t->strides[i] = (int64_t)s;
    /* A zero dimension makes the tensor empty; keep the outer strides finite. */
    uint64_t d = t->shape[i] > 0 ? (uint64_t)t->shape[i] : 1;
    if (__builtin_mul_overflow(s, d, &s)) return -1;
  }
  return 0;
}

/*
 * Reachable bytes: the last element sits at sum_i (shape[i]-1)*stride[i]
 * elements from the first, so every element lies in
 * [offset, offset + (last+1)*elem_size). Also fails when offset + extent
 * overflows, so callers can compare offset + extent with a region size freely.
 */
int nsa_proto_tensor_extent(const nsa_proto_tensor_t *t, uint64_t *end_excl) {
  if (!t || t->ndim < 1 || t->ndim > NSA_MAX_DIMS) return -1;
  uint64_t es = nsa_dtype_size(t->dtype);
  if (es == 0) return -1;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] < 0 || t->strides[i] < 0) return -1;
    if (t->shape[i] == 0) {
      *end_excl = 0;
      return 0;
    }
  }
  uint64_t last = 0;
  for (int i = 0; i < t->ndim; i++) {
    uint64_t term;
    if (__builtin_mul_overflow((uint64_t)(t->shape[i] - 1), (uint64_t)t->strides[i], &term))
      return -1;
    if (__builtin_add_overflow(last, term, &last)) return -1;
  }
  uint64_t n, bytes, end;
  if (__builtin_add_overflow(last, 1, &n)) return -1;
  if (__builtin_mul_overflow(n, es, &bytes)) return -1;
  if (__builtin_add_overflow(t->offset, bytes, &end)) return -1;
  *end_excl = bytes;
  return 0;
}

/* ------------------------------------------------------ key helpers --- */

/* Path of a key inside the params: "key" or "prefix.key". */
typedef struct {
  char s[96];
} path_t;

static path_t mkpath(const char *prefix, const char *key) {
  path_t p;
  if (prefix && prefix[0])
    snprintf(p.s, sizeof p.s, "%s.%s", prefix, key);
  else
    snprintf(p.s, sizeof p.s, "%s", key);
  return p;
}

static int missing(nsa_proto_err_t *err, const char *prefix, const char *key) {
  return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "missing key '%s'", mkpath(prefix, key).s);
}

/* Present and not nil. */
static const msgpack_object *lookup(const msgpack_object *map, const char *key) {
  const msgpack_object *o = nsa_proto_map_get(map, key);
  if (o && o->type == MSGPACK_OBJECT_NIL) return NULL;
  return o;
}

/* Unsigned integer in [lo, hi]. */
static int obj_uint(const msgpack_object *o, const char *path, uint64_t lo, uint64_t hi,
                    uint64_t *out, nsa_proto_err_t *err) {
  if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 < lo || o->via.u64 > hi) {
    if (lo == 0 && hi == UINT64_MAX)
      return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key '%s' must be a non-negative integer",
                               path);
    if (lo == 1 && (hi == UINT64_MAX || hi == INT64_MAX || hi == INT32_MAX))
      return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                               "key '%s' must be a positive integer (at most %" PRIu64 ")",
                               path, hi);
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                             "key '%s' must be an integer in [%" PRIu64 ", %" PRIu64 "]", path,
                             lo, hi);
  }
  *out = o->via.u64;
  return 0;
}

static int req_uint(const msgpack_object *map, const char *prefix, const char *key, uint64_t lo,
                    uint64_t hi, uint64_t *out, nsa_proto_err_t *err) {
  const msgpack_object *o = lookup(map, key);
  if (!o) return missing(err, prefix, key);
  return obj_uint(o, mkpath(prefix, key).s, lo, hi, out, err);
}

/* Optional: *has = 0 when absent/nil. */
static int opt_uint(const msgpack_object *map, const char *key, uint64_t lo, uint64_t hi,
                    uint64_t *out, int *has, nsa_proto_err_t *err) {
  const msgpack_object *o = lookup(map, key);
  *has = 0;
  if (!o) return 0;
  if (obj_uint(o, key, lo, hi, out, err)) return -1;
  *has = 1;
  return 0;
}

/* Finite number (int or float) in [lo, hi]; lo_open excludes lo. */
static int obj_number(const msgpack_object *o, const char *path, double lo, double hi,
                      int lo_open, double *out, nsa_proto_err_t *err) {
  double v;
  switch (o->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: v = o->via.f64; break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: v = (double)o->via.u64; break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: v = (double)o->via.i64; break;
    default: v = NAN; break;
  }
  if (!isfinite(v) || v < lo || v > hi || (lo_open && v == lo)) {
    if (lo_open)
      return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key '%s' must be a positive finite number",
                               path);
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key '%s' must be a number in [%g, %g]",
                             path, lo, hi);
  }
  *out = v;
  return 0;
}

/* Copies a str object into buf (cap bytes incl. NUL). */
static int obj_str(const msgpack_object *o, const char *path, char *buf, size_t cap, int nonempty,
                   nsa_proto_err_t *err) {
  if (o->type != MSGPACK_OBJECT_STR)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key '%s' must be a string", path);
  size_t n = o->via.str.size;
  if (n >= cap)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key '%s' is too long (%zu bytes, max %zu)",
                             path, n, cap - 1);
  if (n && memchr(o->via.str.ptr, '\0', n))
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key '%s' must not contain NUL bytes", path);
  if (nonempty && n == 0)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key '%s' must not be empty", path);
  if (n) memcpy(buf, o->via.str.ptr, n);
  buf[n] = '\0';
  return 0;
}

static int req_str(const msgpack_object *map, const char *prefix, const char *key, char *buf,
                   size_t cap, int nonempty, nsa_proto_err_t *err) {
  const msgpack_object *o = lookup(map, key);
  if (!o) return missing(err, prefix, key);
  return obj_str(o, mkpath(prefix, key).s, buf, cap, nonempty, err);
}

static int str_is(const msgpack_object *o, const char *s) {
  size_t n = strlen(s);
  return o->type == MSGPACK_OBJECT_STR && o->via.str.size == n && memcmp(o->via.str.ptr, s, n) == 0;
}

static int req_map(const msgpack_object *map, const char *prefix, const char *key,
                   const msgpack_object **out, nsa_proto_err_t *err) {
  const msgpack_object *o = lookup(map, key);
  if (!o) return missing(err, prefix, key);
  if (o->type != MSGPACK_OBJECT_MAP)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key '%s' must be a map",
                             mkpath(prefix, key).s);
  *out = o;
  return 0;
}

static int req_bin64(const msgpack_object *map, const char *key, uint8_t out[64],
                     nsa_proto_err_t *err) {
  const msgpack_object *o = lookup(map, key);
  if (!o) return missing(err, NULL, key);
  if (o->type != MSGPACK_OBJECT_BIN || o->via.bin.size != 64)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key '%s' must be a bin of exactly 64 bytes",
                             key);
  memcpy(out, o->via.bin.ptr, 64);
  return 0;
}

/* map str → str into labels[max]; absent/nil gives *n = 0 unless required. */
static int opt_strmap(const msgpack_object *map, const char *key, nsa_proto_label_t *labels,
                      int max, int *n, nsa_proto_err_t *err) {
  const msgpack_object *o = lookup(map, key);
  *n = 0;
  if (!o) return 0;
  if (o->type != MSGPACK_OBJECT_MAP)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key '%s' must be a map of strings", key);
  if (o->via.map.size > (uint32_t)max)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key '%s' has %u entries (max %d)", key,
                             (unsigned)o->via.map.size, max);
  for (uint32_t i = 0; i < o->via.map.size; i++) {
    const msgpack_object_kv *kv = &o->via.map.ptr[i];
    nsa_proto_label_t *l = &labels[i];
    if (kv->key.type != MSGPACK_OBJECT_STR || kv->key.via.str.size == 0 ||
        kv->key.via.str.size >= sizeof l->key ||
        memchr(kv->key.via.str.ptr, '\0', kv->key.via.str.size))
      return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                               "key '%s' must map non-empty strings of at most %zu bytes to "
                               "strings", key, sizeof l->key - 1);
    memcpy(l->key, kv->key.via.str.ptr, kv->key.via.str.size);
    l->key[kv->key.via.str.size] = '\0';
    path_t vp = mkpath(key, l->key);
    if (obj_str(&kv->val, vp.s, l->value, sizeof l->value, 0, err)) return -1;
    for (uint32_t j = 0; j < i; j++)
      if (strcmp(labels[j].key, l->key) == 0)
        return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key '%s' repeats '%s'", key, l->key);
  }
  *n = (int)o->via.map.size;
  return 0;
}

/* Array of 1..NSA_MAX_DIMS non-negative ints (≤ INT64_MAX). */
static int int_array(const msgpack_object *o, const char *path, int64_t *out, int *nd,
                     nsa_proto_err_t *err) {
  if (o->type != MSGPACK_OBJECT_ARRAY || o->via.array.size < 1 ||
      o->via.array.size > NSA_MAX_DIMS)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                             "key '%s' must be an array of 1 to %d non-negative integers", path,
                             NSA_MAX_DIMS);
  for (uint32_t i = 0; i < o->via.array.size; i++) {
    const msgpack_object *e = &o->via.array.ptr[i];
    if (e->type != MSGPACK_OBJECT_POSITIVE_INTEGER || e->via.u64 > (uint64_t)INT64_MAX)
      return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                               "key '%s[%u]' must be a non-negative integer", path, (unsigned)i);
    out[i] = (int64_t)e->via.u64;
  }
  *nd = (int)o->via.array.size;
  return 0;
}

/* A tensor reference {region, offset, dtype, shape, strides?} at map[key]. */
static int req_tensor(const msgpack_object *map, const char *prefix, const char *key,
                      nsa_proto_tensor_t *t, nsa_proto_err_t *err) {
  const msgpack_object *m;
  if (req_map(map, prefix, key, &m, err)) return -1;
  path_t p = mkpath(prefix, key);
  memset(t, 0, sizeof *t);
  if (req_uint(m, p.s, "region", 0, UINT64_MAX, &t->region, err)) return -1;
  if (req_uint(m, p.s, "offset", 0, UINT64_MAX, &t->offset, err)) return -1;
  const msgpack_object *dt = lookup(m, "dtype");
  if (!dt) return missing(err, p.s, "dtype");
  if (dt->type != MSGPACK_OBJECT_STR || nsa_dtype_parse(dt->via.str.ptr, dt->via.str.size,
                                                        &t->dtype) != 0)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                             "key '%s.dtype' must be one of \"bf16\", \"f16\", \"f32\", \"i32\"",
                             p.s);
  const msgpack_object *sh = lookup(m, "shape");
  if (!sh) return missing(err, p.s, "shape");
  if (int_array(sh, mkpath(p.s, "shape").s, t->shape, &t->ndim, err)) return -1;
  const msgpack_object *st = lookup(m, "strides");
  if (st) {
    int nd;
    if (int_array(st, mkpath(p.s, "strides").s, t->strides, &nd, err)) return -1;
    if (nd != t->ndim)
      return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                               "key '%s.strides' must have as many entries as '%s.shape' (%d)",
                               p.s, p.s, t->ndim);
    t->has_strides = 1;
  } else if (nsa_proto_tensor_set_contiguous(t)) {
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                             "key '%s.shape' describes a tensor too large to address", p.s);
  }
  return 0;
}

/* -------------------------------------------------------- methods --- */

static int parse_hello(const msgpack_object *P, nsa_req_hello_t *h, nsa_proto_err_t *err) {
  uint64_t u;
  if (req_uint(P, NULL, "protocol", 0, INT64_MAX, &u, err)) return -1;
  h->protocol = (int64_t)u;
  if (req_str(P, NULL, "client", h->client, sizeof h->client, 0, err)) return -1;
  if (req_uint(P, NULL, "pid", 0, INT32_MAX, &u, err)) return -1;
  h->pid = (int64_t)u;
  return opt_strmap(P, "labels", h->labels, NSA_PROTO_MAX_LABELS, &h->nlabels, err);
}

static int parse_region_register(const msgpack_object *P, nsa_req_region_register_t *r,
                                 nsa_proto_err_t *err) {
  const msgpack_object *kind = lookup(P, "kind");
  if (!kind) return missing(err, NULL, "kind");
  uint64_t u;
  if (str_is(kind, "cuda_ipc")) {
    r->kind = NSA_REGION_CUDA_IPC;
    if (req_uint(P, NULL, "device", 0, INT32_MAX, &u, err)) return -1;
    r->device = (int32_t)u;
    if (req_bin64(P, "handle", r->handle, err)) return -1;
  } else if (str_is(kind, "shm")) {
    r->kind = NSA_REGION_SHM;
    if (req_str(P, NULL, "name", r->name, sizeof r->name, 1, err)) return -1;
    /* A POSIX shm name is one path component after a leading '/'. */
    if (r->name[0] != '/' || r->name[1] == '\0' || strchr(r->name + 1, '/'))
      return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                               "key 'name' must be a shared-memory name like \"/nsa-...\"");
  } else {
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                             "key 'kind' must be \"cuda_ipc\" or \"shm\"");
  }
  return req_uint(P, NULL, "size", 1, UINT64_MAX, &r->size, err);
}

static int parse_sel(const msgpack_object *P, nsa_proto_sel_t *s, nsa_proto_err_t *err) {
  const msgpack_object *m;
  if (req_map(P, NULL, "sel", &m, err)) return -1;
  const msgpack_object *kind = lookup(m, "kind");
  if (!kind) return missing(err, "sel", "kind");
  if (str_is(kind, "block_indices")) {
    s->kind = NSA_SEL_BLOCK_INDICES;
    if (req_tensor(m, "sel", "indices", &s->t, err)) return -1;
    uint64_t bs;
    if (req_uint(m, "sel", "block_size", 1, INT32_MAX, &bs, err)) return -1;
    s->block_size = (int32_t)bs;
  } else if (str_is(kind, "ranges")) {
    s->kind = NSA_SEL_RANGES;
    if (req_tensor(m, "sel", "ranges", &s->t, err)) return -1;
    s->block_size = 0;
  } else {
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                             "key 'sel.kind' must be \"block_indices\" or \"ranges\"");
  }
  return 0;
}

static int parse_sel_attn(const msgpack_object *P, nsa_req_sel_attn_t *s, int backward,
                          nsa_proto_err_t *err) {
  if (req_tensor(P, NULL, "q", &s->q, err) || req_tensor(P, NULL, "k", &s->k, err) ||
      req_tensor(P, NULL, "v", &s->v, err) || req_tensor(P, NULL, "o", &s->o, err))
    return -1;
  if (backward || lookup(P, "lse")) {
    if (req_tensor(P, NULL, "lse", &s->lse, err)) return -1;
    s->has_lse = 1;
  }
  if (backward) {
    if (req_tensor(P, NULL, "do", &s->dout, err) || req_tensor(P, NULL, "dq", &s->dq, err) ||
        req_tensor(P, NULL, "dk", &s->dk, err) || req_tensor(P, NULL, "dv", &s->dv, err))
      return -1;
  }
  if (parse_sel(P, &s->sel, err)) return -1;
  const msgpack_object *sc = lookup(P, "scale");
  if (sc) {
    if (obj_number(sc, "scale", 0.0, HUGE_VAL, 1, &s->scale, err)) return -1;
    s->has_scale = 1;
  }
  if (opt_uint(P, "wait_event", 0, UINT64_MAX, &s->wait_event, &s->has_wait_event, err) ||
      opt_uint(P, "done_event", 0, UINT64_MAX, &s->done_event, &s->has_done_event, err))
    return -1;
  s->sync = 1;
  const msgpack_object *sy = lookup(P, "sync");
  if (sy) {
    if (sy->type != MSGPACK_OBJECT_BOOLEAN)
      return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key 'sync' must be a boolean");
    s->sync = sy->via.boolean ? 1 : 0;
  }
  return 0;
}

/* Shortest decimal that reads back as the same double. */
static void format_double(double v, char *buf, size_t cap) {
  for (int prec = 15; prec <= 17; prec++) {
    snprintf(buf, cap, "%.*g", prec, v);
    if (strtod(buf, NULL) == v) return;
  }
}

static int parse_flags_set(const msgpack_object *P, nsa_req_flags_set_t *f,
                           nsa_proto_err_t *err) {
  if (req_str(P, NULL, "name", f->name, sizeof f->name, 1, err)) return -1;
  const msgpack_object *v = lookup(P, "value");
  if (!v) return missing(err, NULL, "value");
  switch (v->type) {
    case MSGPACK_OBJECT_STR:
      if (obj_str(v, "value", f->value, sizeof f->value, 0, err)) return -1;
      break;
    case MSGPACK_OBJECT_BOOLEAN: snprintf(f->value, sizeof f->value, "%d", v->via.boolean ? 1 : 0); break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
      snprintf(f->value, sizeof f->value, "%" PRIu64, v->via.u64);
      break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
      snprintf(f->value, sizeof f->value, "%" PRId64, v->via.i64);
      break;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
      /* Not in DESIGN.md's list, but a fraction flag (NSA_SEL_SHADOW_RATE) is
       * naturally sent as a float; the flags store parses the text. */
      if (!isfinite(v->via.f64))
        return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key 'value' must be finite");
      format_double(v->via.f64, f->value, sizeof f->value);
      break;
    default:
      return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                               "key 'value' must be a string, boolean or integer");
  }
  const msgpack_object *pc = lookup(P, "percent");
  if (pc) {
    if (obj_number(pc, "percent", 0.0, 100.0, 0, &f->percent, err)) return -1;
    f->has_percent = 1;
  }
  return opt_strmap(P, "match", f->match, NSA_PROTO_MAX_MATCH, &f->nmatch, err);
}

int nsa_proto_parse_request(const nsa_proto_msg_t *m, nsa_request_t *req, nsa_proto_err_t *err) {
  /* Zeroed so that equal requests are equal bytes (tests and the fuzzer
   * compare parse(encode(parse(x))) with parse(x)). */
  memset(req, 0, sizeof *req);
  if (err) {
    err->code = NSA_E_OK;
    err->message[0] = '\0';
  }
  if (m->type != NSA_MSG_REQUEST)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "message is not a request");
  req->msgid = m->msgid;
  int method = nsa_method_lookup(m->method, m->method_len);
  if (method < 0) {
    /* Name the method, printable bytes only, cut to fit. */
    char name[64];
    size_t n = m->method_len < sizeof name - 1 ? m->method_len : sizeof name - 1;
    for (size_t i = 0; i < n; i++) {
      unsigned char c = (unsigned char)m->method[i];
      name[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    name[n] = '\0';
    return nsa_proto_err_set(err, NSA_E_UNKNOWN_METHOD, "unknown method '%s'%s", name,
                             m->method_len > n ? "..." : "");
  }
  req->method = (nsa_method_t)method;
  const msgpack_object *P = &m->params;
  if (P->type != MSGPACK_OBJECT_MAP && P->type != MSGPACK_OBJECT_NIL)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "params must be a map");
  uint64_t u;
  switch (req->method) {
    case NSA_M_HELLO: return parse_hello(P, &req->u.hello, err);
    case NSA_M_REGION_REGISTER: return parse_region_register(P, &req->u.region_register, err);
    case NSA_M_REGION_UNREGISTER:
      return req_uint(P, NULL, "region", 0, UINT64_MAX, &req->u.region, err);
    case NSA_M_EVENT_REGISTER:
      if (req_uint(P, NULL, "device", 0, INT32_MAX, &u, err)) return -1;
      req->u.event_register.device = (int32_t)u;
      return req_bin64(P, "handle", req->u.event_register.handle, err);
    case NSA_M_EVENT_UNREGISTER:
      return req_uint(P, NULL, "event", 0, UINT64_MAX, &req->u.event, err);
    case NSA_M_SEL_FORWARD: return parse_sel_attn(P, &req->u.sel_attn, 0, err);
    case NSA_M_SEL_BACKWARD: return parse_sel_attn(P, &req->u.sel_attn, 1, err);
    case NSA_M_FLAGS_SET: return parse_flags_set(P, &req->u.flags_set, err);
    case NSA_M_FLAGS_RESET:
      return req_str(P, NULL, "name", req->u.flag_name, sizeof req->u.flag_name, 1, err);
    case NSA_M_METRICS_GET: {
      const msgpack_object *f = lookup(P, "format");
      if (!f || str_is(f, "map")) return 0;
      if (str_is(f, "prometheus")) {
        req->u.metrics_get.prometheus = 1;
        return 0;
      }
      return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                               "key 'format' must be \"map\" or \"prometheus\"");
    }
    case NSA_M_METRICS_SUBSCRIBE:
      if (req_uint(P, NULL, "interval_ms", 10, 3600000, &u, err)) return -1;
      req->u.metrics_subscribe.interval_ms = (uint32_t)u;
      return 0;
    case NSA_M_PING:
    case NSA_M_FLAGS_GET:
    case NSA_M_SHUTDOWN:
    default: return 0;
  }
}

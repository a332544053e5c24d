/*
 * writer.c — error codes, method names, the encoder (writer + packing
 * helpers, typed request encoding) and the client-side reading helpers.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "nsa_proto.h"

/* ------------------------------------------------------------- codes --- */

static const char *const k_code_names[NSA_E_COUNT] = {
    "ok",          "bad_request",       "unknown_method",   "not_found",
    "out_of_bounds", "invalid_selection", "unsupported",     "busy",
    "permission_denied", "protocol_version", "device_error", "internal",
};

const char *nsa_proto_code_name(nsa_proto_code_t c) {
  if ((int)c < 0 || c >= NSA_E_COUNT) return "internal";
  return k_code_names[c];
}

nsa_proto_code_t nsa_proto_code_parse(const char *s, size_t len) {
  for (int i = 0; i < NSA_E_COUNT; i++)
    if (strlen(k_code_names[i]) == len && memcmp(k_code_names[i], s, len) == 0)
      return (nsa_proto_code_t)i;
  return NSA_E_INTERNAL;
}

nsa_proto_code_t nsa_proto_code_from_status(int status) {
  switch (status) {
    case NSA_OK: return NSA_E_OK;
    case NSA_ERR_BAD_REQUEST: return NSA_E_BAD_REQUEST;
    case NSA_ERR_INVALID_SELECTION: return NSA_E_INVALID_SELECTION;
    case NSA_ERR_UNSUPPORTED: return NSA_E_UNSUPPORTED;
    case NSA_ERR_OUT_OF_BOUNDS: return NSA_E_OUT_OF_BOUNDS;
    case NSA_ERR_BUSY: return NSA_E_BUSY;
    case NSA_ERR_DEVICE:
    case NSA_ERR_DEVICE_FATAL: return NSA_E_DEVICE_ERROR;
    default: return NSA_E_INTERNAL;
  }
}

int nsa_proto_err_set(nsa_proto_err_t *e, nsa_proto_code_t code, const char *fmt, ...) {
  if (!e) return -1;
  e->code = code;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(e->message, sizeof e->message, fmt, ap);
  va_end(ap);
  return -1;
}

/* ----------------------------------------------------------- methods --- */

static const char *const k_method_names[NSA_M_COUNT] = {
    "hello",           "ping",           "region.register",  "region.unregister",
    "event.register",  "event.unregister", "sel_attn.forward", "sel_attn.backward",
    "flags.get",       "flags.set",      "flags.reset",      "metrics.get",
    "metrics.subscribe", "shutdown",
};

const char *nsa_method_name(nsa_method_t m) {
  if ((int)m < 0 || m >= NSA_M_COUNT) return NULL;
  return k_method_names[m];
}

int nsa_method_lookup(const char *s, size_t len) {
  if (!s) return -1;
  for (int i = 0; i < NSA_M_COUNT; i++)
    if (strlen(k_method_names[i]) == len && memcmp(k_method_names[i], s, len) == 0) return i;
  return -1;
}

/* ------------------------------------------------------------ writer --- */

/* The packer points at w->sbuf: a writer must not be copied or moved after
 * init (use it in place). */
void nsa_proto_writer_init(nsa_proto_writer_t *w) {
  msgpack_sbuffer_init(&w->sbuf);
  msgpack_packer_init(&w->pk, &w->sbuf, msgpack_sbuffer_write);
}

void nsa_proto_writer_reset(nsa_proto_writer_t *w) { w->sbuf.size = 0; }

void nsa_proto_writer_destroy(nsa_proto_writer_t *w) {
  msgpack_sbuffer_destroy(&w->sbuf);
  memset(w, 0, sizeof *w);
}

void nsa_proto_pack_str(msgpack_packer *pk, const char *s) {
  size_t n = s ? strlen(s) : 0;
  msgpack_pack_str(pk, n);
  msgpack_pack_str_body(pk, s ? s : "", n);
}

void nsa_proto_write_request_begin(nsa_proto_writer_t *w, uint32_t msgid, const char *method) {
  msgpack_pack_array(&w->pk, 4);
  msgpack_pack_uint8(&w->pk, NSA_MSG_REQUEST);
  msgpack_pack_uint32(&w->pk, msgid);
  nsa_proto_pack_str(&w->pk, method);
}

void nsa_proto_write_result_begin(nsa_proto_writer_t *w, uint32_t msgid) {
  msgpack_pack_array(&w->pk, 4);
  msgpack_pack_uint8(&w->pk, NSA_MSG_RESPONSE);
  msgpack_pack_uint32(&w->pk, msgid);
  msgpack_pack_nil(&w->pk);
}

void nsa_proto_write_error(nsa_proto_writer_t *w, uint32_t msgid, nsa_proto_code_t code,
                           const char *message) {
  msgpack_pack_array(&w->pk, 4);
  msgpack_pack_uint8(&w->pk, NSA_MSG_RESPONSE);
  msgpack_pack_uint32(&w->pk, msgid);
  msgpack_pack_map(&w->pk, 2);
  nsa_proto_pack_kv_str(&w->pk, "code", nsa_proto_code_name(code));
  nsa_proto_pack_kv_str(&w->pk, "message", message ? message : "");
  msgpack_pack_nil(&w->pk);
}

void nsa_proto_write_notification_begin(nsa_proto_writer_t *w, const char *method) {
  msgpack_pack_array(&w->pk, 3);
  msgpack_pack_uint8(&w->pk, NSA_MSG_NOTIFICATION);
  nsa_proto_pack_str(&w->pk, method);
}

void nsa_proto_pack_kv_str(msgpack_packer *pk, const char *key, const char *val) {
  nsa_proto_pack_str(pk, key);
  nsa_proto_pack_str(pk, val);
}

void nsa_proto_pack_kv_int(msgpack_packer *pk, const char *key, int64_t val) {
  nsa_proto_pack_str(pk, key);
  msgpack_pack_int64(pk, val);
}

void nsa_proto_pack_kv_uint(msgpack_packer *pk, const char *key, uint64_t val) {
  nsa_proto_pack_str(pk, key);
  msgpack_pack_uint64(pk, val);
}

void nsa_proto_pack_kv_double(msgpack_packer *pk, const char *key, double val) {
  nsa_proto_pack_str(pk, key);
  msgpack_pack_double(pk, val);
}

void nsa_proto_pack_kv_bool(msgpack_packer *pk, const char *key, int val) {
  nsa_proto_pack_str(pk, key);
  if (val)
    msgpack_pack_true(pk);
  else
    msgpack_pack_false(pk);
}

void nsa_proto_pack_kv_nil(msgpack_packer *pk, const char *key) {
  nsa_proto_pack_str(pk, key);
  msgpack_pack_nil(pk);
}

void nsa_proto_pack_kv_tensor(msgpack_packer *pk, const char *key, const nsa_proto_tensor_t *t) {
  int nd = t->ndim < 0 ? 0 : t->ndim > NSA_MAX_DIMS ? NSA_MAX_DIMS : t->ndim;
  const char *dt = nsa_dtype_name(t->dtype);
  nsa_proto_pack_str(pk, key);
  msgpack_pack_map(pk, t->has_strides ? 5 : 4);
  nsa_proto_pack_kv_uint(pk, "region", t->region);
  nsa_proto_pack_kv_uint(pk, "offset", t->offset);
  nsa_proto_pack_kv_str(pk, "dtype", dt ? dt : "?");
  nsa_proto_pack_str(pk, "shape");
  msgpack_pack_array(pk, nd);
  for (int i = 0; i < nd; i++) msgpack_pack_int64(pk, t->shape[i]);
  if (t->has_strides) {
    nsa_proto_pack_str(pk, "strides");
    msgpack_pack_array(pk, nd);
    for (int i = 0; i < nd; i++) msgpack_pack_int64(pk, t->strides[i]);
  }
}

/* ----------------------------------------------- typed request encode --- */

static void pack_labels(msgpack_packer *pk, const char *key, const nsa_proto_label_t *l, int n) {
  if (n < 0) n = 0;
  nsa_proto_pack_str(pk, key);
  msgpack_pack_map(pk, n);
  for (int i = 0; i < n; i++) nsa_proto_pack_kv_str(pk, l[i].key, l[i].value);
}

static void pack_bin64(msgpack_packer *pk, const char *key, const uint8_t h[64]) {
  nsa_proto_pack_str(pk, key);
  msgpack_pack_bin(pk, 64);
  msgpack_pack_bin_body(pk, h, 64);
}

static void pack_sel_attn(msgpack_packer *pk, const nsa_req_sel_attn_t *s, int backward) {
  int n = 6; /* q k v o sel sync */
  if (backward) n += 5; /* lse do dq dk dv */
  else if (s->has_lse) n += 1;
  n += !!s->has_scale + !!s->has_wait_event + !!s->has_done_event;
  msgpack_pack_map(pk, n);
  nsa_proto_pack_kv_tensor(pk, "q", &s->q);
  nsa_proto_pack_kv_tensor(pk, "k", &s->k);
  nsa_proto_pack_kv_tensor(pk, "v", &s->v);
  nsa_proto_pack_kv_tensor(pk, "o", &s->o);
  if (backward || s->has_lse) nsa_proto_pack_kv_tensor(pk, "lse", &s->lse);
  if (backward) {
    nsa_proto_pack_kv_tensor(pk, "do", &s->dout);
    nsa_proto_pack_kv_tensor(pk, "dq", &s->dq);
    nsa_proto_pack_kv_tensor(pk, "dk", &s->dk);
    nsa_proto_pack_kv_tensor(pk, "dv", &s->dv);
  }
  nsa_proto_pack_str(pk, "sel");
  if (s->sel.kind == NSA_SEL_RANGES) {
    msgpack_pack_map(pk, 2);
    nsa_proto_pack_kv_str(pk, "kind", "ranges");
    nsa_proto_pack_kv_tensor(pk, "ranges", &s->sel.t);
  } else {
    msgpack_pack_map(pk, 3);
    nsa_proto_pack_kv_str(pk, "kind", "block_indices");
    nsa_proto_pack_kv_tensor(pk, "indices", &s->sel.t);
    nsa_proto_pack_kv_int(pk, "block_size", s->sel.block_size);
  }
  if (s->has_scale) nsa_proto_pack_kv_double(pk, "scale", s->scale);
  if (s->has_wait_event) nsa_proto_pack_kv_uint(pk, "wait_event", s->wait_event);
  if (s->has_done_event) nsa_proto_pack_kv_uint(pk, "done_event", s->done_event);
  nsa_proto_pack_kv_bool(pk, "sync", s->sync);
}

void nsa_proto_write_request(nsa_proto_writer_t *w, uint32_t msgid, const nsa_request_t *req) {
  const char *name = nsa_method_name(req->method);
  msgpack_packer *pk = &w->pk;
  nsa_proto_write_request_begin(w, msgid, name ? name : "");
  switch (req->method) {
    case NSA_M_HELLO: {
      const nsa_req_hello_t *h = &req->u.hello;
      msgpack_pack_map(pk, 4);
      nsa_proto_pack_kv_int(pk, "protocol", h->protocol);
      nsa_proto_pack_kv_str(pk, "client", h->client);
      nsa_proto_pack_kv_int(pk, "pid", h->pid);
      pack_labels(pk, "labels", h->labels, h->nlabels);
      break;
    }
    case NSA_M_REGION_REGISTER: {
      const nsa_req_region_register_t *r = &req->u.region_register;
      msgpack_pack_map(pk, r->kind == NSA_REGION_CUDA_IPC ? 4 : 3);
      if (r->kind == NSA_REGION_CUDA_IPC) {
        nsa_proto_pack_kv_str(pk, "kind", "cuda_ipc");
        nsa_proto_pack_kv_int(pk, "device", r->device);
        pack_bin64(pk, "handle", r->handle);
      } else {
        nsa_proto_pack_kv_str(pk, "kind", "shm");
        nsa_proto_pack_kv_str(pk, "name", r->name);
      }
      nsa_proto_pack_kv_uint(pk, "size", r->size);
      break;
    }
    case NSA_M_REGION_UNREGISTER:
      msgpack_pack_map(pk, 1);
      nsa_proto_pack_kv_uint(pk, "region", req->u.region);
      break;
    case NSA_M_EVENT_REGISTER:
      msgpack_pack_map(pk, 2);
      nsa_proto_pack_kv_int(pk, "device", req->u.event_register.device);
      pack_bin64(pk, "handle", req->u.event_register.handle);
      break;
    case NSA_M_EVENT_UNREGISTER:
      msgpack_pack_map(pk, 1);
      nsa_proto_pack_kv_uint(pk, "event", req->u.event);
      break;
    case NSA_M_SEL_FORWARD:
    case NSA_M_SEL_BACKWARD:
      pack_sel_attn(pk, &req->u.sel_attn, req->method == NSA_M_SEL_BACKWARD);
      break;
    case NSA_M_FLAGS_SET: {
      const nsa_req_flags_set_t *f = &req->u.flags_set;
      msgpack_pack_map(pk, 2 + !!f->has_percent + (f->nmatch > 0));
      nsa_proto_pack_kv_str(pk, "name", f->name);
      nsa_proto_pack_kv_str(pk, "value", f->value);
      if (f->has_percent) nsa_proto_pack_kv_double(pk, "percent", f->percent);
      if (f->nmatch > 0) pack_labels(pk, "match", f->match, f->nmatch);
      break;
    }
    case NSA_M_FLAGS_RESET:
      msgpack_pack_map(pk, 1);
      nsa_proto_pack_kv_str(pk, "name", req->u.flag_name);
      break;
    case NSA_M_METRICS_GET:
      msgpack_pack_map(pk, 1);
      nsa_proto_pack_kv_str(pk, "format", req->u.metrics_get.prometheus ? "prometheus" : "map");
      break;
    case NSA_M_METRICS_SUBSCRIBE:
      msgpack_pack_map(pk, 1);
      nsa_proto_pack_kv_uint(pk, "interval_ms", req->u.metrics_subscribe.interval_ms);
      break;
    case NSA_M_PING:
    case NSA_M_FLAGS_GET:
    case NSA_M_SHUTDOWN:
    default:
      msgpack_pack_map(pk, 0);
      break;
  }
}

/* --------------------------------------------------------- reading --- */

const msgpack_object *nsa_proto_map_get(const msgpack_object *map, const char *key) {
  if (!map || map->type != MSGPACK_OBJECT_MAP || !key) return NULL;
  size_t kl = strlen(key);
  const msgpack_object_map *m = &map->via.map;
  for (uint32_t i = 0; i < m->size; i++) {
    const msgpack_object *k = &m->ptr[i].key;
    if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == kl &&
        memcmp(k->via.str.ptr, key, kl) == 0)
      return &m->ptr[i].val;
  }
  return NULL;
}

int nsa_proto_get_int(const msgpack_object *map, const char *key, int64_t *out) {
  const msgpack_object *o = nsa_proto_map_get(map, key);
  if (!o) return -1;
  if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
    if (o->via.u64 > (uint64_t)INT64_MAX) return -1;
    *out = (int64_t)o->via.u64;
    return 0;
  }
  if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
    *out = o->via.i64;
    return 0;
  }
  return -1;
}

int nsa_proto_get_uint(const msgpack_object *map, const char *key, uint64_t *out) {
  const msgpack_object *o = nsa_proto_map_get(map, key);
  if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER) return -1;
  *out = o->via.u64;
  return 0;
}

int nsa_proto_get_double(const msgpack_object *map, const char *key, double *out) {
  const msgpack_object *o = nsa_proto_map_get(map, key);
  if (!o) return -1;
  switch (o->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: *out = o->via.f64; return 0;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: *out = (double)o->via.u64; return 0;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: *out = (double)o->via.i64; return 0;
    default: return -1;
  }
}

int nsa_proto_get_bool(const msgpack_object *map, const char *key, int *out) {
  const msgpack_object *o = nsa_proto_map_get(map, key);
  if (!o || o->type != MSGPACK_OBJECT_BOOLEAN) return -1;
  *out = o->via.boolean ? 1 : 0;
  return 0;
}

const char *nsa_proto_get_strn(const msgpack_object *map, const char *key, size_t *len) {
  const msgpack_object *o = nsa_proto_map_get(map, key);
  if (!o || o->type != MSGPACK_OBJECT_STR) return NULL;
  if (len) *len = o->via.str.size;
  return o->via.str.size ? o->via.str.ptr : "";
}

int nsa_proto_get_str(const msgpack_object *map, const char *key, char *buf, size_t len) {
  size_t n;
  const char *s = nsa_proto_get_strn(map, key, &n);
  if (!s || !buf || n >= len) return -1;
  memcpy(buf, s, n);
  buf[n] = '\0';
  return 0;
}

int nsa_proto_response_error(const nsa_proto_msg_t *m, nsa_proto_err_t *err) {
  if (m->error.type == MSGPACK_OBJECT_NIL) {
    if (err) {
      err->code = NSA_E_OK;
      err->message[0] = '\0';
    }
    return 0;
  }
  size_t cl, ml;
  const char *code = nsa_proto_get_strn(&m->error, "code", &cl);
  const char *msg = nsa_proto_get_strn(&m->error, "message", &ml);
  if (!code) {
    nsa_proto_err_set(err, NSA_E_INTERNAL, "malformed error object in response %u",
                      (unsigned)m->msgid);
    return -1;
  }
  if (err) {
    err->code = nsa_proto_code_parse(code, cl);
    if (!msg) ml = 0;
    if (ml >= sizeof err->message) ml = sizeof err->message - 1;
    if (ml) memcpy(err->message, msg, ml);
    err->message[ml] = '\0';
  }
  return 1;
}

/* nsaclient_ops.c — libnsaclient requests: regions, shm helper, selection
 * attention, flags, metrics, and msgpack values (see nsaclient.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nsaclient_internal.h"

/* ------------------------------------------------------------- values --- */

int nsac_value_from_bytes(nsa_client_t *c, char *bytes, size_t len, nsa_client_value_t **out) {
  nsa_client_value_t *v = calloc(1, sizeof *v);
  char *copy = malloc(len ? len : 1);
  if (!v || !copy) {
    free(v);
    free(copy);
    return nsac_fail(c, "io_error", "out of memory");
  }
  memcpy(copy, bytes, len);
  msgpack_unpacked_init(&v->up);
  if (msgpack_unpack_next(&v->up, copy, len, NULL) != MSGPACK_UNPACK_SUCCESS) {
    msgpack_unpacked_destroy(&v->up);
    free(copy);
    free(v);
    return nsac_fail(c, "bad_reply", "undecodable value");
  }
  v->bytes = copy;
  *out = v;
  return 0;
}

void nsa_client_value_free(nsa_client_value_t *v) {
  if (!v) return;
  msgpack_unpacked_destroy(&v->up);
  free(v->bytes);
  free(v);
}

typedef struct {
  char *p;
  size_t n, cap;
} sbuf_t;

static void sb_add(sbuf_t *b, const char *s, size_t n) {
  if (b->n + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + n + 1) cap *= 2;
    char *np = realloc(b->p, cap);
    if (!np) return;
    b->p = np;
    b->cap = cap;
  }
  memcpy(b->p + b->n, s, n);
  b->n += n;
  b->p[b->n] = 0;
}

static void sb_puts(sbuf_t *b, const char *s) { sb_add(b, s, strlen(s)); }

static void json_str(sbuf_t *b, const char *s, size_t n) {
  sb_add(b, "\"", 1);
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    char esc[8];
    if (ch == '"' || ch == '\\') {
      esc[0] = '\\';
      esc[1] = (char)ch;
      sb_add(b, esc, 2);
    } else if (ch == '\n') {
      sb_add(b, "\\n", 2);
    } else if (ch < 0x20) {
      snprintf(esc, sizeof esc, "\\u%04x", ch);
      sb_add(b, esc, 6);
    } else {
      sb_add(b, (const char *)&ch, 1);
    }
  }
  sb_add(b, "\"", 1);
}

static void indent(sbuf_t *b, int pretty, int depth) {
  if (!pretty) return;
  sb_add(b, "\n", 1);
  for (int i = 0; i < depth; i++) sb_add(b, "  ", 2);
}

static void json_obj(sbuf_t *b, const msgpack_object *o, int pretty, int depth) {
  char tmp[64];
  switch (o->type) {
    case MSGPACK_OBJECT_NIL: sb_puts(b, "null"); break;
    case MSGPACK_OBJECT_BOOLEAN: sb_puts(b, o->via.boolean ? "true" : "false"); break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
      snprintf(tmp, sizeof tmp, "%llu", (unsigned long long)o->via.u64);
      sb_puts(b, tmp);
      break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
      snprintf(tmp, sizeof tmp, "%lld", (long long)o->via.i64);
      sb_puts(b, tmp);
      break;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
      if (isfinite(o->via.f64)) {
        snprintf(tmp, sizeof tmp, "%.17g", o->via.f64);
        sb_puts(b, tmp);
      } else {
        sb_puts(b, isnan(o->via.f64) ? "\"NaN\"" : o->via.f64 > 0 ? "\"+Inf\"" : "\"-Inf\"");
      }
      break;
    case MSGPACK_OBJECT_STR: json_str(b, o->via.str.ptr, o->via.str.size); break;
    case MSGPACK_OBJECT_BIN:
      snprintf(tmp, sizeof tmp, "\"<%u bytes>\"", o->via.bin.size);
      sb_puts(b, tmp);
      break;
    case MSGPACK_OBJECT_ARRAY:
      sb_puts(b, "[");
      for (uint32_t i = 0; i < o->via.array.size; i++) {
        if (i) sb_puts(b, ",");
        indent(b, pretty, depth + 1);
        json_obj(b, &o->via.array.ptr[i], pretty, depth + 1);
      }
      if (o->via.array.size) indent(b, pretty, depth);
      sb_puts(b, "]");
      break;
    case MSGPACK_OBJECT_MAP:
      sb_puts(b, "{");
      for (uint32_t i = 0; i < o->via.map.size; i++) {
        const msgpack_object_kv *kv = &o->via.map.ptr[i];
        if (i) sb_puts(b, ",");
        indent(b, pretty, depth + 1);
        if (kv->key.type == MSGPACK_OBJECT_STR) {
          json_str(b, kv->key.via.str.ptr, kv->key.via.str.size);
        } else {
          sbuf_t k = {0};
          json_obj(&k, &kv->key, 0, 0);
          json_str(b, k.p ? k.p : "", k.n);
          free(k.p);
        }
        sb_puts(b, pretty ? ": " : ":");
        json_obj(b, &kv->val, pretty, depth + 1);
      }
      if (o->via.map.size) indent(b, pretty, depth);
      sb_puts(b, "}");
      break;
    default: sb_puts(b, "null"); break;
  }
}

char *nsa_client_value_json(const nsa_client_value_t *v, int pretty) {
  sbuf_t b = {0};
  if (v) json_obj(&b, &v->up.data, pretty, 0);
  if (!b.p) return strdup("null");
  return b.p;
}

static const msgpack_object *lookup(const nsa_client_value_t *v, const char *path) {
  if (!v) return NULL;
  const msgpack_object *o = &v->up.data;
  const char *p = path;
  while (p && *p) {
    const char *dot = strchr(p, '.');
    size_t n = dot ? (size_t)(dot - p) : strlen(p);
    const msgpack_object *next = NULL;
    if (o->type == MSGPACK_OBJECT_ARRAY) {
      char *end = NULL;
      unsigned long idx = strtoul(p, &end, 10);
      if (end != p + n || idx >= o->via.array.size) return NULL;
      o = &o->via.array.ptr[idx];
      p = dot ? dot + 1 : NULL;
      continue;
    }
    if (o->type != MSGPACK_OBJECT_MAP) return NULL;
    for (uint32_t i = 0; i < o->via.map.size; i++) {
      const msgpack_object *k = &o->via.map.ptr[i].key;
      if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == n && !memcmp(k->via.str.ptr, p, n)) {
        next = &o->via.map.ptr[i].val;
        break;
      }
    }
    if (!next) return NULL;
    o = next;
    p = dot ? dot + 1 : NULL;
  }
  return o;
}

int nsa_client_value_len(const nsa_client_value_t *v, const char *path) {
  const msgpack_object *o = lookup(v, path);
  if (!o) return -1;
  if (o->type == MSGPACK_OBJECT_MAP) return (int)o->via.map.size;
  if (o->type == MSGPACK_OBJECT_ARRAY) return (int)o->via.array.size;
  return -1;
}

int nsa_client_value_key(const nsa_client_value_t *v, const char *path, int i, char *buf,
                         size_t len) {
  const msgpack_object *o = lookup(v, path);
  if (!o || o->type != MSGPACK_OBJECT_MAP || i < 0 || (uint32_t)i >= o->via.map.size || !len)
    return -1;
  const msgpack_object *k = &o->via.map.ptr[i].key;
  if (k->type == MSGPACK_OBJECT_STR) {
    size_t n = k->via.str.size < len - 1 ? k->via.str.size : len - 1;
    memcpy(buf, k->via.str.ptr, n);
    buf[n] = 0;
    return 0;
  }
  sbuf_t b = {0};
  json_obj(&b, k, 0, 0);
  snprintf(buf, len, "%s", b.p ? b.p : "");
  free(b.p);
  return 0;
}

int nsa_client_value_get_int(const nsa_client_value_t *v, const char *path, int64_t *out) {
  const msgpack_object *o = lookup(v, path);
  if (!o) return -1;
  if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) *out = (int64_t)o->via.u64;
  else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) *out = o->via.i64;
  else if (o->type == MSGPACK_OBJECT_BOOLEAN) *out = o->via.boolean;
  else if (o->type == MSGPACK_OBJECT_FLOAT64 || o->type == MSGPACK_OBJECT_FLOAT32) *out = (int64_t)o->via.f64;
  else return -1;
  return 0;
}

int nsa_client_value_get_double(const nsa_client_value_t *v, const char *path, double *out) {
  const msgpack_object *o = lookup(v, path);
  if (!o) return -1;
  if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) *out = (double)o->via.u64;
  else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) *out = (double)o->via.i64;
  else if (o->type == MSGPACK_OBJECT_FLOAT64 || o->type == MSGPACK_OBJECT_FLOAT32) *out = o->via.f64;
  else if (o->type == MSGPACK_OBJECT_BOOLEAN) *out = o->via.boolean;
  else return -1;
  return 0;
}

int nsa_client_value_get_str(const nsa_client_value_t *v, const char *path, char *buf, size_t len) {
  const msgpack_object *o = lookup(v, path);
  if (!o || !len) return -1;
  if (o->type == MSGPACK_OBJECT_STR) {
    size_t n = o->via.str.size < len - 1 ? o->via.str.size : len - 1;
    memcpy(buf, o->via.str.ptr, n);
    buf[n] = 0;
    return 0;
  }
  sbuf_t b = {0};
  json_obj(&b, o, 0, 0);
  snprintf(buf, len, "%s", b.p ? b.p : "");
  free(b.p);
  return 0;
}

/* ------------------------------------------------------------ regions --- */

nsac_region_t *nsac_entry(nsa_client_t *c, uint64_t id) {
  for (int i = 0; i < c->nregions; i++)
    if (c->regions[i].id == id) return &c->regions[i];
  return NULL;
}

static uint64_t wire_of(nsa_client_t *c, uint64_t id) {
  nsac_region_t *r = nsac_entry(c, id);
  return r ? r->wire_id : id; /* not ours: sent as is (the daemon answers not_found) */
}

static void pack_reg(nsa_client_t *c, msgpack_packer *pk, const void *ctx) {
  nsac_pack_register(pk, ctx);
}

static uint64_t result_uint(nsa_client_t *c, char *res, size_t rl, const char *key, int *ok) {
  uint64_t v = 0;
  *ok = 0;
  msgpack_unpacked up;
  msgpack_unpacked_init(&up);
  if (res && msgpack_unpack_next(&up, res, rl, NULL) == MSGPACK_UNPACK_SUCCESS &&
      up.data.type == MSGPACK_OBJECT_MAP && nsa_proto_get_uint(&up.data, key, &v) == 0)
    *ok = 1;
  msgpack_unpacked_destroy(&up);
  return v;
}

int nsac_register_entry(nsa_client_t *c, const nsac_region_t *src, uint64_t *id_out) {
  int ev = src->kind == NSAC_EVENT;
  char *res = NULL;
  size_t rl = 0;
  if (nsac_call(c, ev ? "event.register" : "region.register", pack_reg, src, &res, &rl) != 0)
    return -1;
  int ok;
  uint64_t wire = result_uint(c, res, rl, ev ? "event" : "region", &ok);
  free(res);
  if (!ok) return nsac_fail(c, "bad_reply", "register reply has no '%s'", ev ? "event" : "region");
  if (c->nregions == c->capregions) {
    int cap = c->capregions ? c->capregions * 2 : 8;
    nsac_region_t *nr = realloc(c->regions, (size_t)cap * sizeof *nr);
    if (!nr) return nsac_fail(c, "io_error", "out of memory");
    c->regions = nr;
    c->capregions = cap;
  }
  /* The caller's id is the first wire id, unless an older entry already
   * holds that number (ids restart when the daemon restarts). */
  uint64_t id = wire;
  while (nsac_entry(c, id)) id = (id | (1ull << 62)) + 1;
  nsac_region_t *r = &c->regions[c->nregions++];
  *r = *src;
  r->id = id;
  r->wire_id = wire;
  *id_out = id;
  return 0;
}

int nsa_client_region_register_shm(nsa_client_t *c, const char *name, uint64_t size,
                                   uint64_t *region) {
  if (!name || strlen(name) >= NSA_PROTO_STR)
    return nsac_fail(c, "invalid_argument", "bad shm name");
  nsac_region_t r;
  memset(&r, 0, sizeof r);
  r.kind = NSAC_SHM;
  snprintf(r.name, sizeof r.name, "%s", name);
  r.size = size;
  return nsac_register_entry(c, &r, region);
}

int nsa_client_region_register_cuda_ipc(nsa_client_t *c, int device, const void *handle64,
                                        uint64_t size, uint64_t *region) {
  nsac_region_t r;
  memset(&r, 0, sizeof r);
  r.kind = NSAC_CUDA_IPC;
  r.device = device;
  memcpy(r.handle, handle64, 64);
  r.size = size;
  return nsac_register_entry(c, &r, region);
}

int nsa_client_event_register(nsa_client_t *c, int device, const void *handle64,
                              uint64_t *event) {
  nsac_region_t r;
  memset(&r, 0, sizeof r);
  r.kind = NSAC_EVENT;
  r.device = device;
  memcpy(r.handle, handle64, 64);
  return nsac_register_entry(c, &r, event);
}

typedef struct {
  uint64_t id;
  int event;
} unreg_ctx_t;

static void pack_unreg(nsa_client_t *c, msgpack_packer *pk, const void *ctx) {
  const unreg_ctx_t *u = ctx;
  msgpack_pack_map(pk, 1);
  nsa_proto_pack_kv_uint(pk, u->event ? "event" : "region", wire_of(c, u->id));
}

static int unregister(nsa_client_t *c, uint64_t id, int event) {
  nsac_region_t *e = nsac_entry(c, id);
  /* An entry of ours while the daemon is gone: it only exists here (a new
   * daemon learns it at reconnect), so forgetting it is the whole job. */
  unreg_ctx_t u = {id, event};
  int rc = (e && !nsac_connected(c))
               ? 0
               : nsac_call(c, event ? "event.unregister" : "region.unregister", pack_unreg, &u,
                           NULL, NULL);
  e = nsac_entry(c, id);
  if (e) *e = c->regions[--c->nregions];
  return rc;
}

int nsa_client_region_unregister(nsa_client_t *c, uint64_t region) {
  return unregister(c, region, 0);
}

int nsa_client_event_unregister(nsa_client_t *c, uint64_t event) { return unregister(c, event, 1); }

static atomic_uint g_shm_counter;

int nsa_client_shm_create(nsa_client_t *c, size_t size, nsa_client_shm_t **out) {
  *out = NULL;
  if (size == 0) return nsac_fail(c, "invalid_argument", "size must be > 0");
  nsa_client_shm_t *s = calloc(1, sizeof *s);
  if (!s) return nsac_fail(c, "io_error", "out of memory");
  int fd = -1;
  for (int tries = 0; tries < 16 && fd < 0; tries++) {
    snprintf(s->name, sizeof s->name, "/nsa-%d-%u", (int)getpid(),
             atomic_fetch_add(&g_shm_counter, 1));
    fd = shm_open(s->name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 && errno != EEXIST) break;
  }
  if (fd < 0) {
    int e = errno;
    free(s);
    return nsac_fail(c, "io_error", "shm_open: %s", strerror(e));
  }
  if (ftruncate(fd, (off_t)size) != 0) {
    int e = errno;
    close(fd);
    shm_unlink(s->name);
    free(s);
    return nsac_fail(c, "io_error", "ftruncate: %s", strerror(e));
  }
  void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) {
    int e = errno;
    shm_unlink(s->name);
    free(s);
    return nsac_fail(c, "io_error", "mmap: %s", strerror(e));
  }
  s->ptr = p;
  s->size = size;
  if (nsa_client_region_register_shm(c, s->name, size, &s->region) != 0) {
    munmap(p, size);
    shm_unlink(s->name);
    free(s);
    return -1;
  }
  if (c->nshm == c->capshm) {
    int cap = c->capshm ? c->capshm * 2 : 8;
    nsa_client_shm_t **ns = realloc(c->shms, (size_t)cap * sizeof *ns);
    if (!ns) {
      nsa_client_region_unregister(c, s->region);
      munmap(p, size);
      shm_unlink(s->name);
      free(s);
      return nsac_fail(c, "io_error", "out of memory");
    }
    c->shms = ns;
    c->capshm = cap;
  }
  c->shms[c->nshm++] = s;
  *out = s;
  return 0;
}

int nsa_client_shm_destroy(nsa_client_t *c, nsa_client_shm_t *s) {
  if (!s) return 0;
  int rc = 0;
  for (int i = 0; i < c->nshm; i++)
    if (c->shms[i] == s) {
      c->shms[i] = c->shms[--c->nshm];
      break;
    }
  rc = nsa_client_region_unregister(c, s->region);
  munmap(s->ptr, s->size);
  shm_unlink(s->name);
  free(s);
  return rc;
}

/* ----------------------------------------------------------- sel_attn --- */

void nsa_client_tensor(nsa_client_tensor_t *t, uint64_t region, uint64_t offset,
                       nsa_client_dtype_t dtype, int ndim, const int64_t *shape) {
  memset(t, 0, sizeof *t);
  t->region = region;
  t->offset = offset;
  t->dtype = dtype;
  t->ndim = ndim > NSA_CLIENT_MAX_DIMS ? NSA_CLIENT_MAX_DIMS : ndim;
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    t->shape[i] = shape[i];
    t->strides[i] = s;
    s *= shape[i];
  }
}

size_t nsa_client_tensor_bytes(nsa_client_dtype_t dtype, int ndim, const int64_t *shape) {
  size_t n = dtype == NSA_CLIENT_F32 || dtype == NSA_CLIENT_I32 ? 4 : 2;
  for (int i = 0; i < ndim; i++) n *= (size_t)shape[i];
  return n;
}

static void pack_tensor(nsa_client_t *c, msgpack_packer *pk, const char *key,
                        const nsa_client_tensor_t *t) {
  nsa_proto_tensor_t p;
  memset(&p, 0, sizeof p);
  p.region = wire_of(c, t->region);
  p.offset = t->offset;
  p.dtype = (nsa_dtype_t)t->dtype;
  p.ndim = t->ndim;
  for (int i = 0; i < t->ndim && i < NSA_MAX_DIMS; i++) {
    p.shape[i] = t->shape[i];
    p.strides[i] = t->strides[i];
  }
  p.has_strides = t->has_strides;
  nsa_proto_pack_kv_tensor(pk, key, &p);
}

static void pack_sel(nsa_client_t *c, msgpack_packer *pk, const nsa_client_sel_t *s) {
  nsa_proto_pack_str(pk, "sel");
  if (s->kind == NSA_CLIENT_SEL_RANGES) {
    msgpack_pack_map(pk, 2);
    nsa_proto_pack_kv_str(pk, "kind", "ranges");
    pack_tensor(c, pk, "ranges", &s->t);
  } else {
    msgpack_pack_map(pk, 3);
    nsa_proto_pack_kv_str(pk, "kind", "block_indices");
    pack_tensor(c, pk, "indices", &s->t);
    nsa_proto_pack_kv_int(pk, "block_size", s->block_size);
  }
}

/* wait_event?, done_event?, sync? — count of keys packed by pack_exec. */
static int exec_keys(const nsa_client_exec_t *x) {
  return (x->has_wait_event != 0) + (x->has_done_event != 0) + (x->async != 0);
}

static void pack_exec(nsa_client_t *c, msgpack_packer *pk, const nsa_client_exec_t *x) {
  if (x->has_wait_event) nsa_proto_pack_kv_uint(pk, "wait_event", wire_of(c, x->wait_event));
  if (x->has_done_event) nsa_proto_pack_kv_uint(pk, "done_event", wire_of(c, x->done_event));
  if (x->async) nsa_proto_pack_kv_bool(pk, "sync", 0);
}

typedef struct {
  const void *args;
  nsa_client_exec_t ex;
} sel_ctx_t;

static void pack_fwd(nsa_client_t *c, msgpack_packer *pk, const void *ctx) {
  const sel_ctx_t *sc = ctx;
  const nsa_client_fwd_t *a = sc->args;
  int has_scale = a->scale > 0;
  msgpack_pack_map(pk, 5 + (a->has_lse ? 1 : 0) + (has_scale ? 1 : 0) + exec_keys(&sc->ex));
  pack_tensor(c, pk, "q", &a->q);
  pack_tensor(c, pk, "k", &a->k);
  pack_tensor(c, pk, "v", &a->v);
  pack_tensor(c, pk, "o", &a->o);
  if (a->has_lse) pack_tensor(c, pk, "lse", &a->lse);
  pack_sel(c, pk, &a->sel);
  if (has_scale) nsa_proto_pack_kv_double(pk, "scale", a->scale);
  pack_exec(c, pk, &sc->ex);
}

static void pack_bwd(nsa_client_t *c, msgpack_packer *pk, const void *ctx) {
  const sel_ctx_t *sc = ctx;
  const nsa_client_bwd_t *a = sc->args;
  int has_scale = a->scale > 0;
  msgpack_pack_map(pk, 10 + (has_scale ? 1 : 0) + exec_keys(&sc->ex));
  pack_tensor(c, pk, "q", &a->q);
  pack_tensor(c, pk, "k", &a->k);
  pack_tensor(c, pk, "v", &a->v);
  pack_tensor(c, pk, "o", &a->o);
  pack_tensor(c, pk, "lse", &a->lse);
  pack_tensor(c, pk, "do", &a->dout);
  pack_tensor(c, pk, "dq", &a->dq);
  pack_tensor(c, pk, "dk", &a->dk);
  pack_tensor(c, pk, "dv", &a->dv);
  pack_sel(c, pk, &a->sel);
  if (has_scale) nsa_proto_pack_kv_double(pk, "scale", a->scale);
  pack_exec(c, pk, &sc->ex);
}

int nsa_client_forward_submit_ex(nsa_client_t *c, const nsa_client_fwd_t *a,
                                 const nsa_client_exec_t *ex, uint32_t *ticket) {
  sel_ctx_t sc = {a, {0}};
  if (ex) sc.ex = *ex;
  return nsac_submit(c, "sel_attn.forward", pack_fwd, &sc, ticket);
}

int nsa_client_backward_submit_ex(nsa_client_t *c, const nsa_client_bwd_t *a,
                                  const nsa_client_exec_t *ex, uint32_t *ticket) {
  sel_ctx_t sc = {a, {0}};
  if (ex) sc.ex = *ex;
  return nsac_submit(c, "sel_attn.backward", pack_bwd, &sc, ticket);
}

int nsa_client_forward_submit(nsa_client_t *c, const nsa_client_fwd_t *a, uint32_t *ticket) {
  return nsa_client_forward_submit_ex(c, a, NULL, ticket);
}

int nsa_client_backward_submit(nsa_client_t *c, const nsa_client_bwd_t *a, uint32_t *ticket) {
  return nsa_client_backward_submit_ex(c, a, NULL, ticket);
}

int nsa_client_wait(nsa_client_t *c, uint32_t ticket, nsa_client_result_t *res) {
  char *bytes = NULL;
  size_t len = 0;
  if (nsac_wait_reply(c, ticket, &bytes, &len) != 0) return -1;
  int rc = 0;
  if (res) {
    memset(res, 0, sizeof *res);
    msgpack_unpacked up;
    msgpack_unpacked_init(&up);
    if (msgpack_unpack_next(&up, bytes, len, NULL) == MSGPACK_UNPACK_SUCCESS &&
        up.data.type == MSGPACK_OBJECT_MAP) {
      const msgpack_object *r = &up.data;
      uint64_t u = 0;
      nsa_proto_get_str(r, "path", res->path, sizeof res->path);
      nsa_proto_get_int(r, "rows", &res->rows);
      nsa_proto_get_int(r, "max_len", &res->max_len);
      nsa_proto_get_double(r, "mean_len", &res->mean_len);
      if (!nsa_proto_get_uint(r, "flags_epoch", &u)) res->flags_epoch = u;
      nsa_proto_get_double(r, "device_us", &res->device_us);
      if (!res->path[0]) rc = nsac_fail(c, "bad_reply", "reply without 'path'");
    } else {
      rc = nsac_fail(c, "bad_reply", "reply is not a map");
    }
    msgpack_unpacked_destroy(&up);
  }
  free(bytes);
  return rc;
}

int nsa_client_forward(nsa_client_t *c, const nsa_client_fwd_t *a, nsa_client_result_t *res) {
  uint32_t t;
  if (nsa_client_forward_submit(c, a, &t) != 0) return -1;
  return nsa_client_wait(c, t, res);
}

int nsa_client_backward(nsa_client_t *c, const nsa_client_bwd_t *a, nsa_client_result_t *res) {
  uint32_t t;
  if (nsa_client_backward_submit(c, a, &t) != 0) return -1;
  return nsa_client_wait(c, t, res);
}

/* ------------------------------------------------------ flags/metrics --- */

typedef struct {
  const nsa_client_label_t *kv;
  int n;
} kv_ctx_t;

static void pack_kv(nsa_client_t *c, msgpack_packer *pk, const void *ctx) {
  const kv_ctx_t *k = ctx;
  msgpack_pack_map(pk, (size_t)k->n);
  for (int i = 0; i < k->n; i++) nsa_proto_pack_kv_str(pk, k->kv[i].key, k->kv[i].value);
}

static int call_value(nsa_client_t *c, const char *method, nsac_pack_fn fn, const void *ctx,
                      nsa_client_value_t **out) {
  char *res = NULL;
  size_t rl = 0;
  if (out) *out = NULL;
  if (nsac_call(c, method, fn, ctx, &res, &rl) != 0) return -1;
  int rc = 0;
  if (out) rc = nsac_value_from_bytes(c, res, rl, out);
  free(res);
  return rc;
}

int nsa_client_call(nsa_client_t *c, const char *method, const nsa_client_label_t *params,
                    int nparams, nsa_client_value_t **result) {
  kv_ctx_t k = {params, nparams};
  return call_value(c, method, pack_kv, &k, result);
}

int nsa_client_flags_get(nsa_client_t *c, nsa_client_value_t **out) {
  return call_value(c, "flags.get", NULL, NULL, out);
}

typedef struct {
  const char *name, *value;
  double percent;
  const nsa_client_label_t *match;
  int nmatch;
} fset_ctx_t;

static void pack_fset(nsa_client_t *c, msgpack_packer *pk, const void *ctx) {
  const fset_ctx_t *f = ctx;
  msgpack_pack_map(pk, 2 + (f->percent >= 0) + (f->nmatch > 0));
  nsa_proto_pack_kv_str(pk, "name", f->name);
  nsa_proto_pack_kv_str(pk, "value", f->value);
  if (f->percent >= 0) nsa_proto_pack_kv_double(pk, "percent", f->percent);
  if (f->nmatch > 0) {
    nsa_proto_pack_str(pk, "match");
    msgpack_pack_map(pk, (size_t)f->nmatch);
    for (int i = 0; i < f->nmatch; i++) nsa_proto_pack_kv_str(pk, f->match[i].key, f->match[i].value);
  }
}

static int epoch_of(nsa_client_t *c, char *res, size_t rl, uint64_t *epoch) {
  int ok;
  uint64_t e = result_uint(c, res, rl, "epoch", &ok);
  free(res);
  if (!ok) return nsac_fail(c, "bad_reply", "reply has no 'epoch'");
  if (epoch) *epoch = e;
  return 0;
}

int nsa_client_flags_set(nsa_client_t *c, const char *name, const char *value, double percent,
                         const nsa_client_label_t *match, int nmatch, uint64_t *epoch) {
  fset_ctx_t f = {name, value, percent, match, nmatch};
  char *res = NULL;
  size_t rl = 0;
  if (nsac_call(c, "flags.set", pack_fset, &f, &res, &rl) != 0) return -1;
  return epoch_of(c, res, rl, epoch);
}

int nsa_client_flags_reset(nsa_client_t *c, const char *name, uint64_t *epoch) {
  nsa_client_label_t kv = {"name", name};
  kv_ctx_t k = {&kv, 1};
  char *res = NULL;
  size_t rl = 0;
  if (nsac_call(c, "flags.reset", pack_kv, &k, &res, &rl) != 0) return -1;
  return epoch_of(c, res, rl, epoch);
}

int nsa_client_metrics_get(nsa_client_t *c, nsa_client_value_t **out) {
  nsa_client_value_t *v = NULL;
  if (call_value(c, "metrics.get", NULL, NULL, &v) != 0) return -1;
  /* Hand out the inner map (result is {metrics: {...}}). */
  const msgpack_object *m = NULL;
  if (v->up.data.type == MSGPACK_OBJECT_MAP) m = nsa_proto_map_get(&v->up.data, "metrics");
  if (!m) {
    nsa_client_value_free(v);
    return nsac_fail(c, "bad_reply", "metrics.get reply has no 'metrics'");
  }
  char *bytes;
  size_t len;
  msgpack_sbuffer sb;
  msgpack_packer pk;
  msgpack_sbuffer_init(&sb);
  msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
  msgpack_pack_object(&pk, *m);
  len = sb.size;
  bytes = msgpack_sbuffer_release(&sb);
  nsa_client_value_free(v);
  int rc = nsac_value_from_bytes(c, bytes, len, out);
  free(bytes);
  return rc;
}

int nsa_client_metrics_prometheus(nsa_client_t *c, char **text) {
  nsa_client_label_t kv = {"format", "prometheus"};
  kv_ctx_t k = {&kv, 1};
  nsa_client_value_t *v = NULL;
  *text = NULL;
  if (call_value(c, "metrics.get", pack_kv, &k, &v) != 0) return -1;
  const msgpack_object *t = NULL;
  if (v->up.data.type == MSGPACK_OBJECT_MAP) t = nsa_proto_map_get(&v->up.data, "text");
  if (!t || t->type != MSGPACK_OBJECT_STR) {
    nsa_client_value_free(v);
    return nsac_fail(c, "bad_reply", "metrics.get reply has no 'text'");
  }
  *text = strndup(t->via.str.ptr, t->via.str.size);
  nsa_client_value_free(v);
  return *text ? 0 : nsac_fail(c, "io_error", "out of memory");
}

static void pack_sub(nsa_client_t *c, msgpack_packer *pk, const void *ctx) {
  msgpack_pack_map(pk, 1);
  nsa_proto_pack_kv_uint(pk, "interval_ms", *(const uint32_t *)ctx);
}

int nsa_client_subscribe(nsa_client_t *c, uint32_t interval_ms) {
  int rc = nsac_call(c, "metrics.subscribe", pack_sub, &interval_ms, NULL, NULL);
  if (rc == 0) c->sub_interval_ms = interval_ms; /* repeated after a reconnect */
  return rc;
}

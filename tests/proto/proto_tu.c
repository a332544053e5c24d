/* proto_tu.c — shared helpers of the tests/proto Criterion suite (see proto_tu.h). */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mpbuild.h"
#include "proto_tu.h"

/* ----------------------------------------------------------- helpers --- */

static uint64_t rng_s;
uint64_t rng_u64(void) { /* splitmix64 */
  uint64_t z = (rng_s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
int64_t rng_int(int64_t lo, int64_t hi) { /* [lo, hi] */
  uint64_t span = (uint64_t)hi - (uint64_t)lo + 1;
  uint64_t x = span ? rng_u64() % span : rng_u64();
  return (int64_t)((uint64_t)lo + x);
}
void rng_init(void) {
  rng_s = (uint64_t)time(NULL) ^ ((uint64_t)clock() << 20);
  cr_log_info("rng seed %llu", (unsigned long long)rng_s);
}
void rand_str(char *buf, size_t cap) {
  size_t n = (size_t)rng_int(1, (int64_t)cap - 1);
  for (size_t i = 0; i < n; i++) buf[i] = (char)rng_int(0x20, 0x7e);
  buf[n] = '\0';
}

/* Decodes a whole buffer as exactly one message; returns next()'s status. */
int decode1(nsa_proto_decoder_t *d, const void *buf, size_t len, nsa_proto_msg_t *m,
                   nsa_proto_err_t *e, int *known, uint32_t *id) {
  cr_assert(eq(int, nsa_proto_decoder_feed(d, buf, len), 0));
  return nsa_proto_decoder_next(d, m, e, known, id);
}

/* Builds [0, 42, method, params], decodes and validates it. Returns the
 * parse status; *err holds the message. Decoding itself must succeed. */
int parse_text(const char *method, const char *params, nsa_request_t *req,
                      nsa_proto_err_t *err) {
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  cr_assert(gt(int, mpb_request(&w, 42, method, params), 0), "bad test text: %s", params);
  nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
  nsa_proto_msg_t m;
  int known;
  uint32_t id;
  int r = decode1(d, w.sbuf.data, w.sbuf.size, &m, err, &known, &id);
  cr_assert(eq(int, r, 1), "decode of %s %s: %d %s", method, params, r, err->message);
  int pr = nsa_proto_parse_request(&m, req, err);
  cr_assert(eq(u32, req->msgid, 42));
  nsa_proto_decoder_free(d);
  nsa_proto_writer_destroy(&w);
  return pr;
}

/* Asserts a bad_request (or other code) whose message contains `needle`. */
void expect_err(const char *method, const char *params, nsa_proto_code_t code,
                       const char *needle) {
  nsa_request_t req;
  nsa_proto_err_t err;
  int r = parse_text(method, params, &req, &err);
  cr_assert(eq(int, r, -1), "%s %s: accepted", method, params);
  cr_assert(eq(int, err.code, code), "%s %s: code %s (%s)", method, params,
            nsa_proto_code_name(err.code), err.message);
  cr_assert(strstr(err.message, needle) != NULL, "%s %s: message '%s' lacks '%s'", method,
            params, err.message, needle);
}

void expect_ok(const char *method, const char *params, nsa_request_t *req) {
  nsa_proto_err_t err;
  int r = parse_text(method, params, req, &err);
  cr_assert(eq(int, r, 0), "%s %s: %s", method, params, err.message);
}

/* Decodes raw bytes; expects a fatal error. */
void expect_fatal(const void *buf, size_t len, size_t max, int want_known, uint32_t want_id,
                         const char *needle) {
  nsa_proto_decoder_t *d = nsa_proto_decoder_new(max);
  nsa_proto_msg_t m;
  nsa_proto_err_t e;
  int known = -7;
  uint32_t id = 0;
  int r = decode1(d, buf, len, &m, &e, &known, &id);
  cr_assert(eq(int, r, -1), "not fatal (%d)", r);
  cr_assert(eq(int, e.code, NSA_E_BAD_REQUEST), "code %s: %s", nsa_proto_code_name(e.code),
            e.message);
  cr_assert(eq(int, known, want_known), "msgid_known %d (%s)", known, e.message);
  if (want_known) cr_assert(eq(u32, id, want_id));
  if (needle) cr_assert(strstr(e.message, needle) != NULL, "'%s' lacks '%s'", e.message, needle);
  /* Sticky: more bytes change nothing, and are not kept. */
  static const unsigned char ping[] = {0x94, 0x00, 0x01, 0xa4, 'p', 'i', 'n', 'g', 0x80};
  cr_assert(eq(int, nsa_proto_decoder_feed(d, ping, sizeof ping), 0));
  cr_assert(eq(int, nsa_proto_decoder_next(d, &m, &e, &known, &id), -1));
  cr_assert(eq(sz, nsa_proto_decoder_pending(d), 0));
  nsa_proto_decoder_free(d);
}

/* --------------------------------------------------- random requests --- */

void rand_tensor(nsa_proto_tensor_t *t) {
  memset(t, 0, sizeof *t);
  t->region = rng_u64() >> rng_int(0, 63);
  t->offset = rng_u64() >> rng_int(0, 63);
  t->dtype = (nsa_dtype_t)rng_int(0, 3);
  t->ndim = (int)rng_int(1, NSA_MAX_DIMS);
  for (int i = 0; i < t->ndim; i++) t->shape[i] = rng_int(0, 4096);
  t->has_strides = (int)rng_int(0, 1);
  if (t->has_strides)
    for (int i = 0; i < t->ndim; i++) t->strides[i] = rng_int(0, INT64_MAX);
  else
    cr_assert(eq(int, nsa_proto_tensor_set_contiguous(t), 0));
}

void rand_labels(nsa_proto_label_t *l, int *n, int max) {
  *n = (int)rng_int(0, max);
  for (int i = 0; i < *n; i++) {
    rand_str(l[i].key, sizeof l[i].key - 4);
    char idx[3] = {(char)('0' + i / 10), (char)('0' + i % 10), 0};
    strcat(l[i].key, idx); /* unique */
    rand_str(l[i].value, sizeof l[i].value);
  }
}

/* A random valid request of method m, exactly as parse_request would fill it. */
void rand_request(nsa_method_t m, nsa_request_t *r) {
  memset(r, 0, sizeof *r);
  r->method = m;
  r->msgid = (uint32_t)rng_u64();
  switch (m) {
    case NSA_M_HELLO:
      r->u.hello.protocol = rng_int(0, INT64_MAX);
      rand_str(r->u.hello.client, sizeof r->u.hello.client);
      r->u.hello.pid = rng_int(0, INT32_MAX);
      rand_labels(r->u.hello.labels, &r->u.hello.nlabels, NSA_PROTO_MAX_LABELS);
      break;
    case NSA_M_REGION_REGISTER:
      r->u.region_register.kind = (nsa_region_kind_t)rng_int(0, 1);
      if (r->u.region_register.kind == NSA_REGION_CUDA_IPC) {
        r->u.region_register.device = (int32_t)rng_int(0, INT32_MAX);
        for (int i = 0; i < 64; i++) r->u.region_register.handle[i] = (uint8_t)rng_u64();
      } else {
        char *nm = r->u.region_register.name;
        rand_str(nm, sizeof r->u.region_register.name);
        nm[0] = '/';
        for (char *c = nm + 1; *c; c++)
          if (*c == '/') *c = '_';
        if (!nm[1]) nm[1] = 'x', nm[2] = '\0';
      }
      r->u.region_register.size = 1 + (rng_u64() >> rng_int(1, 63));
      break;
    case NSA_M_REGION_UNREGISTER: r->u.region = rng_u64(); break;
    case NSA_M_EVENT_REGISTER:
      r->u.event_register.device = (int32_t)rng_int(0, 16);
      for (int i = 0; i < 64; i++) r->u.event_register.handle[i] = (uint8_t)rng_u64();
      break;
    case NSA_M_EVENT_UNREGISTER: r->u.event = rng_u64(); break;
    case NSA_M_SEL_FORWARD:
    case NSA_M_SEL_BACKWARD: {
      nsa_req_sel_attn_t *s = &r->u.sel_attn;
      int bwd = m == NSA_M_SEL_BACKWARD;
      rand_tensor(&s->q);
      rand_tensor(&s->k);
      rand_tensor(&s->v);
      rand_tensor(&s->o);
      s->has_lse = bwd ? 1 : (int)rng_int(0, 1);
      if (s->has_lse) rand_tensor(&s->lse);
      if (bwd) {
        rand_tensor(&s->dout);
        rand_tensor(&s->dq);
        rand_tensor(&s->dk);
        rand_tensor(&s->dv);
      }
      s->sel.kind = (nsa_sel_kind_t)rng_int(0, 1);
      rand_tensor(&s->sel.t);
      s->sel.block_size = s->sel.kind == NSA_SEL_BLOCK_INDICES ? (int32_t)rng_int(1, 4096) : 0;
      s->has_scale = (int)rng_int(0, 1);
      if (s->has_scale) s->scale = 0.001 + (double)rng_int(1, 1 << 30) / 7.0;
      s->has_wait_event = (int)rng_int(0, 1);
      if (s->has_wait_event) s->wait_event = rng_u64();
      s->has_done_event = (int)rng_int(0, 1);
      if (s->has_done_event) s->done_event = rng_u64();
      s->sync = (int)rng_int(0, 1);
      break;
    }
    case NSA_M_FLAGS_SET: {
      nsa_req_flags_set_t *f = &r->u.flags_set;
      rand_str(f->name, sizeof f->name);
      rand_str(f->value, sizeof f->value);
      f->has_percent = (int)rng_int(0, 1);
      if (f->has_percent) f->percent = (double)rng_int(0, 1000) / 10.0;
      rand_labels(f->match, &f->nmatch, NSA_PROTO_MAX_MATCH);
      break;
    }
    case NSA_M_FLAGS_RESET: rand_str(r->u.flag_name, sizeof r->u.flag_name); break;
    case NSA_M_METRICS_GET: r->u.metrics_get.prometheus = (int)rng_int(0, 1); break;
    case NSA_M_METRICS_SUBSCRIBE:
      r->u.metrics_subscribe.interval_ms = (uint32_t)rng_int(10, 3600000);
      break;
    default: break;
  }
}

/*
 * test_proto.c — msgpack-RPC v1 decoder, validator and encoder (proto/).
 *
 * Round trips of every method with fresh random values; every malformed class
 * of issue 3 (truncation, wrong types, wrong array lengths, bad msgids, huge
 * declared sizes, deep nesting, negative and overflowing numbers, unknown
 * methods, missing keys named with their path, oversize with msgid recovery);
 * streaming (many messages per feed, one message byte by byte); tensor extent
 * against an independent 128-bit computation.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "mpbuild.h"
#include "nsa_proto.h"

/* ----------------------------------------------------------- helpers --- */

static uint64_t rng_s;
static uint64_t rng_u64(void) { /* splitmix64 */
  uint64_t z = (rng_s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static int64_t rng_int(int64_t lo, int64_t hi) { /* [lo, hi] */
  uint64_t span = (uint64_t)hi - (uint64_t)lo + 1;
  uint64_t x = span ? rng_u64() % span : rng_u64();
  return (int64_t)((uint64_t)lo + x);
}
static void rng_init(void) {
  rng_s = (uint64_t)time(NULL) ^ ((uint64_t)clock() << 20);
  cr_log_info("rng seed %llu", (unsigned long long)rng_s);
}
static void rand_str(char *buf, size_t cap) {
  size_t n = (size_t)rng_int(1, (int64_t)cap - 1);
  for (size_t i = 0; i < n; i++) buf[i] = (char)rng_int(0x20, 0x7e);
  buf[n] = '\0';
}

/* Decodes a whole buffer as exactly one message; returns next()'s status. */
static int decode1(nsa_proto_decoder_t *d, const void *buf, size_t len, nsa_proto_msg_t *m,
                   nsa_proto_err_t *e, int *known, uint32_t *id) {
  cr_assert(eq(int, nsa_proto_decoder_feed(d, buf, len), 0));
  return nsa_proto_decoder_next(d, m, e, known, id);
}

/* Builds [0, 42, method, params], decodes and validates it. Returns the
 * parse status; *err holds the message. Decoding itself must succeed. */
static int parse_text(const char *method, const char *params, nsa_request_t *req,
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
static void expect_err(const char *method, const char *params, nsa_proto_code_t code,
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

static void expect_ok(const char *method, const char *params, nsa_request_t *req) {
  nsa_proto_err_t err;
  int r = parse_text(method, params, req, &err);
  cr_assert(eq(int, r, 0), "%s %s: %s", method, params, err.message);
}

/* Decodes raw bytes; expects a fatal error. */
static void expect_fatal(const void *buf, size_t len, size_t max, int want_known, uint32_t want_id,
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

static void rand_tensor(nsa_proto_tensor_t *t) {
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

static void rand_labels(nsa_proto_label_t *l, int *n, int max) {
  *n = (int)rng_int(0, max);
  for (int i = 0; i < *n; i++) {
    rand_str(l[i].key, sizeof l[i].key - 4);
    char idx[3] = {(char)('0' + i / 10), (char)('0' + i % 10), 0};
    strcat(l[i].key, idx); /* unique */
    rand_str(l[i].value, sizeof l[i].value);
  }
}

/* A random valid request of method m, exactly as parse_request would fill it. */
static void rand_request(nsa_method_t m, nsa_request_t *r) {
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

/* -------------------------------------------------------- round trips --- */

Test(roundtrip, every_method_random_values) {
  rng_init();
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
  for (int iter = 0; iter < 200; iter++) {
    for (int m = 0; m < NSA_M_COUNT; m++) {
      nsa_request_t want, got;
      rand_request((nsa_method_t)m, &want);
      nsa_proto_writer_reset(&w);
      nsa_proto_write_request(&w, want.msgid, &want);
      nsa_proto_msg_t msg;
      nsa_proto_err_t err;
      int known;
      uint32_t id;
      int r = decode1(d, w.sbuf.data, w.sbuf.size, &msg, &err, &known, &id);
      cr_assert(eq(int, r, 1), "%s: %s", nsa_method_name(m), err.message);
      cr_assert(eq(int, msg.type, NSA_MSG_REQUEST));
      cr_assert(eq(u32, msg.msgid, want.msgid));
      r = nsa_proto_parse_request(&msg, &got, &err);
      cr_assert(eq(int, r, 0), "%s: %s", nsa_method_name(m), err.message);
      cr_assert(eq(int, memcmp(&want, &got, sizeof want), 0), "%s differs after a round trip",
                nsa_method_name(m));
      cr_assert(eq(sz, nsa_proto_decoder_pending(d), 0));
    }
  }
  nsa_proto_decoder_free(d);
  nsa_proto_writer_destroy(&w);
}

Test(roundtrip, method_names) {
  for (int m = 0; m < NSA_M_COUNT; m++) {
    const char *n = nsa_method_name(m);
    cr_assert(n != NULL);
    cr_assert(eq(int, nsa_method_lookup(n, strlen(n)), m));
  }
  static const char *const want[] = {
      "hello", "ping", "region.register", "region.unregister", "event.register",
      "event.unregister", "sel_attn.forward", "sel_attn.backward", "flags.get", "flags.set",
      "flags.reset", "metrics.get", "metrics.subscribe", "shutdown"};
  for (int m = 0; m < NSA_M_COUNT; m++) cr_assert(eq(str, (char *)nsa_method_name(m), (char *)want[m]));
  cr_assert(eq(int, nsa_method_lookup("pin", 3), -1));
  cr_assert(eq(int, nsa_method_lookup("pingx", 5), -1));
  cr_assert(nsa_method_name(NSA_M_COUNT) == NULL);
}

Test(roundtrip, error_codes) {
  static const char *const want[] = {
      "ok", "bad_request", "unknown_method", "not_found", "out_of_bounds", "invalid_selection",
      "unsupported", "busy", "permission_denied", "protocol_version", "device_error", "internal"};
  for (int c = 0; c < NSA_E_COUNT; c++) {
    cr_assert(eq(str, (char *)nsa_proto_code_name(c), (char *)want[c]));
    cr_assert(eq(int, nsa_proto_code_parse(want[c], strlen(want[c])), c));
  }
  cr_assert(eq(int, nsa_proto_code_parse("nope", 4), NSA_E_INTERNAL));
  cr_assert(eq(int, nsa_proto_code_from_status(NSA_OK), NSA_E_OK));
  cr_assert(eq(int, nsa_proto_code_from_status(NSA_ERR_BAD_REQUEST), NSA_E_BAD_REQUEST));
  cr_assert(eq(int, nsa_proto_code_from_status(NSA_ERR_INVALID_SELECTION), NSA_E_INVALID_SELECTION));
  cr_assert(eq(int, nsa_proto_code_from_status(NSA_ERR_UNSUPPORTED), NSA_E_UNSUPPORTED));
  cr_assert(eq(int, nsa_proto_code_from_status(NSA_ERR_OUT_OF_BOUNDS), NSA_E_OUT_OF_BOUNDS));
  cr_assert(eq(int, nsa_proto_code_from_status(NSA_ERR_BUSY), NSA_E_BUSY));
  cr_assert(eq(int, nsa_proto_code_from_status(NSA_ERR_DEVICE), NSA_E_DEVICE_ERROR));
  cr_assert(eq(int, nsa_proto_code_from_status(NSA_ERR_DEVICE_FATAL), NSA_E_DEVICE_ERROR));
  cr_assert(eq(int, nsa_proto_code_from_status(NSA_ERR_INTERNAL), NSA_E_INTERNAL));
  cr_assert(eq(int, nsa_proto_code_from_status(-99), NSA_E_INTERNAL));
}

Test(roundtrip, responses_and_notifications) {
  rng_init();
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  uint32_t id1 = (uint32_t)rng_u64(), id2 = (uint32_t)rng_u64();
  int64_t ival = -rng_int(1, INT64_MAX);
  uint64_t uval = rng_u64();
  double dval = (double)rng_int(1, 1 << 30) / 3.0;
  char sval[64];
  rand_str(sval, sizeof sval);

  nsa_proto_write_result_begin(&w, id1);
  msgpack_pack_map(&w.pk, 6);
  nsa_proto_pack_kv_int(&w.pk, "i", ival);
  nsa_proto_pack_kv_uint(&w.pk, "u", uval);
  nsa_proto_pack_kv_double(&w.pk, "d", dval);
  nsa_proto_pack_kv_str(&w.pk, "s", sval);
  nsa_proto_pack_kv_bool(&w.pk, "b", 1);
  nsa_proto_pack_kv_nil(&w.pk, "n");
  nsa_proto_write_error(&w, id2, NSA_E_OUT_OF_BOUNDS, "tensor 'q' reaches past region 3");
  nsa_proto_write_notification_begin(&w, "metrics");
  msgpack_pack_map(&w.pk, 1);
  nsa_proto_pack_kv_uint(&w.pk, "requests", 17);

  nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
  cr_assert(eq(int, nsa_proto_decoder_feed(d, w.sbuf.data, w.sbuf.size), 0));
  nsa_proto_msg_t m;
  nsa_proto_err_t e;
  int known;
  uint32_t id;
  cr_assert(eq(int, nsa_proto_decoder_next(d, &m, &e, &known, &id), 1));
  cr_assert(eq(int, m.type, NSA_MSG_RESPONSE));
  cr_assert(eq(u32, m.msgid, id1));
  cr_assert(eq(int, nsa_proto_response_error(&m, &e), 0));
  int64_t i64;
  uint64_t u64;
  double dd;
  int b;
  char s[64], small[4];
  cr_assert(eq(int, nsa_proto_get_int(&m.result, "i", &i64), 0));
  cr_assert(eq(i64, i64, ival));
  cr_assert(eq(int, nsa_proto_get_uint(&m.result, "u", &u64), 0));
  cr_assert(eq(u64, u64, uval));
  cr_assert(eq(int, nsa_proto_get_uint(&m.result, "i", &u64), -1)); /* negative */
  cr_assert(eq(int, nsa_proto_get_double(&m.result, "d", &dd), 0));
  cr_assert(eq(dbl, dd, dval));
  cr_assert(eq(int, nsa_proto_get_int(&m.result, "d", &i64), -1)); /* float where int */
  cr_assert(eq(int, nsa_proto_get_str(&m.result, "s", s, sizeof s), 0));
  cr_assert(eq(str, s, sval));
  cr_assert(eq(int, nsa_proto_get_str(&m.result, "s", small, sizeof small), strlen(sval) < 4 ? 0 : -1));
  cr_assert(eq(int, nsa_proto_get_bool(&m.result, "b", &b), 0));
  cr_assert(eq(int, b, 1));
  cr_assert(eq(int, nsa_proto_get_int(&m.result, "missing", &i64), -1));
  cr_assert(eq(int, nsa_proto_get_int(&m.result, "n", &i64), -1));
  cr_assert(nsa_proto_map_get(&m.result, "n") != NULL);

  cr_assert(eq(int, nsa_proto_decoder_next(d, &m, &e, &known, &id), 1));
  cr_assert(eq(int, m.type, NSA_MSG_RESPONSE));
  cr_assert(eq(u32, m.msgid, id2));
  cr_assert(eq(int, m.result.type, MSGPACK_OBJECT_NIL));
  cr_assert(eq(int, nsa_proto_response_error(&m, &e), 1));
  cr_assert(eq(int, e.code, NSA_E_OUT_OF_BOUNDS));
  cr_assert(eq(str, e.message, "tensor 'q' reaches past region 3"));

  cr_assert(eq(int, nsa_proto_decoder_next(d, &m, &e, &known, &id), 1));
  cr_assert(eq(int, m.type, NSA_MSG_NOTIFICATION));
  cr_assert(eq(sz, m.method_len, 7));
  cr_assert(eq(int, memcmp(m.method, "metrics", 7), 0));
  cr_assert(eq(int, nsa_proto_get_uint(&m.params, "requests", &u64), 0));
  cr_assert(eq(u64, u64, 17));
  cr_assert(eq(int, nsa_proto_decoder_next(d, &m, &e, &known, &id), 0));
  nsa_proto_decoder_free(d);
  nsa_proto_writer_destroy(&w);
}

/* --------------------------------------------------------- streaming --- */

/* All methods, several times, into one buffer; returns the msgids in order. */
static void many_messages(nsa_proto_writer_t *w, nsa_request_t *reqs, int n) {
  for (int i = 0; i < n; i++) {
    rand_request((nsa_method_t)(i % NSA_M_COUNT), &reqs[i]);
    nsa_proto_write_request(w, reqs[i].msgid, &reqs[i]);
  }
}

static void check_sequence(nsa_proto_decoder_t *d, const nsa_request_t *reqs, int n, int *got) {
  nsa_proto_msg_t m;
  nsa_proto_err_t e;
  int known;
  uint32_t id;
  int r;
  while ((r = nsa_proto_decoder_next(d, &m, &e, &known, &id)) == 1) {
    cr_assert(lt(int, *got, n));
    nsa_request_t req;
    cr_assert(eq(int, nsa_proto_parse_request(&m, &req, &e), 0), "%s", e.message);
    cr_assert(eq(int, memcmp(&req, &reqs[*got], sizeof req), 0), "message %d differs", *got);
    (*got)++;
  }
  cr_assert(eq(int, r, 0), "%s", e.message);
}

Test(stream, many_messages_in_one_feed) {
  rng_init();
  enum { N = 3 * NSA_M_COUNT };
  static nsa_request_t reqs[N];
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  many_messages(&w, reqs, N);
  nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
  cr_assert(eq(int, nsa_proto_decoder_feed(d, w.sbuf.data, w.sbuf.size), 0));
  int got = 0;
  check_sequence(d, reqs, N, &got);
  cr_assert(eq(int, got, N));
  cr_assert(eq(sz, nsa_proto_decoder_pending(d), 0));
  nsa_proto_decoder_free(d);
  nsa_proto_writer_destroy(&w);
}

Test(stream, byte_by_byte_and_random_chunks) {
  rng_init();
  enum { N = 2 * NSA_M_COUNT };
  static nsa_request_t reqs[N];
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  many_messages(&w, reqs, N);
  for (int mode = 0; mode < 2; mode++) {
    nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
    int got = 0;
    size_t pos = 0;
    while (pos < w.sbuf.size) {
      size_t n = mode == 0 ? 1 : (size_t)rng_int(1, 300);
      if (n > w.sbuf.size - pos) n = w.sbuf.size - pos;
      /* zero-copy path: buffer + commit */
      size_t avail;
      char *buf = nsa_proto_decoder_buffer(d, n, &avail);
      cr_assert(buf != NULL);
      cr_assert(ge(sz, avail, n));
      memcpy(buf, w.sbuf.data + pos, n);
      nsa_proto_decoder_commit(d, n);
      pos += n;
      check_sequence(d, reqs, N, &got);
    }
    cr_assert(eq(int, got, N));
    nsa_proto_decoder_free(d);
  }
  nsa_proto_writer_destroy(&w);
}

Test(stream, every_prefix_needs_more) {
  rng_init();
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  for (int m = 0; m < NSA_M_COUNT; m++) {
    nsa_request_t req;
    rand_request((nsa_method_t)m, &req);
    nsa_proto_writer_reset(&w);
    nsa_proto_write_request(&w, req.msgid, &req);
    for (size_t len = 0; len < w.sbuf.size; len++) {
      nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
      nsa_proto_msg_t msg;
      nsa_proto_err_t e;
      int known;
      uint32_t id;
      cr_assert(eq(int, nsa_proto_decoder_feed(d, w.sbuf.data, len), 0));
      cr_assert(eq(int, nsa_proto_decoder_next(d, &msg, &e, &known, &id), 0),
                "%s: prefix of %zu/%zu bytes did not say 'need more'", nsa_method_name(m), len,
                w.sbuf.size);
      /* the rest completes it */
      cr_assert(eq(int, nsa_proto_decoder_feed(d, w.sbuf.data + len, w.sbuf.size - len), 0));
      cr_assert(eq(int, nsa_proto_decoder_next(d, &msg, &e, &known, &id), 1), "%s", e.message);
      nsa_proto_decoder_free(d);
    }
  }
  nsa_proto_writer_destroy(&w);
}

/* ----------------------------------------------------------- envelope --- */

static void raw_fatal(const char *text, int want_known, uint32_t want_id, const char *needle) {
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  cr_assert(eq(int, mpb_pack(&w.pk, text), 0), "bad test text %s", text);
  expect_fatal(w.sbuf.data, w.sbuf.size, 0, want_known, want_id, needle);
  nsa_proto_writer_destroy(&w);
}

Test(envelope, wrong_types_and_lengths) {
  raw_fatal("17", 0, 0, "not a msgpack-RPC array");
  raw_fatal("{\"a\": 1}", 0, 0, "array");
  raw_fatal("[]", 0, 0, "type");
  raw_fatal("[3, 1, \"ping\", {}]", 0, 0, "type");
  raw_fatal("[-1, 1, \"ping\", {}]", 0, 0, "type");
  raw_fatal("[\"0\", 1, \"ping\", {}]", 0, 0, "type");
  raw_fatal("[0.0, 1, \"ping\", {}]", 0, 0, "type");
  raw_fatal("[0, 5, \"ping\"]", 1, 5, "array of 4");
  raw_fatal("[0, 5, \"ping\", {}, 1]", 1, 5, "array of 4");
  raw_fatal("[2, \"metrics\", {}, 1]", 0, 0, "array of 3");
  raw_fatal("[1, 5, nil]", 0, 0, "array of 4");
  raw_fatal("[0, 6, 17, {}]", 1, 6, "method");
  raw_fatal("[0, 6, bin4, {}]", 1, 6, "method");
  raw_fatal("[0, 7, \"ping\", [1, 2]]", 1, 7, "params");
  raw_fatal("[0, 7, \"ping\", 3]", 1, 7, "params");
  raw_fatal("[2, 7, {}]", 0, 0, "method");
  raw_fatal("[2, \"m\", \"x\"]", 0, 0, "params");
  raw_fatal("[1, 8, 5, nil]", 0, 0, "error");
}

Test(envelope, bad_msgids) {
  raw_fatal("[0, -1, \"ping\", {}]", 0, 0, "msgid");
  raw_fatal("[0, 4294967296, \"ping\", {}]", 0, 0, "msgid");
  raw_fatal("[0, 18446744073709551615, \"ping\", {}]", 0, 0, "msgid");
  raw_fatal("[0, 1.0, \"ping\", {}]", 0, 0, "msgid");
  raw_fatal("[0, \"1\", \"ping\", {}]", 0, 0, "msgid");
  raw_fatal("[0, nil, \"ping\", {}]", 0, 0, "msgid");
  raw_fatal("[1, -3, nil, nil]", 0, 0, "msgid");
  /* the largest msgid is fine, in every integer encoding */
  nsa_request_t req;
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  static const unsigned char enc[][10] = {
      {0xce, 0xff, 0xff, 0xff, 0xff}, {0xcf, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff},
      {0xd3, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}};
  static const size_t enclen[] = {5, 9, 9};
  for (int i = 0; i < 3; i++) {
    unsigned char buf[32] = {0x94, 0x00};
    memcpy(buf + 2, enc[i], enclen[i]);
    size_t n = 2 + enclen[i];
    memcpy(buf + n, "\xa4ping\x80", 6);
    n += 6;
    nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
    nsa_proto_msg_t m;
    nsa_proto_err_t e;
    int known;
    uint32_t id;
    cr_assert(eq(int, decode1(d, buf, n, &m, &e, &known, &id), 1), "%s", e.message);
    cr_assert(eq(u32, m.msgid, UINT32_MAX));
    cr_assert(eq(int, nsa_proto_parse_request(&m, &req, &e), 0));
    cr_assert(eq(int, req.method, NSA_M_PING));
    nsa_proto_decoder_free(d);
  }
  nsa_proto_writer_destroy(&w);
}

Test(envelope, not_msgpack) {
  static const unsigned char c1[] = {0x94, 0x00, 0x09, 0xc1};
  expect_fatal(c1, sizeof c1, 0, 1, 9, "not msgpack");
  static const unsigned char c1b[] = {0xc1};
  expect_fatal(c1b, sizeof c1b, 0, 0, 0, "not msgpack");
  /* text that happens to start with a fixint is "not an array" */
  expect_fatal("GET / HTTP/1.1\r\n", 16, 0, 0, 0, NULL);
  /* a stream whose first message is good and second garbage: the first
   * still comes out, then the stream dies */
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  mpb_request(&w, 3, "ping", "{}");
  msgpack_sbuffer_write(&w.sbuf, "\x94\x00\x04\xc1", 4);
  nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
  nsa_proto_msg_t m;
  nsa_proto_err_t e;
  int known;
  uint32_t id;
  cr_assert(eq(int, decode1(d, w.sbuf.data, w.sbuf.size, &m, &e, &known, &id), 1));
  cr_assert(eq(u32, m.msgid, 3));
  cr_assert(eq(int, nsa_proto_decoder_next(d, &m, &e, &known, &id), -1));
  cr_assert(eq(int, known, 1));
  cr_assert(eq(u32, id, 4));
  nsa_proto_decoder_free(d);
  nsa_proto_writer_destroy(&w);
}

/* ------------------------------------------------ sizes and nesting --- */

Test(limits, huge_declared_sizes_fail_at_once) {
  /* [0, 9, "hello", {"client": <str32 declaring 4 GiB - 1>}] — only the header */
  static const unsigned char str32[] = {0x94, 0x00, 0x09, 0xa5, 'h', 'e', 'l', 'l', 'o', 0x81,
                                        0xa6, 'c', 'l', 'i', 'e', 'n', 't', 0xdb, 0xff, 0xff,
                                        0xff, 0xff};
  expect_fatal(str32, sizeof str32, 0, 1, 9, "size limit");
  static const unsigned char bin32[] = {0x94, 0x00, 0x0a, 0xa4, 'p', 'i', 'n', 'g', 0xc6,
                                        0xff, 0xff, 0xff, 0xff};
  expect_fatal(bin32, sizeof bin32, 0, 1, 10, "size limit");
  static const unsigned char ext32[] = {0x94, 0x00, 0x0b, 0xa4, 'p', 'i', 'n', 'g', 0xc9,
                                        0xff, 0xff, 0xff, 0xff};
  expect_fatal(ext32, sizeof ext32, 0, 1, 11, "size limit");
  /* a top-level array32 / map32 declaring 2^32-1 elements: msgpack-c would
   * allocate ~100 GiB for it on sight */
  static const unsigned char arr32[] = {0xdd, 0xff, 0xff, 0xff, 0xff};
  expect_fatal(arr32, sizeof arr32, 0, 0, 0, "size limit");
  static const unsigned char map32[] = {0xdf, 0xff, 0xff, 0xff, 0xff};
  expect_fatal(map32, sizeof map32, 0, 0, 0, "size limit");
  /* array32 envelope declaring 4 elements (fine) but params a map32 of 2^31 */
  static const unsigned char req_map32[] = {0xdd, 0, 0, 0, 4, 0x00, 0xce, 0x00, 0x01, 0x00, 0x00,
                                            0xa4, 'p', 'i', 'n', 'g', 0xdf, 0x80, 0, 0, 0};
  expect_fatal(req_map32, sizeof req_map32, 0, 1, 65536, "size limit");
  /* just over a small limit, by a str16 */
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  mpb_request(&w, 12, "hello", "{\"client\": str1000}");
  expect_fatal(w.sbuf.data, 20, 1000, 1, 12, "size limit");
  /* ...and exactly at the limit it passes */
  nsa_proto_decoder_t *d = nsa_proto_decoder_new(w.sbuf.size);
  nsa_proto_msg_t m;
  nsa_proto_err_t e;
  int known;
  uint32_t id;
  cr_assert(eq(int, decode1(d, w.sbuf.data, w.sbuf.size, &m, &e, &known, &id), 1), "%s",
            e.message);
  nsa_proto_decoder_free(d);
  d = nsa_proto_decoder_new(w.sbuf.size - 1);
  cr_assert(eq(int, decode1(d, w.sbuf.data, w.sbuf.size, &m, &e, &known, &id), -1));
  cr_assert(eq(int, known, 1));
  cr_assert(eq(u32, id, 12));
  nsa_proto_decoder_free(d);
  nsa_proto_writer_destroy(&w);
}

Test(limits, oversize_streamed_is_bounded_and_recovers_msgid) {
  /* [0, 77, "ping", {"x": [str200, str200, ... 400 times]}]: each header is
   * small, so the size only shows as bytes arrive; the decoder must fail once
   * the message passes 16 KiB and never hold much more than that. */
  enum { LIMIT = 16 * 1024, CHUNK = 512 };
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  nsa_proto_write_request_begin(&w, 77, "ping");
  msgpack_pack_map(&w.pk, 1);
  nsa_proto_pack_str(&w.pk, "x");
  msgpack_pack_array(&w.pk, 400);
  char s[200];
  memset(s, 'z', sizeof s);
  for (int i = 0; i < 400; i++) {
    msgpack_pack_str(&w.pk, sizeof s);
    msgpack_pack_str_body(&w.pk, s, sizeof s);
  }
  nsa_proto_decoder_t *d = nsa_proto_decoder_new(LIMIT);
  nsa_proto_msg_t m;
  nsa_proto_err_t e;
  int known = 0, r = 0;
  uint32_t id = 0;
  size_t pos = 0;
  while (pos < w.sbuf.size) {
    size_t n = w.sbuf.size - pos < CHUNK ? w.sbuf.size - pos : CHUNK;
    cr_assert(eq(int, nsa_proto_decoder_feed(d, w.sbuf.data + pos, n), 0));
    pos += n;
    r = nsa_proto_decoder_next(d, &m, &e, &known, &id);
    if (r != 0) break;
    cr_assert(le(sz, nsa_proto_decoder_pending(d), LIMIT + CHUNK));
  }
  cr_assert(eq(int, r, -1));
  cr_assert(le(sz, pos, LIMIT + CHUNK), "failed only after %zu bytes", pos);
  cr_assert(eq(int, e.code, NSA_E_BAD_REQUEST));
  cr_assert(strstr(e.message, "size limit") != NULL, "%s", e.message);
  cr_assert(eq(int, known, 1));
  cr_assert(eq(u32, id, 77));
  nsa_proto_decoder_free(d);

  /* An oversize response: no msgid recovered (nobody replies to responses). */
  nsa_proto_writer_reset(&w);
  nsa_proto_write_result_begin(&w, 5);
  msgpack_pack_str(&w.pk, 2 * LIMIT);
  expect_fatal(w.sbuf.data, w.sbuf.size, LIMIT, 0, 0, "size limit");
  nsa_proto_writer_destroy(&w);
}

static size_t nested(unsigned char *buf, int levels) {
  /* [0, 1, "ping", {"x": [[[...1...]]]}] with `levels` containers in total */
  size_t n = 0;
  const unsigned char head[] = {0x94, 0x00, 0x01, 0xa4, 'p', 'i', 'n', 'g', 0x81, 0xa1, 'x'};
  memcpy(buf, head, sizeof head);
  n = sizeof head;
  for (int i = 0; i < levels - 2; i++) buf[n++] = 0x91;
  buf[n++] = 0x01;
  return n;
}

Test(limits, deep_nesting) {
  unsigned char buf[256];
  nsa_proto_msg_t m;
  nsa_proto_err_t e;
  int known;
  uint32_t id;
  /* exactly NSA_PROTO_MAX_DEPTH containers: accepted, and the method parses */
  size_t n = nested(buf, NSA_PROTO_MAX_DEPTH);
  nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
  cr_assert(eq(int, decode1(d, buf, n, &m, &e, &known, &id), 1), "%s", e.message);
  nsa_request_t req;
  cr_assert(eq(int, nsa_proto_parse_request(&m, &req, &e), 0));
  nsa_proto_decoder_free(d);
  /* one more: rejected, msgid recovered */
  n = nested(buf, NSA_PROTO_MAX_DEPTH + 1);
  expect_fatal(buf, n, 0, 1, 1, "deeper");
  /* 100k open arrays in a row: no recursion, no crash, fails at level 33 */
  static unsigned char deep[100000];
  memset(deep, 0x91, sizeof deep);
  expect_fatal(deep, sizeof deep, 0, 0, 0, "deeper");
  memset(deep, 0x81, sizeof deep); /* maps {k: {k: ...}} */
  expect_fatal(deep, sizeof deep, 0, 0, 0, "deeper");
}

/* ------------------------------------------------------------ params --- */

#define T(r) "{\"region\": " #r ", \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1, 4, 2, 8]}"
#define TI "{\"region\": 9, \"offset\": 0, \"dtype\": \"i32\", \"shape\": [1, 4, 1, 2]}"
#define SEL "{\"kind\": \"block_indices\", \"indices\": " TI ", \"block_size\": 16}"

Test(params, unknown_method) {
  expect_err("sel_attn.fwd", "{}", NSA_E_UNKNOWN_METHOD, "'sel_attn.fwd'");
  expect_err("", "{}", NSA_E_UNKNOWN_METHOD, "unknown method");
  expect_err("PING", "{}", NSA_E_UNKNOWN_METHOD, "'PING'");
  nsa_request_t req;
  expect_ok("ping", "{}", &req);
  cr_assert(eq(int, req.method, NSA_M_PING));
  expect_ok("ping", "nil", &req);
  expect_ok("flags.get", "{\"whatever\": [1, 2]}", &req); /* unknown keys ignored */
  expect_ok("shutdown", "nil", &req);
}

Test(params, missing_keys_are_named) {
  expect_err("hello", "{\"client\": \"a\", \"pid\": 1}", NSA_E_BAD_REQUEST, "missing key 'protocol'");
  expect_err("hello", "{\"protocol\": 1, \"pid\": 1}", NSA_E_BAD_REQUEST, "missing key 'client'");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\"}", NSA_E_BAD_REQUEST, "missing key 'pid'");
  expect_err("hello", "nil", NSA_E_BAD_REQUEST, "missing key 'protocol'");
  expect_err("region.register", "{\"size\": 1}", NSA_E_BAD_REQUEST, "missing key 'kind'");
  expect_err("region.register", "{\"kind\": \"shm\", \"size\": 1}", NSA_E_BAD_REQUEST, "missing key 'name'");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"/nsa-1\"}", NSA_E_BAD_REQUEST, "missing key 'size'");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"handle\": bin64, \"size\": 1}", NSA_E_BAD_REQUEST, "missing key 'device'");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"device\": 0, \"size\": 1}", NSA_E_BAD_REQUEST, "missing key 'handle'");
  expect_err("region.unregister", "{}", NSA_E_BAD_REQUEST, "missing key 'region'");
  expect_err("event.register", "{\"handle\": bin64}", NSA_E_BAD_REQUEST, "missing key 'device'");
  expect_err("event.register", "{\"device\": 0}", NSA_E_BAD_REQUEST, "missing key 'handle'");
  expect_err("event.unregister", "{}", NSA_E_BAD_REQUEST, "missing key 'event'");
  expect_err("sel_attn.forward", "{\"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1) ", \"sel\": " SEL "}",
             NSA_E_BAD_REQUEST, "missing key 'q'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1) "}",
             NSA_E_BAD_REQUEST, "missing key 'sel'");
  expect_err("sel_attn.forward", "{\"q\": {\"region\": 1, \"offset\": 0, \"shape\": [1]}, \"k\": " T(1) "}",
             NSA_E_BAD_REQUEST, "missing key 'q.dtype'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": {\"region\": 1, \"dtype\": \"f32\", \"shape\": [1]}}",
             NSA_E_BAD_REQUEST, "missing key 'k.offset'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": {\"region\": 1, \"offset\": 0, \"dtype\": \"f32\"}}",
             NSA_E_BAD_REQUEST, "missing key 'o.shape'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1)
             ", \"sel\": {\"kind\": \"block_indices\", \"indices\": " TI "}}",
             NSA_E_BAD_REQUEST, "missing key 'sel.block_size'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1)
             ", \"sel\": {\"kind\": \"ranges\"}}", NSA_E_BAD_REQUEST, "missing key 'sel.ranges'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1)
             ", \"sel\": {\"kind\": \"block_indices\", \"block_size\": 4, \"indices\": {\"offset\": 0}}}",
             NSA_E_BAD_REQUEST, "missing key 'sel.indices.region'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1)
             ", \"sel\": {\"indices\": " TI "}}", NSA_E_BAD_REQUEST, "missing key 'sel.kind'");
  const char *bwd_missing[] = {"lse", "do", "dq", "dk", "dv"};
  for (int i = 0; i < 5; i++) {
    char p[2048];
    int n = snprintf(p, sizeof p, "{\"q\": " T(1) ", \"k\": " T(1) ", \"v\": " T(1) ", \"o\": " T(1)
                     ", \"sel\": " SEL);
    for (int j = 0; j < 5; j++)
      if (j != i) n += snprintf(p + n, sizeof p - n, ", \"%s\": " T(2), bwd_missing[j]);
    snprintf(p + n, sizeof p - n, "}");
    char want[32];
    snprintf(want, sizeof want, "missing key '%s'", bwd_missing[i]);
    expect_err("sel_attn.backward", p, NSA_E_BAD_REQUEST, want);
  }
  expect_err("flags.set", "{\"value\": \"1\"}", NSA_E_BAD_REQUEST, "missing key 'name'");
  expect_err("flags.set", "{\"name\": \"NSA_SEL_VARLEN_V2\"}", NSA_E_BAD_REQUEST, "missing key 'value'");
  expect_err("flags.reset", "{}", NSA_E_BAD_REQUEST, "missing key 'name'");
  expect_err("metrics.subscribe", "{}", NSA_E_BAD_REQUEST, "missing key 'interval_ms'");
  /* nil counts as missing for required keys */
  expect_err("region.unregister", "{\"region\": nil}", NSA_E_BAD_REQUEST, "missing key 'region'");
}

Test(params, forward_defaults_and_options) {
  nsa_request_t req;
  expect_ok("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
            ", \"sel\": " SEL ", \"lse\": nil, \"extra\": {\"x\": 1}}", &req);
  const nsa_req_sel_attn_t *s = &req.u.sel_attn;
  cr_assert(eq(int, req.method, NSA_M_SEL_FORWARD));
  cr_assert(eq(int, s->sync, 1));
  cr_assert(eq(int, s->has_lse, 0));
  cr_assert(eq(int, s->has_scale, 0));
  cr_assert(eq(int, s->has_wait_event + s->has_done_event, 0));
  cr_assert(eq(u64, s->k.region, 2));
  cr_assert(eq(int, s->q.ndim, 4));
  cr_assert(eq(int, s->q.has_strides, 0));
  cr_assert(eq(i64, s->q.strides[0], 64));
  cr_assert(eq(i64, s->q.strides[1], 16));
  cr_assert(eq(i64, s->q.strides[2], 8));
  cr_assert(eq(i64, s->q.strides[3], 1));
  cr_assert(eq(int, s->sel.kind, NSA_SEL_BLOCK_INDICES));
  cr_assert(eq(i32, s->sel.block_size, 16));
  cr_assert(eq(int, s->sel.t.dtype, NSA_I32));
  expect_ok("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
            ", \"sel\": {\"kind\": \"ranges\", \"ranges\": " TI "}, \"lse\": " T(5)
            ", \"scale\": 2, \"sync\": false, \"wait_event\": 3, \"done_event\": 0}", &req);
  cr_assert(eq(int, s->sel.kind, NSA_SEL_RANGES));
  cr_assert(eq(int, s->has_lse, 1));
  cr_assert(eq(u64, s->lse.region, 5));
  cr_assert(eq(int, s->has_scale, 1));
  cr_assert(eq(dbl, s->scale, 2.0));
  cr_assert(eq(int, s->sync, 0));
  cr_assert(eq(int, s->has_wait_event, 1));
  cr_assert(eq(u64, s->wait_event, 3));
  cr_assert(eq(int, s->has_done_event, 1));
  cr_assert(eq(u64, s->done_event, 0));
}

#define FWD_WITH(extra) \
  "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4) ", \"sel\": " SEL extra "}"
#define FWD_Q(q) "{\"q\": " q ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4) ", \"sel\": " SEL "}"

Test(params, wrong_types) {
  expect_err("hello", "{\"protocol\": \"1\", \"client\": \"a\", \"pid\": 1}", NSA_E_BAD_REQUEST, "key 'protocol'");
  expect_err("hello", "{\"protocol\": 1, \"client\": 5, \"pid\": 1}", NSA_E_BAD_REQUEST, "key 'client' must be a string");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 3.0}", NSA_E_BAD_REQUEST, "key 'pid'");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": [\"a\"]}", NSA_E_BAD_REQUEST, "key 'labels'");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": {\"a\": 1}}", NSA_E_BAD_REQUEST, "key 'labels.a' must be a string");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": {\"a\": \"x\", \"a\": \"y\"}}", NSA_E_BAD_REQUEST, "repeats");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": {1: \"x\"}}", NSA_E_BAD_REQUEST, "key 'labels'");
  expect_err("region.register", "{\"kind\": \"tmpfs\", \"name\": \"/x\", \"size\": 1}", NSA_E_BAD_REQUEST, "key 'kind'");
  expect_err("region.register", "{\"kind\": 1, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'kind'");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"device\": 0, \"handle\": bin63, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'handle' must be a bin of exactly 64");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"device\": 0, \"handle\": bin65, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'handle'");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"device\": 0, \"handle\": str64, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'handle'");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"/x\", \"size\": 0}", NSA_E_BAD_REQUEST, "key 'size' must be a positive integer");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"\", \"size\": 4}", NSA_E_BAD_REQUEST, "key 'name' must not be empty");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"/nsa\\0x\", \"size\": 4}", NSA_E_BAD_REQUEST, "NUL");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"nsa-1\", \"size\": 4}", NSA_E_BAD_REQUEST, "key 'name' must be a shared-memory name");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"/\", \"size\": 4}", NSA_E_BAD_REQUEST, "key 'name'");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"/../etc/passwd\", \"size\": 4}", NSA_E_BAD_REQUEST, "key 'name'");
  expect_err("event.register", "{\"device\": true, \"handle\": bin64}", NSA_E_BAD_REQUEST, "key 'device'");
  expect_err("sel_attn.forward", FWD_Q("[1]"), NSA_E_BAD_REQUEST, "key 'q' must be a map");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f64\", \"shape\": [1]}"), NSA_E_BAD_REQUEST, "key 'q.dtype'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": 2, \"shape\": [1]}"), NSA_E_BAD_REQUEST, "key 'q.dtype'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": []}"), NSA_E_BAD_REQUEST, "key 'q.shape'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1,2,3,4,5,6]}"), NSA_E_BAD_REQUEST, "key 'q.shape'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": 4}"), NSA_E_BAD_REQUEST, "key 'q.shape'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1, 2.0]}"), NSA_E_BAD_REQUEST, "key 'q.shape[1]'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1, 2], \"strides\": [2]}"), NSA_E_BAD_REQUEST, "key 'q.strides'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1, 2], \"strides\": [2, \"1\"]}"), NSA_E_BAD_REQUEST, "key 'q.strides[1]'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": \"1\", \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1]}"), NSA_E_BAD_REQUEST, "key 'q.region'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0.5, \"dtype\": \"f32\", \"shape\": [1]}"), NSA_E_BAD_REQUEST, "key 'q.offset'");
  expect_err("sel_attn.forward", FWD_WITH(", \"scale\": \"2\""), NSA_E_BAD_REQUEST, "key 'scale'");
  expect_err("sel_attn.forward", FWD_WITH(", \"scale\": 0"), NSA_E_BAD_REQUEST, "key 'scale'");
  expect_err("sel_attn.forward", FWD_WITH(", \"scale\": -0.5"), NSA_E_BAD_REQUEST, "key 'scale'");
  expect_err("sel_attn.forward", FWD_WITH(", \"scale\": nan"), NSA_E_BAD_REQUEST, "key 'scale'");
  expect_err("sel_attn.forward", FWD_WITH(", \"scale\": inf"), NSA_E_BAD_REQUEST, "key 'scale'");
  expect_err("sel_attn.forward", FWD_WITH(", \"sync\": 1"), NSA_E_BAD_REQUEST, "key 'sync' must be a boolean");
  expect_err("sel_attn.forward", FWD_WITH(", \"wait_event\": \"e\""), NSA_E_BAD_REQUEST, "key 'wait_event'");
  expect_err("sel_attn.forward", FWD_WITH(", \"done_event\": -1"), NSA_E_BAD_REQUEST, "key 'done_event'");
  expect_err("sel_attn.forward", FWD_WITH(", \"lse\": 5"), NSA_E_BAD_REQUEST, "key 'lse' must be a map");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
             ", \"sel\": {\"kind\": \"blocks\", \"indices\": " TI "}}", NSA_E_BAD_REQUEST, "key 'sel.kind'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
             ", \"sel\": {\"kind\": \"block_indices\", \"indices\": " TI ", \"block_size\": 0}}",
             NSA_E_BAD_REQUEST, "key 'sel.block_size' must be a positive integer");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
             ", \"sel\": {\"kind\": \"block_indices\", \"indices\": " TI ", \"block_size\": 16.0}}",
             NSA_E_BAD_REQUEST, "key 'sel.block_size' must be a positive integer");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
             ", \"sel\": 7}", NSA_E_BAD_REQUEST, "key 'sel' must be a map");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": [1]}", NSA_E_BAD_REQUEST, "key 'value'");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": nil}", NSA_E_BAD_REQUEST, "missing key 'value'");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": \"1\", \"percent\": 101}", NSA_E_BAD_REQUEST, "key 'percent'");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": \"1\", \"percent\": -1}", NSA_E_BAD_REQUEST, "key 'percent'");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": \"1\", \"percent\": \"50\"}", NSA_E_BAD_REQUEST, "key 'percent'");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": \"1\", \"match\": {\"a\": 2}}", NSA_E_BAD_REQUEST, "key 'match.a'");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": \"1\", \"match\": \"a=b\"}", NSA_E_BAD_REQUEST, "key 'match'");
  expect_err("flags.set", "{\"name\": \"\", \"value\": \"1\"}", NSA_E_BAD_REQUEST, "key 'name'");
  expect_err("flags.reset", "{\"name\": 3}", NSA_E_BAD_REQUEST, "key 'name' must be a string");
  expect_err("metrics.get", "{\"format\": \"xml\"}", NSA_E_BAD_REQUEST, "key 'format'");
  expect_err("metrics.get", "{\"format\": 1}", NSA_E_BAD_REQUEST, "key 'format'");
  expect_err("metrics.subscribe", "{\"interval_ms\": 5}", NSA_E_BAD_REQUEST, "key 'interval_ms'");
  expect_err("metrics.subscribe", "{\"interval_ms\": 100.0}", NSA_E_BAD_REQUEST, "key 'interval_ms'");
  expect_err("metrics.subscribe", "{\"interval_ms\": 3600001}", NSA_E_BAD_REQUEST, "key 'interval_ms'");
}

Test(params, negative_and_overflowing_numbers) {
  expect_err("hello", "{\"protocol\": -1, \"client\": \"a\", \"pid\": 1}", NSA_E_BAD_REQUEST, "key 'protocol'");
  expect_err("hello", "{\"protocol\": 18446744073709551615, \"client\": \"a\", \"pid\": 1}", NSA_E_BAD_REQUEST, "key 'protocol'");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": -5}", NSA_E_BAD_REQUEST, "key 'pid'");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 2147483648}", NSA_E_BAD_REQUEST, "key 'pid'");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"device\": 2147483648, \"handle\": bin64, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'device'");
  expect_err("region.register", "{\"kind\": \"cuda_ipc\", \"device\": -1, \"handle\": bin64, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'device'");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": \"/x\", \"size\": -4096}", NSA_E_BAD_REQUEST, "key 'size'");
  expect_err("region.unregister", "{\"region\": -1}", NSA_E_BAD_REQUEST, "key 'region'");
  expect_err("event.unregister", "{\"event\": -9223372036854775808}", NSA_E_BAD_REQUEST, "key 'event'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": -8, \"dtype\": \"f32\", \"shape\": [1]}"), NSA_E_BAD_REQUEST, "key 'q.offset'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [1, -2]}"), NSA_E_BAD_REQUEST, "key 'q.shape[1]'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [9223372036854775808]}"), NSA_E_BAD_REQUEST, "key 'q.shape[0]'");
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [2, 2], \"strides\": [-1, 1]}"), NSA_E_BAD_REQUEST, "key 'q.strides[0]'");
  /* contiguous strides of this shape overflow 64 bits */
  expect_err("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 0, \"dtype\": \"f32\", \"shape\": [2, 4294967296, 4294967296]}"), NSA_E_BAD_REQUEST, "key 'q.shape'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
             ", \"sel\": {\"kind\": \"block_indices\", \"indices\": " TI ", \"block_size\": 2147483648}}",
             NSA_E_BAD_REQUEST, "key 'sel.block_size'");
  expect_err("sel_attn.forward", "{\"q\": " T(1) ", \"k\": " T(2) ", \"v\": " T(3) ", \"o\": " T(4)
             ", \"sel\": {\"kind\": \"block_indices\", \"indices\": " TI ", \"block_size\": -16}}",
             NSA_E_BAD_REQUEST, "key 'sel.block_size'");
  expect_err("metrics.subscribe", "{\"interval_ms\": -100}", NSA_E_BAD_REQUEST, "key 'interval_ms'");
  expect_err("metrics.subscribe", "{\"interval_ms\": 4294967396}", NSA_E_BAD_REQUEST, "key 'interval_ms'");
  /* the largest accepted values */
  nsa_request_t req;
  expect_ok("region.unregister", "{\"region\": 18446744073709551615}", &req);
  cr_assert(eq(u64, req.u.region, UINT64_MAX));
  expect_ok("sel_attn.forward", FWD_Q("{\"region\": 1, \"offset\": 18446744073709551615, \"dtype\": \"bf16\", \"shape\": [9223372036854775807], \"strides\": [9223372036854775807]}"), &req);
  cr_assert(eq(u64, req.u.sel_attn.q.offset, UINT64_MAX));
  cr_assert(eq(i64, req.u.sel_attn.q.shape[0], INT64_MAX));
  cr_assert(eq(int, req.u.sel_attn.q.dtype, NSA_BF16));
}

Test(params, strings_never_truncated) {
  char p[1024];
  nsa_request_t req;
  /* client[128]: 127 bytes fit, 128 do not */
  snprintf(p, sizeof p, "{\"protocol\": 1, \"client\": str127, \"pid\": 1}");
  expect_ok("hello", p, &req);
  cr_assert(eq(sz, strlen(req.u.hello.client), 127));
  expect_err("hello", "{\"protocol\": 1, \"client\": str128, \"pid\": 1}", NSA_E_BAD_REQUEST, "key 'client' is too long");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": str256, \"size\": 1}", NSA_E_BAD_REQUEST, "key 'name' is too long");
  expect_err("region.register", "{\"kind\": \"shm\", \"name\": str255, \"size\": 1}", NSA_E_BAD_REQUEST, "shared-memory name");
  {
    char name[300] = "{\"kind\": \"shm\", \"name\": \"/";
    size_t k = strlen(name);
    memset(name + k, 'n', 254);
    strcpy(name + k + 254, "\", \"size\": 1}");
    expect_ok("region.register", name, &req);
    cr_assert(eq(sz, strlen(req.u.region_register.name), 255));
  }
  expect_err("flags.set", "{\"name\": str64, \"value\": \"1\"}", NSA_E_BAD_REQUEST, "key 'name' is too long");
  expect_err("flags.set", "{\"name\": \"X\", \"value\": str256}", NSA_E_BAD_REQUEST, "key 'value' is too long");
  expect_err("flags.reset", "{\"name\": str64}", NSA_E_BAD_REQUEST, "key 'name' is too long");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": {str64: \"x\"}}", NSA_E_BAD_REQUEST, "key 'labels'");
  expect_err("hello", "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": {\"k\": str256}}", NSA_E_BAD_REQUEST, "key 'labels.k' is too long");
  /* 33 labels is one too many */
  int n = snprintf(p, sizeof p, "{\"protocol\": 1, \"client\": \"a\", \"pid\": 1, \"labels\": {");
  for (int i = 0; i < 33; i++) n += snprintf(p + n, sizeof p - n, "%s\"k%d\": \"v\"", i ? ", " : "", i);
  snprintf(p + n, sizeof p - n, "}}");
  expect_err("hello", p, NSA_E_BAD_REQUEST, "key 'labels' has 33 entries");
}

Test(params, flags_set_values) {
  nsa_request_t req;
  expect_ok("flags.set", "{\"name\": \"NSA_USE_SEL_VARLEN\", \"value\": true}", &req);
  cr_assert(eq(str, req.u.flags_set.value, "1"));
  expect_ok("flags.set", "{\"name\": \"NSA_USE_SEL_VARLEN\", \"value\": false}", &req);
  cr_assert(eq(str, req.u.flags_set.value, "0"));
  expect_ok("flags.set", "{\"name\": \"NSA_SEL_VARLEN_MIN_L\", \"value\": 128}", &req);
  cr_assert(eq(str, req.u.flags_set.value, "128"));
  expect_ok("flags.set", "{\"name\": \"NSA_SEL_VARLEN_MIN_L\", \"value\": -3}", &req);
  cr_assert(eq(str, req.u.flags_set.value, "-3"));
  expect_ok("flags.set", "{\"name\": \"NSA_SEL_SHADOW_RATE\", \"value\": 0.1}", &req);
  cr_assert(eq(str, req.u.flags_set.value, "0.1"));
  expect_ok("flags.set", "{\"name\": \"NSA_SEL_VARLEN_V2\", \"value\": \"off\", \"percent\": 12.5, \"match\": {\"job\": \"rl\", \"rank\": \"0\"}}", &req);
  cr_assert(eq(str, req.u.flags_set.name, "NSA_SEL_VARLEN_V2"));
  cr_assert(eq(str, req.u.flags_set.value, "off"));
  cr_assert(eq(int, req.u.flags_set.has_percent, 1));
  cr_assert(eq(dbl, req.u.flags_set.percent, 12.5));
  cr_assert(eq(int, req.u.flags_set.nmatch, 2));
  cr_assert(eq(str, req.u.flags_set.match[1].key, "rank"));
  cr_assert(eq(str, req.u.flags_set.match[1].value, "0"));
  expect_ok("flags.set", "{\"name\": \"X\", \"value\": \"1\", \"percent\": 100}", &req);
  cr_assert(eq(dbl, req.u.flags_set.percent, 100.0));
  expect_ok("metrics.get", "{\"format\": \"prometheus\"}", &req);
  cr_assert(eq(int, req.u.metrics_get.prometheus, 1));
  expect_ok("metrics.get", "{}", &req);
  cr_assert(eq(int, req.u.metrics_get.prometheus, 0));
}

Test(params, response_is_not_a_request) {
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  nsa_proto_write_result_begin(&w, 1);
  msgpack_pack_nil(&w.pk);
  nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
  nsa_proto_msg_t m;
  nsa_proto_err_t e;
  int known;
  uint32_t id;
  cr_assert(eq(int, decode1(d, w.sbuf.data, w.sbuf.size, &m, &e, &known, &id), 1));
  nsa_request_t req;
  cr_assert(eq(int, nsa_proto_parse_request(&m, &req, &e), -1));
  cr_assert(eq(int, e.code, NSA_E_BAD_REQUEST));
  nsa_proto_decoder_free(d);
  nsa_proto_writer_destroy(&w);
}

/* ------------------------------------------------------------ extent --- */

/* Independent reference in 128-bit arithmetic. Returns -1 on overflow. */
static int ref_extent(const nsa_proto_tensor_t *t, uint64_t *out) {
  unsigned __int128 last = 0;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] == 0) {
      *out = 0;
      return 0;
    }
  }
  for (int i = 0; i < t->ndim; i++) {
    /* each product < 2^126 and last stays < 2^64 here, so no 128-bit wrap */
    last += (unsigned __int128)(uint64_t)(t->shape[i] - 1) * (uint64_t)t->strides[i];
    if (last > UINT64_MAX) return -1;
  }
  unsigned __int128 bytes = (last + 1) * (unsigned __int128)nsa_dtype_size(t->dtype);
  if (bytes > UINT64_MAX || bytes + t->offset > UINT64_MAX) return -1;
  *out = (uint64_t)bytes;
  return 0;
}

Test(extent, known_values) {
  nsa_proto_tensor_t t = {0};
  t.dtype = NSA_F32;
  t.ndim = 3;
  t.shape[0] = 2, t.shape[1] = 3, t.shape[2] = 4;
  cr_assert(eq(int, nsa_proto_tensor_set_contiguous(&t), 0));
  uint64_t e;
  cr_assert(eq(int, nsa_proto_tensor_extent(&t, &e), 0));
  cr_assert(eq(u64, e, 96));
  /* transposed-ish: strides {1, 2, 6} reach element 1 + 4 + 18 = 23 → 24 elems */
  t.strides[0] = 1, t.strides[1] = 2, t.strides[2] = 6;
  cr_assert(eq(int, nsa_proto_tensor_extent(&t, &e), 0));
  cr_assert(eq(u64, e, 96));
  /* broadcast (stride 0) and gaps */
  t.strides[0] = 0, t.strides[1] = 100, t.strides[2] = 1;
  cr_assert(eq(int, nsa_proto_tensor_extent(&t, &e), 0));
  cr_assert(eq(u64, e, (200 + 3 + 1) * 4));
  /* a zero dimension: nothing reachable, even with absurd strides */
  t.shape[1] = 0;
  t.strides[0] = INT64_MAX;
  cr_assert(eq(int, nsa_proto_tensor_extent(&t, &e), 0));
  cr_assert(eq(u64, e, 0));
  /* overflow: (2^62-1)*4 + 3 + 1 elements = 2^64 */
  nsa_proto_tensor_t o = {0};
  o.dtype = NSA_I32;
  o.ndim = 2;
  o.shape[0] = (int64_t)1 << 62, o.shape[1] = 4;
  o.strides[0] = 4, o.strides[1] = 1;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  /* elements fit but bytes do not */
  o.shape[0] = (int64_t)1 << 61;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  o.shape[0] = (int64_t)1 << 59;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), 0));
  cr_assert(eq(u64, e, (uint64_t)1 << 63));
  /* offset + extent overflow */
  o.offset = UINT64_MAX - ((uint64_t)1 << 63) + 1;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  o.offset -= 1;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), 0));
  /* stride products overflow */
  o.offset = 0;
  o.shape[0] = 3, o.strides[0] = INT64_MAX;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  /* malformed structs */
  o.ndim = 0;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  o.ndim = 6;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  o.ndim = 2;
  o.shape[0] = -1;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
  o.shape[0] = 1;
  o.dtype = (nsa_dtype_t)7;
  cr_assert(eq(int, nsa_proto_tensor_extent(&o, &e), -1));
}

Test(extent, random_against_int128) {
  rng_init();
  int overflows = 0, fits = 0;
  for (int it = 0; it < 200000; it++) {
    nsa_proto_tensor_t t = {0};
    t.dtype = (nsa_dtype_t)rng_int(0, 3);
    t.ndim = (int)rng_int(1, 5);
    int big = (int)rng_int(0, 3);
    for (int i = 0; i < t.ndim; i++) {
      t.shape[i] = big ? (int64_t)(rng_u64() >> rng_int(1, 63)) : rng_int(0, 64);
      t.strides[i] = big ? (int64_t)(rng_u64() >> rng_int(1, 63)) : rng_int(0, 4096);
    }
    t.offset = rng_int(0, 1) ? rng_u64() : (uint64_t)rng_int(0, 1 << 20);
    uint64_t got = 0, want = 0;
    int rg = nsa_proto_tensor_extent(&t, &got);
    int rw = ref_extent(&t, &want);
    cr_assert(eq(int, rg, rw), "iteration %d: status %d vs reference %d", it, rg, rw);
    if (rg == 0) {
      cr_assert(eq(u64, got, want), "iteration %d", it);
      fits++;
    } else {
      overflows++;
    }
  }
  cr_assert(gt(int, overflows, 1000));
  cr_assert(gt(int, fits, 1000));
}

/* ------------------------------------------ every msgpack encoding --- */

/* One value of every msgpack format family, hand-encoded (msgpack-c's packer
 * always picks the shortest form, so str32/array32/... need raw bytes). The
 * pre-scanner must find the same message end msgpack-c does, for each. */
static const unsigned char k_all_types[] = {
    0xdc, 0x00, 0x27,                                   /* array16 of 39 */
    0xc0, 0xc2, 0xc3,                                   /* nil false true */
    0x05, 0xe0,                                         /* fixint, negative fixint */
    0xcc, 0xff, 0xcd, 0xff, 0xff, 0xce, 0, 0, 0, 1,     /* uint8/16/32 */
    0xcf, 0, 0, 0, 0, 0, 0, 0, 2,                       /* uint64 */
    0xd0, 0x80, 0xd1, 0x80, 0x00, 0xd2, 0xff, 0xff, 0xff, 0xfe, /* int8/16/32 */
    0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfd,       /* int64 */
    0xca, 0x3f, 0x80, 0x00, 0x00,                       /* float32 1.0 */
    0xcb, 0x40, 0x00, 0, 0, 0, 0, 0, 0,                 /* float64 2.0 */
    0xa2, 'h', 'i', 0xd9, 0x01, 'a', 0xda, 0x00, 0x01, 'b',
    0xdb, 0x00, 0x00, 0x00, 0x01, 'c',                  /* fixstr, str8/16/32 */
    0xc4, 0x01, 0x01, 0xc5, 0x00, 0x01, 0x02, 0xc6, 0, 0, 0, 1, 0x03, /* bin8/16/32 */
    0xd4, 0x01, 0xaa,                                   /* fixext1 */
    0xd5, 0x02, 0xaa, 0xbb,                             /* fixext2 */
    0xd6, 0x03, 1, 2, 3, 4,                             /* fixext4 */
    0xd7, 0xff, 0, 0, 0, 0, 0, 0, 0, 1,                 /* fixext8 (timestamp) */
    0xd8, 0x04, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, /* fixext16 */
    0xc7, 0x01, 0x05, 0xee, 0xc8, 0x00, 0x01, 0x06, 0xee,
    0xc9, 0x00, 0x00, 0x00, 0x01, 0x07, 0xee,           /* ext8/16/32 */
    0x92, 0x01, 0x02, 0xdc, 0x00, 0x01, 0x03, 0xdd, 0, 0, 0, 1, 0x04, /* arrays */
    0x81, 0x01, 0x02, 0xde, 0x00, 0x01, 0x03, 0x04,
    0xdf, 0, 0, 0, 1, 0x05, 0x06,                       /* maps */
    0x90, 0x80, 0xa0,                                   /* empty array, map, str */
};

Test(stream, every_msgpack_encoding) {
  unsigned char buf[512];
  const unsigned char head[] = {0x94, 0x00, 0x21, 0xa4, 'p', 'i', 'n', 'g', 0x81, 0xa1, 'x'};
  memcpy(buf, head, sizeof head);
  memcpy(buf + sizeof head, k_all_types, sizeof k_all_types);
  size_t n = sizeof head + sizeof k_all_types;
  buf[n++] = 0x94; /* and the start of a next message */
  nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
  nsa_proto_msg_t m;
  nsa_proto_err_t e;
  int known, r = 0, got = 0;
  uint32_t id;
  for (size_t i = 0; i < n; i++) {
    cr_assert(eq(int, nsa_proto_decoder_feed(d, buf + i, 1), 0));
    r = nsa_proto_decoder_next(d, &m, &e, &known, &id);
    cr_assert(ge(int, r, 0), "byte %zu: %s", i, e.message);
    if (r == 1) {
      cr_assert(eq(sz, i, n - 2), "message ended at byte %zu, not %zu", i, n - 2);
      cr_assert(eq(u32, m.msgid, 0x21));
      const msgpack_object *x = nsa_proto_map_get(&m.params, "x");
      cr_assert(x && x->type == MSGPACK_OBJECT_ARRAY && x->via.array.size == 39);
      cr_assert(eq(int, x->via.array.ptr[13].type, MSGPACK_OBJECT_FLOAT32));
      cr_assert(eq(dbl, x->via.array.ptr[13].via.f64, 1.0));
      cr_assert(eq(int, x->via.array.ptr[22].type, MSGPACK_OBJECT_EXT));
      nsa_request_t req;
      cr_assert(eq(int, nsa_proto_parse_request(&m, &req, &e), 0));
      got++;
    }
  }
  cr_assert(eq(int, got, 1));
  cr_assert(eq(sz, nsa_proto_decoder_pending(d), 1));
  nsa_proto_decoder_free(d);
}

Test(limits, msgid_recovered_from_every_integer_encoding) {
  /* [0, <id>, "ping", 0xc1...] — the id in each uint/int encoding */
  static const struct {
    unsigned char enc[9];
    size_t len;
    int known;
    uint32_t id;
  } cases[] = {
      {{0x07}, 1, 1, 7},
      {{0xcc, 0xfe}, 2, 1, 254},
      {{0xcd, 0x12, 0x34}, 3, 1, 0x1234},
      {{0xce, 0x89, 0xab, 0xcd, 0xef}, 5, 1, 0x89abcdef},
      {{0xcf, 0, 0, 0, 0, 0x01, 0x02, 0x03, 0x04}, 9, 1, 0x01020304},
      {{0xcf, 0, 0, 0, 1, 0, 0, 0, 0}, 9, 0, 0}, /* 2^32: not a msgid */
      {{0xd0, 0x11}, 2, 1, 0x11},
      {{0xd0, 0x91}, 2, 0, 0}, /* negative */
      {{0xd1, 0x01, 0x00}, 3, 1, 256},
      {{0xd2, 0x7f, 0xff, 0xff, 0xff}, 5, 1, 0x7fffffff},
      {{0xd2, 0x80, 0, 0, 0}, 5, 0, 0},
      {{0xd3, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}, 9, 1, UINT32_MAX},
      {{0xff}, 1, 0, 0},  /* -1 */
      {{0xc0}, 1, 0, 0},  /* nil */
      {{0xca, 0x3f, 0x80, 0, 0}, 5, 0, 0}, /* float */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    unsigned char buf[32] = {0x94, 0x00};
    memcpy(buf + 2, cases[i].enc, cases[i].len);
    size_t n = 2 + cases[i].len;
    memcpy(buf + n, "\xa4ping\xc1", 6);
    n += 6;
    expect_fatal(buf, n, 0, cases[i].known, cases[i].id, "not msgpack");
  }
  /* a response or notification prefix gives no msgid */
  expect_fatal("\x94\x01\x05\xc1", 4, 0, 0, 0, "not msgpack");
  expect_fatal("\x93\x02\x05\xc1", 4, 0, 0, 0, "not msgpack");
  /* array16/array32 envelope headers */
  expect_fatal("\xdc\x00\x04\x00\x09\xc1", 6, 0, 1, 9, "not msgpack");
  expect_fatal("\xdd\x00\x00\x00\x04\x00\x0a\xc1", 8, 0, 1, 10, "not msgpack");
}

Test(roundtrip, reader_helpers_edge_cases) {
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  nsa_proto_write_result_begin(&w, 1);
  cr_assert(eq(int, mpb_pack(&w.pk, "{\"big\": 9223372036854775808, \"pos\": 12, \"neg\": -3, "
                                    "\"s\": \"x\", \"b\": false}"), 0));
  /* a response whose error object is malformed (no code) */
  msgpack_pack_array(&w.pk, 4);
  msgpack_pack_uint8(&w.pk, 1);
  msgpack_pack_uint8(&w.pk, 2);
  cr_assert(eq(int, mpb_pack(&w.pk, "{\"message\": \"m\"}"), 0));
  msgpack_pack_nil(&w.pk);
  nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
  nsa_proto_msg_t m;
  nsa_proto_err_t e;
  int known;
  uint32_t id;
  cr_assert(eq(int, decode1(d, w.sbuf.data, w.sbuf.size, &m, &e, &known, &id), 1));
  int64_t i;
  double dd;
  int b = -1;
  cr_assert(eq(int, nsa_proto_get_int(&m.result, "big", &i), -1)); /* > INT64_MAX */
  cr_assert(eq(int, nsa_proto_get_int(&m.result, "pos", &i), 0));
  cr_assert(eq(i64, i, 12));
  cr_assert(eq(int, nsa_proto_get_int(&m.result, "neg", &i), 0));
  cr_assert(eq(i64, i, -3));
  cr_assert(eq(int, nsa_proto_get_double(&m.result, "pos", &dd), 0));
  cr_assert(eq(dbl, dd, 12.0));
  cr_assert(eq(int, nsa_proto_get_double(&m.result, "neg", &dd), 0));
  cr_assert(eq(dbl, dd, -3.0));
  cr_assert(eq(int, nsa_proto_get_double(&m.result, "s", &dd), -1));
  cr_assert(eq(int, nsa_proto_get_bool(&m.result, "b", &b), 0));
  cr_assert(eq(int, b, 0));
  cr_assert(eq(int, nsa_proto_get_bool(&m.result, "pos", &b), -1));
  cr_assert(nsa_proto_get_strn(&m.result, "pos", NULL) == NULL);
  cr_assert(nsa_proto_map_get(&m.error, "x") == NULL); /* nil, not a map */
  cr_assert(eq(int, nsa_proto_decoder_next(d, &m, &e, &known, &id), 1));
  cr_assert(eq(int, nsa_proto_response_error(&m, &e), -1));
  cr_assert(eq(int, e.code, NSA_E_INTERNAL));
  nsa_proto_decoder_free(d);
  nsa_proto_writer_destroy(&w);
  expect_err("flags.set", "{\"name\": \"X\", \"value\": nan}", NSA_E_BAD_REQUEST, "key 'value'");
}

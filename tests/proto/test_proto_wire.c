/*
 * test_proto_wire.c — the decoder and encoder (proto/): round trips of every
 * method with fresh random values, streaming (many messages per feed, one
 * message byte by byte, every prefix), the envelope (wrong types/lengths, bad
 * msgids), not-msgpack bytes, huge declared sizes, oversize with msgid
 * recovery, deep nesting, every msgpack encoding through the pre-scanner.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mpbuild.h"
#include "nsa_proto.h"
#include "proto_tu.h"

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

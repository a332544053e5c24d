/*
 * fuzz_proto.c — libFuzzer harness for the proto/ decoder and validator.
 *
 * Input: byte 0 is a control byte, the rest is the stream.
 *   bit 0      size limit: 0 → 1 MiB (default), 1 → 4 KiB (exercises oversize)
 *   bits 1..3  feed pattern: all at once, 1, 2, 3, 7, 64, 509 bytes, or a
 *              pattern that varies per chunk
 *   bit 4      feed through nsa_proto_decoder_feed (0) or buffer+commit (1)
 * Every complete message is validated; every request that validates is
 * encoded again, decoded and validated again, and must come out identical
 * (parse(encode(parse(x))) == parse(x)). Tensor extents are computed. Any
 * crash, sanitizer report, leak, or a broken property (abort) is a finding.
 *
 * NSA_FUZZ_INJECT=crash|leak (tests only): deliberately crash or leak on any
 * decoded ping, so a ctest can prove that findings fail the test.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nsa_proto.h"

static int inject = -1; /* -1 unknown, 0 none, 1 crash, 2 leak */

static void check(int cond, const char *what) {
  if (!cond) {
    fprintf(stderr, "fuzz_proto: property violated: %s\n", what);
    abort();
  }
}

static void check_err(const nsa_proto_err_t *e) {
  check(memchr(e->message, '\0', sizeof e->message) != NULL, "error message NUL-terminated");
  check(e->code > NSA_E_OK && e->code < NSA_E_COUNT, "error code in range");
}

static void touch_tensor(const nsa_proto_tensor_t *t) {
  uint64_t e;
  if (nsa_proto_tensor_extent(t, &e) == 0) {
    uint64_t end;
    check(!__builtin_add_overflow(t->offset, e, &end), "extent: offset + extent fits");
  }
}

static void reencode(const nsa_request_t *req) {
  nsa_proto_writer_t w;
  nsa_proto_writer_init(&w);
  nsa_proto_write_request(&w, req->msgid, req);
  nsa_proto_decoder_t *d = nsa_proto_decoder_new(0);
  check(d != NULL, "decoder_new");
  check(nsa_proto_decoder_feed(d, w.sbuf.data, w.sbuf.size) == 0, "feed");
  nsa_proto_msg_t m;
  nsa_proto_err_t e;
  int known;
  uint32_t id;
  int r = nsa_proto_decoder_next(d, &m, &e, &known, &id);
  check(r == 1, "re-encoded request decodes");
  static nsa_request_t again;
  r = nsa_proto_parse_request(&m, &again, &e);
  if (r != 0) fprintf(stderr, "re-parse: %s\n", e.message);
  check(r == 0, "re-encoded request validates");
  check(memcmp(req, &again, sizeof again) == 0, "parse(encode(parse(x))) == parse(x)");
  check(nsa_proto_decoder_next(d, &m, &e, &known, &id) == 0, "nothing after it");
  nsa_proto_decoder_free(d);
  nsa_proto_writer_destroy(&w);
}

static void handle(const nsa_proto_msg_t *m) {
  static nsa_request_t req;
  nsa_proto_err_t e;
  int64_t i;
  uint64_t u;
  double dd;
  int b;
  char s[16];
  size_t n;
  switch (m->type) {
    case NSA_MSG_REQUEST:
      if (nsa_proto_parse_request(m, &req, &e) != 0) {
        check_err(&e);
        break;
      }
      if (req.method == NSA_M_PING && inject == 1) abort();
      if (req.method == NSA_M_PING && inject == 2) {
        char *leak = malloc(64);
        memcpy(leak, "leak", 5);
        fprintf(stderr, "%s\n", leak); /* keep it alive past the optimizer */
        leak = NULL;
      }
      if (req.method == NSA_M_SEL_FORWARD || req.method == NSA_M_SEL_BACKWARD) {
        const nsa_req_sel_attn_t *sa = &req.u.sel_attn;
        const nsa_proto_tensor_t *ts[] = {&sa->q, &sa->k, &sa->v, &sa->o, &sa->lse, &sa->dout,
                                          &sa->dq, &sa->dk, &sa->dv, &sa->sel.t};
        for (size_t k = 0; k < sizeof ts / sizeof ts[0]; k++)
          if (ts[k]->ndim) touch_tensor(ts[k]);
      }
      reencode(&req);
      break;
    case NSA_MSG_RESPONSE:
      if (nsa_proto_response_error(m, &e) != 0) check_err(&e);
      /* reading helpers on whatever the result is */
      (void)nsa_proto_get_int(&m->result, "a", &i);
      (void)nsa_proto_get_uint(&m->result, "a", &u);
      (void)nsa_proto_get_double(&m->result, "a", &dd);
      (void)nsa_proto_get_bool(&m->result, "a", &b);
      (void)nsa_proto_get_str(&m->result, "a", s, sizeof s);
      (void)nsa_proto_get_strn(&m->result, "a", &n);
      break;
    case NSA_MSG_NOTIFICATION:
      (void)nsa_proto_get_uint(&m->params, "a", &u);
      break;
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (inject < 0) {
    const char *v = getenv("NSA_FUZZ_INJECT");
    inject = !v ? 0 : !strcmp(v, "crash") ? 1 : !strcmp(v, "leak") ? 2 : 0;
  }
  if (size < 1) return 0;
  const uint8_t ctl = data[0];
  data++;
  size--;
  const size_t max = (ctl & 1) ? 4096 : 0;
  static const size_t chunks[] = {0, 1, 2, 3, 7, 64, 509, 0};
  const int pattern = (ctl >> 1) & 7;
  const int zero_copy = (ctl >> 4) & 1;

  nsa_proto_decoder_t *d = nsa_proto_decoder_new(max);
  check(d != NULL, "decoder_new");
  size_t pos = 0, round = 0;
  int dead = 0;
  while (pos < size && !dead) {
    size_t n = pattern == 0 ? size : pattern == 7 ? 1 + (round * 37 + ctl) % 300 : chunks[pattern];
    if (n > size - pos) n = size - pos;
    round++;
    if (zero_copy) {
      size_t avail = 0;
      char *buf = nsa_proto_decoder_buffer(d, n, &avail);
      check(buf != NULL && avail >= n, "decoder_buffer");
      memcpy(buf, data + pos, n);
      nsa_proto_decoder_commit(d, n);
    } else {
      check(nsa_proto_decoder_feed(d, data + pos, n) == 0, "feed");
    }
    pos += n;
    for (;;) {
      nsa_proto_msg_t m;
      nsa_proto_err_t e;
      int known = -1;
      uint32_t id;
      int r = nsa_proto_decoder_next(d, &m, &e, &known, &id);
      if (r == 0) break;
      if (r < 0) {
        check_err(&e);
        check(known == 0 || known == 1, "msgid_known is 0 or 1");
        /* sticky */
        check(nsa_proto_decoder_next(d, &m, &e, &known, &id) == -1, "fatal errors are sticky");
        dead = 1;
        break;
      }
      handle(&m);
    }
    /* The message in progress never holds more than the limit plus a
     * partial header (at most 8 bytes past the last checked position). */
    size_t lim = max ? max : NSA_PROTO_DEFAULT_MAX_MESSAGE;
    check(nsa_proto_decoder_pending(d) <= lim + 9, "pending bytes bounded by the limit");
  }
  nsa_proto_decoder_free(d);
  return 0;
}

/*
 * decoder.c — streaming msgpack-RPC decoder (DESIGN.md §4) on msgpack-c's
 * msgpack_unpacker, with a size limit that holds BEFORE msgpack-c allocates.
 *
 * Why a pre-scan: msgpack-c's unpacker allocates an array/map's element
 * storage as soon as it reads the container header (a 5-byte array32 header
 * declaring 2^32-1 elements asks its zone for ~100 GiB), and it waits without
 * limit for the payload of a str32 that declares 4 GiB. So every byte that
 * arrives is first walked by a small allocation-free scanner that:
 *   - finds where the current top-level message ends (or that it has not yet),
 *   - keeps a lower bound of the bytes the message still needs (pending payload
 *     + one byte per declared-but-unread element) and fails as soon as
 *     position + that bound exceeds max_message — so a header that declares
 *     4 GiB fails at once, before anything is buffered or allocated,
 *   - rejects the reserved byte 0xc1 and nesting deeper than NSA_PROTO_MAX_DEPTH
 *     containers (msgpack-c's own parse stack is MSGPACK_EMBED_STACK_SIZE = 32;
 *     deeper input would make it fail with a misleading NOMEM).
 * Only a complete message of at most max_message bytes is then handed to
 * msgpack_unpacker_next(), so its allocations are bounded by ~24x the message
 * (one msgpack_object per element, every element at least one byte).
 *
 * The scanner is resumable: its state (offset into the current message, a
 * stack of remaining element counts, payload bytes still to skip) survives
 * between feeds, so a message trickled in byte by byte is scanned once, not
 * once per byte. Offsets are relative to the unpacker's `off` (the first
 * unparsed byte): msgpack-c may move the buffer when it grows, but always
 * keeps the bytes from `off` on, in order.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nsa_proto.h"

enum { SCAN_NEED_MORE = 0, SCAN_COMPLETE = 1, SCAN_INVALID = -1, SCAN_TOO_DEEP = -2,
       SCAN_OVERSIZE = -3 };

typedef struct {
  size_t pos;                               /* bytes of the current message scanned */
  uint64_t skip;                            /* payload bytes still to skip */
  int depth;                                /* open containers */
  uint64_t rem[NSA_PROTO_MAX_DEPTH + 1];    /* rem[0]: root (1 object); rem[d]: items left */
  uint64_t pending;                         /* sum of rem[] = objects still to read */
} scan_state_t;

struct nsa_proto_decoder {
  msgpack_unpacker up;
  msgpack_unpacked result;
  size_t max_message;
  scan_state_t scan;
  int failed;              /* sticky fatal error */
  nsa_proto_err_t fail_err;
  int fail_msgid_known;
  uint32_t fail_msgid;
};

static void scan_reset(scan_state_t *s) {
  s->pos = 0;
  s->skip = 0;
  s->depth = 0;
  s->rem[0] = 1;
  s->pending = 1;
}

static uint64_t be_load(const unsigned char *p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; i++) v = (v << 8) | p[i];
  return v;
}

/*
 * Decodes one msgpack header at p (avail bytes). Sets *hdr (header bytes),
 * *payload (bytes after the header that belong to this object itself: str/bin
 * data, ext type+data, number bytes are counted in the header) and *items
 * (elements a container will hold: n for arrays, 2n for maps; -1 for
 * non-containers). Returns 1 ok, 0 need more bytes, -1 invalid byte.
 */
static int header_decode(const unsigned char *p, size_t avail, size_t *hdr, uint64_t *payload,
                         int64_t *items) {
  if (avail < 1) return 0;
  unsigned b = p[0];
  *payload = 0;
  *items = -1;
  if (b <= 0x7f || b >= 0xe0 || b == 0xc0 || b == 0xc2 || b == 0xc3) { *hdr = 1; return 1; }
  if (b >= 0xa0 && b <= 0xbf) { *hdr = 1; *payload = b & 0x1f; return 1; }   /* fixstr */
  if (b >= 0x90 && b <= 0x9f) { *hdr = 1; *items = b & 0x0f; return 1; }     /* fixarray */
  if (b >= 0x80 && b <= 0x8f) { *hdr = 1; *items = 2 * (b & 0x0f); return 1; } /* fixmap */
  int n;  /* bytes of the length/number field after the type byte */
  switch (b) {
    case 0xc1: return -1;                                    /* never used */
    case 0xc4: case 0xc5: case 0xc6: n = 1 << (b - 0xc4); break;  /* bin 8/16/32 */
    case 0xc7: case 0xc8: case 0xc9: n = 1 << (b - 0xc7); break;  /* ext 8/16/32 */
    case 0xca: *hdr = 5; return avail >= 5 ? 1 : 0;           /* float32 */
    case 0xcb: *hdr = 9; return avail >= 9 ? 1 : 0;           /* float64 */
    case 0xcc: case 0xd0: *hdr = 2; return avail >= 2 ? 1 : 0;
    case 0xcd: case 0xd1: *hdr = 3; return avail >= 3 ? 1 : 0;
    case 0xce: case 0xd2: *hdr = 5; return avail >= 5 ? 1 : 0;
    case 0xcf: case 0xd3: *hdr = 9; return avail >= 9 ? 1 : 0;
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8:    /* fixext: type + 1..16 */
      *hdr = 1;
      *payload = 1 + (1u << (b - 0xd4));
      return 1;
    case 0xd9: case 0xda: case 0xdb: n = 1 << (b - 0xd9); break;  /* str 8/16/32 */
    case 0xdc: case 0xde: n = 2; break;                      /* array16 / map16 */
    case 0xdd: case 0xdf: n = 4; break;                      /* array32 / map32 */
    default: return -1;
  }
  if (avail < (size_t)(1 + n)) return 0;
  uint64_t len = be_load(p + 1, n);
  *hdr = 1 + (size_t)n;
  switch (b) {
    case 0xc7: case 0xc8: case 0xc9: *payload = len + 1; break;  /* ext: type byte + data */
    case 0xdc: case 0xdd: *items = (int64_t)len; break;
    case 0xde: case 0xdf: *items = 2 * (int64_t)len; break;
    default: *payload = len; break;
  }
  return 1;
}

/* Advances the scanner over buf[s->pos .. avail). */
static int scan_step(scan_state_t *s, const unsigned char *buf, size_t avail, size_t max) {
  for (;;) {
    if (s->skip > 0) {
      size_t have = avail - s->pos;
      size_t take = s->skip < have ? (size_t)s->skip : have;
      s->pos += take;
      s->skip -= take;
      if (s->skip > 0) return SCAN_NEED_MORE;
    }
    while (s->depth > 0 && s->rem[s->depth] == 0) s->depth--;
    if (s->depth == 0 && s->rem[0] == 0) return SCAN_COMPLETE;

    size_t hdr;
    uint64_t payload;
    int64_t items;
    int r = header_decode(buf + s->pos, avail - s->pos, &hdr, &payload, &items);
    if (r < 0) return SCAN_INVALID;
    if (r == 0) return SCAN_NEED_MORE;
    s->rem[s->depth]--;
    s->pending--;
    s->pos += hdr;
    if (items >= 0) {
      if (s->depth + 1 > NSA_PROTO_MAX_DEPTH) return SCAN_TOO_DEEP;
      s->depth++;
      s->rem[s->depth] = (uint64_t)items;
      s->pending += (uint64_t)items;
    } else {
      s->skip = payload;
    }
    /* Every element still to come takes at least one byte. pending <= 33 *
     * 2^33 and skip <= 2^32, so the sum cannot overflow. */
    if ((uint64_t)s->pos + s->skip + s->pending > (uint64_t)max) return SCAN_OVERSIZE;
  }
}

/* Reads one msgpack integer at p. Returns header bytes used, 0 if incomplete
 * or not an integer. *neg set for negative values. */
static size_t read_int(const unsigned char *p, size_t avail, uint64_t *u, int *neg) {
  if (avail < 1) return 0;
  unsigned b = p[0];
  *neg = 0;
  if (b <= 0x7f) { *u = b; return 1; }
  if (b >= 0xe0) { *neg = 1; *u = 0; return 1; }
  int n;
  int sign = 0;
  switch (b) {
    case 0xcc: n = 1; break;
    case 0xcd: n = 2; break;
    case 0xce: n = 4; break;
    case 0xcf: n = 8; break;
    case 0xd0: n = 1; sign = 1; break;
    case 0xd1: n = 2; sign = 1; break;
    case 0xd2: n = 4; sign = 1; break;
    case 0xd3: n = 8; sign = 1; break;
    default: return 0;
  }
  if (avail < (size_t)(1 + n)) return 0;
  uint64_t v = be_load(p + 1, n);
  if (sign && (v >> (8 * n - 1)) & 1) { *neg = 1; v = 0; }
  *u = v;
  return 1 + (size_t)n;
}

/* Recovers the msgid from the first bytes of a request [0, msgid, ...] whose
 * rest may be missing, oversize or garbage. */
static int prefix_msgid(const unsigned char *p, size_t avail, uint32_t *msgid) {
  size_t hdr;
  uint64_t payload;
  int64_t items;
  if (header_decode(p, avail, &hdr, &payload, &items) != 1) return 0;
  if (p[0] < 0x90 || p[0] > 0x9f) {
    if (p[0] != 0xdc && p[0] != 0xdd) return 0;
  }
  if (items < 2) return 0;
  p += hdr;
  avail -= hdr;
  uint64_t type, id;
  int neg;
  size_t k = read_int(p, avail, &type, &neg);
  if (!k || neg || type != NSA_MSG_REQUEST) return 0;
  size_t k2 = read_int(p + k, avail - k, &id, &neg);
  if (!k2 || neg || id > UINT32_MAX) return 0;
  *msgid = (uint32_t)id;
  return 1;
}

nsa_proto_decoder_t *nsa_proto_decoder_new(size_t max_message) {
  nsa_proto_decoder_t *d = calloc(1, sizeof(*d));
  if (!d) return NULL;
  size_t init = 64 * 1024;
  if (!msgpack_unpacker_init(&d->up, init)) {
    free(d);
    return NULL;
  }
  msgpack_unpacked_init(&d->result);
  d->max_message = max_message ? max_message : NSA_PROTO_DEFAULT_MAX_MESSAGE;
  scan_reset(&d->scan);
  return d;
}

void nsa_proto_decoder_free(nsa_proto_decoder_t *d) {
  if (!d) return;
  msgpack_unpacked_destroy(&d->result);
  msgpack_unpacker_destroy(&d->up);
  free(d);
}

size_t nsa_proto_decoder_pending(const nsa_proto_decoder_t *d) {
  return d->up.used - d->up.off;
}

char *nsa_proto_decoder_buffer(nsa_proto_decoder_t *d, size_t want, size_t *avail) {
  if (want == 0) want = 1;
  if (!msgpack_unpacker_reserve_buffer(&d->up, want)) return NULL;
  if (avail) *avail = msgpack_unpacker_buffer_capacity(&d->up);
  return msgpack_unpacker_buffer(&d->up);
}

void nsa_proto_decoder_commit(nsa_proto_decoder_t *d, size_t n) {
  if (n > msgpack_unpacker_buffer_capacity(&d->up)) n = msgpack_unpacker_buffer_capacity(&d->up);
  if (d->failed) return; /* a dead stream: drop the bytes, never grow */
  msgpack_unpacker_buffer_consumed(&d->up, n);
}

int nsa_proto_decoder_feed(nsa_proto_decoder_t *d, const void *data, size_t len) {
  if (d->failed || len == 0) return 0;
  size_t avail;
  char *buf = nsa_proto_decoder_buffer(d, len, &avail);
  if (!buf) return -1;
  memcpy(buf, data, len);
  nsa_proto_decoder_commit(d, len);
  return 0;
}

/* Records a sticky fatal error and reports it. */
static int fail(nsa_proto_decoder_t *d, nsa_proto_err_t *err, int *msgid_known, uint32_t *msgid,
                int known, uint32_t id, nsa_proto_code_t code, const char *fmt, ...)
    __attribute__((format(printf, 8, 9)));

static int fail(nsa_proto_decoder_t *d, nsa_proto_err_t *err, int *msgid_known, uint32_t *msgid,
                int known, uint32_t id, nsa_proto_code_t code, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  d->fail_err.code = code;
  vsnprintf(d->fail_err.message, sizeof d->fail_err.message, fmt, ap);
  va_end(ap);
  d->failed = 1;
  d->fail_msgid_known = known;
  d->fail_msgid = known ? id : 0;
  /* Free the stream's bytes: nothing after a fatal error is ever parsed. */
  d->up.free += d->up.used - d->up.off;
  d->up.used = d->up.off;
  if (err) *err = d->fail_err;
  if (msgid_known) *msgid_known = known;
  if (msgid) *msgid = d->fail_msgid;
  return -1;
}

static int obj_uint32(const msgpack_object *o, uint32_t *v) {
  if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 > UINT32_MAX) return 0;
  *v = (uint32_t)o->via.u64;
  return 1;
}

/* Envelope checks of DESIGN.md §4 on a complete object. */
static int envelope(nsa_proto_decoder_t *d, const msgpack_object *o, nsa_proto_msg_t *out,
                    nsa_proto_err_t *err, int *msgid_known, uint32_t *msgid) {
  int known = 0;
  uint32_t id = 0;
  if (o->type != MSGPACK_OBJECT_ARRAY)
    return fail(d, err, msgid_known, msgid, 0, 0, NSA_E_BAD_REQUEST,
                "message is not a msgpack-RPC array");
  const msgpack_object_array *a = &o->via.array;
  if (a->size >= 2 && a->ptr[0].type == MSGPACK_OBJECT_POSITIVE_INTEGER &&
      a->ptr[0].via.u64 == NSA_MSG_REQUEST)
    known = obj_uint32(&a->ptr[1], &id);
  if (a->size < 1 || a->ptr[0].type != MSGPACK_OBJECT_POSITIVE_INTEGER || a->ptr[0].via.u64 > 2)
    return fail(d, err, msgid_known, msgid, 0, 0, NSA_E_BAD_REQUEST,
                "message type must be 0 (request), 1 (response) or 2 (notification)");
  memset(out, 0, sizeof *out);
  out->type = (nsa_msg_type_t)a->ptr[0].via.u64;
  out->params.type = MSGPACK_OBJECT_NIL;
  out->error.type = MSGPACK_OBJECT_NIL;
  out->result.type = MSGPACK_OBJECT_NIL;
  const uint32_t want = out->type == NSA_MSG_NOTIFICATION ? 3 : 4;
  static const char *const tname[] = {"request", "response", "notification"};
  if (a->size != want)
    return fail(d, err, msgid_known, msgid, known, id, NSA_E_BAD_REQUEST,
                "a %s must be an array of %u elements, got %u", tname[out->type], want,
                (unsigned)a->size);
  const msgpack_object *method = NULL, *params = NULL;
  switch (out->type) {
    case NSA_MSG_REQUEST:
    case NSA_MSG_RESPONSE:
      if (!obj_uint32(&a->ptr[1], &out->msgid))
        return fail(d, err, msgid_known, msgid, 0, 0, NSA_E_BAD_REQUEST,
                    "msgid must be an unsigned integer <= 4294967295");
      if (out->type == NSA_MSG_REQUEST) {
        method = &a->ptr[2];
        params = &a->ptr[3];
      } else {
        out->error = a->ptr[2];
        out->result = a->ptr[3];
        if (out->error.type != MSGPACK_OBJECT_NIL && out->error.type != MSGPACK_OBJECT_MAP)
          return fail(d, err, msgid_known, msgid, 0, 0, NSA_E_BAD_REQUEST,
                      "response error must be nil or a map");
      }
      break;
    case NSA_MSG_NOTIFICATION:
      method = &a->ptr[1];
      params = &a->ptr[2];
      break;
  }
  if (method) {
    if (method->type != MSGPACK_OBJECT_STR)
      return fail(d, err, msgid_known, msgid, known, id, NSA_E_BAD_REQUEST,
                  "method must be a string");
    if (params->type != MSGPACK_OBJECT_MAP && params->type != MSGPACK_OBJECT_NIL)
      return fail(d, err, msgid_known, msgid, known, id, NSA_E_BAD_REQUEST,
                  "params must be a map or nil");
    out->method = method->via.str.ptr;
    out->method_len = method->via.str.size;
    out->params = *params;
  }
  return 1;
}

int nsa_proto_decoder_next(nsa_proto_decoder_t *d, nsa_proto_msg_t *out, nsa_proto_err_t *err,
                           int *msgid_known, uint32_t *msgid) {
  if (msgid_known) *msgid_known = 0;
  if (msgid) *msgid = 0;
  if (d->failed) {
    if (err) *err = d->fail_err;
    if (msgid_known) *msgid_known = d->fail_msgid_known;
    if (msgid) *msgid = d->fail_msgid;
    return -1;
  }
  /* The previous message's objects die here (contract: valid until next()). */
  msgpack_unpacked_destroy(&d->result);

  const unsigned char *start = (const unsigned char *)d->up.buffer + d->up.off;
  size_t avail = d->up.used - d->up.off;
  if (avail == 0) return 0;
  int r = scan_step(&d->scan, start, avail, d->max_message);
  if (r == SCAN_NEED_MORE) return 0;
  if (r < 0) {
    uint32_t id = 0;
    int known = prefix_msgid(start, avail, &id);
    size_t at = d->scan.pos;
    scan_reset(&d->scan);
    switch (r) {
      case SCAN_INVALID:
        return fail(d, err, msgid_known, msgid, known, id, NSA_E_BAD_REQUEST,
                    "bytes are not msgpack (invalid byte 0x%02x at offset %zu)", start[at], at);
      case SCAN_TOO_DEEP:
        return fail(d, err, msgid_known, msgid, known, id, NSA_E_BAD_REQUEST,
                    "message nests deeper than %d levels", NSA_PROTO_MAX_DEPTH);
      default:
        return fail(d, err, msgid_known, msgid, known, id, NSA_E_BAD_REQUEST,
                    "message exceeds the size limit of %zu bytes", d->max_message);
    }
  }

  /* A complete message of scan.pos <= max_message bytes is buffered. */
  size_t size = d->scan.pos;
  scan_reset(&d->scan);
  size_t parsed = 0;
  msgpack_unpack_return ur = msgpack_unpacker_next_with_size(&d->up, &d->result, &parsed);
  if (ur != MSGPACK_UNPACK_SUCCESS || parsed != size) {
    uint32_t id = 0;
    int known = prefix_msgid(start, avail, &id);
    if (ur == MSGPACK_UNPACK_NOMEM_ERROR)
      return fail(d, err, msgid_known, msgid, known, id, NSA_E_INTERNAL,
                  "out of memory decoding a %zu-byte message", size);
    return fail(d, err, msgid_known, msgid, known, id, NSA_E_BAD_REQUEST,
                "bytes are not msgpack (decoder status %d)", (int)ur);
  }
  return envelope(d, &d->result.data, out, err, msgid_known, msgid);
}

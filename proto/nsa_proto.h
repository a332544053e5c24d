/*
 * nsa_proto.h — msgpack-RPC v1 for nsad (DESIGN.md §4). Pure C: no libuv, no
 * CUDA. Used by the daemon (decode requests, encode responses/notifications)
 * and by libnsaclient (encode requests, decode responses/notifications).
 *
 * Wire format:
 *   request      [0, msgid, method, params]   msgid uint32, params a map
 *   response     [1, msgid, error, result]    error nil | {code, message}
 *   notification [2, method, params]
 */
#ifndef NSA_PROTO_H
#define NSA_PROTO_H

#include <msgpack.h>
#include <stddef.h>
#include <stdint.h>

#include "nsa/sel_attn.h"

#ifdef __cplusplus
extern "C" {
#endif

#define NSA_PROTO_VERSION 1
#define NSA_PROTO_DEFAULT_MAX_MESSAGE (1u << 20)
/* Deepest container nesting a message may have (msgpack-c's own parse stack is
 * 32 deep); deeper input is a fatal bad_request. */
#define NSA_PROTO_MAX_DEPTH 32

/* DESIGN.md §4 error codes, in order. */
typedef enum {
  NSA_E_OK = 0,
  NSA_E_BAD_REQUEST,
  NSA_E_UNKNOWN_METHOD,
  NSA_E_NOT_FOUND,
  NSA_E_OUT_OF_BOUNDS,
  NSA_E_INVALID_SELECTION,
  NSA_E_UNSUPPORTED,
  NSA_E_BUSY,
  NSA_E_PERMISSION_DENIED,
  NSA_E_PROTOCOL_VERSION,
  NSA_E_DEVICE_ERROR,
  NSA_E_INTERNAL,
  NSA_E_COUNT
} nsa_proto_code_t;

/* "bad_request", ... ; "ok" for NSA_E_OK. */
const char *nsa_proto_code_name(nsa_proto_code_t c);
/* Parses a code string; NSA_E_INTERNAL for unknown strings. */
nsa_proto_code_t nsa_proto_code_parse(const char *s, size_t len);
/* Maps a kernel status (nsa_status_t) to a wire code. */
nsa_proto_code_t nsa_proto_code_from_status(int status);

/* An error with its message (always NUL-terminated). */
typedef struct {
  nsa_proto_code_t code;
  char message[256];
} nsa_proto_err_t;

/* printf-style setter; returns -1 so callers can `return nsa_proto_err_set(...)`. */
int nsa_proto_err_set(nsa_proto_err_t *e, nsa_proto_code_t code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ------------------------------------------------------------ decoding --- */

typedef enum { NSA_MSG_REQUEST = 0, NSA_MSG_RESPONSE = 1, NSA_MSG_NOTIFICATION = 2 } nsa_msg_type_t;

/* One decoded message. Pointers/objects stay valid until the next
 * nsa_proto_decoder_next() call on the same decoder or its free. */
typedef struct {
  nsa_msg_type_t type;
  uint32_t msgid;             /* request, response */
  const char *method;         /* request, notification (NOT NUL-terminated) */
  size_t method_len;
  msgpack_object params;      /* request, notification: map (nil allowed) */
  msgpack_object error;       /* response: nil or map {code, message} */
  msgpack_object result;      /* response */
} nsa_proto_msg_t;

typedef struct nsa_proto_decoder nsa_proto_decoder_t;

/* Streaming decoder on msgpack-c's unpacker; a message whose encoding exceeds
 * max_message bytes (0 = NSA_PROTO_DEFAULT_MAX_MESSAGE) is a fatal stream
 * error. Every byte is pre-scanned without allocating before msgpack-c sees it:
 * a header declaring more than the limit (e.g. a str32 of 4 GiB) fails at once,
 * nesting deeper than NSA_PROTO_MAX_DEPTH fails, and the bytes held for the
 * message being assembled never exceed the limit (+ a partial header). Call
 * next() until it returns 0 after every commit. After a fatal error the
 * decoder stays failed (next() repeats the error; further bytes are dropped).
 * No global state: one decoder per connection, any thread. */
nsa_proto_decoder_t *nsa_proto_decoder_new(size_t max_message);
void nsa_proto_decoder_free(nsa_proto_decoder_t *d);

/* Zero-copy feeding: get a writable buffer of at least `want` bytes, read into
 * it, then commit the bytes actually read. Returns NULL on allocation failure. */
char *nsa_proto_decoder_buffer(nsa_proto_decoder_t *d, size_t want, size_t *avail);
void nsa_proto_decoder_commit(nsa_proto_decoder_t *d, size_t n);
/* Convenience: copy bytes in. Returns 0, or -1 when memory fails. */
int nsa_proto_decoder_feed(nsa_proto_decoder_t *d, const void *data, size_t len);

/*
 * Next complete message.
 *   1  a message is in *out (structurally valid envelope)
 *   0  need more bytes
 *  -1  fatal stream error in *err (not msgpack, oversize, bad envelope):
 *      the connection must be closed after replying. *msgid_known is set to 1
 *      and *msgid to the id when the id could be recovered (e.g. an oversize
 *      request whose prefix [0, msgid, ...] was readable).
 */
int nsa_proto_decoder_next(nsa_proto_decoder_t *d, nsa_proto_msg_t *out, nsa_proto_err_t *err,
                           int *msgid_known, uint32_t *msgid);

/* Bytes fed but not yet returned as messages (bounded: the message being
 * assembled never exceeds max_message before next() fails). */
size_t nsa_proto_decoder_pending(const nsa_proto_decoder_t *d);

/* For clients: the error of a response. Returns 0 when error is nil, 1 when
 * *err was filled from {code, message} (message cut to fit the buffer; unknown
 * code strings map to internal), -1 when the error object is malformed (err
 * is then filled with an internal error describing that). */
int nsa_proto_response_error(const nsa_proto_msg_t *m, nsa_proto_err_t *err);

/* ----------------------------------------------------- typed requests --- */

typedef enum {
  NSA_M_HELLO = 0,
  NSA_M_PING,
  NSA_M_REGION_REGISTER,
  NSA_M_REGION_UNREGISTER,
  NSA_M_EVENT_REGISTER,
  NSA_M_EVENT_UNREGISTER,
  NSA_M_SEL_FORWARD,
  NSA_M_SEL_BACKWARD,
  NSA_M_FLAGS_GET,
  NSA_M_FLAGS_SET,
  NSA_M_FLAGS_RESET,
  NSA_M_METRICS_GET,
  NSA_M_METRICS_SUBSCRIBE,
  NSA_M_SHUTDOWN,
  NSA_M_COUNT
} nsa_method_t;

/* "hello", "ping", "region.register", ... */
const char *nsa_method_name(nsa_method_t m);
/* Returns the method or -1 if unknown. */
int nsa_method_lookup(const char *s, size_t len);

#define NSA_PROTO_MAX_LABELS 32
#define NSA_PROTO_MAX_MATCH 16
#define NSA_PROTO_STR 256

typedef struct {
  char key[64];
  char value[NSA_PROTO_STR];
} nsa_proto_label_t;

/* A tensor reference {region, offset, dtype, shape, strides?}. */
typedef struct {
  uint64_t region;
  uint64_t offset;      /* bytes into the region */
  nsa_dtype_t dtype;
  int ndim;             /* 1..NSA_MAX_DIMS */
  int64_t shape[NSA_MAX_DIMS];
  int64_t strides[NSA_MAX_DIMS]; /* elements; filled contiguous when absent */
  int has_strides;
} nsa_proto_tensor_t;

/* Overflow-safe byte extent of a tensor ref: every element reachable through
 * shape/strides lies in [offset, offset + *end_excl). Returns 0, or -1 if any
 * arithmetic overflows 64 bits — including offset + *end_excl, so on success
 * that sum is safe to compare with a region size. A tensor with a zero
 * dimension has extent 0. Also -1 for ndim outside 1..5, a negative
 * shape/stride or an unknown dtype. */
int nsa_proto_tensor_extent(const nsa_proto_tensor_t *t, uint64_t *end_excl);
/* Fills strides as contiguous row-major for the shape (has_strides stays as
 * is). Returns 0, or -1 if ndim is out of range or a stride overflows. */
int nsa_proto_tensor_set_contiguous(nsa_proto_tensor_t *t);

typedef struct {
  nsa_sel_kind_t kind;
  nsa_proto_tensor_t t;  /* "indices" or "ranges" */
  int32_t block_size;    /* block_indices only */
} nsa_proto_sel_t;

typedef struct {
  int64_t protocol;
  char client[128];
  int64_t pid;
  int nlabels;
  nsa_proto_label_t labels[NSA_PROTO_MAX_LABELS];
} nsa_req_hello_t;

typedef enum { NSA_REGION_CUDA_IPC = 0, NSA_REGION_SHM = 1 } nsa_region_kind_t;

typedef struct {
  nsa_region_kind_t kind;
  int32_t device;             /* cuda_ipc */
  uint8_t handle[64];         /* cuda_ipc: bin 64 */
  char name[NSA_PROTO_STR];   /* shm: "/nsa-..." */
  uint64_t size;
} nsa_req_region_register_t;

typedef struct {
  int32_t device;
  uint8_t handle[64];
} nsa_req_event_register_t;

/* sel_attn.forward and sel_attn.backward. Backward-only tensors are filled for
 * backward; lse is optional for forward (has_lse). */
typedef struct {
  nsa_proto_tensor_t q, k, v, o, lse, dout, dq, dk, dv; /* "do" on the wire is dout */
  int has_lse;
  nsa_proto_sel_t sel;
  int has_scale;
  double scale;
  int has_wait_event, has_done_event;
  uint64_t wait_event, done_event;
  int sync; /* default 1 */
} nsa_req_sel_attn_t;

typedef struct {
  char name[64];
  char value[NSA_PROTO_STR]; /* bool → "1"/"0", int → decimal, str as sent */
  int has_percent;
  double percent; /* 0..100 */
  int nmatch;
  nsa_proto_label_t match[NSA_PROTO_MAX_MATCH];
} nsa_req_flags_set_t;

typedef struct {
  int prometheus; /* format = "prometheus" */
} nsa_req_metrics_get_t;

typedef struct {
  uint32_t interval_ms; /* 10 .. 3600000 */
} nsa_req_metrics_subscribe_t;

typedef struct {
  nsa_method_t method;
  uint32_t msgid;
  union {
    nsa_req_hello_t hello;
    nsa_req_region_register_t region_register;
    uint64_t region;  /* region.unregister */
    nsa_req_event_register_t event_register;
    uint64_t event;   /* event.unregister */
    nsa_req_sel_attn_t sel_attn;
    nsa_req_flags_set_t flags_set;
    char flag_name[64]; /* flags.reset */
    nsa_req_metrics_get_t metrics_get;
    nsa_req_metrics_subscribe_t metrics_subscribe;
  } u;
} nsa_request_t;

/* Validates a decoded request message into typed params. Unknown keys are
 * ignored. Errors: unknown_method; bad_request naming the missing/ill-typed key
 * (e.g. "missing key 'q'", "key 'q.shape' must be an array of ≤5 ints"). */
int nsa_proto_parse_request(const nsa_proto_msg_t *m, nsa_request_t *req, nsa_proto_err_t *err);

/* Required keys (DESIGN.md §4). hello: protocol, client, pid (labels
 * optional); region.register: kind + (device, handle, size) or (name, size);
 * sel_attn.*: see nsa_req_sel_attn_t. Optional keys may be absent or nil.
 * Integers must be msgpack integers (never floats); strings never contain NUL
 * and must fit their buffers (never truncated). */

/* Map lookup helper: value for key or NULL (map must be MSGPACK_OBJECT_MAP). */
const msgpack_object *nsa_proto_map_get(const msgpack_object *map, const char *key);

/* ------------------------------------------------------------ encoding --- */

/* A growable output buffer + packer. Pack into w->pk with msgpack-c calls or
 * the helpers below, then send w->sbuf.data / w->sbuf.size. w->pk points at
 * w->sbuf: use a writer in place, never copy it after init. */
typedef struct {
  msgpack_sbuffer sbuf;
  msgpack_packer pk;
} nsa_proto_writer_t;

void nsa_proto_writer_init(nsa_proto_writer_t *w);
void nsa_proto_writer_reset(nsa_proto_writer_t *w);  /* keep memory, size = 0 */
void nsa_proto_writer_destroy(nsa_proto_writer_t *w);

/* [0, msgid, method, ...  — caller then packs the params map. */
void nsa_proto_write_request_begin(nsa_proto_writer_t *w, uint32_t msgid, const char *method);
/* [1, msgid, nil, ...     — caller then packs the result (map or nil). */
void nsa_proto_write_result_begin(nsa_proto_writer_t *w, uint32_t msgid);
/* Whole error response [1, msgid, {code, message}, nil]. */
void nsa_proto_write_error(nsa_proto_writer_t *w, uint32_t msgid, nsa_proto_code_t code,
                           const char *message);
/* [2, method, ...         — caller then packs the params map. */
void nsa_proto_write_notification_begin(nsa_proto_writer_t *w, const char *method);

/* Encodes a typed request: [0, msgid, method, params] with params built from
 * req (the inverse of nsa_proto_parse_request; tensors without has_strides are
 * sent without strides). */
void nsa_proto_write_request(nsa_proto_writer_t *w, uint32_t msgid, const nsa_request_t *req);

/* Packing helpers (key/value pairs inside a map the caller opened). */
void nsa_proto_pack_str(msgpack_packer *pk, const char *s);
void nsa_proto_pack_kv_str(msgpack_packer *pk, const char *key, const char *val);
void nsa_proto_pack_kv_int(msgpack_packer *pk, const char *key, int64_t val);
void nsa_proto_pack_kv_uint(msgpack_packer *pk, const char *key, uint64_t val);
void nsa_proto_pack_kv_double(msgpack_packer *pk, const char *key, double val);
void nsa_proto_pack_kv_bool(msgpack_packer *pk, const char *key, int val);
void nsa_proto_pack_kv_nil(msgpack_packer *pk, const char *key);
/* key → {region, offset, dtype, shape, strides}. */
void nsa_proto_pack_kv_tensor(msgpack_packer *pk, const char *key, const nsa_proto_tensor_t *t);

/* Reading helpers for clients: 0 on success, -1 on missing/ill-typed. */
int nsa_proto_get_int(const msgpack_object *map, const char *key, int64_t *out);
int nsa_proto_get_uint(const msgpack_object *map, const char *key, uint64_t *out);
int nsa_proto_get_double(const msgpack_object *map, const char *key, double *out);
int nsa_proto_get_str(const msgpack_object *map, const char *key, char *buf, size_t len);
/* (get_str fails with -1 rather than truncate when the string does not fit.) */
int nsa_proto_get_bool(const msgpack_object *map, const char *key, int *out);
/* Zero-copy string value: pointer into the message (not NUL-terminated) and
 * its length, or NULL when missing / not a string. */
const char *nsa_proto_get_strn(const msgpack_object *map, const char *key, size_t *len);

#ifdef __cplusplus
}
#endif
#endif /* NSA_PROTO_H */

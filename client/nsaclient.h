/*
 * nsaclient.h — libnsaclient: the C client of nsad (DESIGN.md §4).
 *
 *   nsa_client_t *c;
 *   nsa_client_opts_t o = {.name = "trainer"};
 *   if (nsa_client_open(&c, &o) != 0) { ...nsa_client_open_error()... }
 *   nsa_client_shm_t *buf;                       // host tensors (CPU backend)
 *   nsa_client_shm_create(c, bytes, &buf);       // /nsa-<pid>-<n>, mapped, registered
 *   nsa_client_fwd_t a = {0};                    // tensor refs into buf
 *   nsa_client_tensor(&a.q, buf->region, off_q, NSA_CLIENT_F32, 4, shape_q); ...
 *   nsa_client_result_t r;
 *   if (nsa_client_forward(c, &a, &r) != 0)
 *     fprintf(stderr, "%s: %s\n", nsa_client_error_code(c), nsa_client_error_message(c));
 *
 * Every call returns 0 on success or -1; the error's code (a DESIGN.md §4
 * code string such as "out_of_bounds", verbatim from the daemon, or a
 * client-side code: "disconnected", "timeout", "io_error", "bad_reply",
 * "invalid_argument") and message are then available from
 * nsa_client_error_code()/nsa_client_error_message() until the next call.
 *
 * Restarts: when the daemon went away, the next call reconnects (with
 * backoff), says hello again and re-registers this client's shm regions; the
 * region ids the caller holds keep working (mapped to the new ids
 * transparently). A request that was in flight when the connection broke
 * fails with "disconnected" — never a silent wrong answer.
 *
 * One nsa_client_t is for one thread at a time (use one per thread).
 */
#ifndef NSACLIENT_H
#define NSACLIENT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NSA_CLIENT_MAX_DIMS 5

typedef struct nsa_client nsa_client_t;
struct nsa_client_tensor;

/* Same numbering as nsa_dtype_t (nsa/sel_attn.h). */
typedef enum { NSA_CLIENT_BF16 = 0, NSA_CLIENT_F16 = 1, NSA_CLIENT_F32 = 2, NSA_CLIENT_I32 = 3 } nsa_client_dtype_t;

typedef struct {
  const char *key;
  const char *value;
} nsa_client_label_t;

typedef struct {
  const char *socket_path;         /* NULL: $NSAD_SOCKET, else /run/nsad/nsad.sock */
  const char *name;                /* client name sent in hello (NULL: "nsaclient") */
  const nsa_client_label_t *labels;/* session labels (rollout rules match on them) */
  int nlabels;
  int timeout_ms;                  /* per-call reply timeout; 0 = 120000, < 0 = none */
  int reconnect_attempts;          /* connect tries per call after a failure; 0 = 8 */
} nsa_client_opts_t;

/* What hello returned. */
typedef struct {
  int protocol;
  char server[64];
  char backend[16]; /* "cpu" / "cuda" */
  int ndevices;
  char devices[8][96];
  uint64_t session;
  uint64_t flags_epoch;
} nsa_client_info_t;

/* Connects and says hello. On failure *out is NULL and the error is readable
 * with nsa_client_open_error().
 * Environment: NSACLIENT_SPIN_US (default 50, 0..10000): while waiting for a
 * reply, poll without sleeping for up to this many microseconds first, so a
 * fast reply costs no thread wake-up (0 = always sleep in poll()). */
int nsa_client_open(nsa_client_t **out, const nsa_client_opts_t *opts);
/* Error of the last failed nsa_client_open in this thread: "code: message". */
const char *nsa_client_open_error(void);
/* Unregisters/unmaps/unlinks remaining shm regions and closes. NULL is fine. */
void nsa_client_close(nsa_client_t *c);

const char *nsa_client_error_code(const nsa_client_t *c);
const char *nsa_client_error_message(const nsa_client_t *c);
const nsa_client_info_t *nsa_client_info(const nsa_client_t *c);
/* Number of (re)connections made so far (1 after open). */
int nsa_client_connections(const nsa_client_t *c);
/* The socket fd (for tests: poll/abort); -1 when disconnected. */
int nsa_client_fd(const nsa_client_t *c);

int nsa_client_ping(nsa_client_t *c);

/* ---- regions ---- */

/* A POSIX shm region this client created: mapped here and registered. */
typedef struct {
  uint64_t region; /* id to put in tensor refs (stable across reconnects) */
  void *ptr;       /* local mapping */
  size_t size;
  char name[64];   /* "/nsa-<pid>-<n>" */
} nsa_client_shm_t;

/* Creates /nsa-<pid>-<n> (shm_open O_CREAT|O_EXCL, mode 0600), ftruncate,
 * mmap, region.register. */
int nsa_client_shm_create(nsa_client_t *c, size_t size, nsa_client_shm_t **out);
/* region.unregister, munmap, shm_unlink, free. NULL is fine. */
int nsa_client_shm_destroy(nsa_client_t *c, nsa_client_shm_t *shm);

/* Lower level: register an existing shm object by name (the caller owns it).
 * Re-registered automatically after a reconnect. */
int nsa_client_region_register_shm(nsa_client_t *c, const char *name, uint64_t size,
                                   uint64_t *region);
int nsa_client_region_unregister(nsa_client_t *c, uint64_t region);

/* ---- CUDA regions and events (the cuda backend) ---- */

/* Raw forms: a cudaIpcMemHandle_t (64 bytes) of an allocation's BASE with the
 * allocation's size, or a cudaIpcEventHandle_t of an event created with
 * cudaEventInterprocess | cudaEventDisableTiming. Re-registered after a
 * reconnect like shm regions. */
int nsa_client_region_register_cuda_ipc(nsa_client_t *c, int device, const void *handle64,
                                        uint64_t size, uint64_t *region);
int nsa_client_event_register(nsa_client_t *c, int device, const void *handle64,
                              uint64_t *event);
int nsa_client_event_unregister(nsa_client_t *c, uint64_t event);

/* Device pointers, as PyTorch does it: finds the allocation holding dptr
 * (cuMemGetAddressRange), makes its IPC handle once, registers it once per
 * allocation (cached by base and size) and fills a contiguous tensor ref at
 * dptr's offset. Loads libcuda.so.1 at run time; without a CUDA driver the
 * call fails with "unsupported". The calling thread must have the pointer's
 * CUDA context current (any CUDA runtime call on that device does that).
 * If an allocation is freed, call nsa_client_cuda_forget(c, base) before its
 * address range may be reused. */
int nsa_client_cuda_tensor(nsa_client_t *c, const void *dptr, nsa_client_dtype_t dtype, int ndim,
                           const int64_t *shape, struct nsa_client_tensor *out);
/* A cudaEvent_t (interprocess, timing disabled) → event id (cached). */
int nsa_client_cuda_event(nsa_client_t *c, void *cuda_event, uint64_t *event);
/* Unregisters the cached allocation containing dptr (or the cached event). */
int nsa_client_cuda_forget(nsa_client_t *c, const void *dptr_or_event);

/* ---- selection attention ---- */

typedef struct nsa_client_tensor {
  uint64_t region;
  uint64_t offset; /* bytes */
  nsa_client_dtype_t dtype;
  int ndim;
  int64_t shape[NSA_CLIENT_MAX_DIMS];
  int64_t strides[NSA_CLIENT_MAX_DIMS]; /* elements; used when has_strides */
  int has_strides;
} nsa_client_tensor_t;

/* Fills a contiguous tensor ref. */
void nsa_client_tensor(nsa_client_tensor_t *t, uint64_t region, uint64_t offset,
                       nsa_client_dtype_t dtype, int ndim, const int64_t *shape);
/* Bytes a contiguous tensor of this shape and dtype takes. */
size_t nsa_client_tensor_bytes(nsa_client_dtype_t dtype, int ndim, const int64_t *shape);

typedef enum { NSA_CLIENT_SEL_BLOCK_INDICES = 0, NSA_CLIENT_SEL_RANGES = 1 } nsa_client_sel_kind_t;

typedef struct {
  nsa_client_sel_kind_t kind;
  nsa_client_tensor_t t;  /* i32 [B,S,G,n] or [B,S,G,n,2] */
  int32_t block_size;     /* block_indices */
} nsa_client_sel_t;

/* CUDA stream ordering (cuda backend; the cpu backend runs every request
 * synchronously and ignores events). Zero-initialized = plain blocking call. */
typedef struct {
  uint64_t wait_event; /* event id: the daemon's stream waits on it first */
  uint64_t done_event; /* event id: recorded by the daemon after the work */
  int has_wait_event, has_done_event;
  int async; /* 1: sync=false — the reply comes once the work is queued */
} nsa_client_exec_t;

/* (Layouts are mirrored by client/python's ctypes: append, never reorder.) */
typedef struct {
  nsa_client_tensor_t q, k, v, o, lse; /* lse optional: has_lse */
  int has_lse;
  nsa_client_sel_t sel;
  double scale; /* <= 0: 1/sqrt(Dk) */
} nsa_client_fwd_t;

typedef struct {
  nsa_client_tensor_t q, k, v, o, lse, dout, dq, dk, dv;
  nsa_client_sel_t sel;
  double scale;
} nsa_client_bwd_t;

/* Reply of sel_attn.forward/backward. */
typedef struct {
  char path[16]; /* "varlen_v2", "varlen_v1", "packed" */
  int64_t rows;
  int64_t max_len;
  double mean_len;
  uint64_t flags_epoch;
  double device_us;
} nsa_client_result_t;

/* Blocking calls. */
int nsa_client_forward(nsa_client_t *c, const nsa_client_fwd_t *a, nsa_client_result_t *res);
int nsa_client_backward(nsa_client_t *c, const nsa_client_bwd_t *a, nsa_client_result_t *res);

/* Pipelining: submit returns a ticket at once; wait collects that reply
 * (in any order). A ticket is valid until waited once. */
int nsa_client_forward_submit(nsa_client_t *c, const nsa_client_fwd_t *a, uint32_t *ticket);
int nsa_client_backward_submit(nsa_client_t *c, const nsa_client_bwd_t *a, uint32_t *ticket);
int nsa_client_wait(nsa_client_t *c, uint32_t ticket, nsa_client_result_t *res);
/* With events / sync=false (ex may be NULL = plain). */
int nsa_client_forward_submit_ex(nsa_client_t *c, const nsa_client_fwd_t *a,
                                 const nsa_client_exec_t *ex, uint32_t *ticket);
int nsa_client_backward_submit_ex(nsa_client_t *c, const nsa_client_bwd_t *a,
                                  const nsa_client_exec_t *ex, uint32_t *ticket);

/* ---- generic values (flags, metrics, raw calls) ---- */

/* A decoded msgpack value (opaque). */
typedef struct nsa_client_value nsa_client_value_t;
void nsa_client_value_free(nsa_client_value_t *v);
/* JSON text of the value (malloc'd; free()). */
char *nsa_client_value_json(const nsa_client_value_t *v, int pretty);
/* Lookups by a dotted key path ("flags.NSA_SEL_VARLEN_V2.value"). 0 or -1. */
int nsa_client_value_get_int(const nsa_client_value_t *v, const char *path, int64_t *out);
int nsa_client_value_get_double(const nsa_client_value_t *v, const char *path, double *out);
/* Copies a string (or, for other values, their JSON text) into buf. */
int nsa_client_value_get_str(const nsa_client_value_t *v, const char *path, char *buf, size_t len);
/* Path components may also index arrays ("samples.0.value"); "" is the root.
 * Element count of the map/array at path, or -1. */
int nsa_client_value_len(const nsa_client_value_t *v, const char *path);
/* Key (as text) of the i-th entry of the map at path. 0 or -1. */
int nsa_client_value_key(const nsa_client_value_t *v, const char *path, int i, char *buf,
                         size_t len);

/* Raw call: params is a JSON-free list of string pairs packed as a map of
 * strings (enough for the control methods); *result may be NULL. */
int nsa_client_call(nsa_client_t *c, const char *method, const nsa_client_label_t *params,
                    int nparams, nsa_client_value_t **result);

/* flags.get result {epoch, flags, effective}. */
int nsa_client_flags_get(nsa_client_t *c, nsa_client_value_t **out);
/* flags.set: value as in the environment ("1", "off", "128"); percent < 0 =
 * no percentage rule; match = label rule (nmatch may be 0). */
int nsa_client_flags_set(nsa_client_t *c, const char *name, const char *value, double percent,
                         const nsa_client_label_t *match, int nmatch, uint64_t *epoch);
int nsa_client_flags_reset(nsa_client_t *c, const char *name, uint64_t *epoch);

/* metrics.get as a map (*out) or Prometheus text (*text, malloc'd). */
int nsa_client_metrics_get(nsa_client_t *c, nsa_client_value_t **out);
int nsa_client_metrics_prometheus(nsa_client_t *c, char **text);
/* metrics.subscribe; then nsa_client_next_notification. */
int nsa_client_subscribe(nsa_client_t *c, uint32_t interval_ms);
/* Waits up to timeout_ms (< 0 forever) for a notification; method copied
 * into method[32]. Returns 0, or -1 ("timeout" when none came). */
int nsa_client_next_notification(nsa_client_t *c, int timeout_ms, char method[32],
                                 nsa_client_value_t **params);

/* shutdown (admin): the daemon drains and exits 0. */
int nsa_client_shutdown(nsa_client_t *c);

#ifdef __cplusplus
}
#endif
#endif /* NSACLIENT_H */

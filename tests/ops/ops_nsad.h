/*
 * ops_nsad.h — running a real nsad for the ops process tests, and a small
 * synchronous msgpack-RPC client on the proto library (independent of
 * libnsaclient, so these tests exercise the wire contract of DESIGN.md §4).
 */
#ifndef NSAD_OPS_NSAD_H
#define NSAD_OPS_NSAD_H

#include <msgpack.h>
#include <stdint.h>
#include <sys/types.h>

#include "nsa_proto.h"

typedef struct {
  pid_t pid;
  char dir[256];        /* private temp dir: socket, state, config, log */
  char sock[300];
  char state[300];
  char conf[300];
  char log[300];
} ops_nsad_t;

/* Path of the nsad binary ($NSAD_BIN from ctest), or NULL. */
const char *ops_nsad_bin(void);

/* Creates the temp dir and file names (no process yet). */
void ops_nsad_prepare(ops_nsad_t *d);
/* Starts nsad --backend cpu --socket d->sock --state-dir d->state
 * [--config d->conf if it exists] plus extra args (NULL-terminated), with
 * extra environment "K=V" entries (NULL-terminated, may be NULL); stderr to
 * d->log. Waits until the socket accepts. Returns 0, -1 on failure. */
int ops_nsad_start(ops_nsad_t *d, const char *const *args, const char *const *env);
/* Sends sig, waits (timeout_s) and returns the exit status as from waitpid,
 * or -1 on timeout (then the process is killed). */
int ops_nsad_signal_wait(ops_nsad_t *d, int sig, double timeout_s);
/* Stops (SIGTERM) if running and removes the temp dir. */
void ops_nsad_cleanup(ops_nsad_t *d);
/* Log contents so far (malloc'd). */
char *ops_nsad_log(ops_nsad_t *d);

/* ---- client ---- */
typedef struct {
  int fd;
  uint32_t next_id;
  nsa_proto_decoder_t *dec;
  nsa_proto_writer_t w;
  nsa_proto_msg_t msg;  /* last response/notification (valid until next call) */
  char err_code[32];
  char err_msg[256];
  uint64_t session;
  uint64_t hello_epoch;
} ops_client_t;

int ops_client_connect(ops_client_t *c, const char *sock);
void ops_client_close(ops_client_t *c);
/* Sends a typed request and waits for its response (notifications that come
 * first are skipped). Returns NSA_E_OK with c->msg.result, an error code with
 * c->err_code / c->err_msg, or -1 on I/O failure. */
int ops_call(ops_client_t *c, nsa_request_t *req);
/* hello with labels "k=v" (NULL-terminated); fills session, hello_epoch. */
int ops_hello(ops_client_t *c, const char *client, const char *const *labels);
/* Raw request: method and a packed params map produced by fn. */
int ops_call_raw(ops_client_t *c, const char *method, void (*fn)(msgpack_packer *, void *),
                 void *ud);
/* Next notification within timeout_ms: 1 got one (c->msg), 0 timeout, -1 error. */
int ops_next_notification(ops_client_t *c, int timeout_ms);

/* Helpers on c->msg.result. */
int64_t ops_res_int(ops_client_t *c, const char *key);
const msgpack_object *ops_res(ops_client_t *c, const char *key);

#endif

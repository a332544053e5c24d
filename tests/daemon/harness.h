/*
 * harness.h — drives a REAL nsad process over a real Unix socket in a temp
 * dir, for the daemon and client suites. NSAD_BIN / NSACTL_BIN come from
 * CMake as compile definitions.
 *
 * Every daemon started is also remembered so th_fini() (the suites' .fini)
 * kills it when an assertion ends a test early.
 */
#ifndef NSAD_TEST_HARNESS_H
#define NSAD_TEST_HARNESS_H

#include <stdint.h>
#include <sys/types.h>

#include "nsa_proto.h"
#include "nsaclient.h"

typedef struct {
  char dir[128];
  char sock[192];
  char log[192];
  pid_t pid;
  int wrapped; /* pid is NSAD_TEST_WRAPPER's tool, nsad its child */
} th_nsad_t;

/* Creates a temp dir and starts nsad on <dir>/nsad.sock with extra args
 * (NULL-terminated, may be NULL). Waits until it answers (10 s). 0 or -1. */
int th_start(th_nsad_t *d, const char *const *extra);
/* Same on an explicit socket path (dir must be set up by the caller or be
 * th_start's). Does not wait for readiness when wait_ready = 0. */
pid_t th_spawn(th_nsad_t *d, const char *sock, const char *const *extra, int wait_ready);
/* SIGTERM and wait: the exit status (0..255), 128+signal, or -1 on timeout
 * (then SIGKILLed). Removes the temp dir when rm_dir. */
int th_stop(th_nsad_t *d, int rm_dir);
/* waitpid with a timeout: exit status as th_stop, -1 on timeout. */
int th_wait_exit(pid_t pid, int timeout_ms);
void th_dump_log(const th_nsad_t *d);
void th_fini(void); /* kill leftovers */

nsa_client_t *th_client(const th_nsad_t *d, const char *name);
nsa_client_t *th_client_labels(const th_nsad_t *d, const char *name,
                               const nsa_client_label_t *labels, int nlabels);

/* ---- raw protocol ---- */
int th_raw_connect(const char *sock);
int th_raw_send(int fd, const void *buf, size_t len);
/* Sends [0, msgid, method, {}]. */
int th_raw_request(int fd, uint32_t msgid, const char *method);
/* Sends a hello with protocol 1. */
int th_raw_hello(int fd, uint32_t msgid);
/* Reads one response: 1 (msgid, code filled; code "" on success), 0 on EOF
 * (connection closed), -1 on timeout/error. */
int th_raw_response(int fd, nsa_proto_decoder_t *dec, int timeout_ms, uint32_t *msgid,
                    char *code, size_t codelen);
/* 1 when the peer closed the connection within timeout_ms. */
int th_raw_wait_closed(int fd, int timeout_ms);
/* Sends region.register {kind shm, name, size}. */
int th_raw_register_shm(int fd, uint32_t msgid, const char *name, uint64_t size);
/* A gauge family's first sample through metrics.get (e.g. "nsad_regions"),
 * -1 on error. */
double th_gauge(nsa_client_t *c, const char *family);
/* The value of one Prometheus series of metrics.get's text, e.g.
 * "nsad_requests_total{method=\"ping\",path=\"none\",code=\"ok\"}"; -1 when
 * absent or on error. */
double th_prom_value(nsa_client_t *c, const char *series);
/* How often process pid maps or holds open the POSIX shm object `name`
 * ("/nsa-..."): lines of /proc/pid/maps plus open descriptors naming
 * /dev/shm<name>; -1 when /proc cannot be read. */
int th_shm_holds(pid_t pid, const char *name);
/* Unlinks `name` when the test process exits (also after a failed assert). */
void th_shm_unlink_at_exit(const char *name);

/* ---- selection-attention problems in one shm region ---- */
typedef struct {
  int64_t B, S, Skv, G, h, H, Dk, Dv, n;
  int32_t bs;
  int ranges;
  nsa_client_shm_t *shm;
  size_t off_q, off_k, off_v, off_o, off_l, off_s, off_do, off_dq, off_dk, off_dv, total;
  float *q, *k, *v, *o, *lse, *dout, *dq, *dk, *dv;
  int32_t *sel;
  double *qd, *kd, *vd, *dod, *od, *ld, *dqd, *dkd, *dvd;
  nsa_client_fwd_t fwd;
  nsa_client_bwd_t bwd;
  uint64_t rng;
} th_prob_t;

/* Shapes in f32; selection block ids (ranges = 0) or spans (ranges = 1). */
int th_prob_init(th_prob_t *p, nsa_client_t *c, int64_t B, int64_t S, int64_t Skv, int64_t G,
                 int64_t h, int64_t D, int64_t n, int32_t bs, int ranges, uint64_t seed);
/* Fresh random inputs and selection; outputs poisoned with NaN. */
void th_prob_fill(th_prob_t *p);
/* Max relative error (vs max |ref|) of o and lse after a forward; +inf on NaN. */
double th_prob_check_fwd(th_prob_t *p);
/* Same for dq, dk, dv after a backward (o/lse must come from a forward). */
double th_prob_check_bwd(th_prob_t *p);
void th_prob_free(th_prob_t *p, nsa_client_t *c);

#endif

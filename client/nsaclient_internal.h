/* nsaclient_internal.h — state shared by nsaclient.c (connection, replies)
 * and nsaclient_ops.c (regions, requests, values). Not installed. */
#ifndef NSACLIENT_INTERNAL_H
#define NSACLIENT_INTERNAL_H

#include <msgpack.h>

#include "nsa_proto.h"
#include "nsaclient.h"

/* A reply or notification read while waiting for something else. */
typedef struct nsac_stash {
  struct nsac_stash *next;
  int notification;
  uint32_t msgid;
  char method[32];
  char *err, *res; /* packed msgpack */
  size_t err_len, res_len;
} nsac_stash_t;

typedef struct {
  uint32_t msgid;
  int gen; /* connection generation it was sent on */
} nsac_out_t;

/* A registered region or event: the caller's id stays; the wire id changes
 * on reconnect (everything is registered again from these fields). */
typedef enum { NSAC_SHM = 0, NSAC_CUDA_IPC = 1, NSAC_EVENT = 2 } nsac_kind_t;
typedef struct {
  uint64_t id;      /* what the caller uses */
  uint64_t wire_id; /* what the current connection's daemon knows (0: lost) */
  nsac_kind_t kind;
  char name[NSA_PROTO_STR]; /* shm */
  uint64_t size;            /* shm, cuda_ipc */
  int device;               /* cuda_ipc, event */
  uint8_t handle[64];       /* cuda_ipc, event */
  uint64_t base;            /* cuda_ipc: device base address; event: the cudaEvent_t (cache keys) */
} nsac_region_t;

struct nsa_client {
  int fd;
  int gen;
  int connections;
  char path[108];
  char name[128];
  nsa_proto_label_t labels[NSA_PROTO_MAX_LABELS];
  int nlabels;
  int timeout_ms;
  int attempts;
  int spin_us; /* NSACLIENT_SPIN_US: busy-poll this long for a reply before sleeping */
  nsa_proto_decoder_t *dec;
  uint32_t next_msgid;
  nsac_stash_t *stash_head, *stash_tail;
  nsac_out_t *out;
  int nout, capout;
  nsac_region_t *regions;
  int nregions, capregions;
  nsa_client_shm_t **shms;
  int nshm, capshm;
  nsa_client_info_t info;
  uint32_t sub_interval_ms; /* metrics.subscribe to repeat after a reconnect; 0 = none */
  char err_code[32];
  char err_msg[512];
};

struct nsa_client_value {
  msgpack_unpacked up;
  char *bytes; /* unpacked strings point into these bytes */
};

typedef void (*nsac_pack_fn)(nsa_client_t *c, msgpack_packer *pk, const void *ctx);

int nsac_fail(nsa_client_t *c, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int nsac_submit(nsa_client_t *c, const char *method, nsac_pack_fn fn, const void *ctx,
                uint32_t *msgid);
int nsac_wait_reply(nsa_client_t *c, uint32_t msgid, char **res, size_t *res_len);
int nsac_call(nsa_client_t *c, const char *method, nsac_pack_fn fn, const void *ctx, char **res,
              size_t *res_len);
/* region.register / event.register of r on the current connection (no
 * reconnect); the daemon's id in *wire_id. */
int nsac_register_wire(nsa_client_t *c, const nsac_region_t *r, uint64_t *wire_id);
const char *nsac_pack_register(msgpack_packer *pk, const nsac_region_t *r);
/* Registers r (connecting if needed) and adds it to the table; *id is the
 * caller's id. */
int nsac_register_entry(nsa_client_t *c, const nsac_region_t *r, uint64_t *id);
/* Table entry of a caller id, or NULL. */
nsac_region_t *nsac_entry(nsa_client_t *c, uint64_t id);
/* 1 when the connection is (still) up; never reconnects. */
int nsac_connected(nsa_client_t *c);
int nsac_value_from_bytes(nsa_client_t *c, char *bytes, size_t len, nsa_client_value_t **out);

#endif

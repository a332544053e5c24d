/*
 * region.h — per-session registry of regions and events (DESIGN.md §4).
 *
 * One generic entry type serves every kind: `shm` regions (host memory, opened
 * here), `cuda_ipc` regions and IPC events (opened by the CUDA backend through
 * its region_open/event_open ops, which fill base/size/device/priv).
 *
 * Ids are unique across the whole daemon (one counter), and each session
 * looks ids up only in its own registry, so naming another session's id gives
 * not_found rather than somebody else's memory.
 *
 * Lifetime: refcounted, touched only on the loop thread once registered (the
 * backend opens an entry on libuv's thread pool, dispatch.c, and the loop
 * adds it to the session's registry afterwards). The registry holds
 * one reference; every queued/running job holds one per entry it uses. An
 * entry is closed (munmap / cudaIpcCloseMemHandle) when the last reference
 * goes, i.e. after the in-flight work that reads it has finished.
 */
#ifndef NSAD_REGION_H
#define NSAD_REGION_H

#include <stdint.h>
#include <sys/types.h>

#include "nsa_proto.h"

struct nsad_backend;

typedef enum {
  NSAD_ENTRY_SHM = 0,      /* host shared memory (POSIX shm object) */
  NSAD_ENTRY_CUDA_IPC = 1, /* device memory from a cudaIpcMemHandle_t */
  NSAD_ENTRY_EVENT = 2,    /* cudaEvent_t from a cudaIpcEventHandle_t */
} nsad_entry_kind_t;

typedef struct nsad_region {
  uint64_t id;
  nsad_entry_kind_t kind;
  int device;      /* CUDA device, -1 for host memory */
  void *base;      /* host pointer (shm), device pointer (cuda_ipc) or cudaEvent_t */
  uint64_t size;   /* bytes a tensor ref may reach: the size the client registered */
  uint64_t mapped; /* bytes actually mapped (shm), for the mapped-bytes gauge */
  int fd;          /* shm: kept open to re-check the object's size at dispatch */
  int guard;       /* shm: slot in the SIGBUS guard table, -1 if none */
  void *priv;      /* backend-private */
  int refs;        /* loop thread only */
  char name[NSA_PROTO_STR];
  struct nsad_region *next;
} nsad_region_t;

typedef struct {
  nsad_region_t *head;
  int count;
} nsad_registry_t;

void nsad_registry_init(nsad_registry_t *reg);
/* Drops the registry's reference of every entry (entries in use by jobs are
 * closed later, when those jobs complete). */
void nsad_registry_teardown(nsad_registry_t *reg, struct nsad_backend *b);

/* Takes ownership of r (refs becomes 1) and gives it a fresh daemon-wide id. */
void nsad_registry_add(nsad_registry_t *reg, nsad_region_t *r);
/* Entry of this session with this id and kind class (events vs regions), or NULL. */
nsad_region_t *nsad_registry_find(nsad_registry_t *reg, uint64_t id, int want_event);
/* Unlinks the entry and drops the registry's reference. 0, or -1 if absent. */
int nsad_registry_remove(nsad_registry_t *reg, struct nsad_backend *b, uint64_t id,
                         int want_event);

void nsad_region_ref(nsad_region_t *r);
/* Drops a reference; the last one closes the entry through the backend and frees it. */
void nsad_region_unref(nsad_region_t *r, struct nsad_backend *b);

/* Closes an entry that was opened but never added to a registry (its
 * session closed during the open) and frees it. */
void nsad_region_discard(nsad_region_t *r, struct nsad_backend *b);
/* Allocates a zeroed entry (fd = -1, device = -1). */
nsad_region_t *nsad_region_alloc(nsad_entry_kind_t kind);

/* `shm` regions, shared by every backend that can read host memory:
 * opens name read-write, refuses objects not owned by peer_uid (unless the
 * peer is root → permission_denied) or smaller than size (bad_request), maps
 * it. Fills r->base/size/mapped/fd/name. */
int nsad_shm_open(const char *name, uint64_t size, uid_t peer_uid, nsad_region_t *r,
                  nsa_proto_err_t *err);
void nsad_shm_close(nsad_region_t *r);
/* Re-checks that the object still has r->size bytes and was never truncated
 * under a running request (see the SIGBUS guard below). */
int nsad_shm_check(const nsad_region_t *r, nsa_proto_err_t *err);

/* SIGBUS guard. A client can shrink its shm object while a kernel reads it;
 * touching the lost pages raises SIGBUS, which would kill the daemon for
 * everyone. nsad_shm_guard_install() sets a process-wide SIGBUS handler: a
 * fault inside a registered shm mapping replaces the rest of that mapping
 * with anonymous zero pages (the access then completes harmlessly) and marks
 * the region poisoned; the request fails with out_of_bounds and the region
 * is refused from then on. Faults anywhere else still kill the process. */
int nsad_shm_guard_install(void);
/* 1 if a fault hit this region (any thread may have set it). */
int nsad_shm_poisoned(const nsad_region_t *r);

/* Gauges for metrics: entries and mapped bytes across all sessions. */
extern int64_t nsad_region_live_count;
extern int64_t nsad_region_live_bytes;

#endif

/* region.c — region/event registry and the shm region kind (see region.h). */
#include "region.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "log.h"

/* ---- SIGBUS guard table: read by the signal handler on any thread, written
 * by the threads that open (libuv's pool) and close (the loop, the CUDA
 * backend's closer) shm regions. A slot is published by storing `end` then `start`
 * (release) and retired by clearing `start` before the munmap; it is retired
 * only after every job using the region came back, so no fault can race. */
#define NSAD_GUARD_SLOTS 16384
static struct {
  _Atomic uintptr_t start, end;
  atomic_int poisoned;
} g_guard[NSAD_GUARD_SLOTS];
static int g_guard_on;
static uintptr_t g_page_mask = 4095; /* set at install: sysconf is not async-signal-safe */

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
  uintptr_t a = (uintptr_t)si->si_addr;
  for (int i = 0; i < NSAD_GUARD_SLOTS; i++) {
    uintptr_t st = atomic_load_explicit(&g_guard[i].start, memory_order_acquire);
    if (!st || a < st) continue;
    uintptr_t end = atomic_load_explicit(&g_guard[i].end, memory_order_relaxed);
    if (a >= end) continue;
    uintptr_t page = a & ~g_page_mask;
    /* mmap is a plain system call on Linux, safe in practice here. */
    if (mmap((void *)page, end - page, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == MAP_FAILED)
      break;
    atomic_store(&g_guard[i].poisoned, 1);
    return; /* the faulting access is retried and now hits a zero page */
  }
  signal(SIGBUS, SIG_DFL); /* not ours: die as usual */
  raise(SIGBUS);
}

int nsad_shm_guard_install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  long ps = sysconf(_SC_PAGESIZE);
  /* 64 KiB pages exist (arm64 servers): a 4 KiB-rounded MAP_FIXED address
   * would fail there and the fault would kill nsad after all. */
  if (ps > 0 && (ps & (ps - 1)) == 0) g_page_mask = (uintptr_t)ps - 1;
  if (sigaction(SIGBUS, &sa, NULL) != 0) return -1;
  g_guard_on = 1;
  return 0;
}

/* Registrations open on libuv's thread pool (dispatch.c), so two may add at
 * once: a slot is claimed by moving `end` from 0 with a compare-and-swap;
 * the handler ignores it until `start` is stored. guard_remove clears start
 * first, so a slot being removed (start 0, end set) is never claimed. */
static int guard_add(void *base, uint64_t len) {
  if (!g_guard_on) return -1;
  const uintptr_t end = (uintptr_t)base + (uintptr_t)len;
  for (int i = 0; i < NSAD_GUARD_SLOTS; i++) {
    uintptr_t zero = 0;
    if (atomic_load(&g_guard[i].start) ||
        !atomic_compare_exchange_strong(&g_guard[i].end, &zero, end))
      continue;
    atomic_store(&g_guard[i].poisoned, 0);
    atomic_store_explicit(&g_guard[i].start, (uintptr_t)base, memory_order_release);
    return i;
  }
  return -1;
}

static void guard_remove(int slot) {
  if (slot < 0) return;
  atomic_store(&g_guard[slot].start, 0);
  atomic_store(&g_guard[slot].end, 0);
}

int nsad_shm_poisoned(const nsad_region_t *r) {
  return r->guard >= 0 && atomic_load(&g_guard[r->guard].poisoned);
}

int64_t nsad_region_live_count = 0;
int64_t nsad_region_live_bytes = 0;
static uint64_t g_next_id = 1; /* loop thread only */

void nsad_registry_init(nsad_registry_t *reg) { memset(reg, 0, sizeof *reg); }

void nsad_registry_teardown(nsad_registry_t *reg, struct nsad_backend *b) {
  nsad_region_t *r = reg->head;
  while (r) {
    nsad_region_t *next = r->next;
    r->next = NULL;
    nsad_region_unref(r, b);
    r = next;
  }
  reg->head = NULL;
  reg->count = 0;
}

nsad_region_t *nsad_region_alloc(nsad_entry_kind_t kind) {
  nsad_region_t *r = calloc(1, sizeof *r);
  if (!r) return NULL;
  r->kind = kind;
  r->fd = -1;
  r->device = -1;
  r->guard = -1;
  return r;
}

void nsad_registry_add(nsad_registry_t *reg, nsad_region_t *r) {
  r->id = g_next_id++;
  r->refs = 1;
  r->next = reg->head;
  reg->head = r;
  reg->count++;
  nsad_region_live_count++;
  nsad_region_live_bytes += (int64_t)r->mapped;
}

static int is_event_kind(const nsad_region_t *r) { return r->kind == NSAD_ENTRY_EVENT; }

nsad_region_t *nsad_registry_find(nsad_registry_t *reg, uint64_t id, int want_event) {
  for (nsad_region_t *r = reg->head; r; r = r->next)
    if (r->id == id && is_event_kind(r) == !!want_event) return r;
  return NULL;
}

int nsad_registry_remove(nsad_registry_t *reg, struct nsad_backend *b, uint64_t id,
                         int want_event) {
  for (nsad_region_t **pp = &reg->head; *pp; pp = &(*pp)->next) {
    nsad_region_t *r = *pp;
    if (r->id == id && is_event_kind(r) == !!want_event) {
      *pp = r->next;
      r->next = NULL;
      reg->count--;
      nsad_region_unref(r, b);
      return 0;
    }
  }
  return -1;
}

void nsad_region_ref(nsad_region_t *r) { r->refs++; }

/* Closes an opened entry through the backend and frees it. */
static void entry_close(nsad_region_t *r, struct nsad_backend *b) {
  if (r->kind == NSAD_ENTRY_EVENT) {
    if (b && b->ops->event_close) b->ops->event_close(b, r);
  } else if (b && b->ops->region_close) {
    b->ops->region_close(b, r);
  } else if (r->kind == NSAD_ENTRY_SHM) {
    nsad_shm_close(r);
  }
  free(r);
}

void nsad_region_unref(nsad_region_t *r, struct nsad_backend *b) {
  if (--r->refs > 0) return;
  nsad_region_live_count--;
  nsad_region_live_bytes -= (int64_t)r->mapped;
  entry_close(r, b);
}

void nsad_region_discard(nsad_region_t *r, struct nsad_backend *b) { entry_close(r, b); }

/* A POSIX shm name: "/" then 1..250 chars without another "/". */
static int shm_name_ok(const char *name) {
  size_t n = strlen(name);
  if (n < 2 || n > 251 || name[0] != '/') return 0;
  return strchr(name + 1, '/') == NULL;
}

int nsad_shm_open(const char *name, uint64_t size, uid_t peer_uid, nsad_region_t *r,
                  nsa_proto_err_t *err) {
  if (!shm_name_ok(name))
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                             "key 'name' must be a shm object name like /nsa-123-0");
  if (size == 0) return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "key 'size' must be > 0");
  int fd = shm_open(name, O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0);
  if (fd < 0) {
    if (errno == ENOENT) return nsa_proto_err_set(err, NSA_E_NOT_FOUND, "no shm object %s", name);
    if (errno == EACCES)
      return nsa_proto_err_set(err, NSA_E_PERMISSION_DENIED, "shm object %s: %s", name,
                               strerror(errno));
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "shm object %s: %s", name, strerror(errno));
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "shm object %s is not a regular object",
                             name);
  }
  /* The daemon usually runs as root: without this check any client could map
   * any other user's shared memory by name. */
  if (peer_uid != 0 && st.st_uid != peer_uid) {
    close(fd);
    return nsa_proto_err_set(err, NSA_E_PERMISSION_DENIED,
                             "shm object %s is owned by uid %u, not by the caller (uid %u)", name,
                             (unsigned)st.st_uid, (unsigned)peer_uid);
  }
  if ((uint64_t)st.st_size < size) {
    close(fd);
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                             "shm object %s has %lld bytes, smaller than size %llu", name,
                             (long long)st.st_size, (unsigned long long)size);
  }
  if (size > (uint64_t)SIZE_MAX) {
    close(fd);
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "size too large");
  }
  void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    int e = errno;
    close(fd);
    return nsa_proto_err_set(err, e == ENOMEM ? NSA_E_BUSY : NSA_E_INTERNAL, "mmap %s: %s", name,
                             strerror(e));
  }
  /* An unguarded shm region lets its owner kill nsad (truncate the object
   * under a running request → SIGBUS for everyone): refuse rather than serve
   * one while the guard is on and its table is full. */
  int guard = guard_add(p, size);
  if (guard < 0 && g_guard_on) {
    munmap(p, (size_t)size);
    close(fd);
    nsad_warn("SIGBUS guard table full (%d shm regions): refusing %s", NSAD_GUARD_SLOTS, name);
    return nsa_proto_err_set(err, NSA_E_BUSY,
                             "nsad holds %d shm regions (the limit across all sessions); "
                             "unregister some",
                             NSAD_GUARD_SLOTS);
  }
  r->base = p;
  r->size = size;
  r->mapped = size;
  r->fd = fd;
  r->guard = guard;
  r->device = -1;
  snprintf(r->name, sizeof r->name, "%s", name);
  return 0;
}

void nsad_shm_close(nsad_region_t *r) {
  guard_remove(r->guard);
  r->guard = -1;
  if (r->base && r->mapped) munmap(r->base, (size_t)r->mapped);
  if (r->fd >= 0) close(r->fd);
  r->base = NULL;
  r->fd = -1;
}

int nsad_shm_check(const nsad_region_t *r, nsa_proto_err_t *err) {
  struct stat st;
  if (r->fd < 0) return 0;
  if (nsad_shm_poisoned(r))
    return nsa_proto_err_set(err, NSA_E_OUT_OF_BOUNDS,
                             "shm region %llu (%s) was truncated under a running request; "
                             "register the object again",
                             (unsigned long long)r->id, r->name);
  if (fstat(r->fd, &st) != 0 || (uint64_t)st.st_size < r->size)
    return nsa_proto_err_set(err, NSA_E_OUT_OF_BOUNDS,
                             "shm region %llu (%s) shrank below its registered size %llu",
                             (unsigned long long)r->id, r->name, (unsigned long long)r->size);
  return 0;
}

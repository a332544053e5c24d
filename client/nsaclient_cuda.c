/* nsaclient_cuda.c — device pointers and CUDA events for libnsaclient
 * (see nsaclient.h). The CUDA driver API is loaded at run time (dlopen of
 * libcuda.so.1), so libnsaclient needs no CUDA toolkit to build and works
 * without a GPU (these calls then fail with "unsupported"). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "nsaclient_internal.h"

/* The few driver API types and constants used (from cuda.h, stable ABI). */
typedef int cu_result_t;
typedef unsigned long long cu_deviceptr_t;
typedef struct {
  char reserved[64];
} cu_ipc_handle_t;
#define CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL 9

static struct {
  int ok;
  char why[160];
  cu_result_t (*init)(unsigned);
  cu_result_t (*mem_range)(cu_deviceptr_t *, size_t *, cu_deviceptr_t);
  cu_result_t (*ptr_attr)(void *, int, cu_deviceptr_t);
  cu_result_t (*ipc_mem)(cu_ipc_handle_t *, cu_deviceptr_t);
  cu_result_t (*ipc_event)(cu_ipc_handle_t *, void *);
  cu_result_t (*err_str)(cu_result_t, const char **);
} g_cu;
static pthread_once_t g_cu_once = PTHREAD_ONCE_INIT;

static void cu_load(void) {
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    snprintf(g_cu.why, sizeof g_cu.why, "no CUDA driver (libcuda.so.1): %s", dlerror());
    return;
  }
  *(void **)&g_cu.init = dlsym(lib, "cuInit");
  *(void **)&g_cu.mem_range = dlsym(lib, "cuMemGetAddressRange_v2");
  *(void **)&g_cu.ptr_attr = dlsym(lib, "cuPointerGetAttribute");
  *(void **)&g_cu.ipc_mem = dlsym(lib, "cuIpcGetMemHandle");
  *(void **)&g_cu.ipc_event = dlsym(lib, "cuIpcGetEventHandle");
  *(void **)&g_cu.err_str = dlsym(lib, "cuGetErrorString");
  if (!g_cu.init || !g_cu.mem_range || !g_cu.ptr_attr || !g_cu.ipc_mem || !g_cu.ipc_event) {
    snprintf(g_cu.why, sizeof g_cu.why, "libcuda.so.1 lacks the IPC entry points");
    return;
  }
  cu_result_t rc = g_cu.init(0);
  if (rc != 0) {
    snprintf(g_cu.why, sizeof g_cu.why, "cuInit failed (CUresult %d)", rc);
    return;
  }
  g_cu.ok = 1; /* the library stays loaded for the process's lifetime */
}

static int cu_ready(nsa_client_t *c) {
  pthread_once(&g_cu_once, cu_load);
  if (!g_cu.ok) return nsac_fail(c, "unsupported", "%s", g_cu.why);
  return 0;
}

static int cu_fail(nsa_client_t *c, const char *what, cu_result_t rc) {
  const char *s = NULL;
  if (g_cu.err_str) g_cu.err_str(rc, &s);
  return nsac_fail(c, "invalid_argument", "%s: %s (CUresult %d)", what, s ? s : "?", rc);
}

/* The cached cuda_ipc entry whose allocation contains p, or NULL. */
static nsac_region_t *find_alloc(nsa_client_t *c, uint64_t p) {
  for (int i = 0; i < c->nregions; i++) {
    nsac_region_t *r = &c->regions[i];
    if (r->kind == NSAC_CUDA_IPC && r->base && p >= r->base && p - r->base < r->size) return r;
  }
  return NULL;
}

int nsa_client_cuda_tensor(nsa_client_t *c, const void *dptr, nsa_client_dtype_t dtype, int ndim,
                           const int64_t *shape, nsa_client_tensor_t *out) {
  if (cu_ready(c)) return -1;
  uint64_t p = (uint64_t)(uintptr_t)dptr;
  nsac_region_t *r = find_alloc(c, p);
  if (!r) {
    cu_deviceptr_t base = 0;
    size_t size = 0;
    int ord = -1;
    cu_result_t rc = g_cu.mem_range(&base, &size, (cu_deviceptr_t)p);
    if (rc) return cu_fail(c, "cuMemGetAddressRange", rc);
    if ((rc = g_cu.ptr_attr(&ord, CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, (cu_deviceptr_t)p)))
      return cu_fail(c, "cuPointerGetAttribute(DEVICE_ORDINAL)", rc);
    cu_ipc_handle_t h;
    if ((rc = g_cu.ipc_mem(&h, base))) return cu_fail(c, "cuIpcGetMemHandle", rc);
    nsac_region_t e;
    memset(&e, 0, sizeof e);
    e.kind = NSAC_CUDA_IPC;
    e.device = ord;
    memcpy(e.handle, h.reserved, 64);
    e.size = size;
    e.base = base;
    uint64_t id;
    if (nsac_register_entry(c, &e, &id) != 0) return -1;
    r = nsac_entry(c, id);
  }
  nsa_client_tensor(out, r->id, p - r->base, dtype, ndim, shape);
  return 0;
}

int nsa_client_cuda_event(nsa_client_t *c, void *cuda_event, uint64_t *event) {
  for (int i = 0; i < c->nregions; i++)
    if (c->regions[i].kind == NSAC_EVENT && c->regions[i].base == (uint64_t)(uintptr_t)cuda_event) {
      *event = c->regions[i].id;
      return 0;
    }
  if (cu_ready(c)) return -1;
  cu_ipc_handle_t h;
  cu_result_t rc = g_cu.ipc_event(&h, cuda_event);
  if (rc) return cu_fail(c, "cuIpcGetEventHandle (create it with cudaEventInterprocess|cudaEventDisableTiming)", rc);
  nsac_region_t e;
  memset(&e, 0, sizeof e);
  e.kind = NSAC_EVENT;
  e.device = 0; /* the daemon opens event handles on the request's device */
  memcpy(e.handle, h.reserved, 64);
  e.base = (uint64_t)(uintptr_t)cuda_event;
  return nsac_register_entry(c, &e, event);
}

int nsa_client_cuda_forget(nsa_client_t *c, const void *p) {
  uint64_t v = (uint64_t)(uintptr_t)p;
  for (int i = 0; i < c->nregions; i++)
    if (c->regions[i].kind == NSAC_EVENT && c->regions[i].base == v)
      return nsa_client_event_unregister(c, c->regions[i].id);
  nsac_region_t *r = find_alloc(c, v);
  if (!r) return nsac_fail(c, "not_found", "no cached CUDA allocation or event at %p", p);
  return nsa_client_region_unregister(c, r->id);
}

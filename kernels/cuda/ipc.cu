// ipc.cu — CUDA IPC helpers for the daemon (DESIGN.md §4 "Regions").
//
// A client sends the cudaIpcMemHandle_t of an allocation's BASE; opening maps
// that whole allocation here. The real extent comes from the driver
// (cuMemGetAddressRange), so the daemon can check the client's claimed size and
// every tensor's reach against memory that really exists.
#include <cuda.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "cuda_internal.h"

static void ipc_msg(char *msg, size_t len, const char *fmt, ...) {
  if (!msg || !len) return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, len, fmt, ap);
  va_end(ap);
}

// The context's device id is its first field (ctx.cu); IPC needs only that.
static int ctx_device(nsa_cuda_ctx_t *ctx) { return *(const int *)ctx; }

extern "C" int nsa_cuda_ipc_open_mem(nsa_cuda_ctx_t *ctx, const void *handle64, void **dptr,
                                     size_t *extent, char *msg, size_t msglen) {
  *dptr = NULL;
  *extent = 0;
  cudaError_t e = cudaSetDevice(ctx_device(ctx));
  cudaIpcMemHandle_t h;
  memcpy(&h, handle64, sizeof(h));
  void *p = NULL;
  if (e == cudaSuccess) e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess);
  if (e != cudaSuccess) {
    cudaGetLastError();
    ipc_msg(msg, msglen, "cudaIpcOpenMemHandle: %s (%s)", cudaGetErrorName(e), cudaGetErrorString(e));
    return NSA_ERR_DEVICE;
  }
  CUdeviceptr base = 0;
  size_t size = 0;
  CUresult r = cuMemGetAddressRange(&base, &size, (CUdeviceptr)(uintptr_t)p);
  if (r != CUDA_SUCCESS) {
    const char *s = NULL;
    cuGetErrorName(r, &s);
    cudaIpcCloseMemHandle(p);
    ipc_msg(msg, msglen, "cuMemGetAddressRange: %s", s ? s : "error");
    return NSA_ERR_DEVICE;
  }
  // The handle names the allocation's base, so the mapping starts there; the
  // extent counts from the mapped pointer.
  *dptr = p;
  *extent = size - (size_t)((uintptr_t)p - (uintptr_t)base);
  return NSA_OK;
}

extern "C" int nsa_cuda_ipc_close_mem(nsa_cuda_ctx_t *ctx, void *dptr) {
  cudaSetDevice(ctx_device(ctx));
  cudaError_t e = cudaIpcCloseMemHandle(dptr);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return NSA_ERR_DEVICE;
  }
  return NSA_OK;
}

extern "C" int nsa_cuda_ipc_open_event(nsa_cuda_ctx_t *ctx, const void *handle64, void **event,
                                       char *msg, size_t msglen) {
  *event = NULL;
  cudaError_t e = cudaSetDevice(ctx_device(ctx));
  cudaIpcEventHandle_t h;
  memcpy(&h, handle64, sizeof(h));
  cudaEvent_t ev = NULL;
  if (e == cudaSuccess) e = cudaIpcOpenEventHandle(&ev, h);
  if (e != cudaSuccess) {
    cudaGetLastError();
    ipc_msg(msg, msglen, "cudaIpcOpenEventHandle: %s (%s)", cudaGetErrorName(e), cudaGetErrorString(e));
    return NSA_ERR_DEVICE;
  }
  *event = (void *)ev;
  return NSA_OK;
}

extern "C" void nsa_cuda_ipc_close_event(nsa_cuda_ctx_t *ctx, void *event) {
  cudaSetDevice(ctx_device(ctx));
  if (event) cudaEventDestroy((cudaEvent_t)event);
  cudaGetLastError();
}

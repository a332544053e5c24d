/*
 * nsa/sel_attn_cuda.h — CUDA backend of selection attention (kernels/cuda).
 *
 * Only built when nvcc is found (NSA_HAVE_CUDA). Every entry point is a plain
 * C function; tensor data pointers in nsa_fwd_args_t / nsa_bwd_args_t are
 * DEVICE pointers on the context's device. Work is enqueued on the context's
 * stream; nothing here touches libuv.
 *
 * One context per device worker thread: it owns the stream, the workspace
 * arena (grows to a high-water mark under ws_cap, then NSA_ERR_BUSY) and the
 * pinned host staging buffers the v1 planner needs.
 */
#ifndef NSA_SEL_ATTN_CUDA_H
#define NSA_SEL_ATTN_CUDA_H

#include "nsa/sel_attn.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nsa_cuda_ctx nsa_cuda_ctx_t;

/* Number of usable CUDA devices (0 when there is no driver or no GPU). */
int nsa_cuda_device_count(void);
/* Human-readable device name ("NVIDIA H100 80GB HBM3"); returns 0 on success. */
int nsa_cuda_device_name(int device, char *buf, size_t len);

int nsa_cuda_ctx_create(int device, size_t ws_cap, nsa_cuda_ctx_t **out, char *msg, size_t msglen);
void nsa_cuda_ctx_destroy(nsa_cuda_ctx_t *ctx);
size_t nsa_cuda_ctx_workspace_bytes(const nsa_cuda_ctx_t *ctx); /* current arena size */
/* The context's cudaStream_t (for CUDA graph capture of a sync=0 request and
 * for callers that order their own work after the context's). */
void *nsa_cuda_ctx_stream(nsa_cuda_ctx_t *ctx);

/* Options of one request. wait_event/done_event are cudaEvent_t (may be NULL).
 * sync = 1: the call returns after the work finished and info is complete.
 * sync = 0: the call returns once queued; done_event is recorded after the work. */
typedef struct {
  void *wait_event;
  void *done_event;
  int sync;
} nsa_cuda_exec_t;

int nsa_cuda_sel_fwd(nsa_cuda_ctx_t *ctx, const nsa_fwd_args_t *a, const nsa_path_flags_t *flags,
                     nsa_path_t force_path, const nsa_cuda_exec_t *ex, nsa_run_info_t *info,
                     char *msg, size_t msglen);
int nsa_cuda_sel_bwd(nsa_cuda_ctx_t *ctx, const nsa_bwd_args_t *a, const nsa_path_flags_t *flags,
                     nsa_path_t force_path, const nsa_cuda_exec_t *ex, nsa_run_info_t *info,
                     char *msg, size_t msglen);

/* v2 planner alone (for tests and benchmarks): builds the plan into device
 * arrays bound with nsa_plan_bind on the context's stream, no host sync.
 * plan's summary fields are filled only when sync_summary != 0. */
int nsa_cuda_plan_v2(nsa_cuda_ctx_t *ctx, const nsa_selection_t *sel, const nsa_dims_t *d,
                     nsa_plan_t *plan, int sync_summary, char *msg, size_t msglen);

/* ---- CUDA IPC (daemon side) ---- */

/* Opens a cudaIpcMemHandle_t (64 bytes) on ctx's device. *dptr is the mapped
 * base; *extent is the allocation's real size (cuMemGetAddressRange). */
int nsa_cuda_ipc_open_mem(nsa_cuda_ctx_t *ctx, const void *handle64, void **dptr, size_t *extent,
                          char *msg, size_t msglen);
int nsa_cuda_ipc_close_mem(nsa_cuda_ctx_t *ctx, void *dptr);
/* Opens a cudaIpcEventHandle_t (64 bytes); *event is a cudaEvent_t. */
int nsa_cuda_ipc_open_event(nsa_cuda_ctx_t *ctx, const void *handle64, void **event, char *msg,
                            size_t msglen);
void nsa_cuda_ipc_close_event(nsa_cuda_ctx_t *ctx, void *event);

#ifdef __cplusplus
}
#endif
#endif /* NSA_SEL_ATTN_CUDA_H */

/*
 * cuda_case.h — device mirrors of a tests/common selection case.
 *
 * Each host buffer of an nsa_tu_case_t (whole allocation, so gaps, padding
 * and storage order survive) is copied to a cudaMalloc'd twin; the device
 * views keep the host views' shapes and strides. Outputs are copied back into
 * the host buffers, so the tests compare through the same helpers as the CPU
 * suites.
 */
#ifndef NSA_TEST_CUDA_CASE_H
#define NSA_TEST_CUDA_CASE_H

#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

#include "nsa/sel_attn_cuda.h"
#include "sel_case.h"

typedef struct {
  void *q, *k, *v, *o, *lse, *sel;
  nsa_fwd_args_t fwd; /* device views */
} nsa_tc_dev_t;

static inline nsa_tensor_t nsa_tc_up(const nsa_tu_buf_t *b, void **d) {
  nsa_tensor_t t = b->t;
  *d = NULL;
  if (cudaMalloc(d, b->bytes ? b->bytes : 16) != cudaSuccess) return t;
  cudaMemcpy(*d, b->mem, b->bytes, cudaMemcpyHostToDevice);
  t.data = (char *)*d + ((char *)b->t.data - (char *)b->mem);
  return t;
}

static inline void nsa_tc_down(nsa_tu_buf_t *b, const void *d) {
  cudaMemcpy(b->mem, d, b->bytes, cudaMemcpyDeviceToHost);
}

/* Uploads every forward tensor (outputs as they are now: poison first). */
static inline int nsa_tc_dev_init(nsa_tc_dev_t *dv, const nsa_tu_case_t *c) {
  memset(dv, 0, sizeof(*dv));
  dv->fwd = c->fwd;
  dv->fwd.q = nsa_tc_up(&c->q, &dv->q);
  dv->fwd.k = nsa_tc_up(&c->k, &dv->k);
  dv->fwd.v = nsa_tc_up(&c->v, &dv->v);
  dv->fwd.o = nsa_tc_up(&c->o, &dv->o);
  dv->fwd.lse = nsa_tc_up(&c->lse, &dv->lse);
  dv->fwd.sel.t = nsa_tc_up(&c->sel, &dv->sel);
  return (dv->q && dv->k && dv->v && dv->o && dv->lse && dv->sel) ? 0 : -1;
}

/* Re-poisons the outputs on the host and uploads the poison. */
static inline void nsa_tc_poison(nsa_tc_dev_t *dv, nsa_tu_case_t *c) {
  nsa_tu_case_poison_outputs(c);
  cudaMemcpy(dv->o, c->o.mem, c->o.bytes, cudaMemcpyHostToDevice);
  cudaMemcpy(dv->lse, c->lse.mem, c->lse.bytes, cudaMemcpyHostToDevice);
}

/* Re-uploads the selection after a test edited c->sel_raw. */
static inline void nsa_tc_sync_sel(nsa_tc_dev_t *dv, nsa_tu_case_t *c) {
  nsa_tu_case_sync_sel(c);
  cudaMemcpy(dv->sel, c->sel.mem, c->sel.bytes, cudaMemcpyHostToDevice);
}

static inline void nsa_tc_fetch(nsa_tc_dev_t *dv, nsa_tu_case_t *c) {
  nsa_tc_down(&c->o, dv->o);
  nsa_tc_down(&c->lse, dv->lse);
}

static inline void nsa_tc_dev_free(nsa_tc_dev_t *dv) {
  cudaFree(dv->q);
  cudaFree(dv->k);
  cudaFree(dv->v);
  cudaFree(dv->o);
  cudaFree(dv->lse);
  cudaFree(dv->sel);
  memset(dv, 0, sizeof(*dv));
}

/* Case k (0..7) of the row-block tests (cuda_fwd/row_block_kernel,
 * cuda_bwd/row_block_dq), on top of the caller's base cfg: h = 16, Dk = Dv =
 * 128, bf16 for k < 4 else f16, B = 2, G = 2 (1 when k & 2), S = 150 + 13k
 * (not a multiple of the row block), Skv = S + 37 (k mod 3), block size 64
 * (32 when k mod 4 == 3), n = 8 or 16; odd k: `odd` | unused slots | empty
 * rows; k = 6: independent random ids over 2000 rows and 4100 keys (B = 1,
 * many ring laps); other even k: duplicates, unused slots, future entries;
 * k = 5: K/V stored [B, G, Skv, D]; k = 8: 300 rows over 20000 keys (B = 1,
 * 313 key tiles: more than one 256-tile round of the union's bitmap). */
static inline void nsa_tc_row_block_cfg(nsa_tu_case_cfg_t *cfg, int k, unsigned odd, uint64_t seed) {
  cfg->h = 16;
  cfg->Dk = cfg->Dv = 128;
  cfg->dtype = k < 4 ? NSA_BF16 : NSA_F16;
  cfg->B = 2;
  cfg->G = (k & 2) ? 1 : 2;
  cfg->S = 150 + 13 * k;
  cfg->Skv = cfg->S + 37 * (k % 3);
  cfg->block_size = (k % 4 == 3) ? 32 : 64;
  cfg->n = cfg->block_size == 32 ? 16 : (k & 4) ? 16 : 8;
  cfg->sel_flags = (k & 1)  ? odd | NSA_TU_SEL_UNUSED | NSA_TU_SEL_EMPTY_ROWS
                   : k == 6 ? 0
                            : NSA_TU_SEL_DUP | NSA_TU_SEL_UNUSED | NSA_TU_SEL_FUTURE;
  cfg->seed = seed;
  if (k == 5) cfg->kv_bgsd = 1;
  if (k == 6) {
    cfg->B = 1;
    cfg->S = 2000;
    cfg->Skv = 4100;
  }
  if (k == 8) { /* 313 key tiles (queries at the end of the keys): the row-block union's bitmap takes two rounds */
    cfg->B = 1;
    cfg->S = 300;
    cfg->Skv = 20000;
  }
}

/* Issues one request on the context's stream with `ex` (sync = 0); returns
 * its NSA status, message in msg. */
typedef int (*nsa_tc_issue_fn)(nsa_cuda_ctx_t *ctx, void *arg, nsa_cuda_exec_t *ex, char *msg, size_t msglen);

/* Captures the request `issue` queues on the context's stream into a CUDA
 * graph, replays the graph once and waits for it (graph capture is part of
 * the v2 contract: no host synchronization inside a sync = 0 request).
 * Returns 0, or -1 with the failed step in msg. */
static inline int nsa_tc_graph_replay(nsa_cuda_ctx_t *ctx, nsa_tc_issue_fn issue, void *arg, char *msg,
                                      size_t msglen) {
  cudaStream_t st = (cudaStream_t)nsa_cuda_ctx_stream(ctx);
  cudaGraph_t graph = NULL;
  cudaGraphExec_t exec = NULL;
  cudaError_t ce = cudaStreamBeginCapture(st, cudaStreamCaptureModeRelaxed);
  if (ce != cudaSuccess) {
    snprintf(msg, msglen, "begin capture: %s", cudaGetErrorString(ce));
    return -1;
  }
  nsa_cuda_exec_t ex0 = {.sync = 0};
  char rmsg[256] = "";
  const int rc = issue(ctx, arg, &ex0, rmsg, sizeof rmsg);
  ce = cudaStreamEndCapture(st, &graph);
  int out = -1;
  if (rc != NSA_OK) snprintf(msg, msglen, "captured request: rc %d: %s", rc, rmsg);
  else if (ce != cudaSuccess) snprintf(msg, msglen, "end capture: %s", cudaGetErrorString(ce));
  else if ((ce = cudaGraphInstantiate(&exec, graph, 0)) != cudaSuccess)
    snprintf(msg, msglen, "instantiate: %s", cudaGetErrorString(ce));
  else if ((ce = cudaGraphLaunch(exec, st)) != cudaSuccess || (ce = cudaStreamSynchronize(st)) != cudaSuccess)
    snprintf(msg, msglen, "replay: %s", cudaGetErrorString(ce));
  else out = 0;
  if (exec) cudaGraphExecDestroy(exec);
  if (graph) cudaGraphDestroy(graph);
  return out;
}

#define NSA_REQUIRE_GPU()                                                                  \
  do {                                                                                     \
    if (nsa_cuda_device_count() == 0)                                                      \
      cr_skip_test("no CUDA device visible: gpu suite skipped (run it on a GPU machine)"); \
  } while (0)

/* Case k (0..11) of the shared-tile group tests (cuda_fwd/ and
 * cuda_bwd/shared_tile_groups): on top of the caller's base cfg, bf16 for k
 * < 6 else f16, h / Dk / Dv from the caller, B = G = 2, S not a multiple of
 * the group size, Skv = S + 0 / 64 / 128, block size 64 (32 every fourth),
 * n = 8, selections copied across each query block (odd k: with UNUSED, so
 * some rows change a slot and groups of both kinds occur, and empty rows). */
static inline void nsa_tc_blockwise_cfg(nsa_tu_case_cfg_t *cfg, int k, int64_t h, int64_t Dk, int64_t Dv,
                                        uint64_t seed) {
  cfg->dtype = k < 6 ? NSA_BF16 : NSA_F16;
  cfg->h = h;
  cfg->Dk = Dk;
  cfg->Dv = Dv;
  cfg->B = 2;
  cfg->G = 2;
  cfg->S = 150 + 7 * k;
  cfg->Skv = cfg->S + 64 * (k % 3);
  cfg->block_size = (k % 4 == 3) ? 32 : 64;
  cfg->n = 8;
  cfg->sel_flags = NSA_TU_SEL_BLOCKWISE | ((k & 1) ? NSA_TU_SEL_UNUSED | NSA_TU_SEL_EMPTY_ROWS : 0);
  cfg->seed = seed;
}

/* Case k (0, 1) of the gate checks in the same tests: independent random
 * selections (h = 4, then 16; T = 2048, block 32, n = 4), where only groups
 * of the first query blocks qualify, < 1/8 of the rows, so the gate drops
 * every group. */
static inline void nsa_tc_random_gate_cfg(nsa_tu_case_cfg_t *cfg, int k, uint64_t seed) {
  cfg->B = 1;
  cfg->G = 2;
  cfg->h = k ? 16 : 4;
  cfg->Dk = cfg->Dv = 128;
  cfg->S = cfg->Skv = 2048;
  cfg->block_size = 32;
  cfg->n = 4;
  cfg->sel_flags = 0;
  cfg->seed = seed;
}

#endif

/* backend.c — backend selection (--backend auto|cpu|cuda). */
#include <stdio.h>
#include <string.h>

#include "backend.h"
#include "log.h"
#ifdef NSA_HAVE_CUDA
#include "nsa/sel_attn_cuda.h"
#endif

int nsad_backend_create(const nsad_config_t *cfg, nsad_backend_t *b, char *msg, size_t msglen) {
  memset(b, 0, sizeof *b);
  const nsad_backend_ops_t *ops = &nsad_backend_cpu_ops;
  int ngpu = 0;
  (void)ngpu;
#ifdef NSA_HAVE_CUDA
  ngpu = nsa_cuda_device_count();
#endif
  if (cfg->backend == NSAD_BACKEND_CUDA) {
#ifdef NSA_HAVE_CUDA
    if (ngpu <= 0) {
      snprintf(msg, msglen, "--backend cuda: no usable CUDA device (driver or GPU missing)");
      return -1;
    }
    ops = &nsad_backend_cuda_ops;
#else
    snprintf(msg, msglen, "--backend cuda: this nsad was built without CUDA support");
    return -1;
#endif
  } else if (cfg->backend == NSAD_BACKEND_AUTO) {
#ifdef NSA_HAVE_CUDA
    if (ngpu > 0) ops = &nsad_backend_cuda_ops;
#endif
#ifdef NSA_HAVE_CUDA
    if (ops == &nsad_backend_cpu_ops) nsad_info("backend auto: no usable GPU, using the cpu backend");
#else
    nsad_info("backend auto: built without the CUDA backend, using the cpu backend");
#endif
  }
  b->ops = ops;
  if (ops->init(b, cfg, msg, msglen) != 0) return -1;
  if (b->nqueues < 1) b->nqueues = 1;
  if (b->nworkers < b->nqueues) b->nworkers = b->nqueues;
  return 0;
}

void nsad_backend_destroy(nsad_backend_t *b) {
  if (b->ops && b->ops->teardown) b->ops->teardown(b);
  b->ops = NULL;
}

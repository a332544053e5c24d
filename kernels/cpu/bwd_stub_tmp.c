/* Temporary until varlen_bwd.c / packed_bwd.c land. */
#include "cpu_internal.h"
int nsa_cpu_varlen_bwd(const nsa_bwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                       char *msg, size_t msglen) {
  if (msg && msglen) snprintf(msg, msglen, "backward: not implemented yet");
  return NSA_ERR_UNSUPPORTED;
}
int nsa_cpu_packed_bwd(const nsa_bwd_args_t *a, const nsa_dims_t *d, const nsa_plan_t *plan,
                       size_t *workspace_bytes, char *msg, size_t msglen) {
  if (msg && msglen) snprintf(msg, msglen, "backward: not implemented yet");
  return NSA_ERR_UNSUPPORTED;
}

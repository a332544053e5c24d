/*
 * metrics.h — the daemon's telemetry registry (counters, gauges, fixed-bucket
 * histograms). Worker threads record with atomics on per-metric cells (no
 * global lock); the loop thread renders snapshots as a msgpack map
 * (metrics.get, metrics.subscribe) or Prometheus text exposition.
 * Names follow Prometheus conventions: nsad_ prefix, base units, _total.
 */
#ifndef NSAD_METRICS_H
#define NSAD_METRICS_H

#include <msgpack.h>
#include <stddef.h>
#include <stdint.h>

#include "nsa/sel_attn.h"
#include "nsa_proto.h"

typedef struct nsad_metrics nsad_metrics_t;

nsad_metrics_t *nsad_metrics_new(void);
void nsad_metrics_free(nsad_metrics_t *m);

/* One finished request (any method). path < 0 when no kernel path applies;
 * code NSA_E_OK on success. latency_s is receive → reply. A method outside
 * 0..NSA_M_COUNT-1 (e.g. NSA_M_COUNT for an unknown method name) is counted
 * as method="unknown", so unknown_method errors show up too. */
void nsad_metrics_request(nsad_metrics_t *m, nsa_method_t method, int path, nsa_proto_code_t code,
                          double latency_s);
/* A kernel run: device time by path, rows, row-length histogram from the plan. */
void nsad_metrics_kernel(nsad_metrics_t *m, int path, const nsa_run_info_t *info);
/* A shadow comparison between two paths. */
void nsad_metrics_shadow(nsad_metrics_t *m, int primary, int shadow, double max_abs,
                         double max_rel);

/* Gauges set by their owners. */
typedef enum {
  NSAD_G_SESSIONS = 0,
  NSAD_G_REGIONS,
  NSAD_G_MAPPED_BYTES,
  NSAD_G_WORKSPACE_BYTES,
  NSAD_G_QUEUE_DEPTH,
  NSAD_G_FLAGS_EPOCH,
  NSAD_G_COUNT
} nsad_gauge_t;
void nsad_metrics_gauge_set(nsad_metrics_t *m, nsad_gauge_t g, double v);
void nsad_metrics_gauge_add(nsad_metrics_t *m, nsad_gauge_t g, double dv);
/* Flag values exported as nsad_flag_value{flag="..."}. */
void nsad_metrics_flag_value(nsad_metrics_t *m, int flag_id, const char *name, double v);

/* Renders. */
void nsad_metrics_pack_map(nsad_metrics_t *m, msgpack_packer *pk);
/* Returns a malloc'd NUL-terminated Prometheus text; *len its length. */
char *nsad_metrics_prometheus(nsad_metrics_t *m, size_t *len);

/* ---- additions (ops helper) ---------------------------------------- */

/* Reads back a gauge (tests, nsactl-like status). */
double nsad_metrics_gauge_get(nsad_metrics_t *m, nsad_gauge_t g);
/* Sum of nsad_requests_total cells matching method (-1 any), path (-2 any,
 * -1 none, else nsa_path_t) and code (-1 any). */
uint64_t nsad_metrics_requests(nsad_metrics_t *m, int method, int path, int code);

/* ---- additions (hostpath helper): per-phase host timing of a request -------
 * One sel_attn request's path through nsad, as consecutive phases of one
 * CLOCK_MONOTONIC timeline (durations, seconds):
 *   decode    socket bytes read (on_read) -> request parsed (includes time the
 *             message sat in the session's input buffer under backpressure)
 *   submit    parsed -> job queued (tensor resolve/validation, flag snapshot)
 *   queue     queued -> a worker picked it up (wake-up of an idle worker, or
 *             the wait behind other jobs of that device)
 *   backend   the backend's fwd/bwd call (CUDA sync=false: host time to queue
 *             the work; sync=true: includes the device time)
 *   post      backend return -> completion posted (shadow run, if any)
 *   complete  posted -> the loop thread picked the completion up (uv_async)
 *   reply     loop picked up -> reply handed to the socket (uv_write)
 *   total     read -> reply handed to the socket (= the sum of the above)
 * Exported as the histogram nsad_request_phase_seconds{sync="0|1",phase=...}
 * (sync=false and sync=true requests apart: on CUDA their backend phase is
 * host queuing time vs queuing + device time). */
typedef enum {
  NSAD_PH_DECODE = 0,
  NSAD_PH_SUBMIT,
  NSAD_PH_QUEUE,
  NSAD_PH_BACKEND,
  NSAD_PH_POST,
  NSAD_PH_COMPLETE,
  NSAD_PH_REPLY,
  NSAD_PH_TOTAL,
  NSAD_PH_COUNT
} nsad_phase_t;
const char *nsad_phase_name(nsad_phase_t ph);
/* sync: the request's sync flag (0 = sync=false), exported as label sync. */
void nsad_metrics_phase(nsad_metrics_t *m, int sync, nsad_phase_t ph, double seconds);

/*
 * Map form (metrics.get default, metrics.subscribe notifications): one map
 *   { family_name: { "type": "counter"|"gauge"|"histogram", "help": str,
 *                    "samples": [ sample, ... ] }, ... }
 * counter/gauge sample: { "labels": {k: v}, "value": uint (counter) | double }
 * histogram sample:     { "labels": {k: v}, "le": [finite upper bounds...],
 *                         "counts": [cumulative counts, len(le)+1, last = +Inf],
 *                         "sum": double, "count": uint }
 * Names, labels and units are the same as in the Prometheus text.
 */

#endif

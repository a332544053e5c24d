/*
 * flags.h — the daemon's central flag store (DESIGN.md §3).
 *
 * Flags: NSA_SEL_VARLEN_V2 (bool, 1), NSA_SEL_VARLEN_MIN_L (int >= 0, 0),
 * NSA_USE_SEL_VARLEN (bool, 1), NSA_SEL_SHADOW_RATE (double 0..1, 0).
 * Precedence, low to high: default < config file / daemon environment <
 * runtime change (flags.set; persisted atomically in state_dir).
 * A runtime change may carry a rollout rule (percent of sessions, stable by a
 * hash of the session's labels, and/or a label match); sessions outside the
 * rule see the value from the lower layers.
 *
 * Thread safety: every function may be called from any thread; readers get a
 * consistent snapshot (one epoch) per call.
 */
#ifndef NSAD_FLAGS_H
#define NSAD_FLAGS_H

#include <msgpack.h>
#include <stdint.h>

#include "nsa/sel_attn.h"
#include "nsa_proto.h"

typedef enum {
  NSAD_FLAG_SEL_VARLEN_V2 = 0,
  NSAD_FLAG_SEL_VARLEN_MIN_L,
  NSAD_FLAG_USE_SEL_VARLEN,
  NSAD_FLAG_SEL_SHADOW_RATE,
  NSAD_FLAG_COUNT
} nsad_flag_id_t;

/* Effective values for one session at one epoch. */
typedef struct {
  uint64_t epoch;
  nsa_path_flags_t path; /* the three seed flags */
  double shadow_rate;
} nsad_flag_snapshot_t;

/* Who made a change (for the audit line). */
typedef struct {
  uint32_t uid;
  int32_t pid;
  const char *client;
} nsad_actor_t;

typedef struct nsad_flags nsad_flags_t;

/* state_dir may be NULL (runtime changes then live in memory only).
 * Loads persisted runtime changes from state_dir/flags.state if present. */
nsad_flags_t *nsad_flags_new(const char *state_dir, char *msg, size_t msglen);
void nsad_flags_free(nsad_flags_t *f);

/* Replaces the config layer: KEY=VALUE pairs from the config file and the
 * daemon's environment (environment wins over the file for the same key).
 * Unknown NSA_* keys are rejected with a message; non-flag keys are ignored.
 * Bumps the epoch when an effective value changes. */
int nsad_flags_set_config(nsad_flags_t *f, const char *const *keys, const char *const *values,
                          int n, char *msg, size_t msglen);

/* flags.set: validates name/value/rule (bad → NSA_E_BAD_REQUEST with what is
 * allowed), persists (write, fsync, rename, fsync dir) BEFORE returning,
 * bumps the epoch, writes an audit line to the log. */
int nsad_flags_set(nsad_flags_t *f, const nsa_req_flags_set_t *req, const nsad_actor_t *who,
                   uint64_t *epoch, nsa_proto_err_t *err);
/* flags.reset: drops the runtime layer of one flag. */
int nsad_flags_reset(nsad_flags_t *f, const char *name, const nsad_actor_t *who, uint64_t *epoch,
                     nsa_proto_err_t *err);

/* Effective flags for a session with these labels. */
void nsad_flags_snapshot(nsad_flags_t *f, const nsa_proto_label_t *labels, int nlabels,
                         nsad_flag_snapshot_t *out);
uint64_t nsad_flags_epoch(nsad_flags_t *f);

/* Packs the flags.get result map {epoch, flags, effective} for a session. */
void nsad_flags_pack_get(nsad_flags_t *f, const nsa_proto_label_t *labels, int nlabels,
                         msgpack_packer *pk);

#endif

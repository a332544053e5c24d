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

/* ---- additions (ops helper) ---------------------------------------- */

/* Flag id for a name, or -1; name of an id, or NULL. */
int nsad_flag_lookup(const char *name);
const char *nsad_flag_name(int id);
/* Parses a value as in the environment for flag `id` (bools 1/true/yes/on,
 * 0/false/no/off, case-insensitive; MIN_L 0..2147483647; rate 0..1). Returns
 * 0, or -1 with a message saying what is allowed. */
int nsad_flag_parse_value(int id, const char *text, double *out, char *msg, size_t msglen);
/* Canonical text of a value ("1", "128", "0.25"). */
void nsad_flag_format_value(int id, double v, char *buf, size_t len);

/* Rollout bucket 0..9999 of a session (hash of its labels sorted by key,
 * plus the flag name). A percent rule p admits buckets < round(p*100). */
uint32_t nsad_flags_rollout_bucket(const nsa_proto_label_t *labels, int nlabels, const char *flag);

/* Reads the config file (KEY=VALUE, # comments, optional quotes; may be NULL)
 * and then envp (NULL = environ; NSA_* variables, which win over the file) and
 * calls nsad_flags_set_config with the NSA_* pairs. Call at start and on
 * SIGHUP. A bad file/value changes nothing and returns -1 with msg.
 * An environment variable whose value equals the file's at the FIRST
 * successful call is taken to come from the file (systemd EnvironmentFile=
 * naming the same file) and yields to the file on later calls, so editing
 * the file + SIGHUP works under systemd. */
int nsad_flags_load_config(nsad_flags_t *f, const char *config_path, char *const *envp, char *msg,
                           size_t msglen);

/* Keeps nsad_flag_value{flag} and nsad_flags_epoch in `m` current (now and on
 * every change). m must outlive f, or be detached with NULL first. */
struct nsad_metrics;
void nsad_flags_attach_metrics(nsad_flags_t *f, struct nsad_metrics *m);

/* Audit sink: one complete line without '\n' per change, e.g.
 *   2026-11-27T03:20:18.123Z audit [nsad] flags.set uid=0 pid=42 client="nsactl"
 *   flag=NSA_SEL_VARLEN_V2 old=1(default) new=0(runtime) rule=percent=30 epoch=7
 * Default (fn NULL): written to stderr. Called with the writer lock held. */
typedef void (*nsad_flags_audit_fn)(void *ud, const char *line);
void nsad_flags_set_audit(nsad_flags_t *f, nsad_flags_audit_fn fn, void *ud);

#endif

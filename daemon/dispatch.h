/*
 * dispatch.h — request handling: validate a decoded request (nsa_proto),
 * answer control methods on the loop thread, resolve tensor references
 * against the session's regions and queue sel_attn jobs; build the replies of
 * finished jobs.
 */
#ifndef NSAD_DISPATCH_H
#define NSAD_DISPATCH_H

#include "jobq.h"
#include "nsa_proto.h"

struct nsad_session;
struct nsad_server;

void nsad_dispatch(struct nsad_session *s, const nsa_proto_msg_t *msg);
/* A finished job came back from a worker: reply (if the session is still
 * open), record metrics, release regions, free the job. */
void nsad_dispatch_job_done(struct nsad_server *srv, nsad_job_t *job);
/* Releases a job that never ran (cancelled). */
void nsad_dispatch_job_free(struct nsad_server *srv, nsad_job_t *job);

/* Admin check of DESIGN.md §3: root, the daemon's uid, or --admin-group. */
int nsad_is_admin(struct nsad_server *srv, uid_t uid, gid_t gid);

#endif

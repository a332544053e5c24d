/* dispatch.c — request handling on the loop thread (see dispatch.h). */
#include "dispatch.h"

#include <grp.h>
#include <inttypes.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "server.h"
#include "session.h"

static nsad_out_t *result_begin(uint32_t msgid) {
  nsad_out_t *o = nsad_out_new();
  if (o) nsa_proto_write_result_begin(&o->w, msgid);
  return o;
}

static void reply_nil(nsad_session_t *s, uint32_t msgid) {
  nsad_out_t *o = result_begin(msgid);
  if (!o) return;
  msgpack_pack_nil(&o->w.pk);
  nsad_session_send(s, o);
}

static void reply_uint(nsad_session_t *s, uint32_t msgid, const char *key, uint64_t v) {
  nsad_out_t *o = result_begin(msgid);
  if (!o) return;
  msgpack_pack_map(&o->w.pk, 1);
  nsa_proto_pack_kv_uint(&o->w.pk, key, v);
  nsad_session_send(s, o);
}

int nsad_is_admin(nsad_server_t *srv, uid_t uid, gid_t gid) {
  if (uid == 0 || uid == getuid()) return 1;
  const char *name = srv->cfg->admin_group;
  if (!name || !*name) return 0;
  struct group grb, *gr = NULL;
  char gbuf[16384];
  if (getgrnam_r(name, &grb, gbuf, sizeof gbuf, &gr) != 0 || !gr) return 0;
  gid_t admin = gr->gr_gid;
  if (gid == admin) return 1;
  /* Supplementary groups of the peer's user (SO_PEERCRED has only the primary). */
  struct passwd pwb, *pw = NULL;
  char pbuf[16384];
  if (getpwuid_r(uid, &pwb, pbuf, sizeof pbuf, &pw) != 0 || !pw) return 0;
  gid_t groups[512];
  int n = 512;
  if (getgrouplist(pw->pw_name, pw->pw_gid, groups, &n) < 0) n = 512;
  for (int i = 0; i < n; i++)
    if (groups[i] == admin) return 1;
  return 0;
}

/* ------------------------------------------------------ tensor resolving --- */

static int job_ref(nsad_job_t *job, nsad_region_t *r) {
  for (int i = 0; i < job->nrefs; i++)
    if (job->refs[i] == r) return 0;
  if (job->nrefs == NSAD_JOB_MAX_REFS) return -1;
  nsad_region_ref(r);
  job->refs[job->nrefs++] = r;
  return 0;
}

/* Maps a wire tensor ref to a pointer, checking that every element its
 * shape/strides can reach lies inside the region (overflow-safe). */
static int resolve(nsad_session_t *s, nsad_job_t *job, const char *name,
                   const nsa_proto_tensor_t *pt, nsa_tensor_t *out, nsa_proto_err_t *err) {
  nsad_region_t *r = nsad_registry_find(&s->reg, pt->region, 0);
  if (!r)
    return nsa_proto_err_set(err, NSA_E_NOT_FOUND, "tensor '%s': no region %" PRIu64
                             " in this session", name, pt->region);
  size_t es = nsa_dtype_size(pt->dtype);
  if (es == 0 || pt->offset % es)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                             "tensor '%s': offset %" PRIu64 " is not a multiple of the %s size",
                             name, pt->offset, nsa_dtype_name(pt->dtype));
  uint64_t ext = 0;
  if (nsa_proto_tensor_extent(pt, &ext) != 0)
    return nsa_proto_err_set(err, NSA_E_OUT_OF_BOUNDS,
                             "tensor '%s': its extent overflows 64 bits", name);
  if (pt->offset > r->size || ext > r->size - pt->offset)
    return nsa_proto_err_set(err, NSA_E_OUT_OF_BOUNDS,
                             "tensor '%s' needs bytes [%" PRIu64 ", %" PRIu64 "+%" PRIu64
                             ") of region %" PRIu64 ", which has %" PRIu64 " bytes",
                             name, pt->offset, pt->offset, ext, r->id, r->size);
  if (job->nrefs > 0 && job->refs[0]->device != r->device)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST,
                             "tensor '%s' is on device %d, the other tensors on %d", name,
                             r->device, job->refs[0]->device);
  if (job_ref(job, r) != 0)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "too many regions in one request");
  memset(out, 0, sizeof *out);
  out->data = (char *)r->base + pt->offset;
  out->dtype = pt->dtype;
  out->ndim = pt->ndim;
  for (int i = 0; i < pt->ndim && i < NSA_MAX_DIMS; i++) {
    out->shape[i] = pt->shape[i];
    out->stride[i] = pt->strides[i];
  }
  return 0;
}

static int resolve_event(nsad_session_t *s, nsad_job_t *job, uint64_t id, void **out,
                         nsa_proto_err_t *err) {
  nsad_region_t *ev = nsad_registry_find(&s->reg, id, 1);
  if (!ev)
    return nsa_proto_err_set(err, NSA_E_NOT_FOUND, "no event %" PRIu64 " in this session", id);
  if (job_ref(job, ev) != 0)
    return nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "too many regions in one request");
  *out = ev->base;
  return 0;
}

static int resolve_sel(nsad_session_t *s, nsad_job_t *job, const nsa_proto_sel_t *ps,
                       nsa_selection_t *sel, nsa_proto_err_t *err) {
  sel->kind = ps->kind;
  sel->block_size = ps->block_size;
  return resolve(s, job, ps->kind == NSA_SEL_RANGES ? "sel.ranges" : "sel.indices", &ps->t,
                 &sel->t, err);
}

void nsad_dispatch_job_free(nsad_server_t *srv, nsad_job_t *job) {
  for (int i = 0; i < job->nrefs; i++) nsad_region_unref(job->refs[i], &srv->backend);
  free(job);
}

/* Builds and queues a sel_attn.forward/backward job. */
static int submit_sel(nsad_session_t *s, const nsa_request_t *req, double t0, double t_parsed,
                      nsa_proto_err_t *err) {
  nsad_server_t *srv = s->srv;
  const nsa_req_sel_attn_t *ra = &req->u.sel_attn;
  nsad_job_t *job = calloc(1, sizeof *job);
  if (!job) return nsa_proto_err_set(err, NSA_E_INTERNAL, "out of memory");
  job->session = s;
  job->msgid = req->msgid;
  job->t_recv = t0;
  /* A message decoded from an earlier read (kept in the input buffer by
   * backpressure) is timed from that read. */
  job->t_read = s->t_read > 0 && s->t_read <= t0 ? s->t_read : t0;
  job->t_parsed = t_parsed;
  job->kind = req->method == NSA_M_SEL_FORWARD ? NSAD_JOB_FWD : NSAD_JOB_BWD;
  char msg[256] = "";
  nsa_dims_t dims;
  int rc;
  float scale = ra->has_scale ? (float)ra->scale : 0.0f;
  if (job->kind == NSAD_JOB_FWD) {
    nsa_fwd_args_t *a = &job->fwd;
    if ((rc = resolve(s, job, "q", &ra->q, &a->q, err)) || (rc = resolve(s, job, "k", &ra->k, &a->k, err)) ||
        (rc = resolve(s, job, "v", &ra->v, &a->v, err)) || (rc = resolve(s, job, "o", &ra->o, &a->o, err)) ||
        (ra->has_lse && (rc = resolve(s, job, "lse", &ra->lse, &a->lse, err))) ||
        (rc = resolve_sel(s, job, &ra->sel, &a->sel, err)))
      goto fail;
    a->scale = scale;
    if (nsa_fwd_check(a, &dims, msg, sizeof msg) != NSA_OK) {
      nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "%s", msg);
      goto fail;
    }
  } else {
    nsa_bwd_args_t *a = &job->bwd;
    if ((rc = resolve(s, job, "q", &ra->q, &a->q, err)) || (rc = resolve(s, job, "k", &ra->k, &a->k, err)) ||
        (rc = resolve(s, job, "v", &ra->v, &a->v, err)) || (rc = resolve(s, job, "o", &ra->o, &a->o, err)) ||
        (rc = resolve(s, job, "lse", &ra->lse, &a->lse, err)) ||
        (rc = resolve(s, job, "do", &ra->dout, &a->dout, err)) ||
        (rc = resolve(s, job, "dq", &ra->dq, &a->dq, err)) || (rc = resolve(s, job, "dk", &ra->dk, &a->dk, err)) ||
        (rc = resolve(s, job, "dv", &ra->dv, &a->dv, err)) ||
        (rc = resolve_sel(s, job, &ra->sel, &a->sel, err)))
      goto fail;
    a->scale = scale;
    if (nsa_bwd_check(a, &dims, msg, sizeof msg) != NSA_OK) {
      nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "%s", msg);
      goto fail;
    }
  }
  if ((ra->has_wait_event && resolve_event(s, job, ra->wait_event, &job->ex.wait_event, err)) ||
      (ra->has_done_event && resolve_event(s, job, ra->done_event, &job->ex.done_event, err)))
    goto fail;
  job->ex.sync = ra->sync;
  if (srv->backend.ops->region_check)
    for (int i = 0; i < job->nrefs; i++)
      if (job->refs[i]->kind != NSAD_ENTRY_EVENT &&
          srv->backend.ops->region_check(&srv->backend, job->refs[i], err))
        goto fail;
  /* One consistent flag snapshot for the whole request, taken now. */
  nsad_flags_snapshot(srv->flags, s->labels, s->nlabels, &job->flags);
  const nsad_region_t *qr = job->refs[0];
  int queue = 0;
  if (srv->backend.ops->queue_for)
    queue = srv->backend.ops->queue_for(&srv->backend, qr);
  else if (qr->device >= 0)
    queue = qr->device % srv->backend.nqueues;
  if (queue < 0 || queue >= srv->jq.nqueues) queue = 0;
  job->queue = queue;
  job->lane = &s->lanes[queue];
  nsad_session_job_queued(s);
  job->t_queued = nsad_now(); /* before the push: a worker may take it at once */
  nsad_jobq_push(&srv->jq, job);
  return 0;
fail:
  nsad_dispatch_job_free(srv, job);
  return -1;
}

/* Records a finished job's phases (metrics.h nsad_phase_t) and logs them at
 * debug level, one line per request. */
static void job_phases(nsad_server_t *srv, const nsad_job_t *job, nsa_proto_code_t code) {
  /* The timeline in order; phase i runs from one stamp to the next, except
   * that picked -> call0 (run_job's set-up, nanoseconds) counts as queue. */
  double ph[NSAD_PH_COUNT];
  ph[NSAD_PH_DECODE] = job->t_parsed - job->t_read;
  ph[NSAD_PH_SUBMIT] = job->t_queued - job->t_parsed;
  ph[NSAD_PH_QUEUE] = job->t_call0 - job->t_queued;
  ph[NSAD_PH_BACKEND] = job->t_call1 - job->t_call0;
  ph[NSAD_PH_POST] = job->t_posted - job->t_call1;
  ph[NSAD_PH_COMPLETE] = job->t_loop - job->t_posted;
  ph[NSAD_PH_REPLY] = job->t_reply - job->t_loop;
  ph[NSAD_PH_TOTAL] = job->t_reply - job->t_read;
  if (srv->metrics)
    for (int i = 0; i < NSAD_PH_COUNT; i++)
      nsad_metrics_phase(srv->metrics, job->ex.sync, (nsad_phase_t)i, ph[i]);
  nsad_session_t *s = job->session;
  nsa_method_t method = job->kind == NSAD_JOB_FWD ? NSA_M_SEL_FORWARD : NSA_M_SEL_BACKWARD;
  nsad_debug("session %llu: msgid %u %s: %s path=%s rows=%lld max_len=%d device_us=%.1f sync=%d "
             "phases_us decode=%.1f submit=%.1f queue=%.1f backend=%.1f post=%.1f complete=%.1f "
             "reply=%.1f total=%.1f read_at_us=%.1f%s%s",
             (unsigned long long)s->id, job->msgid, nsa_method_name(method),
             nsa_proto_code_name(code), nsa_path_name(job->info.path), (long long)job->info.rows,
             (int)job->info.max_len, job->info.device_us, job->ex.sync, ph[0] * 1e6, ph[1] * 1e6,
             ph[2] * 1e6, ph[3] * 1e6, ph[4] * 1e6, ph[5] * 1e6, ph[6] * 1e6, ph[7] * 1e6,
             job->t_read * 1e6, code ? " : " : "", code ? job->msg : "");
}

void nsad_dispatch_job_done(nsad_server_t *srv, nsad_job_t *job) {
  nsad_session_t *s = job->session;
  job->t_loop = nsad_now();
  nsa_method_t method = job->kind == NSAD_JOB_FWD ? NSA_M_SEL_FORWARD : NSA_M_SEL_BACKWARD;
  /* A shm object truncated while this job read it: whatever the kernel
   * computed came from zero pages (region.h, SIGBUS guard). */
  for (int i = 0; i < job->nrefs; i++)
    if (job->refs[i]->kind == NSAD_ENTRY_SHM && nsad_shm_poisoned(job->refs[i])) {
      job->status = NSA_ERR_OUT_OF_BOUNDS;
      snprintf(job->msg, sizeof job->msg,
               "shm region %llu (%.160s) was truncated by its owner during the request",
               (unsigned long long)job->refs[i]->id, job->refs[i]->name);
      break;
    }
  nsa_proto_code_t code = job->status == NSA_OK ? NSA_E_OK : nsa_proto_code_from_status(job->status);
  int path = job->info.path >= 0 && job->info.path < NSA_PATH_COUNT ? (int)job->info.path : -1;
  if (srv->metrics) {
    nsad_metrics_request(srv->metrics, method, path, code, nsad_now() - job->t_recv);
    if (code == NSA_E_OK) nsad_metrics_kernel(srv->metrics, path, &job->info);
    if (job->shadow_done)
      nsad_metrics_shadow(srv->metrics, path, (int)job->shadow.shadow_path, job->shadow.max_abs,
                          job->shadow.max_rel);
  }
  if (!s->closing) {
    if (code == NSA_E_OK) {
      nsad_out_t *o = result_begin(job->msgid);
      if (o) {
        msgpack_pack_map(&o->w.pk, 6);
        nsa_proto_pack_kv_str(&o->w.pk, "path", nsa_path_name(job->info.path));
        nsa_proto_pack_kv_int(&o->w.pk, "rows", job->info.rows);
        nsa_proto_pack_kv_int(&o->w.pk, "max_len", job->info.max_len);
        nsa_proto_pack_kv_double(&o->w.pk, "mean_len", job->info.mean_len);
        nsa_proto_pack_kv_uint(&o->w.pk, "flags_epoch", job->flags.epoch);
        nsa_proto_pack_kv_double(&o->w.pk, "device_us", job->info.device_us);
        nsad_session_send(s, o);
      }
    } else {
      if (!job->msg[0]) {
        if (code == NSA_E_INVALID_SELECTION)
          snprintf(job->msg, sizeof job->msg, "%" PRId64 " invalid selection entries",
                   job->info.invalid);
        else
          snprintf(job->msg, sizeof job->msg, "%s", nsa_status_code_name(job->status));
      }
      nsad_session_send_error(s, job->msgid, code, job->msg);
    }
  }
  job->t_reply = nsad_now();
  job_phases(srv, job, code);
  if (job->status == NSA_ERR_DEVICE_FATAL) {
    nsad_err("fatal device error: %s; shutting down so that nsad can be restarted", job->msg);
    nsad_server_begin_shutdown(srv, "fatal device error", 70);
  }
  nsad_dispatch_job_free(srv, job);
  nsad_session_job_finished(s);
}

/* ------------------------------------------------------------- methods --- */

static void do_hello(nsad_session_t *s, const nsa_request_t *req, nsa_proto_err_t *err) {
  nsad_server_t *srv = s->srv;
  const nsa_req_hello_t *h = &req->u.hello;
  if (s->hello_done) {
    nsa_proto_err_set(err, NSA_E_BAD_REQUEST, "hello was already done on this connection");
    return;
  }
  if (h->protocol != NSA_PROTO_VERSION) {
    nsa_proto_err_set(err, NSA_E_PROTOCOL_VERSION,
                      "client speaks protocol %lld, this nsad speaks protocol %d",
                      (long long)h->protocol, NSA_PROTO_VERSION);
    return;
  }
  s->hello_done = 1;
  nsad_session_hello_done(s);
  snprintf(s->client, sizeof s->client, "%s", h->client);
  s->pid = h->pid;
  s->nlabels = h->nlabels;
  memcpy(s->labels, h->labels, sizeof(s->labels[0]) * (size_t)h->nlabels);
  nsad_info("session %llu: hello from '%s' (pid %lld, peer uid %u pid %d, %d labels)",
            (unsigned long long)s->id, s->client, (long long)s->pid, (unsigned)s->uid,
            (int)s->peer_pid, s->nlabels);
  nsad_out_t *o = result_begin(req->msgid);
  if (!o) return;
  msgpack_packer *pk = &o->w.pk;
  msgpack_pack_map(pk, 6);
  nsa_proto_pack_kv_int(pk, "protocol", NSA_PROTO_VERSION);
  nsa_proto_pack_kv_str(pk, "server", "nsad " NSAD_VERSION);
  nsa_proto_pack_kv_str(pk, "backend", srv->backend.ops->name);
  nsa_proto_pack_str(pk, "devices");
  msgpack_pack_array(pk, (size_t)srv->backend.ndevices);
  for (int i = 0; i < srv->backend.ndevices; i++) nsa_proto_pack_str(pk, srv->backend.devices[i]);
  nsa_proto_pack_kv_uint(pk, "session", s->id);
  nsa_proto_pack_kv_uint(pk, "flags_epoch", nsad_flags_epoch(srv->flags));
  nsad_session_send(s, o);
}

/* ---- requests that run on libuv's thread pool ----
 * flags.set / flags.reset and region.register / event.register do work that
 * may block for long (a disk, pinning memory) off the loop, which keeps
 * serving every other session meanwhile. While one runs, its session is held
 * (nsad_session_hold): the session's later requests wait, so they see its
 * effect in the order they were sent. Each op struct starts with pool_op_t;
 * the reply goes out from the loop, in the after-work callback. */
typedef struct {
  uv_work_t work;
  nsad_session_t *s;
  uint32_t msgid;
  nsa_method_t method;
  double t0;
  int rc;
  nsa_proto_err_t err;
} pool_op_t;

/* Queues op (the first member of its struct) and holds the session: 0, or
 * -1 with err set (op stays the caller's to free). */
static int pool_submit(pool_op_t *op, nsad_session_t *s, const nsa_request_t *req, double t0,
                       uv_work_cb work, uv_after_work_cb done, nsa_proto_err_t *err) {
  op->s = s;
  op->msgid = req->msgid;
  op->method = req->method;
  op->t0 = t0;
  op->work.data = op;
  if (uv_queue_work(&s->srv->loop, &op->work, work, done) != 0)
    return nsa_proto_err_set(err, NSA_E_INTERNAL, "%s: cannot queue the request",
                             nsa_method_name(req->method)),
           -1;
  nsad_session_job_queued(s);
  nsad_session_hold(s);
  return 0;
}

/* The after-work callback's start: 1 when the op succeeded (a cancelled op
 * failed; a failure without a code is internal). */
static int pool_ok(pool_op_t *op, int status) {
  const char *what = nsa_method_name(op->method);
  if (status != 0 && op->rc == 0) {
    op->rc = -1;
    nsa_proto_err_set(&op->err, NSA_E_INTERNAL, "%s was cancelled", what);
  }
  if (op->rc != 0 && op->err.code == NSA_E_OK)
    nsa_proto_err_set(&op->err, NSA_E_INTERNAL, "%s failed", what);
  return op->rc == 0;
}

/* Its end, after the success reply: the error reply, metrics, then the
 * session resumes. Frees op. */
static void pool_end(pool_op_t *op) {
  nsad_session_t *s = op->s;
  nsad_server_t *srv = s->srv;
  if (op->rc != 0) {
    nsad_debug("session %llu: msgid %u: %s: %s", (unsigned long long)s->id, op->msgid,
               nsa_proto_code_name(op->err.code), op->err.message);
    nsad_session_send_error(s, op->msgid, op->err.code, op->err.message);
  }
  if (srv->metrics)
    nsad_metrics_request(srv->metrics, op->method, -1, op->rc == 0 ? NSA_E_OK : op->err.code,
                         nsad_now() - op->t0);
  free(op);
  nsad_session_unhold(s);       /* dispatches what this session sent meanwhile */
  nsad_session_job_finished(s); /* s may be gone after this */
}

/* region.register / event.register: the backend opens the entry on the pool
 * (the CUDA backend pins every page of a shm object with cudaHostRegister,
 * 2.4-2.9 s for 4 GiB on an H100 host, and maps device memory with
 * cudaIpcOpenMemHandle). The hold keeps one open per session in flight, so
 * the region limit below counts every entry. The backends' region_open /
 * event_open are thread-safe (backend.h). */
typedef struct {
  pool_op_t op;
  nsad_backend_t *backend;
  uid_t uid;
  nsa_req_region_register_t reg; /* region.register */
  nsa_req_event_register_t ev;   /* event.register */
  nsad_region_t *r;
} region_op_t;

static void region_work(uv_work_t *w) {
  region_op_t *op = w->data;
  nsad_backend_t *b = op->backend;
  op->op.rc = op->op.method == NSA_M_EVENT_REGISTER
                  ? b->ops->event_open(b, &op->ev, op->r, &op->op.err)
                  : b->ops->region_open(b, &op->reg, op->uid, op->r, &op->op.err);
}

static void region_done(uv_work_t *w, int status) {
  region_op_t *op = w->data;
  nsad_session_t *s = op->op.s;
  const char *what = op->op.method == NSA_M_EVENT_REGISTER ? "event" : "region";
  if (!pool_ok(&op->op, status)) {
    free(op->r);
  } else if (s->closing) {
    /* The client went away while the entry was being opened: its registry
     * is already torn down, so close the entry here. */
    nsad_region_discard(op->r, &s->srv->backend);
  } else {
    nsad_region_t *r = op->r;
    nsad_registry_add(&s->reg, r);
    nsad_debug("session %llu: %s %llu registered (%s, %llu bytes)", (unsigned long long)s->id,
               what, (unsigned long long)r->id, r->name, (unsigned long long)r->size);
    reply_uint(s, op->op.msgid, what, r->id);
    nsad_server_update_gauges(s->srv);
  }
  pool_end(&op->op);
}

/* 0: queued (replied and counted when done); else err is set. */
static int submit_region_register(nsad_session_t *s, const nsa_request_t *req, double t0,
                                  nsa_proto_err_t *err) {
  nsad_server_t *srv = s->srv;
  const int event = req->method == NSA_M_EVENT_REGISTER;
  if (s->reg.count >= srv->cfg->max_regions)
    return nsa_proto_err_set(err, NSA_E_BUSY,
                             "this session already holds %d regions/events (the limit); "
                             "unregister some",
                             s->reg.count),
           -1;
  region_op_t *op = calloc(1, sizeof *op);
  nsad_region_t *r = nsad_region_alloc(event ? NSAD_ENTRY_EVENT : NSAD_ENTRY_SHM);
  if (!op || !r) {
    free(op);
    free(r);
    return nsa_proto_err_set(err, NSA_E_INTERNAL, "out of memory"), -1;
  }
  op->backend = &srv->backend;
  op->uid = s->uid;
  if (event) op->ev = req->u.event_register;
  else op->reg = req->u.region_register;
  op->r = r;
  if (pool_submit(&op->op, s, req, t0, region_work, region_done, err) != 0) {
    free(op);
    free(r);
    return -1;
  }
  return 0;
}

static void do_unregister(nsad_session_t *s, const nsa_request_t *req, int event,
                          nsa_proto_err_t *err) {
  uint64_t id = event ? req->u.event : req->u.region;
  if (nsad_registry_remove(&s->reg, &s->srv->backend, id, event) != 0) {
    nsa_proto_err_set(err, NSA_E_NOT_FOUND, "no %s %llu in this session",
                      event ? "event" : "region", (unsigned long long)id);
    return;
  }
  reply_nil(s, req->msgid);
  nsad_server_update_gauges(s->srv);
}

static int require_admin(nsad_session_t *s, const char *what, nsa_proto_err_t *err) {
  if (nsad_is_admin(s->srv, s->uid, s->gid)) return 0;
  nsad_warn("session %llu: %s refused for uid %u (pid %d, client '%s'): not an admin",
            (unsigned long long)s->id, what, (unsigned)s->uid, (int)s->peer_pid, s->client);
  return nsa_proto_err_set(err, NSA_E_PERMISSION_DENIED,
                           "%s needs root, the daemon's uid or the admin group%s%s", what,
                           s->srv->cfg->admin_group ? " " : "",
                           s->srv->cfg->admin_group ? s->srv->cfg->admin_group : "");
}

static void do_flags_get(nsad_session_t *s, const nsa_request_t *req) {
  nsad_out_t *o = result_begin(req->msgid);
  if (!o) return;
  nsad_flags_pack_get(s->srv->flags, s->labels, s->nlabels, &o->w.pk);
  nsad_session_send(s, o);
}

/* flags.set / flags.reset on the pool: the change is persisted (write,
 * fsync, rename, fsync of the directory) before it is swapped in, and the
 * disk may take its time. The flag store is thread-safe (flags.c: writers
 * serialised, readers never wait on disk). */
typedef struct {
  pool_op_t op;
  nsad_flags_t *flags;
  nsa_req_flags_set_t set;     /* flags.set */
  char name[sizeof(((nsa_request_t *)0)->u.flag_name)]; /* flags.reset */
  char client[sizeof(((nsad_session_t *)0)->client)];
  nsad_actor_t who;
  uint64_t epoch;
} flags_op_t;

static void flags_work(uv_work_t *w) {
  flags_op_t *op = w->data;
  op->op.rc = op->op.method == NSA_M_FLAGS_SET
                  ? nsad_flags_set(op->flags, &op->set, &op->who, &op->epoch, &op->op.err)
                  : nsad_flags_reset(op->flags, op->name, &op->who, &op->epoch, &op->op.err);
}

static void flags_done(uv_work_t *w, int status) {
  flags_op_t *op = w->data;
  if (pool_ok(&op->op, status)) {
    reply_uint(op->op.s, op->op.msgid, "epoch", op->epoch);
    nsad_server_update_gauges(op->op.s->srv);
  }
  pool_end(&op->op);
}

/* 0: queued (replied and counted when done); else err is set. */
static int submit_flags_change(nsad_session_t *s, const nsa_request_t *req, double t0,
                               nsa_proto_err_t *err) {
  if (require_admin(s, nsa_method_name(req->method), err)) return -1;
  flags_op_t *op = calloc(1, sizeof *op);
  if (!op) return nsa_proto_err_set(err, NSA_E_INTERNAL, "out of memory"), -1;
  op->flags = s->srv->flags;
  if (req->method == NSA_M_FLAGS_SET) op->set = req->u.flags_set;
  else snprintf(op->name, sizeof op->name, "%s", req->u.flag_name);
  snprintf(op->client, sizeof op->client, "%s", s->client);
  op->who = (nsad_actor_t){.uid = (uint32_t)s->uid, .pid = (int32_t)s->peer_pid, .client = op->client};
  if (pool_submit(&op->op, s, req, t0, flags_work, flags_done, err) != 0) {
    free(op);
    return -1;
  }
  return 0;
}

static void do_metrics_get(nsad_session_t *s, const nsa_request_t *req, nsa_proto_err_t *err) {
  nsad_server_t *srv = s->srv;
  nsad_server_update_gauges(srv);
  nsad_out_t *o = result_begin(req->msgid);
  if (!o) return;
  msgpack_pack_map(&o->w.pk, 1);
  if (req->u.metrics_get.prometheus) {
    size_t len = 0;
    char *text = nsad_metrics_prometheus(srv->metrics, &len);
    nsa_proto_pack_str(&o->w.pk, "text");
    msgpack_pack_str(&o->w.pk, text ? len : 0);
    msgpack_pack_str_body(&o->w.pk, text ? text : "", text ? len : 0);
    free(text);
  } else {
    nsa_proto_pack_str(&o->w.pk, "metrics");
    nsad_metrics_pack_map(srv->metrics, &o->w.pk);
  }
  nsad_session_send(s, o);
}

void nsad_dispatch(nsad_session_t *s, const nsa_proto_msg_t *msg) {
  nsad_server_t *srv = s->srv;
  double t0 = nsad_now();
  /* The request union is ~15 KB: keep it off the stack; the loop thread is
   * the only caller, so one static buffer serves. */
  static nsa_request_t req;
  nsa_proto_err_t err;
  memset(&err, 0, sizeof err);
  int path = -1;
  nsa_method_t method = NSA_M_COUNT;
  if (s->over_limit) {
    char m[128];
    snprintf(m, sizeof m, "nsad serves at most %d connections at once; try again later",
             srv->cfg->max_sessions);
    nsad_session_send_error(s, msg->msgid, NSA_E_BUSY, m);
    nsad_session_close(s, 1, "over the session limit");
    return;
  }
  int parsed = nsa_proto_parse_request(msg, &req, &err);
  double t_parsed = nsad_now();
  if (parsed != 0) {
    int m = nsa_method_lookup(msg->method, msg->method_len);
    method = m >= 0 ? (nsa_method_t)m : NSA_M_COUNT;
    goto error;
  }
  method = req.method;
  if (!s->hello_done && method != NSA_M_HELLO) {
    nsa_proto_err_set(&err, NSA_E_BAD_REQUEST, "the first request must be hello (got %s)",
                      nsa_method_name(method));
    goto error;
  }
  switch (method) {
    case NSA_M_HELLO: do_hello(s, &req, &err); break;
    case NSA_M_PING: reply_nil(s, req.msgid); break;
    case NSA_M_REGION_REGISTER:
    case NSA_M_EVENT_REGISTER:
      if (submit_region_register(s, &req, t0, &err) == 0)
        return; /* replied and counted when done */
      break;
    case NSA_M_REGION_UNREGISTER: do_unregister(s, &req, 0, &err); break;
    case NSA_M_EVENT_UNREGISTER: do_unregister(s, &req, 1, &err); break;
    case NSA_M_SEL_FORWARD:
    case NSA_M_SEL_BACKWARD:
      if (submit_sel(s, &req, t0, t_parsed, &err) == 0) {
        nsad_server_update_gauges(srv);
        return; /* replied and counted when the job comes back */
      }
      break;
    case NSA_M_FLAGS_GET: do_flags_get(s, &req); break;
    case NSA_M_FLAGS_SET:
    case NSA_M_FLAGS_RESET:
      if (submit_flags_change(s, &req, t0, &err) == 0) return; /* replied and counted when done */
      break;
    case NSA_M_METRICS_GET: do_metrics_get(s, &req, &err); break;
    case NSA_M_METRICS_SUBSCRIBE:
      if (nsad_session_subscribe(s, req.u.metrics_subscribe.interval_ms) != 0)
        nsa_proto_err_set(&err, NSA_E_INTERNAL, "cannot start the subscription timer");
      else
        reply_nil(s, req.msgid);
      break;
    case NSA_M_SHUTDOWN:
      if (require_admin(s, "shutdown", &err)) break;
      nsad_info("shutdown requested by uid %u (pid %d, client '%s')", (unsigned)s->uid,
                (int)s->peer_pid, s->client);
      reply_nil(s, req.msgid);
      if (srv->metrics) nsad_metrics_request(srv->metrics, method, -1, NSA_E_OK, nsad_now() - t0);
      nsad_server_begin_shutdown(srv, "shutdown request", 0);
      return;
    default: nsa_proto_err_set(&err, NSA_E_UNKNOWN_METHOD, "unknown method"); break;
  }
  if (err.code != NSA_E_OK) goto error;
  if (srv->metrics) nsad_metrics_request(srv->metrics, method, path, NSA_E_OK, nsad_now() - t0);
  return;
error:
  nsad_debug("session %llu: msgid %u: %s: %s", (unsigned long long)s->id, msg->msgid,
             nsa_proto_code_name(err.code), err.message);
  nsad_session_send_error(s, msg->msgid, err.code, err.message);
  if (srv->metrics) /* NSA_M_COUNT: the method was unknown */
    nsad_metrics_request(srv->metrics, method, -1, err.code, nsad_now() - t0);
}

/* Device-mapper through libdevmapper's task API. Works without udev: udev sync is off, no cookies
 * are used, so libdevmapper creates and removes the /dev/mapper nodes itself (dm_task_update_nodes).
 * libdevmapper's log goes to a per-thread buffer so failures carry its message instead of stderr. */
#include "dm.h"

#include <errno.h>
#include <libdevmapper.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* libdevmapper's log levels (not in its public header). */
#define LOG_LEVEL_MASK 0x7f
#define LOG_LEVEL_ERR 3
#define LOG_LEVEL_WARN 4

static __thread char last_msg[512];
static __thread int last_errno;

static void log_cb(int level, const char *file, int line, int dm_errno_or_class, const char *f, ...)
    __attribute__((format(printf, 5, 6)));

static void log_cb(int level, const char *file, int line, int dm_errno_or_class, const char *f, ...)
{
    int lvl = level & LOG_LEVEL_MASK;
    if (lvl > LOG_LEVEL_WARN)
        return;
    va_list ap;
    va_start(ap, f);
    vsnprintf(last_msg, sizeof(last_msg), f, ap);
    va_end(ap);
    if (lvl <= LOG_LEVEL_ERR && dm_errno_or_class > 0)
        last_errno = dm_errno_or_class;
}

static void clear_log(void)
{
    last_msg[0] = '\0';
    last_errno = 0;
}

static int fail(struct dm_task *dmt, struct img_dm_err *e, int fallback_errno, const char *what)
{
    int err = dmt ? dm_task_get_errno(dmt) : 0;
    if (!err)
        err = last_errno ? last_errno : fallback_errno;
    e->err = err;
    if (last_msg[0])
        snprintf(e->message, sizeof(e->message), "%s", last_msg);
    else
        snprintf(e->message, sizeof(e->message), "%s: %s", what, strerror(err));
    if (dmt)
        dm_task_destroy(dmt);
    return -1;
}

int img_dm_init(void)
{
    dm_log_with_errno_init(log_cb);
    dm_udev_set_sync_support(0);
    return 0;
}

static struct dm_task *task(int type, const char *name, struct img_dm_err *e)
{
    clear_log();
    e->err = 0;
    e->message[0] = '\0';
    struct dm_task *dmt = dm_task_create(type);
    if (!dmt)
        return NULL;
    if (name && !dm_task_set_name(dmt, name)) {
        dm_task_destroy(dmt);
        return NULL;
    }
    return dmt;
}

int img_dm_message(const char *name, const char *msg, char *resp, size_t resp_len, struct img_dm_err *e)
{
    struct dm_task *dmt = task(DM_DEVICE_TARGET_MSG, name, e);
    if (!dmt)
        return fail(NULL, e, ENOMEM, "dm_task_create");
    if (!dm_task_set_sector(dmt, 0) || !dm_task_set_message(dmt, msg))
        return fail(dmt, e, EINVAL, "set message");
    if (!dm_task_run(dmt))
        return fail(dmt, e, EIO, "message");
    if (resp && resp_len) {
        const char *r = dm_task_get_message_response(dmt);
        snprintf(resp, resp_len, "%s", r ? r : "");
    }
    dm_task_destroy(dmt);
    return 0;
}

/* Create, load, resume as three ioctls (not libdevmapper's combined create) so a failure carries the
 * errno of the step that failed; a device that could not be loaded is removed again. */
int img_dm_create(const char *name, const char *uuid, uint64_t length, const char *target,
                  const char *params, int read_only, struct img_dm_err *e)
{
    struct dm_task *dmt = task(DM_DEVICE_CREATE, name, e);
    if (!dmt)
        return fail(NULL, e, ENOMEM, "dm_task_create");
    if ((uuid && !dm_task_set_uuid(dmt, uuid)) || !dm_task_set_add_node(dmt, DM_ADD_NODE_ON_CREATE))
        return fail(dmt, e, EINVAL, "prepare create");
    if (!dm_task_run(dmt)) {
        dm_task_update_nodes();
        return fail(dmt, e, EIO, "create");
    }
    dm_task_destroy(dmt);

    dmt = task(DM_DEVICE_RELOAD, name, e);
    if (!dmt || !dm_task_add_target(dmt, 0, length, target, params) ||
        (read_only && !dm_task_set_ro(dmt)) || !dm_task_run(dmt)) {
        struct img_dm_err ignored;
        fail(dmt, e, dmt ? EIO : ENOMEM, "reload");
        img_dm_remove(name, 0, &ignored);
        return -1;
    }
    dm_task_destroy(dmt);

    dmt = task(DM_DEVICE_RESUME, name, e);
    if (!dmt || !dm_task_set_add_node(dmt, DM_ADD_NODE_ON_CREATE) || !dm_task_run(dmt)) {
        struct img_dm_err ignored;
        fail(dmt, e, dmt ? EIO : ENOMEM, "resume");
        img_dm_remove(name, 0, &ignored);
        return -1;
    }
    dm_task_destroy(dmt);
    dm_task_update_nodes();
    return 0;
}

int img_dm_suspend(const char *name, struct img_dm_err *e)
{
    struct dm_task *dmt = task(DM_DEVICE_SUSPEND, name, e);
    if (!dmt)
        return fail(NULL, e, ENOMEM, "dm_task_create");
    if (!dm_task_run(dmt))
        return fail(dmt, e, EIO, "suspend");
    dm_task_destroy(dmt);
    return 0;
}

int img_dm_resume(const char *name, struct img_dm_err *e)
{
    struct dm_task *dmt = task(DM_DEVICE_RESUME, name, e);
    if (!dmt)
        return fail(NULL, e, ENOMEM, "dm_task_create");
    if (!dm_task_run(dmt)) {
        dm_task_update_nodes();
        return fail(dmt, e, EIO, "resume");
    }
    dm_task_destroy(dmt);
    dm_task_update_nodes();
    return 0;
}

int img_dm_remove(const char *name, int deferred, struct img_dm_err *e)
{
    struct dm_task *dmt = task(DM_DEVICE_REMOVE, name, e);
    if (!dmt)
        return fail(NULL, e, ENOMEM, "dm_task_create");
    if (deferred && !dm_task_deferred_remove(dmt))
        return fail(dmt, e, EINVAL, "deferred remove");
    if (!dm_task_run(dmt)) {
        dm_task_update_nodes();
        return fail(dmt, e, EIO, "remove");
    }
    dm_task_destroy(dmt);
    dm_task_update_nodes();
    return 0;
}

int img_dm_info(const char *name, struct img_dm_info *out, struct img_dm_err *e)
{
    struct dm_info info;
    memset(out, 0, sizeof(*out));
    struct dm_task *dmt = task(DM_DEVICE_INFO, name, e);
    if (!dmt)
        return fail(NULL, e, ENOMEM, "dm_task_create");
    if (!dm_task_run(dmt) || !dm_task_get_info(dmt, &info))
        return fail(dmt, e, EIO, "info");
    out->exists = info.exists;
    if (info.exists) {
        const char *uuid = dm_task_get_uuid(dmt);
        out->suspended = info.suspended;
        out->live_table = info.live_table;
        out->read_only = info.read_only;
        out->open_count = info.open_count;
        out->target_count = info.target_count;
        out->major = info.major;
        out->minor = info.minor;
        snprintf(out->uuid, sizeof(out->uuid), "%s", uuid ? uuid : "");
    }
    dm_task_destroy(dmt);
    return 0;
}

/* Runs STATUS or TABLE and hands the task (positioned on the first target) to the caller. */
static struct dm_task *first_target(const char *name, int status, char **type, uint64_t *length,
                                    char **params, struct img_dm_err *e)
{
    uint64_t start = 0;
    struct dm_task *dmt = task(status ? DM_DEVICE_STATUS : DM_DEVICE_TABLE, name, e);
    if (!dmt) {
        fail(NULL, e, ENOMEM, "dm_task_create");
        return NULL;
    }
    if (!dm_task_run(dmt)) {
        fail(dmt, e, EIO, status ? "status" : "table");
        return NULL;
    }
    struct dm_info info;
    if (!dm_task_get_info(dmt, &info) || !info.exists) {
        /* libdevmapper reports a missing device as success with exists == 0. */
        dm_task_destroy(dmt);
        e->err = ENXIO;
        snprintf(e->message, sizeof(e->message), "no such device-mapper device %s", name);
        return NULL;
    }
    *type = NULL;
    *params = NULL;
    *length = 0;
    dm_get_next_target(dmt, NULL, &start, length, type, params);
    if (!*type) {
        e->err = ENODATA;
        snprintf(e->message, sizeof(e->message), "%s has no live table", name);
        dm_task_destroy(dmt);
        return NULL;
    }
    return dmt;
}

int img_dm_first_target(const char *name, int status, char *target_type, size_t type_len,
                        uint64_t *length, char *params, size_t params_len, struct img_dm_err *e)
{
    char *type, *p;
    struct dm_task *dmt = first_target(name, status, &type, length, &p, e);
    if (!dmt)
        return -1;
    snprintf(target_type, type_len, "%s", type);
    snprintf(params, params_len, "%s", p ? p : "");
    dm_task_destroy(dmt);
    return 0;
}

int img_dm_pool_status(const char *name, struct img_dm_pool_status *out, struct img_dm_err *e)
{
    char *type, *params;
    struct dm_status_thin_pool *s = NULL;
    memset(out, 0, sizeof(*out));
    struct dm_task *dmt = first_target(name, 1, &type, &out->length, &params, e);
    if (!dmt)
        return -1;
    if (strcmp(type, "thin-pool") != 0) {
        snprintf(e->message, sizeof(e->message), "%s is a %s device, not a thin-pool", name, type);
        e->err = EINVAL;
        dm_task_destroy(dmt);
        return -1;
    }
    struct dm_pool *mem = dm_pool_create("img-pool-status", 1024);
    if (!mem)
        return fail(dmt, e, ENOMEM, "dm_pool_create");
    if (!dm_get_status_thin_pool(mem, params ? params : "", &s)) {
        dm_pool_destroy(mem);
        return fail(dmt, e, EINVAL, "parse thin-pool status");
    }
    out->transaction_id = s->transaction_id;
    out->used_metadata_blocks = s->used_metadata_blocks;
    out->total_metadata_blocks = s->total_metadata_blocks;
    out->used_data_blocks = s->used_data_blocks;
    out->total_data_blocks = s->total_data_blocks;
    out->held_metadata_root = s->held_metadata_root;
    out->read_only = s->read_only ? 1 : 0;
    out->fail = s->fail;
    out->error_if_no_space = s->error_if_no_space;
    out->out_of_data_space = s->out_of_data_space;
    out->needs_check = s->needs_check;
    out->error = s->error;
    dm_pool_destroy(mem);
    dm_task_destroy(dmt);
    return 0;
}

int img_dm_thin_status(const char *name, struct img_dm_thin_status *out, struct img_dm_err *e)
{
    char *type, *params;
    struct dm_status_thin *s = NULL;
    memset(out, 0, sizeof(*out));
    struct dm_task *dmt = first_target(name, 1, &type, &out->length, &params, e);
    if (!dmt)
        return -1;
    if (strcmp(type, "thin") != 0) {
        snprintf(e->message, sizeof(e->message), "%s is a %s device, not a thin", name, type);
        e->err = EINVAL;
        dm_task_destroy(dmt);
        return -1;
    }
    struct dm_pool *mem = dm_pool_create("img-thin-status", 256);
    if (!mem)
        return fail(dmt, e, ENOMEM, "dm_pool_create");
    if (!dm_get_status_thin(mem, params ? params : "", &s)) {
        dm_pool_destroy(mem);
        return fail(dmt, e, EINVAL, "parse thin status");
    }
    out->mapped_sectors = s->mapped_sectors;
    out->highest_mapped_sector = s->highest_mapped_sector;
    out->fail = s->fail;
    dm_pool_destroy(mem);
    dm_task_destroy(dmt);
    return 0;
}

/* Names, each NUL-terminated, packed into buf. *needed is the size the whole list takes; when it
 * exceeds buf_len the call fails with ENOSPC and the caller retries with a bigger buffer. */
int img_dm_list(char *buf, size_t buf_len, size_t *needed, struct img_dm_err *e)
{
    struct dm_task *dmt = task(DM_DEVICE_LIST, NULL, e);
    if (!dmt)
        return fail(NULL, e, ENOMEM, "dm_task_create");
    if (!dm_task_run(dmt))
        return fail(dmt, e, EIO, "list");
    struct dm_names *n = dm_task_get_names(dmt);
    size_t used = 0;
    if (n && n->dev) {
        for (;;) {
            size_t len = strlen(n->name) + 1;
            if (used + len <= buf_len)
                memcpy(buf + used, n->name, len);
            used += len;
            if (!n->next)
                break;
            n = (struct dm_names *)((char *)n + n->next);
        }
    }
    *needed = used;
    dm_task_destroy(dmt);
    if (used > buf_len) {
        e->err = ENOSPC;
        snprintf(e->message, sizeof(e->message), "device list needs %zu bytes", used);
        return -1;
    }
    return 0;
}

int img_dm_deps(const char *name, uint64_t *devs, uint32_t max, uint32_t *count, struct img_dm_err *e)
{
    struct dm_task *dmt = task(DM_DEVICE_DEPS, name, e);
    if (!dmt)
        return fail(NULL, e, ENOMEM, "dm_task_create");
    if (!dm_task_run(dmt))
        return fail(dmt, e, EIO, "deps");
    struct dm_deps *d = dm_task_get_deps(dmt);
    *count = d ? d->count : 0;
    for (uint32_t i = 0; d && i < d->count && i < max; i++)
        devs[i] = d->device[i];
    dm_task_destroy(dmt);
    return 0;
}

/* Creates (or fixes) the /dev/mapper node of an existing device. */
int img_dm_mknode(const char *name, struct img_dm_err *e)
{
    clear_log();
    e->err = 0;
    e->message[0] = '\0';
    if (!dm_mknodes(name))
        return fail(NULL, e, EIO, "mknodes");
    return 0;
}

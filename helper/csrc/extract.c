/* Streaming, confined OCI layer extraction. Policies and error codes: extract.h. */
#include "extract.h"

#include <archive.h>
#include <archive_entry.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <locale.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/xattr.h>
#include <unistd.h>

#define READ_BLOCK (1u << 20)
#define NBUF 4 /* read buffers in flight: libarchive parses one while the hasher thread digests others */
#define MAX_REMOVE_DEPTH 1024 /* levels of a tree removed by a whiteout or a replacement: fds and stack */
#define PATH_LIMIT_CAP (1u << 20) /* no limit configuration may make us allocate more per path */
#define NO_SGID ((gid_t)-1)
#define NO_UMASK ((mode_t)-1)
#define RESOLVE_FLAGS (RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)

/* ---------- the set of objects this layer wrote (its own whiteouts never remove them) ----------
 * Keyed by (parent directory inode, name), not by path string: a name written through a symlinked parent
 * and the same object reached by its real path are one key. A recycled inode can only belong to a
 * directory created during this layer, whose children are all this layer's anyway. */

struct wkey {
    uint64_t ino;
    size_t len;
    char name[];
};

struct wset {
    struct wkey **slot;
    size_t cap, n;
};

static uint64_t wkey_hash(uint64_t ino, const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull ^ (ino * 0x9E3779B97F4A7C15ull); /* FNV-1a over the name */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static int wkey_eq(const struct wkey *k, uint64_t ino, const char *s, size_t n)
{
    return k->ino == ino && k->len == n && memcmp(k->name, s, n) == 0;
}

static int wset_grow(struct wset *w)
{
    size_t ncap = w->cap ? w->cap * 2 : 4096;
    struct wkey **ns = calloc(ncap, sizeof(*ns));
    if (!ns)
        return -1;
    for (size_t i = 0; i < w->cap; i++) {
        struct wkey *k = w->slot[i];
        if (!k)
            continue;
        size_t j = wkey_hash(k->ino, k->name, k->len) & (ncap - 1);
        while (ns[j])
            j = (j + 1) & (ncap - 1);
        ns[j] = k;
    }
    free(w->slot);
    w->slot = ns;
    w->cap = ncap;
    return 0;
}

static int wset_has(const struct wset *w, uint64_t ino, const char *s)
{
    if (!w->cap)
        return 0;
    size_t n = strlen(s);
    size_t j = wkey_hash(ino, s, n) & (w->cap - 1);
    for (; w->slot[j]; j = (j + 1) & (w->cap - 1))
        if (wkey_eq(w->slot[j], ino, s, n))
            return 1;
    return 0;
}

static int wset_add(struct wset *w, uint64_t ino, const char *s)
{
    if ((w->n + 1) * 10 >= w->cap * 7 && wset_grow(w) < 0)
        return -1;
    size_t n = strlen(s);
    size_t j = wkey_hash(ino, s, n) & (w->cap - 1);
    for (; w->slot[j]; j = (j + 1) & (w->cap - 1))
        if (wkey_eq(w->slot[j], ino, s, n))
            return 0;
    struct wkey *k = malloc(sizeof(*k) + n);
    if (!k)
        return -1;
    k->ino = ino;
    k->len = n;
    memcpy(k->name, s, n);
    w->slot[j] = k;
    w->n++;
    return 1;
}

static void wset_free(struct wset *w)
{
    for (size_t i = 0; i < w->cap; i++)
        free(w->slot[i]);
    free(w->slot);
    w->slot = NULL;
    w->cap = w->n = 0;
}

/* ---------- SHA-256 on a second thread: hashing costs as much as the rest of the CPU work ---------- */

struct hasher {
    EVP_MD_CTX *md;
    unsigned char *buf[NBUF];
    size_t len[NBUF];
    uint64_t filled, hashed; /* blocks handed over / digested, in order; block i lives in buf[i % NBUF] */
    int threaded, stop;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

static void *hasher_main(void *arg)
{
    struct hasher *h = arg;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        while (h->hashed == h->filled && !h->stop)
            pthread_cond_wait(&h->cv, &h->mu);
        if (h->hashed == h->filled)
            break;
        size_t i = h->hashed % NBUF;
        pthread_mutex_unlock(&h->mu);
        EVP_DigestUpdate(h->md, h->buf[i], h->len[i]);
        pthread_mutex_lock(&h->mu);
        h->hashed++;
        pthread_cond_broadcast(&h->cv);
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

/* The buffer the next block goes into, once the block that used it before has been digested. */
static unsigned char *hasher_next_buf(struct hasher *h)
{
    if (h->threaded) {
        pthread_mutex_lock(&h->mu);
        while (h->hashed + NBUF <= h->filled)
            pthread_cond_wait(&h->cv, &h->mu);
        pthread_mutex_unlock(&h->mu);
    }
    return h->buf[h->filled % NBUF];
}

/* Hands over the block just read into hasher_next_buf(). The first block is hashed inline: small blobs
 * never start the thread. */
static void hasher_submit(struct hasher *h, size_t n)
{
    size_t i = h->filled % NBUF;
    h->len[i] = n;
    if (!h->threaded && h->filled > 0 && pthread_create(&h->thread, NULL, hasher_main, h) == 0)
        h->threaded = 1;
    if (!h->threaded) {
        EVP_DigestUpdate(h->md, h->buf[i], n);
        h->filled++;
        h->hashed++;
        return;
    }
    pthread_mutex_lock(&h->mu);
    h->filled++;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
}

/* Waits for the last block and stops the thread: after this, md holds the digest of every block. */
static void hasher_join(struct hasher *h)
{
    if (!h->threaded)
        return;
    pthread_mutex_lock(&h->mu);
    h->stop = 1;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
    pthread_join(h->thread, NULL);
    h->threaded = 0;
}

static int hasher_init(struct hasher *h)
{
    memset(h, 0, sizeof(*h));
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->cv, NULL);
    h->md = EVP_MD_CTX_new();
    if (!h->md || EVP_DigestInit_ex(h->md, EVP_sha256(), NULL) != 1)
        return -1;
    for (int i = 0; i < NBUF; i++)
        if (!(h->buf[i] = malloc(READ_BLOCK)))
            return -1;
    return 0;
}

static void hasher_free(struct hasher *h)
{
    hasher_join(h);
    for (int i = 0; i < NBUF; i++)
        free(h->buf[i]);
    EVP_MD_CTX_free(h->md);
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->cv);
}

/* ---------- extraction context ---------- */

struct dir_time {
    char *path;
    struct timespec ts[2];
};

struct inflater;

struct xctx {
    int root; /* our own O_RDONLY dirfd of the root */
    int src;
    uint64_t pos, end;
    int to_eof;
    int short_blob;
    int read_errno;
    struct hasher h;
    struct archive *a;
    struct img_limits lim;
    struct img_extract_stats *st;
    struct img_extract_error *err;
    img_progress_fn progress;
    void *progress_ctx;
    uint64_t progress_entries, progress_bytes, next_progress_entries, next_progress_bytes;
    uint64_t declared_bytes;
    int is_root;

    const char *cur; /* the current entry's name as archived, for errors */
    char *norm;      /* the current entry's normalized path */
    size_t norm_len;
    char *target; /* a hardlink target's normalized path */
    size_t target_len;

    /* parent dirfd cache: tar streams are grouped by directory */
    char *cache_path;
    size_t cache_len;
    int cache_valid;
    int cache_fd;
    gid_t cache_sgid; /* gid new files inherit from a setgid cached directory, or NO_SGID */
    uint64_t cache_ino;

    /* what a new file gets without chown/chmod: lets us skip them when they would change nothing */
    uid_t euid;
    gid_t egid, root_sgid, parent_sgid;
    uint64_t root_ino, parent_ino; /* parent_*: of the directory open_parent() returned last */
    uint64_t root_mnt; /* the root's mount id (statx), or 0 if unknown: removal never crosses a mount */
    dev_t root_dev;
    mode_t umask; /* NO_UMASK if unknown */

    struct wset layer;
    struct inflater *inf; /* compressed blobs: decompression runs on its own thread */
    /* bytes handed to the tar reader; while it reads a header (in_header) it may take at most
     * max_header_bytes plus two blocks from header_fed0 on: libarchive holds a header (pax records, a GNU
     * sparse map: one allocation per region) in memory before our limits can look at it */
    uint64_t tar_fed, header_fed0;
    int in_header, header_overrun;
    struct dir_time *dirs;
    size_t ndirs, capdirs;
    size_t *dir_slot; /* path -> 1 + index into dirs: a directory archived again updates its times */
    size_t dir_slot_cap;
    uint64_t index_bytes; /* memory held by layer, dirs and dir_slot, bounded by max_index_bytes */
};

static int fail(struct xctx *x, const char *code, int errnum, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail(struct xctx *x, const char *code, int errnum, const char *fmt, ...)
{
    struct img_extract_error *e = x->err;
    if (e->code[0])
        return -1; /* the first error is the one that matters */
    snprintf(e->code, sizeof(e->code), "%s", code);
    snprintf(e->entry, sizeof(e->entry), "%s", x->cur ? x->cur : "");
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(e->reason, sizeof(e->reason), fmt, ap);
    va_end(ap);
    if (errnum && n >= 0 && (size_t)n < sizeof(e->reason))
        snprintf(e->reason + n, sizeof(e->reason) - n, ": %s", strerror(errnum));
    e->err = errnum;
    return -1;
}

/* An errno from resolving or creating a path: the input's fault ("path") or the system's ("io"). */
static int fail_errno(struct xctx *x, int errnum, const char *what)
{
    switch (errnum) {
    case ELOOP:
    case ENOTDIR:
    case ENAMETOOLONG:
    case EXDEV:
    case EMLINK:
        return fail(x, "path", errnum, "%s", what);
    default:
        return fail(x, "io", errnum, "%s", what);
    }
}

/* Accounts n more bytes of the layer's own index (what this layer wrote, directories to re-time). */
static int index_charge(struct xctx *x, uint64_t n)
{
    x->index_bytes += n;
    if (x->index_bytes > x->lim.max_index_bytes)
        return fail(x, "limit", 0, "the layer's index exceeds max_index_bytes (%llu): too many long names",
                    (unsigned long long)x->lim.max_index_bytes);
    return 0;
}

/* wset_add, charged to the index budget. */
static int layer_add(struct xctx *x, uint64_t ino, const char *name)
{
    int r = wset_add(&x->layer, ino, name);
    if (r < 0)
        return fail(x, "io", ENOMEM, "recording a path");
    return r ? index_charge(x, sizeof(struct wkey) + strlen(name) + 2 * sizeof(void *)) : 0;
}

static int openat2_in_root(int root, const char *path, int flags)
{
    struct open_how how = {.flags = (uint64_t)(flags | O_CLOEXEC), .mode = 0, .resolve = RESOLVE_FLAGS};
    for (int tries = 0;; tries++) {
        long fd = syscall(SYS_openat2, root, path, &how, sizeof(how));
        if (fd >= 0 || errno != EAGAIN || tries >= 64)
            return (int)fd;
    }
}

/* ---------- reading the blob: pread on a byte range, hashing every byte handed over ---------- */

#define HEADER_SLACK (2u << 20) /* read-ahead: a header may straddle blocks handed before and after it */

/* Called by the tar reader's read callbacks before handing it more bytes: 0, or -1 when the header
 * being read has had more than its share (then the callback fails the read). */
static int header_budget_left(struct xctx *x, struct archive *a)
{
    if (x->in_header && x->tar_fed - x->header_fed0 > x->lim.max_header_bytes + HEADER_SLACK) {
        x->header_overrun = 1;
        archive_set_error(a, EFBIG, "header exceeds max_header_bytes");
        return -1;
    }
    return 0;
}

static la_ssize_t blob_read(struct archive *a, void *cd, const void **out)
{
    struct xctx *x = cd;
    if (a && !x->inf && header_budget_left(x, a) < 0) /* plain blob: the tar reader itself is reading */
        return -1;
    size_t want = READ_BLOCK;
    if (!x->to_eof) {
        uint64_t left = x->end - x->pos;
        if (left == 0)
            return 0;
        if (want > left)
            want = (size_t)left;
    }
    unsigned char *buf = hasher_next_buf(&x->h);
    ssize_t n;
    do
        n = pread(x->src, buf, want, (off_t)x->pos);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        x->read_errno = errno;
        if (a)
            archive_set_error(a, errno, "reading the blob");
        return -1;
    }
    if (n == 0) {
        if (!x->to_eof) {
            x->short_blob = 1;
            if (a)
                archive_set_error(a, EIO, "the blob ends before its declared length");
            return -1;
        }
        return 0;
    }
    hasher_submit(&x->h, (size_t)n);
    x->pos += (uint64_t)n;
    if (a && !x->inf)
        x->tar_fed += (uint64_t)n;
    /* the inflater thread reads while the main thread may report progress */
    __atomic_fetch_add(&x->st->blob_bytes, (uint64_t)n, __ATOMIC_RELAXED);
    *out = buf;
    return n;
}

/* ---------- names ---------- */

/* Strips "/", "./", empty and "." components; a ".." component is an escape. Returns 0, -1 (escape),
 * -2 (too long). */
static int normalize(const char *in, char *out, size_t cap, size_t *outlen, uint64_t *depth)
{
    size_t o = 0;
    uint64_t d = 0;
    const char *p = in;
    while (*p) {
        while (*p == '/')
            p++;
        if (!*p)
            break;
        const char *s = p;
        while (*p && *p != '/')
            p++;
        size_t n = (size_t)(p - s);
        if (n == 1 && s[0] == '.')
            continue;
        if (n == 2 && s[0] == '.' && s[1] == '.')
            return -1;
        if (o + (o ? 1 : 0) + n + 1 > cap)
            return -2;
        if (o)
            out[o++] = '/';
        memcpy(out + o, s, n);
        o += n;
        d++;
    }
    out[o] = 0;
    *outlen = o;
    *depth = d;
    return 0;
}

/* ---------- resolving parents ---------- */

static void cache_set(struct xctx *x, const char *path, size_t len, int fd, uint64_t ino, gid_t sgid)
{
    if (x->cache_fd >= 0 && x->cache_fd != fd)
        close(x->cache_fd);
    memcpy(x->cache_path, path, len);
    x->cache_path[len] = 0;
    x->cache_len = len;
    x->cache_fd = fd;
    x->cache_sgid = sgid;
    x->cache_ino = ino;
    x->cache_valid = 1;
}

/* Something was removed or replaced: a cached resolution may be stale. The fd stays open (the current
 * entry may be using it) until the next cache_set. */
static void cache_invalidate(struct xctx *x) { x->cache_valid = 0; }

/* Creates the missing directories of path (relative to the root), each resolved in the root. */
static int make_parents(struct xctx *x, char *path, size_t len)
{
    int prev = x->root;
    for (size_t i = 0; i <= len; i++) {
        if (i < len && path[i] != '/')
            continue;
        char saved = path[i];
        path[i] = 0;
        int fd = openat2_in_root(x->root, path, O_PATH | O_DIRECTORY);
        if (fd < 0 && errno == ENOENT) {
            const char *comp = strrchr(path, '/');
            comp = comp ? comp + 1 : path;
            struct stat pst;
            if (mkdirat(prev, comp, 0755) == 0) {
                int bad = fstat(prev, &pst) < 0 ? fail(x, "io", errno, "inspecting a parent directory")
                                                : layer_add(x, (uint64_t)pst.st_ino, comp);
                if (bad < 0) {
                    path[i] = saved;
                    if (prev != x->root)
                        close(prev);
                    return -1;
                }
            } else if (errno != EEXIST) {
                int e = errno;
                path[i] = saved;
                if (prev != x->root)
                    close(prev);
                return fail_errno(x, e, "creating a parent directory");
            }
            fd = openat2_in_root(x->root, path, O_PATH | O_DIRECTORY);
            if (fd < 0 && errno == ENOENT) { /* it exists, yet does not resolve: a dangling symlink */
                path[i] = saved;
                if (prev != x->root)
                    close(prev);
                return fail(x, "path", ENOENT, "a parent is a dangling symlink");
            }
        }
        int e = errno;
        path[i] = saved;
        if (prev != x->root)
            close(prev);
        if (fd < 0)
            return fail_errno(x, e, "resolving a parent directory");
        prev = fd;
    }
    return prev;
}

/* A directory's inode (the whiteout set's key) and the group its new files inherit if it is setgid. */
static int dir_info(int fd, uint64_t *ino, gid_t *sgid)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        return -1;
    *ino = (uint64_t)st.st_ino;
    *sgid = (st.st_mode & S_ISGID) ? st.st_gid : NO_SGID;
    return 0;
}

/* The dirfd of x->norm's first plen bytes (the parent of the current entry), resolved in the root.
 * create: make missing parents. Returns the fd (owned by the cache or the root) or -1; with !create,
 * -2 when it is absent. Sets parent_ino and parent_sgid. */
static int open_parent(struct xctx *x, size_t plen, int create)
{
    if (plen == 0) {
        x->parent_sgid = x->root_sgid;
        x->parent_ino = x->root_ino;
        return x->root;
    }
    if (x->cache_valid && x->cache_len == plen && memcmp(x->cache_path, x->norm, plen) == 0) {
        x->parent_sgid = x->cache_sgid;
        x->parent_ino = x->cache_ino;
        return x->cache_fd;
    }
    char saved = x->norm[plen];
    x->norm[plen] = 0;
    int fd = openat2_in_root(x->root, x->norm, O_PATH | O_DIRECTORY);
    int e = errno;
    x->norm[plen] = saved;
    if (fd < 0) {
        if (!create && (e == ENOENT || e == ENOTDIR))
            return -2;
        if (e != ENOENT)
            return fail_errno(x, e, "resolving the parent directory");
        fd = make_parents(x, x->norm, plen);
        if (fd < 0)
            return -1;
    }
    if (dir_info(fd, &x->parent_ino, &x->parent_sgid) < 0) {
        e = errno;
        close(fd);
        return fail(x, "io", e, "inspecting the parent directory");
    }
    cache_set(x, x->norm, plen, fd, x->parent_ino, x->parent_sgid);
    return fd;
}

/* ---------- removal, never following symlinks ---------- */

static int remove_at(struct xctx *x, int dfd, uint64_t dino, const char *name, int keep_layer, int depth);

/* Removes the children of the directory fd (consumed); with keep_layer, keeps (and descends into) what
 * this layer wrote. */
static int empty_dir(struct xctx *x, int fd, int keep_layer, int depth)
{
    if (depth > MAX_REMOVE_DEPTH) {
        close(fd);
        return fail(x, "limit", 0, "directory tree too deep to remove");
    }
    struct stat st;
    if (keep_layer && fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return fail(x, "io", e, "inspecting a directory to remove");
    }
    uint64_t ino = keep_layer ? (uint64_t)st.st_ino : 0;
    DIR *d = fdopendir(fd);
    if (!d) {
        int e = errno;
        close(fd);
        return fail(x, "io", e, "reading a directory to remove");
    }
    int rc = 0;
    struct dirent *de;
    errno = 0;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.' && (!de->d_name[1] || (de->d_name[1] == '.' && !de->d_name[2])))
            continue;
        if (remove_at(x, dirfd(d), ino, de->d_name, keep_layer, depth + 1) < 0) {
            rc = -1;
            break;
        }
        errno = 0;
    }
    if (rc == 0 && errno)
        rc = fail(x, "io", errno, "reading a directory to remove");
    closedir(d);
    return rc;
}

/* Whether dfd/name (not followed) is a mount point of another filesystem: writes never enter one
 * (RESOLVE_NO_XDEV), and neither does removal. By mount id where statx has it (overlayfs reports other
 * st_dev values for its files), else by the device of a directory. */
static int other_mount(struct xctx *x, int dfd, const char *name, const struct stat *st)
{
    struct statx sx;
    if (x->root_mnt && statx(dfd, name, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT, STATX_MNT_ID, &sx) == 0 &&
        (sx.stx_mask & STATX_MNT_ID))
        return sx.stx_mnt_id != x->root_mnt;
    return S_ISDIR(st->st_mode) && st->st_dev != x->root_dev;
}

/* Removes dfd/name, never following it (a whole tree for a directory). dino: dfd's inode, for the
 * keep_layer lookups. */
static int remove_at(struct xctx *x, int dfd, uint64_t dino, const char *name, int keep_layer, int depth)
{
    struct stat st;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return errno == ENOENT ? 0 : fail(x, "io", errno, "inspecting an object to remove");
    if (other_mount(x, dfd, name, &st))
        return fail(x, "path", EXDEV, "removing \"%.64s\": it is on another filesystem (a mount point)",
                    name);
    int in_layer = keep_layer && wset_has(&x->layer, dino, name);
    if (!S_ISDIR(st.st_mode)) {
        if (!in_layer && unlinkat(dfd, name, 0) < 0 && errno != ENOENT)
            return fail(x, "io", errno, "removing an object");
        return 0;
    }
    int fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return fail(x, "io", errno, "opening a directory to remove");
    if (empty_dir(x, fd, keep_layer, depth) < 0)
        return -1;
    if (!in_layer && unlinkat(dfd, name, AT_REMOVEDIR) < 0 && errno != ENOENT &&
        !(keep_layer && errno == ENOTEMPTY)) /* ENOTEMPTY: it holds something this layer wrote */
        return fail(x, "io", errno, "removing a directory");
    return 0;
}

/* Makes room for a new entry at pfd/base: removes whatever is there (a whole tree for a directory). */
static int replace_existing(struct xctx *x, int pfd, const char *base)
{
    cache_invalidate(x);
    return remove_at(x, pfd, 0, base, 0, 0);
}

/* ---------- metadata ---------- */

static void entry_times(struct archive_entry *e, struct timespec ts[2])
{
    ts[1].tv_sec = archive_entry_mtime(e);
    ts[1].tv_nsec = archive_entry_mtime_nsec(e);
    if (archive_entry_atime_is_set(e)) {
        ts[0].tv_sec = archive_entry_atime(e);
        ts[0].tv_nsec = archive_entry_atime_nsec(e);
    } else {
        ts[0] = ts[1];
    }
}

static int xattr_allowed(const char *name)
{
    return strncmp(name, "user.", 5) == 0 || strcmp(name, "security.capability") == 0;
}

/* Checked before anything is created so a refused entry leaves nothing behind. */
static int check_xattrs(struct xctx *x, struct archive_entry *e)
{
    if (archive_entry_xattr_reset(e) == 0)
        return 0;
    const char *name;
    const void *val;
    size_t size, total = 0;
    while (archive_entry_xattr_next(e, &name, &val, &size) == ARCHIVE_OK) {
        total += strlen(name) + size;
        if (total > x->lim.max_xattr_bytes)
            return fail(x, "limit", 0, "xattrs exceed max_xattr_bytes (%llu)",
                        (unsigned long long)x->lim.max_xattr_bytes);
    }
    return 0;
}

/* fd < 0: a symlink, whose xattrs are dropped (user.* is not allowed on symlinks anyway). */
static int apply_xattrs(struct xctx *x, struct archive_entry *e, int fd)
{
    if (archive_entry_xattr_reset(e) == 0)
        return 0;
    const char *name;
    const void *val;
    size_t size;
    while (archive_entry_xattr_next(e, &name, &val, &size) == ARCHIVE_OK) {
        if (fd < 0 || !xattr_allowed(name)) {
            x->st->xattrs_dropped++;
            continue;
        }
        if (fsetxattr(fd, name, val, size, 0) < 0) {
            if (errno == ENOTSUP || errno == EOPNOTSUPP) {
                x->st->xattrs_dropped++;
                continue;
            }
            if (errno == EINVAL || errno == ERANGE || errno == E2BIG) /* a bad name or value: the input's */
                return fail(x, "invalid", errno, "xattr %.64s refused by the kernel", name);
            return fail(x, "io", errno, "setting xattr %.64s", name);
        }
        x->st->xattrs++;
    }
    return 0;
}

/* Owner, then mode (chown clears setuid/setgid), then xattrs (chown clears security.capability). */
static int apply_fd_meta(struct xctx *x, struct archive_entry *e, int fd)
{
    if (x->is_root && fchown(fd, (uid_t)archive_entry_uid(e), (gid_t)archive_entry_gid(e)) < 0)
        return fail(x, "io", errno, "chown");
    if (fchmod(fd, archive_entry_perm(e) & 07777) < 0)
        return fail(x, "io", errno, "chmod");
    return apply_xattrs(x, e, fd);
}

static uint64_t path_hash(const char *s, size_t n) { return wkey_hash(0, s, n); }

static int dir_slot_grow(struct xctx *x)
{
    size_t ncap = x->dir_slot_cap ? x->dir_slot_cap * 2 : 1024;
    size_t *ns = calloc(ncap, sizeof(*ns));
    if (!ns)
        return fail(x, "io", ENOMEM, "directory list");
    if (index_charge(x, (ncap - x->dir_slot_cap) * sizeof(*ns)) < 0) {
        free(ns);
        return -1;
    }
    for (size_t i = 0; i < x->ndirs; i++) {
        size_t j = path_hash(x->dirs[i].path, strlen(x->dirs[i].path)) & (ncap - 1);
        while (ns[j])
            j = (j + 1) & (ncap - 1);
        ns[j] = i + 1;
    }
    free(x->dir_slot);
    x->dir_slot = ns;
    x->dir_slot_cap = ncap;
    return 0;
}

/* Remembers a directory's times, to set them once the layer is complete. Each directory path is kept
 * once (a later entry for it updates the times): repeated entries cost no memory. */
static int remember_dir_time(struct xctx *x, const char *path, size_t len, struct archive_entry *e)
{
    if ((x->ndirs + 1) * 10 >= x->dir_slot_cap * 7 && dir_slot_grow(x) < 0)
        return -1;
    size_t j = path_hash(path, len) & (x->dir_slot_cap - 1);
    for (; x->dir_slot[j]; j = (j + 1) & (x->dir_slot_cap - 1)) {
        struct dir_time *d = &x->dirs[x->dir_slot[j] - 1];
        if (strncmp(d->path, path, len) == 0 && d->path[len] == 0) {
            entry_times(e, d->ts);
            return 0;
        }
    }
    if (index_charge(x, len + 1 + sizeof(struct dir_time) + 2 * sizeof(void *)) < 0)
        return -1;
    if (x->ndirs == x->capdirs) {
        size_t ncap = x->capdirs ? x->capdirs * 2 : 256;
        struct dir_time *nd = realloc(x->dirs, ncap * sizeof(*nd));
        if (!nd)
            return fail(x, "io", ENOMEM, "directory list");
        x->dirs = nd;
        x->capdirs = ncap;
    }
    char *p = malloc(len + 1);
    if (!p)
        return fail(x, "io", ENOMEM, "directory list");
    memcpy(p, path, len);
    p[len] = 0;
    x->dirs[x->ndirs].path = p;
    entry_times(e, x->dirs[x->ndirs].ts);
    x->ndirs++;
    x->dir_slot[j] = x->ndirs;
    return 0;
}

/* Directories' mtimes change as children are added: set them once the layer is complete. */
static void fix_dir_times(struct xctx *x)
{
    for (size_t i = 0; i < x->ndirs; i++) {
        const char *p = x->dirs[i].path;
        int fd = p[0] ? openat2_in_root(x->root, p, O_RDONLY | O_DIRECTORY | O_NOFOLLOW) : x->root;
        if (fd < 0)
            continue; /* removed or replaced later in the layer */
        futimens(fd, x->dirs[i].ts);
        if (fd != x->root)
            close(fd);
    }
}

/* ---------- entries ---------- */

static int report(struct xctx *x);

static int write_data(struct xctx *x, struct archive_entry *e, int fd)
{
    const void *buf;
    size_t size;
    la_int64_t off;
    uint64_t declared = (uint64_t)archive_entry_size(e), hi = 0;
    for (;;) {
        int r = archive_read_data_block(x->a, &buf, &size, &off);
        if (r == ARCHIVE_EOF)
            break;
        if (r != ARCHIVE_OK) {
            if (x->read_errno)
                return fail(x, "io", x->read_errno, "reading the blob");
            return fail(x, "corrupt", 0, "%s", archive_error_string(x->a));
        }
        if (off < 0 || (uint64_t)off + size > declared)
            return fail(x, "corrupt", 0, "data beyond the entry's size");
        const char *p = buf;
        while (size) {
            ssize_t w = pwrite(fd, p, size, (off_t)off);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                return fail(x, "io", errno, "writing file data");
            }
            p += w;
            off += w;
            size -= (size_t)w;
            x->st->bytes += (uint64_t)w;
        }
        if ((uint64_t)off > hi)
            hi = (uint64_t)off;
        if (report(x) < 0) /* a big file: keep reporting, and let the caller cancel mid-file */
            return -1;
    }
    if (hi < declared && ftruncate(fd, (off_t)declared) < 0) /* a sparse tail */
        return fail(x, "io", errno, "extending a sparse file");
    return 0;
}

/* A new file is created with its permission bits, owned by euid and egid (or the setgid parent's group):
 * chown and chmod run only when they would change something (most files in an image are root's 0644). */
static int apply_file_meta(struct xctx *x, struct archive_entry *e, int fd)
{
    uid_t uid = (uid_t)archive_entry_uid(e);
    gid_t gid = (gid_t)archive_entry_gid(e);
    mode_t perm = archive_entry_perm(e) & 07777;
    gid_t born_gid = x->parent_sgid != NO_SGID ? x->parent_sgid : x->egid;
    if (x->is_root && (uid != x->euid || gid != born_gid) && fchown(fd, uid, gid) < 0)
        return fail(x, "io", errno, "chown");
    if ((perm & 07000 || x->umask == NO_UMASK || (perm & x->umask)) && fchmod(fd, perm) < 0)
        return fail(x, "io", errno, "chmod");
    return apply_xattrs(x, e, fd);
}

static int do_file(struct xctx *x, struct archive_entry *e, int pfd, const char *base)
{
    mode_t create_mode = archive_entry_perm(e) & 0777;
    int fd = openat(pfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, create_mode);
    if (fd < 0 && errno == EEXIST) {
        if (replace_existing(x, pfd, base) < 0)
            return -1;
        fd = openat(pfd, base, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, create_mode);
    }
    if (fd < 0)
        return fail_errno(x, errno, "creating a file");
    struct timespec ts[2];
    entry_times(e, ts);
    int rc = write_data(x, e, fd);
    if (rc == 0)
        rc = apply_file_meta(x, e, fd);
    if (rc == 0 && futimens(fd, ts) < 0)
        rc = fail(x, "io", errno, "setting times");
    if (close(fd) < 0 && rc == 0)
        rc = fail(x, "io", errno, "closing a file");
    x->st->files++;
    return rc;
}

static int do_dir(struct xctx *x, struct archive_entry *e, int pfd, const char *base)
{
    if (mkdirat(pfd, base, 0700) < 0) {
        if (errno != EEXIST)
            return fail_errno(x, errno, "creating a directory");
        struct stat st;
        if (fstatat(pfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0)
            return fail(x, "io", errno, "inspecting an existing object");
        if (!S_ISDIR(st.st_mode)) { /* a non-directory is replaced; a directory is merged */
            if (replace_existing(x, pfd, base) < 0)
                return -1;
            if (mkdirat(pfd, base, 0700) < 0)
                return fail_errno(x, errno, "creating a directory");
        }
    }
    int fd = openat(pfd, base, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return fail_errno(x, errno, "opening a directory");
    if (apply_fd_meta(x, e, fd) < 0 || remember_dir_time(x, x->norm, x->norm_len, e) < 0) {
        close(fd);
        return -1;
    }
    x->st->dirs++;
    uint64_t ino;
    gid_t sgid;
    if (dir_info(fd, &ino, &sgid) < 0) {
        int err_no = errno;
        close(fd);
        return fail(x, "io", err_no, "inspecting a directory");
    }
    cache_set(x, x->norm, x->norm_len, fd, ino, sgid); /* the next entries are most likely its children */
    return 0;
}

static int do_symlink(struct xctx *x, struct archive_entry *e, int pfd, const char *base)
{
    const char *target = archive_entry_symlink(e);
    if (!target || !target[0])
        return fail(x, "invalid", 0, "symlink with an empty target");
    if (symlinkat(target, pfd, base) < 0) {
        if (errno != EEXIST)
            return fail_errno(x, errno, "creating a symlink");
        if (replace_existing(x, pfd, base) < 0)
            return -1;
        if (symlinkat(target, pfd, base) < 0)
            return fail_errno(x, errno, "creating a symlink");
    }
    if (x->is_root &&
        fchownat(pfd, base, (uid_t)archive_entry_uid(e), (gid_t)archive_entry_gid(e), AT_SYMLINK_NOFOLLOW) < 0)
        return fail(x, "io", errno, "chown");
    if (apply_xattrs(x, e, -1) < 0)
        return -1;
    struct timespec ts[2];
    entry_times(e, ts);
    if (utimensat(pfd, base, ts, AT_SYMLINK_NOFOLLOW) < 0)
        return fail(x, "io", errno, "setting times");
    x->st->symlinks++;
    return 0;
}

/* Links to the object named by the (normalized) target, resolved in the root; the target's last
 * component is not followed, so a link to a symlink links the symlink (as tar does). linkat on the two
 * resolved parents needs no CAP_DAC_READ_SEARCH and no /proc magic links. */
static int do_hardlink(struct xctx *x, int pfd, const char *base)
{
    char *tslash = strrchr(x->target, '/');
    const char *tbase = tslash ? tslash + 1 : x->target;
    int tpfd = x->root;
    if (tslash) {
        *tslash = 0;
        tpfd = openat2_in_root(x->root, x->target, O_PATH | O_DIRECTORY);
        int e = errno;
        *tslash = '/';
        if (tpfd < 0)
            return e == ENOENT ? fail(x, "path", e, "hardlink target %s", x->target)
                               : fail_errno(x, e, "resolving a hardlink target");
    }
    int rc = 0;
    if (linkat(tpfd, tbase, pfd, base, 0) < 0) {
        if (errno == EEXIST) {
            struct stat a, b;
            if (fstatat(tpfd, tbase, &a, AT_SYMLINK_NOFOLLOW) == 0 &&
                fstatat(pfd, base, &b, AT_SYMLINK_NOFOLLOW) == 0 && a.st_dev == b.st_dev &&
                a.st_ino == b.st_ino)
                goto done; /* already that object */
            rc = replace_existing(x, pfd, base);
            if (rc == 0 && linkat(tpfd, tbase, pfd, base, 0) < 0)
                rc = errno == ENOENT ? fail(x, "path", errno, "hardlink target %s", x->target)
                                     : fail_errno(x, errno, "creating a hardlink");
        } else if (errno == ENOENT) {
            rc = fail(x, "path", errno, "hardlink target %s", x->target);
        } else if (errno == EPERM) {
            rc = fail(x, "path", errno, "hardlink to a directory %s", x->target);
        } else {
            rc = fail_errno(x, errno, "creating a hardlink");
        }
    }
done:
    if (tpfd != x->root)
        close(tpfd);
    if (rc == 0)
        x->st->hardlinks++;
    return rc;
}

/* The OCI runtime's default devices: harmless to have on any filesystem. */
static int device_allowed(struct archive_entry *e)
{
    static const unsigned devs[][2] = {{1, 3}, {1, 5}, {1, 7}, {1, 8}, {1, 9}, {5, 0}, {5, 1}, {5, 2}};
    if (archive_entry_filetype(e) != AE_IFCHR)
        return 0;
    unsigned ma = (unsigned)archive_entry_rdevmajor(e), mi = (unsigned)archive_entry_rdevminor(e);
    for (size_t i = 0; i < sizeof(devs) / sizeof(devs[0]); i++)
        if (devs[i][0] == ma && devs[i][1] == mi)
            return 1;
    return 0;
}

/* chmod of pfd/base, never through a symlink (should anything swap the node we just made for one):
 * glibc does AT_SYMLINK_NOFOLLOW with an O_PATH fd and /proc/self/fd; without /proc it fails with
 * EOPNOTSUPP for a non-symlink too, and then the plain call is all there is. */
static int chmod_nofollow(int pfd, const char *base, mode_t perm)
{
    if (fchmodat(pfd, base, perm, AT_SYMLINK_NOFOLLOW) == 0)
        return 0;
    if (errno != EOPNOTSUPP)
        return -1;
    struct stat st;
    if (fstatat(pfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return -1;
    if (S_ISLNK(st.st_mode)) {
        errno = ELOOP;
        return -1;
    }
    return fchmodat(pfd, base, perm, 0);
}

static int do_node(struct xctx *x, struct archive_entry *e, int pfd, const char *base)
{
    unsigned type = archive_entry_filetype(e);
    dev_t dev = 0;
    if (type != AE_IFIFO) {
        if (!x->is_root || !device_allowed(e)) {
            x->st->devices_skipped++;
            return 0;
        }
        dev = makedev((unsigned)archive_entry_rdevmajor(e), (unsigned)archive_entry_rdevminor(e));
    }
    mode_t mode = (type == AE_IFIFO ? S_IFIFO : S_IFCHR) | 0600;
    if (mknodat(pfd, base, mode, dev) < 0) {
        if (errno != EEXIST)
            return fail_errno(x, errno, "creating a node");
        if (replace_existing(x, pfd, base) < 0)
            return -1;
        if (mknodat(pfd, base, mode, dev) < 0)
            return fail_errno(x, errno, "creating a node");
    }
    if (x->is_root &&
        fchownat(pfd, base, (uid_t)archive_entry_uid(e), (gid_t)archive_entry_gid(e), AT_SYMLINK_NOFOLLOW) < 0)
        return fail(x, "io", errno, "chown");
    if (chmod_nofollow(pfd, base, archive_entry_perm(e) & 07777) < 0)
        return fail_errno(x, errno, "chmod");
    if (apply_xattrs(x, e, -1) < 0)
        return -1;
    struct timespec ts[2];
    entry_times(e, ts);
    if (utimensat(pfd, base, ts, AT_SYMLINK_NOFOLLOW) < 0)
        return fail(x, "io", errno, "setting times");
    if (type == AE_IFIFO)
        x->st->fifos++;
    else
        x->st->devices++;
    return 0;
}

/* The root's own entry ("./"): a directory merges its metadata into the root; anything else is refused. */
static int do_root(struct xctx *x, struct archive_entry *e)
{
    if (archive_entry_hardlink(e) || archive_entry_filetype(e) != AE_IFDIR)
        return fail(x, "escape", 0, "a non-directory entry for the image root");
    if (apply_fd_meta(x, e, x->root) < 0 || remember_dir_time(x, "", 0, e) < 0)
        return -1;
    x->st->dirs++;
    return 0;
}

/* ".wh.<name>" removes <name> of lower layers; ".wh..wh..opq" removes all lower children of its
 * directory. Whatever this layer wrote survives, whatever the order in the tar. Parent directories are
 * resolved in the root like any entry's; the removed objects themselves are never followed. */
static int do_whiteout(struct xctx *x, size_t plen, const char *base)
{
    x->st->whiteouts++;
    const char *name = base + 4;
    int opaque = strcmp(base, ".wh..wh..opq") == 0;
    if (!opaque && (!name[0] || strcmp(name, ".") == 0 || strcmp(name, "..") == 0))
        return fail(x, "escape", 0, "whiteout of \"%s\" names its directory or a parent", name);
    cache_invalidate(x);
    if (opaque) {
        int fd;
        if (plen == 0) {
            fd = openat(x->root, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        } else {
            x->norm[plen] = 0;
            fd = openat2_in_root(x->root, x->norm, O_RDONLY | O_DIRECTORY);
            x->norm[plen] = '/';
        }
        if (fd < 0)
            return (errno == ENOENT || errno == ENOTDIR) ? 0 : fail_errno(x, errno, "opening an opaque directory");
        return empty_dir(x, fd, 1, 0);
    }
    int pfd = open_parent(x, plen, 0);
    if (pfd == -2)
        return 0; /* nothing there to hide */
    if (pfd < 0)
        return -1;
    return remove_at(x, pfd, x->parent_ino, name, 1, 0);
}

static int check_limits(struct xctx *x, struct archive_entry *e)
{
    struct img_limits *l = &x->lim;
    if (x->st->entries > l->max_entries)
        return fail(x, "limit", 0, "more than max_entries (%llu) entries", (unsigned long long)l->max_entries);
    la_int64_t hdr = archive_filter_bytes(x->a, 0) - archive_read_header_position(x->a);
    if (hdr > 0 && (uint64_t)hdr > l->max_header_bytes)
        return fail(x, "limit", 0, "header of %lld bytes exceeds max_header_bytes (%llu)", (long long)hdr,
                    (unsigned long long)l->max_header_bytes);
    if (strlen(x->cur) > l->max_path_len)
        return fail(x, "limit", 0, "name longer than max_path_len (%llu)", (unsigned long long)l->max_path_len);
    const char *t = archive_entry_hardlink(e);
    if (!t)
        t = archive_entry_symlink(e);
    if (t && strlen(t) > l->max_path_len)
        return fail(x, "limit", 0, "link target longer than max_path_len (%llu)",
                    (unsigned long long)l->max_path_len);
    if (archive_entry_size_is_set(e)) {
        la_int64_t size = archive_entry_size(e);
        if (size < 0)
            return fail(x, "corrupt", 0, "negative size");
        if ((uint64_t)size > l->max_file_bytes)
            return fail(x, "limit", 0, "size %lld exceeds max_file_bytes (%llu)", (long long)size,
                        (unsigned long long)l->max_file_bytes);
        x->declared_bytes += (uint64_t)size;
        if (x->declared_bytes > l->max_total_bytes)
            return fail(x, "limit", 0, "layer content exceeds max_total_bytes (%llu)",
                        (unsigned long long)l->max_total_bytes);
    }
    return check_xattrs(x, e);
}

static int do_entry(struct xctx *x, struct archive_entry *e)
{
    x->cur = archive_entry_pathname(e);
    if (!x->cur)
        return fail(x, "invalid", 0, "entry without a usable name");
    x->st->entries++;
    if (check_limits(x, e) < 0)
        return -1;
    uint64_t depth;
    int r = normalize(x->cur, x->norm, x->lim.max_path_len + 1, &x->norm_len, &depth);
    if (r == -1)
        return fail(x, "escape", 0, "a \"..\" component");
    if (r == -2)
        return fail(x, "limit", 0, "name longer than max_path_len");
    if (depth > x->lim.max_depth)
        return fail(x, "limit", 0, "path deeper than max_depth (%llu)", (unsigned long long)x->lim.max_depth);
    if (x->norm_len == 0)
        return do_root(x, e);

    char *slash = memrchr(x->norm, '/', x->norm_len);
    size_t plen = slash ? (size_t)(slash - x->norm) : 0;
    const char *base = slash ? slash + 1 : x->norm;
    if (strncmp(base, ".wh.", 4) == 0)
        return do_whiteout(x, plen, base);

    const char *link = archive_entry_hardlink(e);
    if (link) {
        uint64_t tdepth;
        r = normalize(link, x->target, x->lim.max_path_len + 1, &x->target_len, &tdepth);
        if (r == -1)
            return fail(x, "escape", 0, "hardlink target with a \"..\" component");
        if (r == -2)
            return fail(x, "limit", 0, "hardlink target longer than max_path_len");
        if (x->target_len == 0)
            return fail(x, "escape", 0, "hardlink to the image root");
    }
    unsigned type = archive_entry_filetype(e);
    if (!link && type != AE_IFREG && type != AE_IFDIR && type != AE_IFLNK && type != AE_IFIFO &&
        type != AE_IFCHR && type != AE_IFBLK)
        return fail(x, "invalid", 0, "unsupported entry type 0%o", type);

    int pfd = open_parent(x, plen, 1);
    if (pfd < 0)
        return -1;
    if (link)
        r = do_hardlink(x, pfd, base);
    else if (type == AE_IFREG)
        r = do_file(x, e, pfd, base);
    else if (type == AE_IFDIR)
        r = do_dir(x, e, pfd, base);
    else if (type == AE_IFLNK)
        r = do_symlink(x, e, pfd, base);
    else
        r = do_node(x, e, pfd, base);
    if (r == 0 && layer_add(x, x->parent_ino, base) < 0)
        return -1;
    return r;
}

static int report(struct xctx *x)
{
    if (!x->progress)
        return 0;
    if (x->st->entries < x->next_progress_entries && x->st->bytes < x->next_progress_bytes)
        return 0;
    x->next_progress_entries = x->st->entries + x->progress_entries;
    x->next_progress_bytes = x->st->bytes + x->progress_bytes;
    if (x->progress(x->progress_ctx, x->st) != 0)
        return fail(x, "cancelled", 0, "stopped by the progress callback");
    return 0;
}

static int header_error(struct xctx *x, int r)
{
    if (x->header_overrun)
        return fail(x, "limit", 0, "a header longer than max_header_bytes (%llu)",
                    (unsigned long long)x->lim.max_header_bytes);
    if (x->read_errno)
        return fail(x, "io", x->read_errno, "reading the blob");
    if (x->short_blob)
        return fail(x, "corrupt", 0, "the blob ends before its declared length");
    const char *msg = archive_error_string(x->a);
    if (!msg)
        msg = "unreadable archive";
    if (x->st->entries == 0 && strstr(msg, "Unrecognized archive format"))
        return fail(x, "format", 0, "not a tar archive (plain, gzip or zstd)");
    /* Warnings too: libarchive warns when it ignores a pax header or mangles a name. */
    return fail(x, "corrupt", 0, "%s%s", r == ARCHIVE_WARN ? "refused warning: " : "", msg);
}

/* Reads the rest of the range after the tar end: the digest covers the whole blob. Bounded by
 * max_total_bytes: a range read to EOF could be a huge sparse file, or one its owner keeps appending to. */
static int drain(struct xctx *x)
{
    uint64_t drained = 0;
    for (;;) {
        const void *p;
        la_ssize_t n = blob_read(NULL, x, &p);
        if (n == 0)
            return 0;
        if (n < 0)
            return x->read_errno ? fail(x, "io", x->read_errno, "reading the blob")
                                 : fail(x, "corrupt", 0, "the blob ends before its declared length");
        drained += (uint64_t)n;
        if (drained > x->lim.max_total_bytes)
            return fail(x, "limit", 0, "trailing data after the tar exceeds max_total_bytes (%llu)",
                        (unsigned long long)x->lim.max_total_bytes);
    }
}

/* ---------- gzip/zstd blobs: a second libarchive reader (raw format: decompression only) on its own
 * thread feeds the tar reader decompressed blocks, so inflating overlaps with writing files. ---------- */

#define INF_BLOCK (1u << 20)
#define INF_NBUF 4

struct inflater {
    struct xctx *x;
    struct archive *raw;
    pthread_t thread;
    int running;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned char *buf[INF_NBUF];
    size_t len[INF_NBUF];
    uint64_t produced, released; /* blocks made / given back by the tar reader; block i in buf[i % N] */
    int holding;                 /* the tar reader still uses block `released` */
    int done, failed, stop;
    int err;
    char msg[256];
    la_int64_t consumed; /* compressed bytes the decompressor used: the rest of the blob is trailing */
};

static void *inflater_main(void *arg)
{
    struct inflater *f = arg;
    struct archive_entry *e;
    int failed = 0;
    if (archive_read_next_header(f->raw, &e) != ARCHIVE_OK)
        failed = 1;
    while (!failed) {
        pthread_mutex_lock(&f->mu);
        while (f->produced - f->released >= INF_NBUF && !f->stop)
            pthread_cond_wait(&f->cv, &f->mu);
        int stop = f->stop;
        size_t i = f->produced % INF_NBUF;
        pthread_mutex_unlock(&f->mu);
        if (stop)
            break;
        la_ssize_t n = archive_read_data(f->raw, f->buf[i], INF_BLOCK);
        if (n < 0) {
            failed = 1;
            break;
        }
        if (n == 0)
            break;
        pthread_mutex_lock(&f->mu);
        f->len[i] = (size_t)n;
        f->produced++;
        pthread_cond_broadcast(&f->cv);
        pthread_mutex_unlock(&f->mu);
    }
    f->consumed = archive_filter_bytes(f->raw, -1);
    pthread_mutex_lock(&f->mu);
    if (failed) {
        const char *m = archive_error_string(f->raw);
        snprintf(f->msg, sizeof(f->msg), "%s", m ? m : "decompression failed");
        f->err = archive_errno(f->raw);
        f->failed = 1;
    }
    f->done = 1;
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
    return NULL;
}

/* The tar reader's read callback in the compressed case. */
static la_ssize_t inflated_read(struct archive *a, void *cd, const void **out)
{
    struct xctx *x = cd;
    struct inflater *f = x->inf;
    la_ssize_t n = 0;
    pthread_mutex_lock(&f->mu);
    if (f->holding) { /* libarchive is done with the block it had */
        f->released++;
        f->holding = 0;
        pthread_cond_broadcast(&f->cv);
    }
    if (header_budget_left(x, a) < 0) {
        pthread_mutex_unlock(&f->mu);
        return -1;
    }
    while (f->produced == f->released && !f->done)
        pthread_cond_wait(&f->cv, &f->mu);
    if (f->produced > f->released) {
        size_t i = f->released % INF_NBUF;
        *out = f->buf[i];
        n = (la_ssize_t)f->len[i];
        f->holding = 1;
        x->tar_fed += (uint64_t)n;
    } else if (f->failed) {
        archive_set_error(a, f->err ? f->err : EILSEQ, "%s", f->msg);
        n = -1;
    }
    pthread_mutex_unlock(&f->mu);
    return n;
}

static void inflater_stop(struct inflater *f)
{
    if (!f || !f->running)
        return;
    pthread_mutex_lock(&f->mu);
    f->stop = 1;
    pthread_cond_broadcast(&f->cv);
    pthread_mutex_unlock(&f->mu);
    pthread_join(f->thread, NULL);
    f->running = 0;
}

static void inflater_free(struct inflater *f)
{
    if (!f)
        return;
    inflater_stop(f);
    if (f->raw)
        archive_read_free(f->raw);
    for (int i = 0; i < INF_NBUF; i++)
        free(f->buf[i]);
    pthread_mutex_destroy(&f->mu);
    pthread_cond_destroy(&f->cv);
    free(f);
}

/* gzip or zstd magic at the start of the range. */
static int looks_compressed(struct xctx *x)
{
    unsigned char m[4];
    size_t want = sizeof(m);
    if (!x->to_eof && x->end - x->pos < want)
        want = (size_t)(x->end - x->pos);
    ssize_t n = pread(x->src, m, want, (off_t)x->pos);
    if (n >= 2 && m[0] == 0x1f && m[1] == 0x8b)
        return 1;
    return n >= 4 && m[0] == 0x28 && m[1] == 0xb5 && m[2] == 0x2f && m[3] == 0xfd;
}

static int start_inflater(struct xctx *x)
{
    struct inflater *f = calloc(1, sizeof(*f));
    if (!f)
        return fail(x, "io", ENOMEM, "inflater");
    pthread_mutex_init(&f->mu, NULL);
    pthread_cond_init(&f->cv, NULL);
    f->x = x;
    x->inf = f;
    for (int i = 0; i < INF_NBUF; i++)
        if (!(f->buf[i] = malloc(INF_BLOCK)))
            return fail(x, "io", ENOMEM, "inflater buffers");
    f->raw = archive_read_new();
    if (!f->raw)
        return fail(x, "io", ENOMEM, "archive_read_new");
    /* ARCHIVE_WARN here would mean "through an external program": refuse that. */
    if (archive_read_support_format_raw(f->raw) != ARCHIVE_OK ||
        archive_read_support_filter_gzip(f->raw) != ARCHIVE_OK ||
        archive_read_support_filter_zstd(f->raw) != ARCHIVE_OK)
        return fail(x, "format", 0, "libarchive lacks built-in gzip/zstd support");
    if (archive_read_open2(f->raw, x, NULL, blob_read, NULL, NULL) != ARCHIVE_OK) {
        if (x->read_errno)
            return fail(x, "io", x->read_errno, "reading the blob");
        const char *m = archive_error_string(f->raw);
        return fail(x, x->short_blob ? "corrupt" : "format", 0, "%s", m ? m : "unreadable compressed blob");
    }
    if (pthread_create(&f->thread, NULL, inflater_main, f) != 0)
        return fail(x, "io", EAGAIN, "starting the inflater thread");
    f->running = 1;
    return 0;
}

static int setup_reader(struct xctx *x)
{
    int compressed = looks_compressed(x);
    if (compressed && start_inflater(x) < 0)
        return -1;
    x->a = archive_read_new();
    if (!x->a)
        return fail(x, "io", ENOMEM, "archive_read_new");
    /* Tar only: gzip/zstd were peeled off by the inflater. ARCHIVE_WARN would mean an external program. */
    if (archive_read_support_format_tar(x->a) != ARCHIVE_OK)
        return fail(x, "format", 0, "libarchive lacks tar support");
    if (archive_read_open2(x->a, x, NULL, compressed ? inflated_read : blob_read, NULL, NULL) != ARCHIVE_OK)
        return header_error(x, ARCHIVE_FATAL);
    return 0;
}

static void hex(const unsigned char *d, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[d[i] >> 4];
        out[2 * i + 1] = digits[d[i] & 15];
    }
    out[2 * n] = 0;
}

static int run(struct xctx *x, const char *expect)
{
    if (setup_reader(x) < 0)
        return -1;
    struct archive_entry *e;
    for (int first = 1;; first = 0) {
        /* What the last entry left unread (a skipped node's or a hardlink's data) is skipped here, outside
         * the header's byte budget. */
        if (!first && archive_read_data_skip(x->a) != ARCHIVE_OK)
            return header_error(x, ARCHIVE_FATAL);
        x->in_header = 1;
        x->header_fed0 = x->tar_fed;
        int r = archive_read_next_header(x->a, &e);
        x->in_header = 0;
        if (r == ARCHIVE_EOF)
            break;
        if (r != ARCHIVE_OK) {
            x->cur = r == ARCHIVE_WARN ? archive_entry_pathname(e) : NULL;
            return header_error(x, r);
        }
        if (do_entry(x, e) < 0 || report(x) < 0)
            return -1;
    }
    x->cur = NULL;
    fix_dir_times(x);
    la_int64_t consumed = archive_filter_bytes(x->a, -1);
    if (x->inf) {
        /* The tar ended: what was not inflated yet is trailing data, never decompressed (it could be a
         * bomb), only hashed. How far the inflater had read ahead varies: trailing_bytes is approximate. */
        inflater_stop(x->inf);
        consumed = x->inf->consumed;
    }
    if (drain(x) < 0)
        return -1;
    if (consumed >= 0 && x->st->blob_bytes > (uint64_t)consumed)
        x->st->trailing_bytes = x->st->blob_bytes - (uint64_t)consumed;
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    hasher_join(&x->h);
    EVP_DigestFinal_ex(x->h.md, md, &mdlen);
    hex(md, mdlen, x->st->blob_sha256);
    if (expect && strcasecmp(expect, x->st->blob_sha256) != 0)
        return fail(x, "digest", 0, "blob sha256 %s, expected %s", x->st->blob_sha256, expect);
    if (x->progress && x->progress(x->progress_ctx, x->st) != 0)
        return fail(x, "cancelled", 0, "stopped by the progress callback");
    return 0;
}

/* The umask, without changing it (umask(2) would race with other threads): /proc/self/status has it. */
static mode_t read_umask(void)
{
    FILE *f = fopen("/proc/self/status", "re");
    if (!f)
        return NO_UMASK;
    char line[256];
    mode_t m = NO_UMASK;
    unsigned v;
    while (fgets(line, sizeof(line), f))
        if (sscanf(line, "Umask: %o", &v) == 1) {
            m = (mode_t)(v & 0777);
            break;
        }
    fclose(f);
    return m;
}

int img_apply_layer(int root_fd, int src_fd, int64_t offset, int64_t length, const char *expect_sha256,
                    const struct img_limits *limits, struct img_extract_stats *stats,
                    struct img_extract_error *err, img_progress_fn progress, void *progress_ctx,
                    uint64_t progress_entries, uint64_t progress_bytes)
{
    memset(stats, 0, sizeof(*stats));
    memset(err, 0, sizeof(*err));
    struct xctx x = {.root = -1, .cache_fd = -1, .src = src_fd, .st = stats, .err = err};
    x.lim = *limits;
    if (x.lim.max_path_len > PATH_LIMIT_CAP)
        x.lim.max_path_len = PATH_LIMIT_CAP;
    x.progress = progress;
    x.progress_ctx = progress_ctx;
    x.progress_entries = progress_entries ? progress_entries : 1;
    x.progress_bytes = progress_bytes ? progress_bytes : 1;
    x.next_progress_entries = x.progress_entries;
    x.next_progress_bytes = x.progress_bytes;
    x.is_root = geteuid() == 0;
    x.euid = geteuid();
    x.egid = getegid();
    x.umask = read_umask();
    if (offset < 0)
        return fail(&x, "io", EINVAL, "negative offset");
    x.pos = (uint64_t)offset;
    x.to_eof = length < 0;
    x.end = x.to_eof ? 0 : (uint64_t)offset + (uint64_t)length;

    /* Names in pax headers are UTF-8: convert to UTF-8, whatever the caller's locale. */
    locale_t loc = newlocale(LC_CTYPE_MASK, "C.UTF-8", (locale_t)0);
    locale_t old = loc ? uselocale(loc) : (locale_t)0;

    int rc = -1;
    x.root = openat(root_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int hashing = hasher_init(&x.h);
    x.norm = malloc(x.lim.max_path_len + 2);
    x.target = malloc(x.lim.max_path_len + 2);
    x.cache_path = malloc(x.lim.max_path_len + 2);
    struct stat rst;
    struct statx rsx;
    if (x.root >= 0 && fstat(x.root, &rst) == 0)
        x.root_dev = rst.st_dev;
    if (x.root >= 0 && statx(x.root, "", AT_EMPTY_PATH, STATX_MNT_ID, &rsx) == 0 &&
        (rsx.stx_mask & STATX_MNT_ID))
        x.root_mnt = rsx.stx_mnt_id;
    if (x.root < 0 || dir_info(x.root, &x.root_ino, &x.root_sgid) < 0)
        fail(&x, "io", errno, "opening the root directory");
    else if (hashing < 0 || !x.norm || !x.target || !x.cache_path)
        fail(&x, "io", ENOMEM, "allocating buffers or initializing SHA-256");
    else
        rc = run(&x, expect_sha256);

    inflater_stop(x.inf); /* before anything it uses goes away */
    if (x.a)
        archive_read_free(x.a);
    inflater_free(x.inf);
    if (x.cache_fd >= 0)
        close(x.cache_fd);
    if (x.root >= 0)
        close(x.root);
    for (size_t i = 0; i < x.ndirs; i++)
        free(x.dirs[i].path);
    free(x.dirs);
    free(x.dir_slot);
    wset_free(&x.layer);
    hasher_free(&x.h);
    free(x.norm);
    free(x.target);
    free(x.cache_path);
    if (loc) {
        uselocale(old);
        freelocale(loc);
    }
    return rc;
}

int img_syncfs(int fd) { return syncfs(fd) < 0 ? errno : 0; }

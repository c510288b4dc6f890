/* Streaming, confined OCI layer extraction (libarchive reader + openat2 writer).
 *
 * One call applies one layer blob, bytes [offset, offset+length) of src_fd, onto the directory root_fd.
 * Every path is resolved with openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV) against
 * root_fd; the final component is created with *at calls that never follow it.
 *
 * Policies (see helper/img_helper/extract.py for the long form):
 *  - formats: tar only (ustar, pax, GNU, v7); filters: none, gzip, zstd (built-in, never external programs).
 *  - the SHA-256 covers every byte of the range, including bytes after the tar end marker ("trailing",
 *    hashed but never parsed or decompressed); a range shorter than its declared length is "corrupt".
 *  - gzip/zstd blobs are inflated on a second thread by a raw-format reader; SHA-256 runs on a third.
 *    libarchive does not check the gzip CRC: the digest is what authenticates the content.
 *  - device nodes: only the OCI runtime default character devices (null, zero, full, random, urandom,
 *    tty, console, ptmx) are created, and only as root; other devices are skipped and counted.
 *  - xattrs: user.* and security.capability are applied; other namespaces are dropped and counted;
 *    xattrs on symlinks are dropped.
 *  - names: "./" and "/" prefixes, empty and "." components are stripped; a ".." component is "escape";
 *    newlines are legal (Linux names are bytes); a NUL ends a name (libarchive hands us C strings).
 *  - memory and work are bounded, not only output: libarchive may read at most max_header_bytes (+2 MiB
 *    read-ahead) for one header; the layer's index (names written, directories re-timed) is bounded by
 *    max_index_bytes; trailing bytes count against max_total_bytes. Removal never enters another mount.
 *
 * Error codes (struct img_extract_error.code):
 *   escape   an entry names something outside the root, or the root itself as a non-directory
 *   limit    a configured limit was exceeded (the reason names it)
 *   corrupt  the archive or compressed stream is malformed or truncated
 *   format   not a tar, or a compression we do not accept
 *   digest   the blob's SHA-256 differs from the expected one
 *   path     a path cannot be resolved (symlink loop, a parent that is not a directory, missing link target)
 *   invalid  an entry is well-formed tar but unusable (empty symlink target, unknown type)
 *   io       a system call failed (errno set)
 *   cancelled the progress callback asked to stop
 */
#ifndef IMG_EXTRACT_H
#define IMG_EXTRACT_H

#include <stdint.h>

struct img_limits {
    uint64_t max_entries;
    uint64_t max_total_bytes;
    uint64_t max_file_bytes;
    uint64_t max_path_len;
    uint64_t max_depth;
    uint64_t max_xattr_bytes;
    uint64_t max_header_bytes;
    uint64_t max_index_bytes; /* memory for the layer's own index: names it wrote, directories to re-time */
};

struct img_extract_stats {
    uint64_t entries;
    uint64_t files;
    uint64_t dirs;
    uint64_t symlinks;
    uint64_t hardlinks;
    uint64_t whiteouts;
    uint64_t fifos;
    uint64_t devices;
    uint64_t devices_skipped;
    uint64_t xattrs;
    uint64_t xattrs_dropped;
    uint64_t bytes;          /* file content bytes written */
    uint64_t blob_bytes;     /* blob bytes read (and hashed) */
    uint64_t trailing_bytes; /* blob bytes the readers left after the tar end (compressed: approximate) */
    char blob_sha256[65];
};

struct img_extract_error {
    char code[16];
    char entry[512];
    char reason[256];
    int err;
};

/* Called every progress_entries entries or progress_bytes bytes; a nonzero return cancels. */
typedef int (*img_progress_fn)(void *ctx, const struct img_extract_stats *stats);

/* Returns 0 on success; -1 with *err filled otherwise. expect_sha256: 64 lowercase hex digits or NULL.
 * length < 0 means "to the end of src_fd". */
int img_apply_layer(int root_fd, int src_fd, int64_t offset, int64_t length, const char *expect_sha256,
                    const struct img_limits *limits, struct img_extract_stats *stats,
                    struct img_extract_error *err, img_progress_fn progress, void *progress_ctx,
                    uint64_t progress_entries, uint64_t progress_bytes);

/* syncfs(2) of the filesystem holding fd: the one flush after all layers. Returns 0 or errno. */
int img_syncfs(int fd);

#endif

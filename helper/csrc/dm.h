/* Device-mapper over libdevmapper: ioctls only, never dmsetup text. Every call returns 0 on success,
 * -1 on failure with *e filled (errno from dm_task_get_errno and libdevmapper's last log message). */
#ifndef IMG_DM_H
#define IMG_DM_H
#include <stddef.h>
#include <stdint.h>

struct img_dm_err {
    int err;            /* errno of the failed ioctl (EIO if libdevmapper did not say) */
    char message[512];  /* libdevmapper's last error/warning message, or ours */
};

struct img_dm_info {
    int exists;
    int suspended;
    int live_table;
    int read_only;
    int32_t open_count;
    int32_t target_count;
    uint32_t major;
    uint32_t minor;
    char uuid[130];
};

struct img_dm_pool_status {
    uint64_t transaction_id;
    uint64_t used_metadata_blocks;
    uint64_t total_metadata_blocks;
    uint64_t used_data_blocks;
    uint64_t total_data_blocks;
    uint64_t held_metadata_root;
    uint64_t length;            /* sectors of the pool's table */
    int read_only;
    int fail;
    int error_if_no_space;
    int out_of_data_space;
    int needs_check;
    int error;
};

struct img_dm_thin_status {
    uint64_t mapped_sectors;
    uint64_t highest_mapped_sector;
    uint64_t length;
    int fail;
};

int img_dm_init(void);
int img_dm_message(const char *name, const char *msg, char *resp, size_t resp_len, struct img_dm_err *e);
int img_dm_create(const char *name, const char *uuid, uint64_t length, const char *target,
                  const char *params, int read_only, struct img_dm_err *e);
int img_dm_suspend(const char *name, struct img_dm_err *e);
int img_dm_resume(const char *name, struct img_dm_err *e);
int img_dm_remove(const char *name, int deferred, struct img_dm_err *e);
int img_dm_info(const char *name, struct img_dm_info *out, struct img_dm_err *e);
int img_dm_first_target(const char *name, int status, char *target_type, size_t type_len,
                        uint64_t *length, char *params, size_t params_len, struct img_dm_err *e);
int img_dm_pool_status(const char *name, struct img_dm_pool_status *out, struct img_dm_err *e);
int img_dm_thin_status(const char *name, struct img_dm_thin_status *out, struct img_dm_err *e);
int img_dm_list(char *buf, size_t buf_len, size_t *needed, struct img_dm_err *e);
int img_dm_deps(const char *name, uint64_t *devs, uint32_t max, uint32_t *count, struct img_dm_err *e);
int img_dm_mknode(const char *name, struct img_dm_err *e);
#endif
